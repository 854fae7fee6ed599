//! Every `VLLM_*` (and `FLOTILLA_*`) environment variable Flotilla honours,
//! declared once with its default and doc. `gateway env` prints this table;
//! code reads variables only through the accessors here so the list stays true.

// The one place that reads the environment (clippy.toml forbids it elsewhere).
#![allow(clippy::disallowed_methods)]

use std::str::FromStr;

/// One environment variable Flotilla reads (or knows from vLLM).
#[derive(Debug, Clone, Copy)]
pub struct EnvVar {
    pub name: &'static str,
    /// The value used when the variable is unset, as text ("" = none).
    pub default: &'static str,
    pub doc: &'static str,
    pub handling: Handling,
}

/// What Flotilla does with a variable when it is set to something other
/// than its default. Nothing is silently ignored: a setting either has its
/// effect, or the process says so once at start (`check_startup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Read through this module's accessors; it has its effect.
    Honoured,
    /// Known from vLLM and harmless to ignore here (the reason is logged at
    /// DEBUG when set).
    Accepted(&'static str),
    /// Has no effect here: a warning at start, with the reason.
    Warn(&'static str),
    /// Ignoring it would give a wrong result: an error at start.
    Error(&'static str),
}

macro_rules! env_vars {
    ($($ident:ident = $name:literal, $default:literal, $(@$handling:expr,)? $doc:literal;)*) => {
        $(pub const $ident: EnvVar = EnvVar {
            name: $name,
            default: $default,
            doc: $doc,
            handling: env_vars!(@handling $($handling)?),
        };)*
        /// All variables, in declaration order.
        pub const ALL: &[EnvVar] = &[$($ident),*];
    };
    (@handling) => { Handling::Honoured };
    (@handling $h:expr) => { $h };
}

use Handling::{Accepted, Error as Fails, Warn};

/// vLLM options for kernels, model families and platforms Flotilla does not have.
const OTHER_PLATFORM: &str = "an option of vLLM kernels, model families or platforms Flotilla does not have; it has no effect";
const TELEMETRY: &str = "Flotilla never sends usage statistics";
const BUILD_TIME: &str = "a build-time setting of vLLM; it does not apply to Flotilla's binaries";

env_vars! {
    VLLM_API_KEY = "VLLM_API_KEY", "",
        "API key required in `Authorization: Bearer` on /v1 routes (same as --api-key).";
    VLLM_CPU_KVCACHE_SPACE = "VLLM_CPU_KVCACHE_SPACE", "4",
        "GiB of memory for the KV cache on the CPU backend.";
    VLLM_ALLOW_LONG_MAX_MODEL_LEN = "VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0",
        "Allow --max-model-len above the model's max_position_embeddings (1 to allow).";
    VLLM_LOG_STATS_INTERVAL = "VLLM_LOG_STATS_INTERVAL", "10",
        "Seconds between the engine's throughput/KV-cache stats log lines.";
    VLLM_CONFIGURE_LOGGING = "VLLM_CONFIGURE_LOGGING", "1",
        "Set to 0 to leave logging unconfigured (no vLLM-style log lines).";
    VLLM_LOGGING_LEVEL = "VLLM_LOGGING_LEVEL", "INFO",
        "Log level: DEBUG, INFO, WARNING, ERROR.";
    VLLM_LOGGING_PREFIX = "VLLM_LOGGING_PREFIX", "",
        "Text put before every log line.";
    VLLM_LOGGING_CONFIG_PATH = "VLLM_LOGGING_CONFIG_PATH", "",
        "JSON logging config file (vLLM's dictConfig shape; level and format are honoured).";
    VLLM_HOST_IP = "VLLM_HOST_IP", "",
        "IP address of this node for the cluster (orchestrator); picked automatically when unset.";
    FLOTILLA_CACHE_ROOT = "FLOTILLA_CACHE_ROOT", "",
        "Directory for cluster state files (head address, token, logs); default ~/.cache/flotilla.";
    FLOTILLA_CLUSTER_TOKEN = "FLOTILLA_CLUSTER_TOKEN", "",
        "Cluster token for orchestrator agents and clients (same as --token); default: the head's token file.";
    FLOTILLA_ETCD_USER = "FLOTILLA_ETCD_USER", "",
        "etcd user name for the orchestrator (same as --etcd-user).";
    FLOTILLA_ETCD_PASSWORD = "FLOTILLA_ETCD_PASSWORD", "",
        "etcd password for the orchestrator (same as --etcd-password).";
    VLLM_CACHE_ROOT = "VLLM_CACHE_ROOT", "",
        "Cache directory for compiled GPU kernels when FLOTILLA_CACHE_ROOT is unset (kernels go under <root>/kernels).";
    VLLM_DISABLE_COMPILE_CACHE = "VLLM_DISABLE_COMPILE_CACHE", "0",
        "1: compile the CUDA kernels at every start instead of reusing the on-disk cache.";
    FLOTILLA_CUDA_ATTENTION = "FLOTILLA_CUDA_ATTENTION", "lanes",
        "CUDA paged-attention kernel: `tiled` (keys staged through shared memory; any head size) or `lanes` (one lane per key, for head sizes 64/128/256 with up to 8 query heads per kv head; other shapes fall back to `tiled`). When unset, VLLM_ATTENTION_BACKEND=TILED or LANES chooses, else `lanes` (`tiled` where VLLM_DISABLED_KERNELS names paged_attention_lanes).";
    FLOTILLA_CUDA_SMALL_BATCH_LINEAR = "FLOTILLA_CUDA_SMALL_BATCH_LINEAR", "blas",
        "CUDA linear layers for batches of up to 8 rows: `blas` (cuBLAS) or `gemv` (Flotilla's weight-streaming kernel).";
    VLLM_PORT = "VLLM_PORT", "",
        "First internal port (collective rendezvous of worker ranks, pipeline links); further ones count up from it; ephemeral ports when unset.";
    VLLM_PP_LAYER_PARTITION = "VLLM_PP_LAYER_PARTITION", "",
        "Layers per pipeline stage, comma-separated (e.g. \"16,14\"); their count is --pipeline-parallel-size and their sum the model's layers. Unset: as even as possible.";
    VLLM_RPC_TIMEOUT = "VLLM_RPC_TIMEOUT", "10000",
        "Milliseconds an internal call (executor to worker, collective between ranks) may take before it is an error.";
    VLLM_ENGINE_ITERATION_TIMEOUT_S = "VLLM_ENGINE_ITERATION_TIMEOUT_S", "60",
        "Seconds one step on distributed workers may take before the executor counts its workers as lost.";
    FLOTILLA_ADDRESS = "FLOTILLA_ADDRESS", "",
        "Orchestrator head address(es) the gateway's ray executor uses (as RAY_ADDRESS); default: the head recorded under the cache root.";
    VLLM_RAY_PER_WORKER_GPUS = "VLLM_RAY_PER_WORKER_GPUS", "1.0",
        "GPUs per worker actor with --distributed-executor-backend ray on CUDA (fractions share a GPU).";
    VLLM_RAY_BUNDLE_INDICES = "VLLM_RAY_BUNDLE_INDICES", "",
        "Comma-separated placement-group bundle index for each rank (ray executor); default: driver node first, then by node IP.";
    FLOTILLA_CHURN_SECS = "FLOTILLA_CHURN_SECS", "",
        "Seconds the orchestrator's churn test (agents joining and leaving while placement groups come and go) runs; default 120, or 30 when CI is set.";
    CI = "CI", "",
        "Set by CI services (\"true\"): tests that scale with time run their short version.";
    FLOTILLA_WORKER_BIN = "FLOTILLA_WORKER_BIN", "",
        "Path of the `worker` binary the mp executor starts; default: next to the running executable.";
    FLOTILLA_ACTOR_ID = "FLOTILLA_ACTOR_ID", "",
        "Set by the node agent for an actor process: its actor id (as `orchestrator list actors` shows it).";
    FLOTILLA_ACTOR_INCARNATION = "FLOTILLA_ACTOR_INCARNATION", "",
        "Set by the node agent for an actor process: which (re)start of the actor this process is.";
    FLOTILLA_NODE_ID = "FLOTILLA_NODE_ID", "",
        "Set by the node agent for an actor process: the id of the node it runs on.";
    FLOTILLA_NODE_IP = "FLOTILLA_NODE_IP", "",
        "Set by the node agent for an actor process: the IP of the node it runs on.";
    FLOTILLA_PLACEMENT_GROUP_ID = "FLOTILLA_PLACEMENT_GROUP_ID", "",
        "Set by the node agent for an actor placed in a placement group bundle: the group's id (Ray's get_current_placement_group). A gateway inside a group runs its ray workers in that group's bundles instead of creating one, and defaults to the ray executor when its world size is above 1.";
    FLOTILLA_PLACEMENT_GROUP_BUNDLE_INDEX = "FLOTILLA_PLACEMENT_GROUP_BUNDLE_INDEX", "",
        "Set by the node agent for an actor placed in a placement group bundle: the bundle's index.";
    VLLM_CUDART_SO_PATH = "VLLM_CUDART_SO_PATH", "", @Warn("the CUDA backend uses the driver API (libcuda, found by the loader and LD_LIBRARY_PATH), never libcudart"),
        "Path of libcudart.";
    VLLM_NCCL_SO_PATH = "VLLM_NCCL_SO_PATH", "",
        "Path of libnccl for GPU collectives (tensor parallel on CUDA); default: libnccl.so from the library path. A worker given it runs with a folder holding libnccl.so -> this file first on LD_LIBRARY_PATH.";
    OPENAI_API_KEY = "OPENAI_API_KEY", "",
        "API key the client commands (`gateway chat`, `complete`, `bench serve`) send when --api-key is not given.";
    CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES", "",
        "GPUs this process may use; the mp executor gives each worker one of the gateway's, the node agent gives each actor its bundle's.";
    LOCAL_RANK = "LOCAL_RANK", "",
        "A worker's rank among the workers on its node (set by the executors).";
    RAYON_NUM_THREADS = "RAYON_NUM_THREADS", "",
        "Threads of the CPU backend; default: the cores, shared between the mp executor's ranks (one per rank in a ray CPU bundle).";

    // vLLM's other runtime variables (../shared/VLLM_ENV.md): each is
    // declared with what Flotilla does with it.
    VLLM_RPC_BASE_PATH = "VLLM_RPC_BASE_PATH", "", @Accepted("Flotilla's processes talk over TCP, never IPC sockets"),
        "Where vLLM puts IPC sockets.";
    VLLM_KEEP_ALIVE_ON_ENGINE_DEATH = "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "0", @Accepted("the gateway always stays up: /health answers 503 while its engine is down, and lost workers are replaced"),
        "Keep the API server up after the engine died (vLLM exits by default).";
    VLLM_LOG_BATCHSIZE_INTERVAL = "VLLM_LOG_BATCHSIZE_INTERVAL", "-1",
        "Seconds between the engine's \"Batchsize forward time stats (batchsize, count, median_time(ms))\" log lines (batch sizes in tokens since start, for picking CUDA graph sizes); negative: off.";
    VLLM_TRACE_FUNCTION = "VLLM_TRACE_FUNCTION", "0", @Warn("call tracing is a Python debugging aid; use VLLM_LOGGING_LEVEL=DEBUG"),
        "Trace every function call (vLLM debugging).";
    VLLM_CPU_OMP_THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND", "all",
        "CPU cores the CPU backend's threads bind to: a core list (\"0-31\", \"0,2,4-7\"; \"0-31|32-63\" gives one list per LOCAL_RANK) sets the thread count to the cores and pins one thread to each; \"all\" and \"nobind\" leave threads unpinned (RAYON_NUM_THREADS decides their count); \"auto\" (NUMA-aware) is not available and warns.";
    VLLM_TARGET_DEVICE = "VLLM_TARGET_DEVICE", "cuda", @Accepted("the device is chosen at run time with --device"),
        "vLLM's build-time device.";
    VLLM_ATTENTION_BACKEND = "VLLM_ATTENTION_BACKEND", "",
        "Force an attention implementation, by Flotilla's names: TILED or LANES (the CUDA kernels of FLOTILLA_CUDA_ATTENTION; the CPU backend has one kernel). Any other name (vLLM's FLASH_ATTN, FLASHINFER, ...) is an error at start.";
    VLLM_USE_FLASHINFER_SAMPLER = "VLLM_USE_FLASHINFER_SAMPLER", "", @Warn("Flotilla samples with its own kernels"),
        "Use FlashInfer's sampler.";
    VLLM_FLASH_ATTN_VERSION = "VLLM_FLASH_ATTN_VERSION", "", @Warn("Flotilla uses its own attention kernels"),
        "FlashAttention version.";
    VLLM_USE_TRITON_FLASH_ATTN = "VLLM_USE_TRITON_FLASH_ATTN", "True", @Warn("Flotilla uses its own attention kernels"),
        "Use Triton's flash attention (ROCm).";
    VLLM_FLASHINFER_FORCE_TENSOR_CORES = "VLLM_FLASHINFER_FORCE_TENSOR_CORES", "0", @Warn("Flotilla uses its own attention kernels"),
        "FlashInfer tensor-core decode.";
    VLLM_CUDA_MEM_ALIGN_KV_CACHE = "VLLM_CUDA_MEM_ALIGN_KV_CACHE", "1", @Warn("Flotilla's KV blocks are always allocated aligned; the setting has no effect"),
        "Align KV cache entries to 256 bytes.";
    VLLM_DISABLED_KERNELS = "VLLM_DISABLED_KERNELS", "",
        "Comma-separated Flotilla kernels not to use, each replaced by its alternative: paged_attention_lanes (tiled attention), gemv_rows (cuBLAS), sample_rows (host sampling), all CUDA. Selecting a disabled kernel with FLOTILLA_CUDA_* is an error; other names (vLLM's) are named in a warning.";
    VLLM_SKIP_P2P_CHECK = "VLLM_SKIP_P2P_CHECK", "0", @Accepted("Flotilla does not check GPU peer access; multi-GPU collectives are not available yet"),
        "Trust the driver's GPU peer-to-peer report.";
    VLLM_TORCH_PROFILER_DIR = "VLLM_TORCH_PROFILER_DIR", "",
        "Directory for engine traces: enables POST /start_profile and /stop_profile, which record every step's phases as Chrome-trace JSON (Perfetto).";
    VLLM_SERVER_DEV_MODE = "VLLM_SERVER_DEV_MODE", "0",
        "1: serve the development endpoints (POST /reset_prefix_cache).";
    VLLM_USE_RAY_SPMD_WORKER = "VLLM_USE_RAY_SPMD_WORKER", "0", @Accepted("every executor drives its workers with one step stream each"),
        "Ray SPMD worker mode.";
    VLLM_USE_RAY_COMPILED_DAG = "VLLM_USE_RAY_COMPILED_DAG", "0", @Accepted("the step stream is always the fast path"),
        "Ray compiled graphs.";
    VLLM_USE_RAY_COMPILED_DAG_NCCL_CHANNEL = "VLLM_USE_RAY_COMPILED_DAG_NCCL_CHANNEL", "1", @Accepted("the step stream is always the fast path"),
        "NCCL channels in Ray compiled graphs.";
    VLLM_USE_RAY_COMPILED_DAG_OVERLAP_COMM = "VLLM_USE_RAY_COMPILED_DAG_OVERLAP_COMM", "0", @Accepted("the step stream is always the fast path"),
        "Overlap communication in Ray compiled graphs.";
    VLLM_WORKER_MULTIPROC_METHOD = "VLLM_WORKER_MULTIPROC_METHOD", "fork", @Accepted("the mp executor starts worker processes by spawning the worker binary"),
        "How the mp executor starts workers.";
    VLLM_DP_RANK = "VLLM_DP_RANK", "0", @Fails("data-parallel replicas are not available in Flotilla yet"),
        "Data-parallel rank.";
    VLLM_DP_SIZE = "VLLM_DP_SIZE", "1", @Fails("data-parallel replicas are not available in Flotilla yet"),
        "Data-parallel size.";
    VLLM_DP_MASTER_IP = "VLLM_DP_MASTER_IP", "", @Fails("data-parallel replicas are not available in Flotilla yet"),
        "Data-parallel master IP.";
    VLLM_DP_MASTER_PORT = "VLLM_DP_MASTER_PORT", "0", @Fails("data-parallel replicas are not available in Flotilla yet"),
        "Data-parallel master port.";
    VLLM_USE_V1 = "VLLM_USE_V1", "1", @Accepted("Flotilla's engine is shaped as vLLM's V1"),
        "Use vLLM's V1 engine.";
    VLLM_ENABLE_V1_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING", "1", @Accepted("the engine loop runs on its own thread beside the server"),
        "Run V1's engine core in its own process.";
    VLLM_V1_OUTPUT_PROC_CHUNK_SIZE = "VLLM_V1_OUTPUT_PROC_CHUNK_SIZE", "128",
        "Outputs the engine sends to their request streams per chunk; it yields the CPU between chunks (split as vLLM does: ceil(n / size) near-equal chunks).";
    VLLM_USE_MODELSCOPE = "VLLM_USE_MODELSCOPE", "False", @Fails("Flotilla loads models from local paths only (no hub downloads)"),
        "Load models from ModelScope.";
    VLLM_NO_USAGE_STATS = "VLLM_NO_USAGE_STATS", "0", @Accepted(TELEMETRY),
        "Disable usage statistics.";
    VLLM_DO_NOT_TRACK = "VLLM_DO_NOT_TRACK", "", @Accepted(TELEMETRY),
        "Disable usage statistics.";
    VLLM_USAGE_SOURCE = "VLLM_USAGE_SOURCE", "production", @Accepted(TELEMETRY),
        "Usage statistics source tag.";
    VLLM_USAGE_STATS_SERVER = "VLLM_USAGE_STATS_SERVER", "", @Accepted(TELEMETRY),
        "Usage statistics server.";
    VLLM_NO_DEPRECATION_WARNING = "VLLM_NO_DEPRECATION_WARNING", "0",
        "1: silence the warnings about deprecated vLLM options (--task, --override-pooler-config).";
    VLLM_ALLOW_RUNTIME_LORA_UPDATING = "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0", @Fails("LoRA adapters are not available in Flotilla yet"),
        "Enable the LoRA load/unload endpoints.";
    VLLM_IMAGE_FETCH_TIMEOUT = "VLLM_IMAGE_FETCH_TIMEOUT", "5", @Accepted("multimodal inputs are refused until they are supported"),
        "Seconds to fetch an image input.";
    VLLM_VIDEO_FETCH_TIMEOUT = "VLLM_VIDEO_FETCH_TIMEOUT", "30", @Accepted("multimodal inputs are refused until they are supported"),
        "Seconds to fetch a video input.";
    VLLM_AUDIO_FETCH_TIMEOUT = "VLLM_AUDIO_FETCH_TIMEOUT", "10", @Accepted("multimodal inputs are refused until they are supported"),
        "Seconds to fetch an audio input.";
    VLLM_MM_INPUT_CACHE_SIZE = "VLLM_MM_INPUT_CACHE_SIZE", "256", @Accepted("multimodal inputs are refused until they are supported"),
        "Multimodal input cache entries.";
    VLLM_PLUGINS = "VLLM_PLUGINS", "", @Warn("Flotilla loads no plugins"),
        "Plugins to load.";
    VLLM_LOGITS_PROCESSOR_THREADS = "VLLM_LOGITS_PROCESSOR_THREADS", "0",
        "Threads of a pool of their own that computes the structured-output token masks of a step; 0: rayon's global pool (shared with the CPU backend).";
    VLLM_RINGBUFFER_WARNING_INTERVAL = "VLLM_RINGBUFFER_WARNING_INTERVAL", "60", @Accepted("Flotilla has no shared-memory queue"),
        "Seconds between warnings about a full shared-memory queue.";
    VLLM_FUSED_MOE_CHUNK_SIZE = "VLLM_FUSED_MOE_CHUNK_SIZE", "32768", @Warn(OTHER_PLATFORM),
        "Fused MoE chunk size.";
    VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON = "VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON", "0", @Warn(OTHER_PLATFORM),
        "Triton MoE alignment kernel.";
    VLLM_MLA_DISABLE = "VLLM_MLA_DISABLE", "0", @Warn(OTHER_PLATFORM),
        "Disable MLA attention.";
    VLLM_MLA_DISABLE_REQUANTIZATION = "VLLM_MLA_DISABLE_REQUANTIZATION", "0", @Warn(OTHER_PLATFORM),
        "MLA requantization.";
    VLLM_MLA_PERFORM_MATRIX_ABSORPTION = "VLLM_MLA_PERFORM_MATRIX_ABSORPTION", "1", @Warn(OTHER_PLATFORM),
        "MLA matrix absorption.";
    VLLM_ROCM_FP8_PADDING = "VLLM_ROCM_FP8_PADDING", "1", @Warn(OTHER_PLATFORM),
        "ROCm FP8 weight padding.";
    VLLM_OPENVINO_DEVICE = "VLLM_OPENVINO_DEVICE", "CPU", @Warn(OTHER_PLATFORM),
        "OpenVINO device.";
    VLLM_OPENVINO_KVCACHE_SPACE = "VLLM_OPENVINO_KVCACHE_SPACE", "0", @Warn(OTHER_PLATFORM),
        "OpenVINO KV cache GiB.";
    VLLM_OPENVINO_CPU_KV_CACHE_PRECISION = "VLLM_OPENVINO_CPU_KV_CACHE_PRECISION", "", @Warn(OTHER_PLATFORM),
        "OpenVINO KV cache precision.";
    VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS = "VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS", "0", @Warn(OTHER_PLATFORM),
        "OpenVINO quantized weights.";
    VLLM_USE_TRITON_AWQ = "VLLM_USE_TRITON_AWQ", "0", @Warn(OTHER_PLATFORM),
        "Triton AWQ kernels.";
    VLLM_CONTIGUOUS_PA = "VLLM_CONTIGUOUS_PA", "1", @Warn(OTHER_PLATFORM),
        "Contiguous paged attention (HPU).";
    VLLM_TEST_DYNAMO_FULLGRAPH_CAPTURE = "VLLM_TEST_DYNAMO_FULLGRAPH_CAPTURE", "1", @Warn(OTHER_PLATFORM),
        "vLLM test option.";
    VLLM_TEST_FORCE_FP8_MARLIN = "VLLM_TEST_FORCE_FP8_MARLIN", "0", @Warn(OTHER_PLATFORM),
        "vLLM test option.";
    VLLM_TEST_FORCE_LOAD_FORMAT = "VLLM_TEST_FORCE_LOAD_FORMAT", "dummy", @Warn("use --load-format"),
        "vLLM test option: force a load format.";
    VLLM_CI_USE_S3 = "VLLM_CI_USE_S3", "0", @Warn(OTHER_PLATFORM),
        "vLLM CI option.";
    K_SCALE_CONSTANT = "K_SCALE_CONSTANT", "200", @Warn(OTHER_PLATFORM),
        "FP8 KV cache K scale.";
    V_SCALE_CONSTANT = "V_SCALE_CONSTANT", "100", @Warn(OTHER_PLATFORM),
        "FP8 KV cache V scale.";
    S3_ACCESS_KEY_ID = "S3_ACCESS_KEY_ID", "", @Warn("Flotilla loads models from local paths only"),
        "S3 model loading.";
    S3_SECRET_ACCESS_KEY = "S3_SECRET_ACCESS_KEY", "", @Warn("Flotilla loads models from local paths only"),
        "S3 model loading.";
    S3_ENDPOINT_URL = "S3_ENDPOINT_URL", "", @Warn("Flotilla loads models from local paths only"),
        "S3 model loading.";
    NCCL_CUMEM_ENABLE = "NCCL_CUMEM_ENABLE", "", @Accepted("NCCL is not used yet (tensor parallel on CUDA is not available)"),
        "NCCL's cuMem allocations.";
    VLLM_CONFIG_ROOT = "VLLM_CONFIG_ROOT", "", @Accepted("Flotilla keeps no configuration directory; settings come from flags and --config files"),
        "vLLM's configuration directory.";
    VLLM_ASSETS_CACHE = "VLLM_ASSETS_CACHE", "", @Accepted("Flotilla downloads no assets"),
        "vLLM's downloaded-assets cache.";
    MAX_JOBS = "MAX_JOBS", "", @Accepted(BUILD_TIME),
        "vLLM build: parallel compile jobs.";
    NVCC_THREADS = "NVCC_THREADS", "", @Accepted(BUILD_TIME),
        "vLLM build: nvcc threads.";
    VLLM_USE_PRECOMPILED = "VLLM_USE_PRECOMPILED", "", @Accepted(BUILD_TIME),
        "vLLM build: use precompiled kernels.";
    CMAKE_BUILD_TYPE = "CMAKE_BUILD_TYPE", "", @Accepted(BUILD_TIME),
        "vLLM build type.";
    VERBOSE = "VERBOSE", "", @Accepted(BUILD_TIME),
        "vLLM build verbosity.";
}

/// Flotilla's cache directory: `$FLOTILLA_CACHE_ROOT`, else
/// `$VLLM_CACHE_ROOT`, else `~/.cache/flotilla`; `None` without any of them.
pub fn cache_root() -> Option<std::path::PathBuf> {
    raw(FLOTILLA_CACHE_ROOT)
        .or_else(|| raw(VLLM_CACHE_ROOT))
        .map(std::path::PathBuf::from)
        .or_else(|| home_dir().map(|h| h.join(".cache/flotilla")))
}

/// The process's own variables (PATH, HOME, LANG, …) that are not
/// Flotilla settings: what a spawned worker inherits, where home is.
pub fn process_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// `$HOME`, when set.
pub fn home_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("HOME").map(std::path::PathBuf::from)
}

/// The raw value: the environment's, else the default; `None` when both are empty.
pub fn raw(var: EnvVar) -> Option<String> {
    match std::env::var(var.name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if !var.default.is_empty() => Some(var.default.to_string()),
        _ => None,
    }
}

/// The environment's own value (non-empty), ignoring the default: whether
/// the user set the variable.
pub fn set_value(var: EnvVar) -> Option<String> {
    std::env::var(var.name).ok().filter(|v| !v.is_empty())
}

/// Parses the variable, naming it in the error.
pub fn get<T: FromStr>(var: EnvVar) -> Result<Option<T>, EnvError> {
    raw(var)
        .map(|v| {
            v.trim().parse::<T>().map_err(|_| EnvError {
                name: var.name,
                value: v.clone(),
                expected: std::any::type_name::<T>(),
            })
        })
        .transpose()
}

/// Boolean as vLLM reads them: "1"/"true" (any case) is true.
pub fn flag(var: EnvVar) -> bool {
    raw(var).is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true"))
}

#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}={value:?} is not a valid {expected}")]
pub struct EnvError {
    pub name: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// The KV cache size on CPU in bytes, from `VLLM_CPU_KVCACHE_SPACE` (GiB).
pub fn cpu_kvcache_space_bytes() -> Result<usize, EnvError> {
    let gib: f64 = get(VLLM_CPU_KVCACHE_SPACE)?.unwrap_or(4.0);
    if gib.is_nan() || gib <= 0.0 {
        return Err(EnvError {
            name: VLLM_CPU_KVCACHE_SPACE.name,
            value: gib.to_string(),
            expected: "positive number of GiB",
        });
    }
    Ok((gib * (1u64 << 30) as f64) as usize)
}

/// What `VLLM_CPU_OMP_THREADS_BIND` asks of this process's CPU threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuThreadsBind {
    /// "all" / "nobind": threads are not pinned.
    Unbound,
    /// "auto": vLLM binds each rank to a NUMA node; Flotilla cannot yet.
    Auto,
    /// One thread per core, pinned to it, in this order.
    Cores(Vec<usize>),
}

/// Parses `VLLM_CPU_OMP_THREADS_BIND`'s value for the worker of local
/// rank `rank`: a `|`-separated list holds one core list per rank.
pub fn parse_cpu_threads_bind(value: &str, rank: usize) -> Result<CpuThreadsBind, EnvError> {
    let bad = |expected: &'static str| EnvError {
        name: VLLM_CPU_OMP_THREADS_BIND.name,
        value: value.to_string(),
        expected,
    };
    match value.trim() {
        "" | "all" | "nobind" => return Ok(CpuThreadsBind::Unbound),
        "auto" => return Ok(CpuThreadsBind::Auto),
        _ => {}
    }
    let lists: Vec<&str> = value.trim().split('|').collect();
    let list = match lists.as_slice() {
        [one] => *one,
        many => *many
            .get(rank)
            .ok_or_else(|| bad("core list per rank, with a list for this worker's LOCAL_RANK"))?,
    };
    const LIST: &str =
        "core list (\"all\", \"auto\", \"nobind\", or cores like \"0-31\" or \"0,2,4-7\", \"|\" between ranks)";
    let mut cores = Vec::new();
    for part in list.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.trim(), hi.trim()),
            None => (part, part),
        };
        let (lo, hi): (usize, usize) = match (lo.parse(), hi.parse()) {
            (Ok(lo), Ok(hi)) if lo <= hi => (lo, hi),
            _ => return Err(bad(LIST)),
        };
        for c in lo..=hi {
            if cores.contains(&c) {
                return Err(bad("core list naming each core once"));
            }
            cores.push(c);
        }
    }
    Ok(CpuThreadsBind::Cores(cores))
}

