//! The engine loop. The scheduler and the executor live on one OS thread
//! (model execution is blocking CPU work); the async side reaches it through
//! a command channel and gets outputs back on per-request channels.

use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use worker::SchedulerOutput;

use super::error::EngineError;
use super::output::{output_chunks, OutputProcessor, Ready};
use super::profiler::{Phase, Profiler};
use super::scheduler::{Scheduler, SchedulerStats};
use super::structured_output::{RequestGrammar, StructuredOutputManager};
use super::types::{EngineRequest, FinishReason, RequestOutput};
use crate::executor::{Executor, ExecutorError, Rebuild};
use crate::metrics::{BatchSizeLogger, EngineMetrics, SchedulerGauges, StatLogger};
use crate::tokenizer::Tokenizer;

pub(crate) enum Command {
    Add {
        req: Box<EngineRequest>,
        tx: UnboundedSender<RequestOutput>,
        /// The request's compiled structured-output constraint.
        grammar: Option<Box<RequestGrammar>>,
    },
    Abort(String),
    /// Forget cached prefixes; answers whether it could (no request running).
    ResetPrefixCache(tokio::sync::oneshot::Sender<bool>),
    /// Start recording engine steps (`VLLM_TORCH_PROFILER_DIR`).
    StartProfile(tokio::sync::oneshot::Sender<Result<(), String>>),
    /// Stop recording; answers the trace file written.
    StopProfile(tokio::sync::oneshot::Sender<Result<std::path::PathBuf, String>>),
    Shutdown,
}

/// State the loop publishes for the async side.
#[derive(Default)]
pub(crate) struct Shared {
    pub stats: Mutex<SchedulerStats>,
    pub metrics: Mutex<EngineMetrics>,
    /// Ids of requests not finished yet, to refuse duplicates at once.
    pub live_ids: Mutex<HashSet<String>>,
    /// Why the loop stopped, once it has.
    pub dead: Mutex<Option<String>>,
    pub log_stats: AtomicBool,
}

impl Shared {
    pub fn gauges(&self) -> SchedulerGauges {
        gauges(&self.stats.lock().expect("stats lock"))
    }
}

fn gauges(s: &SchedulerStats) -> SchedulerGauges {
    SchedulerGauges {
        num_running: s.num_running,
        num_waiting: s.num_waiting,
        kv_cache_usage: s.kv_cache_usage,
        prefix_cache_queries: s.prefix_cache_queries,
        prefix_cache_hits: s.prefix_cache_hits,
        num_preemptions: s.num_preemptions,
    }
}

pub(crate) struct EngineCore {
    scheduler: Scheduler,
    /// `None` only while lost workers are being replaced.
    executor: Option<Box<dyn Executor>>,
    /// Replaces lost workers (distributed executors); without it, losing
    /// them stops the engine.
    rebuild: Option<Rebuild>,
    outputs: OutputProcessor,
    shared: Arc<Shared>,
    step_num: u64,
    stat_logger: StatLogger,
    /// Outputs held until the stats are published, so that a client that
    /// sees its request finish also sees its blocks freed.
    pending: Vec<Ready>,
    /// Set when the executor failed for good (a worker lost): the loop stops.
    fatal: Option<String>,
    /// Steps submitted to a pipelined executor and not collected yet, oldest
    /// first, with their step numbers.
    in_flight: VecDeque<(u64, SchedulerOutput, Instant)>,
    /// Present only with `VLLM_TORCH_PROFILER_DIR`.
    profiler: Option<Profiler>,
    /// Grammar matchers of structured-output requests.
    structured: StructuredOutputManager,
    /// `VLLM_V1_OUTPUT_PROC_CHUNK_SIZE`: outputs sent between yields.
    output_chunk_size: usize,
    /// Present only with `VLLM_LOG_BATCHSIZE_INTERVAL` >= 0.
    batch_sizes: Option<BatchSizeLogger>,
    /// Requests whose matcher failed while computing a mask, and why.
    grammar_failures: Vec<(String, String)>,
}

