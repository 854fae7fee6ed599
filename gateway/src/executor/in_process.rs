//! Runs the model in this process: one worker, TP=1. By default steps run on
//! the engine thread. With `--async-scheduling` they run on a thread of
//! their own with two steps in flight (the engine's batch queue, as for
//! pipeline stages), so that the engine schedules, detokenizes and answers
//! clients for one half of the running requests while the device computes
//! the other half: the device no longer waits for the engine between steps.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use worker::config::ModelConfig;
use worker::{MemoryProfile, ModelRunner, ModelRunnerOutput, SchedulerOutput, WorkerConfig};

use super::{Executor, ExecutorError, KvCacheCapacity, Result};

pub struct InProcessExecutor {
    model_config: ModelConfig,
    capacity: KvCacheCapacity,
    mode: Mode,
}

enum Mode {
    Inline(ModelRunner),
    Threaded(StepThread),
}

/// The runner on its own thread; jobs run in the order they are sent.
struct StepThread {
    jobs: Option<Sender<Job>>,
    replies: Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
    /// Steps sent and not collected yet.
    in_flight: usize,
}

enum Job {
    InitializeKvCache(usize),
    CaptureGraphs(usize),
    Step(Box<SchedulerOutput>),
}

enum Reply {
    KvCache(worker::Result<()>),
    Graphs(worker::Result<usize>),
    Step(Result<ModelRunnerOutput>),
}

/// Steps in flight with `--async-scheduling`.
const ASYNC_DEPTH: usize = 2;

impl InProcessExecutor {
    /// Loads the weights and sizes the KV cache (allocated later, by
    /// `initialize_kv_cache`).
    pub fn load(
        config: &WorkerConfig,
        profile: Option<MemoryProfile>,
        async_scheduling: bool,
    ) -> Result<Self> {
        let mut runner = ModelRunner::load(config)?;
        let s = runner.kv_sizing(profile.as_ref())?;
        let capacity = KvCacheCapacity {
            bytes_per_block: s.bytes_per_block,
            available_bytes: s.available_bytes,
            device: s.device,
            profile: s.profile,
        };
        let model_config = runner.model_config().clone();
        let mode = if async_scheduling {
            Mode::Threaded(StepThread::start(runner)?)
        } else {
            Mode::Inline(runner)
        };
        Ok(Self {
            model_config,
            capacity,
            mode,
        })
    }
}

impl StepThread {
    fn start(mut runner: ModelRunner) -> Result<Self> {
        let (jobs, job_rx) = channel::<Job>();
        let (reply_tx, replies) = channel::<Reply>();
        let thread = std::thread::Builder::new()
            .name("model-runner".into())
            .spawn(move || {
                for job in job_rx {
                    let reply = match job {
                        Job::InitializeKvCache(n) => Reply::KvCache(runner.initialize_kv_cache(n)),
                        Job::CaptureGraphs(n) => Reply::Graphs(runner.capture_graphs(n)),
                        // A panic in model code fails its step, as on the engine thread.
                        Job::Step(step) => Reply::Step(
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                runner.execute_model(&step)
                            }))
                            .map_err(|p| ExecutorError::Panicked {
                                message: super::panic_message(p.as_ref()),
                            })
                            .and_then(|r| r.map_err(ExecutorError::from)),
                        ),
                    };
                    if reply_tx.send(reply).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| ExecutorError::Spawn {
                rank: 0,
                message: format!("cannot start the model runner thread: {e}"),
            })?;
        Ok(Self {
            jobs: Some(jobs),
            replies,
            thread: Some(thread),
            in_flight: 0,
        })
    }

    fn send(&self, job: Job) -> Result<()> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(Self::gone)
    }

    fn recv(&self) -> Result<Reply> {
        self.replies.recv().map_err(|_| Self::gone())
    }

    fn gone() -> ExecutorError {
        ExecutorError::WorkerLost {
            rank: 0,
            reason: "the model runner thread has stopped".into(),
        }
    }
}

impl Drop for StepThread {
    fn drop(&mut self) {
        // Closing the queue ends the thread once its current job is done.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl InProcessExecutor {
    /// A pooling (embedding) model: no KV cache to size; steps run on the
    /// engine thread.
    pub fn load_pooling(config: &WorkerConfig) -> Result<Self> {
        let runner = ModelRunner::load(config)?;
        let device = runner.device();
        Ok(Self {
            model_config: runner.model_config().clone(),
            capacity: KvCacheCapacity {
                bytes_per_block: 0,
                available_bytes: 0,
                device,
                profile: None,
            },
            mode: Mode::Inline(runner),
        })
    }
}

impl Executor for InProcessExecutor {
    fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    fn kv_cache_capacity(&self) -> Result<KvCacheCapacity> {
        Ok(self.capacity)
    }

    fn initialize_kv_cache(&mut self, num_blocks: usize) -> Result<()> {
        match &mut self.mode {
            Mode::Inline(r) => Ok(r.initialize_kv_cache(num_blocks)?),
            Mode::Threaded(t) => {
                t.send(Job::InitializeKvCache(num_blocks))?;
                match t.recv()? {
                    Reply::KvCache(r) => Ok(r?),
                    _ => Err(StepThread::gone()),
                }
            }
        }
    }

    fn capture_graphs(&mut self, max_num_seqs: usize) -> Result<usize> {
        match &mut self.mode {
            Mode::Inline(r) => Ok(r.capture_graphs(max_num_seqs)?),
            Mode::Threaded(t) => {
                t.send(Job::CaptureGraphs(max_num_seqs))?;
                match t.recv()? {
                    Reply::Graphs(r) => Ok(r?),
                    _ => Err(StepThread::gone()),
                }
            }
        }
    }

    fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        match &mut self.mode {
            Mode::Inline(r) => Ok(r.execute_model(step)?),
            Mode::Threaded(_) => {
                self.submit(step)?;
                self.wait_oldest()
            }
        }
    }

    fn max_concurrent_batches(&self) -> usize {
        match self.mode {
            Mode::Inline(_) => 1,
            Mode::Threaded(_) => ASYNC_DEPTH,
        }
    }

    fn submit(&mut self, step: &SchedulerOutput) -> Result<()> {
        match &mut self.mode {
            Mode::Inline(_) => Err(ExecutorError::ParallelismUnavailable {
                what: "max_concurrent_batches",
                size: ASYNC_DEPTH,
                reason: "steps run on the engine thread without --async-scheduling",
            }),
            Mode::Threaded(t) => {
                t.send(Job::Step(Box::new(step.clone())))?;
                t.in_flight += 1;
                Ok(())
            }
        }
    }

    fn wait_oldest(&mut self) -> Result<ModelRunnerOutput> {
        match &mut self.mode {
            Mode::Threaded(t) if t.in_flight > 0 => {
                t.in_flight -= 1;
                match t.recv()? {
                    Reply::Step(r) => r,
                    _ => Err(StepThread::gone()),
                }
            }
            _ => Err(ExecutorError::ParallelismUnavailable {
                what: "max_concurrent_batches",
                size: ASYNC_DEPTH,
                reason: "no step is in flight",
            }),
        }
    }
}
