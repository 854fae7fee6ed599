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
    #[error(transparent)]
    CpuThreads(#[from] worker::cpu_threads::CpuThreadsError),
    #[error("VLLM_NCCL_SO_PATH={path}: {message}")]
    NcclPath { path: String, message: String },
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
    honour_nccl_so_path()?;
    // Before anything uses rayon: the global pool is built once.
    worker::cpu_threads::init_from_env()?;
    // Names that are not Flotilla kernels are warned about at start, on any device.
    worker::backend::disabled_kernels::DisabledKernels::from_env();
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

/// VLLM_NCCL_SO_PATH: NCCL is opened by name (`libnccl.so`) from the
/// library path, which the loader reads once when a process starts. A worker
/// given a path therefore runs itself again with a folder holding
/// `libnccl.so` -> that file first on LD_LIBRARY_PATH (the folder under the
/// cache root, one per path). Returns only where nothing needs to change.
fn honour_nccl_so_path() -> Result<(), WorkerMainError> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    use std::os::unix::process::CommandExt;
    let Some(path) = runtime::envs::raw(runtime::envs::VLLM_NCCL_SO_PATH) else {
        return Ok(());
    };
    let err = |message: String| WorkerMainError::NcclPath {
        path: path.clone(),
        message,
    };
    let target = std::fs::canonicalize(&path).map_err(|e| err(format!("cannot open it: {e}")))?;
    let mut h = DefaultHasher::new();
    target.hash(&mut h);
    let root = runtime::envs::cache_root()
        .ok_or_else(|| err("no cache root (set FLOTILLA_CACHE_ROOT or HOME)".into()))?;
    let dir = root.join("nccl").join(format!("{:016x}", h.finish()));
    let old = runtime::envs::process_var("LD_LIBRARY_PATH").unwrap_or_default();
    let dir_s = dir.to_string_lossy().to_string();
    if old.split(':').next() == Some(dir_s.as_str()) {
        return Ok(()); // already running with it
    }
    std::fs::create_dir_all(&dir).map_err(|e| err(format!("cannot create {dir_s}: {e}")))?;
    let link = dir.join("libnccl.so");
    if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .map_err(|e| err(format!("cannot link {}: {e}", link.display())))?;
    }
    let exe = std::env::current_exe().map_err(|e| err(format!("cannot find this binary: {e}")))?;
    let joined = if old.is_empty() {
        dir_s
    } else {
        format!("{dir_s}:{old}")
    };
    // exec returns only on failure.
    let e = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", joined)
        .exec();
    Err(err(format!("cannot restart the worker with it: {e}")))
}
