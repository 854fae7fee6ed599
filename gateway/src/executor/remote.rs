//! Drives a set of `worker` processes at known addresses over gRPC (the
//! `Worker` service): the part of an executor shared by `mp` (processes it
//! spawned) and `ray` (actors the orchestrator placed).
//!
//! Each step is encoded once and the same bytes go to every rank's
//! long-lived `Execute` stream at once; every rank acknowledges each step and
//! rank 0 (the last stage's first TP rank) returns the sampled tokens. The
//! engine thread never enters the async runtime for a step: it pushes into
//! unbounded channels and waits on one std channel the per-rank stream
//! readers feed.

use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use proto::worker as pb;
use proto::worker::worker_client::WorkerClient;
use tokio::sync::mpsc as tokio_mpsc;
use tonic::transport::Channel;
use worker::{wire, MemoryProfile, ModelRunnerOutput, SchedulerOutput, WorkerConfig};

use super::{ExecutorError, KvCacheCapacity, Result};
use crate::envs;

/// The line a worker prints once it listens (see the `worker` binary).
pub(crate) const LISTENING: &str = "FLOTILLA_WORKER_LISTENING ";

/// What a rank's stream reader reports to the engine thread.
struct RankEvent {
    rank: usize,
    /// `Err` when the stream broke: the rank is lost.
    result: std::result::Result<pb::ExecuteResponse, String>,
}

/// The rank whose output the engine uses (vLLM's driver worker: the last
/// pipeline stage's first TP rank; rank 0 while pp = 1).
const OUTPUT_RANK: usize = 0;

/// How long a failed step waits for the other ranks' reports (see
/// `execute_model`).
const FATAL_GRACE: Duration = Duration::from_secs(1);

