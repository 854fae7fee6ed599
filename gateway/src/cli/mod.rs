//! The `gateway` command line: `serve`, the `chat`/`complete` clients,
//! `bench` and `env`.

pub mod bench;
pub mod client;
pub mod error;
pub mod serve;
pub mod sse_client;

use clap::{Parser, Subcommand};

#[cfg(test)]
mod config_tests;

pub use error::{CliError, Result};

#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "Flotilla: vLLM's serving stack in Rust"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model with the OpenAI-compatible API.
    Serve(Box<serve::ServeArgs>),
    /// Chat with a running server.
    Chat(client::ChatArgs),
    /// Complete prompts with a running server.
    Complete(client::CompleteArgs),
    /// Benchmarks: serving latency against a server, or offline throughput.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// List the environment variables Flotilla honours.
    Env,
}

/// Parses the arguments (with those of a `--config FILE`), sets up logging
/// and runs the subcommand.
pub fn run() -> Result<()> {
    let cli: Cli = runtime::config_file::parse()?;
    crate::logging::init()?;
    if let Command::Env = cli.command {
        print!("{}", crate::envs::render_table());
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| CliError::Io {
            what: "start the async runtime".into(),
            source,
        })?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Chat(args) => client::chat(args).await,
            Command::Complete(args) => client::complete(args).await,
            Command::Bench(cmd) => bench::run(cmd).await,
            Command::Env => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_takes_model_positionally_or_by_flag() {
        let cli = Cli::try_parse_from(["gateway", "serve", "m.gguf", "--port", "9000"]).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(a.model_path().unwrap(), "m.gguf");
        assert_eq!(a.server.port, 9000);
        let cli = Cli::try_parse_from([
            "gateway",
            "serve",
            "--model",
            "d",
            "--served-model-name",
            "a",
            "b",
        ])
        .unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(a.model_path().unwrap(), "d");
        assert_eq!(a.server.served_model_name, vec!["a", "b"]);
        let cli = Cli::try_parse_from(["gateway", "serve"]).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("not serve")
        };
        assert!(a.model_path().is_err());
    }
}
