//! The Llama graph: LlamaForCausalLM (Llama 2/3, SmolLM2, TinyLlama),
//! MistralForCausalLM (same graph) and Qwen2ForCausalLM (q/k/v bias).
//! Column-parallel q/k/v and gate/up, row-parallel o and down,
//! vocab-parallel embedding and LM head.

use indicatif::ProgressBar;

use super::{CausalLm, IntermediateTensors, StageOutput};
use crate::attention::QkvHeads;
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv_cache::KvCacheSpec;
use crate::loader::{HostLinear, WeightSource};
use crate::parallel::{ParallelConfig, Shard};
use crate::rope::RopeTable;

struct Layer<B: Backend> {
    input_norm: B::Vector,
    /// q | k | v heads of this rank, side by side.
    qkv: B::Linear,
    o: B::Linear,
    post_norm: B::Vector,
    /// gate | up columns of this rank.
    gate_up: B::Linear,
    down: B::Linear,
}

/// One pipeline stage of the model (the whole model without pipeline
/// parallelism): its layers, the embedding on the first stage, the final
/// norm and LM head on the last.
pub struct Llama<B: Backend> {
    heads: QkvHeads,
    embed: Option<B::Embedding>,
    layers: Vec<Layer<B>>,
    /// The final norm and the LM head (last stage only).
    head: Option<(B::Vector, B::Linear)>,
    rope: B::Rope,
    eps: f32,
    scale: f32,
    vocab_size: usize,
}

impl<B: Backend> Llama<B> {
    pub fn load(
        backend: &B,
        cfg: &ModelConfig,
        src: &mut dyn WeightSource,
        parallel: &ParallelConfig,
        max_positions: usize,
        progress: &ProgressBar,
    ) -> Result<Self> {
        if let Some(w) = cfg.sliding_window {
            if w < max_positions {
                return Err(Error::NotImplemented {
                    feature: format!("sliding-window attention (window {w} < max model length {max_positions}); lower --max-model-len to {w}"),
                });
            }
        }
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let q_heads = parallel.even_shard("attention heads", cfg.num_attention_heads)?;
        let kv_heads = parallel.kv_head_shard(cfg.num_key_value_heads)?;
        let ffn = parallel.even_shard("intermediate size", cfg.intermediate_size)?;
        let vocab = parallel.vocab_shard(cfg.vocab_size);
        let heads = QkvHeads {
            num_heads: q_heads.len(),
            num_kv_heads: kv_heads.len(),
            head_dim: hd,
        };
        let rows = |r: &std::ops::Range<usize>| Shard::Rows(r.start * hd..r.end * hd);
        let column = |src: &mut dyn WeightSource,
                      name: &str,
                      out: usize,
                      shard: Shard,
                      bias: bool|
         -> Result<HostLinear> {
            let weight = src.matrix(&format!("{name}.weight"), (out, h), &shard)?;
            let bias = if bias {
                Some(src.vector(&format!("{name}.bias"), out, &shard)?)
            } else {
                None
            };
            progress.inc(1);
            Ok(HostLinear { weight, bias })
        };

        let stage = parallel.layer_range(cfg.num_hidden_layers)?;
        let (first, last) = (parallel.is_first_stage(), parallel.is_last_stage());
        // The last stage reads the embedding too when the LM head is tied to it.
        let embed_w = if first || (last && cfg.tie_word_embeddings) {
            let w = src.matrix(
                "model.embed_tokens.weight",
                (cfg.vocab_size, h),
                &Shard::Rows(vocab.clone()),
            )?;
            progress.inc(1);
            Some(w)
        } else {
            None
        };
        let embed = match (&embed_w, first) {
            (Some(w), true) => Some(backend.upload_embedding(w, vocab.start)?),
            _ => None,
        };
        let mut layers = Vec::with_capacity(stage.len());
        for i in stage {
            let p = format!("model.layers.{i}");
            let b = cfg.attention_bias;
            let q = column(
                src,
                &format!("{p}.self_attn.q_proj"),
                cfg.q_size(),
                rows(&q_heads),
                b,
            )?;
            let k = column(
                src,
                &format!("{p}.self_attn.k_proj"),
                cfg.kv_size(),
                rows(&kv_heads),
                b,
            )?;
            let v = column(
                src,
                &format!("{p}.self_attn.v_proj"),
                cfg.kv_size(),
                rows(&kv_heads),
                b,
            )?;
            let o = src.matrix(
                &format!("{p}.self_attn.o_proj.weight"),
                (h, cfg.q_size()),
                &Shard::Cols(q_heads.start * hd..q_heads.end * hd),
            )?;
            let gate = column(
                src,
                &format!("{p}.mlp.gate_proj"),
                cfg.intermediate_size,
                Shard::Rows(ffn.clone()),
                false,
            )?;
            let up = column(
                src,
                &format!("{p}.mlp.up_proj"),
                cfg.intermediate_size,
                Shard::Rows(ffn.clone()),
                false,
            )?;
            let down = src.matrix(
                &format!("{p}.mlp.down_proj.weight"),
                (h, cfg.intermediate_size),
                &Shard::Cols(ffn.clone()),
            )?;
            let input_norm = src.vector(&format!("{p}.input_layernorm.weight"), h, &Shard::Full)?;
            let post_norm = src.vector(
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                &Shard::Full,
            )?;
            progress.inc(4);
            layers.push(Layer {
                input_norm: backend.upload_vector(input_norm)?,
                qkv: backend.upload_linear(vec![q, k, v])?,
                o: backend.upload_linear(vec![HostLinear {
                    weight: o,
                    bias: None,
                }])?,
                post_norm: backend.upload_vector(post_norm)?,
                gate_up: backend.upload_linear(vec![gate, up])?,
                down: backend.upload_linear(vec![HostLinear {
                    weight: down,
                    bias: None,
                }])?,
            });
        }
        let head = if last {
            let norm =
                backend.upload_vector(src.vector("model.norm.weight", h, &Shard::Full)?)?;
            let head_w = match embed_w {
                Some(w) if cfg.tie_word_embeddings => w,
                _ => src.matrix("lm_head.weight", (cfg.vocab_size, h), &Shard::Rows(vocab))?,
            };
            progress.inc(2);
            let lm_head = backend.upload_linear(vec![HostLinear {
                weight: head_w,
                bias: None,
            }])?;
            Some((norm, lm_head))
        } else {
            None
        };
        Ok(Self {
            heads,
            embed,
            layers,
            head,
            rope: backend.upload_rope(RopeTable::new(cfg, max_positions))?,
            eps: cfg.rms_norm_eps as f32,
            scale: 1.0 / (hd as f32).sqrt(),
            vocab_size: cfg.vocab_size,
        })
    }
}

