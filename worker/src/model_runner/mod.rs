//! The API the engine core calls: load a model, size and allocate the KV
//! cache, run one scheduler step. Keeps the persistent batch between steps.

mod encoder;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;

use crate::attention::AttentionMetadata;
use crate::backend::{Backend, ComputeDtype, CpuBackend, Device, GraphShape, StepInputs};
use crate::collective::{HostGroup, StageLink};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv_cache::{KvCacheSpec, BLOCK_SIZES};
use crate::loader::{self, LoadFormat};
use crate::models::{self, CausalLm, IntermediateTensors, StageOutput};
use crate::parallel::ParallelConfig;
use crate::pooling::PoolingType;
use crate::sampler::{self, SamplerState};
use crate::sampling_params::SamplingParams;
use crate::step::{ModelRunnerOutput, RequestId, SchedulerOutput, TokenLogprobs};
use encoder::EncoderRunner;
use graphs::GraphPlan;

mod graphs;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub model: PathBuf,
    /// vLLM's --device: which backend runs the model.
    pub device: Device,
    pub load_format: LoadFormat,
    /// vLLM's --dtype: "auto", "float32", "bfloat16", "float16".
    pub dtype: String,
    pub hf_overrides: serde_json::Value,
    pub block_size: usize,
    pub parallel: ParallelConfig,
    pub seed: u64,
    /// 0: the config's max_position_embeddings.
    pub max_model_len: usize,
    /// CPU: run GGUF weights with int8-quantized activations (llama.cpp's
    /// numerics) instead of exactly on their dequantized values.
    pub cpu_int8_activations: bool,
    /// vLLM's `--runner pooling`: an embedding model whose steps return one
    /// pooled vector per request; `None` for generation.
    pub pooling: Option<PoolingType>,
}

/// One request of the persistent batch.
struct CachedRequest {
    /// prompt ++ output.
    tokens: Vec<u32>,
    prompt_len: usize,
    block_table: Vec<u32>,
    num_computed: usize,
    params: SamplingParams,
    sampler: SamplerState,
}

/// Where one scheduled request's rows sit in this step's batch.
struct Scheduled {
    req_idx: usize,
    start: usize,
    end: usize,
    /// First logits row for this request's prompt logprobs, and how many.
    prompt_rows: (usize, usize),
    /// Logits row to sample from.
    sample_row: Option<usize>,
}

/// The engine's handle on one rank's model: the backend is chosen at load
/// (`WorkerConfig::device`), and everything after runs through `StepRunner`.
pub struct ModelRunner {
    inner: Box<dyn StepRunner>,
}

/// What the engine asks of a loaded model, whatever its backend.
pub(crate) trait StepRunner: Send {
    fn model_config(&self) -> &ModelConfig;
    fn dtype(&self) -> ComputeDtype;
    fn device(&self) -> Device;
    fn kv_cache_bytes_per_block(&self) -> usize;
    fn initialize_kv_cache(&mut self, num_blocks: usize) -> Result<()>;
    fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput>;
    fn num_requests(&self) -> usize;
    fn profile_kv_cache_bytes(
        &mut self,
        utilization: f64,
        max_num_batched_tokens: usize,
        max_num_seqs: usize,
    ) -> Result<Option<KvBudget>>;
    /// Captures decode steps of up to `max_num_seqs` sequences as graphs
    /// where the backend has them; returns how many it captured (0: every
    /// step runs eagerly).
    fn capture_graphs(&mut self, _max_num_seqs: usize) -> Result<usize> {
        Ok(0)
    }
}

/// vLLM's profile run settings: how much of a GPU the engine may use, and
/// the largest step it will run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryProfile {
    pub gpu_memory_utilization: f64,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
}

/// How big one KV block is and how many bytes the KV cache may take on this
/// rank: from a GPU profile, or `VLLM_CPU_KVCACHE_SPACE` on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSizing {
    pub device: Device,
    pub bytes_per_block: usize,
    pub available_bytes: usize,
    /// What the GPU profile found, when one ran.
    pub profile: Option<KvBudget>,
}

/// What the memory profile found (bytes): the KV cache may take `available`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvBudget {
    pub total: usize,
    /// Weights, context and other processes' memory, before the profile step.
    pub used_before: usize,
    /// Activation memory of the profiling step at its peak.
    pub peak_activations: usize,
    pub available: usize,
}

impl ModelRunner {
    /// Loads the weights on the device `cfg.device` resolves to; the KV
    /// cache comes later (`initialize_kv_cache`).
    pub fn load(cfg: &WorkerConfig) -> Result<ModelRunner> {
        if let Some(pooling) = cfg.pooling {
            return Self::load_pooling(cfg, pooling);
        }
        let inner: Box<dyn StepRunner> = match cfg.device.resolve()? {
            Device::Cuda => load_cuda(cfg, None, None)?,
            _ => Box::new(Runner::load(cfg, Device::Cpu, None, |dtype| {
                Ok(CpuBackend::new(dtype).with_int8_activations(cfg.cpu_int8_activations))
            })?),
        };
        Ok(ModelRunner { inner })
    }

