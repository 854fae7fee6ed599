//! Per-request sampling parameters, with vLLM's names, defaults and checks.
//! The engine core and the worker share this one type.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Completions to return for the prompt (the gateway fans these out).
    pub n: usize,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 or -1 keeps every token.
    pub top_k: i32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Makes sampling reproducible for this request whatever else is in the batch.
    pub seed: Option<u64>,
    /// `None`: until the context is full.
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
    pub spaces_between_special_tokens: bool,
    /// Number of top logprobs to return per generated token (0 = only the sampled one).
    pub logprobs: Option<usize>,
    pub prompt_logprobs: Option<usize>,
    pub logit_bias: Vec<(u32, f32)>,
    pub allowed_token_ids: Option<Vec<u32>>,
    /// Keep only the last k prompt tokens.
    pub truncate_prompt_tokens: Option<usize>,
    /// Filled by the engine, not by users: the EOS ids (unless `ignore_eos`) plus
    /// `stop_token_ids`. The sampler masks these until `min_tokens` are out.
    pub all_stop_token_ids: Vec<u32>,
    /// A grammar the output must follow. The engine core compiles it and
    /// sends token bitmasks with each step; workers never read this field
    /// (it does not travel on the step wire).
    pub structured_outputs: Option<StructuredOutputs>,
}

/// What a structured-output request constrains the output to (vLLM's
/// `StructuredOutputsParams`, one constraint at a time).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StructuredOutputRequest {
    /// JSON valid against this JSON schema.
    JsonSchema(serde_json::Value),
    /// Any JSON object.
    JsonObject,
    /// Text matching this regular expression (Rust `regex` syntax).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark-like syntax.
    Grammar(String),
}

/// A constraint with its options and the request field it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StructuredOutputs {
    pub request: StructuredOutputRequest,
    /// JSON only: the whitespace allowed between tokens (a regex), as
    /// vLLM's `guided_whitespace_pattern` / `whitespace_pattern`.
    pub whitespace_pattern: Option<String>,
    /// JSON only: no whitespace between tokens at all (vLLM's
    /// `disable_any_whitespace`).
    #[serde(default)]
    pub disable_any_whitespace: bool,
    /// The request field that asked for it, named in errors
    /// (`response_format`, `guided_json`, `structured_outputs`, ...).
    pub param: String,
}

impl StructuredOutputs {
    pub fn new(request: StructuredOutputRequest, param: impl Into<String>) -> Self {
        Self {
            request,
            whitespace_pattern: None,
            disable_any_whitespace: false,
            param: param.into(),
        }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: Some(16),
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
            logprobs: None,
            prompt_logprobs: None,
            logit_bias: Vec::new(),
            allowed_token_ids: None,
            truncate_prompt_tokens: None,
            all_stop_token_ids: Vec::new(),
            structured_outputs: None,
        }
    }
}

/// Below this temperature sampling is greedy (as vLLM's `_SAMPLING_EPS`).
pub const SAMPLING_EPS: f32 = 1e-5;

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < SAMPLING_EPS
    }

    /// Checks ranges as vLLM does; the message names the parameter so the
    /// gateway can return it as a 400 with `param` set.
    pub fn validate(&self, vocab_size: usize) -> Result<(), InvalidParam> {
        let bad = |param: &'static str, message: String| Err(InvalidParam { param, message });
        if self.n < 1 {
            return bad("n", format!("n must be at least 1, got {}.", self.n));
        }
        if self.temperature < 0.0 || !self.temperature.is_finite() {
            return bad(
                "temperature",
                format!(
                    "temperature must be non-negative, got {}.",
                    self.temperature
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                format!("top_p must be in (0, 1], got {}.", self.top_p),
            );
        }
        if self.top_k < -1 {
            return bad(
                "top_k",
                format!(
                    "top_k must be 0 or -1 (disable), or at least 1, got {}.",
                    self.top_k
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(
                "min_p",
                format!("min_p must be in [0, 1], got {}.", self.min_p),
            );
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be greater than zero, got {}.",
                    self.repetition_penalty
                ),
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(
                "presence_penalty",
                format!(
                    "presence_penalty must be in [-2, 2], got {}.",
                    self.presence_penalty
                ),
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(
                "frequency_penalty",
                format!(
                    "frequency_penalty must be in [-2, 2], got {}.",
                    self.frequency_penalty
                ),
            );
        }
        if let Some(m) = self.max_tokens {
            if m < 1 {
                return bad(
                    "max_tokens",
                    format!("max_tokens must be at least 1, got {m}."),
                );
            }
            if self.min_tokens > m {
                return bad(
                    "min_tokens",
                    format!(
                        "min_tokens must be less than or equal to max_tokens={m}, got {}.",
                        self.min_tokens
                    ),
                );
            }
        }
        if let Some(k) = self.logprobs {
            if k > MAX_LOGPROBS {
                return bad(
                    "logprobs",
                    format!("Requested sample logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}"),
                );
            }
        }
        if let Some(k) = self.prompt_logprobs {
            if k > MAX_LOGPROBS {
                return bad(
                    "prompt_logprobs",
                    format!("Requested prompt logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}"),
                );
            }
        }
        if let Some(k) = self.truncate_prompt_tokens {
            if k < 1 {
                return bad(
                    "truncate_prompt_tokens",
                    format!("truncate_prompt_tokens must be at least 1, got {k}."),
                );
            }
        }
        let out_of_vocab = |mut ids: &mut dyn Iterator<Item = u32>| {
            Iterator::find(&mut ids, |&t| t as usize >= vocab_size)
        };
        if let Some(t) = out_of_vocab(&mut self.logit_bias.iter().map(|(t, _)| *t)) {
            return bad(
                "logit_bias",
                format!("token_id {t} in logit_bias is out of vocabulary (size {vocab_size})."),
            );
        }
        if let Some(ids) = &self.allowed_token_ids {
            if ids.is_empty() {
                return bad(
                    "allowed_token_ids",
                    "allowed_token_ids is not allowed to be empty.".into(),
                );
            }
            if let Some(t) = out_of_vocab(&mut ids.iter().copied()) {
                return bad(
                    "allowed_token_ids",
                    format!("allowed_token_ids contains out-of-vocab token id {t}."),
                );
            }
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop", "stop cannot contain an empty string.".into());
        }
        Ok(())
    }
}

/// Most logprobs one request may ask for (vLLM's default `max_logprobs`).
pub const MAX_LOGPROBS: usize = 20;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidParam {
    pub param: &'static str,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(SamplingParams::default().validate(100).is_ok());
        assert!(SamplingParams::greedy().is_greedy());
    }

    #[test]
    fn bad_values_name_their_param() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_k: -2,
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    max_tokens: Some(0),
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..Default::default()
                },
                "logprobs",
            ),
            (
                SamplingParams {
                    logit_bias: vec![(100, 1.0)],
                    ..Default::default()
                },
                "logit_bias",
            ),
            (
                SamplingParams {
                    stop: vec![String::new()],
                    ..Default::default()
                },
                "stop",
            ),
        ];
        for (p, param) in cases {
            assert_eq!(p.validate(100).unwrap_err().param, param);
        }
    }
}
