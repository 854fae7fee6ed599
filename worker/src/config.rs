//! Model configuration from an HF directory (config.json, generation_config.json)
//! or from GGUF metadata. GGUF metadata is first mapped to the config.json shape
//! so that `hf_overrides` and parsing work the same for both.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::load_format::LoadFormat;

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.x: low frequencies scaled by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// HF architecture name, e.g. "LlamaForCausalLM".
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// Active sliding window, if any (Mistral v0.1, Qwen2 with use_sliding_window).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub torch_dtype: Option<String>,
    /// Encoder (BERT) settings: LayerNorm epsilon, the activation, the
    /// number of token types and the position embedding kind.
    pub layer_norm_eps: f64,
    pub hidden_act: Option<String>,
    pub type_vocab_size: usize,
    pub position_embedding_type: Option<String>,
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Token ids given as an int or a list of ints (HF allows both).
fn token_ids(v: Option<&Value>, key: &str) -> Result<Vec<u32>> {
    let as_id = |x: &Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::config(format!("{key} must be a token id, got {x}")))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(as_id).collect(),
        Some(x) => Ok(vec![as_id(x)?]),
    }
}

fn get_usize(o: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| Error::config(format!("{key} must be a non-negative integer, got {v}"))),
    }
}

fn need_usize(o: &Map<String, Value>, key: &str) -> Result<usize> {
    get_usize(o, key)?.ok_or_else(|| Error::config(format!("config.json lacks {key}")))
}

fn get_f64(o: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::config(format!("{key} must be a number, got {v}"))),
    }
}

fn get_bool(o: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| Error::config(format!("{key} must be a boolean, got {v}"))),
    }
}

fn parse_rope_scaling(v: Option<&Value>) -> Result<Option<RopeScaling>> {
    let o = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(x) => {
            return Err(Error::config(format!(
                "rope_scaling must be an object, got {x}"
            )))
        }
    };
    let kind = o
        .get("rope_type")
        .or_else(|| o.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || {
        get_f64(o, "factor")?
            .map(|f| f as f32)
            .ok_or_else(|| Error::config("rope_scaling lacks factor"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: factor()? })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: get_f64(o, "low_freq_factor")?.unwrap_or(1.0) as f32,
            high_freq_factor: get_f64(o, "high_freq_factor")?.unwrap_or(4.0) as f32,
            original_max_position_embeddings: get_usize(o, "original_max_position_embeddings")?
                .unwrap_or(8192),
        })),
        other => Err(Error::Unsupported {
            what: "rope_scaling type",
            value: other.to_string(),
            supported: "default, linear, llama3".into(),
        }),
    }
}

