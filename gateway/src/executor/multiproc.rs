//! The `mp` executor: one `worker` process per rank on this machine, driven
//! over gRPC on loopback (`remote::RemoteWorkers`).
//!
//! Workers die with the gateway: the executor kills them when dropped, and
//! each child gets `PR_SET_PDEATHSIG` so that even a `kill -9` of the gateway
//! ends them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use worker::config::ModelConfig;
use worker::{MemoryProfile, ModelRunnerOutput, SchedulerOutput, WorkerConfig};

use super::remote::{locate_worker_bin, plan_rendezvous, port_allocator, RemoteWorkers, LISTENING};
use super::{worker_env, Executor, ExecutorError, KvCacheCapacity, Result};
use crate::envs;

pub struct MultiprocExecutor {
    model_config: ModelConfig,
    // Dropped first: the streams close before the processes are stopped.
    workers: RemoteWorkers,
    /// Held for its `Drop`, which stops the processes.
    _procs: Supervisor,
}

impl MultiprocExecutor {
    /// Spawns `tp_size x pp_size` workers, joins them into one group, loads
    /// the model on each and sizes the KV cache from their reports.
    pub fn start(config: &WorkerConfig, profile: Option<MemoryProfile>) -> Result<Self> {
        let world = config.parallel.tp_size * config.parallel.pp_size;
        let model_config =
            ModelConfig::load(&config.model, config.load_format, &config.hf_overrides)?;
        let bin = locate_worker_bin()?;
        let host = envs::raw(envs::VLLM_HOST_IP).unwrap_or_else(|| "127.0.0.1".into());
        let rendezvous = plan_rendezvous(&vec![host; world], &config.parallel, port_allocator()?)?;
        tracing::info!(
            "Starting {world} worker processes ({}), collective group at {}",
            bin.display(),
            rendezvous[0].collective
        );
        // One GPU per rank, as vLLM's mp executor gives each rank its own
        // device: each worker sees only its GPU (its device 0).
        let gpus = match config.device.resolve()? {
            worker::Device::Cuda => Some(gpu_per_rank(
                envs::raw(envs::CUDA_VISIBLE_DEVICES).as_deref(),
                worker::backend::cuda_device_count()?,
                world,
            )?),
            _ => None,
        };
        let procs = Supervisor::spawn(bin, world, gpus, envs::rpc_timeout()?)?;
        let workers = RemoteWorkers::connect(&procs.addresses, config, &rendezvous, profile)?;
        Ok(Self {
            model_config,
            workers,
            _procs: procs,
        })
    }
}

impl Executor for MultiprocExecutor {
    fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    fn kv_cache_capacity(&self) -> Result<KvCacheCapacity> {
        self.workers.kv_cache_capacity()
    }

    fn initialize_kv_cache(&mut self, num_blocks: usize) -> Result<()> {
        self.workers.initialize_kv_cache(num_blocks)
    }

    fn capture_graphs(&mut self, max_num_seqs: usize) -> Result<usize> {
        self.workers.capture_graphs(max_num_seqs)
    }

    fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        self.workers.execute_model(step)
    }

    fn max_concurrent_batches(&self) -> usize {
        self.workers.max_concurrent_batches()
    }

    fn submit(&mut self, step: &SchedulerOutput) -> Result<()> {
        self.workers.submit(step)
    }

    fn wait_oldest(&mut self) -> Result<ModelRunnerOutput> {
        self.workers.wait_oldest()
    }

    fn check_health(&mut self) -> Result<()> {
        self.workers.check_health()
    }
}

