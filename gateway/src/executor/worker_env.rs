//! The environment a worker process gets, as vLLM's executors build it: the
//! gateway's `VLLM_*`, `FLOTILLA_*`, `HF_*` and `NCCL_*` variables, except the
//! node-specific ones the executor (or the node agent) sets per worker.

/// Copied to workers from the gateway's environment.
const PREFIXES: &[&str] = &["VLLM_", "FLOTILLA_", "HF_", "NCCL_"];

/// Node-specific: each worker gets its own (or its node's) value. The
/// actor identity a node agent gives a gateway that runs as an actor
/// describes the gateway, never its workers.
pub const NODE_SPECIFIC: &[&str] = &[
    "VLLM_HOST_IP",
    "CUDA_VISIBLE_DEVICES",
    "LOCAL_RANK",
    "FLOTILLA_ACTOR_ID",
    "FLOTILLA_ACTOR_INCARNATION",
    "FLOTILLA_NODE_ID",
    "FLOTILLA_NODE_IP",
    "FLOTILLA_PLACEMENT_GROUP_ID",
    "FLOTILLA_PLACEMENT_GROUP_BUNDLE_INDEX",
];

/// What any process needs to run at all; a local worker inherits them.
const PROCESS_BASICS: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "RAYON_NUM_THREADS",
];

fn copied(name: &str) -> bool {
    PREFIXES.iter().any(|p| name.starts_with(p)) && !NODE_SPECIFIC.contains(&name)
}

/// The `(name, value)` pairs copied from `vars` (the gateway's environment).
pub fn forwarded(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vars.into_iter().filter(|(k, _)| copied(k)).collect();
    out.sort();
    out
}

/// The basics a local worker inherits from the gateway's environment.
pub fn process_basics() -> Vec<(String, String)> {
    PROCESS_BASICS
        .iter()
        .filter_map(|k| runtime::envs::process_var(k).map(|v| (k.to_string(), v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_the_prefixes_but_not_node_specific_names() {
        let vars = [
            ("VLLM_RPC_TIMEOUT", "5"),
            ("VLLM_HOST_IP", "10.0.0.1"),
            ("CUDA_VISIBLE_DEVICES", "0"),
            ("LOCAL_RANK", "3"),
            ("HF_HOME", "/hf"),
            ("NCCL_DEBUG", "INFO"),
            ("FLOTILLA_CACHE_ROOT", "/c"),
            ("FLOTILLA_PLACEMENT_GROUP_ID", "pg_1"),
            ("FLOTILLA_ACTOR_ID", "actor_1"),
            ("SECRET", "x"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let names: Vec<String> = forwarded(vars).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            [
                "FLOTILLA_CACHE_ROOT",
                "HF_HOME",
                "NCCL_DEBUG",
                "VLLM_RPC_TIMEOUT"
            ]
        );
    }
}
