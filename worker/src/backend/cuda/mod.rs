//! CUDA backend: weights, activations and the paged KV cache in device
//! memory in the compute dtype (bf16, f16, or f32 for tests), GEMMs through
//! cuBLAS (f32 accumulation), and our kernels (`kernels.cu`) for the rest,
//! compiled by NVRTC for the device and cached on disk.
//!
//! Everything runs in order on one stream, so a buffer freed after its last
//! use (stream-ordered free) is never reused early, and cudarc's per-buffer
//! event tracking is switched off. Host synchronization happens only where
//! the host reads results (`to_host`).

mod nvrtc;

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::result as driver;
use cudarc::driver::sys::CUfunction_attribute_enum as FnAttr;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use half::{bf16, f16};
use rayon::prelude::*;

use super::disabled_kernels::{self as disabled_kernels, DisabledKernels};
use super::{Backend, ComputeDtype, DeviceSampled, GraphShape, RowTop, SampleSpec, StepInputs};
use crate::attention::QkvHeads;
use crate::backend::cpu::check_positions;
use crate::error::{Error, Result};
use crate::kv_cache::KvCacheSpec;
use crate::loader::{DummyMatrix, HostLinear, HostMatrix};
use crate::rope::RopeTable;

const KERNELS: &str = include_str!("kernels.cu");

/// Our kernels for one compute dtype: the sources with that dtype's
/// instantiation (the `_{suffix}` entry points) appended.
fn kernel_source(dtype: ComputeDtype) -> String {
    let ty = match dtype {
        ComputeDtype::Bf16 => "bf16",
        ComputeDtype::F16 => "f16",
        ComputeDtype::F32 => "float",
    };
    format!("{KERNELS}\nINSTANTIATE({}, {ty})\n", kernel_suffix(dtype))
}

/// The suffix of one dtype's entry points in kernels.cu.
fn kernel_suffix(dtype: ComputeDtype) -> &'static str {
    match dtype {
        ComputeDtype::Bf16 => "bf16",
        ComputeDtype::F16 => "f16",
        ComputeDtype::F32 => "f32",
    }
}

/// Compiles our kernels for `sm_{cc.0}{cc.1}` with NVRTC alone (no GPU, no
/// kernel cache), for every compute dtype, and returns the cubins' total
/// size: CI checks the kernel sources this way on machines without a GPU.
pub fn compile_kernels(cc: (i32, i32)) -> Result<usize> {
    let mut total = 0;
    for dtype in [ComputeDtype::Bf16, ComputeDtype::F16, ComputeDtype::F32] {
        let name = format!("flotilla-check-{}", kernel_suffix(dtype));
        total += nvrtc::cubin(&name, &kernel_source(dtype), cc, None)?.len();
    }
    Ok(total)
}

/// Keys per block when a decode token's context is split (`split_keys` in
/// kernels.cu): the tiled kernel's blocks hold one warp per query head, the
/// lane-per-key kernel's four warps each take a chunk of 32 keys at a time,
/// so it wants longer splits to amortize its start and final combine.
const ATTN_SPLIT_TILED: usize = 128;
const ATTN_SPLIT_LANES: usize = 256;
/// Warps per block of the lane-per-key attention kernel (`ATTN_WARPS`).
const ATTN_WARPS: usize = 4;
/// Query heads per kv head the lane-per-key kernel takes (`ATTN_GMAX`).
const ATTN_GMAX: usize = 8;
/// Most rows the streaming GEMV kernel takes (`GEMV_ROWS`), and outputs per
/// warp (`GEMV_OUTS`).
const GEMV_ROWS: usize = 8;
const GEMV_OUTS: usize = 2;
/// cuBLAS's workspace: what it recommends for Hopper.
const BLAS_WORKSPACE: usize = 32 << 20;

/// Kernel parameters: a pointer to each value, in declaration order.
macro_rules! kargs {
    ($($v:expr),* $(,)?) => {
        [$(&$v as *const _ as *mut c_void),*]
    };
}

/// GPUs the driver reports (0 without a driver or with none visible).
pub fn device_count() -> Result<usize> {
    // SAFETY: only probes whether the driver library can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Cuda {
            op: "load libcuda".into(),
            msg: "the NVIDIA driver library (libcuda.so) was not found".into(),
        });
    }
    let n = CudaContext::device_count().map_err(|e| Error::cuda("cuDeviceGetCount", e))?;
    Ok(n.max(0) as usize)
}

/// Activations come from the device's stream-ordered pool. By default the
/// pool hands freed memory back to the driver at every synchronization, so
/// each step would map its activations anew; keeping it makes steps reuse
/// it, and makes the memory profile see the peak (`gpu_memory_utilization`).
fn keep_pool_memory(ctx: &CudaContext) -> Result<MemPool> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: out-parameter for the current device's default pool.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(|e| Error::cuda("cuDeviceGetDefaultMemPool", e))?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the attribute takes a u64 by pointer.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut c_void,
        )
    }
    .result()
    .map_err(|e| Error::cuda("cuMemPoolSetAttribute", e))?;
    Ok(MemPool(pool))
}

/// The device's default stream-ordered memory pool.
struct MemPool(cudarc::driver::sys::CUmemoryPool);
// SAFETY: a pool handle is a process-wide driver object, usable from any thread.
unsafe impl Send for MemPool {}
unsafe impl Sync for MemPool {}

impl MemPool {
    /// Hands the pool's unused memory back to the driver.
    fn trim(&self) -> Result<()> {
        // SAFETY: a live pool handle.
        unsafe { cudarc::driver::sys::cuMemPoolTrimTo(self.0, 0) }
            .result()
            .map_err(|e| Error::cuda("cuMemPoolTrimTo", e))
    }
}

/// Raw device address of a buffer. Safe to pass to kernels on our one
/// stream: event tracking is off and frees are stream-ordered.
fn addr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// Our kernels for one storage type.
struct Kernels {
    embed: CudaFunction,
    add_rms_norm: CudaFunction,
    silu_mul: CudaFunction,
    add_bias: CudaFunction,
    rotary: CudaFunction,
    write_kv: CudaFunction,
    gather_rows: CudaFunction,
    to_float: CudaFunction,
    paged_attention: CudaFunction,
    /// Lane-per-key attention for head sizes 64, 128 and 256.
    attention_lanes: [CudaFunction; 3],
    attention_reduce: CudaFunction,
    gemv_rows: CudaFunction,
    top_logits: CudaFunction,
    token_ranks: CudaFunction,
    sample_rows: CudaFunction,
    pad_cols: CudaFunction,
    concat_shards: CudaFunction,
    dummy_fill: CudaFunction,
    /// Dynamic shared memory a block may take (the device's opt-in limit).
    max_smem: usize,
}

impl Kernels {
    fn load(module: &Arc<CudaModule>, suffix: &str, max_smem: usize) -> Result<Self> {
        let f = |name: &str| {
            module
                .load_function(&format!("{name}_{suffix}"))
                .map_err(|e| Error::cuda("cuModuleGetFunction", e))
        };
        let k = Kernels {
            embed: f("embed")?,
            add_rms_norm: f("add_rms_norm")?,
            silu_mul: f("silu_mul")?,
            add_bias: f("add_bias")?,
            rotary: f("rotary")?,
            write_kv: f("write_kv")?,
            gather_rows: f("gather_rows")?,
            to_float: f("to_float")?,
            paged_attention: f("paged_attention")?,
            attention_lanes: [
                f("paged_attention_d64")?,
                f("paged_attention_d128")?,
                f("paged_attention_d256")?,
            ],
            attention_reduce: f("attention_reduce")?,
            gemv_rows: f("gemv_rows")?,
            top_logits: f("top_logits")?,
            token_ranks: f("token_ranks")?,
            sample_rows: f("sample_rows")?,
            pad_cols: f("pad_cols")?,
            concat_shards: f("concat_shards")?,
            dummy_fill: f("dummy_fill")?,
            max_smem,
        };
        // The opt-in limit covers static and dynamic shared memory together.
        let static_smem = k
            .paged_attention
            .shared_size_bytes()
            .map_err(|e| Error::cuda("cuFuncGetAttribute", e))? as usize;
        let dynamic = max_smem.saturating_sub(static_smem);
        k.paged_attention
            .set_attribute(
                FnAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic as i32,
            )
            .map_err(|e| Error::cuda("cuFuncSetAttribute", e))?;
        for f in &k.attention_lanes {
            let fixed =
                f.shared_size_bytes()
                    .map_err(|e| Error::cuda("cuFuncGetAttribute", e))? as usize;
            f.set_attribute(
                FnAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                max_smem.saturating_sub(fixed) as i32,
            )
            .map_err(|e| Error::cuda("cuFuncSetAttribute", e))?;
        }
        Ok(Kernels {
            max_smem: dynamic,
            ..k
        })
    }
}

struct Gpu {
    ctx: Arc<CudaContext>,
    pool: MemPool,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// cuBLAS's scratch space (`cublasSetWorkspace`); after `blas`, so it
    /// outlives the handle.
    _blas_workspace: CudaSlice<u8>,
    kernels: Kernels,
    busy: std::sync::Mutex<BusyMeter>,
}

/// How much of the serving time the GPU works on steps, from a step's first
/// upload to its last result on the host; the rest is the time the engine
/// spends between steps (scheduling, detokenization, HTTP), when the GPU
/// waits. Logged every `BusyMeter::PERIOD` of back-to-back steps.
struct BusyMeter {
    start: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
    /// `start` holds an unaccounted step; `end` has been recorded for it.
    open: bool,
    ended: bool,
    window: Option<std::time::Instant>,
    last_start: std::time::Instant,
    busy_ms: f64,
    steps: u64,
}

