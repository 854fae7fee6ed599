//! Flotilla's gateway: the engine core (scheduler, KV block manager, prefix
//! cache, output processing), the executors that run steps on workers, and
//! the OpenAI-compatible HTTP server.

pub mod chat_template;
pub mod cli;
pub mod detokenizer;
pub mod engine;
pub mod executor;
pub mod llm;
pub mod metrics;
pub mod openai;
pub mod tokenizer;

// Shared with the orchestrator; re-exported so `gateway::envs` stays the path.
pub use runtime::{envs, logging};
