//! Runs the model in this process on the engine thread: one worker, TP=1.

use worker::config::ModelConfig;
use worker::pooling::PoolingType;
use worker::{MemoryProfile, ModelRunner, ModelRunnerOutput, SchedulerOutput, WorkerConfig};

use super::{Executor, KvCacheCapacity, Result};

pub struct InProcessExecutor {
    runner: ModelRunner,
    capacity: KvCacheCapacity,
}

impl InProcessExecutor {
    /// Loads the weights and sizes the KV cache (allocated later, by
    /// `initialize_kv_cache`).
    pub fn load(config: &WorkerConfig, profile: Option<MemoryProfile>) -> Result<Self> {
        let mut runner = ModelRunner::load(config)?;
        let s = runner.kv_sizing(profile.as_ref())?;
        Ok(Self {
            runner,
            capacity: KvCacheCapacity {
                bytes_per_block: s.bytes_per_block,
                available_bytes: s.available_bytes,
                device: s.device,
                profile: s.profile,
            },
        })
    }
}

impl InProcessExecutor {
    /// A pooling (embedding) model: no KV cache to size.
    pub fn load_pooling(config: &WorkerConfig, pooling: PoolingType) -> Result<Self> {
        let runner = ModelRunner::load_pooling(config, pooling)?;
        let device = runner.device();
        Ok(Self {
            runner,
            capacity: KvCacheCapacity {
                bytes_per_block: 0,
                available_bytes: 0,
                device,
                profile: None,
            },
        })
    }
}

impl Executor for InProcessExecutor {
    fn model_config(&self) -> &ModelConfig {
        self.runner.model_config()
    }

    fn kv_cache_capacity(&self) -> Result<KvCacheCapacity> {
        Ok(self.capacity)
    }

    fn initialize_kv_cache(&mut self, num_blocks: usize) -> Result<()> {
        Ok(self.runner.initialize_kv_cache(num_blocks)?)
    }

    fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        Ok(self.runner.execute_model(step)?)
    }
}
