//! vLLM's engine flags, their checks, and the builder that loads the model,
//! sizes the KV cache and starts the engine loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use worker::config::{GenerationConfig, ModelConfig};
use worker::{Device, LoadFormat, MemoryProfile, ParallelConfig, WorkerConfig};

use super::block_manager::BlockManager;
use super::client::EngineClient;
use super::error::{EngineError, Result};
use super::runner::{self, ConvertOption, RunnerKind, RunnerOption, TaskOption};
use super::scheduler::{Scheduler, SchedulerConfig, SchedulingPolicy};
use crate::envs;
use crate::executor::{self, DistributedBackend, Rebuild};
use crate::tokenizer::Tokenizer;
use worker::pooling::{self, PoolerConfig};

// Declared once by the worker, which runs them.
use worker::backend::ComputeDtype;
pub use worker::kv_cache::BLOCK_SIZES;
const DTYPES: &[&str] = ComputeDtype::NAMES;
const LOAD_FORMATS: &[&str] = LoadFormat::NAMES;

/// Engine flags as `vllm serve` has them. The model is not a field: the
/// `serve` command takes it positionally.
#[derive(clap::Args, Clone, Debug)]
pub struct EngineArgs {
    /// Tokenizer to use instead of the model's (HF directory, tokenizer.json or .gguf).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,

    /// auto, safetensors, gguf or dummy (random weights at the config's shapes).
    #[arg(long, default_value = "auto")]
    pub load_format: String,

    /// auto, half, float16, bfloat16, float, float32. "auto" takes a 16-bit
    /// checkpoint's torch_dtype and runs f32 checkpoints and GGUF files in
    /// float32.
    #[arg(long, default_value = "auto")]
    pub dtype: String,

    /// JSON object merged over the model's config.json.
    #[arg(long)]
    pub hf_overrides: Option<String>,

    /// Context length; defaults to the model's max_position_embeddings.
    /// Accepts 1k (1000) / 1K (1024) style suffixes.
    #[arg(long, value_parser = parse_human_int)]
    pub max_model_len: Option<usize>,

    /// Tokens per KV cache block: 8, 16, 32, 64 or 128.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,

    /// Fraction of the GPU's memory this engine may use (weights,
    /// activations and the KV cache); the KV cache gets what is left after
    /// a profiling step. GPU only (the CPU uses VLLM_CPU_KVCACHE_SPACE).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,

    /// Number of KV blocks, instead of sizing from the memory left
    /// (GPU: --gpu-memory-utilization; CPU: VLLM_CPU_KVCACHE_SPACE).
    #[arg(long)]
    pub num_gpu_blocks_override: Option<usize>,

    /// Reuse KV blocks across requests that share a prefix (on by default).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,

    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,

    /// Most requests accepted at once, running and waiting (TGI's flag of
    /// this name); past it a request gets 503 with Retry-After and nothing
    /// accepted is affected. Default: no bound, as vLLM.
    #[arg(long)]
    pub max_concurrent_requests: Option<usize>,

    /// Most sequences in one step.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,

    /// Token budget of one step (prefill chunks and decodes together).
    #[arg(long, value_parser = parse_human_int, default_value = "2048")]
    pub max_num_batched_tokens: usize,

    #[arg(long, value_enum, default_value_t = SchedulingPolicy::Fcfs)]
    pub scheduling_policy: SchedulingPolicy,

    /// Seed for weights of --load-format dummy and for requests without a seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// "auto" (the model's generation_config.json), "vllm" (vLLM's defaults) or a folder.
    #[arg(long, default_value = "auto")]
    pub generation_config: String,

    /// Run every step eagerly: no CUDA graphs are captured at start (by
    /// default the GPU captures decode steps of 1, 2, 4, 8, 16, ... up to
    /// --max-num-seqs sequences and replays them).
    #[arg(long)]
    pub enforce_eager: bool,

