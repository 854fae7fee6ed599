//! The BERT encoder (BertModel: BERT, MiniLM, the sentence-transformers
//! models built on them), pooler-free: word + learned position +
//! token-type embeddings and a LayerNorm, then post-norm layers of
//! bidirectional attention and an exact-GELU MLP. Sequences of a step are
//! packed without padding; each attends only to its own tokens.

use indicatif::ProgressBar;

use super::EncoderModel;
use crate::attention::QkvHeads;
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::loader::{HostLinear, HostMatrix, WeightSource};
use crate::parallel::{ParallelConfig, Shard};

struct Layer<B: Backend> {
    /// query | key | value, with their biases.
    qkv: B::Linear,
    attn_out: B::Linear,
    attn_norm: (B::Vector, B::Vector),
    intermediate: B::Linear,
    output: B::Linear,
    out_norm: (B::Vector, B::Vector),
}

pub struct Bert<B: Backend> {
    heads: QkvHeads,
    word: B::Embedding,
    /// Position embeddings with token type 0's embedding added to every
    /// row: single-segment inputs (all an embedding request has) use type 0
    /// at every token, so one lookup serves both.
    position: B::Embedding,
    embed_norm: (B::Vector, B::Vector),
    layers: Vec<Layer<B>>,
    eps: f32,
    scale: f32,
    max_positions: usize,
}

impl<B: Backend> Bert<B> {
    pub fn load(
        backend: &B,
        cfg: &ModelConfig,
        src: &mut dyn WeightSource,
        parallel: &ParallelConfig,
        progress: &ProgressBar,
    ) -> Result<Self> {
        if parallel.tp_size > 1 || parallel.pp_size > 1 {
            return Err(Error::NotImplemented {
                feature: "tensor or pipeline parallelism for encoder (BERT) models".into(),
            });
        }
        match cfg.hidden_act.as_deref() {
            None | Some("gelu") => {}
            Some(other) => {
                return Err(Error::NotImplemented {
                    feature: format!("BERT hidden_act {other:?} (only the exact \"gelu\")"),
                })
            }
        }
        match cfg.position_embedding_type.as_deref() {
            None | Some("absolute") => {}
            Some(other) => {
                return Err(Error::NotImplemented {
                    feature: format!("BERT position_embedding_type {other:?}"),
                })
            }
        }
        if cfg.num_key_value_heads != cfg.num_attention_heads {
            return Err(Error::config(
                "BERT has as many key/value heads as attention heads",
            ));
        }
        // Checkpoints saved from BertForX carry a "bert." prefix.
        let p = if src.contains("embeddings.word_embeddings.weight") {
            ""
        } else {
            "bert."
        };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        if cfg.num_attention_heads * hd != h {
            return Err(Error::config(format!(
                "hidden_size {h} is not num_attention_heads {} x head_dim {hd}",
                cfg.num_attention_heads
            )));
        }
        let full = Shard::Full;
        let table = |src: &mut dyn WeightSource, name: &str, rows: usize| {
            let m = src.matrix(&format!("{p}embeddings.{name}.weight"), (rows, h), &full)?;
            progress.inc(1);
            Ok::<_, Error>(m)
        };
        // The word table goes to the backend as loaded (dummy values are
        // made there); the others are summed on the host first.
        let word = table(src, "word_embeddings", cfg.vocab_size)?;
        let pos = table(src, "position_embeddings", cfg.max_position_embeddings)?.to_dense()?;
        let types = table(src, "token_type_embeddings", cfg.type_vocab_size.max(1))?.to_dense()?;
        let pos = pos.broadcast_add(&types.narrow(0, 0, 1)?)?.contiguous()?;
        let word = backend.upload_embedding(&word, 0)?;
        let position = backend.upload_embedding(&HostMatrix::Dense(pos), 0)?;
        let norm = |src: &mut dyn WeightSource, name: &str| -> Result<(B::Vector, B::Vector)> {
            let w = src.vector(&format!("{name}.weight"), h, &full)?;
            let b = src.vector(&format!("{name}.bias"), h, &full)?;
            progress.inc(1);
            Ok((backend.upload_vector(w)?, backend.upload_vector(b)?))
        };
        let embed_norm = norm(src, &format!("{p}embeddings.LayerNorm"))?;
        let linear = |src: &mut dyn WeightSource,
                      name: &str,
                      out: usize,
                      inp: usize|
         -> Result<HostLinear> {
            let weight = src.matrix(&format!("{name}.weight"), (out, inp), &full)?;
            let bias = Some(src.vector(&format!("{name}.bias"), out, &full)?);
            progress.inc(1);
            Ok(HostLinear { weight, bias })
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{p}encoder.layer.{i}");
            let qkv = ["query", "key", "value"]
                .iter()
                .map(|n| linear(src, &format!("{l}.attention.self.{n}"), h, h))
                .collect::<Result<Vec<_>>>()?;
            let attn_out = linear(src, &format!("{l}.attention.output.dense"), h, h)?;
            let attn_norm = norm(src, &format!("{l}.attention.output.LayerNorm"))?;
            let inter = cfg.intermediate_size;
            let intermediate = linear(src, &format!("{l}.intermediate.dense"), inter, h)?;
            let output = linear(src, &format!("{l}.output.dense"), h, inter)?;
            let out_norm = norm(src, &format!("{l}.output.LayerNorm"))?;
            layers.push(Layer {
                qkv: backend.upload_linear(qkv)?,
                attn_out: backend.upload_linear(vec![attn_out])?,
                attn_norm,
                intermediate: backend.upload_linear(vec![intermediate])?,
                output: backend.upload_linear(vec![output])?,
                out_norm,
            });
        }
        Ok(Bert {
            heads: QkvHeads {
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_attention_heads,
                head_dim: hd,
            },
            word,
            position,
            embed_norm,
            layers,
            eps: cfg.layer_norm_eps as f32,
            scale: 1.0 / (hd as f32).sqrt(),
            max_positions: cfg.max_position_embeddings,
        })
    }
}

/// Tensors `Bert::load` reads, to size the progress bar.
pub fn num_weights(cfg: &ModelConfig) -> usize {
    4 + 8 * cfg.num_hidden_layers
}

impl<B: Backend> EncoderModel<B> for Bert<B> {
    fn max_positions(&self) -> usize {
        self.max_positions
    }

    fn forward(&self, b: &B, step: &B::Step) -> Result<B::Tensor> {
        let mut x = b.embed(&self.word, step)?;
        b.add_position_embeddings(&mut x, &self.position, step)?;
        let mut x = b.layer_norm(&x, None, &self.embed_norm.0, &self.embed_norm.1, self.eps)?;
        for l in &self.layers {
            let qkv = b.linear(&x, &l.qkv)?;
            let a = b.encoder_attention(&qkv, self.heads, step, self.scale)?;
            let a = b.linear(&a, &l.attn_out)?;
            x = b.layer_norm(&a, Some(&x), &l.attn_norm.0, &l.attn_norm.1, self.eps)?;
            let mut m = b.linear(&x, &l.intermediate)?;
            b.gelu(&mut m)?;
            let m = b.linear(&m, &l.output)?;
            x = b.layer_norm(&m, Some(&x), &l.out_norm.0, &l.out_norm.1, self.eps)?;
        }
        Ok(x)
    }
}