impl BusyMeter {
    const PERIOD: std::time::Duration = std::time::Duration::from_secs(10);
    /// A longer pause between steps is the engine idle, not between steps.
    const IDLE: std::time::Duration = std::time::Duration::from_secs(1);

    fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ev = || {
            ctx.new_event(timed)
                .map_err(|e| Error::cuda("cuEventCreate", e))
        };
        Ok(Self {
            start: ev()?,
            end: ev()?,
            open: false,
            ended: false,
            window: None,
            last_start: std::time::Instant::now(),
            busy_ms: 0.0,
            steps: 0,
        })
    }

    /// At a step's first device work: accounts the previous step (whose
    /// results the host has read) and starts timing this one.
    fn step_starts(&mut self, stream: &CudaStream) -> Result<()> {
        let now = std::time::Instant::now();
        if self.open && self.ended {
            let ms = self
                .start
                .elapsed_ms(&self.end)
                .map_err(|e| Error::cuda("cuEventElapsedTime", e))?;
            self.busy_ms += ms as f64;
            self.steps += 1;
        }
        if now.duration_since(self.last_start) > Self::IDLE {
            self.window = None;
        }
        match self.window {
            None => {
                self.window = Some(now);
                self.busy_ms = 0.0;
                self.steps = 0;
            }
            Some(w) if now.duration_since(w) >= Self::PERIOD && self.steps > 0 => {
                let wall_ms = now.duration_since(w).as_secs_f64() * 1e3;
                tracing::info!(
                    "GPU busy {:.1}% of {:.1} s of back-to-back steps ({} steps, {:.2} ms on the GPU and {:.2} ms between steps on average)",
                    100.0 * self.busy_ms / wall_ms,
                    wall_ms / 1e3,
                    self.steps,
                    self.busy_ms / self.steps as f64,
                    (wall_ms - self.busy_ms) / self.steps as f64,
                );
                self.window = Some(now);
                self.busy_ms = 0.0;
                self.steps = 0;
            }
            Some(_) => {}
        }
        self.last_start = now;
        self.start
            .record(stream)
            .map_err(|e| Error::cuda("cuEventRecord", e))?;
        self.open = true;
        self.ended = false;
        Ok(())
    }

    /// Before the host waits for a step's results: the step's work so far.
    fn results_read(&mut self, stream: &CudaStream) -> Result<()> {
        if self.open {
            self.end
                .record(stream)
                .map_err(|e| Error::cuda("cuEventRecord", e))?;
            self.ended = true;
        }
        Ok(())
    }
}

/// The CUDA backend of one device.
#[derive(Clone)]
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    dtype: ComputeDtype,
    /// This rank's tensor-parallel group; `None`: a group of one.
    group: Option<Arc<NcclGroup>>,
    kernels: KernelChoice,
}

/// The kernels that have alternatives, so tests and benchmarks can hold
/// them side by side (`FLOTILLA_CUDA_ATTENTION`,
/// `FLOTILLA_CUDA_SMALL_BATCH_LINEAR` pick them at start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelChoice {
    pub attention: AttentionKernel,
    pub small_batch_linear: LinearKernel,
    /// Sample on the device (`sample_rows`); false: logits go to the host sampler.
    pub device_sampling: bool,
}

impl Default for KernelChoice {
    fn default() -> Self {
        Self {
            attention: AttentionKernel::default(),
            small_batch_linear: LinearKernel::default(),
            device_sampling: true,
        }
    }
}

/// Paged attention: `Tiled` stages each tile of keys through shared memory
/// (any head size); `Lanes` gives each key a lane and streams K/V straight
/// from the cache (head sizes 64, 128, 256 with at most 8 query heads per
/// kv head; other shapes take `Tiled`). `Lanes` is the default: on the H200
/// at Llama-3.1-8B's shapes it runs a 256-row decode layer in 0.63x the
/// tiled kernel's time (1.9x the KV bandwidth) and a prefill chunk in 0.59x,
/// and it is as batch-invariant (BENCHMARKS.md, "CUDA attention kernels").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    Tiled,
    #[default]
    Lanes,
}

/// Linear layers of batches up to 8 rows: cuBLAS, or our weight-streaming
/// GEMV (`gemv_rows`). cuBLAS stays the default: the GEMV only matches it at
/// one row and falls to half its speed at eight, and a batch then rounds
/// differently from the same request alone (not batch-invariant).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LinearKernel {
    #[default]
    Blas,
    Gemv,
}

impl KernelChoice {
    /// The choice the environment makes (the defaults when unset).
    pub fn from_env() -> Result<Self> {
        use runtime::envs::{
            raw, set_value, FLOTILLA_CUDA_ATTENTION, FLOTILLA_CUDA_SMALL_BATCH_LINEAR,
        };
        let forced =
            runtime::envs::attention_backend().map_err(|e| Error::config(e.to_string()))?;
        Self::choose(
            set_value(FLOTILLA_CUDA_ATTENTION).as_deref(),
            forced,
            raw(FLOTILLA_CUDA_SMALL_BATCH_LINEAR).as_deref(),
            &DisabledKernels::from_env(),
        )
    }

    /// `from_env` for given values of `FLOTILLA_CUDA_ATTENTION` (when set),
    /// `VLLM_ATTENTION_BACKEND` (by our kernels' names),
    /// `FLOTILLA_CUDA_SMALL_BATCH_LINEAR` and `VLLM_DISABLED_KERNELS`. The
    /// defaults are the fallbacks, so disabling a kernel only matters, and
    /// contradicts, when it is also selected.
    pub fn choose(
        attention: Option<&str>,
        attention_backend: Option<&str>,
        small_batch_linear: Option<&str>,
        disabled: &DisabledKernels,
    ) -> Result<Self> {
        use runtime::envs::{FLOTILLA_CUDA_ATTENTION, FLOTILLA_CUDA_SMALL_BATCH_LINEAR};
        let bad = |name: &str, v: &str, expected: &str| {
            Error::config(format!("{name}={v:?}: expected {expected}"))
        };
        let contradicts = |name: &str, v: &str, kernel: &str| {
            Error::config(format!(
                "{name}={v} selects {kernel}, which VLLM_DISABLED_KERNELS disables; drop one of the two"
            ))
        };
        let lanes_disabled = disabled.contains(disabled_kernels::PAGED_ATTENTION_LANES);
        let attention = match attention {
            // vLLM's variable, by our kernels' names, when Flotilla's is not set.
            None if attention_backend == Some("LANES") && lanes_disabled => {
                return Err(contradicts(
                    "VLLM_ATTENTION_BACKEND",
                    "LANES",
                    disabled_kernels::PAGED_ATTENTION_LANES,
                ))
            }
            None if attention_backend == Some("TILED") => AttentionKernel::Tiled,
            None if attention_backend == Some("LANES") => AttentionKernel::Lanes,
            // The default falls back to tiled where lanes is disabled.
            None if lanes_disabled => AttentionKernel::Tiled,
            None => AttentionKernel::Lanes,
            Some("tiled") => AttentionKernel::Tiled,
            Some("lanes") if lanes_disabled => {
                return Err(contradicts(
                    FLOTILLA_CUDA_ATTENTION.name,
                    "lanes",
                    disabled_kernels::PAGED_ATTENTION_LANES,
                ))
            }
            Some("lanes") => AttentionKernel::Lanes,
            Some(v) => return Err(bad(FLOTILLA_CUDA_ATTENTION.name, v, "tiled or lanes")),
        };
        let small_batch_linear = match small_batch_linear {
            None | Some("blas") => LinearKernel::Blas,
            Some("gemv") if disabled.contains(disabled_kernels::GEMV_ROWS) => {
                return Err(contradicts(
                    FLOTILLA_CUDA_SMALL_BATCH_LINEAR.name,
                    "gemv",
                    disabled_kernels::GEMV_ROWS,
                ))
            }
            Some("gemv") => LinearKernel::Gemv,
            Some(v) => {
                return Err(bad(
                    FLOTILLA_CUDA_SMALL_BATCH_LINEAR.name,
                    v,
                    "blas or gemv",
                ));
            }
        };
        Ok(Self {
            attention,
            small_batch_linear,
            device_sampling: !disabled.contains(disabled_kernels::SAMPLE_ROWS),
        })
    }
}

/// A tensor-parallel group over NCCL: the ranks' communicator on this
/// backend's stream.
struct NcclGroup {
    comm: std::sync::Mutex<cudarc::nccl::safe::Comm>,
    size: usize,
}

// SAFETY: an NCCL communicator may be used from any thread provided calls on
// it do not overlap; the mutex serializes them, and every call is queued on
// the backend's one stream.
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

fn nccl_err(op: &'static str, e: impl std::fmt::Debug) -> Error {
    Error::Collective {
        op,
        peer: String::new(),
        msg: format!("NCCL: {e:?}"),
    }
}

/// A 2-D activation [rows, cols] in the compute dtype.
pub struct CudaTensor {
    buf: CudaSlice<u8>,
    pub rows: usize,
    pub cols: usize,
}

pub struct CudaLinear {
    /// [out, in] in the compute dtype.
    w: CudaSlice<u8>,
    bias: Option<CudaSlice<u8>>,
    out: usize,
    inp: usize,
}

pub struct CudaVector(CudaSlice<u8>);

pub struct CudaEmbedding {
    table: CudaSlice<u8>,
    rows: usize,
    hidden: usize,
    vocab_start: usize,
}

pub struct CudaRope {
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    max_positions: usize,
}

/// Paged KV cache: one allocation, per layer a K plane then a V plane, each
/// [num_blocks, num_kv_heads, block_size, head_dim].
pub struct CudaKvCache {
    buf: CudaSlice<u8>,
    spec: KvCacheSpec,
    num_blocks: usize,
    plane_bytes: usize,
}