impl EngineCore {
    pub fn new(
        scheduler: Scheduler,
        executor: Box<dyn Executor>,
        rebuild: Option<Rebuild>,
        tokenizer: Arc<Tokenizer>,
        shared: Arc<Shared>,
        log_interval: Duration,
    ) -> Result<Self, EngineError> {
        let batch_interval: f64 =
            runtime::envs::get(runtime::envs::VLLM_LOG_BATCHSIZE_INTERVAL)?.unwrap_or(-1.0);
        let chunk_var = runtime::envs::VLLM_V1_OUTPUT_PROC_CHUNK_SIZE;
        let output_chunk_size: usize = runtime::envs::get(chunk_var)?.unwrap_or(128);
        if output_chunk_size == 0 {
            return Err(runtime::envs::EnvError {
                name: chunk_var.name,
                value: "0".into(),
                expected: "positive number of outputs",
            }
            .into());
        }
        let core = Self {
            scheduler,
            executor: Some(executor),
            rebuild,
            outputs: OutputProcessor::new(tokenizer),
            shared,
            step_num: 0,
            stat_logger: StatLogger::new(log_interval),
            pending: Vec::new(),
            fatal: None,
            in_flight: VecDeque::new(),
            profiler: runtime::envs::raw(runtime::envs::VLLM_TORCH_PROFILER_DIR).map(Profiler::new),
            structured: StructuredOutputManager::from_env()?,
            batch_sizes: BatchSizeLogger::new(batch_interval),
            output_chunk_size,
            grammar_failures: Vec::new(),
        };
        core.publish_stats();
        Ok(core)
    }

