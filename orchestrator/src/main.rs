//! The `orchestrator` binary.

fn main() {
    // Same variables and line shape as the gateway; stderr because stdout
    // carries command output such as `status`.
    if let Err(e) = runtime::logging::init_to(runtime::logging::LogOutput::Stderr) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> orchestrator::Result<()> {
    // With the settings of a `--config FILE` (`start` takes one).
    let cli: orchestrator::cli::Cli = runtime::config_file::parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(orchestrator::Error::os("tokio runtime"))?;
    rt.block_on(orchestrator::commands::run(cli.cmd))
}
