//! The ops model code is written against. A backend owns the representation
//! of activations, weights and the KV cache; models only call these ops, so a
//! CUDA backend fits behind the same trait without touching `models/`.

pub mod cpu;
pub mod elem;
pub mod half_matmul;
pub mod q8_matmul;

use crate::attention::{AttentionMetadata, QkvHeads};
use crate::error::{Error, Result};
use crate::kv_cache::KvCacheSpec;
use crate::loader::{HostLinear, HostMatrix};
use crate::parallel::ParallelConfig;
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
                supported: "auto, float32, bfloat16, float16".into(),
            }),
        }
    }

    /// `--dtype` with "auto" resolved against the checkpoint's `torch_dtype`,
    /// as vLLM does for 16-bit checkpoints. vLLM would also downcast an f32
    /// checkpoint to 16 bits; here f32 checkpoints and GGUF files (whose
    /// quantized matmuls take f32 activations) stay in f32, the fastest and
    /// most exact CPU path.
    pub fn resolve(arg: &str, config_dtype: Option<&str>) -> Result<ComputeDtype> {
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

pub trait Backend: Send + Sync + Sized + 'static {
    /// A 2-D activation [rows, cols].
    type Tensor: Send;
    /// A linear layer whose output is its parts' outputs side by side.
    type Linear: Send + Sync;
    type Vector: Send + Sync;
    type Embedding: Send + Sync;
    type KvCache: Send;

    fn upload_linear(&self, parts: Vec<HostLinear>) -> Result<Self::Linear>;
    fn upload_vector(&self, v: Vec<f32>) -> Result<Self::Vector>;
    /// `vocab_start`: first token id of this rank's rows (vocab-parallel).
    fn upload_embedding(&self, table: &HostMatrix, vocab_start: usize) -> Result<Self::Embedding>;
    /// Bytes per KV cache element.
    fn kv_dtype_bytes(&self) -> usize;
    fn alloc_kv_cache(&self, spec: KvCacheSpec, num_blocks: usize) -> Result<Self::KvCache>;

    /// Rows of the table; ids outside this rank's vocab range give zeros.
    fn embed(&self, e: &Self::Embedding, ids: &[u32]) -> Result<Self::Tensor>;
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
    /// Rotates the q and k heads of fused qkv rows in place.
    fn rotary(
        &self,
        qkv: &mut Self::Tensor,
        heads: QkvHeads,
        positions: &[u32],
        rope: &RopeTable,
    ) -> Result<()>;
    /// Stores the k and v heads of fused qkv rows at `meta.slot_mapping`.
    fn write_kv(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        qkv: &Self::Tensor,
        heads: QkvHeads,
        meta: &AttentionMetadata,
    ) -> Result<()>;
    /// Paged attention of the q heads of `qkv`; returns [rows, num_heads * head_dim].
    fn attention(
        &self,
        cache: &Self::KvCache,
        layer: usize,
        qkv: &Self::Tensor,
        heads: QkvHeads,
        meta: &AttentionMetadata,
        scale: f32,
    ) -> Result<Self::Tensor>;
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// Sum over the tensor-parallel group (row-parallel outputs).
    fn all_reduce(&self, x: &mut Self::Tensor, parallel: &ParallelConfig) -> Result<()>;
    /// Concatenates vocab shards of logits over the tensor-parallel group.
    fn all_gather_cols(&self, x: Self::Tensor, parallel: &ParallelConfig) -> Result<Self::Tensor>;
    /// Row-major host copy.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
}
