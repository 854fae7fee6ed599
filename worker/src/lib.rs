//! Flotilla's inference library: model configs and loaders, model code written
//! once against backend ops, the paged KV cache, the sampler, and the model
//! runner that executes one scheduler step (see `step`).

pub mod attention;
pub mod backend;
pub mod collective;
pub mod config;
pub mod cpu_threads;
pub mod error;
pub mod kv_cache;
pub mod load_format;
pub mod loader;
pub mod model_runner;
pub mod models;
pub mod parallel;
pub mod pooling;
pub mod rope;
pub mod sampler;
pub mod sampling_params;
pub mod service;
pub mod step;
pub mod wire;

pub use backend::Device;
pub use config::{GenerationConfig, ModelConfig, RopeScaling};
pub use error::{Error, Result};
pub use loader::LoadFormat;
pub use model_runner::{KvBudget, KvSizing, MemoryProfile, ModelRunner, WorkerConfig};
pub use parallel::ParallelConfig;
pub use sampling_params::SamplingParams;
pub use step::{
    CachedRequestData, GrammarBitmask, ModelRunnerOutput, NewRequestData, RequestId,
    SchedulerOutput, TokenLogprobs,
};