/// One step's inputs in device memory (one upload), as i32 sections.
pub struct CudaStep {
    buf: StepBuf,
    num_tokens: usize,
    max_blocks: usize,
    num_logits_rows: usize,
    /// Section offsets (in i32 elements).
    ids: usize,
    positions: usize,
    slots: usize,
    tok_seq: usize,
    tok_nkeys: usize,
    tok_splits: usize,
    /// The most blocks any token's context is split into (1: none split).
    max_splits: usize,
    tables: usize,
    rows: usize,
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles (or loads from the cache) our kernels
    /// for it and creates the cuBLAS handle.
    pub fn new(ordinal: usize, dtype: ComputeDtype) -> Result<Self> {
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::cuda("cuCtxCreate", e))?;
        // One stream, used in order: per-buffer events would only add cost.
        // SAFETY: no buffer exists yet on this context.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own, not the legacy default one: graphs can only
        // be captured from a created stream.
        let stream = ctx
            .new_stream()
            .map_err(|e| Error::cuda("cuStreamCreate", e))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| Error::cuda("cuDeviceGetAttribute", e))?;
        let cache = if runtime::envs::flag(runtime::envs::VLLM_DISABLE_COMPILE_CACHE) {
            None
        } else {
            nvrtc::cache_dir()
        };
        let suffix = kernel_suffix(dtype);
        let cubin = nvrtc::cubin(
            &format!("flotilla-{suffix}"),
            &kernel_source(dtype),
            cc,
            cache.as_deref(),
        )?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| Error::cuda("cuModuleLoadData", e))?;
        let max_smem = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| Error::cuda("cuDeviceGetAttribute", e))? as usize;
        let kernels = Kernels::load(&module, suffix, max_smem)?;
        let pool = keep_pool_memory(&ctx)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::cuda("cublasCreate", e))?;
        // A workspace of our own: cuBLAS must not allocate one while a
        // graph is being captured.
        // SAFETY: cuBLAS only uses it as scratch space.
        let blas_workspace = unsafe { stream.alloc::<u8>(BLAS_WORKSPACE) }
            .map_err(|e| Error::cuda("cuMemAlloc (cuBLAS workspace)", e))?;
        // SAFETY: a live handle and a buffer of that size, kept in `Gpu`
        // beside the handle.
        unsafe {
            blas_sys::cublasSetWorkspace_v2(
                *blas.handle(),
                addr(&blas_workspace, &stream) as *mut c_void,
                BLAS_WORKSPACE,
            )
        }
        .result()
        .map_err(|e| Error::cuda("cublasSetWorkspace", e))?;
        let busy = std::sync::Mutex::new(BusyMeter::new(&ctx)?);
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        tracing::info!(
            "CUDA device {ordinal}: {name}, compute capability {}.{}, {} compute",
            cc.0,
            cc.1,
            dtype.name()
        );
        Ok(Self {
            gpu: Arc::new(Gpu {
                ctx,
                pool,
                stream,
                blas,
                _blas_workspace: blas_workspace,
                kernels,
                busy,
            }),
            dtype,
            group: None,
            kernels: KernelChoice::from_env()?,
        })
    }

    /// Keys per split of a decode token's context, for the chosen kernel.
    /// The lane-per-key kernel also takes it where it falls back to the
    /// tiled one: a step's splits are laid out before the shape is known.
    fn split_keys(&self) -> usize {
        match self.kernels.attention {
            AttentionKernel::Tiled => ATTN_SPLIT_TILED,
            AttentionKernel::Lanes => ATTN_SPLIT_LANES,
        }
    }

    /// Picks the kernels that have alternatives (tests and benchmarks compare them).
    pub fn set_kernels(&mut self, kernels: KernelChoice) {
        self.kernels = kernels;
    }

    /// Opens device `ordinal` as rank `host.rank()` of a tensor-parallel
    /// group of `host.size()` GPUs: rank 0 makes NCCL's unique id and the
    /// host group (the TCP rendezvous every rank has joined) hands it to
    /// the others. A group of one still runs its collectives through NCCL.
    pub fn with_group(
        ordinal: usize,
        dtype: ComputeDtype,
        host: &dyn crate::collective::HostGroup,
    ) -> Result<Self> {
        use cudarc::nccl::safe::{Comm, Id};
        // cudarc panics where the library is missing: say so first.
        // SAFETY: only tries to open the library.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(nccl_err(
                "ncclCommInitRank",
                "libnccl.so not found: tensor parallel on CUDA needs NCCL 2 on the library path (LD_LIBRARY_PATH)",
            ));
        }
        let mut b = Self::new(ordinal, dtype)?;
        // The id's 128 bytes travel as 32 f32 bit patterns (the group moves f32s).
        let words: Vec<f32> = if host.rank() == 0 {
            let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            id.internal()
                .chunks_exact(4)
                .map(|c| {
                    f32::from_bits(u32::from_le_bytes([
                        c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8,
                    ]))
                })
                .collect()
        } else {
            vec![0.0; 32]
        };
        let all = host.all_gather(&words)?;
        let root = all
            .first()
            .filter(|w| w.len() == 32)
            .ok_or_else(|| nccl_err("ncclGetUniqueId", "rank 0 sent no NCCL id"))?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (i, w) in root.iter().enumerate() {
            for (j, byte) in w.to_bits().to_le_bytes().into_iter().enumerate() {
                internal[4 * i + j] = byte as std::ffi::c_char;
            }
        }
        let comm = Comm::from_rank(
            b.stream().clone(),
            host.rank(),
            host.size(),
            Id::uninit(internal),
        )
        .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        tracing::info!(
            "rank {} of a tensor-parallel group of {} on NCCL",
            host.rank(),
            host.size()
        );
        b.group = Some(Arc::new(NcclGroup {
            comm: std::sync::Mutex::new(comm),
            size: host.size(),
        }));
        Ok(b)
    }

    pub fn dtype(&self) -> ComputeDtype {
        self.dtype
    }

    /// (free, total) bytes of device memory.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.gpu
            .ctx
            .mem_get_info()
            .map_err(|e| Error::cuda("cuMemGetInfo", e))
    }

    /// Waits for everything queued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.gpu
            .stream
            .synchronize()
            .map_err(|e| Error::cuda("cuStreamSynchronize", e))
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.gpu.stream
    }

    fn k(&self) -> &Kernels {
        &self.gpu.kernels
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, BusyMeter> {
        // The meter holds only timings: a panic elsewhere leaves it usable.
        self.gpu.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn elem(&self) -> usize {
        self.dtype.bytes()
    }

    fn alloc(&self, elems: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: every kernel writes its whole output before anything reads it.
        unsafe { self.stream().alloc::<u8>(elems.max(1) * self.elem()) }
            .map_err(|e| Error::cuda("cuMemAlloc", e))
    }

    fn tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            buf: self.alloc(rows * cols)?,
            rows,
            cols,
        })
    }

    /// Hands `f` the bytes of `v` in the compute dtype (16-bit types round
    /// to nearest even, as `from_f32` in kernels.cu does).
    fn in_dtype<R>(&self, v: &[f32], f: impl FnOnce(&[u8]) -> R) -> R {
        match self.dtype {
            ComputeDtype::F32 => f(bytemuck::cast_slice(v)),
            ComputeDtype::Bf16 => {
                let h: Vec<bf16> = v.par_iter().map(|&x| bf16::from_f32(x)).collect();
                f(bytemuck::cast_slice(&h))
            }
            ComputeDtype::F16 => {
                let h: Vec<f16> = v.par_iter().map(|&x| f16::from_f32(x)).collect();
                f(bytemuck::cast_slice(&h))
            }
        }
    }

    /// Host f32 values, stored in the compute dtype.
    fn upload_f32(&self, v: &[f32]) -> Result<CudaSlice<u8>> {
        self.in_dtype(v, |bytes| {
            self.stream()
                .clone_htod(bytes)
                .map_err(|e| Error::cuda("cuMemcpyHtoD", e))
        })
    }

    /// Writes matrix `m` row-major into `dst` from element `offset` on:
    /// dummy weights are made there by a kernel, the others are converted
    /// on the host (GGUF weights dequantized) and copied.
    fn fill_matrix(&self, dst: &mut CudaSlice<u8>, offset: usize, m: &HostMatrix) -> Result<()> {
        let (n, k) = m.dims();
        let elem = self.elem();
        let range = offset * elem..(offset + n * k) * elem;
        if range.end > dst.len() {
            return Err(Error::config(format!(
                "a [{n}, {k}] matrix at element {offset} overruns a buffer of {} elements",
                dst.len() / elem
            )));
        }
        match m {
            HostMatrix::Dummy(d) => self.dummy_fill(dst, offset, d),
            _ => {
                let v: Vec<f32> = m.to_dense()?.flatten_all()?.to_vec1()?;
                self.in_dtype(&v, |bytes| {
                    self.stream()
                        .memcpy_htod(bytes, &mut dst.slice_mut(range))
                        .map_err(|e| Error::cuda("cuMemcpyHtoD", e))
                })
            }
        }
    }

    /// `d`'s values in the compute dtype at element `offset` of `dst`, made
    /// on the device: no value is made on the host or crosses PCIe.
    fn dummy_fill(&self, dst: &mut CudaSlice<u8>, offset: usize, d: &DummyMatrix) -> Result<()> {
        let (n, k) = d.dims();
        let len = n * k;
        if len == 0 {
            return Ok(());
        }
        let s = self.stream();
        let out = addr(dst, s) + (offset * self.elem()) as u64;
        let (row0, col0) = d.origin();
        let base = d.base();
        let (full_cols, row0, col0, cols, nn) = (
            d.full_cols() as i64,
            row0 as i64,
            col0 as i64,
            k as i64,
            len as i64,
        );
        self.launch(
            &self.k().dummy_fill,
            Self::grid_1d(len),
            256,
            0,
            &mut kargs![base, full_cols, row0, col0, cols, out, nn],
            "dummy_fill",
        )
    }

    /// Launches `f` with `args`, each a pointer to one kernel parameter
    /// (built with `kargs!`), in the order the kernel declares them.
    fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        smem: usize,
        args: &mut [*mut c_void],
        op: &'static str,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        // SAFETY: each caller passes the parameter list its kernel declares,
        // with buffers sized for the grid it launches; the pointed-to values
        // live until this call returns (cuLaunchKernel copies them).
        unsafe {
            driver::launch_kernel(
                f.cu_function(),
                grid,
                (block, 1, 1),
                smem as u32,
                self.stream().cu_stream(),
                args,
            )
        }
        .map_err(|e| Error::cuda(op, e))
    }

    /// A grid-stride launch over `n` elements.
    fn grid_1d(n: usize) -> (u32, u32, u32) {
        (n.div_ceil(256).clamp(1, 65_535 * 8) as u32, 1, 1)
    }

    fn data_type(&self) -> blas_sys::cudaDataType {
        match self.dtype {
            ComputeDtype::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
            ComputeDtype::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            ComputeDtype::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        }
    }

    /// y[rows, out] = x[rows, in] · w[out, in]ᵀ, accumulated in f32.
    fn gemm(&self, x: &CudaTensor, w: &CudaLinear, y: &mut CudaTensor) -> Result<()> {
        let s = self.stream();
        let (alpha, beta) = (1f32, 0f32);
        let dt = self.data_type();
        // Column-major: yᵀ[out, rows] = w[in, out]ᵀ · xᵀ[in, rows].
        // SAFETY: the buffers hold [out,in], [rows,in] and [rows,out] elements.
        unsafe {
            blas::gemm_ex(
                *self.gpu.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                w.out as i32,
                x.rows as i32,
                w.inp as i32,
                &alpha as *const f32 as *const _,
                addr(&w.w, s) as *const _,
                dt,
                w.inp as i32,
                addr(&x.buf, s) as *const _,
                dt,
                w.inp as i32,
                &beta as *const f32 as *const _,
                addr(&y.buf, s) as *mut _,
                dt,
                w.out as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::cuda("cublasGemmEx", e))
    }

    /// Decode-sized batches: one pass over the weights (see `gemv_rows`).
    fn gemv(&self, x: &CudaTensor, w: &CudaLinear, y: &mut CudaTensor) -> Result<()> {
        let s = self.stream();
        let (xp, wp, yp) = (addr(&x.buf, s), addr(&w.w, s), addr(&y.buf, s));
        let (rows, inp, out) = (x.rows as i32, w.inp as i32, w.out as i32);
        const WARPS: usize = 4;
        let blocks = w.out.div_ceil(GEMV_OUTS * WARPS) as u32;
        self.launch(
            &self.k().gemv_rows,
            (blocks, 1, 1),
            (WARPS * 32) as u32,
            0,
            &mut kargs![xp, wp, yp, rows, inp, out],
            "gemv_rows",
        )
    }

    fn norm(
        &self,
        residual: Option<&mut CudaTensor>,
        x: &CudaTensor,
        w: &CudaVector,
        eps: f32,
    ) -> Result<CudaTensor> {
        let out = self.tensor(x.rows, x.cols)?;
        let s = self.stream();
        let res = residual.map_or(0u64, |r| addr(&r.buf, s));
        let (xp, wp, op) = (addr(&x.buf, s), addr(&w.0, s), addr(&out.buf, s));
        let cols = x.cols as i32;
        let block = (x.cols.next_power_of_two()).clamp(32, 1024) as u32;
        self.launch(
            &self.k().add_rms_norm,
            (x.rows as u32, 1, 1),
            block,
            0,
            &mut kargs![res, xp, wp, op, cols, eps],
            "add_rms_norm",
        )?;
        Ok(out)
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Linear = CudaLinear;
    type Vector = CudaVector;
    type Embedding = CudaEmbedding;
    type KvCache = CudaKvCache;
    type Rope = CudaRope;
    type Step = CudaStep;
    type Graphs = CudaGraphs;

    fn upload_linear(&self, parts: Vec<HostLinear>) -> Result<CudaLinear> {
        // Parts are stacked by output rows, so one GEMM runs them all
        // (q|k|v, gate|up): each is written into its rows of one buffer.
        let (mut out, mut inp) = (0, None);
        for p in &parts {
            let (n, k) = p.weight.dims();
            if *inp.get_or_insert(k) != k {
                return Err(Error::config(format!(
                    "linear parts disagree on their input width ({k} vs {})",
                    inp.unwrap_or(0)
                )));
            }
            out += n;
        }
        let inp = inp.ok_or_else(|| Error::config("a linear layer with no parts"))?;
        let mut w = self.alloc(out * inp)?;
        let mut bias: Vec<f32> = Vec::new();
        let mut any_bias = false;
        let mut row = 0;
        for p in &parts {
            self.fill_matrix(&mut w, row * inp, &p.weight)?;
            let n = p.weight.dims().0;
            row += n;
            match &p.bias {
                Some(b) if b.len() == n => {
                    any_bias = true;
                    bias.extend_from_slice(b);
                }
                Some(b) => {
                    return Err(Error::config(format!(
                        "a bias of {} values for a linear part of {n} outputs",
                        b.len()
                    )))
                }
                None => bias.extend(std::iter::repeat_n(0.0, n)),
            }
        }
        Ok(CudaLinear {
            w,
            bias: if any_bias {
                Some(self.upload_f32(&bias)?)
            } else {
                None
            },
            out,
            inp,
        })
    }

    fn upload_vector(&self, v: Vec<f32>) -> Result<CudaVector> {
        Ok(CudaVector(self.upload_f32(&v)?))
    }

    fn upload_embedding(&self, table: &HostMatrix, vocab_start: usize) -> Result<CudaEmbedding> {
        let (rows, hidden) = table.dims();
        let mut buf = self.alloc(rows * hidden)?;
        self.fill_matrix(&mut buf, 0, table)?;
        Ok(CudaEmbedding {
            table: buf,
            rows,
            hidden,
            vocab_start,
        })
    }

    fn upload_rope(&self, table: RopeTable) -> Result<CudaRope> {
        let s = self.stream();
        let up = |v: &[f32]| s.clone_htod(v).map_err(|e| Error::cuda("cuMemcpyHtoD", e));
        Ok(CudaRope {
            cos: up(&table.cos)?,
            sin: up(&table.sin)?,
            max_positions: table.max_positions,
        })
    }

    fn kv_dtype_bytes(&self) -> usize {
        self.dtype.bytes()
    }

    fn alloc_kv_cache(&self, spec: KvCacheSpec, num_blocks: usize) -> Result<CudaKvCache> {
        let plane = num_blocks
            .checked_mul(spec.block_elems())
            .and_then(|n| n.checked_mul(self.elem()))
            .ok_or_else(|| Error::config(format!("{num_blocks} KV blocks overflow memory")))?;
        let total = plane * 2 * spec.num_layers;
        // The cache is the largest allocation: give it memory the pool
        // holds but does not use (the profile step's, an old cache's), so
        // it is not left stranded beside it.
        self.synchronize()?;
        self.gpu.pool.trim()?;
        // Slots are only read after they are written (attention reads the
        // first n_keys of each sequence), so the cache needs no zeroing.
        // SAFETY: as above.
        let buf = unsafe { self.stream().alloc::<u8>(total.max(1)) }.map_err(|e| Error::Cuda {
            op: "cuMemAlloc (KV cache)".into(),
            msg: format!("{e:?} ({num_blocks} blocks, {total} bytes)"),
        })?;
        Ok(CudaKvCache {
            buf,
            spec,
            num_blocks,
            plane_bytes: plane,
        })
    }

    fn prepare_step(&self, inputs: StepInputs<'_>, rope: &CudaRope) -> Result<CudaStep> {
        self.busy().step_starts(self.stream())?;
        let (v, mut step) = self.lay_out_step(inputs, rope, None)?;
        step.buf = StepBuf::Own(
            self.stream()
                .clone_htod(&v)
                .map_err(|e| Error::cuda("cuMemcpyHtoD (step)", e))?,
        );
        Ok(step)
    }

    fn new_graphs(
        &self,
        max_tokens: usize,
        logits_cols: usize,
        block_size: usize,
    ) -> Result<Option<CudaGraphs>> {
        // Collectives are not captured: tensor-parallel ranks run eagerly.
        if self.group.is_some() || max_tokens == 0 {
            return Ok(None);
        }
        Ok(Some(CudaGraphs {
            logits: self.alloc(max_tokens * logits_cols)?,
            max_tokens,
            cols: logits_cols,
            block_size,
            steps: std::collections::HashMap::new(),
            graphs: std::collections::HashMap::new(),
        }))
    }

    fn has_graph(&self, graphs: &CudaGraphs, shape: GraphShape) -> bool {
        graphs.graphs.contains_key(&shape)
    }

    fn prepare_graph_step(
        &self,
        graphs: &mut CudaGraphs,
        shape: GraphShape,
        inputs: StepInputs<'_>,
        rope: &CudaRope,
    ) -> Result<CudaStep> {
        if shape.tokens > graphs.max_tokens || shape.tokens == 0 {
            return Err(Error::config(format!(
                "a graph of {} rows (these graphs take 1 to {})",
                shape.tokens, graphs.max_tokens
            )));
        }
        self.busy().step_starts(self.stream())?;
        let splits = (shape.table_width * graphs.block_size)
            .div_ceil(self.split_keys())
            .max(1);
        let (v, mut step) = self.lay_out_step(inputs, rope, Some((shape, splits)))?;
        // One buffer per table width, sized for the most rows: every graph
        // of that width reads its step there.
        let buf = match graphs.steps.entry(shape.table_width) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let len = graphs.max_tokens * (7 + shape.table_width);
                // SAFETY: every step writes the sections its graph reads.
                e.insert(
                    unsafe { self.stream().alloc::<i32>(len) }
                        .map_err(|e| Error::cuda("cuMemAlloc (graph step)", e))?,
                )
            }
        };
        self.stream()
            .memcpy_htod(&v, &mut buf.slice_mut(0..v.len()))
            .map_err(|e| Error::cuda("cuMemcpyHtoD (graph step)", e))?;
        step.buf = StepBuf::Graph(addr(buf, self.stream()));
        Ok(step)
    }

    fn capture_graph(
        &self,
        graphs: &mut CudaGraphs,
        shape: GraphShape,
        forward: &mut dyn FnMut() -> Result<CudaTensor>,
    ) -> Result<()> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        // Warm-up: lazily loaded kernels and cuBLAS's choices are settled
        // before capture, where neither may happen.
        drop(forward()?);
        let s = self.stream();
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| Error::cuda("cuStreamBeginCapture", e))?;
        let captured = (|| {
            let t = forward()?;
            if t.rows != shape.tokens || t.cols != graphs.cols {
                return Err(Error::config(format!(
                    "a graph of {} rows produced [{}, {}] logits, expected [{}, {}]",
                    shape.tokens, t.rows, t.cols, shape.tokens, graphs.cols
                )));
            }
            // The logits leave the graph through its persistent buffer;
            // everything the graph allocates it also frees, so it can be
            // launched again.
            // SAFETY: both buffers hold rows * cols elements.
            unsafe {
                driver::memcpy_dtod_async(
                    addr(&graphs.logits, s),
                    addr(&t.buf, s),
                    t.rows * t.cols * self.elem(),
                    s.cu_stream(),
                )
            }
            .map_err(|e| Error::cuda("cuMemcpyDtoDAsync (graph logits)", e))
        })();
        // Capture always ends, whatever the forward did.
        let graph = s.end_capture(CUgraphInstantiate_flags(0));
        captured?;
        let graph = graph
            .map_err(|e| Error::cuda("cuStreamEndCapture", e))?
            .ok_or_else(|| Error::Cuda {
                op: "cuStreamEndCapture".into(),
                msg: "the capture recorded no work".into(),
            })?;
        graph
            .upload()
            .map_err(|e| Error::cuda("cuGraphUpload", e))?;
        graphs.graphs.insert(shape, StepGraph(graph));
        Ok(())
    }

    fn replay_graph(
        &self,
        graphs: &CudaGraphs,
        shape: GraphShape,
        rows: usize,
    ) -> Result<CudaTensor> {
        let graph = graphs
            .graphs
            .get(&shape)
            .ok_or_else(|| Error::config(format!("no graph was captured for {shape:?}")))?;
        if rows > shape.tokens {
            return Err(Error::config(format!(
                "{rows} logits rows from a graph of {} rows",
                shape.tokens
            )));
        }
        graph
            .0
            .launch()
            .map_err(|e| Error::cuda("cuGraphLaunch", e))?;
        let out = self.tensor(rows, graphs.cols)?;
        let s = self.stream();
        // SAFETY: the graph wrote shape.tokens >= rows rows of logits.
        unsafe {
            driver::memcpy_dtod_async(
                addr(&out.buf, s),
                addr(&graphs.logits, s),
                rows * graphs.cols * self.elem(),
                s.cu_stream(),
            )
        }
        .map_err(|e| Error::cuda("cuMemcpyDtoDAsync (graph logits)", e))?;
        Ok(out)
    }

    fn embed(&self, e: &CudaEmbedding, step: &CudaStep) -> Result<CudaTensor> {
        let out = self.tensor(step.num_tokens, e.hidden)?;
        let s = self.stream();
        let ids = step.section(step.ids, s);
        let (tp, op) = (addr(&e.table, s), addr(&out.buf, s));
        let (vs, rows, hidden) = (e.vocab_start as i32, e.rows as i32, e.hidden as i32);
        self.launch(
            &self.k().embed,
            (step.num_tokens as u32, 1, 1),
            256,
            0,
            &mut kargs![ids, tp, vs, rows, hidden, op],
            "embed",
        )?;
        Ok(out)
    }

    fn linear(&self, x: &CudaTensor, w: &CudaLinear) -> Result<CudaTensor> {
        if x.cols != w.inp {
            return Err(Error::config(format!(
                "linear: input has {} columns, weight expects {}",
                x.cols, w.inp
            )));
        }
        let mut y = self.tensor(x.rows, w.out)?;
        if x.rows == 0 {
            return Ok(y);
        }
        if self.kernels.small_batch_linear == LinearKernel::Gemv
            && x.rows <= GEMV_ROWS
            && (w.inp * self.dtype.bytes()).is_multiple_of(16)
        {
            self.gemv(x, w, &mut y)?;
        } else {
            self.gemm(x, w, &mut y)?;
        }
        if let Some(bias) = &w.bias {
            let s = self.stream();
            let (yp, bp) = (addr(&y.buf, s), addr(bias, s));
            let (r, c) = (y.rows as i32, y.cols as i32);
            self.launch(
                &self.k().add_bias,
                Self::grid_1d(y.rows * y.cols),
                256,
                0,
                &mut kargs![yp, bp, r, c],
                "add_bias",
            )?;
        }
        Ok(y)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaVector, eps: f32) -> Result<CudaTensor> {
        self.norm(None, x, w, eps)
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaTensor,
        x: &CudaTensor,
        w: &CudaVector,
        eps: f32,
    ) -> Result<CudaTensor> {
        self.norm(Some(residual), x, w, eps)
    }

    fn silu_mul(&self, gate_up: &CudaTensor) -> Result<CudaTensor> {
        let n = gate_up.cols / 2;
        let out = self.tensor(gate_up.rows, n)?;
        let s = self.stream();
        let (gp, op) = (addr(&gate_up.buf, s), addr(&out.buf, s));
        let (r, nn) = (gate_up.rows as i32, n as i32);
        self.launch(
            &self.k().silu_mul,
            Self::grid_1d(gate_up.rows * n),
            256,
            0,
            &mut kargs![gp, op, r, nn],
            "silu_mul",
        )?;
        Ok(out)
    }

    fn rotary(
        &self,
        qkv: &mut CudaTensor,
        heads: QkvHeads,
        step: &CudaStep,
        rope: &CudaRope,
    ) -> Result<()> {
        let s = self.stream();
        let pos = step.section(step.positions, s);
        let (qp, cp, sp) = (addr(&qkv.buf, s), addr(&rope.cos, s), addr(&rope.sin, s));
        let stride = qkv.cols as i32;
        let nh = (heads.num_heads + heads.num_kv_heads) as i32;
        let hd = heads.head_dim as i32;
        self.launch(
            &self.k().rotary,
            (qkv.rows as u32, 1, 1),
            256,
            0,
            &mut kargs![qp, pos, cp, sp, stride, nh, hd],
            "rotary",
        )
    }

    fn write_kv(
        &self,
        cache: &mut CudaKvCache,
        layer: usize,
        qkv: &CudaTensor,
        heads: QkvHeads,
        step: &CudaStep,
    ) -> Result<()> {
        let s = self.stream();
        let slots = step.section(step.slots, s);
        let (kp, vp) = cache.planes(layer, s);
        let qp = addr(&qkv.buf, s);
        let stride = qkv.cols as i32;
        let k_col = heads.q_width() as i32;
        let v_col = (heads.q_width() + heads.kv_width()) as i32;
        let (nkv, hd, bs) = (
            heads.num_kv_heads as i32,
            heads.head_dim as i32,
            cache.spec.block_size as i32,
        );
        self.launch(
            &self.k().write_kv,
            (qkv.rows as u32, 1, 1),
            256,
            0,
            &mut kargs![qp, slots, kp, vp, stride, k_col, v_col, nkv, hd, bs],
            "write_kv",
        )
    }

    fn attention(
        &self,
        cache: &CudaKvCache,
        layer: usize,
        qkv: &CudaTensor,
        heads: QkvHeads,
        step: &CudaStep,
        scale: f32,
    ) -> Result<CudaTensor> {
        let d = heads.head_dim;
        let group = heads.num_heads / heads.num_kv_heads;
        if d > 256 || group > 32 || group * heads.num_kv_heads != heads.num_heads {
            return Err(Error::NotImplemented {
                feature: format!(
                    "CUDA paged attention for head_dim {d} with {} query / {} kv heads (head_dim up to 256, at most 32 query heads per kv head)",
                    heads.num_heads, heads.num_kv_heads
                ),
            });
        }
        // The lane-per-key kernel where chosen and the shape allows it.
        let lanes = match (self.kernels.attention, d) {
            (AttentionKernel::Lanes, 64) if group <= ATTN_GMAX => Some(0),
            (AttentionKernel::Lanes, 128) if group <= ATTN_GMAX => Some(1),
            (AttentionKernel::Lanes, 256) if group <= ATTN_GMAX => Some(2),
            _ => None,
        };
        let (func, block, smem) = match lanes {
            Some(i) => (
                &self.k().attention_lanes[i],
                (ATTN_WARPS * 32) as u32,
                (group * d * (1 + ATTN_WARPS) + ATTN_WARPS * group * 32) * 4,
            ),
            None => {
                let k_stride = if d.is_multiple_of(4) { d + 4 } else { d + 1 };
                (
                    &self.k().paged_attention,
                    (group.max(4) * 32) as u32,
                    (group * d + 32 * k_stride + 32 * d) * 4,
                )
            }
        };
        if smem > self.k().max_smem {
            return Err(Error::NotImplemented {
                feature: format!(
                    "CUDA paged attention needing {smem} bytes of shared memory (the device allows {})",
                    self.k().max_smem
                ),
            });
        }
        let out = self.tensor(qkv.rows, heads.q_width())?;
        let s = self.stream();
        let (kp, vp) = cache.planes(layer, s);
        let tables = step.section(step.tables, s);
        let tok_seq = step.section(step.tok_seq, s);
        let tok_nkeys = step.section(step.tok_nkeys, s);
        let tok_splits = step.section(step.tok_splits, s);
        let (qp, op) = (addr(&qkv.buf, s), addr(&out.buf, s));
        let splits = step.max_splits;
        // Per (token, head, split): running max and sum, then D partial outputs.
        let parts = if splits > 1 {
            let n = qkv.rows * heads.num_heads * splits;
            // SAFETY: every split a token has writes its entries before the
            // reduce reads them; other entries are never read.
            let alloc = |len: usize| {
                unsafe { s.alloc::<f32>(len) }.map_err(|e| Error::cuda("cuMemAlloc", e))
            };
            Some((alloc(2 * n)?, alloc(n * d)?))
        } else {
            None
        };
        let (ml, pacc) = parts
            .as_ref()
            .map_or((0u64, 0u64), |(a, b)| (addr(a, s), addr(b, s)));
        let stride = qkv.cols as i32;
        let max_blocks = step.max_blocks as i32;
        let (split_keys, nkv, g, hd, bs) = (
            self.split_keys() as i32,
            heads.num_kv_heads as i32,
            group as i32,
            d as i32,
            cache.spec.block_size as i32,
        );
        let grid = (qkv.rows as u32, heads.num_kv_heads as u32, splits as u32);
        if lanes.is_some() {
            self.launch(
                func,
                grid,
                block,
                smem,
                &mut kargs![
                    qp, stride, kp, vp, tables, max_blocks, tok_seq, tok_nkeys, tok_splits,
                    split_keys, nkv, g, bs, scale, ml, pacc, op
                ],
                "paged_attention",
            )?;
        } else {
            self.launch(
                func,
                grid,
                block,
                smem,
                &mut kargs![
                    qp, stride, kp, vp, tables, max_blocks, tok_seq, tok_nkeys, tok_splits,
                    split_keys, nkv, g, hd, bs, scale, ml, pacc, op
                ],
                "paged_attention",
            )?;
        }
        if splits > 1 {
            let ms = splits as i32;
            self.launch(
                &self.k().attention_reduce,
                (qkv.rows as u32, heads.num_heads as u32, 1),
                128,
                0,
                &mut kargs![tok_splits, ml, pacc, ms, hd, op],
                "attention_reduce",
            )?;
        }
        Ok(out)
    }

    fn gather_logits_rows(&self, x: &CudaTensor, step: &CudaStep) -> Result<CudaTensor> {
        let out = self.tensor(step.num_logits_rows, x.cols)?;
        let s = self.stream();
        let rows = step.section(step.rows, s);
        let (xp, op) = (addr(&x.buf, s), addr(&out.buf, s));
        let cols = x.cols as i32;
        self.launch(
            &self.k().gather_rows,
            (step.num_logits_rows as u32, 1, 1),
            256,
            0,
            &mut kargs![xp, rows, op, cols],
            "gather_rows",
        )?;
        Ok(out)
    }

    fn group_size(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.size)
    }

    fn all_reduce(&self, x: &mut CudaTensor) -> Result<()> {
        let Some(g) = &self.group else {
            return Ok(());
        };
        use cudarc::nccl::safe::ReduceOp;
        let n = x.rows * x.cols;
        let comm = g
            .comm
            .lock()
            .map_err(|_| nccl_err("ncclAllReduce", "lock poisoned"))?;
        // SAFETY: the buffer holds n elements of the compute dtype.
        let r = unsafe {
            match self.dtype {
                ComputeDtype::Bf16 => {
                    let mut v = x.buf.transmute_mut::<bf16>(n).expect("sized for n");
                    comm.all_reduce_in_place(&mut v, &ReduceOp::Sum)
                }
                ComputeDtype::F16 => {
                    let mut v = x.buf.transmute_mut::<f16>(n).expect("sized for n");
                    comm.all_reduce_in_place(&mut v, &ReduceOp::Sum)
                }
                ComputeDtype::F32 => {
                    let mut v = x.buf.transmute_mut::<f32>(n).expect("sized for n");
                    comm.all_reduce_in_place(&mut v, &ReduceOp::Sum)
                }
            }
        };
        r.map(|_| ()).map_err(|e| nccl_err("ncclAllReduce", e))
    }

    fn all_gather_cols(&self, x: CudaTensor) -> Result<CudaTensor> {
        match &self.group {
            None => Ok(x),
            Some(g) => self.all_gather_cols_nccl(g, x),
        }
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        self.download_f32(addr(&x.buf, self.stream()), x.rows * x.cols)
    }

    fn upload_activation(&self, v: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        self.upload_tensor(v, rows, cols)
    }

    fn top_logits(&self, logits: &CudaTensor, k: usize) -> Result<Vec<RowTop>> {
        self.top_logits_impl(logits, k)
    }

    fn token_ranks(
        &self,
        logits: &CudaTensor,
        pairs: &[(usize, u32)],
    ) -> Result<Vec<(f32, usize)>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        for &(r, t) in pairs {
            if r >= logits.rows || t as usize >= logits.cols {
                return Err(Error::config(format!(
                    "token {t} of logits row {r}: the logits are [{}, {}]",
                    logits.rows, logits.cols
                )));
            }
        }
        let s = self.stream();
        let idx: Vec<i32> = pairs
            .iter()
            .map(|&(r, _)| r as i32)
            .chain(pairs.iter().map(|&(_, t)| t as i32))
            .collect();
        let idx = s
            .clone_htod(&idx)
            .map_err(|e| Error::cuda("cuMemcpyHtoD (token ranks)", e))?;
        let n = pairs.len();
        // SAFETY: the kernel writes both halves.
        let out = unsafe { s.alloc::<f32>(2 * n) }.map_err(|e| Error::cuda("cuMemAlloc", e))?;
        let (xp, rows, op) = (addr(&logits.buf, s), addr(&idx, s), addr(&out, s));
        let tokens = rows + (n * std::mem::size_of::<i32>()) as u64;
        let vocab = logits.cols as i32;
        self.launch(
            &self.k().token_ranks,
            (n as u32, 1, 1),
            1024,
            0,
            &mut kargs![xp, vocab, rows, tokens, op],
            "token_ranks",
        )?;
        self.busy().results_read(s)?;
        let mut host = vec![0f32; 2 * n];
        s.memcpy_dtoh(&out, &mut host[..])
            .map_err(|e| Error::cuda("cuMemcpyDtoH", e))?;
        Ok((0..n)
            .map(|p| (host[p], host[n + p] as usize + 1))
            .collect())
    }

    fn memory_info(&self) -> Result<Option<(usize, usize)>> {
        self.synchronize()?;
        self.mem_info().map(Some)
    }

    fn samples_on_device(&self) -> bool {
        // VLLM_DISABLED_KERNELS=sample_rows: the host sampler takes every row.
        self.kernels.device_sampling
    }

    fn sample(&self, logits: &CudaTensor, rows: &[SampleSpec]) -> Result<Vec<DeviceSampled>> {
        self.sample_impl(logits, rows)
    }
}

