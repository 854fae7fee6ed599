//! `gateway bench`: `serve` (latency against a running server) and
//! `throughput` (offline, through the `LLM` API).

pub mod serve;
pub mod stats;
pub mod throughput;

use clap::Subcommand;

use super::error::{CliError, Result};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Serving latency (TTFT, ITL, E2E) and output tok/s against a running server.
    Serve(serve::ServeBenchArgs),
    /// Offline throughput through the in-process engine.
    Throughput(Box<throughput::ThroughputArgs>),
}

pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Serve(args) => serve::run(args).await,
        BenchCommand::Throughput(args) => throughput::run(*args).await,
    }
}

/// Writes a benchmark result file.
pub fn write_json<T: serde::Serialize>(path: &str, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Io {
        what: format!("encode {path}"),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path, text).map_err(|source| CliError::Io {
        what: format!("write {path}"),
        source,
    })
}