    /// A pooling (embedding) model: an encoder whose steps return one
    /// pooled vector per request (`ModelRunnerOutput::pooled`) and that
    /// keeps no KV cache. CPU only for now, one rank.
    fn load_pooling(cfg: &WorkerConfig, pooling: PoolingType) -> Result<ModelRunner> {
        let inner: Box<dyn StepRunner> = match cfg.device.resolve()? {
            Device::Cuda => {
                return Err(Error::NotImplemented {
                    feature: "pooling (embedding) models on CUDA; use --device cpu".into(),
                })
            }
            _ => Box::new(EncoderRunner::load(cfg, Device::Cpu, pooling, |dtype| {
                Ok(CpuBackend::new(dtype))
            })?),
        };
        Ok(ModelRunner { inner })
    }

    /// One rank of a distributed model: its tensor-parallel collectives run
    /// over `group` (on CUDA: NCCL, set up through it), its pipeline stage
    /// talks to its neighbours over `link`.
    pub fn load_rank(
        cfg: &WorkerConfig,
        group: Option<Arc<dyn HostGroup>>,
        link: Option<Arc<dyn StageLink>>,
    ) -> Result<ModelRunner> {
        if let Some(pooling) = cfg.pooling {
            // One rank (the encoder refuses a larger world): no group, no link.
            return Self::load_pooling(cfg, pooling);
        }
        let inner: Box<dyn StepRunner> = match (cfg.device.resolve()?, group) {
            (Device::Cuda, group) => load_cuda(cfg, link, group)?,
            (_, group) => Box::new(Runner::load(cfg, Device::Cpu, link, |dtype| {
                let b = match group {
                    Some(g) => CpuBackend::with_group(dtype, g),
                    None => CpuBackend::new(dtype),
                };
                Ok(b.with_int8_activations(cfg.cpu_int8_activations))
            })?),
        };
        Ok(ModelRunner { inner })
    }

    pub fn model_config(&self) -> &ModelConfig {
        self.inner.model_config()
    }

    /// The resolved `--dtype`.
    pub fn dtype(&self) -> ComputeDtype {
        self.inner.dtype()
    }

    /// The device the model runs on (never `Auto`).
    pub fn device(&self) -> Device {
        self.inner.device()
    }

    /// Bytes of one KV block over all layers, K and V.
    pub fn kv_cache_bytes_per_block(&self) -> usize {
        self.inner.kv_cache_bytes_per_block()
    }

    pub fn initialize_kv_cache(&mut self, num_blocks: usize) -> Result<()> {
        self.inner.initialize_kv_cache(num_blocks)
    }

    pub fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        self.inner.execute_model(step)
    }

    /// vLLM's graph capture (what `--enforce-eager` turns off): after
    /// `initialize_kv_cache`, captures decode steps of 1, 2, 4, 8, 16, ...
    /// up to `max_num_seqs` sequences as CUDA graphs, which later decode
    /// steps replay (padded up to the next size). Graphs of longer contexts
    /// than the start covers are captured when first needed. Returns how
    /// many were captured at start: 0 where the backend runs steps eagerly
    /// (the CPU; tensor-parallel or pipeline ranks).
    pub fn capture_graphs(&mut self, max_num_seqs: usize) -> Result<usize> {
        self.inner.capture_graphs(max_num_seqs)
    }

    /// Requests in the persistent batch.
    pub fn num_requests(&self) -> usize {
        self.inner.num_requests()
    }

    /// On a GPU: runs one step of `max_num_batched_tokens` tokens over up to
    /// `max_num_seqs` sequences, as vLLM's profile run does, and returns how
    /// much of `gpu_memory_utilization` × the device's memory is left for the
    /// KV cache after the weights and that step's peak. `None` on the CPU.
    pub fn profile_kv_cache_bytes(&mut self, p: &MemoryProfile) -> Result<Option<KvBudget>> {
        self.inner.profile_kv_cache_bytes(
            p.gpu_memory_utilization,
            p.max_num_batched_tokens,
            p.max_num_seqs,
        )
    }

    /// The KV cache's room on this rank: a GPU profile when `profile` is
    /// given (none is needed with a fixed block count), else on the CPU
    /// `VLLM_CPU_KVCACHE_SPACE`.
    pub fn kv_sizing(&mut self, profile: Option<&MemoryProfile>) -> Result<KvSizing> {
        let budget = match profile {
            Some(p) => self.profile_kv_cache_bytes(p)?,
            None => None,
        };
        let available_bytes = match (&budget, self.device()) {
            (Some(b), _) => b.available,
            (None, Device::Cpu) => runtime::envs::cpu_kvcache_space_bytes()
                .map_err(|e| Error::config(e.to_string()))?,
            // A GPU without a profile: the block count is given (--num-gpu-blocks-override).
            (None, _) => 0,
        };
        Ok(KvSizing {
            device: self.device(),
            bytes_per_block: self.kv_cache_bytes_per_block(),
            available_bytes,
            profile: budget,
        })
    }
}

