//! Executors run scheduler steps on workers. `InProcess` runs the model in
//! this process (TP=1, the embedded default); the multi-process and cluster
//! executors come with the orchestrator.

pub mod in_process;

use worker::config::ModelConfig;
use worker::{ModelRunnerOutput, SchedulerOutput};

pub use in_process::InProcessExecutor;

pub type Result<T> = std::result::Result<T, ExecutorError>;

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error(transparent)]
    Worker(#[from] worker::error::Error),

    /// A panic in model code, caught so that the engine loop survives it.
    #[error("model execution panicked: {message}")]
    Panicked { message: String },

    #[error(
        "{what}={size} needs the multi-process or cluster executor, which is not available yet; \
         only 1 runs now"
    )]
    ParallelismUnavailable { what: &'static str, size: usize },
}

/// Runs steps of the step protocol on one model replica.
pub trait Executor: Send {
    fn model_config(&self) -> &ModelConfig;

    fn kv_cache_bytes_per_block(&self) -> usize;

    /// The device the model runs on.
    fn device(&self) -> worker::Device;

    /// Bytes the KV cache may take after a profiling step (GPU), or `None`
    /// where the KV cache is sized by `VLLM_CPU_KVCACHE_SPACE` (CPU).
    fn profile_kv_cache_bytes(
        &mut self,
        utilization: f64,
        max_num_batched_tokens: usize,
        max_num_seqs: usize,
    ) -> Result<Option<worker::KvBudget>>;

    fn initialize_kv_cache(&mut self, num_blocks: usize) -> Result<()>;

    fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput>;
}