impl ModelConfig {
    /// Reads the config of `model` (an HF directory or a GGUF file) and applies
    /// `hf_overrides` over it before parsing.
    pub fn load(
        model: &Path,
        load_format: LoadFormat,
        hf_overrides: &Value,
    ) -> Result<ModelConfig> {
        let format = load_format.resolve(model)?;
        let is_gguf_file = model.is_file()
            && (format == LoadFormat::Gguf
                || model
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf")));
        let mut raw = if is_gguf_file {
            let mut f = std::fs::File::open(model).map_err(|source| Error::Io {
                path: model.to_path_buf(),
                source,
            })?;
            let content = gguf_file::Content::read(&mut f).map_err(|e| {
                Error::config(format!(
                    "{}: not a readable GGUF file: {e}",
                    model.display()
                ))
            })?;
            gguf_to_hf_config(
                &content.metadata,
                content.tensor_infos.contains_key("output.weight"),
            )?
        } else {
            read_json(&model.join("config.json"))?
        };
        if !hf_overrides.is_null() {
            if !hf_overrides.is_object() {
                return Err(Error::config(format!(
                    "hf_overrides must be a JSON object, got {hf_overrides}"
                )));
            }
            merge(&mut raw, hf_overrides);
        }
        let mut cfg = Self::from_hf_json(&raw)?;
        if model.is_dir() {
            if let Some(gen) = GenerationConfig::load(model)? {
                for id in gen.eos_token_ids {
                    if !cfg.eos_token_ids.contains(&id) {
                        cfg.eos_token_ids.push(id);
                    }
                }
            }
        }
        Ok(cfg)
    }

    /// Parses a config.json value (after overrides).
    pub fn from_hf_json(raw: &Value) -> Result<ModelConfig> {
        let o = raw
            .as_object()
            .ok_or_else(|| Error::config("config.json must be a JSON object"))?;
        let architecture = o
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::config("config.json lacks \"architectures\" (a list of model class names)")
            })?
            .to_string();
        let hidden_size = need_usize(o, "hidden_size")?;
        let num_attention_heads = need_usize(o, "num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(Error::config("num_attention_heads must be positive"));
        }
        let num_key_value_heads =
            get_usize(o, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = get_usize(o, "head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::config(format!(
                "head_dim must be positive and even, got {head_dim}"
            )));
        }
        let is_qwen2 = architecture == "Qwen2ForCausalLM";
        let sliding_window = match get_usize(o, "sliding_window")? {
            Some(w) if get_bool(o, "use_sliding_window")?.unwrap_or(!is_qwen2) => Some(w),
            _ => None,
        };
        let mut eos_token_ids = token_ids(o.get("eos_token_id"), "eos_token_id")?;
        eos_token_ids.dedup();
        // transformers 5 writes the rotary settings as one `rope_parameters`
        // object (theta and scaling together); older configs have top-level
        // `rope_theta` and `rope_scaling`.
        let (rope_theta, rope_scaling) = match o.get("rope_parameters") {
            Some(Value::Object(p)) => (
                get_f64(p, "rope_theta")?.or(get_f64(o, "rope_theta")?),
                parse_rope_scaling(Some(&Value::Object(p.clone())))?,
            ),
            Some(Value::Null) | None => (
                get_f64(o, "rope_theta")?,
                parse_rope_scaling(o.get("rope_scaling"))?,
            ),
            Some(x) => {
                return Err(Error::config(format!(
                    "rope_parameters must be an object, got {x}"
                )))
            }
        };
        let rope_theta = rope_theta.unwrap_or(10000.0);
        let cfg = ModelConfig {
            architecture,
            vocab_size: need_usize(o, "vocab_size")?,
            hidden_size,
            intermediate_size: need_usize(o, "intermediate_size")?,
            num_hidden_layers: need_usize(o, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: get_f64(o, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: get_usize(o, "max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: get_bool(o, "tie_word_embeddings")?.unwrap_or(false),
            attention_bias: get_bool(o, "attention_bias")?.unwrap_or(is_qwen2),
            sliding_window,
            bos_token_id: token_ids(o.get("bos_token_id"), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids,
            torch_dtype: o
                .get("torch_dtype")
                .or_else(|| o.get("dtype"))
                .and_then(Value::as_str)
                .map(str::to_string),
            layer_norm_eps: get_f64(o, "layer_norm_eps")?.unwrap_or(1e-12),
            hidden_act: o
                .get("hidden_act")
                .and_then(Value::as_str)
                .map(str::to_string),
            type_vocab_size: get_usize(o, "type_vocab_size")?.unwrap_or(0),
            position_embedding_type: o
                .get("position_embedding_type")
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        if cfg.vocab_size == 0 || cfg.hidden_size == 0 || cfg.num_hidden_layers == 0 {
            return Err(Error::config(
                "vocab_size, hidden_size and num_hidden_layers must be positive",
            ));
        }
        Ok(cfg)
    }

    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

fn meta_u64(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<u64>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => v
            .to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x as u64))
            .map(Some)
            .map_err(|_| Error::config(format!("GGUF metadata {key} is not an integer"))),
    }
}

fn meta_f32(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<f32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => v
            .to_f32()
            .or_else(|_| v.to_f64().map(|x| x as f32))
            .map(Some)
            .map_err(|_| Error::config(format!("GGUF metadata {key} is not a float"))),
    }
}

