//! The `Worker` gRPC service one rank serves (the `worker` binary): join the
//! collective group, load this rank's shard, size and allocate the KV cache,
//! then run the steps that arrive on a long-lived stream.
//!
//! Model work is blocking CPU work: it runs on tokio's blocking threads, one
//! step at a time, while the gRPC side stays responsive (health, shutdown).

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use proto::worker as pb;
use proto::worker::worker_server::Worker;
use tokio::sync::{mpsc, Notify};
use tonic::{Request, Response, Status, Streaming};

use crate::collective::{HostGroup, StageLink, TcpGroup, TcpStageLink};
use crate::error::Error;
use crate::model_runner::{MemoryProfile, ModelRunner, WorkerConfig};
use crate::parallel::ParallelConfig;
use crate::pooling::PoolingType;
use crate::step::ModelRunnerOutput;
use crate::{wire, Device, LoadFormat};

/// Where this rank sits in the world (from `Init`).
#[derive(Clone, Copy, Debug)]
struct Layout {
    rank: usize,
    world_size: usize,
    parallel: ParallelConfig,
}

impl Layout {
    /// vLLM's driver worker: the last pipeline stage's first TP rank is the
    /// one whose sampled tokens the executor uses.
    fn returns_output(&self) -> bool {
        self.parallel.tp_rank == 0 && self.parallel.pp_rank + 1 == self.parallel.pp_size
    }
}

#[derive(Default)]
struct State {
    layout: Option<Layout>,
    group: Option<Arc<TcpGroup>>,
    link: Option<Arc<TcpStageLink>>,
    runner: Option<ModelRunner>,
}

pub struct WorkerService {
    state: Arc<Mutex<State>>,
    shutdown: Arc<Notify>,
}

impl WorkerService {
    /// `shutdown` is notified when a `Shutdown` call arrives.
    pub fn new(shutdown: Arc<Notify>) -> Self {
        Self {
            state: Arc::default(),
            shutdown,
        }
    }
}

fn status(e: &Error) -> Status {
    match e {
        Error::NotImplemented { .. } => Status::unimplemented(e.to_string()),
        Error::Collective { .. } => Status::unavailable(e.to_string()),
        _ => Status::failed_precondition(e.to_string()),
    }
}

fn lock(state: &Mutex<State>) -> Result<std::sync::MutexGuard<'_, State>, Status> {
    state
        .lock()
        .map_err(|_| Status::internal("the worker's state lock is poisoned (a step panicked)"))
}

/// Runs blocking model work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker task failed: {e}")))?
}

