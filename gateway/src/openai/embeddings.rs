//! `POST /v1/embeddings` for pooling models (vLLM's shape): inputs as
//! text, texts, token ids or lists of them; `encoding_format` float or
//! base64 (little-endian f32); Matryoshka `dimensions`; truncation. Each
//! input is one engine request, so embeddings batch with everything else
//! the scheduler runs.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use worker::pooling::{self, Matryoshka};
use worker::SamplingParams;

use super::error::{parse_json, ApiError, Result};
use super::fanout;
use super::protocol::Prompt;
use super::state::{base_request_id, unix_now, PoolingModel, SharedState};
use crate::engine::{EngineError, EngineRequest, FinishReason};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

/// Unknown fields are ignored, as vLLM ignores them.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub input: Prompt,
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    pub dimensions: Option<i64>,
    #[serde(default)]
    pub user: Option<String>,
    /// vLLM: keep this many tokens (-1: the model's maximum length).
    #[serde(default)]
    pub truncate_prompt_tokens: Option<i64>,
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    /// vLLM's per-request override of the pooler's normalization.
    #[serde(default)]
    pub normalize: Option<bool>,
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub request_id: Option<String>,
}

/// The output size a request gets: its `dimensions` checked against what
/// the model allows (vLLM's wording), else the pooler's default.
pub fn output_dims(
    requested: Option<i64>,
    model: &PoolingModel,
    model_name: &str,
) -> Result<Option<usize>> {
    let Some(d) = requested else {
        return Ok(model.pooler.dimensions);
    };
    let invalid = |msg: String| ApiError::invalid(msg, Some("dimensions"));
    if let Matryoshka::No = model.pooler.matryoshka {
        return Err(invalid(format!(
            "Model \"{model_name}\" does not support matryoshka representation, changing output dimensions will lead to poor results."
        )));
    }
    if d < 1 {
        return Err(invalid("Dimensions must be greater than 0".into()));
    }
    let d = d as usize;
    if let Matryoshka::Dims(allowed) = &model.pooler.matryoshka {
        if !allowed.contains(&d) {
            return Err(invalid(format!(
                "Model \"{model_name}\" only supports {allowed:?} matryoshka dimensions, use other output dimensions will lead to poor results."
            )));
        }
    }
    if d > model.hidden_size {
        return Err(invalid(format!(
            "dimensions ({d}) is larger than the model's embedding size ({})",
            model.hidden_size
        )));
    }
    Ok(Some(d))
}

/// `truncate_prompt_tokens` resolved: `None` keeps inputs whole.
pub fn truncation(requested: Option<i64>, max_model_len: usize) -> Result<Option<usize>> {
    match requested {
        None => Ok(None),
        Some(-1) => Ok(Some(max_model_len)),
        Some(k) if k < 1 => Err(ApiError::invalid(
            format!("truncate_prompt_tokens must be -1 or a positive integer, got {k}"),
            Some("truncate_prompt_tokens"),
        )),
        Some(k) if k as usize > max_model_len => Err(ApiError::invalid(
            format!(
                "truncate_prompt_tokens value ({k}) is greater than max_model_len ({max_model_len}). Please, select a smaller truncation size."
            ),
            Some("truncate_prompt_tokens"),
        )),
        Some(k) => Ok(Some(k as usize)),
    }
}

