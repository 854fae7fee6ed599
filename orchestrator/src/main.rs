//! The `orchestrator` binary.

use clap::Parser;

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> orchestrator::Result<()> {
    let cli = orchestrator::cli::Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| orchestrator::Error::Other(format!("tokio runtime: {e}")))?;
    rt.block_on(orchestrator::commands::run(cli.cmd))
}
