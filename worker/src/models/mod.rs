//! Model architectures, each written once against `backend::Backend`.

pub mod bert;
pub mod llama;

use indicatif::ProgressBar;

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv_cache::KvCacheSpec;
use crate::loader::WeightSource;
use crate::parallel::ParallelConfig;

/// HF architecture names this build can run.
pub const SUPPORTED_ARCHITECTURES: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// A decoder-only language model on backend `B`.
pub trait CausalLm<B: Backend>: Send + Sync {
    /// KV cache shape on this rank, for `block_size` and the backend's
    /// element size.
    fn kv_cache_spec(&self, block_size: usize, dtype_bytes: usize) -> KvCacheSpec;

    /// The rotary tables, which `Backend::prepare_step` checks positions against.
    fn rope(&self) -> &B::Rope;

    /// Runs one prepared step through this pipeline stage's layers. The
    /// first stage starts from the step's token ids (`input` is `None`), a
    /// later one from the previous stage's output. The last stage returns the
    /// logits of the step's logits rows ([rows, vocab_size], on the device),
    /// or `None` when the step asks for no logits (prefill chunks that sample
    /// nothing only write their KV); any other stage returns what the next
    /// stage takes in.
    fn forward(
        &self,
        backend: &B,
        step: &B::Step,
        kv: &mut B::KvCache,
        wants_logits: bool,
        input: Option<IntermediateTensors<B>>,
    ) -> Result<StageOutput<B>>;

    fn vocab_size(&self) -> usize;
}

/// What crosses from one pipeline stage to the next, for every token of the
/// step (vLLM's pair): the last layer's MLP output and the residual stream
/// before that output is added, so the next stage's first layer runs its
/// fused add + norm as if the layers were in one process.
pub struct IntermediateTensors<B: Backend> {
    pub hidden: B::Tensor,
    pub residual: B::Tensor,
}

pub enum StageOutput<B: Backend> {
    /// The last stage: logits rows, when the step asked for any.
    Logits(Option<B::Tensor>),
    /// Any other stage: the next stage's input.
    Intermediate(IntermediateTensors<B>),
}

/// Tensors `load_model` reads, to size the progress bar.
pub fn num_weights(cfg: &ModelConfig) -> usize {
    3 + 9 * cfg.num_hidden_layers
}

pub fn load_model<B: Backend>(
    backend: &B,
    cfg: &ModelConfig,
    src: &mut dyn WeightSource,
    parallel: &ParallelConfig,
    max_positions: usize,
    progress: &ProgressBar,
) -> Result<Box<dyn CausalLm<B>>> {
    match cfg.architecture.as_str() {
        "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" => Ok(Box::new(
            llama::Llama::load(backend, cfg, src, parallel, max_positions, progress)?,
        )),
        other if crate::pooling::is_pooling_architecture(other) => Err(Error::config(format!(
            "{other} is a pooling (embedding) model, not a generative one: serve it with --runner pooling (or --convert embed, --task embed)"
        ))),
        other => Err(Error::Unsupported {
            what: "model architecture",
            value: other.to_string(),
            supported: SUPPORTED_ARCHITECTURES.join(", "),
        }),
    }
}

/// An encoder (bidirectional) model on backend `B`: hidden states for
/// every token of a step, with no KV cache (pooling models).
pub trait EncoderModel<B: Backend>: Send + Sync {
    /// Rows of the position table: the longest sequence it can encode.
    fn max_positions(&self) -> usize;

    /// The last layer's hidden states, [tokens, hidden], for a step
    /// prepared by `Backend::prepare_encoder_step`.
    fn forward(&self, backend: &B, step: &B::Step) -> Result<B::Tensor>;
}

pub fn load_encoder<B: Backend>(
    backend: &B,
    cfg: &ModelConfig,
    src: &mut dyn WeightSource,
    parallel: &ParallelConfig,
    progress: &ProgressBar,
) -> Result<Box<dyn EncoderModel<B>>> {
    match cfg.architecture.as_str() {
        "BertModel" => Ok(Box::new(bert::Bert::load(
            backend, cfg, src, parallel, progress,
        )?)),
        other => Err(Error::Unsupported {
            what: "pooling model architecture",
            value: other.to_string(),
            supported: crate::pooling::POOLING_ARCHITECTURES.join(", "),
        }),
    }
}
