//! What every Flotilla binary shares: one registry of the `VLLM_*` and
//! `FLOTILLA_*` environment variables (`envs`) and vLLM-shaped log lines
//! (`logging`), so the gateway, the orchestrator and the node agents read
//! the same variables the same way; and `--config FILE.yaml` (`config_file`),
//! read the same way by every binary.

pub mod config_file;
pub mod envs;
pub mod logging;