impl<B: Backend> CausalLm<B> for Llama<B> {
    fn kv_cache_spec(&self, block_size: usize, dtype_bytes: usize) -> KvCacheSpec {
        KvCacheSpec {
            num_layers: self.layers.len(),
            num_kv_heads: self.heads.num_kv_heads,
            head_dim: self.heads.head_dim,
            block_size,
            dtype_bytes,
        }
    }

    fn rope(&self) -> &B::Rope {
        &self.rope
    }

    fn forward(
        &self,
        b: &B,
        step: &B::Step,
        kv: &mut B::KvCache,
        wants_logits: bool,
        input: Option<IntermediateTensors<B>>,
    ) -> Result<StageOutput<B>> {
        let stage_input = |what: &str| Error::config(format!("pipeline stage input: {what}"));
        let first_norm = &self.layers[0].input_norm;
        let (mut residual, mut x) = match (input, &self.embed) {
            (None, Some(embed)) => {
                let mut residual = b.embed(embed, step)?;
                b.all_reduce(&mut residual)?;
                let x = b.rms_norm(&residual, first_norm, self.eps)?;
                (residual, x)
            }
            (Some(t), None) => {
                let mut residual = t.residual;
                let x = b.add_rms_norm(&mut residual, &t.hidden, first_norm, self.eps)?;
                (residual, x)
            }
            (None, None) => {
                return Err(stage_input(
                    "a later stage needs the previous stage's output",
                ))
            }
            (Some(_), Some(_)) => return Err(stage_input("the first stage starts from token ids")),
        };
        let last = self.layers.len() - 1;
        let is_last_stage = self.head.is_some();
        for (i, l) in self.layers.iter().enumerate() {
            let mut qkv = b.linear(&x, &l.qkv)?;
            b.rotary(&mut qkv, self.heads, step, &self.rope)?;
            b.write_kv(kv, i, &qkv, self.heads, step)?;
            if i == last && is_last_stage && !wants_logits {
                // A prefill chunk that samples nothing only needs its KV.
                return Ok(StageOutput::Logits(None));
            }
            let mut attn = b.attention(kv, i, &qkv, self.heads, step, self.scale)?;
            if i == last && is_last_stage {
                // Only the rows that need logits go through the rest.
                attn = b.gather_logits_rows(&attn, step)?;
                residual = b.gather_logits_rows(&residual, step)?;
            }
            let mut o = b.linear(&attn, &l.o)?;
            b.all_reduce(&mut o)?;
            x = b.add_rms_norm(&mut residual, &o, &l.post_norm, self.eps)?;
            let act = b.silu_mul(&b.linear(&x, &l.gate_up)?)?;
            let mut down = b.linear(&act, &l.down)?;
            b.all_reduce(&mut down)?;
            let next_norm = match (self.layers.get(i + 1), &self.head) {
                (Some(next), _) => &next.input_norm,
                (None, Some((norm, _))) => norm,
                // The next stage adds `down` with its own first layer's norm.
                (None, None) => {
                    return Ok(StageOutput::Intermediate(IntermediateTensors {
                        hidden: down,
                        residual,
                    }))
                }
            };
            x = b.add_rms_norm(&mut residual, &down, next_norm, self.eps)?;
        }
        let (_, lm_head) = self.head.as_ref().expect("only the last stage gets here");
        let logits = b.linear(&x, lm_head)?;
        Ok(StageOutput::Logits(Some(b.all_gather_cols(logits)?)))
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}
