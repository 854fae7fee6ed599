//! The async handle on the engine loop: validates and submits requests,
//! streams their outputs, aborts, and reads stats and metrics.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::core::{Command, EngineCore, Shared};
use super::error::{EngineError, Result};
use super::scheduler::{Scheduler, SchedulerStats};
use super::structured_output::GrammarCompiler;
use super::types::{EngineRequest, FinishReason, RequestOutput};
use crate::executor::{Executor, Rebuild};
use crate::metrics;
use crate::tokenizer::Tokenizer;

/// Engine counters for tests and the server: running/waiting requests,
/// KV blocks, preemptions, prefix cache.
pub type EngineStats = SchedulerStats;

/// Cheap to clone; every clone talks to the same engine loop.
#[derive(Clone)]
pub struct EngineClient {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Sender<Command>,
    shared: Arc<Shared>,
    max_model_len: usize,
    vocab_size: usize,
    /// A pooling model's engine: requests are pooled, not generated.
    pooling: bool,
    model_name: RwLock<String>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// `--max-concurrent-requests`.
    max_concurrent: Option<usize>,
    /// Compiles structured-output constraints before a request is queued.
    grammars: GrammarCompiler,
}

impl EngineClient {
    /// Starts the engine loop on its own thread.
    pub(crate) fn spawn(
        scheduler: Scheduler,
        executor: Box<dyn Executor>,
        rebuild: Option<Rebuild>,
        tokenizer: Arc<Tokenizer>,
        log_stats_interval: Duration,
    ) -> Result<Self> {
        let max_model_len = scheduler.config().max_model_len;
        let pooling = scheduler.config().pooling;
        let vocab_size = executor.model_config().vocab_size;
        let grammars = GrammarCompiler::new(tokenizer.clone(), scheduler.eos_token_ids().to_vec());
        let shared = Arc::new(Shared::default());
        shared.log_stats.store(true, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::channel();
        let core = EngineCore::new(
            scheduler,
            executor,
            rebuild,
            tokenizer,
            shared.clone(),
            log_stats_interval,
        )?;
        let thread = std::thread::Builder::new()
            .name("engine-core".into())
            .spawn(move || core.run(rx))
            .map_err(|e| EngineError::EngineDead {
                reason: format!("cannot start the engine thread: {e}"),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                tx,
                shared,
                max_model_len,
                vocab_size,
                pooling,
                model_name: RwLock::new(String::new()),
                thread: Mutex::new(Some(thread)),
                max_concurrent: None,
                grammars,
            }),
        })
    }

    /// Bounds the requests accepted at once (`None`: no bound). Call before
    /// cloning the client.
    pub(crate) fn with_max_concurrent_requests(mut self, limit: Option<usize>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.max_concurrent = limit;
        }
        self
    }

    /// Checks the request, queues it and returns its output stream.
    pub async fn add_request(&self, mut req: EngineRequest) -> Result<RequestStream> {
        self.check_alive()?;
        if let Some(k) = req.sampling_params.truncate_prompt_tokens {
            let len = req.prompt_token_ids.len();
            if k < len {
                req.prompt_token_ids.drain(..len - k);
            }
        }
        if self.inner.pooling {
            validate_pooling_request(&req, self.inner.max_model_len, self.inner.vocab_size)?;
        } else {
            validate_request(&req, self.inner.max_model_len, self.inner.vocab_size)?;
        }
        // Compiled here, so that a bad schema or grammar is the caller's
        // 400 and never reaches the batch.
        let grammar = match &req.sampling_params.structured_outputs {
            Some(so) => Some(Box::new(self.inner.grammars.compile(so)?)),
            None => None,
        };
        {
            let mut live = self.inner.shared.live_ids.lock().expect("ids lock");
            if let Some(limit) = self.inner.max_concurrent {
                // Counted with the duplicate check, under one lock, so that
                // concurrent arrivals cannot overshoot the bound.
                if live.len() >= limit && !live.contains(&req.request_id) {
                    return Err(EngineError::Overloaded { limit });
                }
            }
            if !live.insert(req.request_id.clone()) {
                return Err(EngineError::DuplicateRequest {
                    request_id: req.request_id,
                });
            }
        }
        let (tx, rx) = unbounded_channel();
        let request_id = req.request_id.clone();
        if self
            .inner
            .tx
            .send(Command::Add {
                req: Box::new(req),
                tx,
                grammar,
            })
            .is_err()
        {
            self.inner
                .shared
                .live_ids
                .lock()
                .expect("ids lock")
                .remove(&request_id);
            return Err(self.dead_error());
        }
        Ok(RequestStream {
            request_id,
            rx,
            tx: self.inner.tx.clone(),
            finished: false,
        })
    }

    /// Ends the request now; its blocks are freed before the next step.
    pub fn abort(&self, request_id: &str) {
        let _ = self.inner.tx.send(Command::Abort(request_id.to_string()));
    }

    /// Forgets every cached prefix; `false` when requests still hold blocks
    /// (vLLM's development endpoint).
    pub async fn reset_prefix_cache(&self) -> Result<bool> {
        self.check_alive()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.inner.tx.send(Command::ResetPrefixCache(tx)).is_err() {
            return Err(self.dead_error());
        }
        rx.await.map_err(|_| self.dead_error())
    }

    /// Starts the engine profiler (`VLLM_TORCH_PROFILER_DIR`); the error
    /// says why it cannot.
    pub async fn start_profile(&self) -> Result<std::result::Result<(), String>> {
        self.check_alive()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.inner.tx.send(Command::StartProfile(tx)).is_err() {
            return Err(self.dead_error());
        }
        rx.await.map_err(|_| self.dead_error())
    }

    /// Stops the profiler and returns the trace file it wrote.
    pub async fn stop_profile(&self) -> Result<std::result::Result<std::path::PathBuf, String>> {
        self.check_alive()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.inner.tx.send(Command::StopProfile(tx)).is_err() {
            return Err(self.dead_error());
        }
        rx.await.map_err(|_| self.dead_error())
    }

    pub fn stats(&self) -> EngineStats {
        self.inner.shared.stats.lock().expect("stats lock").clone()
    }

    /// Prometheus text with vLLM's `vllm:` metrics.
    pub fn render_metrics(&self) -> String {
        let g = self.inner.shared.gauges();
        let m = self
            .inner
            .shared
            .metrics
            .lock()
            .expect("metrics lock")
            .clone();
        let name = self.inner.model_name.read().expect("name lock").clone();
        metrics::render(&name, &g, &m)
    }

    /// The `model_name` label on metrics (the served model name).
    pub fn set_model_name(&self, name: &str) {
        *self.inner.model_name.write().expect("name lock") = name.to_string();
    }

    /// Turns the periodic stats log line on or off (`--disable-log-stats`).
    pub fn set_log_stats(&self, enabled: bool) {
        self.inner
            .shared
            .log_stats
            .store(enabled, Ordering::Relaxed);
    }

    /// True when the engine serves a pooling (embedding) model.
    pub fn is_pooling(&self) -> bool {
        self.inner.pooling
    }

    pub fn max_model_len(&self) -> usize {
        self.inner.max_model_len
    }

    pub fn is_alive(&self) -> bool {
        self.check_alive().is_ok()
    }

    /// Aborts everything still running and joins the engine loop.
    pub async fn shutdown(&self) {
        let _ = self.inner.tx.send(Command::Shutdown);
        let handle = self.inner.thread.lock().expect("thread lock").take();
        if let Some(h) = handle {
            let joined = tokio::task::spawn_blocking(move || h.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("The engine loop ended with a panic");
            }
        }
    }

    fn check_alive(&self) -> Result<()> {
        match self.inner.shared.dead.lock().expect("dead lock").as_ref() {
            Some(reason) => Err(EngineError::EngineDead {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn dead_error(&self) -> EngineError {
        let reason = self.inner.shared.dead.lock().expect("dead lock").clone();
        EngineError::EngineDead {
            reason: reason.unwrap_or_else(|| "the engine loop has exited".into()),
        }
    }
}

/// The prompt's length, once it is known to be non-empty and inside the
/// vocabulary (what every request needs, generating or pooling).
fn check_prompt(req: &EngineRequest, vocab_size: usize) -> Result<usize> {
    if req.prompt_token_ids.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    if let Some(&token_id) = req
        .prompt_token_ids
        .iter()
        .find(|&&t| t as usize >= vocab_size)
    {
        return Err(EngineError::TokenOutOfVocab {
            token_id,
            vocab_size,
        });
    }
    Ok(req.prompt_token_ids.len())
}

/// The checks done before a request reaches the loop.
pub fn validate_request(
    req: &EngineRequest,
    max_model_len: usize,
    vocab_size: usize,
) -> Result<()> {
    let prompt = check_prompt(req, vocab_size)?;
    req.sampling_params.validate(vocab_size)?;
    match req.sampling_params.max_tokens {
        Some(completion) if prompt + completion > max_model_len => {
            Err(EngineError::ContextLength {
                max_model_len,
                requested: prompt + completion,
                prompt,
                completion,
            })
        }
        None if prompt >= max_model_len => Err(EngineError::PromptTooLong {
            max_model_len,
            prompt,
        }),
        _ => Ok(()),
    }
}

/// The checks of a pooling request: it generates nothing, so the whole
/// context may be prompt.
pub fn validate_pooling_request(
    req: &EngineRequest,
    max_model_len: usize,
    vocab_size: usize,
) -> Result<()> {
    let prompt = check_prompt(req, vocab_size)?;
    if prompt > max_model_len {
        return Err(EngineError::EmbeddingInputTooLong {
            max_model_len,
            prompt,
        });
    }
    Ok(())
}

/// A request's outputs. Dropping it before the final output aborts the
/// request, which frees its KV blocks at once (a client disconnect).
pub struct RequestStream {
    request_id: String,
    rx: UnboundedReceiver<RequestOutput>,
    tx: Sender<Command>,
    finished: bool,
}

impl RequestStream {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }
}

impl Stream for RequestStream {
    type Item = RequestOutput;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<RequestOutput>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(out)) => {
                self.finished = out.finished.is_some();
                Poll::Ready(Some(out))
            }
            // The loop went away without finishing us: say so rather than hang.
            Poll::Ready(None) => {
                self.finished = true;
                Poll::Ready(Some(RequestOutput {
                    request_id: self.request_id.clone(),
                    finished: Some(FinishReason::Abort),
                    error: Some("the engine stopped".into()),
                    ..Default::default()
                }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.tx.send(Command::Abort(self.request_id.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use worker::SamplingParams;

    use super::*;

    fn req(prompt: usize, max_tokens: Option<usize>) -> EngineRequest {
        EngineRequest {
            request_id: "r".into(),
            prompt_token_ids: vec![1; prompt],
            sampling_params: SamplingParams {
                max_tokens,
                ..Default::default()
            },
            priority: 0,
            arrival_time: Instant::now(),
        }
    }

    #[test]
    fn request_checks() {
        assert!(matches!(
            validate_request(&req(0, Some(1)), 10, 50),
            Err(EngineError::EmptyPrompt)
        ));
        assert!(validate_request(&req(5, Some(5)), 10, 50).is_ok());
        assert!(validate_request(&req(9, None), 10, 50).is_ok());
        assert!(matches!(
            validate_request(&req(10, None), 10, 50),
            Err(EngineError::PromptTooLong { .. })
        ));
        let e = validate_request(&req(6, Some(5)), 10, 50).unwrap_err();
        assert_eq!(
            e.to_string(),
            "This model's maximum context length is 10 tokens. However, you requested 11 tokens \
             (6 in the messages, 5 in the completion). Please reduce the length of the messages \
             or completion."
        );
        let mut bad = req(3, Some(1));
        bad.prompt_token_ids[1] = 50;
        assert!(matches!(
            validate_request(&bad, 10, 50),
            Err(EngineError::TokenOutOfVocab { token_id: 50, .. })
        ));
        let mut bad = req(3, Some(1));
        bad.sampling_params.top_p = 2.0;
        assert_eq!(
            validate_request(&bad, 10, 50).unwrap_err().param(),
            Some("top_p")
        );
    }
}
