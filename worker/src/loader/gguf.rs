//! GGUF files (llama.cpp): linear weights stay quantized; F32/F16/BF16
//! tensors are dequantized. llama.cpp's Q/K row permutation (for the "llama"
//! architecture) is undone here so models use one RoPE layout.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{Device, Tensor};

use super::shard::{
    gather_rows, qtensor_from_bytes, row_bytes, shard_matrix, shard_vector, unpermute_qk_rows,
};
use super::{check_shape, HostMatrix, WeightSource};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::parallel::Shard;

pub struct GgufSource {
    path: PathBuf,
    file: File,
    content: gguf_file::Content,
    /// llama.cpp permutes Q/K rows for the "llama" architecture only.
    permuted_qk: bool,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// HF tensor name -> GGUF tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

impl GgufSource {
    pub fn open(path: &Path, cfg: &ModelConfig) -> Result<Self> {
        let mut file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            Error::config(format!("{}: not a readable GGUF file: {e}", path.display()))
        })?;
        if content.tensor_infos.contains_key("rope_freqs.weight") {
            // Llama 3.1-style GGUFs carry their RoPE scaling as per-frequency factors.
            return Err(Error::NotImplemented {
                feature: format!(
                    "{}: GGUF rope_freqs (Llama 3.1 RoPE scaling) factors",
                    path.display()
                ),
            });
        }
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
            permuted_qk: arch == "llama",
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        })
    }

    fn read(&mut self, hf: &str) -> Result<(String, Arc<candle_core::quantized::QTensor>)> {
        let name = gguf_name(hf).ok_or_else(|| Error::weight(hf, "has no GGUF counterpart"))?;
        if !self.content.tensor_infos.contains_key(&name) {
            return Err(Error::weight(
                hf,
                format!("{} has no tensor {name}", self.path.display()),
            ));
        }
        let q = self
            .content
            .tensor(&mut self.file, &name, &Device::Cpu)
            .map_err(|e| Error::weight(&name, e.to_string()))?;
        Ok((name, Arc::new(q)))
    }

    /// Heads whose rows llama.cpp permuted, if `hf` is a Q or K weight.
    fn permuted_heads(&self, hf: &str) -> Option<usize> {
        if !self.permuted_qk {
            return None;
        }
        if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
            Some(self.num_heads)
        } else if hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.bias") {
            Some(self.num_kv_heads)
        } else {
            None
        }
    }
}

fn is_dense(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

impl WeightSource for GgufSource {
    fn matrix(&mut self, hf: &str, full: (usize, usize), shard: &Shard) -> Result<HostMatrix> {
        let (name, q) = self.read(hf)?;
        check_shape(&name, q.shape().dims(), &[full.0, full.1])?;
        let order = self
            .permuted_heads(hf)
            .map(|h| unpermute_qk_rows(h, self.head_dim));
        let m = if is_dense(q.dtype()) {
            let mut t = q.dequantize(&Device::Cpu)?;
            if let Some(order) = order {
                let idx = Tensor::from_vec(
                    order.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                    order.len(),
                    &Device::Cpu,
                )?;
                t = t.index_select(&idx, 0)?;
            }
            HostMatrix::Dense(t)
        } else if let Some(order) = order {
            let rb = row_bytes(&name, q.dtype(), full.1)?;
            let bytes = gather_rows(&q.data()?, rb, order.into_iter());
            HostMatrix::Quantized(qtensor_from_bytes(&name, bytes, q.dtype(), full.0, full.1)?)
        } else {
            HostMatrix::Quantized(q)
        };
        shard_matrix(&name, m, shard)
    }

    fn vector(&mut self, hf: &str, len: usize, shard: &Shard) -> Result<Vec<f32>> {
        let (name, q) = self.read(hf)?;
        check_shape(&name, q.shape().dims(), &[len])?;
        let mut v: Vec<f32> = q.dequantize(&Device::Cpu)?.to_vec1()?;
        if let Some(h) = self.permuted_heads(hf) {
            v = unpermute_qk_rows(h, self.head_dim)
                .into_iter()
                .map(|r| v[r])
                .collect();
        }
        shard_vector(&name, v, shard)
    }

    fn contains(&self, hf: &str) -> bool {
        gguf_name(hf).is_some_and(|n| self.content.tensor_infos.contains_key(&n))
    }
}

#[cfg(test)]
mod tests {
    use super::gguf_name;

    #[test]
    fn maps_hf_names() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.weight").unwrap(),
            "blk.3.attn_q.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.k_proj.bias").unwrap(),
            "blk.0.attn_k.bias"
        );
        assert_eq!(
            gguf_name("model.layers.11.mlp.down_proj.weight").unwrap(),
            "blk.11.ffn_down.weight"
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").unwrap(),
            "token_embd.weight"
        );
        assert!(gguf_name("model.layers.0.unknown.weight").is_none());
    }
}
