//! Pooling models (vLLM's `--runner pooling`): how one vector per sequence
//! comes out of an encoder's hidden states. The settings come from the
//! model's sentence-transformers files (modules.json, 1_Pooling/config.json,
//! a Normalize module, sentence_bert_config.json), overridable by vLLM's
//! `--pooler-config` JSON; the pooling itself is pure functions over rows.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// HF architectures served as pooling models (auto-detected as vLLM does
/// for encoder-only `*Model` classes).
pub const POOLING_ARCHITECTURES: &[&str] = &["BertModel"];

pub fn is_pooling_architecture(arch: &str) -> bool {
    POOLING_ARCHITECTURES.contains(&arch)
}

/// vLLM's sequence pooling types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolingType {
    /// The first token's hidden state (BERT's [CLS]).
    Cls,
    /// The average over the sequence's tokens.
    Mean,
    /// The last token's hidden state.
    Last,
}

impl PoolingType {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "CLS" => Ok(Self::Cls),
            "MEAN" => Ok(Self::Mean),
            "LAST" => Ok(Self::Last),
            _ => Err(Error::Unsupported {
                what: "pooling_type",
                value: s.to_string(),
                supported: "CLS, MEAN, LAST".into(),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Cls => "CLS",
            Self::Mean => "MEAN",
            Self::Last => "LAST",
        }
    }
}

/// Which output sizes a model trained with Matryoshka loss allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Matryoshka {
    /// Not a Matryoshka model: `dimensions` is refused.
    No,
    /// Any prefix length (`is_matryoshka: true`).
    Any,
    /// Only these (`matryoshka_dimensions`).
    Dims(Vec<usize>),
}

/// The resolved pooler of a pooling model.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolerConfig {
    pub pooling_type: PoolingType,
    /// L2-normalize the pooled vector (sentence-transformers' Normalize module).
    pub normalize: bool,
    /// Output size when a request gives no `dimensions` (vLLM's
    /// `PoolerConfig.dimensions`); `None`: the hidden size.
    pub dimensions: Option<usize>,
    pub matryoshka: Matryoshka,
}

impl PoolerConfig {
    /// The model's own pooler (sentence-transformers files in `model_dir`,
    /// else vLLM's default for the architecture: CLS, normalized), with the
    /// `--pooler-config` JSON object applied over it.
    pub fn resolve(model_dir: &Path, overrides: &Value) -> Result<Self> {
        let mut cfg = match sentence_transformers_pooler(model_dir)? {
            Some(c) => c,
            None => PoolerConfig {
                pooling_type: PoolingType::Cls,
                normalize: true,
                dimensions: None,
                matryoshka: Matryoshka::No,
            },
        };
        let config_json = model_dir.join("config.json");
        if config_json.is_file() {
            cfg.matryoshka = matryoshka_of(&read_json(&config_json)?)?;
        }
        cfg.apply_overrides(overrides)?;
        Ok(cfg)
    }

