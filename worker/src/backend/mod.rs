//! The ops model code is written against. A backend owns the representation
//! of activations, weights and the KV cache; models only call these ops, so a
//! CUDA backend fits behind the same trait without touching `models/`.

pub mod cpu;
mod cpu_attention;
mod cpu_encoder;
pub mod cpu_kv;
pub mod disabled_kernels;
pub mod elem;
pub mod half_matmul;
pub mod q8_matmul;
pub mod quant_matmul;

#[cfg(feature = "cuda")]
pub mod cuda;

use crate::attention::{AttentionMetadata, QkvHeads};
use crate::error::{Error, Result};
use crate::kv_cache::KvCacheSpec;
use crate::loader::{HostLinear, HostMatrix};
use crate::pooling::PoolingType;
use crate::rope::RopeTable;

pub use cpu::CpuBackend;

/// Whether the AVX2 builds of the CPU kernels run. Each kernel's AVX2 and
/// portable builds give the same results; the choice is per process, never
/// per batch, so results stay batch-invariant either way.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Floating-point type activations are computed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComputeDtype {
    F32,
    Bf16,
    F16,
}

impl ComputeDtype {
    /// Every `--dtype` spelling `parse` accepts, as vLLM lists them.
    pub const NAMES: &'static [&'static str] =
        &["auto", "half", "float16", "bfloat16", "float", "float32"];

    /// Parses vLLM's `--dtype` ("auto" is resolved by `resolve`).
    pub fn parse(s: &str) -> Result<Option<ComputeDtype>> {
        match s {
            "auto" => Ok(None),
            "float32" | "float" => Ok(Some(Self::F32)),
            "bfloat16" => Ok(Some(Self::Bf16)),
            "float16" | "half" => Ok(Some(Self::F16)),
            other => Err(Error::Unsupported {
                what: "dtype",
                value: other.to_string(),
                supported: Self::NAMES.join(", "),
            }),
        }
    }

    /// `--dtype` with "auto" resolved against the checkpoint's `torch_dtype`,
    /// as vLLM does for 16-bit checkpoints. vLLM would also downcast an f32
    /// checkpoint to 16 bits; here f32 checkpoints and GGUF files (whose
    /// quantized matmuls take f32 activations) stay in f32, the fastest and
    /// most exact CPU path.
    pub fn resolve(arg: &str, config_dtype: Option<&str>) -> Result<ComputeDtype> {
        Self::resolve_for(Device::Cpu, arg, config_dtype)
    }

    /// `resolve` for a device: on the GPU, "auto" runs f32 checkpoints and
    /// GGUF files in bfloat16, as vLLM does (f32 GEMMs waste the tensor cores).
    pub fn resolve_for(
        device: Device,
        arg: &str,
        config_dtype: Option<&str>,
    ) -> Result<ComputeDtype> {
        let d = Self::resolve_cpu(arg, config_dtype)?;
        if device == Device::Cuda && arg == "auto" && d == Self::F32 {
            return Ok(Self::Bf16);
        }
        Ok(d)
    }

    fn resolve_cpu(arg: &str, config_dtype: Option<&str>) -> Result<ComputeDtype> {
        if let Some(d) = Self::parse(arg)? {
            return Ok(d);
        }
        let from_config = config_dtype
            .map(|d| d.strip_prefix("torch.").unwrap_or(d))
            .and_then(|d| match d {
                "bfloat16" => Some(Self::Bf16),
                "float16" => Some(Self::F16),
                _ => None,
            });
        Ok(from_config.unwrap_or(Self::F32))
    }

    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }

    /// vLLM's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
}

/// What one step's attention needs besides the activations: the flat
/// metadata, the token ids and the rows that produce logits. A backend
/// uploads it once per step (`prepare_step`) and every layer reads it there.
#[derive(Clone, Copy, Debug)]
pub struct StepInputs<'a> {
    pub input_ids: &'a [u32],
    pub meta: &'a AttentionMetadata,
    /// Batch rows whose logits the step needs (sampling and prompt logprobs).
    pub logits_rows: &'a [usize],
}

