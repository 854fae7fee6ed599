//! Runs the model in this process on the engine thread: one worker, TP=1.

use worker::config::ModelConfig;
use worker::{ModelRunner, ModelRunnerOutput, SchedulerOutput, WorkerConfig};

use super::{Executor, Result};

pub struct InProcessExecutor {
    runner: ModelRunner,
}

impl InProcessExecutor {
    /// Loads the weights (the KV cache comes with `initialize_kv_cache`).
    pub fn load(config: &WorkerConfig) -> Result<Self> {
        Ok(Self {
            runner: ModelRunner::load(config)?,
        })
    }
}

impl Executor for InProcessExecutor {
    fn model_config(&self) -> &ModelConfig {
        self.runner.model_config()
    }

    fn kv_cache_bytes_per_block(&self) -> usize {
        self.runner.kv_cache_bytes_per_block()
    }

    fn device(&self) -> worker::Device {
        self.runner.device()
    }

    fn profile_kv_cache_bytes(
        &mut self,
        utilization: f64,
        max_num_batched_tokens: usize,
        max_num_seqs: usize,
    ) -> Result<Option<worker::KvBudget>> {
        Ok(self
            .runner
            .profile_kv_cache_bytes(utilization, max_num_batched_tokens, max_num_seqs)?)
    }

    fn initialize_kv_cache(&mut self, num_blocks: usize) -> Result<()> {
        Ok(self.runner.initialize_kv_cache(num_blocks)?)
    }

    fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        Ok(self.runner.execute_model(step)?)
    }
}
