//! The worker actor: one process per rank, serving the `Worker` gRPC service
//! (`worker::service`) until the executor shuts it down or goes away.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use proto::worker::worker_server::WorkerServer;
use worker::service::WorkerService;

/// A Flotilla worker actor (started by the gateway's executors).
#[derive(Parser, Debug)]
#[command(name = "worker", version)]
struct Args {
    /// Address to serve the Worker service on; port 0 picks a free one.
    /// The bound address is printed on stdout as
    /// `FLOTILLA_WORKER_LISTENING <addr>`.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
}

#[derive(Debug, thiserror::Error)]
enum WorkerMainError {
    #[error(transparent)]
    Logging(#[from] runtime::logging::LoggingError),
    #[error(transparent)]
    Environment(#[from] runtime::envs::StartupError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the Worker service stopped: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), WorkerMainError> {
    let args = Args::parse();
    runtime::logging::init()?;
    runtime::envs::check_startup()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(WorkerMainError::Runtime)?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> Result<(), WorkerMainError> {
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|source| WorkerMainError::Listen {
            addr: args.listen.clone(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| WorkerMainError::Listen {
            addr: args.listen.clone(),
            source,
        })?;
    // The executor reads this line to learn the port; flushed at once since
    // stdout is a pipe.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "FLOTILLA_WORKER_LISTENING {addr}");
    let _ = out.flush();
    drop(out);
    tracing::info!("Worker (pid {}) serving on {addr}", std::process::id());

    let shutdown = Arc::new(tokio::sync::Notify::new());
    let service = WorkerService::new(shutdown.clone());
    let incoming = futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            // Steps are small messages: no Nagle delay.
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    });
    tonic::transport::Server::builder()
        .add_service(WorkerServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move { shutdown.notified().await })
        .await?;
    tracing::info!("Worker stopped");
    Ok(())
}
