//! The OpenAI-compatible HTTP server (vLLM's `vllm serve` API surface).

pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod error;
pub mod fanout;
pub mod logprobs;
pub mod middleware;
pub mod openapi;
pub mod protocol;
pub mod reasoning;
pub mod sampling;
pub mod server;
pub mod sse;
pub mod state;
pub mod structured_outputs;
pub mod system;
pub mod tls;
pub mod tokenize;
pub mod tool_parsers;
pub mod tools;

pub use error::{ApiError, Result};
pub use server::{bind, router, serve, serve_listener, ServerConfig, ServerError};
pub use state::{AppState, SharedState};