/// `VLLM_CPU_OMP_THREADS_BIND` for this process, whose rank is `LOCAL_RANK` (0 when unset).
pub fn cpu_threads_bind() -> Result<CpuThreadsBind, EnvError> {
    let rank: usize = get(LOCAL_RANK)?.unwrap_or(0);
    parse_cpu_threads_bind(&raw(VLLM_CPU_OMP_THREADS_BIND).unwrap_or_default(), rank)
}

/// `VLLM_RPC_TIMEOUT` as a duration (milliseconds in the variable).
pub fn rpc_timeout() -> Result<std::time::Duration, EnvError> {
    let ms: u64 = get(VLLM_RPC_TIMEOUT)?.unwrap_or(10_000);
    if ms == 0 {
        return Err(EnvError {
            name: VLLM_RPC_TIMEOUT.name,
            value: "0".into(),
            expected: "positive number of milliseconds",
        });
    }
    Ok(std::time::Duration::from_millis(ms))
}

/// Whether `value` means the same as the variable's default: equal text
/// (any case), or the same number or truth value ("0" = "false" = "False").
fn is_default_value(var: &EnvVar, value: &str) -> bool {
    let (v, d) = (value.trim(), var.default);
    if v.eq_ignore_ascii_case(d) {
        return true;
    }
    let truth = |s: &str| match s.to_ascii_lowercase().as_str() {
        "0" | "false" | "no" | "off" => Some(false),
        "1" | "true" | "yes" | "on" => Some(true),
        _ => None,
    };
    if let (Some(a), Some(b)) = (truth(v), truth(d)) {
        return a == b;
    }
    if let (Ok(a), Ok(b)) = (v.parse::<f64>(), d.parse::<f64>()) {
        return a == b;
    }
    // An empty default is "off": setting a falsy value keeps it off.
    d.is_empty() && truth(v) == Some(false)
}