/// The inputs as token ids. Texts are tokenized (cut to `truncate` tokens
/// special tokens included, from the right, as HF tokenizers truncate);
/// token lists keep their last `truncate` ids, as vLLM does.
pub fn input_ids(
    input: Prompt,
    tokenizer: &Tokenizer,
    add_special: bool,
    truncate: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    let truncating = match truncate {
        Some(k) => {
            let mut t = tokenizer.inner().clone();
            t.with_truncation(Some(tokenizers::TruncationParams {
                max_length: k,
                ..Default::default()
            }))
            .map_err(|e| ApiError::Internal {
                message: format!("cannot set up truncation: {e}"),
            })?;
            Some(t)
        }
        None => None,
    };
    let encode = |text: String| -> Result<Vec<u32>> {
        match &truncating {
            Some(t) => Ok(t
                .encode_fast(text, add_special)
                .map_err(|e| ApiError::Internal {
                    message: format!("tokenization failed: {e}"),
                })?
                .get_ids()
                .to_vec()),
            None => Ok(tokenizer.encode(&text, add_special)?),
        }
    };
    let keep_last = |mut ids: Vec<u32>| {
        if let Some(k) = truncate {
            if ids.len() > k {
                ids.drain(..ids.len() - k);
            }
        }
        ids
    };
    let inputs = match input {
        Prompt::Text(t) => vec![encode(t)?],
        Prompt::Texts(ts) => ts.into_iter().map(encode).collect::<Result<_>>()?,
        Prompt::Tokens(ids) => vec![keep_last(ids)],
        Prompt::TokenLists(lists) => lists.into_iter().map(keep_last).collect(),
    };
    if inputs.is_empty() {
        return Err(ApiError::invalid("input must not be empty.", Some("input")));
    }
    Ok(inputs)
}

/// The pooled vector as the request wants it: cut to `dims` (Matryoshka),
/// then L2-normalized when the pooler normalizes, as vLLM orders them.
pub fn finish_vector(mut v: Vec<f32>, dims: Option<usize>, normalize: bool) -> Vec<f32> {
    if let Some(d) = dims {
        v.truncate(d);
    }
    if normalize {
        pooling::normalize(&mut v);
    }
    v
}