/// Maps GGUF metadata (`general.architecture`, `<arch>.*`, `tokenizer.ggml.*`) to
/// the config.json shape.
pub fn gguf_to_hf_config(
    md: &HashMap<String, gguf_file::Value>,
    has_output_weight: bool,
) -> Result<Value> {
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| Error::config("GGUF metadata lacks general.architecture"))?
        .clone();
    let hf_arch = match arch.as_str() {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        other => {
            return Err(Error::Unsupported {
                what: "GGUF architecture",
                value: other.to_string(),
                supported: "llama, qwen2".into(),
            })
        }
    };
    let need = |k: &str| -> Result<u64> {
        meta_u64(md, &format!("{arch}.{k}"))?
            .ok_or_else(|| Error::config(format!("GGUF metadata lacks {arch}.{k}")))
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = meta_u64(md, &format!("{arch}.attention.head_count_kv"))?.unwrap_or(heads);
    let vocab = match md.get("tokenizer.ggml.tokens") {
        Some(v) => v
            .to_vec()
            .map_err(|_| Error::config("GGUF tokenizer.ggml.tokens is not a list"))?
            .len() as u64,
        None => need("vocab_size")?,
    };
    let mut cfg = json!({
        "architectures": [hf_arch],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": need("context_length")?,
        "rms_norm_eps": meta_f32(md, &format!("{arch}.attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        "rope_theta": meta_f32(md, &format!("{arch}.rope.freq_base"))?.unwrap_or(10000.0),
        "tie_word_embeddings": !has_output_weight,
        "attention_bias": arch == "qwen2",
    });
    let o = cfg.as_object_mut().expect("json! object");
    if let Some(hd) = meta_u64(md, &format!("{arch}.attention.key_length"))? {
        o.insert("head_dim".into(), json!(hd));
    }
    if let Some(bos) = meta_u64(md, "tokenizer.ggml.bos_token_id")? {
        o.insert("bos_token_id".into(), json!(bos));
    }
    if let Some(eos) = meta_u64(md, "tokenizer.ggml.eos_token_id")? {
        o.insert("eos_token_id".into(), json!(eos));
    }
    if let Some(kind) = md
        .get(&format!("{arch}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
    {
        if kind != "none" {
            let factor = meta_f32(md, &format!("{arch}.rope.scaling.factor"))?.unwrap_or(1.0);
            o.insert(
                "rope_scaling".into(),
                json!({"type": kind, "factor": factor}),
            );
        }
    }
    Ok(cfg)
}

/// Defaults from generation_config.json.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
    pub eos_token_ids: Vec<u32>,
}

impl GenerationConfig {
    /// `Ok(None)` when `dir` has no generation_config.json (or is not a directory).
    pub fn load(dir: &Path) -> Result<Option<GenerationConfig>> {
        let path = dir.join("generation_config.json");
        if !dir.is_dir() || !path.is_file() {
            return Ok(None);
        }
        Self::from_json(&read_json(&path)?).map(Some)
    }

    pub fn from_json(raw: &Value) -> Result<GenerationConfig> {
        let o = raw
            .as_object()
            .ok_or_else(|| Error::config("generation_config.json must be a JSON object"))?;
        Ok(GenerationConfig {
            temperature: get_f64(o, "temperature")?.map(|x| x as f32),
            top_p: get_f64(o, "top_p")?.map(|x| x as f32),
            top_k: match o.get("top_k") {
                None | Some(Value::Null) => None,
                Some(v) => {
                    Some(v.as_i64().ok_or_else(|| {
                        Error::config(format!("top_k must be an integer, got {v}"))
                    })? as i32)
                }
            },
            repetition_penalty: get_f64(o, "repetition_penalty")?.map(|x| x as f32),
            max_new_tokens: get_usize(o, "max_new_tokens")?,
            eos_token_ids: token_ids(o.get("eos_token_id"), "eos_token_id")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 256,
            "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": [2, 3],
            "torch_dtype": "bfloat16",
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        })
    }

    #[test]
    fn parses_hf_config() {
        let c = ModelConfig::from_hf_json(&tiny()).unwrap();
        assert_eq!(c.architecture, "LlamaForCausalLM");
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.bos_token_id, Some(1));
        assert!(c.tie_word_embeddings && !c.attention_bias);
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0)
        );
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn transformers5_rope_parameters() {
        // transformers 5 nests theta and scaling in `rope_parameters`; a
        // config read without it would silently run theta 10000.
        let mut raw = tiny();
        merge(
            &mut raw,
            &json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3",
                "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}}),
        );
        let c = ModelConfig::from_hf_json(&raw).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        merge(
            &mut raw,
            &json!({"rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}}),
        );
        let c = ModelConfig::from_hf_json(&raw).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (1000000.0, None));
    }

    #[test]
    fn overrides_merge_before_parsing() {
        let mut raw = tiny();
        merge(
            &mut raw,
            &json!({"architectures": ["Qwen2ForCausalLM"], "rope_scaling": {"factor": 2.0}}),
        );
        let c = ModelConfig::from_hf_json(&raw).unwrap();
        assert_eq!(c.architecture, "Qwen2ForCausalLM");
        assert!(c.attention_bias, "Qwen2 has qkv bias by default");
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 2.0)
        );
    }

    #[test]
    fn load_applies_overrides_and_generation_config() {
        let dir = std::env::temp_dir().join(format!("flotilla-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), tiny().to_string()).unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            json!({"eos_token_id": [3, 7], "temperature": 0.6, "top_p": 0.9}).to_string(),
        )
        .unwrap();
        let c = ModelConfig::load(
            &dir,
            LoadFormat::Auto,
            &json!({"architectures": ["MistralForCausalLM"]}),
        )
        .unwrap();
        assert_eq!(c.architecture, "MistralForCausalLM");
        assert_eq!(c.eos_token_ids, vec![2, 3, 7]);
        let g = GenerationConfig::load(&dir).unwrap().unwrap();
        assert_eq!(g.temperature, Some(0.6));
        assert_eq!(g.top_p, Some(0.9));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let mut raw = tiny();
        merge(
            &mut raw,
            &json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
        );
        let e = ModelConfig::from_hf_json(&raw).unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
        let mut raw = tiny();
        raw.as_object_mut().unwrap().remove("hidden_size");
        assert!(ModelConfig::from_hf_json(&raw)
            .unwrap_err()
            .to_string()
            .contains("hidden_size"));
        let mut raw = tiny();
        merge(&mut raw, &json!({"num_key_value_heads": 3}));
        assert!(ModelConfig::from_hf_json(&raw).is_err());
    }
}