    /// Schedule while the model runs: the uni executor runs steps on a
    /// thread of its own with two in flight, each holding half of the
    /// running requests, so the engine's work between steps (scheduling,
    /// detokenization, answering clients) no longer leaves the GPU idle.
    #[arg(long)]
    pub async_scheduling: bool,

    /// auto (the GPU when this build has the CUDA backend and one is
    /// visible), cuda or cpu.
    #[arg(long, default_value = "auto")]
    pub device: String,

    #[arg(long, visible_alias = "tp", default_value_t = 1)]
    pub tensor_parallel_size: usize,

    #[arg(long, visible_alias = "pp", default_value_t = 1)]
    pub pipeline_parallel_size: usize,

    /// uni (in this process), mp (worker processes on this machine) or ray
    /// (worker actors placed by the orchestrator). Default: uni for a world
    /// of one, else mp.
    #[arg(long, value_enum)]
    pub distributed_executor_backend: Option<DistributedBackend>,
    /// CPU, GGUF weights: quantize activations to int8 per 32 values and
    /// run sub-8-bit weights as Q8_0 (llama.cpp-equivalent numerics).
    /// Faster, but not the model's own arithmetic: near-ties between tokens
    /// can flip. By default the dequantized weights multiply f32
    /// activations exactly, as HF transformers computes on the same file.
    #[arg(long)]
    pub cpu_int8_activations: bool,

    /// auto, generate or pooling (embeddings). auto: pooling for encoder
    /// architectures (BertModel), else generate.
    #[arg(long, value_enum, default_value_t = RunnerOption::Auto)]
    pub runner: RunnerOption,

    /// Adapt the model to a pooling task: auto, none, embed (classify and
    /// reward are not supported yet).
    #[arg(long, value_enum, default_value_t = ConvertOption::Auto)]
    pub convert: ConvertOption,

    /// Deprecated by vLLM in favour of --runner / --convert: generate,
    /// embed (or embedding), ...
    #[arg(long, value_enum, default_value_t = TaskOption::Auto)]
    pub task: TaskOption,

    /// Pooling models: JSON object over the model's own pooler
    /// (sentence-transformers files): {"pooling_type": "MEAN"|"CLS"|"LAST",
    /// "normalize": bool, "dimensions": int}.
    #[arg(long)]
    pub pooler_config: Option<String>,

    /// The older name of --pooler-config (deprecated by vLLM).
    #[arg(long)]
    pub override_pooler_config: Option<String>,
}

impl Default for EngineArgs {
    fn default() -> Self {
        Self {
            tokenizer: None,
            load_format: "auto".into(),
            dtype: "auto".into(),
            hf_overrides: None,
            max_model_len: None,
            block_size: 16,
            num_gpu_blocks_override: None,
            gpu_memory_utilization: 0.9,
            enable_prefix_caching: false,
            no_enable_prefix_caching: false,
            max_concurrent_requests: None,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            scheduling_policy: SchedulingPolicy::Fcfs,
            seed: 0,
            generation_config: "auto".into(),
            device: "auto".into(),
            enforce_eager: false,
            async_scheduling: false,
            tensor_parallel_size: 1,
            pipeline_parallel_size: 1,
            distributed_executor_backend: None,
            cpu_int8_activations: false,
            runner: RunnerOption::Auto,
            convert: ConvertOption::Auto,
            task: TaskOption::Auto,
            pooler_config: None,
            override_pooler_config: None,
        }
    }
}

/// A started engine and what the server needs next to it.
pub struct LoadedEngine {
    pub client: EngineClient,
    pub tokenizer: Arc<Tokenizer>,
    pub model_config: ModelConfig,
    /// `None` with `--generation-config vllm` or when the model has none.
    pub generation_defaults: Option<GenerationConfig>,
    pub max_model_len: usize,
    /// A pooling (embedding) model's pooler; `None` for a generative model.
    pub pooler: Option<PoolerConfig>,
}