/// What one process start has to say about the environment.
#[derive(Debug, Default, PartialEq)]
pub struct StartupReport {
    /// One line per variable set to a value that has no effect here.
    pub warnings: Vec<String>,
    /// One line per variable whose setting would give a wrong result.
    pub errors: Vec<String>,
    /// Known from vLLM and harmlessly ignored.
    pub accepted: Vec<String>,
}

/// Checks every declared variable against `lookup` (the environment, in
/// `check_startup`): vLLM settings Flotilla cannot honour are reported by
/// name, never silently ignored.
pub fn startup_report(lookup: impl Fn(&str) -> Option<String>) -> StartupReport {
    let mut r = StartupReport::default();
    for var in ALL {
        let Some(value) = lookup(var.name).filter(|v| !v.trim().is_empty()) else {
            continue;
        };
        if is_default_value(var, &value) {
            continue;
        }
        let shown = if is_secret(var) {
            "(set)"
        } else {
            value.as_str()
        };
        match var.handling {
            Handling::Honoured if var.name == VLLM_ATTENTION_BACKEND.name => {
                if let Err(e) = attention_backend_of(&value) {
                    r.errors.push(e);
                }
            }
            Handling::Honoured => {}
            Handling::Accepted(why) => r.accepted.push(format!("{}={shown}: {why}", var.name)),
            Handling::Warn(why) => r
                .warnings
                .push(format!("{}={shown} is ignored: {why}", var.name)),
            Handling::Error(why) => r
                .errors
                .push(format!("{}={shown}: {why}; unset it", var.name)),
        }
    }
    r
}