    /// Runs until shutdown or until every client handle is gone.
    pub fn run(mut self, rx: Receiver<Command>) {
        let reason = loop {
            if !self.has_work() {
                // Idle: block, waking up now and then for the stats log.
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            break "shut down".to_string();
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        self.maybe_log_stats();
                        let health = match self.executor.as_mut() {
                            Some(ex) => ex.check_health(),
                            None => Ok(()),
                        };
                        if let Err(e) = health {
                            if e.is_fatal() {
                                tracing::error!("Executor failed while idle: {e}");
                                self.fatal = Some(format!("lost its executor: {e}"));
                            }
                        }
                        if let Some(reason) = self.fatal.take() {
                            if let Some(stop) = self.recover(&reason, &rx) {
                                break stop;
                            }
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break "all clients gone".to_string(),
                }
            }
            let mut stop = None;
            loop {
                match rx.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            stop = Some("shut down");
                            break;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        stop = Some("all clients gone");
                        break;
                    }
                }
            }
            if let Some(r) = stop {
                break r.to_string();
            }
            if self.has_work() && !self.step() {
                // Nothing could be scheduled: wait for a command instead of spinning.
                if let Ok(cmd) = rx.recv_timeout(Duration::from_millis(10)) {
                    if !self.handle(cmd) {
                        break "shut down".to_string();
                    }
                }
            }
            self.flush_outputs();
            if let Some(reason) = self.fatal.take() {
                if let Some(stop) = self.recover(&reason, &rx) {
                    break stop;
                }
            }
            self.maybe_log_stats();
        };
        for id in self.scheduler.request_ids() {
            self.finish(
                &id,
                FinishReason::Abort,
                Some(format!("the engine {reason}")),
            );
        }
        self.flush_outputs();
        *self.shared.dead.lock().expect("dead lock") = Some(reason.clone());
        tracing::info!("Engine loop stopped ({reason})");
    }

    /// Returns false on shutdown.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Add { req, tx, grammar } => {
                tracing::debug!(request_id = %req.request_id, prompt_tokens = req.prompt_token_ids.len(), "Added request");
                if let Some(g) = grammar {
                    self.structured.add(req.request_id.clone(), *g);
                }
                self.outputs.add(&req, tx);
                self.scheduler.add_request(*req);
            }
            Command::Abort(id) => {
                if self.scheduler.contains(&id) {
                    tracing::debug!(request_id = %id, "Aborted request");
                    self.finish(&id, FinishReason::Abort, None);
                    self.flush_outputs();
                }
            }
            Command::ResetPrefixCache(reply) => {
                let done = self.scheduler.reset_prefix_cache();
                if done {
                    tracing::info!("Prefix cache reset");
                } else {
                    tracing::warn!("Failed to reset the prefix cache: requests still hold blocks");
                }
                self.publish_stats();
                let _ = reply.send(done);
            }
            Command::StartProfile(reply) => {
                let r = match &mut self.profiler {
                    Some(p) => p.start().map_err(|e| e.to_string()),
                    None => Err("the profiler is off: set VLLM_TORCH_PROFILER_DIR".into()),
                };
                if r.is_ok() {
                    tracing::info!("Profiler started");
                }
                let _ = reply.send(r);
            }
            Command::StopProfile(reply) => {
                let r = match &mut self.profiler {
                    Some(p) => p.stop().map_err(|e| e.to_string()),
                    None => Err("the profiler is off: set VLLM_TORCH_PROFILER_DIR".into()),
                };
                if let Ok(path) = &r {
                    tracing::info!("Profiler stopped; trace written to {}", path.display());
                }
                let _ = reply.send(r);
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn max_concurrent_batches(&self) -> usize {
        self.executor
            .as_ref()
            .map_or(1, |e| e.max_concurrent_batches())
    }

    /// After the workers were lost: fails every request at once (their KV
    /// cache is gone with the workers), answers unhealthy, and replaces the
    /// workers, retrying with a growing pause until it works or the engine
    /// is shut down. Returns why the loop must stop instead (no way to
    /// rebuild, or a shutdown meanwhile); `None` once it serves again.
    /// vLLM stops serving here; a gateway of ours recovers by itself.
    fn recover(&mut self, reason: &str, rx: &Receiver<Command>) -> Option<String> {
        if self.rebuild.is_none() {
            // Nothing can replace the workers (the in-process executor): stop.
            return Some(reason.to_string());
        }
        // Unhealthy before the failed requests hear of it, so that a client
        // that sees the error also sees /health 503.
        *self.shared.dead.lock().expect("dead lock") =
            Some(format!("{reason}; replacing the workers"));
        for id in self.scheduler.request_ids() {
            self.finish(
                &id,
                FinishReason::Abort,
                Some(format!("the engine {reason}")),
            );
        }
        self.in_flight.clear();
        self.flush_outputs();
        // The old workers (and their placement group) go first: the new ones
        // may need their GPUs or bundles.
        self.executor = None;
        tracing::error!("The engine {reason}; replacing its workers");
        let started = Instant::now();
        let mut pause = Duration::from_secs(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A pause first: let the failure settle (a node agent restarting,
            // a dying process releasing its port).
            let until = Instant::now() + pause;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return Some("shut down".into());
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return Some("all clients gone".into()),
                }
            }
            let Some(rebuild) = self.rebuild.as_mut() else {
                return Some(reason.to_string());
            };
            match rebuild() {
                Ok(executor) => {
                    self.executor = Some(executor);
                    // Requests that slipped in meanwhile are waiting and run now.
                    self.scheduler.reset_for_new_workers();
                    self.publish_stats();
                    *self.shared.dead.lock().expect("dead lock") = None;
                    tracing::info!(
                        "Workers replaced in {:.1}s (attempt {attempt}); serving again",
                        started.elapsed().as_secs_f64()
                    );
                    return None;
                }
                Err(e) => {
                    tracing::error!("Replacing the workers failed (attempt {attempt}): {e}");
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Requests to run, or steps still in flight.
    fn has_work(&self) -> bool {
        self.scheduler.has_unfinished() || !self.in_flight.is_empty()
    }

    /// Runs one step; false when nothing was scheduled.
    fn step(&mut self) -> bool {
        if self.max_concurrent_batches() > 1 {
            return self.step_with_batch_queue();
        }
        let scheduling = Instant::now();
        let mut step = self.scheduler.schedule();
        if step.is_empty() {
            return false;
        }
        self.step_num += 1;
        let masking = Instant::now();
        self.attach_grammar_bitmask(&mut step);
        let executing = Instant::now();
        let result = self.execute(self.step_num, &step);
        let applying = Instant::now();
        self.log_batch_size(&step, applying - executing, applying);
        self.apply(self.step_num, &step, result);
        if self.profiler.as_ref().is_some_and(Profiler::is_recording) {
            let n = self.step_num;
            self.profile(n, "schedule", scheduling, masking, &step);
            if step.grammar_bitmask.is_some() {
                self.profile(n, "grammar_bitmask", masking, executing, &step);
            }
            self.profile(n, "execute_model", executing, applying, &step);
            self.profile(n, "process_outputs", applying, Instant::now(), &step);
        }
        true
    }

    /// One phase of step `n` for the profiler, with what the step held.
    fn profile(
        &mut self,
        n: u64,
        name: &'static str,
        start: Instant,
        end: Instant,
        step: &SchedulerOutput,
    ) {
        if let Some(p) = &mut self.profiler {
            p.record(Phase {
                name,
                start,
                end,
                args: serde_json::json!({
                    "step": n,
                    "batch_size": step.num_scheduled_tokens.len(),
                    "num_tokens": step.total_num_scheduled_tokens(),
                    "new_requests": step.new_requests.len(),
                    "request_ids": req_ids(step),
                }),
            });
        }
    }

    /// vLLM's batch queue, for pipeline stages: schedule and submit while
    /// fewer steps than the executor takes are in flight, and collect the
    /// oldest when the queue is full or nothing new can run. Requests whose
    /// last token is still in flight have nothing to schedule (their next
    /// input is unknown), so a step only holds requests that can advance;
    /// every rank runs its steps in order, so KV blocks freed or reused by a
    /// later step are written after the earlier step's use of them.
    fn step_with_batch_queue(&mut self) -> bool {
        let depth = self.max_concurrent_batches();
        let mut progressed = false;
        if self.in_flight.len() < depth {
            // An even share of the requests per step, so that no stage idles.
            let stats = self.scheduler.stats();
            let share = (stats.num_running + stats.num_waiting)
                .min(self.scheduler.config().max_num_seqs)
                .div_ceil(depth)
                .max(1);
            let scheduling = Instant::now();
            let mut step = self.scheduler.schedule_at_most(share);
            if !step.is_empty() {
                self.step_num += 1;
                let num = self.step_num;
                // While the steps already in flight run on the workers.
                self.attach_grammar_bitmask(&mut step);
                let submitting = Instant::now();
                let submitted = self.guarded(|ex| ex.submit(&step));
                self.profile(num, "schedule", scheduling, submitting, &step);
                self.profile(num, "submit", submitting, Instant::now(), &step);
                match submitted {
                    Ok(()) => self.in_flight.push_back((num, step, submitting)),
                    Err(e) => self.apply(num, &step, Err(e)),
                }
                progressed = true;
            }
        }
        if !self.in_flight.is_empty() && (self.in_flight.len() >= depth || !progressed) {
            let (num, step, submitted) = self.in_flight.pop_front().expect("checked non-empty");
            let waiting = Instant::now();
            let result = self.guarded(|ex| ex.wait_oldest());
            let applying = Instant::now();
            // Submit to result: the pipeline's time for this batch.
            self.log_batch_size(&step, applying - submitted, applying);
            self.apply(num, &step, result);
            self.profile(num, "wait_oldest", waiting, applying, &step);
            self.profile(num, "process_outputs", applying, Instant::now(), &step);
            progressed = true;
        }
        progressed
    }

    /// Applies a step's result: tokens to the scheduler and clients, or the
    /// failure to the step's requests (and, when fatal, to the engine).
    fn apply(
        &mut self,
        step_num: u64,
        step: &SchedulerOutput,
        result: Result<worker::ModelRunnerOutput, ExecutorError>,
    ) {
        match result {
            Ok(out) => {
                let updates = self.scheduler.update_from_output(step, &out);
                let mut rejected = Vec::new();
                if !self.structured.is_empty() {
                    for u in &updates {
                        for &t in &u.new_token_ids {
                            if let Err(e) = self.structured.accept(&u.request_id, t) {
                                rejected.push((u.request_id.clone(), t, e));
                            }
                        }
                    }
                }
                let now = Instant::now();
                let mut m = self.shared.metrics.lock().expect("metrics lock");
                for u in updates {
                    let id = u.request_id.clone();
                    let processed = self.outputs.process(u, now, &mut m);
                    if let Some(reason) = processed.stopped_by_string {
                        // A stop string ends the request in the scheduler at once.
                        self.scheduler.finish_request(&id, &reason);
                    }
                    if let Some(ready) = processed.ready {
                        self.pending.push(ready);
                    }
                }
                drop(m);
                for (id, token, e) in rejected {
                    // Cannot happen while masks are applied; if it does, only
                    // this request ends, with the reason.
                    tracing::error!(request_id = %id, token, "Grammar rejected a sampled token: {e}");
                    self.finish(
                        &id,
                        FinishReason::Abort,
                        Some(format!(
                            "structured output: the grammar rejected sampled token {token}: {e}"
                        )),
                    );
                }
                self.drop_finished_grammars();
            }
            Err(e) if e.is_fatal() => {
                // Workers are gone: nothing can run any more. Fail this
                // step's requests with the cause; the loop then stops, fails
                // the rest and reports the engine dead (/health 503).
                tracing::error!(step = step_num, "Executor failed, stopping the engine: {e}");
                let message = format!("model execution failed: {e}");
                for (id, _) in &step.num_scheduled_tokens {
                    self.finish(id, FinishReason::Abort, Some(message.clone()));
                }
                self.fatal = Some(format!("lost its executor: {e}"));
            }
            Err(e) => {
                tracing::error!(step = step_num, "Step failed, failing its requests: {e}");
                let message = format!("model execution failed: {e}");
                for (id, _) in &step.num_scheduled_tokens {
                    self.finish(id, FinishReason::Abort, Some(message.clone()));
                }
            }
        }
    }

    /// Runs `f` on the executor, turning a panic in model code into an error
    /// so that the engine loop survives it.
    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Box<dyn Executor>) -> Result<T, ExecutorError>,
    ) -> Result<T, ExecutorError> {
        let Some(executor) = self.executor.as_mut() else {
            return Err(ExecutorError::WorkerLost {
                rank: 0,
                reason: "the workers are being replaced".into(),
            });
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| f(executor))) {
            Ok(r) => r,
            Err(panic) => Err(ExecutorError::Panicked {
                message: crate::executor::panic_message(panic.as_ref()),
            }),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(step = step_num, req_ids = %req_ids(step)))]
    fn execute(
        &mut self,
        step_num: u64,
        step: &SchedulerOutput,
    ) -> Result<worker::ModelRunnerOutput, ExecutorError> {
        tracing::debug!(
            tokens = step.total_num_scheduled_tokens(),
            new = step.new_requests.len(),
            "Running step"
        );
        self.guarded(|ex| ex.execute_model(step))
    }

    /// Puts the token bitmasks of the step's structured-output requests
    /// that sample this step (their last known token is in the step) on the
    /// step. A matcher that fails gets an EOS-only row and its request ends
    /// with the error; the rest of the batch is untouched.
    fn attach_grammar_bitmask(&mut self, step: &mut SchedulerOutput) {
        if self.structured.is_empty() {
            return;
        }
        let sampling: Vec<&str> = step
            .num_scheduled_tokens
            .iter()
            .map(|(id, _)| id.as_str())
            .filter(|id| {
                self.structured.contains(id)
                    && self
                        .scheduler
                        .request(id)
                        .is_some_and(|r| r.num_computed_tokens == r.num_tokens())
            })
            .collect();
        let (bitmask, failed) = self.structured.grammar_bitmask(&sampling);
        step.grammar_bitmask = bitmask;
        for (id, e) in failed {
            tracing::error!(request_id = %id, "Grammar mask failed: {e}");
            // Ends once this step is back (its row only allows EOS).
            self.structured.remove(&id);
            self.grammar_failures.push((id, e));
        }
    }

    /// Forgets the grammars of requests that ended, and ends those whose
    /// grammar failed while computing a mask.
    fn drop_finished_grammars(&mut self) {
        for (id, e) in std::mem::take(&mut self.grammar_failures) {
            self.finish(
                &id,
                FinishReason::Abort,
                Some(format!("structured output failed: {e}")),
            );
        }
        let scheduler = &self.scheduler;
        self.structured.retain(|id| scheduler.contains(id));
    }

    /// Ends a request from outside the scheduler's own checks.
    fn finish(&mut self, id: &str, reason: FinishReason, error: Option<String>) {
        self.structured.remove(id);
        let Some(req) = self.scheduler.finish_request(id, &reason) else {
            return;
        };
        let out = RequestOutput {
            request_id: id.to_string(),
            num_prompt_tokens: req.num_prompt_tokens,
            num_cached_tokens: req.num_cached_tokens.unwrap_or(0),
            num_output_tokens: req.num_output_tokens(),
            error,
            ..Default::default()
        };
        let mut m = self.shared.metrics.lock().expect("metrics lock");
        if let Some(ready) = self.outputs.finish(out, reason, Instant::now(), &mut m) {
            self.pending.push(ready);
        }
    }

    fn flush_outputs(&mut self) {
        self.publish_stats();
        let mut pending = std::mem::take(&mut self.pending);
        let chunks = output_chunks(pending.len(), self.output_chunk_size);
        let last = chunks.len().saturating_sub(1);
        let mut drained = pending.drain(..);
        for (i, chunk) in chunks.into_iter().enumerate() {
            {
                let mut live = self.shared.live_ids.lock().expect("ids lock");
                for Ready { tx, out } in drained.by_ref().take(chunk.len()) {
                    if out.finished.is_some() {
                        live.remove(&out.request_id);
                    }
                    // The client may have gone away; nothing to do then.
                    let _ = tx.send(out);
                }
            }
            if i < last {
                // As vLLM's output handler does between chunks: the
                // streams woken so far get the CPU (and the ids lock) before
                // the next chunk, so that HTTP tasks are not starved at
                // high concurrency.
                std::thread::yield_now();
            }
        }
        drop(drained);
        // The emptied vector keeps its capacity for the next step.
        self.pending = pending;
    }

    fn publish_stats(&self) {
        *self.shared.stats.lock().expect("stats lock") = self.scheduler.stats();
    }

    fn log_batch_size(&mut self, step: &SchedulerOutput, took: Duration, now: Instant) {
        if let Some(logger) = &mut self.batch_sizes {
            if let Some(line) = logger.record(step.total_num_scheduled_tokens(), took, now) {
                tracing::info!("{line}");
            }
        }
    }

    fn maybe_log_stats(&mut self) {
        if !self.shared.log_stats.load(Ordering::Relaxed) {
            return;
        }
        let g = gauges(&self.scheduler.stats());
        let line = {
            let m = self.shared.metrics.lock().expect("metrics lock");
            self.stat_logger.maybe_line(Instant::now(), &g, &m)
        };
        match line {
            Some((line, true)) => tracing::info!("{line}"),
            Some((line, false)) => tracing::debug!("{line}"),
            None => {}
        }
    }
}

fn req_ids(step: &SchedulerOutput) -> String {
    let ids: Vec<&str> = step
        .num_scheduled_tokens
        .iter()
        .map(|(r, _)| r.as_str())
        .collect();
    ids.join(",")
}