/// The fixed shape a decode step is padded to when it runs as a captured
/// graph (`Backend::capture_graph`): one graph per shape, replayed for
/// every step of that shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GraphShape {
    /// Token rows, one per sequence, padded up to a capture size.
    pub tokens: usize,
    /// Block-table columns per sequence: a power of two at least the
    /// step's longest table. It bounds the context the graph's attention
    /// covers (how many splits a decode row may take).
    pub table_width: usize,
}

/// A backend that captures no graphs (the CPU's): no value exists.
pub enum NoGraphs {}

/// vLLM's `--device`: which backend runs the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The GPU when this build has the CUDA backend and a GPU is visible,
    /// else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            other => Err(Error::Unsupported {
                what: "device",
                value: other.to_string(),
                supported: "auto, cuda, cpu".into(),
            }),
        }
    }
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        }
    }

    /// `Auto` made concrete; `Cuda` checked against this build and machine.
    pub fn resolve(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Self::Cpu),
            Self::Cuda if !cfg!(feature = "cuda") => Err(Self::cuda_not_built()),
            Self::Cuda => match cuda_device_count() {
                Ok(n) if n > 0 => Ok(Self::Cuda),
                Ok(_) => Err(Error::config(
                    "--device cuda: no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)",
                )),
                Err(e) => Err(Error::config(format!(
                    "--device cuda: the CUDA driver is not usable: {e}"
                ))),
            },
            Self::Auto => Ok(match cuda_device_count() {
                Ok(n) if n > 0 => Self::Cuda,
                _ => Self::Cpu,
            }),
        }
    }

    pub(crate) fn cuda_not_built() -> Error {
        Error::config(
            "--device cuda: this build has no CUDA backend; rebuild with `cargo build --release --features cuda`",
        )
    }
}

/// GPUs the CUDA driver reports; an error when the driver cannot be loaded
/// (or this build has no CUDA backend).
pub fn cuda_device_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        cuda::device_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(Device::cuda_not_built())
    }
}

// The sampling types a backend takes and gives belong to the sampler (a
// backend samples as `sampler` specifies); re-exported for backends.
pub use crate::sampler::{DeviceSampled, LogitEdit, RowTop, SampleSpec};