/// `SampleSpec`s as `kernels.cu` lays out `SampleRow` (56 bytes),
/// `LogitEdit` (20 bytes) and the bitmask words, little-endian.
fn pack_sample_specs(rows: &[SampleSpec]) -> (Vec<u8>, Vec<u8>, Vec<u32>) {
    let mut r = Vec::with_capacity(rows.len() * 56);
    let mut e = Vec::new();
    let mut masks = Vec::new();
    let mut start = 0i32;
    for spec in rows {
        let count = spec.edits.len() as i32;
        r.extend_from_slice(&(spec.greedy as i32).to_le_bytes());
        r.extend_from_slice(&(spec.allowlist as i32).to_le_bytes());
        r.extend_from_slice(&start.to_le_bytes());
        r.extend_from_slice(&count.to_le_bytes());
        r.extend_from_slice(&spec.inv_temperature.to_le_bytes());
        r.extend_from_slice(&spec.min_p.to_le_bytes());
        r.extend_from_slice(&spec.top_p.to_le_bytes());
        r.extend_from_slice(&(spec.top_k.min(i32::MAX as u32) as i32).to_le_bytes());
        r.extend_from_slice(&spec.u.to_le_bytes());
        r.extend_from_slice(&(spec.logits_row as i32).to_le_bytes());
        r.extend_from_slice(&(spec.logprobs as i32).to_le_bytes());
        let (mask_start, mask_words) = match &spec.bitmask {
            Some(words) => {
                let at = masks.len() as i32;
                masks.extend_from_slice(words);
                (at, words.len() as i32)
            }
            None => (-1, 0),
        };
        r.extend_from_slice(&mask_start.to_le_bytes());
        r.extend_from_slice(&mask_words.to_le_bytes());
        for ed in &spec.edits {
            let flags = ed.allowed as i32 | (ed.banned as i32) << 1;
            e.extend_from_slice(&(ed.token as i32).to_le_bytes());
            e.extend_from_slice(&flags.to_le_bytes());
            e.extend_from_slice(&ed.bias.to_le_bytes());
            e.extend_from_slice(&ed.repetition.to_le_bytes());
            e.extend_from_slice(&ed.subtract.to_le_bytes());
        }
        start += count;
    }
    (r, e, masks)
}

