//! Runs the model in this process on the engine thread: one worker, TP=1.

use worker::config::ModelConfig;
use worker::{ModelRunner, ModelRunnerOutput, SchedulerOutput, WorkerConfig};

use super::{Executor, KvCacheCapacity, Result};

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

    fn kv_cache_capacity(&self) -> Result<KvCacheCapacity> {
        Ok(KvCacheCapacity {
            bytes_per_block: self.runner.kv_cache_bytes_per_block(),
            available_bytes: runtime::envs::cpu_kvcache_space_bytes()?,
        })
    }

    fn initialize_kv_cache(&mut self, num_blocks: usize) -> Result<()> {
        Ok(self.runner.initialize_kv_cache(num_blocks)?)
    }

    fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        Ok(self.runner.execute_model(step)?)
    }
}