/// "2048", "4k" (4000), "4K" (4096), "1m", "1M", as vLLM accepts.
pub fn parse_human_int(s: &str) -> std::result::Result<usize, String> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1_000),
        Some('K') => (&s[..s.len() - 1], 1_024),
        Some('m') => (&s[..s.len() - 1], 1_000_000),
        Some('M') => (&s[..s.len() - 1], 1_048_576),
        _ => (s, 1),
    };
    let n: f64 = digits
        .parse()
        .map_err(|_| format!("expected an integer like 2048, 4k or 4K, got {s:?}"))?;
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v.fract() != 0.0 {
        return Err(format!(
            "expected a non-negative whole number of tokens, got {s:?}"
        ));
    }
    Ok(v as usize)
}

impl EngineArgs {
    pub fn prefix_caching(&self) -> bool {
        !self.no_enable_prefix_caching
    }

    /// The checks that need no model.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |arg: &'static str, message: String| Err(EngineError::InvalidArgs { arg, message });
        if !BLOCK_SIZES.contains(&self.block_size) {
            return bad(
                "--block-size",
                format!(
                    "invalid choice: {} (choose from {})",
                    self.block_size,
                    BLOCK_SIZES
                        .iter()
                        .map(|b| b.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        if self.device.parse::<Device>().is_err() {
            return bad(
                "--device",
                format!(
                    "invalid choice: {} (choose from auto, cuda, cpu)",
                    self.device
                ),
            );
        }
        if !DTYPES.contains(&self.dtype.as_str()) {
            return bad(
                "--dtype",
                format!(
                    "invalid choice: '{}' (choose from {})",
                    self.dtype,
                    DTYPES.join(", ")
                ),
            );
        }
        if !LOAD_FORMATS.contains(&self.load_format.as_str()) {
            return bad(
                "--load-format",
                format!(
                    "invalid choice: '{}' (choose from {})",
                    self.load_format,
                    LOAD_FORMATS.join(", ")
                ),
            );
        }
        if self.max_concurrent_requests == Some(0) {
            return bad("--max-concurrent-requests", "must be at least 1".into());
        }
        if self.max_num_seqs == 0 {
            return bad("--max-num-seqs", "must be at least 1".into());
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return bad(
                "--max-num-batched-tokens",
                format!(
                    "max_num_batched_tokens ({}) must be greater than or equal to max_num_seqs ({}).",
                    self.max_num_batched_tokens, self.max_num_seqs
                ),
            );
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return bad(
                "--gpu-memory-utilization",
                format!("must be in (0, 1], got {}", self.gpu_memory_utilization),
            );
        }
        if self.num_gpu_blocks_override == Some(0) {
            return bad("--num-gpu-blocks-override", "must be at least 1".into());
        }
        if self.max_model_len == Some(0) {
            return bad("--max-model-len", "must be at least 1".into());
        }
        self.hf_overrides_json()?;
        for (what, size) in [
            ("tensor_parallel_size", self.tensor_parallel_size),
            ("pipeline_parallel_size", self.pipeline_parallel_size),
        ] {
            if size == 0 {
                return bad(
                    if what.starts_with("tensor") {
                        "--tensor-parallel-size"
                    } else {
                        "--pipeline-parallel-size"
                    },
                    "must be at least 1".into(),
                );
            }
        }
        let backend = self.executor_backend();
        if backend == DistributedBackend::Uni && self.world_size() > 1 {
            return bad(
                "--distributed-executor-backend",
                format!(
                    "uni runs a world of one rank, but tensor_parallel_size x pipeline_parallel_size is {}; use mp",
                    self.world_size()
                ),
            );
        }
        Ok(())
    }

    /// Ranks in the world: tensor x pipeline parallel.
    pub fn world_size(&self) -> usize {
        self.tensor_parallel_size * self.pipeline_parallel_size
    }

    /// `--distributed-executor-backend`, or vLLM's default for the world size
    /// (and whether this gateway runs inside a placement group).
    pub fn executor_backend(&self) -> DistributedBackend {
        self.distributed_executor_backend
            .unwrap_or_else(|| DistributedBackend::default_here(self.world_size()))
    }

    /// `--pooler-config` (or the older `--override-pooler-config`) as JSON.
    pub fn pooler_config_json(&self) -> Result<serde_json::Value> {
        let (arg, text) = match (&self.pooler_config, &self.override_pooler_config) {
            (Some(_), Some(_)) => {
                return Err(EngineError::InvalidArgs {
                    arg: "--pooler-config",
                    message: "give --pooler-config or --override-pooler-config, not both".into(),
                })
            }
            (Some(t), None) => ("--pooler-config", t),
            (None, Some(t)) => {
                if envs::deprecation_warnings() {
                    tracing::warn!("--override-pooler-config is deprecated; use --pooler-config");
                }
                ("--override-pooler-config", t)
            }
            (None, None) => return Ok(serde_json::Value::Null),
        };
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) if v.is_object() => Ok(v),
            Ok(v) => Err(EngineError::InvalidArgs {
                arg,
                message: format!("must be a JSON object, got {v}"),
            }),
            Err(e) => Err(EngineError::InvalidArgs {
                arg,
                message: format!("invalid JSON: {e}"),
            }),
        }
    }

    pub fn hf_overrides_json(&self) -> Result<serde_json::Value> {
        let Some(text) = &self.hf_overrides else {
            return Ok(serde_json::Value::Null);
        };
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) if v.is_object() => Ok(v),
            Ok(v) => Err(EngineError::InvalidArgs {
                arg: "--hf-overrides",
                message: format!("must be a JSON object, got {v}"),
            }),
            Err(e) => Err(EngineError::InvalidArgs {
                arg: "--hf-overrides",
                message: format!("invalid JSON: {e}"),
            }),
        }
    }

    /// Loads the tokenizer and the model, sizes the KV cache and starts the
    /// engine loop. Blocking (weights load here).
    pub fn build(&self, model: &Path) -> Result<LoadedEngine> {
        // vLLM settings that would have no effect are named before anything loads.
        runtime::envs::check_startup()?;
        self.validate()?;
        if self.executor_backend() == DistributedBackend::Uni {
            // The model runs in this process, on rayon's global pool: sized
            // and pinned before the tokenizer or anything else builds it.
            worker::cpu_threads::init_from_env()?;
        }
        // Names that are not Flotilla kernels are warned about at start, on any device.
        worker::backend::disabled_kernels::DisabledKernels::from_env();
        // Checked here so a mistyped model path is reported as the model's,
        // not as the tokenizer's (which loads first and defaults to it).
        if !model.exists() {
            return Err(EngineError::InvalidArgs {
                arg: "model",
                message: format!("model path {} does not exist", model.display()),
            });
        }
        let tokenizer = Arc::new(Tokenizer::load(model, self.tokenizer.as_deref())?);
        let load_format: LoadFormat = self.load_format.parse()?;
        let device: Device = self.device.parse().map_err(|_| EngineError::InvalidArgs {
            arg: "--device",
            message: format!(
                "invalid choice '{}' (choose from auto, cuda, cpu)",
                self.device
            ),
        })?;
        let worker_config = WorkerConfig {
            model: model.to_path_buf(),
            device,
            load_format,
            dtype: self.dtype.clone(),
            hf_overrides: self.hf_overrides_json()?,
            block_size: self.block_size,
            parallel: ParallelConfig {
                tp_size: self.tensor_parallel_size,
                pp_size: self.pipeline_parallel_size,
                ..ParallelConfig::default()
            },
            seed: self.seed,
            max_model_len: 0,
            cpu_int8_activations: self.cpu_int8_activations,
            pooling: None,
        };
        // The runner sizes its rotary tables by max_model_len, so resolve it
        // from the config before loading the weights.
        let model_config = ModelConfig::load(model, load_format, &worker_config.hf_overrides)?;
        let kind = runner::resolve(
            self.runner,
            self.convert,
            self.task,
            &model_config.architecture,
        )?;
        if kind == RunnerKind::Pooling {
            return self.build_pooling(model, tokenizer, worker_config, model_config);
        }
        let max_model_len = resolve_max_model_len(
            self.max_model_len,
            model_config.max_position_embeddings,
            envs::flag(envs::VLLM_ALLOW_LONG_MAX_MODEL_LEN),
        )?;
        let worker_config = WorkerConfig {
            max_model_len,
            ..worker_config
        };
        // vLLM's profile run sizes a GPU's KV cache; a given block count needs none.
        let profile = self
            .num_gpu_blocks_override
            .is_none()
            .then_some(MemoryProfile {
                gpu_memory_utilization: self.gpu_memory_utilization,
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
            });
        let mut executor = executor::build(
            self.executor_backend(),
            &worker_config,
            profile,
            self.async_scheduling,
        )?;
        let model_config = executor.model_config().clone();

        let capacity = executor.kv_cache_capacity()?;
        if let Some(b) = &capacity.profile {
            const GIB: f64 = (1u64 << 30) as f64;
            tracing::info!(
                "Memory profiling: {:.2} GiB total x {} utilization; {:.2} GiB in use after loading, {:.2} GiB peak activations; {:.2} GiB for the KV cache",
                b.total as f64 / GIB,
                self.gpu_memory_utilization,
                b.used_before as f64 / GIB,
                b.peak_activations as f64 / GIB,
                b.available as f64 / GIB
            );
        }
        let num_blocks = num_kv_blocks(
            self.num_gpu_blocks_override,
            capacity.available_bytes,
            capacity.bytes_per_block,
            self.block_size,
            max_model_len,
        )?;
        tracing::info!(
            "# {} blocks: {num_blocks}",
            if capacity.device == Device::Cuda {
                "GPU"
            } else {
                "CPU"
            }
        );
        tracing::info!(
            "Maximum concurrency for {max_model_len} tokens per request: {:.2}x",
            (num_blocks * self.block_size) as f64 / max_model_len as f64
        );
        executor.initialize_kv_cache(num_blocks)?;
        if self.enforce_eager {
            tracing::info!("--enforce-eager: every step runs eagerly (no CUDA graphs)");
        } else {
            executor.capture_graphs(self.max_num_seqs)?;
        }

        let generation_defaults = match self.generation_config.as_str() {
            "vllm" => None,
            "auto" => GenerationConfig::load(model)?,
            dir => {
                let dir = Path::new(dir);
                let found = GenerationConfig::load(dir)?;
                if found.is_none() {
                    return Err(EngineError::InvalidArgs {
                        arg: "--generation-config",
                        message: format!("no generation_config.json in {}", dir.display()),
                    });
                }
                found
            }
        };
        let mut eos = model_config.eos_token_ids.clone();
        let extra = generation_defaults
            .iter()
            .flat_map(|g| g.eos_token_ids.iter().copied());
        for id in extra.chain(tokenizer.eos_token_id()) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }

        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: self.max_num_seqs,
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_model_len,
                policy: self.scheduling_policy,
                pooling: false,
            },
            BlockManager::new(num_blocks, self.block_size, self.prefix_caching()),
            eos,
        );
        let interval: f64 = envs::get(envs::VLLM_LOG_STATS_INTERVAL)?.unwrap_or(10.0);
        let interval =
            Duration::try_from_secs_f64(interval.max(0.1)).unwrap_or(Duration::from_secs(10));
        // Distributed workers can be lost and replaced; the in-process model
        // goes only with the gateway itself.
        let backend = self.executor_backend();
        let graphs = (!self.enforce_eager).then_some(self.max_num_seqs);
        let rebuild: Option<Rebuild> = (backend != DistributedBackend::Uni).then(|| {
            Box::new(move || {
                let mut executor = executor::build(backend, &worker_config, None, false)?;
                executor.initialize_kv_cache(num_blocks)?;
                if let Some(max_num_seqs) = graphs {
                    executor.capture_graphs(max_num_seqs)?;
                }
                Ok(executor)
            }) as Rebuild
        });
        let client =
            EngineClient::spawn(scheduler, executor, rebuild, tokenizer.clone(), interval)?
                .with_max_concurrent_requests(self.max_concurrent_requests);
        Ok(LoadedEngine {
            client,
            tokenizer,
            model_config,
            generation_defaults,
            max_model_len,
            pooler: None,
        })
    }

    /// `build` for a pooling (embedding) model: the pooler from the
    /// model's sentence-transformers files and --pooler-config, the length
    /// limit from sentence_bert_config.json as vLLM takes it, and an engine
    /// whose scheduler runs each prompt whole (vLLM turns chunked prefill
    /// and the prefix cache off for encoder models).
    fn build_pooling(
        &self,
        model: &Path,
        tokenizer: Arc<Tokenizer>,
        worker_config: WorkerConfig,
        model_config: ModelConfig,
    ) -> Result<LoadedEngine> {
        let dir = if model.is_dir() {
            model
        } else {
            model.parent().unwrap_or(Path::new("."))
        };
        let pooler = PoolerConfig::resolve(dir, &self.pooler_config_json()?)?;
        let derived = match pooling::sentence_transformers_max_len(dir)? {
            Some(n) => n.min(model_config.max_position_embeddings),
            None => model_config.max_position_embeddings,
        };
        let max_model_len = resolve_max_model_len(
            self.max_model_len,
            derived,
            envs::flag(envs::VLLM_ALLOW_LONG_MAX_MODEL_LEN),
        )?;
        if max_model_len > model_config.max_position_embeddings {
            return Err(EngineError::InvalidArgs {
                arg: "--max-model-len",
                message: format!(
                    "{max_model_len} is past the model's {} learned positions",
                    model_config.max_position_embeddings
                ),
            });
        }
        if self.max_num_batched_tokens < max_model_len {
            return Err(EngineError::InvalidArgs {
                arg: "--max-num-batched-tokens",
                message: format!(
                    "max_num_batched_tokens ({}) is smaller than max_model_len ({max_model_len}). \
                     This effectively limits the maximum sequence length to max_num_batched_tokens \
                     and makes vLLM reject longer sequences. Please increase max_num_batched_tokens \
                     or decrease max_model_len.",
                    self.max_num_batched_tokens
                ),
            });
        }
        let worker_config = WorkerConfig {
            max_model_len,
            pooling: Some(pooler.pooling_type),
            ..worker_config
        };
        let mut executor = executor::build_pooling(self.executor_backend(), &worker_config)?;
        let model_config = executor.model_config().clone();
        tracing::info!(
            "Pooling model: {} pooling{}, max_model_len {max_model_len}",
            pooler.pooling_type.name(),
            if pooler.normalize { ", normalized" } else { "" }
        );
        // No KV cache: the block manager only bounds how many sequences
        // are in flight, so it gets room for max_num_seqs whole ones.
        let num_blocks = self.max_num_seqs * max_model_len.div_ceil(self.block_size);
        executor.initialize_kv_cache(num_blocks)?;
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: self.max_num_seqs,
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_model_len,
                policy: self.scheduling_policy,
                pooling: true,
            },
            BlockManager::new(num_blocks, self.block_size, false),
            Vec::new(),
        );
        let interval: f64 = envs::get(envs::VLLM_LOG_STATS_INTERVAL)?.unwrap_or(10.0);
        let interval =
            Duration::try_from_secs_f64(interval.max(0.1)).unwrap_or(Duration::from_secs(10));
        let client = EngineClient::spawn(scheduler, executor, None, tokenizer.clone(), interval)?
            .with_max_concurrent_requests(self.max_concurrent_requests);
        Ok(LoadedEngine {
            client,
            tokenizer,
            model_config,
            generation_defaults: None,
            max_model_len,
            pooler: Some(pooler),
        })
    }
}