impl CudaBackend {
    /// The ranks' column shards side by side, in rank order. Shards may
    /// differ in width (the last vocab shard can be short): widths travel
    /// first, then every rank sends its shard padded to the widest.
    fn all_gather_cols_nccl(&self, g: &NcclGroup, x: CudaTensor) -> Result<CudaTensor> {
        let s = self.stream();
        let comm = g
            .comm
            .lock()
            .map_err(|_| nccl_err("ncclAllGather", "lock poisoned"))?;
        let mine = s
            .clone_htod(&[x.cols as i32])
            .map_err(|e| Error::cuda("cuMemcpyHtoD", e))?;
        let mut widths_dev = s
            .alloc_zeros::<i32>(g.size)
            .map_err(|e| Error::cuda("cuMemAlloc", e))?;
        comm.all_gather(&mine, &mut widths_dev)
            .map_err(|e| nccl_err("ncclAllGather", e))?;
        let mut widths = vec![0i32; g.size];
        s.memcpy_dtoh(&widths_dev, &mut widths[..])
            .map_err(|e| Error::cuda("cuMemcpyDtoH", e))?;
        self.synchronize()?;
        let pad = widths.iter().copied().max().unwrap_or(0).max(0) as usize;
        let mut offsets = vec![0i32; g.size + 1];
        for (k, w) in widths.iter().enumerate() {
            offsets[k + 1] = offsets[k] + w;
        }
        let total = offsets[g.size] as usize;
        let rows = x.rows;
        let mut padded = self.tensor(rows, pad)?;
        let (xp, pp) = (addr(&x.buf, s), addr(&padded.buf, s));
        let (cols, padi, n) = (x.cols as i32, pad as i32, (rows * pad) as i64);
        self.launch(
            &self.k().pad_cols,
            Self::grid_1d(rows * pad),
            256,
            0,
            &mut kargs![xp, cols, padi, pp, n],
            "pad_cols",
        )?;
        let mut recv = self.tensor(g.size * rows, pad)?;
        let count = rows * pad;
        // SAFETY: `padded` holds count elements and `recv` size * count, of the compute dtype.
        let r = unsafe {
            match self.dtype {
                ComputeDtype::Bf16 => comm.all_gather(
                    &padded.buf.transmute_mut::<bf16>(count).expect("sized"),
                    &mut recv
                        .buf
                        .transmute_mut::<bf16>(g.size * count)
                        .expect("sized"),
                ),
                ComputeDtype::F16 => comm.all_gather(
                    &padded.buf.transmute_mut::<f16>(count).expect("sized"),
                    &mut recv
                        .buf
                        .transmute_mut::<f16>(g.size * count)
                        .expect("sized"),
                ),
                ComputeDtype::F32 => comm.all_gather(
                    &padded.buf.transmute_mut::<f32>(count).expect("sized"),
                    &mut recv
                        .buf
                        .transmute_mut::<f32>(g.size * count)
                        .expect("sized"),
                ),
            }
        };
        r.map_err(|e| nccl_err("ncclAllGather", e))?;
        let offsets_dev = s
            .clone_htod(&offsets)
            .map_err(|e| Error::cuda("cuMemcpyHtoD", e))?;
        let out = self.tensor(rows, total)?;
        let (rp, op, offp) = (addr(&recv.buf, s), addr(&out.buf, s), addr(&offsets_dev, s));
        let (size, rowsi, totali, n) = (
            g.size as i32,
            rows as i32,
            total as i32,
            (rows * total) as i64,
        );
        self.launch(
            &self.k().concat_shards,
            Self::grid_1d(rows * total),
            256,
            0,
            &mut kargs![rp, offp, size, rowsi, padi, op, totali, n],
            "concat_shards",
        )?;
        Ok(out)
    }

