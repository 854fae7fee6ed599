//! The engine core: requests in, token/text deltas out.

pub mod args;
pub mod block_manager;
pub mod client;
mod core;
pub mod error;
mod output;
pub mod profiler;
pub mod request;
pub mod runner;
pub mod scheduler;
pub mod structured_output;
pub mod types;

pub use args::{EngineArgs, LoadedEngine};
pub use client::{EngineClient, EngineStats, RequestStream};
pub use error::{EngineError, Result};
pub use scheduler::SchedulingPolicy;
pub use types::{EngineRequest, FinishReason, RequestOutput, StopMatch};
