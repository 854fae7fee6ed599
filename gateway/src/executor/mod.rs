//! Executors run scheduler steps on workers: `uni` runs the model in this
//! process (world size 1), `mp` in worker processes on this machine, `ray`
//! in worker actors the orchestrator places. The engine
//! sees only the `Executor` trait; `build` picks and starts the right one.

pub mod cluster;
pub mod in_process;
pub mod multiproc;
mod remote;
pub mod worker_env;

use worker::config::ModelConfig;
use worker::{MemoryProfile, ModelRunnerOutput, SchedulerOutput, WorkerConfig};

pub use cluster::ClusterExecutor;
pub use in_process::InProcessExecutor;
pub use multiproc::MultiprocExecutor;

pub type Result<T> = std::result::Result<T, ExecutorError>;

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error(transparent)]
    Worker(#[from] worker::error::Error),

    #[error(transparent)]
    Env(#[from] runtime::envs::EnvError),

    /// A panic in model code, caught so that the engine loop survives it.
    #[error("model execution panicked: {message}")]
    Panicked { message: String },

    #[error("{what}={size} is not available yet: {reason}")]
    ParallelismUnavailable {
        what: &'static str,
        size: usize,
        reason: &'static str,
    },

    #[error("cannot start worker rank {rank}: {message}")]
    Spawn { rank: usize, message: String },

    /// A set-up call (init, load, KV cache) a worker refused or failed.
    #[error("worker rank {rank}: {call} failed: {message}")]
    Call {
        rank: usize,
        call: &'static str,
        message: String,
    },

    /// A step a worker rejected for its requests' sake; the workers go on.
    #[error("worker rank {rank}: {message}")]
    StepRejected { rank: usize, message: String },

    #[error("invalid {name}: {message}")]
    InvalidEnv { name: &'static str, message: String },

    /// The orchestrator refused or failed a request (placement, actors).
    #[error("cluster: {message}")]
    Cluster { message: String },

    /// A worker, its connection or its collective group is gone: the
    /// executor cannot run steps any more.
    #[error("lost worker rank {rank}: {reason}")]
    WorkerLost { rank: usize, reason: String },
}

impl ExecutorError {
    /// True when the executor is unusable (the engine must stop and report
    /// unhealthy); false when only the step's requests failed.
    pub fn is_fatal(&self) -> bool {
        matches!(self, ExecutorError::WorkerLost { .. })
    }
}

/// What a caught panic in model code said.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Bytes of one KV block, and how many blocks fit on every worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheCapacity {
    pub bytes_per_block: usize,
    /// Bytes the KV cache may take on the most constrained worker, expressed
    /// in that worker's blocks times `bytes_per_block`.
    pub available_bytes: usize,
    /// Where the model runs (rank 0's device).
    pub device: worker::Device,
    /// The GPU memory profile of the most constrained worker, when one ran.
    pub profile: Option<worker::KvBudget>,
}

/// Runs steps of the step protocol on one model replica.
pub trait Executor: Send {
    fn model_config(&self) -> &ModelConfig;

    fn kv_cache_capacity(&self) -> Result<KvCacheCapacity>;

    fn initialize_kv_cache(&mut self, num_blocks: usize) -> Result<()>;

    /// vLLM's graph capture, after `initialize_kv_cache` (`--enforce-eager`
    /// skips it): returns how many graphs of decode steps were captured.
    /// Executors whose workers capture none run every step eagerly.
    fn capture_graphs(&mut self, _max_num_seqs: usize) -> Result<usize> {
        Ok(0)
    }

    fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput>;

    /// Steps that may be in flight at once (vLLM's batch queue): one per
    /// pipeline stage, so that every stage has work. Above 1, the engine
    /// uses `submit` and `wait_oldest` instead of `execute_model`.
    fn max_concurrent_batches(&self) -> usize {
        1
    }

    /// Starts `step` without waiting for it (executors that report more
    /// than one concurrent batch).
    fn submit(&mut self, _step: &SchedulerOutput) -> Result<()> {
        Err(ExecutorError::ParallelismUnavailable {
            what: "max_concurrent_batches",
            size: 2,
            reason: "this executor runs one step at a time",
        })
    }

    /// The output of the oldest step `submit` started.
    fn wait_oldest(&mut self) -> Result<ModelRunnerOutput> {
        Err(ExecutorError::ParallelismUnavailable {
            what: "max_concurrent_batches",
            size: 2,
            reason: "this executor runs one step at a time",
        })
    }

    /// Checked while the engine is idle: a fatal error when a worker died
    /// between steps.
    fn check_health(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Builds a replacement for an executor whose workers were lost: new
/// workers with the same model and layout, their KV cache the same size.
pub type Rebuild = Box<dyn FnMut() -> Result<Box<dyn Executor>> + Send>;

/// vLLM's `--distributed-executor-backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DistributedBackend {
    /// The model in this process (world size 1).
    Uni,
    /// One worker process per rank on this machine.
    Mp,
    /// Worker actors placed by the orchestrator.
    Ray,
}

impl DistributedBackend {
    /// vLLM's default: `uni` for a world of one; `ray` for a gateway that
    /// runs inside a placement group (its workers belong in that group),
    /// even when the world would fit on this node; else `mp`.
    pub fn default_for(world_size: usize, in_placement_group: bool) -> Self {
        if world_size <= 1 {
            Self::Uni
        } else if in_placement_group {
            Self::Ray
        } else {
            Self::Mp
        }
    }

    /// `default_for` for this process: inside a placement group when a
    /// node agent started it as an actor in one.
    pub fn default_here(world_size: usize) -> Self {
        let in_group = runtime::envs::raw(runtime::envs::FLOTILLA_PLACEMENT_GROUP_ID).is_some();
        Self::default_for(world_size, in_group)
    }
}

/// Starts the executor `backend` names for `config` (whose `parallel` gives
/// the world: tp_size x pp_size ranks), loads the model on it and sizes the
/// KV cache (on a GPU by `profile`, vLLM's profile run; `None` when the block
/// count is given).
/// `async_scheduling`: the uni executor keeps two steps in flight on a
/// thread of its own (`InProcessExecutor`); mp and ray keep one per
/// pipeline stage either way.
pub fn build(
    backend: DistributedBackend,
    config: &WorkerConfig,
    profile: Option<MemoryProfile>,
    async_scheduling: bool,
) -> Result<Box<dyn Executor>> {
    let world = config.parallel.tp_size * config.parallel.pp_size;
    if config.parallel.pp_size > 1 {
        check_pp_partition(config)?;
    }
    match backend {
        DistributedBackend::Uni if world > 1 => Err(ExecutorError::ParallelismUnavailable {
            what: "tensor_parallel_size x pipeline_parallel_size",
            size: world,
            reason: "the uni executor runs one rank; use --distributed-executor-backend mp",
        }),
        DistributedBackend::Uni => Ok(Box::new(InProcessExecutor::load(
            config,
            profile,
            async_scheduling,
        )?)),
        DistributedBackend::Mp => Ok(Box::new(MultiprocExecutor::start(config, profile)?)),
        DistributedBackend::Ray => Ok(Box::new(ClusterExecutor::start(config, profile)?)),
    }
}

/// Starts the executor for a pooling (embedding) model (`config.pooling`
/// set): no KV cache to size. `mp` and `ray` run it in one worker process
/// (the encoder has no tensor or pipeline parallel yet: the worker refuses
/// a larger world, naming it).
pub fn build_pooling(
    backend: DistributedBackend,
    config: &WorkerConfig,
) -> Result<Box<dyn Executor>> {
    match backend {
        DistributedBackend::Uni => Ok(Box::new(InProcessExecutor::load_pooling(config)?)),
        DistributedBackend::Mp => Ok(Box::new(MultiprocExecutor::start(config, None)?)),
        DistributedBackend::Ray => Ok(Box::new(ClusterExecutor::start(config, None)?)),
    }
}

/// Checks `VLLM_PP_LAYER_PARTITION` (or the even split) against the model
/// before any worker starts, and logs an uneven split as vLLM does.
fn check_pp_partition(config: &WorkerConfig) -> Result<()> {
    let model = ModelConfig::load(&config.model, config.load_format, &config.hf_overrides)?;
    let spec = runtime::envs::raw(runtime::envs::VLLM_PP_LAYER_PARTITION);
    let parts = worker::parallel::pp_partition(
        model.num_hidden_layers,
        config.parallel.pp_size,
        spec.as_deref(),
    )?;
    let list = parts
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if spec.is_none() && parts.iter().any(|&p| p != parts[0]) {
        tracing::info!(
            "Hidden layers were unevenly partitioned: [{list}]. This can be manually overridden using the VLLM_PP_LAYER_PARTITION environment variable"
        );
    } else {
        tracing::info!(
            "Pipeline stages hold [{list}] of {} layers",
            model.num_hidden_layers
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_backend_is_ray_inside_a_placement_group() {
        assert_eq!(
            DistributedBackend::default_for(1, false),
            DistributedBackend::Uni
        );
        assert_eq!(
            DistributedBackend::default_for(1, true),
            DistributedBackend::Uni
        );
        assert_eq!(
            DistributedBackend::default_for(2, false),
            DistributedBackend::Mp
        );
        assert_eq!(
            DistributedBackend::default_for(2, true),
            DistributedBackend::Ray
        );
    }
}