    fn sample_impl(&self, x: &CudaTensor, rows: &[SampleSpec]) -> Result<Vec<DeviceSampled>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let vocab = x.cols;
        for spec in rows {
            if spec.logits_row >= x.rows {
                return Err(Error::config(format!(
                    "sample: logits row {} of a [{}, {vocab}] tensor",
                    spec.logits_row, x.rows
                )));
            }
            if let Some(e) = spec.edits.iter().find(|e| e.token as usize >= vocab) {
                return Err(Error::config(format!(
                    "sample: an edit of token {} outside a vocabulary of {vocab}",
                    e.token
                )));
            }
        }
        let (packed_rows, mut packed_edits, mut masks) = pack_sample_specs(rows);
        if packed_edits.is_empty() {
            packed_edits.resize(20, 0);
        }
        if masks.is_empty() {
            masks.push(0);
        }
        let s = self.stream();
        let up = |bytes: &[u8]| {
            s.clone_htod(bytes)
                .map_err(|e| Error::cuda("cuMemcpyHtoD", e))
        };
        let (rows_buf, edits_buf) = (up(&packed_rows)?, up(&packed_edits)?);
        let masks_buf = up(bytemuck::cast_slice(&masks))?;
        let n = rows.len();
        // SAFETY: the kernel writes each row of scratch before reading it,
        // and every `out` value the host reads below.
        let scratch =
            unsafe { s.alloc::<f32>(n * vocab) }.map_err(|e| Error::cuda("cuMemAlloc", e))?;
        let out = unsafe { s.alloc::<f32>(4 * n) }.map_err(|e| Error::cuda("cuMemAlloc", e))?;
        let (xp, rp, ep, mp, sp, op) = (
            addr(&x.buf, s),
            addr(&rows_buf, s),
            addr(&edits_buf, s),
            addr(&masks_buf, s),
            addr(&scratch, s),
            addr(&out, s),
        );
        let v = vocab as i32;
        self.launch(
            &self.k().sample_rows,
            (n as u32, 1, 1),
            1024,
            0,
            &mut kargs![xp, v, rp, ep, mp, sp, op],
            "sample_rows",
        )?;
        self.busy().results_read(s)?;
        let mut host = vec![0f32; 4 * n];
        s.memcpy_dtoh(&out, &mut host[..])
            .map_err(|e| Error::cuda("cuMemcpyDtoH", e))?;
        self.synchronize()?;
        Ok(host
            .chunks_exact(4)
            .zip(rows)
            .map(|(o, spec)| DeviceSampled {
                token: o[0].to_bits(),
                logit: if spec.logprobs { o[1] } else { 0.0 },
                rank: if spec.logprobs {
                    o[2].to_bits() as usize
                } else {
                    0
                },
                log_sum_exp: if spec.logprobs { o[3] } else { 0.0 },
            })
            .collect())
    }

    fn top_logits_impl(&self, x: &CudaTensor, k: usize) -> Result<Vec<RowTop>> {
        let (rows, k) = (x.rows, k.max(1).min(x.cols));
        if rows == 0 {
            return Ok(Vec::new());
        }
        let n = rows * (2 * k + 1);
        let s = self.stream();
        // SAFETY: the kernel writes all n values.
        let out = unsafe { s.alloc::<f32>(n) }.map_err(|e| Error::cuda("cuMemAlloc", e))?;
        let (xp, op) = (addr(&x.buf, s), addr(&out, s));
        let (vocab, kk) = (x.cols as i32, k as i32);
        self.launch(
            &self.k().top_logits,
            (rows as u32, 1, 1),
            1024,
            0,
            &mut kargs![xp, vocab, kk, op],
            "top_logits",
        )?;
        self.busy().results_read(s)?;
        let mut host = vec![0f32; n];
        s.memcpy_dtoh(&out, &mut host[..])
            .map_err(|e| Error::cuda("cuMemcpyDtoH", e))?;
        s.synchronize()
            .map_err(|e| Error::cuda("cuStreamSynchronize", e))?;
        let (vals, rest) = host.split_at(rows * k);
        let (ids, lse) = rest.split_at(rows * k);
        Ok((0..rows)
            .map(|r| RowTop {
                log_sum_exp: lse[r],
                top: (0..k)
                    .map(|j| (ids[r * k + j].to_bits(), vals[r * k + j]))
                    .collect(),
            })
            .collect())
    }
}

