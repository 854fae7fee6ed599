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

use std::collections::VecDeque;
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

/// The rank whose output the engine uses (vLLM's driver worker): the last
/// pipeline stage's first TP rank.
fn output_rank(parallel: &worker::ParallelConfig) -> usize {
    (parallel.pp_size - 1) * parallel.tp_size
}

/// What the ranks have reported of one submitted step.
struct StepState {
    step_id: u64,
    answered: Vec<bool>,
    remaining: usize,
    output: Option<pb::ModelRunnerOutput>,
    rejected: Option<ExecutorError>,
    /// (rank, reason, whether its stream broke): the most telling failure.
    fatal: Option<(usize, String, bool)>,
}

impl StepState {
    fn new(step_id: u64, world: usize) -> Self {
        Self {
            step_id,
            answered: vec![false; world],
            remaining: world,
            output: None,
            rejected: None,
            fatal: None,
        }
    }

    fn answer(&mut self, rank: usize) {
        if !self.answered[rank] {
            self.answered[rank] = true;
            self.remaining -= 1;
        }
    }

    /// A broken stream names the cause better than a peer's failed
    /// collective, which is only the symptom.
    fn note_fatal(&mut self, rank: usize, reason: String, transport: bool) {
        let better = match &self.fatal {
            None => true,
            Some((_, _, was_transport)) => transport && !was_transport,
        };
        if better {
            self.fatal = Some((rank, reason, transport));
        }
    }
}

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
    output_rank: usize,
    pp_size: usize,
    next_step: u64,
    /// Submitted steps not collected yet, oldest first.
    in_flight: VecDeque<StepState>,
    rpc_timeout: Duration,
    step_timeout: Duration,
    /// Set once a rank is lost: every later step fails at once.
    lost: Option<(usize, String)>,
}

