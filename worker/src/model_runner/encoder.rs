//! The model runner of pooling (embedding) models: an encoder with no KV
//! cache and no persistent batch. Every request of a step arrives whole
//! (the scheduler never chunks a pooling prompt, since bidirectional
//! attention needs all of a sequence at once), runs packed with the
//! others, and leaves with its pooled vector.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use super::{KvBudget, StepRunner, WorkerConfig};
use crate::attention::AttentionMetadata;
use crate::backend::{Backend, ComputeDtype, Device, StepInputs};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::loader;
use crate::models::{self, EncoderModel};
use crate::pooling::PoolingType;
use crate::step::{ModelRunnerOutput, SchedulerOutput};

pub(crate) struct EncoderRunner<B: Backend> {
    cfg: ModelConfig,
    device: Device,
    dtype: ComputeDtype,
    backend: B,
    model: Box<dyn EncoderModel<B>>,
    pooling: PoolingType,
    max_model_len: usize,
    // Step buffers, reused so a step does not reallocate them.
    meta: AttentionMetadata,
    input_ids: Vec<u32>,
}

impl<B: Backend> EncoderRunner<B> {
    pub(crate) fn load(
        cfg: &WorkerConfig,
        device: Device,
        pooling: PoolingType,
        backend: impl FnOnce(ComputeDtype) -> Result<B>,
    ) -> Result<Self> {
        if cfg.parallel.tp_size * cfg.parallel.pp_size > 1 {
            return Err(Error::NotImplemented {
                feature: "tensor or pipeline parallelism for pooling models".into(),
            });
        }
        let format = cfg.load_format.resolve(&cfg.model)?;
        let mcfg = ModelConfig::load(&cfg.model, format, &cfg.hf_overrides)?;
        let dtype = ComputeDtype::resolve_for(device, &cfg.dtype, mcfg.torch_dtype.as_deref())?;
        let backend = backend(dtype)?;
        let mut src = loader::open(&cfg.model, format, &mcfg, cfg.seed)?;
        let progress = if std::io::stderr().is_terminal() {
            let pb = ProgressBar::new(models::bert::num_weights(&mcfg) as u64);
            if let Ok(style) =
                ProgressStyle::with_template("Loading weights {bar:40} {pos}/{len} [{elapsed}]")
            {
                pb.set_style(style);
            }
            pb
        } else {
            ProgressBar::hidden()
        };
        let started = std::time::Instant::now();
        let model = models::load_encoder(&backend, &mcfg, src.as_mut(), &cfg.parallel, &progress)?;
        progress.finish_and_clear();
        tracing::info!(
            "Loaded {} ({:?}, {}, {} pooling) from {} in {:.2}s",
            mcfg.architecture,
            format,
            dtype.name(),
            pooling.name(),
            cfg.model.display(),
            started.elapsed().as_secs_f64()
        );
        let max_model_len = match cfg.max_model_len {
            0 => model.max_positions(),
            n => n.min(model.max_positions()),
        };
        Ok(Self {
            cfg: mcfg,
            device,
            dtype,
            backend,
            model,
            pooling,
            max_model_len,
            meta: AttentionMetadata::default(),
            input_ids: Vec::new(),
        })
    }

    /// Every scheduled request must be new and scheduled whole; checked
    /// before anything runs so a bad step fails alone.
    fn validate(&self, step: &SchedulerOutput) -> Result<()> {
        if let Some(c) = step.cached_requests.first() {
            return Err(Error::bad_step(
                &c.req_id,
                "a pooling request runs in one step; it cannot continue in another",
            ));
        }
        for (id, n) in &step.num_scheduled_tokens {
            let r = step
                .new_requests
                .iter()
                .find(|r| &r.req_id == id)
                .ok_or_else(|| Error::UnknownRequest { req_id: id.clone() })?;
            let len = r.prompt_token_ids.len();
            if len == 0 {
                return Err(Error::bad_step(id, "empty prompt"));
            }
            if r.num_computed_tokens != 0 || !r.output_token_ids.is_empty() || *n != len {
                return Err(Error::bad_step(
                    id,
                    format!(
                        "a pooling request runs whole in one step: {n} of {len} tokens scheduled after {} computed",
                        r.num_computed_tokens
                    ),
                ));
            }
            if len > self.max_model_len {
                return Err(Error::PositionOutOfRange {
                    position: len - 1,
                    max_len: self.max_model_len,
                });
            }
            if let Some(&token_id) = r
                .prompt_token_ids
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(Error::bad_step(
                    id,
                    Error::TokenOutOfRange {
                        token_id,
                        vocab_size: self.cfg.vocab_size,
                    }
                    .to_string(),
                ));
            }
        }
        Ok(())
    }
}

impl<B: Backend> StepRunner for EncoderRunner<B> {
    fn model_config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn dtype(&self) -> ComputeDtype {
        self.dtype
    }

    fn device(&self) -> Device {
        self.device
    }

    /// An encoder keeps no KV cache.
    fn kv_cache_bytes_per_block(&self) -> usize {
        0
    }

    /// Nothing to allocate: the engine's blocks only count sequences here.
    fn initialize_kv_cache(&mut self, _num_blocks: usize) -> Result<()> {
        Ok(())
    }

    fn num_requests(&self) -> usize {
        0
    }

    fn profile_kv_cache_bytes(
        &mut self,
        _utilization: f64,
        _max_num_batched_tokens: usize,
        _max_num_seqs: usize,
    ) -> Result<Option<KvBudget>> {
        Ok(None)
    }

    fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        self.validate(step)?;
        let mut out = ModelRunnerOutput::default();
        if step.is_empty() {
            return Ok(out);
        }
        let meta = &mut self.meta;
        meta.clear();
        self.input_ids.clear();
        meta.query_start_loc.push(0);
        for (id, _) in &step.num_scheduled_tokens {
            let r = step
                .new_requests
                .iter()
                .find(|r| &r.req_id == id)
                .expect("validated above");
            self.input_ids.extend_from_slice(&r.prompt_token_ids);
            meta.positions
                .extend((0..r.prompt_token_ids.len()).map(|p| p as u32));
            meta.query_start_loc.push(self.input_ids.len());
            meta.seq_lens.push(r.prompt_token_ids.len());
        }
        let inputs = StepInputs {
            input_ids: &self.input_ids,
            meta: &self.meta,
            logits_rows: &[],
        };
        let prepared = self
            .backend
            .prepare_encoder_step(inputs, self.model.max_positions())?;
        let hidden = self.model.forward(&self.backend, &prepared)?;
        let pooled = self.backend.pool(&hidden, &prepared, self.pooling)?;
        let pooled = self.backend.to_host(&pooled)?;
        let width = self.cfg.hidden_size;
        for ((id, _), v) in step
            .num_scheduled_tokens
            .iter()
            .zip(pooled.chunks_exact(width))
        {
            out.req_ids.push(id.clone());
            out.sampled_token_ids.push(None);
            out.logprobs.push(None);
            out.prompt_logprobs.push(Vec::new());
            out.pooled.push(Some(v.to_vec()));
        }
        Ok(out)
    }
}