/// Where a step's inputs live: a buffer of its own, or (a graph's step)
/// the buffer `CudaGraphs` keeps for its shape, at a fixed address.
enum StepBuf {
    Own(CudaSlice<i32>),
    Graph(u64),
}

impl CudaStep {
    /// Device address of the section starting at element `off`.
    fn section(&self, off: usize, s: &CudaStream) -> u64 {
        let base = match &self.buf {
            StepBuf::Own(b) => addr(b, s),
            StepBuf::Graph(a) => *a,
        };
        base + (off * std::mem::size_of::<i32>()) as u64
    }
}

/// Decode steps captured as graphs, per `GraphShape`, with the buffers
/// they read and write at fixed addresses.
pub struct CudaGraphs {
    /// [max_tokens, cols] logits: where every graph leaves its rows.
    logits: CudaSlice<u8>,
    max_tokens: usize,
    cols: usize,
    block_size: usize,
    /// Step inputs per table width, room for `max_tokens` rows.
    steps: std::collections::HashMap<usize, CudaSlice<i32>>,
    graphs: std::collections::HashMap<GraphShape, StepGraph>,
}

/// A captured graph. cudarc leaves it `!Send`; the runner that owns it
/// uses it from one thread at a time (`&mut` access), which is all the
/// driver asks of graph objects.
struct StepGraph(cudarc::driver::CudaGraph);
// SAFETY: see above; the graph is only launched and dropped, never shared.
unsafe impl Send for StepGraph {}