pub trait Backend: Send + Sync + Sized + 'static {
    /// A 2-D activation [rows, cols].
    type Tensor: Send;
    /// A linear layer whose output is its parts' outputs side by side.
    type Linear: Send + Sync;
    type Vector: Send + Sync;
    type Embedding: Send + Sync;
    type KvCache: Send;
    /// Rotary cos/sin tables, where the rotary op reads them.
    type Rope: Send + Sync;
    /// One step's `StepInputs`, where the kernels read them.
    type Step: Send;
    /// Decode steps captured once and replayed (CUDA graphs): `NoGraphs`
    /// where the backend runs every step eagerly.
    type Graphs: Send;

    fn upload_linear(&self, parts: Vec<HostLinear>) -> Result<Self::Linear>;
    fn upload_vector(&self, v: Vec<f32>) -> Result<Self::Vector>;
    /// `vocab_start`: first token id of this rank's rows (vocab-parallel).
    fn upload_embedding(&self, table: &HostMatrix, vocab_start: usize) -> Result<Self::Embedding>;
    fn upload_rope(&self, table: RopeTable) -> Result<Self::Rope>;
    /// Bytes per KV cache element.
    fn kv_dtype_bytes(&self) -> usize;
    fn alloc_kv_cache(&self, spec: KvCacheSpec, num_blocks: usize) -> Result<Self::KvCache>;

    /// Checks and uploads one step's inputs; called once per step, before
    /// any op that reads them.
    fn prepare_step(&self, inputs: StepInputs<'_>, rope: &Self::Rope) -> Result<Self::Step>;

    /// Rows of the table for the step's token ids; ids outside this rank's
    /// vocab range give zeros.
    fn embed(&self, e: &Self::Embedding, step: &Self::Step) -> Result<Self::Tensor>;
    fn linear(&self, x: &Self::Tensor, w: &Self::Linear) -> Result<Self::Tensor>;
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Vector, eps: f32) -> Result<Self::Tensor>;
    /// `residual += x`, then returns rms_norm(residual).
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Vector,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// [rows, 2n] gate|up -> [rows, n] silu(gate) * up.
    fn silu_mul(&self, gate_up: &Self::Tensor) -> Result<Self::Tensor>;
    /// Rotates the q and k heads of fused qkv rows in place, at the step's positions.
    fn rotary(
        &self,
        qkv: &mut Self::Tensor,
        heads: QkvHeads,
        step: &Self::Step,
        rope: &Self::Rope,
    ) -> Result<()>;
    /// Stores the k and v heads of fused qkv rows at the step's slots.
    fn write_kv(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        qkv: &Self::Tensor,
        heads: QkvHeads,
        step: &Self::Step,
    ) -> Result<()>;
    /// Paged attention of the q heads of `qkv`; returns [rows, num_heads * head_dim].
    fn attention(
        &self,
        cache: &Self::KvCache,
        layer: usize,
        qkv: &Self::Tensor,
        heads: QkvHeads,
        step: &Self::Step,
        scale: f32,
    ) -> Result<Self::Tensor>;
    /// The step's logits rows of `x`, in `StepInputs::logits_rows` order.
    fn gather_logits_rows(&self, x: &Self::Tensor, step: &Self::Step) -> Result<Self::Tensor>;
    /// Ranks in this backend's tensor-parallel group (1 without one).
    fn group_size(&self) -> usize;
    /// Sum over this backend's tensor-parallel group (row-parallel outputs);
    /// nothing to do in a group of one.
    fn all_reduce(&self, x: &mut Self::Tensor) -> Result<()>;
    /// Concatenates the group's vocab shards of logits, in rank order.
    fn all_gather_cols(&self, x: Self::Tensor) -> Result<Self::Tensor>;
    /// Row-major host copy in f32.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    /// An activation from row-major host f32 values (rounded to the compute
    /// dtype): how a pipeline stage takes in the previous stage's output.
    fn upload_activation(&self, v: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// (free, total) bytes of the device's memory, after the work queued so
    /// far; `None` where the KV cache is sized otherwise (the CPU backend:
    /// `VLLM_CPU_KVCACHE_SPACE`).
    fn memory_info(&self) -> Result<Option<(usize, usize)>> {
        Ok(None)
    }
    /// For each row of `logits`: its `k` largest values (the sampler's
    /// order: larger first, then lower id) and its log-sum-exp. Greedy
    /// sampling and logprobs need only these, so whole rows stay where they
    /// are (on the GPU: only these cross to the host).
    fn top_logits(&self, logits: &Self::Tensor, k: usize) -> Result<Vec<RowTop>>;
    /// For each (logits row, token id): the token's logit and its 1-based
    /// rank in the row (1 + how many logits are larger), as
    /// `sampler::token_logprobs` counts it. With `top_logits`, prompt
    /// logprobs need nothing else from the row. Backends that sample on
    /// the host bring rows there instead and never get here.
    fn token_ranks(
        &self,
        _logits: &Self::Tensor,
        _pairs: &[(usize, u32)],
    ) -> Result<Vec<(f32, usize)>> {
        Err(Error::config(
            "this backend computes prompt logprobs on the host (Backend::samples_on_device is false)",
        ))
    }
    /// Whether `sample` runs here: then only the chosen ids and requested
    /// logprobs leave the backend, never whole rows of logits.
    fn samples_on_device(&self) -> bool {
        false
    }
    /// Samples each spec's row of `logits` as `sampler::sample` would.
    /// Backends without `samples_on_device` never get here.
    fn sample(&self, _logits: &Self::Tensor, _rows: &[SampleSpec]) -> Result<Vec<DeviceSampled>> {
        Err(Error::config(
            "this backend samples on the host (Backend::samples_on_device is false)",
        ))
    }

    // Graphs of decode steps (vLLM's CUDA graphs): a step whose every
    // sequence schedules one token, padded to a `GraphShape`, replays the
    // graph captured for that shape instead of launching its ops one by one.
    // Backends without graphs answer `None` from `new_graphs`, and the
    // runner never calls the rest.

    /// An empty set of graphs for steps of up to `max_tokens` rows whose
    /// logits rows have `logits_cols` columns, over a KV cache of
    /// `block_size`-token blocks; `None` where this backend has no graphs.
    fn new_graphs(
        &self,
        _max_tokens: usize,
        _logits_cols: usize,
        _block_size: usize,
    ) -> Result<Option<Self::Graphs>> {
        Ok(None)
    }
    /// Whether `graphs` holds the graph of `shape`.
    fn has_graph(&self, _graphs: &Self::Graphs, _shape: GraphShape) -> bool {
        false
    }
    /// `prepare_step` for a graph: writes the step, padded to `shape`, into
    /// the buffers `graphs` keeps for that shape (pad rows write no KV and
    /// give logits rows nobody reads). Every sequence schedules one token
    /// and every row is a logits row, in order.
    fn prepare_graph_step(
        &self,
        _graphs: &mut Self::Graphs,
        _shape: GraphShape,
        _inputs: StepInputs<'_>,
        _rope: &Self::Rope,
    ) -> Result<Self::Step> {
        Err(graphs_unsupported())
    }
    /// Runs `forward` (the model on the step `prepare_graph_step` wrote)
    /// once to warm up, then captures it as the graph of `shape`.
    fn capture_graph(
        &self,
        _graphs: &mut Self::Graphs,
        _shape: GraphShape,
        _forward: &mut dyn FnMut() -> Result<Self::Tensor>,
    ) -> Result<()> {
        Err(graphs_unsupported())
    }
    /// Replays the graph of `shape` on the step last written for it, and
    /// returns its first `rows` logits rows (the step's real ones).
    fn replay_graph(
        &self,
        _graphs: &Self::Graphs,
        _shape: GraphShape,
        _rows: usize,
    ) -> Result<Self::Tensor> {
        Err(graphs_unsupported())
    }

    // Encoder (bidirectional) models: BERT-family embeddings. Each
    // sequence of the packed step attends to all of its own tokens and to
    // nothing else, so sequences need no padding; there is no KV cache.
    // Backends without these ops refuse encoder models with a clear error.

    /// `prepare_step` for an encoder: positions are checked against the
    /// model's position table instead of a rotary table.
    fn prepare_encoder_step(
        &self,
        _inputs: StepInputs<'_>,
        _max_positions: usize,
    ) -> Result<Self::Step> {
        Err(encoder_op_unsupported("prepare_encoder_step"))
    }
    /// `x[i] += table[position of token i]` (learned absolute positions).
    fn add_position_embeddings(
        &self,
        _x: &mut Self::Tensor,
        _table: &Self::Embedding,
        _step: &Self::Step,
    ) -> Result<()> {
        Err(encoder_op_unsupported("add_position_embeddings"))
    }
    /// LayerNorm of `x + residual` (of `x` alone without a residual), with
    /// weight and bias.
    fn layer_norm(
        &self,
        _x: &Self::Tensor,
        _residual: Option<&Self::Tensor>,
        _w: &Self::Vector,
        _b: &Self::Vector,
        _eps: f32,
    ) -> Result<Self::Tensor> {
        Err(encoder_op_unsupported("layer_norm"))
    }
    /// GELU in place, in the exact erf form HF's "gelu" uses.
    fn gelu(&self, _x: &mut Self::Tensor) -> Result<()> {
        Err(encoder_op_unsupported("gelu"))
    }
    /// Bidirectional attention of fused qkv rows within each sequence of
    /// the step; returns [rows, num_heads * head_dim].
    fn encoder_attention(
        &self,
        _qkv: &Self::Tensor,
        _heads: QkvHeads,
        _step: &Self::Step,
        _scale: f32,
    ) -> Result<Self::Tensor> {
        Err(encoder_op_unsupported("encoder_attention"))
    }
    /// One row per sequence of the step: its tokens' rows pooled.
    fn pool(
        &self,
        _x: &Self::Tensor,
        _step: &Self::Step,
        _pooling: PoolingType,
    ) -> Result<Self::Tensor> {
        Err(encoder_op_unsupported("pool"))
    }
}

/// What a backend without graphs answers, were it asked.
fn graphs_unsupported() -> Error {
    Error::NotImplemented {
        feature: "graphs of decode steps on this backend (it runs steps eagerly)".into(),
    }
}

/// What a backend without the encoder ops answers.
fn encoder_op_unsupported(op: &str) -> Error {
    Error::NotImplemented {
        feature: format!(
            "encoder models (op {op}) are not supported on this backend yet; use --device cpu"
        ),
    }
}