impl RemoteWorkers {
    /// Connects to the workers at `addresses` (rank order), joins them into
    /// their groups and pipeline links (`rendezvous`, per rank), loads the
    /// model on each and sizes the KV cache from their reports.
    pub fn connect(
        addresses: &[String],
        config: &WorkerConfig,
        rendezvous: &[RankRendezvous],
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
            output_rank: output_rank(&config.parallel),
            pp_size: config.parallel.pp_size,
            next_step: 0,
            in_flight: VecDeque::new(),
            rpc_timeout,
            step_timeout,
            lost: None,
        };
        workers.set_up(addresses, config, rendezvous, profile, events_tx)?;
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
        rendezvous: &[RankRendezvous],
        profile: Option<MemoryProfile>,
        events_tx: std_mpsc::Sender<RankEvent>,
    ) -> Result<()> {
        let world = addresses.len();
        if rendezvous.len() != world {
            return Err(ExecutorError::Spawn {
                rank: 0,
                message: format!("{} rendezvous plans for {world} workers", rendezvous.len()),
            });
        }
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

        // Init on every rank at once: each group's first rank waits for its
        // peers there, and each stage for its neighbours.
        let inits = rendezvous
            .iter()
            .enumerate()
            .map(|(rank, r)| pb::InitRequest {
                rank: rank as u32,
                world_size: world as u32,
                tp_size: parallel.tp_size as u32,
                pp_size: parallel.pp_size as u32,
                tp_rank: (rank % parallel.tp_size) as u32,
                pp_rank: (rank / parallel.tp_size) as u32,
                collective_address: r.collective.clone(),
                pipeline_recv_address: r.pipeline_recv.clone(),
                pipeline_send_address: r.pipeline_send.clone(),
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
            pooling_type: config
                .pooling
                .map_or(String::new(), |p| p.name().to_string()),
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

    /// Every rank captures its graphs; returns the fewest any rank captured
    /// (ranks of one model capture alike).
    pub fn capture_graphs(&mut self, max_num_seqs: usize) -> Result<usize> {
        let replies = self.call_all("capture_graphs", |mut c| async move {
            c.capture_graphs(pb::CaptureGraphsRequest {
                max_num_seqs: max_num_seqs as u64,
            })
            .await
        })?;
        Ok(replies
            .iter()
            .map(|r| r.captured as usize)
            .min()
            .unwrap_or(0))
    }

    pub fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        self.submit(step)?;
        self.wait_oldest()
    }

    /// Batches that may be in flight at once: one per pipeline stage (vLLM's
    /// batch queue), so that every stage has work.
    pub fn max_concurrent_batches(&self) -> usize {
        self.pp_size
    }

    /// Sends `step` to every rank without waiting for it; `wait_oldest`
    /// collects the results in submission order. Each rank runs its steps
    /// in order, so a stage works on a step while the next stage runs the
    /// one before.
    pub fn submit(&mut self, step: &SchedulerOutput) -> Result<()> {
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
        self.in_flight
            .push_back(StepState::new(step_id, self.steps.len()));
        Ok(())
    }

    /// Waits for the oldest submitted step: every rank's acknowledgement and
    /// the output rank's tokens.
    pub fn wait_oldest(&mut self) -> Result<ModelRunnerOutput> {
        if let Some((rank, reason)) = &self.lost {
            return Err(ExecutorError::WorkerLost {
                rank: *rank,
                reason: reason.clone(),
            });
        }
        let Some(step_id) = self.in_flight.front().map(|s| s.step_id) else {
            return Err(self.lose(0, "no step was submitted".into()));
        };
        // A rank that dies takes its peers' collectives down with it, and
        // they may report first. Once something is fatal, wait a moment for
        // the rest so that the error names the rank whose stream broke (the
        // cause), not a peer that saw a reset connection (the symptom).
        let mut deadline = Instant::now() + self.step_timeout;
        if self.in_flight[0].fatal.is_some() {
            deadline = deadline.min(Instant::now() + FATAL_GRACE);
        }
        while self.in_flight[0].remaining > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match self.events.recv_timeout(left) {
                Ok(e) => e,
                Err(_) if self.in_flight[0].fatal.is_some() => break,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    let answered = &self.in_flight[0].answered;
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
            let resp = match event.result {
                Ok(r) => r,
                Err(reason) => {
                    // A broken stream: this step cannot finish on that rank.
                    let s = &mut self.in_flight[0];
                    s.note_fatal(rank, reason, true);
                    s.answer(rank);
                    deadline = deadline.min(Instant::now() + FATAL_GRACE);
                    continue;
                }
            };
            let output_rank = self.output_rank;
            let Some(s) = self
                .in_flight
                .iter_mut()
                .find(|s| s.step_id == resp.step_id && !s.answered[rank])
            else {
                let reason = format!("answered step {} while step {step_id} runs", resp.step_id);
                return Err(self.lose(rank, reason));
            };
            s.answer(rank);
            match resp.result {
                Some(pb::execute_response::Result::Output(o)) => {
                    if rank == output_rank {
                        s.output = Some(o);
                    }
                }
                Some(pb::execute_response::Result::Error(e)) if e.fatal => {
                    s.note_fatal(rank, e.message, false)
                }
                Some(pb::execute_response::Result::Error(e)) => {
                    s.rejected.get_or_insert(ExecutorError::StepRejected {
                        rank,
                        message: e.message,
                    });
                }
                None => s.note_fatal(rank, "sent an empty step response".into(), false),
            }
            if self.in_flight[0].fatal.is_some() {
                deadline = deadline.min(Instant::now() + FATAL_GRACE);
            }
        }
        let s = self.in_flight.pop_front().expect("waited on above");
        if let Some((rank, reason, _)) = s.fatal {
            return Err(self.lose(rank, reason));
        }
        if let Some(e) = s.rejected {
            return Err(e);
        }
        match s.output {
            Some(o) => Ok(o.into()),
            None => Err(self.lose(self.output_rank, "returned no output".into())),
        }
    }

    pub fn check_health(&mut self) -> Result<()> {
        if let Some((rank, reason)) = &self.lost {
            return Err(ExecutorError::WorkerLost {
                rank: *rank,
                reason: reason.clone(),
            });
        }
        if !self.in_flight.is_empty() {
            // Their reports belong to `wait_oldest`.
            return Ok(());
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

/// Where each rank meets its peers: its tensor-parallel group's address
/// (the group's first rank listens) and its pipeline links (a stage listens
/// for the previous one). Empty where the rank has no such peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RankRendezvous {
    pub collective: String,
    pub pipeline_recv: String,
    pub pipeline_send: String,
}

/// Plans every rank's rendezvous addresses: `hosts[rank]` is where the rank
/// runs and `port(host)` gives a port to listen on there. Ranks are numbered
/// as vLLM numbers them (rank = pp_rank * tp_size + tp_rank); rank r of a
/// stage sends to rank r + tp_size.
pub(crate) fn plan_rendezvous(
    hosts: &[String],
    parallel: &worker::ParallelConfig,
    mut port: impl FnMut(&str) -> Result<u16>,
) -> Result<Vec<RankRendezvous>> {
    let (tp, pp) = (parallel.tp_size, parallel.pp_size);
    if hosts.len() != tp * pp {
        return Err(ExecutorError::Spawn {
            rank: 0,
            message: format!("{} hosts for a world of tp {tp} x pp {pp}", hosts.len()),
        });
    }
    let mut at = |host: &str| -> Result<String> {
        let p = port(host)?;
        Ok(if host.contains(':') {
            format!("[{host}]:{p}")
        } else {
            format!("{host}:{p}")
        })
    };
    let mut plan = vec![RankRendezvous::default(); hosts.len()];
    for stage in 0..pp {
        let root = stage * tp;
        // A group of one has no rendezvous; stage 0's keeps rank 0's first port.
        if tp > 1 || stage == 0 {
            let addr = at(&hosts[root])?;
            for r in &mut plan[root..root + tp] {
                r.collective = addr.clone();
            }
        }
    }
    for rank in tp..hosts.len() {
        let addr = at(&hosts[rank])?;
        plan[rank].pipeline_recv = addr.clone();
        plan[rank - tp].pipeline_send = addr;
    }
    Ok(plan)
}

/// Ports for the rendezvous: `VLLM_PORT` and up, one per listener, else a
/// port free right now on the host (found by binding it, so the host must be
/// an address of this machine unless `VLLM_PORT` is set).
pub(crate) fn port_allocator() -> Result<impl FnMut(&str) -> Result<u16>> {
    let base = envs::get::<u16>(envs::VLLM_PORT)?;
    let mut next = 0u16;
    Ok(move |host: &str| {
        match base {
        Some(b) => {
            let p = b.checked_add(next).ok_or_else(|| ExecutorError::InvalidEnv {
                name: "VLLM_PORT",
                message: format!("{b} leaves no room for {} ports", next + 1),
            })?;
            next += 1;
            Ok(p)
        }
        None => std::net::TcpListener::bind((host, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| ExecutorError::Spawn {
                rank: 0,
                message: format!(
                    "cannot find a free port on {host} ({e}); set VLLM_PORT when ranks run on other nodes"
                ),
            }),
    }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(tp: usize, pp: usize) -> worker::ParallelConfig {
        worker::ParallelConfig {
            tp_size: tp,
            pp_size: pp,
            ..Default::default()
        }
    }

    #[test]
    fn rendezvous_plan_for_tp_and_pp() {
        let hosts: Vec<String> = ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"]
            .map(String::from)
            .to_vec();
        let mut next = 7000;
        let plan = plan_rendezvous(&hosts, &layout(2, 2), |_| {
            next += 1;
            Ok(next)
        })
        .unwrap();
        // Each stage's group meets at its first rank's host.
        assert_eq!(plan[0].collective, "10.0.0.1:7001");
        assert_eq!(plan[1].collective, "10.0.0.1:7001");
        assert_eq!(plan[2].collective, "10.0.0.2:7002");
        assert_eq!(plan[3].collective, "10.0.0.2:7002");
        // Rank r sends to r + tp, which listens on its own host.
        assert_eq!(plan[2].pipeline_recv, "10.0.0.2:7003");
        assert_eq!(plan[0].pipeline_send, "10.0.0.2:7003");
        assert_eq!(plan[3].pipeline_recv, "10.0.0.2:7004");
        assert_eq!(plan[1].pipeline_send, "10.0.0.2:7004");
        assert!(plan[0].pipeline_recv.is_empty() && plan[3].pipeline_send.is_empty());

        // Pipeline only: no groups after the first stage; IPv6 in brackets.
        let hosts: Vec<String> = vec!["::1".into(); 3];
        let plan = plan_rendezvous(&hosts, &layout(1, 3), |_| Ok(9)).unwrap();
        assert!(plan[1].collective.is_empty() && plan[2].collective.is_empty());
        assert_eq!(plan[1].pipeline_recv, "[::1]:9");
        assert_eq!(plan[1].pipeline_send, "[::1]:9");
        assert!(plan_rendezvous(&hosts, &layout(2, 2), |_| Ok(9)).is_err());
    }
}