fn check_layout(r: &pb::InitRequest) -> Result<Layout, Status> {
    let (rank, world, tp, pp) = (
        r.rank as usize,
        r.world_size as usize,
        r.tp_size as usize,
        r.pp_size as usize,
    );
    let parallel = ParallelConfig {
        tp_rank: r.tp_rank as usize,
        tp_size: tp,
        pp_rank: r.pp_rank as usize,
        pp_size: pp,
    };
    if tp == 0 || pp == 0 || world != tp * pp || rank >= world {
        return Err(Status::invalid_argument(format!(
            "rank {rank} of world {world} does not fit tp {tp} x pp {pp}"
        )));
    }
    // rank = pp_rank * tp_size + tp_rank, as vLLM numbers them.
    if parallel.tp_rank != rank % tp || parallel.pp_rank != rank / tp {
        return Err(Status::invalid_argument(format!(
            "rank {rank} must be tp rank {} and pp rank {} (got {} and {})",
            rank % tp,
            rank / tp,
            parallel.tp_rank,
            parallel.pp_rank
        )));
    }
    let first = parallel.pp_rank == 0;
    let last = parallel.pp_rank + 1 == pp;
    if first != r.pipeline_recv_address.is_empty() || last != r.pipeline_send_address.is_empty() {
        return Err(Status::invalid_argument(format!(
            "pipeline stage {} of {pp} needs {} previous-stage address and {} next-stage address",
            parallel.pp_rank,
            if first { "no" } else { "a" },
            if last { "no" } else { "a" },
        )));
    }
    Ok(Layout {
        rank,
        world_size: world,
        parallel,
    })
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<pb::ExecuteResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn init(&self, req: Request<pb::InitRequest>) -> Result<Response<pb::InitReply>, Status> {
        let req = req.into_inner();
        let layout = check_layout(&req)?;
        if lock(&self.state)?.layout.is_some() {
            return Err(Status::failed_precondition(
                "this worker is already initialized",
            ));
        }
        let group = if layout.parallel.tp_size > 1 {
            let timeout = runtime::envs::rpc_timeout()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let addr = req.collective_address.clone();
            let (rank, size) = (layout.parallel.tp_rank, layout.parallel.tp_size);
            let g = blocking(move || {
                TcpGroup::rendezvous(&addr, rank, size, timeout).map_err(|e| status(&e))
            })
            .await?;
            Some(Arc::new(g))
        } else {
            None
        };
        let link = if layout.parallel.pp_size > 1 {
            let env = |e: runtime::envs::EnvError| Status::invalid_argument(e.to_string());
            let setup = runtime::envs::rpc_timeout().map_err(env)?;
            // A receive waits for the previous stage's whole step.
            let step = runtime::envs::get::<f64>(runtime::envs::VLLM_ENGINE_ITERATION_TIMEOUT_S)
                .map_err(env)?
                .unwrap_or(60.0)
                .max(0.001);
            let recv = Some(req.pipeline_recv_address.clone()).filter(|a| !a.is_empty());
            let send = Some(req.pipeline_send_address.clone()).filter(|a| !a.is_empty());
            let l = blocking(move || {
                TcpStageLink::connect(
                    recv.as_deref(),
                    send.as_deref(),
                    setup,
                    std::time::Duration::from_secs_f64(step),
                )
                .map_err(|e| status(&e))
            })
            .await?;
            Some(Arc::new(l))
        } else {
            None
        };
        tracing::info!(
            "Worker rank {} of {} (tp rank {} of {}, pp rank {} of {}) initialized",
            layout.rank,
            layout.world_size,
            layout.parallel.tp_rank,
            layout.parallel.tp_size,
            layout.parallel.pp_rank,
            layout.parallel.pp_size
        );
        let mut state = lock(&self.state)?;
        state.layout = Some(layout);
        state.group = group;
        state.link = link;
        Ok(Response::new(pb::InitReply {
            pid: std::process::id(),
        }))
    }

    async fn load_model(
        &self,
        req: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadModelReply>, Status> {
        let req = req.into_inner();
        let bad = |e: Error| Status::invalid_argument(e.to_string());
        let device: Device = req.device.parse().map_err(bad)?;
        let load_format: LoadFormat = req.load_format.parse().map_err(bad)?;
        let pooling = if req.pooling_type.is_empty() {
            None
        } else {
            Some(PoolingType::parse(&req.pooling_type).map_err(bad)?)
        };
        let hf_overrides = if req.hf_overrides_json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&req.hf_overrides_json)
                .map_err(|e| Status::invalid_argument(format!("hf_overrides: {e}")))?
        };
        let (layout, group, link) = {
            let state = lock(&self.state)?;
            let layout = state
                .layout
                .ok_or_else(|| Status::failed_precondition("call Init before LoadModel"))?;
            (layout, state.group.clone(), state.link.clone())
        };
        let cfg = WorkerConfig {
            model: req.model.into(),
            device,
            load_format,
            dtype: req.dtype,
            hf_overrides,
            block_size: req.block_size as usize,
            parallel: layout.parallel,
            seed: req.seed,
            max_model_len: req.max_model_len as usize,
            cpu_int8_activations: req.cpu_int8_activations,
            pooling,
        };
        let runner = blocking(move || {
            let group = group.map(|g| g as Arc<dyn HostGroup>);
            let link = link.map(|l| l as Arc<dyn StageLink>);
            ModelRunner::load_rank(&cfg, group, link).map_err(|e| status(&e))
        })
        .await?;
        let reply = pb::LoadModelReply {
            device: runner.device().name().into(),
            dtype: runner.dtype().name().into(),
        };
        lock(&self.state)?.runner = Some(runner);
        Ok(Response::new(reply))
    }

    async fn kv_cache_info(
        &self,
        req: Request<pb::KvCacheInfoRequest>,
    ) -> Result<Response<pb::KvCacheInfoReply>, Status> {
        let profile = req.into_inner().profile.map(|p| MemoryProfile {
            gpu_memory_utilization: p.gpu_memory_utilization,
            max_num_batched_tokens: p.max_num_batched_tokens as usize,
            max_num_seqs: p.max_num_seqs as usize,
        });
        let state = self.state.clone();
        blocking(move || {
            let mut state = lock(&state)?;
            let runner = state
                .runner
                .as_mut()
                .ok_or_else(|| Status::failed_precondition("call LoadModel first"))?;
            // A GPU profile runs a whole step: off the async threads.
            let sizing = runner
                .kv_sizing(profile.as_ref())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok(pb::KvCacheInfoReply {
                bytes_per_block: sizing.bytes_per_block as u64,
                available_bytes: sizing.available_bytes as u64,
                device: sizing.device.name().to_string(),
                total_memory: sizing.profile.map(|b| b.total as u64),
                used_before_profile: sizing.profile.map(|b| b.used_before as u64),
                peak_activations: sizing.profile.map(|b| b.peak_activations as u64),
            })
        })
        .await
        .map(Response::new)
    }

    async fn initialize_kv_cache(
        &self,
        req: Request<pb::InitializeKvCacheRequest>,
    ) -> Result<Response<pb::InitializeKvCacheReply>, Status> {
        let num_blocks = req.into_inner().num_blocks as usize;
        let state = self.state.clone();
        blocking(move || {
            let mut state = lock(&state)?;
            let runner = state
                .runner
                .as_mut()
                .ok_or_else(|| Status::failed_precondition("call LoadModel first"))?;
            runner
                .initialize_kv_cache(num_blocks)
                .map_err(|e| status(&e))
        })
        .await?;
        Ok(Response::new(pb::InitializeKvCacheReply {}))
    }

    async fn capture_graphs(
        &self,
        req: Request<pb::CaptureGraphsRequest>,
    ) -> Result<Response<pb::CaptureGraphsReply>, Status> {
        let max_num_seqs = req.into_inner().max_num_seqs as usize;
        let state = self.state.clone();
        let captured = blocking(move || {
            let mut state = lock(&state)?;
            let runner = state
                .runner
                .as_mut()
                .ok_or_else(|| Status::failed_precondition("call LoadModel first"))?;
            runner.capture_graphs(max_num_seqs).map_err(|e| status(&e))
        })
        .await?;
        Ok(Response::new(pb::CaptureGraphsReply {
            captured: captured as u64,
        }))
    }

    type ExecuteStream = OutputStream;

    async fn execute(
        &self,
        req: Request<Streaming<pb::ExecuteRequest>>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let mut steps = req.into_inner();
        let returns_output = lock(&self.state)?
            .layout
            .ok_or_else(|| Status::failed_precondition("call Init first"))?
            .returns_output();
        let (tx, rx) = mpsc::channel(4);
        let state = self.state.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let msg = match steps.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        tracing::info!("The executor closed the step stream; stopping");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("Step stream from the executor failed ({e}); stopping");
                        break;
                    }
                };
                let step_id = msg.step_id;
                let state = state.clone();
                let result = blocking(move || {
                    let step = wire::decode_step(&msg.scheduler_output);
                    let mut state = lock(&state)?;
                    let runner = state
                        .runner
                        .as_mut()
                        .ok_or_else(|| Status::failed_precondition("call LoadModel first"))?;
                    Ok(step.and_then(|s| runner.execute_model(&s)))
                })
                .await;
                let result = match result {
                    Ok(Ok(out)) if returns_output => {
                        pb::execute_response::Result::Output((&out).into())
                    }
                    Ok(Ok(_)) => {
                        pb::execute_response::Result::Output((&ModelRunnerOutput::default()).into())
                    }
                    Ok(Err(e)) => {
                        if e.is_fatal() {
                            tracing::error!("step {step_id} failed, this rank cannot go on: {e}");
                        }
                        pb::execute_response::Result::Error(pb::StepError {
                            message: e.to_string(),
                            fatal: e.is_fatal(),
                        })
                    }
                    Err(s) => pb::execute_response::Result::Error(pb::StepError {
                        message: s.message().to_string(),
                        fatal: true,
                    }),
                };
                let reply = pb::ExecuteResponse {
                    step_id,
                    result: Some(result),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
            // A worker serves one executor for its whole life: once that
            // executor's stream is gone (closed, or its gateway killed),
            // nothing will drive this rank again, and a worker actor left
            // running would hold its CPU or GPU for nothing.
            shutdown.notify_one();
        });
        let out = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn health(
        &self,
        _req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthReply>, Status> {
        // try_lock: a step holds the lock while it runs, and health must
        // answer during a long step.
        let num_requests = match self.state.try_lock() {
            Ok(s) => s.runner.as_ref().map_or(0, |r| r.num_requests()) as u64,
            Err(_) => 0,
        };
        Ok(Response::new(pb::HealthReply { num_requests }))
    }

    async fn shutdown(
        &self,
        _req: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownReply>, Status> {
        tracing::info!("Shutdown requested by the executor");
        self.shutdown.notify_one();
        Ok(Response::new(pb::ShutdownReply {}))
    }
}