    /// vLLM's `PoolerConfig` fields over this one. Fields vLLM has that
    /// Flotilla does not implement are named in the error.
    pub fn apply_overrides(&mut self, overrides: &Value) -> Result<()> {
        let o = match overrides {
            Value::Null => return Ok(()),
            Value::Object(o) => o,
            other => {
                return Err(Error::config(format!(
                    "--pooler-config must be a JSON object, got {other}"
                )))
            }
        };
        for (k, v) in o {
            if v.is_null() {
                continue;
            }
            match k.as_str() {
                "pooling_type" => {
                    let s = v.as_str().ok_or_else(|| {
                        Error::config(format!(
                            "pooler_config.pooling_type must be a string, got {v}"
                        ))
                    })?;
                    self.pooling_type = PoolingType::parse(s)?;
                }
                "normalize" => {
                    self.normalize = v.as_bool().ok_or_else(|| {
                        Error::config(format!(
                            "pooler_config.normalize must be a boolean, got {v}"
                        ))
                    })?;
                }
                "dimensions" => {
                    let d = v.as_u64().filter(|&d| d > 0).ok_or_else(|| {
                        Error::config(format!(
                            "pooler_config.dimensions must be a positive integer, got {v}"
                        ))
                    })?;
                    self.dimensions = Some(d as usize);
                }
                "enable_chunked_processing"
                | "max_embed_len"
                | "softmax"
                | "activation"
                | "use_activation"
                | "step_tag_id"
                | "returned_token_ids"
                | "logit_bias" => {
                    return Err(Error::NotImplemented {
                        feature: format!("pooler_config.{k}"),
                    })
                }
                other => {
                    return Err(Error::Unsupported {
                        what: "pooler_config field",
                        value: other.to_string(),
                        supported: "pooling_type, normalize, dimensions".into(),
                    })
                }
            }
        }
        Ok(())
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

fn matryoshka_of(config: &Value) -> Result<Matryoshka> {
    if let Some(dims) = config.get("matryoshka_dimensions").filter(|v| !v.is_null()) {
        let list = dims
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| {
                Error::config(format!(
                    "matryoshka_dimensions must be a list of integers, got {dims}"
                ))
            })?;
        return Ok(Matryoshka::Dims(list));
    }
    Ok(
        if config.get("is_matryoshka").and_then(Value::as_bool) == Some(true) {
            Matryoshka::Any
        } else {
            Matryoshka::No
        },
    )
}

/// The pooler sentence-transformers would build from `model_dir`: its
/// Pooling module's mode and whether a Normalize module follows. `None`
/// when the directory has no modules.json.
pub fn sentence_transformers_pooler(model_dir: &Path) -> Result<Option<PoolerConfig>> {
    let modules_path = model_dir.join("modules.json");
    if !modules_path.is_file() {
        return Ok(None);
    }
    let modules = read_json(&modules_path)?;
    let modules = modules.as_array().ok_or_else(|| {
        Error::config(format!(
            "{}: expected a list of modules",
            modules_path.display()
        ))
    })?;
    let type_of = |m: &Value| {
        m.get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let pooling = modules
        .iter()
        .find(|m| type_of(m).ends_with(".Pooling") || type_of(m) == "Pooling");
    let normalize = modules
        .iter()
        .any(|m| type_of(m).ends_with(".Normalize") || type_of(m) == "Normalize");
    let Some(pooling) = pooling else {
        return Ok(None);
    };
    let dir = pooling.get("path").and_then(Value::as_str).unwrap_or("");
    let cfg_path = model_dir.join(dir).join("config.json");
    let cfg = read_json(&cfg_path)?;
    Ok(Some(PoolerConfig {
        pooling_type: pooling_mode(&cfg, &cfg_path)?,
        normalize,
        dimensions: None,
        matryoshka: Matryoshka::No,
    }))
}

/// The one pooling mode a sentence-transformers Pooling config turns on.
fn pooling_mode(cfg: &Value, path: &Path) -> Result<PoolingType> {
    if let Some(mode) = cfg.get("pooling_mode").and_then(Value::as_str) {
        return match mode {
            "cls" => Ok(PoolingType::Cls),
            "mean" => Ok(PoolingType::Mean),
            "lasttoken" => Ok(PoolingType::Last),
            other => Err(Error::NotImplemented {
                feature: format!("sentence-transformers pooling mode {other:?}"),
            }),
        };
    }
    let on = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
    let modes = [
        ("pooling_mode_cls_token", Some(PoolingType::Cls)),
        ("pooling_mode_mean_tokens", Some(PoolingType::Mean)),
        ("pooling_mode_lasttoken", Some(PoolingType::Last)),
        ("pooling_mode_max_tokens", None),
        ("pooling_mode_mean_sqrt_len_tokens", None),
        ("pooling_mode_weightedmean_tokens", None),
    ];
    let set: Vec<_> = modes.iter().filter(|(k, _)| on(k)).collect();
    match set.as_slice() {
        [(_, Some(t))] => Ok(*t),
        [(k, None)] => Err(Error::NotImplemented {
            feature: format!("sentence-transformers {k}"),
        }),
        [] => Err(Error::config(format!(
            "{}: no pooling mode is enabled",
            path.display()
        ))),
        _ => Err(Error::NotImplemented {
            feature: format!(
                "several pooling modes at once ({}): concatenated pooling outputs",
                path.display()
            ),
        }),
    }
}

/// The longest input sentence-transformers embeds whole
/// (sentence_bert_config.json's `max_seq_length`), which vLLM takes as the
/// model's length limit.
pub fn sentence_transformers_max_len(model_dir: &Path) -> Result<Option<usize>> {
    let path = model_dir.join("sentence_bert_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    Ok(read_json(&path)?
        .get("max_seq_length")
        .and_then(Value::as_u64)
        .map(|n| n as usize))
}

/// Pools the rows of one sequence's hidden states ([rows, cols], row-major).
pub fn pool_rows(hidden: &[f32], cols: usize, pooling: PoolingType) -> Vec<f32> {
    let rows = hidden.len() / cols.max(1);
    if rows == 0 {
        return vec![0.0; cols];
    }
    match pooling {
        PoolingType::Cls => hidden[..cols].to_vec(),
        PoolingType::Last => hidden[(rows - 1) * cols..rows * cols].to_vec(),
        PoolingType::Mean => {
            let mut sum = vec![0f32; cols];
            for row in hidden.chunks_exact(cols) {
                for (s, v) in sum.iter_mut().zip(row) {
                    *s += v;
                }
            }
            let n = rows as f32;
            sum.iter_mut().for_each(|s| *s /= n);
            sum
        }
    }
}

/// In-place L2 normalization as torch's `F.normalize` does it (the norm
/// clamped at 1e-12, so a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn pools_each_way() {
        // Two rows of three.
        let h = [1.0, 2.0, 3.0, 3.0, 4.0, 5.0];
        assert_eq!(pool_rows(&h, 3, PoolingType::Cls), vec![1.0, 2.0, 3.0]);
        assert_eq!(pool_rows(&h, 3, PoolingType::Last), vec![3.0, 4.0, 5.0]);
        assert_eq!(pool_rows(&h, 3, PoolingType::Mean), vec![2.0, 3.0, 4.0]);
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0, 0.0];
        normalize(&mut z);
        assert_eq!(z, vec![0.0, 0.0]);
    }

    #[test]
    fn sentence_transformers_files() {
        let dir = std::env::temp_dir().join(format!("flotilla-pool-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
        std::fs::write(
            dir.join("modules.json"),
            json!([
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            ])
            .to_string(),
        )
        .unwrap();
        let pooling = |cfg: Value| {
            std::fs::write(dir.join("1_Pooling/config.json"), cfg.to_string()).unwrap();
        };
        pooling(
            json!({"word_embedding_dimension": 4, "pooling_mode_cls_token": false,
                       "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false}),
        );
        std::fs::write(
            dir.join("config.json"),
            json!({"architectures": ["BertModel"], "matryoshka_dimensions": [2, 4]}).to_string(),
        )
        .unwrap();
        std::fs::write(
            dir.join("sentence_bert_config.json"),
            json!({"max_seq_length": 256}).to_string(),
        )
        .unwrap();
        let c = PoolerConfig::resolve(&dir, &Value::Null).unwrap();
        assert_eq!(c.pooling_type, PoolingType::Mean);
        assert!(c.normalize);
        assert_eq!(c.matryoshka, Matryoshka::Dims(vec![2, 4]));
        assert_eq!(sentence_transformers_max_len(&dir).unwrap(), Some(256));

        // The override wins, field by field.
        let c = PoolerConfig::resolve(&dir, &json!({"pooling_type": "CLS"})).unwrap();
        assert_eq!((c.pooling_type, c.normalize), (PoolingType::Cls, true));
        let c = PoolerConfig::resolve(&dir, &json!({"normalize": false, "dimensions": 2})).unwrap();
        assert_eq!(
            (c.pooling_type, c.normalize, c.dimensions),
            (PoolingType::Mean, false, Some(2))
        );
        let e = PoolerConfig::resolve(&dir, &json!({"pooling_type": "MAX"})).unwrap_err();
        assert!(e.to_string().contains("pooling_type"), "{e}");
        let e = PoolerConfig::resolve(&dir, &json!({"bogus": 1})).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");

        pooling(json!({"pooling_mode_max_tokens": true}));
        let e = PoolerConfig::resolve(&dir, &Value::Null).unwrap_err();
        assert!(e.to_string().contains("pooling_mode_max_tokens"), "{e}");
        pooling(json!({"pooling_mode": "lasttoken"}));
        let c = PoolerConfig::resolve(&dir, &Value::Null).unwrap();
        assert_eq!(c.pooling_type, PoolingType::Last);

        // Without sentence-transformers files: vLLM's default (CLS, normalized).
        std::fs::remove_file(dir.join("modules.json")).unwrap();
        let c = PoolerConfig::resolve(&dir, &Value::Null).unwrap();
        assert_eq!((c.pooling_type, c.normalize), (PoolingType::Cls, true));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