/// The CUDA runner of this process's GPU (device 0 of what it sees: each
/// rank is given its own through CUDA_VISIBLE_DEVICES); with `group`, its
/// tensor-parallel collectives run on NCCL, set up over that group.
#[cfg(feature = "cuda")]
fn load_cuda(
    cfg: &WorkerConfig,
    link: Option<Arc<dyn StageLink>>,
    group: Option<Arc<dyn HostGroup>>,
) -> Result<Box<dyn StepRunner>> {
    use crate::backend::cuda::CudaBackend;
    Ok(Box::new(Runner::load(
        cfg,
        Device::Cuda,
        link,
        |dtype| match &group {
            Some(g) => CudaBackend::with_group(0, dtype, g.as_ref()),
            None => CudaBackend::new(0, dtype),
        },
    )?))
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(
    _cfg: &WorkerConfig,
    _link: Option<Arc<dyn StageLink>>,
    _group: Option<Arc<dyn HostGroup>>,
) -> Result<Box<dyn StepRunner>> {
    Err(Device::cuda_not_built())
}

/// A model on backend `B` with its KV cache and persistent batch.
struct Runner<B: Backend> {
    cfg: ModelConfig,
    device: Device,
    dtype: ComputeDtype,
    backend: B,
    model: Box<dyn CausalLm<B>>,
    spec: KvCacheSpec,
    kv: Option<B::KvCache>,
    num_blocks: usize,
    max_model_len: usize,
    requests: HashMap<RequestId, CachedRequest>,
    /// Pipeline parallel: the links to the neighbouring stages (`None`
    /// without pipeline parallelism).
    link: Option<Arc<dyn StageLink>>,
    is_first_stage: bool,
    is_last_stage: bool,
    rng: rand::rngs::StdRng,
    /// Captured decode steps (`capture_graphs`); `None`: every step eager.
    graphs: Option<(GraphPlan, B::Graphs)>,
    // Step buffers, reused so a step does not reallocate them.
    meta: AttentionMetadata,
    input_ids: Vec<u32>,
    logits_rows: Vec<usize>,
}

impl<B: Backend> Runner<B> {
    fn load(
        cfg: &WorkerConfig,
        device: Device,
        link: Option<Arc<dyn StageLink>>,
        make_backend: impl FnOnce(ComputeDtype) -> Result<B>,
    ) -> Result<Self> {
        cfg.parallel.validate()?;
        if cfg.parallel.pp_size > 1 && link.is_none() {
            return Err(Error::config(format!(
                "pipeline stage {} of {} needs links to its neighbouring stages",
                cfg.parallel.pp_rank, cfg.parallel.pp_size
            )));
        }
        if !BLOCK_SIZES.contains(&cfg.block_size) {
            return Err(Error::Unsupported {
                what: "block size",
                value: cfg.block_size.to_string(),
                supported: BLOCK_SIZES
                    .iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let format = cfg.load_format.resolve(&cfg.model)?;
        let mcfg = ModelConfig::load(&cfg.model, format, &cfg.hf_overrides)?;
        let dtype = ComputeDtype::resolve_for(device, &cfg.dtype, mcfg.torch_dtype.as_deref())?;
        if cfg.dtype == "auto" {
            tracing::info!(
                "dtype auto: computing in {} (checkpoint torch_dtype: {})",
                dtype.name(),
                mcfg.torch_dtype.as_deref().unwrap_or("none")
            );
        }
        let backend = make_backend(dtype)?;
        if backend.group_size() != cfg.parallel.tp_size {
            return Err(Error::config(format!(
                "tensor parallel size {} needs a collective group of that size; the {} backend has a group of {}",
                cfg.parallel.tp_size,
                device.name(),
                backend.group_size()
            )));
        }
        let max_model_len = if cfg.max_model_len == 0 {
            mcfg.max_position_embeddings
        } else {
            cfg.max_model_len
        };
        let mut src = loader::open(&cfg.model, format, &mcfg, cfg.seed)?;
        let progress = if std::io::stderr().is_terminal() {
            let pb = ProgressBar::new(models::num_weights(&mcfg) as u64);
            if let Ok(style) =
                ProgressStyle::with_template("Loading weights {bar:40} {pos}/{len} [{elapsed}]")
            {
                pb.set_style(style);
            }
            pb
        } else {
            ProgressBar::hidden()
        };
        let started = std::time::Instant::now();
        let model = models::load_model(
            &backend,
            &mcfg,
            src.as_mut(),
            &cfg.parallel,
            max_model_len,
            &progress,
        )?;
        progress.finish_and_clear();
        tracing::info!(
            "Loaded {} ({:?}, {}) from {} in {:.2}s",
            mcfg.architecture,
            format,
            dtype.name(),
            cfg.model.display(),
            started.elapsed().as_secs_f64()
        );
        let spec = model.kv_cache_spec(cfg.block_size, backend.kv_dtype_bytes());
        Ok(Runner {
            cfg: mcfg,
            device,
            dtype,
            backend,
            model,
            spec,
            kv: None,
            num_blocks: 0,
            max_model_len,
            requests: HashMap::new(),
            link,
            is_first_stage: cfg.parallel.is_first_stage(),
            is_last_stage: cfg.parallel.is_last_stage(),
            rng: rand::rngs::StdRng::seed_from_u64(cfg.seed),
            graphs: None,
            meta: AttentionMetadata::default(),
            input_ids: Vec::new(),
            logits_rows: Vec::new(),
        })
    }
}

impl<B: Backend> Runner<B> {
    /// See `ModelRunner::capture_graphs`.
    fn capture_graphs(&mut self, max_num_seqs: usize) -> Result<usize> {
        if self.kv.is_none() {
            return Err(Error::KvCacheNotInitialized);
        }
        self.graphs = None;
        // Pipeline stages hand activations over the host between steps;
        // they run eagerly.
        if self.link.is_some() {
            if self.device == Device::Cuda {
                tracing::info!(
                    "CUDA graphs: pipeline stages run their steps eagerly (activations cross the host between stages)"
                );
            }
            return Ok(0);
        }
        let plan = GraphPlan::new(max_num_seqs, self.spec.block_size, self.max_model_len);
        let Some(graphs) = self.backend.new_graphs(
            plan.max_tokens(),
            self.cfg.vocab_size,
            self.spec.block_size,
        )?
        else {
            if self.device == Device::Cuda {
                tracing::info!(
                    "CUDA graphs: tensor-parallel ranks run their steps eagerly (collectives are not captured)"
                );
            }
            return Ok(0);
        };
        let shapes: Vec<GraphShape> = plan.start_shapes().collect();
        self.graphs = Some((plan, graphs));
        let started = std::time::Instant::now();
        let progress = if std::io::stderr().is_terminal() {
            let pb = ProgressBar::new(shapes.len() as u64);
            if let Ok(style) = ProgressStyle::with_template(
                "Capturing CUDA graphs (decode) {bar:40} {pos}/{len} [{elapsed}]",
            ) {
                pb.set_style(style);
            }
            pb
        } else {
            ProgressBar::hidden()
        };
        // A step of pad rows alone: it writes no KV.
        self.meta.clear();
        self.meta.query_start_loc.push(0);
        self.input_ids.clear();
        self.logits_rows.clear();
        for &shape in &shapes {
            if let Err(e) = self.run_graph(shape, false) {
                self.graphs = None;
                return Err(e);
            }
            progress.inc(1);
        }
        progress.finish_and_clear();
        tracing::info!(
            "Captured {} CUDA graphs of decode steps (batch sizes {} to {}, contexts up to {} tokens) in {:.2} s; --enforce-eager turns them off",
            shapes.len(),
            shapes.last().map_or(0, |s| s.tokens),
            shapes.first().map_or(0, |s| s.tokens),
            shapes.first().map_or(0, |s| s.table_width * self.spec.block_size),
            started.elapsed().as_secs_f64()
        );
        Ok(shapes.len())
    }

    /// The graph shape this step (in the step buffers) runs as: a decode
    /// step whose every sequence schedules one token and samples it.
    fn graph_shape(&self, max_blocks: usize) -> Option<GraphShape> {
        let (plan, _) = self.graphs.as_ref()?;
        let n = self.input_ids.len();
        let one_each = self.meta.num_seqs() == n
            && self.logits_rows.len() == n
            && self.logits_rows.iter().enumerate().all(|(i, &r)| i == r);
        if !one_each || !self.is_last_stage {
            return None;
        }
        plan.shape_for(n, max_blocks)
    }

    /// Runs the step in the step buffers as the graph of `shape`, capturing
    /// the graph first where it is new; with `replay`, returns the step's
    /// logits rows.
    fn run_graph(&mut self, shape: GraphShape, replay: bool) -> Result<Option<B::Tensor>> {
        let Runner {
            backend,
            model,
            kv,
            graphs,
            meta,
            input_ids,
            logits_rows,
            ..
        } = self;
        let (_, graphs) = graphs
            .as_mut()
            .ok_or_else(|| Error::config("a graph step on a runner that captured no graphs"))?;
        let kv = kv.as_mut().ok_or(Error::KvCacheNotInitialized)?;
        let inputs = StepInputs {
            input_ids,
            meta,
            logits_rows,
        };
        let step = backend.prepare_graph_step(graphs, shape, inputs, model.rope())?;
        if !backend.has_graph(graphs, shape) {
            let started = std::time::Instant::now();
            backend.capture_graph(graphs, shape, &mut || match model
                .forward(backend, &step, kv, true, None)?
            {
                StageOutput::Logits(Some(t)) => Ok(t),
                _ => Err(Error::config("a graph's forward gave no logits")),
            })?;
            tracing::debug!(
                "captured the graph of {shape:?} in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        if !replay {
            return Ok(None);
        }
        backend
            .replay_graph(graphs, shape, input_ids.len())
            .map(Some)
    }
}

impl<B: Backend> StepRunner for Runner<B> {
    fn model_config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn dtype(&self) -> ComputeDtype {
        self.dtype
    }

    fn device(&self) -> Device {
        self.device
    }

    fn kv_cache_bytes_per_block(&self) -> usize {
        self.spec.bytes_per_block()
    }

    fn num_requests(&self) -> usize {
        self.requests.len()
    }

    fn initialize_kv_cache(&mut self, num_blocks: usize) -> Result<()> {
        if num_blocks == 0 {
            return Err(Error::config("the KV cache needs at least one block"));
        }
        // Graphs read the old cache's addresses: they go with it.
        self.graphs = None;
        self.kv = None; // free the old cache before allocating the new one
        self.kv = Some(self.backend.alloc_kv_cache(self.spec, num_blocks)?);
        self.num_blocks = num_blocks;
        self.requests.clear();
        Ok(())
    }

    fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        Runner::execute_model(self, step)
    }

    fn capture_graphs(&mut self, max_num_seqs: usize) -> Result<usize> {
        Runner::capture_graphs(self, max_num_seqs)
    }

    fn profile_kv_cache_bytes(
        &mut self,
        utilization: f64,
        max_num_batched_tokens: usize,
        max_num_seqs: usize,
    ) -> Result<Option<KvBudget>> {
        let Some((free, total)) = self.backend.memory_info()? else {
            return Ok(None);
        };
        let used_before = total - free;
        let bs = self.spec.block_size;
        let tokens = max_num_batched_tokens.max(1);
        let seqs = max_num_seqs.clamp(1, tokens);
        // Sequences of (nearly) equal length, each within the model's length.
        let lens: Vec<usize> = (0..seqs)
            .map(|i| (tokens / seqs + usize::from(i < tokens % seqs)).min(self.max_model_len))
            .collect();
        let blocks: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
        let mut kv = self.backend.alloc_kv_cache(self.spec, blocks)?;
        let kv_bytes = blocks * self.spec.bytes_per_block();
        let mut meta = AttentionMetadata {
            max_blocks_per_seq: lens.iter().map(|l| l.div_ceil(bs)).max().unwrap_or(0),
            ..Default::default()
        };
        meta.query_start_loc.push(0);
        let (mut next_block, mut rows) = (0usize, Vec::with_capacity(seqs));
        for &len in &lens {
            let table: Vec<u32> = (next_block..next_block + len.div_ceil(bs))
                .map(|b| b as u32)
                .collect();
            next_block += table.len();
            for pos in 0..len {
                meta.positions.push(pos as u32);
                meta.slot_mapping
                    .push(table[pos / bs] as usize * bs + pos % bs);
            }
            meta.query_start_loc.push(meta.positions.len());
            rows.push(meta.positions.len() - 1);
            meta.seq_lens.push(len);
            let mut t = table;
            t.resize(meta.max_blocks_per_seq, 0);
            meta.block_tables.extend(t);
        }
        let ids = vec![0u32; meta.num_tokens()];
        let inputs = StepInputs {
            input_ids: &ids,
            meta: &meta,
            logits_rows: &rows,
        };
        let step = self.backend.prepare_step(inputs, self.model.rope())?;
        // A later pipeline stage profiles on zeros in place of its input.
        let input = if self.is_first_stage {
            None
        } else {
            let zeros = vec![0f32; ids.len() * self.cfg.hidden_size];
            let t = |b: &B| b.upload_activation(&zeros, ids.len(), self.cfg.hidden_size);
            Some(IntermediateTensors {
                hidden: t(&self.backend)?,
                residual: t(&self.backend)?,
            })
        };
        if let StageOutput::Logits(Some(logits)) =
            self.model
                .forward(&self.backend, &step, &mut kv, true, input)?
        {
            self.backend.top_logits(&logits, 1)?;
        }
        let (free, _) = self.backend.memory_info()?.unwrap_or((free, total));
        drop(step);
        drop(kv);
        let peak = (total - free).saturating_sub(used_before + kv_bytes);
        let budget = (total as f64 * utilization) as usize;
        Ok(Some(KvBudget {
            total,
            used_before,
            peak_activations: peak,
            available: budget.saturating_sub(used_before + peak),
        }))
    }
}

impl<B: Backend> Runner<B> {
    fn check_blocks(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&b| b as usize >= self.num_blocks) {
            Some(&block_id) => Err(Error::BlockOutOfRange {
                block_id,
                num_blocks: self.num_blocks,
            }),
            None => Ok(()),
        }
    }

    fn check_tokens(&self, req_id: &str, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            Some(&token_id) => Err(Error::bad_step(
                req_id,
                Error::TokenOutOfRange {
                    token_id,
                    vocab_size: self.cfg.vocab_size,
                }
                .to_string(),
            )),
            None => Ok(()),
        }
    }

    /// Checks a whole step against the persistent batch as the step would
    /// leave it, before anything changes: a rejected step leaves the batch
    /// as it was. Returns the number of blocks the longest request needs.
    fn validate_step(&self, step: &SchedulerOutput) -> Result<usize> {
        use std::collections::HashSet;
        let finished: HashSet<&str> = step.finished_req_ids.iter().map(String::as_str).collect();
        let live = |id: &str| self.requests.get(id).filter(|_| !finished.contains(id));
        // Per request after this step's changes: (computed, known tokens, blocks).
        let mut after: HashMap<&str, (usize, usize, usize)> = HashMap::new();
        for r in &step.new_requests {
            if live(&r.req_id).is_some() || after.contains_key(r.req_id.as_str()) {
                return Err(Error::DuplicateRequest {
                    req_id: r.req_id.clone(),
                });
            }
            self.check_blocks(&r.block_ids)?;
            self.check_tokens(&r.req_id, &r.prompt_token_ids)?;
            self.check_tokens(&r.req_id, &r.output_token_ids)?;
            if r.prompt_token_ids.is_empty() {
                return Err(Error::bad_step(&r.req_id, "empty prompt"));
            }
            let known = r.prompt_token_ids.len() + r.output_token_ids.len();
            if r.num_computed_tokens > known {
                return Err(Error::ComputedTokensMismatch {
                    req_id: r.req_id.clone(),
                    expected: r.num_computed_tokens,
                    actual: known,
                });
            }
            after.insert(&r.req_id, (r.num_computed_tokens, known, r.block_ids.len()));
        }
        for c in &step.cached_requests {
            self.check_blocks(&c.new_block_ids)?;
            self.check_tokens(&c.req_id, &c.new_token_ids)?;
            let r = live(&c.req_id).ok_or_else(|| Error::UnknownRequest {
                req_id: c.req_id.clone(),
            })?;
            if c.num_computed_tokens != r.num_computed {
                return Err(Error::ComputedTokensMismatch {
                    req_id: c.req_id.clone(),
                    expected: c.num_computed_tokens,
                    actual: r.num_computed,
                });
            }
            let mut known = r.tokens.len();
            if !self.is_last_stage && !c.new_token_ids.is_empty() {
                let before = r.num_computed.max(r.prompt_len);
                if known != before {
                    return Err(Error::bad_step(
                        &c.req_id,
                        format!(
                            "{} new tokens after {before} known, but this stage holds {known}",
                            c.new_token_ids.len(),
                        ),
                    ));
                }
                known += c.new_token_ids.len();
            }
            let blocks = r.block_table.len() + c.new_block_ids.len();
            after.insert(&c.req_id, (r.num_computed, known, blocks));
        }
        if let Some(g) = step
            .grammar_bitmask
            .as_ref()
            .filter(|g| !g.is_well_formed())
        {
            return Err(Error::bad_step(
                g.req_ids.first().map_or("", String::as_str),
                format!(
                    "grammar bitmask of {} words for {} rows of {}",
                    g.words.len(),
                    g.req_ids.len(),
                    g.words_per_row
                ),
            ));
        }
        let bs = self.spec.block_size;
        let mut max_blocks = 0;
        for (id, n) in &step.num_scheduled_tokens {
            let (computed, known, blocks) = match after.get(id.as_str()) {
                Some(&a) => a,
                None => live(id)
                    .map(|r| (r.num_computed, r.tokens.len(), r.block_table.len()))
                    .ok_or_else(|| Error::UnknownRequest { req_id: id.clone() })?,
            };
            let end = computed + n;
            if *n == 0 || end > known {
                return Err(Error::bad_step(
                    id,
                    format!("{n} tokens scheduled after {computed} computed, but only {known} are known"),
                ));
            }
            if end > self.max_model_len {
                return Err(Error::PositionOutOfRange {
                    position: end - 1,
                    max_len: self.max_model_len,
                });
            }
            if blocks * bs < end {
                return Err(Error::bad_step(
                    id,
                    format!("{blocks} blocks of {bs} cannot hold {end} tokens"),
                ));
            }
            max_blocks = max_blocks.max(end.div_ceil(bs));
        }
        Ok(max_blocks)
    }

    /// Applies a validated step's request changes to the persistent batch.
    fn update_batch(&mut self, step: &SchedulerOutput) {
        for id in &step.finished_req_ids {
            self.requests.remove(id);
        }
        for r in &step.new_requests {
            let mut tokens = r.prompt_token_ids.clone();
            tokens.extend_from_slice(&r.output_token_ids);
            self.requests.insert(
                r.req_id.clone(),
                CachedRequest {
                    sampler: SamplerState::new(
                        &r.sampling_params,
                        &r.prompt_token_ids,
                        &r.output_token_ids,
                    ),
                    tokens,
                    prompt_len: r.prompt_token_ids.len(),
                    block_table: r.block_ids.clone(),
                    num_computed: r.num_computed_tokens,
                    params: r.sampling_params.clone(),
                },
            );
        }
        for c in &step.cached_requests {
            if let Some(r) = self.requests.get_mut(&c.req_id) {
                if !self.is_last_stage {
                    // This stage never samples: it learns the last stage's tokens here.
                    r.tokens.extend_from_slice(&c.new_token_ids);
                }
                r.block_table.extend_from_slice(&c.new_block_ids);
            }
        }
    }

    fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        if self.kv.is_none() {
            return Err(Error::KvCacheNotInitialized);
        }
        let max_blocks = self.validate_step(step)?;
        self.update_batch(step);
        let bs = self.spec.block_size;
        let order: Vec<(&RequestId, &CachedRequest)> = step
            .num_scheduled_tokens
            .iter()
            .map(|(id, _)| (id, &self.requests[id]))
            .collect();

        // Flat inputs.
        let meta = &mut self.meta;
        meta.clear();
        self.input_ids.clear();
        self.logits_rows.clear();
        meta.max_blocks_per_seq = max_blocks;
        meta.query_start_loc.push(0);
        let mut sched = Vec::with_capacity(order.len());
        for (i, ((_, r), (_, n))) in order.iter().zip(&step.num_scheduled_tokens).enumerate() {
            let (start, end) = (r.num_computed, r.num_computed + n);
            let row0 = self.input_ids.len();
            self.input_ids.extend_from_slice(&r.tokens[start..end]);
            for pos in start..end {
                meta.positions.push(pos as u32);
                meta.slot_mapping
                    .push(r.block_table[pos / bs] as usize * bs + pos % bs);
            }
            meta.query_start_loc.push(self.input_ids.len());
            meta.seq_lens.push(end);
            let nb = end.div_ceil(bs);
            meta.block_tables.extend_from_slice(&r.block_table[..nb]);
            meta.block_tables.resize((i + 1) * max_blocks, 0);
            // Prompt logprobs: positions p in [start, end) predicting prompt token p + 1.
            let mut prompt_rows = (self.logits_rows.len(), 0);
            if r.params.prompt_logprobs.is_some() {
                let last = end.min(r.prompt_len.saturating_sub(1));
                for p in start..last {
                    self.logits_rows.push(row0 + p - start);
                }
                prompt_rows.1 = last.saturating_sub(start);
            }
            let sample_row = (end == r.tokens.len()).then(|| {
                self.logits_rows.push(row0 + n - 1);
                self.logits_rows.len() - 1
            });
            sched.push(Scheduled {
                req_idx: i,
                start,
                end,
                prompt_rows,
                sample_row,
            });
        }

        // Structured-output rows: the engine core sent each one's token
        // bitmask (its shape was checked in `validate_step`).
        let masks: HashMap<&str, &[u32]> =
            step.grammar_bitmask.iter().flat_map(|g| g.rows()).collect();
        // Rows whose requests take the raw argmax need only the top of their
        // logits (the GPU keeps whole rows on the device); any other row
        // (processed sampling, prompt logprobs) brings the logits to the host.
        // A backend that samples on the device takes the other sampled rows
        // there too, as `SampleSpec`s (the uniforms drawn here, in row order,
        // as the host sampler would draw them). Rows with a grammar bitmask
        // go there with it, unless they ask for top logprobs (then, as on the
        // CPU backend, their logits come to the host whole).
        let on_device = self.backend.samples_on_device() && self.is_last_stage;
        let vocab = self.cfg.vocab_size;
        let mut top_k = 0;
        let mut whole_rows = false;
        let mut specs = Vec::new();
        // Index into `specs` of each logits row sampled on the device.
        let mut spec_of_row = vec![None; self.logits_rows.len()];
        // Prompt logprobs where the logits are: each row's top and log-sum-exp
        // (`top_logits`) and the prompt token's logit and rank (`token_ranks`).
        let mut prompt_pairs: Vec<(usize, u32)> = Vec::new();
        for (s, (id, r)) in sched.iter().zip(&order) {
            if s.prompt_rows.1 > 0 {
                if on_device {
                    top_k = top_k.max(r.params.prompt_logprobs.unwrap_or(0).max(1));
                    prompt_pairs.extend(
                        (0..s.prompt_rows.1)
                            .map(|j| (s.prompt_rows.0 + j, r.tokens[s.start + j + 1])),
                    );
                } else {
                    whole_rows = true;
                }
            }
            if let Some(row) = s.sample_row {
                let mask = masks.get(id.as_str()).copied();
                if mask.is_some() && !(on_device && r.params.logprobs.unwrap_or(0) == 0) {
                    // Top logprobs of masked logits: only the host has them.
                    whole_rows = true;
                } else if mask.is_none() && sampler::takes_raw_argmax(&r.params, &r.sampler) {
                    top_k = top_k.max(r.params.logprobs.unwrap_or(0).max(1));
                } else if on_device {
                    top_k = top_k.max(r.params.logprobs.unwrap_or(0));
                    let u = if r.params.is_greedy() {
                        0.0
                    } else {
                        sampler::draw_uniform(&r.params, &r.sampler, &mut self.rng)
                    };
                    spec_of_row[row] = Some(specs.len());
                    let mut spec = sampler::sample_spec(&r.params, &r.sampler, vocab, row, u);
                    spec.bitmask = mask.map(<[u32]>::to_vec);
                    specs.push(spec);
                } else {
                    whole_rows = true;
                }
            }
        }
        if whole_rows {
            // The host samples every row after all; its draws come later.
            specs.clear();
            spec_of_row.iter_mut().for_each(|s| *s = None);
        }
        // The prompt tokens' (logit, rank), by logits row (`prompt_pairs`).
        // Empty unless the step has prompt logprobs on the device.
        let mut prompt_ranks: Vec<Option<(f32, usize)>> = Vec::new();
        let (logits, tops, device) = if step.is_empty() {
            (Vec::new(), Vec::new(), Vec::new())
        } else {
            let graph_shape = if whole_rows {
                None
            } else {
                self.graph_shape(max_blocks)
            };
            let graph_logits = match graph_shape {
                Some(shape) => self.run_graph(shape, true)?,
                None => None,
            };
            let inputs = StepInputs {
                input_ids: &self.input_ids,
                meta: &self.meta,
                logits_rows: &self.logits_rows,
            };
            let kv = self.kv.as_mut().expect("checked above");
            let wants_logits = !self.logits_rows.is_empty();
            let (rows, hidden) = (self.input_ids.len(), self.cfg.hidden_size);
            let input = match &self.link {
                Some(link) if !self.is_first_stage => {
                    let (h, r) = link.recv(rows, hidden)?;
                    Some(IntermediateTensors {
                        hidden: self.backend.upload_activation(&h, rows, hidden)?,
                        residual: self.backend.upload_activation(&r, rows, hidden)?,
                    })
                }
                _ => None,
            };
            let output = match graph_logits {
                Some(t) => StageOutput::Logits(Some(t)),
                None => {
                    let prepared = self.backend.prepare_step(inputs, self.model.rope())?;
                    self.model
                        .forward(&self.backend, &prepared, kv, wants_logits, input)?
                }
            };
            match output {
                StageOutput::Logits(Some(t)) if whole_rows => {
                    (self.backend.to_host(&t)?, Vec::new(), Vec::new())
                }
                StageOutput::Logits(Some(t)) => {
                    let tops = if top_k > 0 {
                        self.backend.top_logits(&t, top_k)?
                    } else {
                        Vec::new()
                    };
                    if !prompt_pairs.is_empty() {
                        let ranks = self.backend.token_ranks(&t, &prompt_pairs)?;
                        prompt_ranks.resize(self.logits_rows.len(), None);
                        for (&(row, _), rank) in prompt_pairs.iter().zip(ranks) {
                            prompt_ranks[row] = Some(rank);
                        }
                    }
                    let device = if specs.is_empty() {
                        Vec::new()
                    } else {
                        self.backend.sample(&t, &specs)?
                    };
                    (Vec::new(), tops, device)
                }
                StageOutput::Logits(None) => (Vec::new(), Vec::new(), Vec::new()),
                StageOutput::Intermediate(t) => {
                    let link = self.link.as_ref().ok_or_else(|| {
                        Error::config("a pipeline stage before the last has no link to the next")
                    })?;
                    let (h, r) = (
                        self.backend.to_host(&t.hidden)?,
                        self.backend.to_host(&t.residual)?,
                    );
                    link.send(&h, &r, rows, hidden)?;
                    (Vec::new(), Vec::new(), Vec::new())
                }
            }
        };

        let mut out = ModelRunnerOutput::default();
        let mut logits = logits;
        for s in &sched {
            let id = &step.num_scheduled_tokens[s.req_idx].0;
            let r = self.requests.get_mut(id).expect("looked up above");
            let mut prompt_lps: Vec<TokenLogprobs> = Vec::new();
            if let Some(k) = r.params.prompt_logprobs.filter(|_| self.is_last_stage) {
                for j in 0..s.prompt_rows.1 {
                    let (row, token) = (s.prompt_rows.0 + j, r.tokens[s.start + j + 1]);
                    prompt_lps.push(if whole_rows {
                        sampler::token_logprobs(&logits[row * vocab..(row + 1) * vocab], token, k)
                    } else {
                        match (tops.get(row), prompt_ranks.get(row).copied().flatten()) {
                            (Some(top), Some((logit, rank))) => {
                                sampler::token_logprobs_from_top(top, token, logit, rank, k)
                            }
                            _ => {
                                return Err(Error::config(format!(
                                    "prompt logprobs of logits row {row} were not computed"
                                )))
                            }
                        }
                    });
                }
            }
            let (mut token, mut lps) = (None, None);
            // Stages before the last only ran their layers: the last samples.
            if let Some(row) = s.sample_row.filter(|_| self.is_last_stage) {
                let sampled = if whole_rows {
                    sampler::sample_masked(
                        &mut logits[row * vocab..(row + 1) * vocab],
                        &r.params,
                        &r.sampler,
                        masks.get(id.as_str()).copied(),
                        &mut self.rng,
                    )
                } else if let Some(i) = spec_of_row[row] {
                    sampler::sampled_from_device(&device[i], tops.get(row), &r.params)
                } else {
                    sampler::sample_from_top(&tops[row], &r.params)
                };
                r.tokens.push(sampled.token);
                r.sampler.push_output(sampled.token);
                token = Some(sampled.token);
                lps = sampled.logprobs;
            }
            r.num_computed = s.end;
            out.req_ids.push(id.clone());
            out.sampled_token_ids.push(token);
            out.logprobs.push(lps);
            out.prompt_logprobs.push(prompt_lps);
        }
        Ok(out)
    }
}