impl CudaBackend {
    /// One step's inputs as the kernels read them: i32 sections, and the
    /// step whose offsets point into them (its buffer is set by the
    /// caller). With `pad` (a graph's shape and its split count) the step
    /// is padded to the shape: pad rows read token 0 at position 0, write
    /// no KV (slot -1), attend to one key of block 0 and are logits rows
    /// that nobody reads.
    fn lay_out_step(
        &self,
        inputs: StepInputs<'_>,
        rope: &CudaRope,
        pad: Option<(GraphShape, usize)>,
    ) -> Result<(Vec<i32>, CudaStep)> {
        let meta = inputs.meta;
        let n = meta.num_tokens();
        check_positions(&meta.positions, rope.max_positions)?;
        if inputs.input_ids.len() != n || meta.slot_mapping.len() != n {
            return Err(Error::config(format!(
                "step has {n} positions, {} token ids and {} slots",
                inputs.input_ids.len(),
                meta.slot_mapping.len()
            )));
        }
        let (rows, width) = match pad {
            None => (n, meta.max_blocks_per_seq),
            Some((shape, _)) => {
                let one_each = meta.num_seqs() == n
                    && inputs.logits_rows.len() == n
                    && inputs.logits_rows.iter().enumerate().all(|(i, &r)| i == r);
                if !one_each || n > shape.tokens || meta.max_blocks_per_seq > shape.table_width {
                    return Err(Error::config(format!(
                        "a graph of {shape:?} takes decode steps of at most {} sequences of one token each, with block tables of at most {} blocks; this step has {n} tokens in {} sequences, {} logits rows and {} blocks per table",
                        shape.tokens,
                        shape.table_width,
                        meta.num_seqs(),
                        inputs.logits_rows.len(),
                        meta.max_blocks_per_seq
                    )));
                }
                (shape.tokens, shape.table_width)
            }
        };
        let as_i32 = |v: usize, what: &str| {
            i32::try_from(v)
                .map_err(|_| Error::config(format!("{what} {v} does not fit the kernels' i32")))
        };
        let mut v: Vec<i32> = Vec::with_capacity(7 * rows + rows * width + 8);
        let pad_to = |v: &mut Vec<i32>, start: usize, value: i32| v.resize(start + rows, value);
        let ids = v.len();
        v.extend(inputs.input_ids.iter().map(|&t| t as i32));
        pad_to(&mut v, ids, 0);
        let positions = v.len();
        v.extend(meta.positions.iter().map(|&p| p as i32));
        pad_to(&mut v, positions, 0);
        let slots = v.len();
        for &s in &meta.slot_mapping {
            v.push(as_i32(s, "KV slot")?);
        }
        pad_to(&mut v, slots, -1);
        let tok_seq = v.len();
        let tok_nkeys = tok_seq + rows;
        let tok_splits = tok_nkeys + rows;
        v.resize(tok_splits + rows, 1);
        let mut max_splits = 1;
        for s in 0..meta.num_seqs() {
            let (q0, q1) = (meta.query_start_loc[s], meta.query_start_loc[s + 1]);
            for t in q0..q1 {
                v[tok_seq + t] = s as i32;
                // Causal: token t sees the keys up to its own position.
                let n_keys = meta.seq_lens[s] - (q1 - t) + 1;
                v[tok_nkeys + t] = n_keys as i32;
                // Decode tokens split long contexts over several blocks; the
                // choice depends on this sequence alone (batch invariance).
                let splits = if q1 - q0 == 1 {
                    n_keys.div_ceil(self.split_keys()).max(1)
                } else {
                    1
                };
                v[tok_splits + t] = splits as i32;
                max_splits = max_splits.max(splits);
            }
        }
        // Pad rows are sequences of their own (their table rows are zeros).
        for t in n..rows {
            v[tok_seq + t] = t as i32;
        }
        let tables = v.len();
        if width == meta.max_blocks_per_seq {
            v.extend(meta.block_tables.iter().map(|&b| b as i32));
        } else {
            for table in meta.block_tables.chunks(meta.max_blocks_per_seq.max(1)) {
                let start = v.len();
                v.extend(table.iter().map(|&b| b as i32));
                v.resize(start + width, 0);
            }
        }
        v.resize(tables + rows * width, 0);
        let logits = v.len();
        for &r in inputs.logits_rows {
            v.push(as_i32(r, "logits row")?);
        }
        let num_logits_rows = match pad {
            None => inputs.logits_rows.len(),
            Some((_, splits)) => {
                // The graph's grid covers the most splits its width allows.
                max_splits = splits;
                v.extend((n..rows).map(|r| r as i32));
                rows
            }
        };
        Ok((
            v,
            CudaStep {
                buf: StepBuf::Graph(0),
                num_tokens: rows,
                max_blocks: width,
                num_logits_rows,
                ids,
                positions,
                slots,
                tok_seq,
                tok_nkeys,
                tok_splits,
                max_splits,
                tables,
                rows: logits,
            },
        ))
    }
}

impl CudaKvCache {
    fn planes(&self, layer: usize, s: &CudaStream) -> (u64, u64) {
        let base = addr(&self.buf, s) + (2 * layer * self.plane_bytes) as u64;
        (base, base + self.plane_bytes as u64)
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}

impl CudaBackend {
    /// `n` elements of the compute dtype at `ptr`, as host f32 (widened on
    /// the device, so only f32 crosses).
    fn download_f32(&self, ptr: u64, n: usize) -> Result<Vec<f32>> {
        let s = self.stream();
        // SAFETY: the kernel writes all n elements.
        let f = unsafe { s.alloc::<f32>(n.max(1)) }.map_err(|e| Error::cuda("cuMemAlloc", e))?;
        let (fp, nn) = (addr(&f, s), n as i64);
        self.launch(
            &self.k().to_float,
            Self::grid_1d(n),
            256,
            0,
            &mut kargs![ptr, fp, nn],
            "to_float",
        )?;
        self.busy().results_read(s)?;
        let mut host = vec![0f32; n];
        s.memcpy_dtoh(&f.slice(..n), &mut host[..])
            .map_err(|e| Error::cuda("cuMemcpyDtoH", e))?;
        self.synchronize()?;
        Ok(host)
    }

    /// A linear layer's weight [out, in] (its parts stacked) as host f32:
    /// what the GEMMs read, for checks against the host's values.
    pub fn linear_weight_to_host(&self, l: &CudaLinear) -> Result<Vec<f32>> {
        self.download_f32(addr(&l.w, self.stream()), l.out * l.inp)
    }

    /// An embedding table [rows, hidden] as host f32, as `linear_weight_to_host`.
    pub fn embedding_to_host(&self, e: &CudaEmbedding) -> Result<Vec<f32>> {
        self.download_f32(addr(&e.table, self.stream()), e.rows * e.hidden)
    }

    /// An activation from host f32 rows (rounded to the dtype).
    pub fn upload_tensor(&self, v: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        if v.len() != rows * cols {
            return Err(Error::config(format!(
                "{} values for a [{rows}, {cols}] tensor",
                v.len()
            )));
        }
        Ok(CudaTensor {
            buf: self.upload_f32(v)?,
            rows,
            cols,
        })
    }
}

/// Device-to-device copy bandwidth in bytes per second (bytes read plus
/// bytes written), the ceiling a decode step's weight reads are measured
/// against: the median of 20 copies of `bytes` after a warm-up.
pub fn measure_copy_bandwidth(b: &CudaBackend, bytes: usize) -> Result<f64> {
    let s = b.stream();
    let src = unsafe { s.alloc::<u8>(bytes) }.map_err(|e| Error::cuda("cuMemAlloc", e))?;
    let mut dst = unsafe { s.alloc::<u8>(bytes) }.map_err(|e| Error::cuda("cuMemAlloc", e))?;
    s.memset_zeros(&mut dst)
        .map_err(|e| Error::cuda("cuMemsetD8", e))?;
    let mut times = Vec::new();
    for i in 0..23 {
        b.synchronize()?;
        let t = std::time::Instant::now();
        s.memcpy_dtod(&src, &mut dst)
            .map_err(|e| Error::cuda("cuMemcpyDtoD", e))?;
        b.synchronize()?;
        if i >= 3 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * bytes as f64 / times[times.len() / 2])
}

#[cfg(test)]
mod kernel_choice_tests {
    use super::*;

    #[test]
    fn disabled_kernels_fall_back_and_contradictions_are_errors() {
        let none = DisabledKernels::default();
        let all = DisabledKernels::parse("paged_attention_lanes,gemv_rows,sample_rows").0;
        let c = KernelChoice::choose(Some("lanes"), None, Some("gemv"), &none).unwrap();
        assert_eq!(
            (c.attention, c.small_batch_linear, c.device_sampling),
            (AttentionKernel::Lanes, LinearKernel::Gemv, true)
        );
        // Disabled and not selected: the fallbacks.
        let c = KernelChoice::choose(None, None, Some("blas"), &all).unwrap();
        assert_eq!(
            c,
            KernelChoice {
                attention: AttentionKernel::Tiled,
                small_batch_linear: LinearKernel::Blas,
                device_sampling: false,
            }
        );
        // Nothing set: lanes attention and cuBLAS; TILED asks for tiled.
        assert_eq!(
            KernelChoice::choose(None, None, None, &none).unwrap(),
            KernelChoice::default()
        );
        assert_eq!(KernelChoice::default().attention, AttentionKernel::Lanes);
        let c = KernelChoice::choose(None, Some("TILED"), None, &none).unwrap();
        assert_eq!(c.attention, AttentionKernel::Tiled);
        let e = KernelChoice::choose(Some("lanes"), None, None, &all)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("FLOTILLA_CUDA_ATTENTION=lanes") && e.contains("VLLM_DISABLED_KERNELS"),
            "{e}"
        );
        let e = KernelChoice::choose(None, None, Some("gemv"), &all)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gemv_rows"), "{e}");
        assert!(KernelChoice::choose(Some("fast"), None, None, &none).is_err());
        // VLLM_ATTENTION_BACKEND=LANES picks lanes unless Flotilla's variable is set.
        let c = KernelChoice::choose(None, Some("LANES"), None, &none).unwrap();
        assert_eq!(c.attention, AttentionKernel::Lanes);
        let c = KernelChoice::choose(Some("tiled"), Some("LANES"), None, &none).unwrap();
        assert_eq!(c.attention, AttentionKernel::Tiled);
        let e = KernelChoice::choose(None, Some("LANES"), None, &all)
            .unwrap_err()
            .to_string();
        assert!(e.contains("VLLM_ATTENTION_BACKEND=LANES"), "{e}");
    }
}