/// OpenAI's base64 encoding: the little-endian bytes of the f32 values.
pub fn encode_base64(v: &[f32]) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub async fn create_embedding(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    state.require_api("Embeddings")?;
    let Some(pooling) = state.pooling.clone() else {
        return Err(ApiError::invalid(
            "The model does not support Embeddings API",
            None,
        ));
    };
    let req: EmbeddingRequest = parse_json(&body)?;
    let model = state.check_model(req.model.as_deref())?;
    let dims = output_dims(req.dimensions, &pooling, &model)?;
    let truncate = truncation(req.truncate_prompt_tokens, state.max_model_len)?;
    let normalize = req.normalize.unwrap_or(pooling.pooler.normalize);
    let format = req.encoding_format.unwrap_or_default();
    let add_special = req.add_special_tokens.unwrap_or(true);
    let tokenizer = state.tokenizer.clone();
    let input = req.input.clone();
    let inputs =
        tokio::task::spawn_blocking(move || input_ids(input, &tokenizer, add_special, truncate))
            .await
            .map_err(|e| ApiError::Internal {
                message: format!("tokenization task failed: {e}"),
            })??;
    // Every input is checked before any runs: a batch fails whole.
    for ids in &inputs {
        if ids.len() > state.max_model_len {
            return Err(EngineError::EmbeddingInputTooLong {
                max_model_len: state.max_model_len,
                prompt: ids.len(),
            }
            .into());
        }
    }

    let id = format!(
        "embd-{}",
        base_request_id(req.request_id.as_deref(), &headers)
    );
    let arrival = Instant::now();
    let requests: Vec<EngineRequest> = inputs
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            let request_id = if inputs.len() > 1 {
                format!("{id}-{i}")
            } else {
                id.clone()
            };
            if state.log_requests {
                tracing::info!(
                    "Received request {request_id}: embedding of {} tokens: {ids:?}.",
                    ids.len()
                );
            }
            EngineRequest {
                request_id,
                prompt_token_ids: ids.clone(),
                sampling_params: SamplingParams::default(),
                priority: req.priority.unwrap_or(0),
                arrival_time: arrival,
            }
        })
        .collect();
    let mut merged = fanout::submit(&state.engine, requests).await?;
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; inputs.len()];
    while let Some((idx, out)) = merged.next().await {
        let Some(reason) = &out.finished else {
            continue;
        };
        if let Some(e) = &out.error {
            return Err(ApiError::Internal {
                message: format!("The engine failed the request: {e}"),
            });
        }
        match (reason, out.pooled) {
            (FinishReason::Stop(_), Some(v)) => vectors[idx] = Some(v),
            _ => {
                return Err(ApiError::Internal {
                    message: "the engine aborted the embedding request".into(),
                })
            }
        }
    }
    let prompt_tokens: usize = inputs.iter().map(Vec::len).sum();
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let v = finish_vector(v.unwrap_or_default(), dims, normalize);
            let embedding = match format {
                EncodingFormat::Float => json!(v),
                EncodingFormat::Base64 => json!(encode_base64(&v)),
            };
            json!({"index": i, "object": "embedding", "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": "list",
        "created": unix_now(),
        "model": model,
        "data": data,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": null,
        },
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use worker::pooling::{PoolerConfig, PoolingType};

    use super::*;

    fn model(matryoshka: Matryoshka) -> PoolingModel {
        PoolingModel {
            pooler: PoolerConfig {
                pooling_type: PoolingType::Mean,
                normalize: true,
                dimensions: None,
                matryoshka,
            },
            hidden_size: 8,
        }
    }

    #[test]
    fn request_parsing() {
        let parse = |v: Value| parse_json::<EmbeddingRequest>(v.to_string().as_bytes());
        let r = parse(json!({"input": "hi", "model": "m"})).unwrap();
        assert!(matches!(r.input, Prompt::Text(_)));
        assert_eq!(r.encoding_format, None);
        let r = parse(json!({"input": ["a", "b"], "encoding_format": "base64"})).unwrap();
        assert!(matches!(r.input, Prompt::Texts(ref t) if t.len() == 2));
        assert_eq!(r.encoding_format, Some(EncodingFormat::Base64));
        let r = parse(json!({"input": [1, 2, 3]})).unwrap();
        assert!(matches!(r.input, Prompt::Tokens(ref t) if t == &[1, 2, 3]));
        let r = parse(json!({"input": [[1], [2, 3]], "dimensions": 4})).unwrap();
        assert!(matches!(r.input, Prompt::TokenLists(ref t) if t.len() == 2));
        assert_eq!(r.dimensions, Some(4));
        for bad in [
            json!({"input": "x", "encoding_format": "int8"}),
            json!({"input": 3}),
            json!({}),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn dimensions_follow_the_model() {
        let e = output_dims(Some(4), &model(Matryoshka::No), "m").unwrap_err();
        assert!(e.to_string().contains("does not support matryoshka"), "{e}");
        assert_eq!(e.param().as_deref(), Some("dimensions"));
        assert_eq!(
            output_dims(None, &model(Matryoshka::No), "m").unwrap(),
            None
        );
        assert_eq!(
            output_dims(Some(4), &model(Matryoshka::Any), "m").unwrap(),
            Some(4)
        );
        assert!(output_dims(Some(0), &model(Matryoshka::Any), "m").is_err());
        assert!(output_dims(Some(9), &model(Matryoshka::Any), "m").is_err());
        let dims = model(Matryoshka::Dims(vec![2, 8]));
        assert_eq!(output_dims(Some(2), &dims, "m").unwrap(), Some(2));
        let e = output_dims(Some(4), &dims, "m").unwrap_err();
        assert!(e.to_string().contains("only supports [2, 8]"), "{e}");
    }

    #[test]
    fn truncation_values() {
        assert_eq!(truncation(None, 256).unwrap(), None);
        assert_eq!(truncation(Some(-1), 256).unwrap(), Some(256));
        assert_eq!(truncation(Some(10), 256).unwrap(), Some(10));
        let e = truncation(Some(300), 256).unwrap_err();
        assert!(
            e.to_string()
                .contains("is greater than max_model_len (256)"),
            "{e}"
        );
        assert!(truncation(Some(0), 256).is_err());
        assert!(truncation(Some(-2), 256).is_err());
    }

    #[test]
    fn vectors_and_base64() {
        assert_eq!(
            finish_vector(vec![3.0, 4.0, 12.0], Some(2), true),
            vec![0.6, 0.8]
        );
        assert_eq!(finish_vector(vec![3.0, 4.0], None, false), vec![3.0, 4.0]);
        // 1.0f32 is 00 00 80 3f little-endian; -2.0 is 00 00 00 c0.
        assert_eq!(encode_base64(&[1.0]), "AACAPw==");
        assert_eq!(encode_base64(&[1.0, -2.0]), "AACAPwAAAMA=");
    }
}