/// Flotilla's attention kernels by `VLLM_ATTENTION_BACKEND`'s names.
pub const ATTENTION_BACKENDS: &[&str] = &["TILED", "LANES"];

/// The kernel `VLLM_ATTENTION_BACKEND` names (upper case), or the error
/// line for a name that is not Flotilla's.
fn attention_backend_of(value: &str) -> Result<&'static str, String> {
    let v = value.trim().to_ascii_uppercase();
    ATTENTION_BACKENDS
        .iter()
        .find(|b| **b == v)
        .copied()
        .ok_or_else(|| {
            format!(
                "VLLM_ATTENTION_BACKEND={value}: not one of Flotilla's attention kernels ({}); unset it",
                ATTENTION_BACKENDS.join(", ")
            )
        })
}

/// `VLLM_ATTENTION_BACKEND`: the attention kernel it forces, if set
/// (`TILED` or `LANES`), or an error naming the variable.
pub fn attention_backend() -> Result<Option<&'static str>, EnvError> {
    raw(VLLM_ATTENTION_BACKEND)
        .map(|v| {
            attention_backend_of(&v).map_err(|_| EnvError {
                name: VLLM_ATTENTION_BACKEND.name,
                value: v.clone(),
                expected: "TILED or LANES",
            })
        })
        .transpose()
}

