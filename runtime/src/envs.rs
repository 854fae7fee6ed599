//! Every `VLLM_*` (and `FLOTILLA_*`) environment variable Flotilla honours,
//! declared once with its default and doc. `gateway env` prints this table;
//! code reads variables only through the accessors here so the list stays true.

use std::str::FromStr;

/// One environment variable Flotilla reads.
#[derive(Debug, Clone, Copy)]
pub struct EnvVar {
    pub name: &'static str,
    /// The value used when the variable is unset, as text ("" = none).
    pub default: &'static str,
    pub doc: &'static str,
}

macro_rules! env_vars {
    ($($ident:ident = $name:literal, $default:literal, $doc:literal;)*) => {
        $(pub const $ident: EnvVar = EnvVar { name: $name, default: $default, doc: $doc };)*
        /// All variables, in declaration order.
        pub const ALL: &[EnvVar] = &[$($ident),*];
    };
}

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
    FLOTILLA_WORKER_BIN = "FLOTILLA_WORKER_BIN", "",
        "Path of the `worker` binary the mp executor starts; default: next to the running executable.";
    VLLM_CUDART_SO_PATH = "VLLM_CUDART_SO_PATH", "",
        "Path of libcudart. Flotilla's CUDA backend uses the driver API (libcuda, found by the loader and LD_LIBRARY_PATH), never libcudart; setting it has no effect and says so.";
    VLLM_NCCL_SO_PATH = "VLLM_NCCL_SO_PATH", "",
        "Path of libnccl for GPU collectives. Not used yet (tensor parallel on CUDA is not available); setting it logs a warning.";
    OPENAI_API_KEY = "OPENAI_API_KEY", "",
        "API key the client commands (`gateway chat`, `complete`, `bench serve`) send when --api-key is not given.";
}

/// Flotilla's cache directory: `$FLOTILLA_CACHE_ROOT`, else
/// `$VLLM_CACHE_ROOT`, else `~/.cache/flotilla`; `None` without any of them.
pub fn cache_root() -> Option<std::path::PathBuf> {
    raw(FLOTILLA_CACHE_ROOT)
        .or_else(|| raw(VLLM_CACHE_ROOT))
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/flotilla"))
        })
}

/// The raw value: the environment's, else the default; `None` when both are empty.
pub fn raw(var: EnvVar) -> Option<String> {
    match std::env::var(var.name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if !var.default.is_empty() => Some(var.default.to_string()),
        _ => None,
    }
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

/// Keys are shown as "(set)", never printed.
fn is_secret(v: &EnvVar) -> bool {
    [
        VLLM_API_KEY,
        OPENAI_API_KEY,
        FLOTILLA_CLUSTER_TOKEN,
        FLOTILLA_ETCD_PASSWORD,
    ]
    .iter()
    .any(|s| s.name == v.name)
}

/// The table `gateway env` prints: name, current value (or default), doc.
pub fn render_table() -> String {
    let mut out = String::new();
    for v in ALL {
        let current = std::env::var(v.name).ok();
        let shown = match (&current, v.default) {
            (Some(c), _) if is_secret(v) && !c.is_empty() => "(set)".to_string(),
            (Some(c), _) => c.clone(),
            (None, "") => "(unset)".to_string(),
            (None, d) => format!("{d} (default)"),
        };
        out.push_str(&format!("{:<32} {:<20} {}\n", v.name, shown, v.doc));
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
    fn defaults_parse() {
        assert_eq!(get::<f64>(VLLM_CPU_KVCACHE_SPACE).unwrap(), Some(4.0));
        assert!(raw(VLLM_LOGGING_PREFIX).is_none());
    }
}