/// `--max-model-len` against the model's limit, with vLLM's wording.
pub fn resolve_max_model_len(
    requested: Option<usize>,
    max_position_embeddings: usize,
    allow_long: bool,
) -> Result<usize> {
    let Some(n) = requested else {
        return Ok(max_position_embeddings);
    };
    if n > max_position_embeddings {
        let msg = format!(
            "User-specified max_model_len ({n}) is greater than the derived max_model_len \
             (max_position_embeddings={max_position_embeddings} or model_max_length=None in model's config.json). This may \
             lead to incorrect model outputs or CUDA errors."
        );
        if !allow_long {
            return Err(EngineError::InvalidArgs {
                arg: "--max-model-len",
                message: format!("{msg} To allow overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"),
            });
        }
        tracing::warn!("{msg} Make sure the value is correct and within the model context size.");
    }
    Ok(n)
}

/// KV blocks from the override or the memory budget; one request of
/// `max_model_len` tokens must fit.
pub fn num_kv_blocks(
    override_blocks: Option<usize>,
    available_bytes: usize,
    bytes_per_block: usize,
    block_size: usize,
    max_model_len: usize,
) -> Result<usize> {
    let num_blocks = match override_blocks {
        Some(n) => n,
        None => available_bytes / bytes_per_block.max(1),
    };
    let needed = max_model_len.div_ceil(block_size);
    if num_blocks < needed {
        const GIB: f64 = (1u64 << 30) as f64;
        return Err(EngineError::KvCacheTooSmall {
            max_model_len,
            needed_gib: (needed * bytes_per_block) as f64 / GIB,
            available_gib: (num_blocks * bytes_per_block) as f64 / GIB,
            estimated_max_len: num_blocks * block_size,
        });
    }
    Ok(num_blocks)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn parse(args: &[&str]) -> EngineArgs {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap()
            .engine
    }

    #[test]
    fn int8_activations_are_opt_in() {
        assert!(!parse(&[]).cpu_int8_activations);
        assert!(!EngineArgs::default().cpu_int8_activations);
        assert!(parse(&["--cpu-int8-activations"]).cpu_int8_activations);
    }

    #[test]
    fn defaults_match_vllm() {
        let a = parse(&[]);
        assert_eq!(a.block_size, 16);
        assert_eq!(a.max_num_seqs, 256);
        assert_eq!(a.max_num_batched_tokens, 2048);
        assert_eq!(a.seed, 0);
        assert_eq!(a.scheduling_policy, SchedulingPolicy::Fcfs);
        assert!(a.prefix_caching());
        assert!(a.validate().is_ok());
        let d = EngineArgs::default();
        assert_eq!(
            (d.block_size, d.max_num_seqs, d.max_num_batched_tokens),
            (16, 256, 2048)
        );
    }

    #[test]
    fn prefix_caching_flags_last_wins() {
        assert!(!parse(&["--no-enable-prefix-caching"]).prefix_caching());
        assert!(parse(&["--no-enable-prefix-caching", "--enable-prefix-caching"]).prefix_caching());
        assert!(
            !parse(&["--enable-prefix-caching", "--no-enable-prefix-caching"]).prefix_caching()
        );
    }

    #[test]
    fn parsing_of_other_flags() {
        let a = parse(&[
            "--max-model-len",
            "4k",
            "--scheduling-policy",
            "priority",
            "--tp",
            "1",
        ]);
        assert_eq!(a.max_model_len, Some(4000));
        assert_eq!(a.scheduling_policy, SchedulingPolicy::Priority);
        assert_eq!(parse_human_int("2K"), Ok(2048));
        assert!(parse_human_int("x").is_err());
    }

    #[test]
    fn validate_rejects_bad_values() {
        // (args, flag named in the error)
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["--block-size", "7"], "--block-size"),
            (vec!["--dtype", "int3"], "--dtype"),
            (vec!["--device", "tpu"], "--device"),
            (vec!["--load-format", "pt"], "--load-format"),
            (
                vec!["--max-num-seqs", "300", "--max-num-batched-tokens", "256"],
                "--max-num-batched-tokens",
            ),
            (
                vec!["--num-gpu-blocks-override", "0"],
                "--num-gpu-blocks-override",
            ),
            (vec!["--hf-overrides", "[1]"], "--hf-overrides"),
            (vec!["--hf-overrides", "{"], "--hf-overrides"),
        ];
        for (args, flag) in cases {
            match parse(&args).validate() {
                Err(EngineError::InvalidArgs { arg, .. }) => assert_eq!(arg, flag, "{args:?}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
        let e = parse(&["--max-num-seqs", "300", "--max-num-batched-tokens", "256"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains(
            "max_num_batched_tokens (256) must be greater than or equal to max_num_seqs (300)."
        ));
        assert!(parse(&["--tensor-parallel-size", "2"]).validate().is_ok());
        assert_eq!(
            parse(&["--tp", "2"]).executor_backend(),
            DistributedBackend::Mp
        );
        assert_eq!(parse(&[]).executor_backend(), DistributedBackend::Uni);
        assert_eq!(
            parse(&["--pipeline-parallel-size", "2"]).executor_backend(),
            DistributedBackend::Mp
        );
        for (args, wanted) in [
            (
                vec!["--pp", "2", "--distributed-executor-backend", "uni"],
                "uni runs a world of one rank",
            ),
            (
                vec!["--tp", "2", "--distributed-executor-backend", "uni"],
                "uni runs a world of one rank",
            ),
        ] {
            let e = parse(&args).validate().unwrap_err().to_string();
            assert!(e.contains(wanted), "{args:?}: {e}");
        }
        assert!(parse(&[
            "--hf-overrides",
            r#"{"architectures": ["LlamaForCausalLM"]}"#
        ])
        .validate()
        .is_ok());
    }

    #[test]
    fn pooling_flags() {
        let a = parse(&[
            "--runner",
            "pooling",
            "--convert",
            "embed",
            "--task",
            "embed",
        ]);
        assert_eq!(
            (a.runner, a.convert, a.task),
            (
                RunnerOption::Pooling,
                ConvertOption::Embed,
                TaskOption::Embed
            )
        );
        assert!(parse(&[]).pooler_config_json().unwrap().is_null());
        let v = parse(&["--pooler-config", r#"{"pooling_type": "CLS"}"#])
            .pooler_config_json()
            .unwrap();
        assert_eq!(v["pooling_type"], "CLS");
        // The older name still works.
        let v = parse(&["--override-pooler-config", r#"{"normalize": false}"#])
            .pooler_config_json()
            .unwrap();
        assert_eq!(v["normalize"], false);
        for args in [
            vec!["--pooler-config", "[1]"],
            vec!["--pooler-config", "{"],
            vec!["--pooler-config", "{}", "--override-pooler-config", "{}"],
        ] {
            assert!(parse(&args).pooler_config_json().is_err(), "{args:?}");
        }
    }

    #[test]
    fn max_model_len_checks() {
        assert_eq!(resolve_max_model_len(None, 2048, false).unwrap(), 2048);
        assert_eq!(resolve_max_model_len(Some(512), 2048, false).unwrap(), 512);
        let e = resolve_max_model_len(Some(4096), 2048, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "User-specified max_model_len (4096) is greater than the derived max_model_len"
            ),
            "{e}"
        );
        assert!(e.contains("VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"));
        assert_eq!(resolve_max_model_len(Some(4096), 2048, true).unwrap(), 4096);
    }

    #[test]
    fn kv_block_count() {
        // (override, bytes, bytes per block, block size, max len) -> blocks or error
        assert_eq!(num_kv_blocks(None, 1 << 20, 1024, 16, 256).unwrap(), 1024);
        assert_eq!(num_kv_blocks(Some(20), 0, 1024, 16, 256).unwrap(), 20);
        let e = num_kv_blocks(Some(8), 0, 1024, 16, 256).unwrap_err();
        assert!(
            matches!(
                e,
                EngineError::KvCacheTooSmall {
                    estimated_max_len: 128,
                    ..
                }
            ),
            "{e}"
        );
    }
}