/// Whether deprecation warnings are wanted (`VLLM_NO_DEPRECATION_WARNING`).
pub fn deprecation_warnings() -> bool {
    !flag(VLLM_NO_DEPRECATION_WARNING)
}

/// Logs a warning for each variable set to no effect and fails on those
/// that would give a wrong result. Whatever runs a model calls it before
/// loading one (the engine, each worker); the orchestrator runs no model.
pub fn check_startup() -> Result<(), StartupError> {
    let r = startup_report(|name| std::env::var(name).ok());
    for line in &r.accepted {
        tracing::debug!("{line}");
    }
    for line in &r.warnings {
        tracing::warn!("{line}");
    }
    if r.errors.is_empty() {
        Ok(())
    } else {
        Err(StartupError {
            lines: r.errors.join("; "),
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("environment: {lines}")]
pub struct StartupError {
    pub lines: String,
}

/// Keys are shown as "(set)", never printed.
fn is_secret(v: &EnvVar) -> bool {
    [
        VLLM_API_KEY,
        OPENAI_API_KEY,
        FLOTILLA_CLUSTER_TOKEN,
        FLOTILLA_ETCD_PASSWORD,
        S3_ACCESS_KEY_ID,
        S3_SECRET_ACCESS_KEY,
    ]
    .iter()
    .any(|s| s.name == v.name)
}

/// The table `gateway env` prints: name, current value (or default), doc;
/// the variables Flotilla honours first, then vLLM's others with what
/// Flotilla does with each.
pub fn render_table() -> String {
    let mut out = String::from("Honoured:\n");
    let (honoured, others): (Vec<&EnvVar>, Vec<&EnvVar>) =
        ALL.iter().partition(|v| v.handling == Handling::Honoured);
    let mut heading_done = false;
    for v in honoured.into_iter().chain(others) {
        if v.handling != Handling::Honoured && !heading_done {
            out.push_str("\nKnown from vLLM, with what Flotilla does when they are set:\n");
            heading_done = true;
        }
        let current = std::env::var(v.name).ok();
        let shown = match (&current, v.default) {
            (Some(c), _) if is_secret(v) && !c.is_empty() => "(set)".to_string(),
            (Some(c), _) => c.clone(),
            (None, "") => "(unset)".to_string(),
            (None, d) => format!("{d} (default)"),
        };
        let note = match v.handling {
            Handling::Honoured => String::new(),
            Handling::Accepted(why) => format!(" [accepted: {why}]"),
            Handling::Warn(why) => format!(" [ignored with a warning: {why}]"),
            Handling::Error(why) => format!(" [an error when set: {why}]"),
        };
        out.push_str(&format!("{:<32} {:<20} {}{note}\n", v.name, shown, v.doc));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_documented() {
        let mut names: Vec<_> = ALL.iter().map(|v| v.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        assert!(ALL.iter().all(|v| !v.doc.is_empty()));
    }

    #[test]
    fn vllm_settings_we_cannot_honour_are_named() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        // Defaults, however spelled, say nothing.
        let quiet = startup_report(env(&[
            ("VLLM_USE_MODELSCOPE", "false"),
            ("VLLM_DP_SIZE", "1"),
            ("VLLM_CUDA_MEM_ALIGN_KV_CACHE", "1"),
            ("VLLM_USE_TRITON_FLASH_ATTN", "true"),
            ("VLLM_API_KEY", "secret"),
        ]));
        assert_eq!(quiet, StartupReport::default());
        let r = startup_report(env(&[
            ("VLLM_USE_MODELSCOPE", "True"),
            ("VLLM_DP_SIZE", "2"),
            ("VLLM_ATTENTION_BACKEND", "FLASHINFER"),
            ("VLLM_NO_USAGE_STATS", "1"),
        ]));
        assert_eq!(r.errors.len(), 3, "{r:?}");
        assert!(
            r.errors[0].starts_with("VLLM_ATTENTION_BACKEND=FLASHINFER: not one of Flotilla's attention kernels (TILED, LANES)"),
            "{r:?}"
        );
        assert!(
            r.errors[1].starts_with("VLLM_DP_SIZE=2: data-parallel"),
            "{r:?}"
        );
        assert!(r.errors[2].contains("VLLM_USE_MODELSCOPE=True"), "{r:?}");
        assert!(r.warnings.is_empty(), "{r:?}");
        assert_eq!(r.accepted.len(), 1);
        // Flotilla's own names, in any case, are honoured quietly.
        let ours = startup_report(env(&[("VLLM_ATTENTION_BACKEND", "lanes")]));
        assert_eq!(ours, StartupReport::default());
        assert_eq!(attention_backend_of(" Tiled "), Ok("TILED"));
    }

    #[test]
    fn every_vllm_variable_of_the_spec_is_declared() {
        // ../shared/VLLM_ENV.md's table, by name.
        for name in [
            "VLLM_HOST_IP",
            "VLLM_PORT",
            "VLLM_RPC_BASE_PATH",
            "VLLM_RPC_TIMEOUT",
            "VLLM_ENGINE_ITERATION_TIMEOUT_S",
            "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH",
            "VLLM_API_KEY",
            "VLLM_CONFIGURE_LOGGING",
            "VLLM_LOGGING_LEVEL",
            "VLLM_LOGGING_PREFIX",
            "VLLM_LOGGING_CONFIG_PATH",
            "VLLM_LOG_BATCHSIZE_INTERVAL",
            "VLLM_TRACE_FUNCTION",
            "VLLM_ALLOW_LONG_MAX_MODEL_LEN",
            "VLLM_CPU_KVCACHE_SPACE",
            "VLLM_CPU_OMP_THREADS_BIND",
            "VLLM_TARGET_DEVICE",
            "VLLM_ATTENTION_BACKEND",
            "VLLM_USE_FLASHINFER_SAMPLER",
            "VLLM_FLASH_ATTN_VERSION",
            "VLLM_USE_TRITON_FLASH_ATTN",
            "VLLM_FLASHINFER_FORCE_TENSOR_CORES",
            "VLLM_CUDART_SO_PATH",
            "VLLM_NCCL_SO_PATH",
            "VLLM_CUDA_MEM_ALIGN_KV_CACHE",
            "VLLM_DISABLED_KERNELS",
            "VLLM_SKIP_P2P_CHECK",
            "VLLM_TORCH_PROFILER_DIR",
            "VLLM_SERVER_DEV_MODE",
            "VLLM_PP_LAYER_PARTITION",
            "VLLM_RAY_PER_WORKER_GPUS",
            "VLLM_RAY_BUNDLE_INDICES",
            "VLLM_USE_RAY_SPMD_WORKER",
            "VLLM_USE_RAY_COMPILED_DAG",
            "VLLM_USE_RAY_COMPILED_DAG_NCCL_CHANNEL",
            "VLLM_USE_RAY_COMPILED_DAG_OVERLAP_COMM",
            "VLLM_WORKER_MULTIPROC_METHOD",
            "VLLM_DP_RANK",
            "VLLM_DP_SIZE",
            "VLLM_DP_MASTER_IP",
            "VLLM_DP_MASTER_PORT",
            "VLLM_USE_V1",
            "VLLM_ENABLE_V1_MULTIPROCESSING",
            "VLLM_V1_OUTPUT_PROC_CHUNK_SIZE",
            "VLLM_USE_MODELSCOPE",
            "VLLM_NO_USAGE_STATS",
            "VLLM_DO_NOT_TRACK",
            "VLLM_USAGE_SOURCE",
            "VLLM_USAGE_STATS_SERVER",
            "VLLM_NO_DEPRECATION_WARNING",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
            "VLLM_IMAGE_FETCH_TIMEOUT",
            "VLLM_VIDEO_FETCH_TIMEOUT",
            "VLLM_AUDIO_FETCH_TIMEOUT",
            "VLLM_MM_INPUT_CACHE_SIZE",
            "VLLM_PLUGINS",
            "VLLM_LOGITS_PROCESSOR_THREADS",
            "VLLM_RINGBUFFER_WARNING_INTERVAL",
            "VLLM_DISABLE_COMPILE_CACHE",
            "VLLM_FUSED_MOE_CHUNK_SIZE",
            "VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON",
            "VLLM_MLA_DISABLE",
            "VLLM_MLA_DISABLE_REQUANTIZATION",
            "VLLM_MLA_PERFORM_MATRIX_ABSORPTION",
            "VLLM_ROCM_FP8_PADDING",
            "VLLM_OPENVINO_DEVICE",
            "VLLM_OPENVINO_KVCACHE_SPACE",
            "VLLM_OPENVINO_CPU_KV_CACHE_PRECISION",
            "VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS",
            "VLLM_USE_TRITON_AWQ",
            "VLLM_CONTIGUOUS_PA",
            "VLLM_TEST_DYNAMO_FULLGRAPH_CAPTURE",
            "VLLM_TEST_FORCE_FP8_MARLIN",
            "VLLM_TEST_FORCE_LOAD_FORMAT",
            "VLLM_CI_USE_S3",
            "K_SCALE_CONSTANT",
            "V_SCALE_CONSTANT",
            "S3_ACCESS_KEY_ID",
            "S3_SECRET_ACCESS_KEY",
            "S3_ENDPOINT_URL",
            "CUDA_VISIBLE_DEVICES",
            "LOCAL_RANK",
            "NCCL_CUMEM_ENABLE",
            "MAX_JOBS",
            "NVCC_THREADS",
            "VLLM_USE_PRECOMPILED",
            "CMAKE_BUILD_TYPE",
            "VERBOSE",
            "VLLM_CONFIG_ROOT",
            "VLLM_CACHE_ROOT",
            "VLLM_ASSETS_CACHE",
        ] {
            assert!(ALL.iter().any(|v| v.name == name), "{name} is not declared");
        }
    }

    #[test]
    fn cpu_thread_binding_lists() {
        use CpuThreadsBind::*;
        let p = parse_cpu_threads_bind;
        assert_eq!(p("all", 0).unwrap(), Unbound);
        assert_eq!(p("nobind", 3).unwrap(), Unbound);
        assert_eq!(p("auto", 0).unwrap(), Auto);
        assert_eq!(p("0", 0).unwrap(), Cores(vec![0]));
        assert_eq!(p("0-2,5", 7).unwrap(), Cores(vec![0, 1, 2, 5]));
        assert_eq!(p("0-1|2-3", 0).unwrap(), Cores(vec![0, 1]));
        assert_eq!(p("0-1|2-3", 1).unwrap(), Cores(vec![2, 3]));
        for bad in ["3-1", "x", "0,,1", "0-1,1", "-2"] {
            let e = p(bad, 0).unwrap_err().to_string();
            assert!(
                e.starts_with("environment variable VLLM_CPU_OMP_THREADS_BIND="),
                "{e}"
            );
        }
        let e = p("0-1|2-3", 2).unwrap_err().to_string();
        assert!(e.contains("LOCAL_RANK"), "{e}");
    }

    #[test]
    fn defaults_parse() {
        assert_eq!(get::<f64>(VLLM_CPU_KVCACHE_SPACE).unwrap(), Some(4.0));
        assert!(raw(VLLM_LOGGING_PREFIX).is_none());
    }
}