/// Runs `fut` to completion on `handle`'s runtime from any thread, including
/// one inside another runtime (set-up runs under `block_in_place` in the
/// server), where `Handle::block_on` itself would panic.
pub(crate) fn block_on<F>(handle: &tokio::runtime::Handle, fut: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    let handle = handle.clone();
    std::thread::scope(|s| {
        s.spawn(move || handle.block_on(fut))
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

pub(crate) struct RemoteWorkers {
    /// Owns the gRPC connections; `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    clients: Vec<WorkerClient<Channel>>,
    /// Per rank: the sending side of its `Execute` stream.
    steps: Vec<tokio_mpsc::UnboundedSender<pb::ExecuteRequest>>,
    events: std_mpsc::Receiver<RankEvent>,
    capacity: KvCacheCapacity,
    next_step: u64,
    rpc_timeout: Duration,
    step_timeout: Duration,
    /// Set once a rank is lost: every later step fails at once.
    lost: Option<(usize, String)>,
}

impl RemoteWorkers {
    /// Connects to the workers at `addresses` (rank order), joins them into
    /// one group meeting at `collective_address`, loads the model on each
    /// and sizes the KV cache from their reports.
    pub fn connect(
        addresses: &[String],
        config: &WorkerConfig,
        collective_address: &str,
        profile: Option<MemoryProfile>,
    ) -> Result<Self> {
        let rpc_timeout = envs::rpc_timeout()?;
        let step_timeout = Duration::from_secs_f64(
            envs::get::<f64>(envs::VLLM_ENGINE_ITERATION_TIMEOUT_S)?
                .unwrap_or(60.0)
                .max(0.001),
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("executor-io")
            .enable_all()
            .build()
            .map_err(|e| ExecutorError::Spawn {
                rank: 0,
                message: format!("cannot start the executor's async runtime: {e}"),
            })?;
        let (events_tx, events) = std_mpsc::channel();
        let mut workers = Self {
            runtime: Some(runtime),
            clients: Vec::new(),
            steps: Vec::new(),
            events,
            capacity: KvCacheCapacity {
                bytes_per_block: 0,
                available_bytes: 0,
                device: worker::Device::Cpu,
                profile: None,
            },
            next_step: 0,
            rpc_timeout,
            step_timeout,
            lost: None,
        };
        workers.set_up(addresses, config, collective_address, profile, events_tx)?;
        Ok(workers)
    }

    fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        let rt = self.runtime.as_ref().expect("the runtime lives until drop");
        block_on(rt.handle(), fut)
    }

    fn set_up(
        &mut self,
        addresses: &[String],
        config: &WorkerConfig,
        collective_address: &str,
        profile: Option<MemoryProfile>,
        events_tx: std_mpsc::Sender<RankEvent>,
    ) -> Result<()> {
        let world = addresses.len();
        let parallel = config.parallel;
        let timeout = self.rpc_timeout;
        let addresses = addresses.to_vec();
        // Connect to every rank.
        let clients = self.block_on(async move {
            let mut clients = Vec::with_capacity(world);
            for (rank, addr) in addresses.iter().enumerate() {
                let endpoint = Channel::from_shared(format!("http://{addr}"))
                    .map_err(|e| ExecutorError::Spawn {
                        rank,
                        message: format!("bad worker address {addr}: {e}"),
                    })?
                    .connect_timeout(timeout)
                    .tcp_nodelay(true);
                let channel = endpoint.connect().await.map_err(|e| ExecutorError::Spawn {
                    rank,
                    message: format!("cannot connect to the worker at {addr}: {e}"),
                })?;
                clients.push(WorkerClient::new(channel).max_decoding_message_size(usize::MAX));
            }
            Ok::<_, ExecutorError>(clients)
        })?;
        self.clients = clients;

        // Init on every rank at once: rank 0 waits for its peers there.
        let inits = (0..world).map(|rank| pb::InitRequest {
            rank: rank as u32,
            world_size: world as u32,
            tp_size: parallel.tp_size as u32,
            pp_size: parallel.pp_size as u32,
            tp_rank: (rank % parallel.tp_size) as u32,
            pp_rank: (rank / parallel.tp_size) as u32,
            collective_address: collective_address.to_string(),
        });
        let calls = self
            .clients
            .iter()
            .cloned()
            .zip(inits)
            .map(|(mut c, r)| async move {
                // The rendezvous itself waits up to the timeout: allow for it.
                tokio::time::timeout(timeout * 2, c.init(r)).await
            });
        let replies = self.block_on(futures::future::join_all(calls));
        for (rank, r) in replies.into_iter().enumerate() {
            check_call(rank, "init", r)?;
        }

        let load = pb::LoadModelRequest {
            model: config.model.to_string_lossy().into_owned(),
            device: config.device.name().into(),
            load_format: config.load_format.name().into(),
            dtype: config.dtype.clone(),
            hf_overrides_json: if config.hf_overrides.is_null() {
                String::new()
            } else {
                config.hf_overrides.to_string()
            },
            block_size: config.block_size as u32,
            seed: config.seed,
            max_model_len: config.max_model_len as u64,
            cpu_int8_activations: config.cpu_int8_activations,
        };
        // Loading takes as long as the weights take: no timeout, but a dead
        // worker still ends the call.
        let calls = self.clients.iter().cloned().map(|mut c| {
            let load = load.clone();
            async move { Ok::<_, tokio::time::error::Elapsed>(c.load_model(load).await) }
        });
        let replies = self.block_on(futures::future::join_all(calls));
        for (rank, r) in replies.into_iter().enumerate() {
            let reply = check_call(rank, "load_model", r)?;
            if rank == 0 {
                tracing::info!(
                    "Workers loaded {} on {} in {}",
                    config.model.display(),
                    reply.device,
                    reply.dtype
                );
            }
        }

        let calls = self.clients.iter().cloned().map(|mut c| async move {
            let req = pb::KvCacheInfoRequest {
                profile: profile.map(|p| pb::MemoryProfile {
                    gpu_memory_utilization: p.gpu_memory_utilization,
                    max_num_batched_tokens: p.max_num_batched_tokens as u64,
                    max_num_seqs: p.max_num_seqs as u64,
                }),
            };
            tokio::time::timeout(timeout, c.kv_cache_info(req)).await
        });
        let replies = self.block_on(futures::future::join_all(calls));
        let mut infos = Vec::with_capacity(world);
        for (rank, r) in replies.into_iter().enumerate() {
            infos.push(check_call(rank, "kv_cache_info", r)?);
        }
        self.capacity = capacity_from(&infos)?;

        // One long-lived step stream per rank.
        let mut steps = Vec::with_capacity(world);
        let mut opened = Vec::with_capacity(world);
        for (rank, client) in self.clients.iter().enumerate() {
            let (tx, rx) = tokio_mpsc::unbounded_channel();
            steps.push(tx);
            let mut client = client.clone();
            let events_tx = events_tx.clone();
            opened.push(async move {
                let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
                let mut responses = client
                    .execute(stream)
                    .await
                    .map_err(|s| ExecutorError::Call {
                        rank,
                        call: "execute",
                        message: s.message().to_string(),
                    })?
                    .into_inner();
                tokio::spawn(async move {
                    loop {
                        let result = match responses.message().await {
                            Ok(Some(r)) => Ok(r),
                            Ok(None) => Err("the worker closed its step stream".to_string()),
                            Err(s) => Err(format!("step stream failed: {}", s.message())),
                        };
                        let end = result.is_err();
                        if events_tx.send(RankEvent { rank, result }).is_err() || end {
                            break;
                        }
                    }
                });
                Ok::<_, ExecutorError>(())
            });
        }
        // The stream opens once the first message is sent; do not wait on
        // the response headers here.
        let handle = self.runtime.as_ref().expect("runtime").handle().clone();
        for (rank, fut) in opened.into_iter().enumerate() {
            let events_tx = events_tx.clone();
            handle.spawn(async move {
                if let Err(e) = fut.await {
                    let _ = events_tx.send(RankEvent {
                        rank,
                        result: Err(e.to_string()),
                    });
                }
            });
        }
        self.steps = steps;
        Ok(())
    }

    /// Marks the executor lost and returns the fatal error.
    fn lose(&mut self, rank: usize, reason: String) -> ExecutorError {
        if self.lost.is_none() {
            tracing::error!("Lost worker rank {rank}: {reason}");
            self.lost = Some((rank, reason.clone()));
        }
        ExecutorError::WorkerLost { rank, reason }
    }

    fn call_all<T, F, Fut>(&self, call: &'static str, f: F) -> Result<Vec<T>>
    where
        F: Fn(WorkerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>
            + Send,
        T: Send,
    {
        let calls = self.clients.iter().cloned().map(|c| {
            let fut = f(c);
            async move { Ok::<_, tokio::time::error::Elapsed>(fut.await) }
        });
        let replies = self.block_on(futures::future::join_all(calls));
        replies
            .into_iter()
            .enumerate()
            .map(|(rank, r)| check_call(rank, call, r))
            .collect()
    }
}

/// A reply, or the error naming the rank and the call.
fn check_call<T>(
    rank: usize,
    call: &'static str,
    r: std::result::Result<
        std::result::Result<tonic::Response<T>, tonic::Status>,
        tokio::time::error::Elapsed,
    >,
) -> Result<T> {
    match r {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(ExecutorError::Call {
            rank,
            call,
            message: status.message().to_string(),
        }),
        Err(_) => Err(ExecutorError::Call {
            rank,
            call,
            message: "no answer within VLLM_RPC_TIMEOUT".into(),
        }),
    }
}

/// The KV block size of rank 0 and the fewest blocks any rank can hold
/// (with that rank's profile, if one ran).
fn capacity_from(infos: &[pb::KvCacheInfoReply]) -> Result<KvCacheCapacity> {
    let bytes_per_block = infos.first().map_or(0, |i| i.bytes_per_block as usize);
    let device = match infos.first().map(|i| i.device.as_str()) {
        Some("cuda") => worker::Device::Cuda,
        _ => worker::Device::Cpu,
    };
    let tightest = infos
        .iter()
        .min_by_key(|i| i.available_bytes / i.bytes_per_block.max(1));
    let num_blocks = tightest.map_or(0, |i| {
        (i.available_bytes / i.bytes_per_block.max(1)) as usize
    });
    let profile = tightest.and_then(|i| {
        Some(worker::KvBudget {
            total: i.total_memory? as usize,
            used_before: i.used_before_profile? as usize,
            peak_activations: i.peak_activations? as usize,
            available: i.available_bytes as usize,
        })
    });
    Ok(KvCacheCapacity {
        bytes_per_block,
        available_bytes: num_blocks * bytes_per_block,
        device,
        profile,
    })
}

impl RemoteWorkers {
    pub fn kv_cache_capacity(&self) -> Result<KvCacheCapacity> {
        Ok(self.capacity)
    }

    pub fn initialize_kv_cache(&mut self, num_blocks: usize) -> Result<()> {
        self.call_all("initialize_kv_cache", |mut c| async move {
            c.initialize_kv_cache(pb::InitializeKvCacheRequest {
                num_blocks: num_blocks as u64,
            })
            .await
        })?;
        Ok(())
    }

    pub fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        if let Some((rank, reason)) = &self.lost {
            return Err(ExecutorError::WorkerLost {
                rank: *rank,
                reason: reason.clone(),
            });
        }
        self.next_step += 1;
        let step_id = self.next_step;
        let bytes = wire::encode_step(step);
        for rank in 0..self.steps.len() {
            let req = pb::ExecuteRequest {
                step_id,
                scheduler_output: bytes.clone(),
            };
            if self.steps[rank].send(req).is_err() {
                return Err(self.lose(rank, "its step stream is closed".into()));
            }
        }
        let world = self.steps.len();
        let mut answered = vec![false; world];
        let mut remaining = world;
        let mut output = None;
        let mut rejected = None;
        // A rank that dies takes its peers' collectives down with it, and
        // they may report first. Once something is fatal, wait a moment for
        // the rest so that the error names the rank whose stream broke (the
        // cause), not a peer that saw a reset connection (the symptom).
        let mut fatal: Option<(usize, String, bool)> = None;
        let mut deadline = Instant::now() + self.step_timeout;
        while remaining > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match self.events.recv_timeout(left) {
                Ok(e) => e,
                Err(_) if fatal.is_some() => break,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    let rank = answered.iter().position(|a| !a).unwrap_or(0);
                    let reason = format!(
                        "step {step_id} did not finish within {:?} (VLLM_ENGINE_ITERATION_TIMEOUT_S)",
                        self.step_timeout
                    );
                    return Err(self.lose(rank, reason));
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(self.lose(0, "every step stream is gone".into()))
                }
            };
            let rank = event.rank;
            let mut note_fatal = |reason: String, transport: bool| {
                let better = match &fatal {
                    None => true,
                    Some((_, _, was_transport)) => transport && !was_transport,
                };
                if better {
                    fatal = Some((rank, reason, transport));
                }
                deadline = deadline.min(Instant::now() + FATAL_GRACE);
            };
            let resp = match event.result {
                Ok(r) => r,
                Err(reason) => {
                    note_fatal(reason, true);
                    if !answered[rank] {
                        answered[rank] = true;
                        remaining -= 1;
                    }
                    continue;
                }
            };
            if resp.step_id != step_id || answered[rank] {
                let reason = format!("answered step {} while step {step_id} runs", resp.step_id);
                return Err(self.lose(rank, reason));
            }
            answered[rank] = true;
            remaining -= 1;
            match resp.result {
                Some(pb::execute_response::Result::Output(o)) => {
                    if rank == OUTPUT_RANK {
                        output = Some(o);
                    }
                }
                Some(pb::execute_response::Result::Error(e)) if e.fatal => {
                    note_fatal(e.message, false)
                }
                Some(pb::execute_response::Result::Error(e)) => {
                    rejected.get_or_insert(ExecutorError::StepRejected {
                        rank,
                        message: e.message,
                    });
                }
                None => note_fatal("sent an empty step response".into(), false),
            }
        }
        if let Some((rank, reason, _)) = fatal {
            return Err(self.lose(rank, reason));
        }
        if let Some(e) = rejected {
            return Err(e);
        }
        match output {
            Some(o) => Ok(o.into()),
            None => Err(self.lose(OUTPUT_RANK, "returned no output".into())),
        }
    }

    pub fn check_health(&mut self) -> Result<()> {
        if let Some((rank, reason)) = &self.lost {
            return Err(ExecutorError::WorkerLost {
                rank: *rank,
                reason: reason.clone(),
            });
        }
        // Between steps nothing is outstanding: any event is a broken stream.
        match self.events.try_recv() {
            Ok(RankEvent {
                rank,
                result: Err(reason),
            }) => Err(self.lose(rank, reason)),
            Ok(RankEvent {
                rank,
                result: Ok(r),
            }) => Err(self.lose(
                rank,
                format!("sent step {} output outside of a step", r.step_id),
            )),
            Err(_) => Ok(()),
        }
    }
}

impl Drop for RemoteWorkers {
    fn drop(&mut self) {
        // Closing the step streams lets workers finish cleanly; whoever owns
        // the processes then stops what is left.
        self.steps.clear();
        self.clients.clear();
        if let Some(rt) = self.runtime.take() {
            // Never blocks: safe on any thread, inside a runtime or not.
            rt.shutdown_background();
        }
    }
}

/// executable (for a test binary under `target/<profile>/deps`, one level up,
/// where cargo puts the workspace's binaries).
pub(crate) fn locate_worker_bin() -> Result<PathBuf> {
    let not_found = |message: String| ExecutorError::Spawn { rank: 0, message };
    if let Some(p) = envs::raw(envs::FLOTILLA_WORKER_BIN) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(not_found(format!(
                "FLOTILLA_WORKER_BIN={} is not a file",
                p.display()
            )))
        };
    }
    let exe = std::env::current_exe()
        .map_err(|e| not_found(format!("cannot find the running executable: {e}")))?;
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join("worker"));
        if dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(up) = dir.parent() {
                candidates.push(up.join("worker"));
            }
        }
    }
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        not_found(format!(
            "the worker binary is not at {}; build it (cargo build -p flotilla-worker --bin worker) \
             or set FLOTILLA_WORKER_BIN",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        ))
    })
}

/// Where the tensor-parallel group meets: rank 0's `host` at `VLLM_PORT`,
/// else at a port free right now (found by binding it, so `host` must be an
/// address of this machine unless `VLLM_PORT` is set).
pub(crate) fn collective_address(host: &str) -> Result<String> {
    let port = match envs::get::<u16>(envs::VLLM_PORT)? {
        Some(p) => p,
        None => std::net::TcpListener::bind((host, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| ExecutorError::Spawn {
                rank: 0,
                message: format!(
                    "cannot find a free port on {host} ({e}); set VLLM_PORT when rank 0 runs on another node"
                ),
            })?,
    };
    Ok(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}