/// The worker processes. They are spawned from, and owned by, one thread
/// that lives as long as the executor: `PR_SET_PDEATHSIG` fires when the
/// thread that forked a child exits, so that thread must not be a transient
/// one (a tokio blocking thread, the set-up call's thread).
struct Supervisor {
    addresses: Vec<String>,
    stop: Option<std_mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    fn spawn(
        bin: PathBuf,
        world: usize,
        gpus: Option<Vec<String>>,
        timeout: Duration,
    ) -> Result<Self> {
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<Vec<String>>>();
        let (stop_tx, stop_rx) = std_mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("mp-workers".into())
            .spawn(move || {
                let mut children = Vec::with_capacity(world);
                let started = start_children(&bin, world, gpus, timeout, &mut children);
                let ok = started.is_ok();
                let _ = ready_tx.send(started);
                if ok {
                    // Until the executor is dropped (or this sender is gone).
                    let _ = stop_rx.recv();
                }
                for (rank, c) in children.iter_mut().enumerate() {
                    if let Ok(None) = c.try_wait() {
                        tracing::debug!("Stopping worker rank {rank} (pid {})", c.id());
                        let _ = c.kill();
                    }
                    let _ = c.wait();
                }
            })
            .map_err(|e| ExecutorError::Spawn {
                rank: 0,
                message: format!("cannot start the supervisor thread: {e}"),
            })?;
        let mut sup = Supervisor {
            addresses: Vec::new(),
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(addresses)) => {
                sup.addresses = addresses;
                Ok(sup)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ExecutorError::Spawn {
                rank: 0,
                message: "the supervisor thread ended early".into(),
            }),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the workers and reads each one's listening address.
fn start_children(
    bin: &PathBuf,
    world: usize,
    gpus: Option<Vec<String>>,
    timeout: Duration,
    children: &mut Vec<Child>,
) -> Result<Vec<String>> {
    let forwarded = worker_env::forwarded(std::env::vars());
    tracing::info!(
        "Copying the following environment variables to workers: {:?}",
        forwarded
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut address_rx = Vec::with_capacity(world);
    for rank in 0..world {
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", "127.0.0.1:0"])
            .env_clear()
            .envs(worker_env::process_basics())
            .envs(forwarded.iter().cloned())
            .env("LOCAL_RANK", rank.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(gpus) = &gpus {
            cmd.env("CUDA_VISIBLE_DEVICES", &gpus[rank]);
        }
        if envs::raw(envs::RAYON_NUM_THREADS).is_none() {
            // The ranks share this machine's cores; more threads than cores
            // only makes them wait on each other at every collective.
            cmd.env("RAYON_NUM_THREADS", (cores / world).max(1).to_string());
        }
        set_parent_death_signal(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| ExecutorError::Spawn {
            rank,
            message: format!("cannot run {}: {e}", bin.display()),
        })?;
        let pid = child.id();
        let stdout = child.stdout.take();
        children.push(child);
        let (tx, rx) = std_mpsc::channel();
        if let Some(stdout) = stdout {
            // Forwards the worker's log lines, prefixed as vLLM prefixes its
            // workers' logs, after handing over the listening address.
            std::thread::Builder::new()
                .name(format!("worker-{rank}-log"))
                .spawn(move || {
                    let mut tx = Some(tx);
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        if let Some(addr) = line.strip_prefix(LISTENING) {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(addr.trim().to_string());
                            }
                            continue;
                        }
                        println!("(Worker rank={rank} pid={pid}) {line}");
                    }
                })
                .map_err(|e| ExecutorError::Spawn {
                    rank,
                    message: format!("cannot start its log thread: {e}"),
                })?;
        }
        address_rx.push(rx);
    }
    let deadline = Instant::now() + timeout;
    let mut addresses = Vec::with_capacity(world);
    for (rank, rx) in address_rx.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(addr) => addresses.push(addr),
            Err(_) => {
                let exited = children[rank].try_wait().ok().flatten();
                return Err(ExecutorError::Spawn {
                    rank,
                    message: match exited {
                        Some(status) => format!("the worker exited at start ({status})"),
                        None => format!(
                            "the worker did not report its address within {timeout:?} (VLLM_RPC_TIMEOUT)"
                        ),
                    },
                });
            }
        }
    }
    Ok(addresses)
}

/// The GPU each rank gets: the `rank`-th of the gateway's visible devices
/// (`CUDA_VISIBLE_DEVICES`, else all `device_count`), an error when there
/// are fewer than the world needs.
fn gpu_per_rank(visible: Option<&str>, device_count: usize, world: usize) -> Result<Vec<String>> {
    let devices: Vec<String> = match visible {
        Some(v) => v
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect(),
        None => (0..device_count).map(|d| d.to_string()).collect(),
    };
    if devices.len() < world {
        return Err(ExecutorError::ParallelismUnavailable {
            what: "tensor_parallel_size x pipeline_parallel_size",
            size: world,
            reason: if visible.is_some() {
                "it needs one GPU per rank on this machine, and CUDA_VISIBLE_DEVICES names fewer"
            } else {
                "it needs one GPU per rank on this machine, and the driver sees fewer"
            },
        });
    }
    Ok(devices.into_iter().take(world).collect())
}

#[cfg(target_os = "linux")]
fn set_parent_death_signal(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (prctl, getppid, _exit).
    let parent = unsafe { libc::getpid() };
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The gateway may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_cmd: &mut Command) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_gpu_per_rank() {
        assert_eq!(gpu_per_rank(None, 4, 2).unwrap(), ["0", "1"]);
        assert_eq!(
            gpu_per_rank(Some("3, 5,GPU-1a2b"), 8, 3).unwrap(),
            ["3", "5", "GPU-1a2b"]
        );
        let e = gpu_per_rank(Some("2"), 8, 2).unwrap_err().to_string();
        assert!(e.contains("CUDA_VISIBLE_DEVICES names fewer"), "{e}");
        assert!(gpu_per_rank(None, 1, 2).is_err());
        assert!(gpu_per_rank(Some(""), 1, 1).is_err());
    }
}
