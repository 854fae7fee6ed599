//! From request fields to the engine's `SamplingParams`, as vLLM does it:
//! request value, else the model's generation_config default, else vLLM's.

use worker::config::GenerationConfig;
use worker::SamplingParams;

use super::error::{ApiError, Result};
use super::protocol::SamplingFields;

/// The defaults a model's generation_config.json recommends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub repetition_penalty: Option<f32>,
    pub max_tokens: Option<usize>,
}

impl SamplingDefaults {
    pub fn from_generation_config(g: &GenerationConfig) -> Self {
        Self {
            temperature: g.temperature,
            top_p: g.top_p,
            top_k: g.top_k,
            repetition_penalty: g.repetition_penalty,
            max_tokens: g.max_new_tokens,
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// What differs between completions and chat when building the params.
#[derive(Debug, Clone, Default)]
pub struct EndpointSampling {
    /// `max_tokens` (or chat's `max_completion_tokens`) as requested.
    pub max_tokens: Option<usize>,
    /// Number of top logprobs per generated token, when logprobs are requested.
    pub logprobs: Option<usize>,
    /// Completions echo with logprobs also scores the prompt.
    pub echo_prompt_logprobs: bool,
}

/// vLLM clamps logit bias values to this range.
const LOGIT_BIAS_LIMIT: f64 = 100.0;

pub fn build(
    fields: &SamplingFields,
    endpoint: &EndpointSampling,
    defaults: &SamplingDefaults,
) -> Result<SamplingParams> {
    if fields.use_beam_search == Some(true) {
        return Err(ApiError::NotSupported {
            feature: "Beam search",
            param: "use_beam_search",
            detail: " by this server.".into(),
        });
    }
    let structured_outputs = super::structured_outputs::from_fields(fields)?;
    let vllm = SamplingParams::default();
    let logit_bias = match &fields.logit_bias {
        Some(map) => map
            .iter()
            .map(|(k, v)| {
                let id = k.trim().parse::<u32>().map_err(|_| {
                    ApiError::invalid(
                        format!("logit_bias keys must be token ids as strings, got {k:?}."),
                        Some("logit_bias"),
                    )
                })?;
                if !v.is_finite() {
                    return Err(ApiError::invalid(
                        format!("logit_bias value for token {id} must be a finite number."),
                        Some("logit_bias"),
                    ));
                }
                Ok((id, narrow(v.clamp(-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT))))
            })
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let mut prompt_logprobs = fields.prompt_logprobs;
    if endpoint.echo_prompt_logprobs && prompt_logprobs.is_none() {
        prompt_logprobs = endpoint.logprobs;
    }
    // vLLM takes the smallest of what was asked and what the model recommends.
    let max_tokens = match (endpoint.max_tokens, defaults.max_tokens) {
        (Some(m), Some(d)) => Some(m.min(d)),
        (m, d) => m.or(d),
    };
    Ok(SamplingParams {
        n: fields.n.unwrap_or(1),
        temperature: fields
            .temperature
            .map(narrow)
            .or(defaults.temperature)
            .unwrap_or(vllm.temperature),
        top_p: fields
            .top_p
            .map(narrow)
            .or(defaults.top_p)
            .unwrap_or(vllm.top_p),
        top_k: fields.top_k.or(defaults.top_k).unwrap_or(vllm.top_k),
        min_p: fields.min_p.map(narrow).unwrap_or(vllm.min_p),
        repetition_penalty: fields
            .repetition_penalty
            .map(narrow)
            .or(defaults.repetition_penalty)
            .unwrap_or(vllm.repetition_penalty),
        presence_penalty: fields.presence_penalty.map(narrow).unwrap_or(0.0),
        frequency_penalty: fields.frequency_penalty.map(narrow).unwrap_or(0.0),
        // Negative seeds are accepted (OpenAI's range); the bits are what count.
        seed: fields.seed.map(|s| s as u64),
        max_tokens,
        min_tokens: fields.min_tokens.unwrap_or(0),
        stop: fields
            .stop
            .clone()
            .map(|s| s.into_vec())
            .unwrap_or_default(),
        stop_token_ids: fields.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: fields.ignore_eos.unwrap_or(false),
        include_stop_str_in_output: fields.include_stop_str_in_output.unwrap_or(false),
        skip_special_tokens: fields.skip_special_tokens.unwrap_or(true),
        spaces_between_special_tokens: fields.spaces_between_special_tokens.unwrap_or(true),
        logprobs: endpoint.logprobs,
        prompt_logprobs,
        logit_bias,
        allowed_token_ids: fields.allowed_token_ids.clone(),
        truncate_prompt_tokens: fields.truncate_prompt_tokens,
        all_stop_token_ids: Vec::new(),
        structured_outputs,
    })
}

/// A request's f64 as the engine's f32, rounded away from zero and
/// saturating, so it stays on the same side of every bound `validate`
/// checks (0, ±1, ±2 are exact in f32): 5e-324 stays a positive top_p and
/// 2.0000001 stays a presence_penalty above 2, and a huge temperature
/// (which vLLM accepts) becomes f32::MAX instead of infinity.
pub fn narrow(v: f64) -> f32 {
    let clamped = v.clamp(-(f32::MAX as f64), f32::MAX as f64);
    let nearest = clamped as f32;
    if (nearest as f64).abs() < clamped.abs() {
        // The magnitude is the low 31 bits: one step up is one ulp away from zero.
        f32::from_bits(nearest.to_bits() + 1)
    } else {
        nearest
    }
}

/// Parameters for sample `i` of `n`: seeded samples get `seed + i` so they differ
/// yet stay reproducible.
pub fn for_sample(params: &SamplingParams, i: usize) -> SamplingParams {
    let mut p = params.clone();
    p.n = 1;
    p.seed = params.seed.map(|s| s.wrapping_add(i as u64));
    p
}

/// Checks `best_of` and `n` as vLLM does before fanning out.
pub fn check_n(n: Option<usize>, best_of: Option<usize>) -> Result<usize> {
    let n = n.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::invalid("n must be at least 1, got 0.", Some("n")));
    }
    if n > MAX_N {
        return Err(ApiError::invalid(
            format!("n must be at most {MAX_N}, got {n}."),
            Some("n"),
        ));
    }
    if let Some(b) = best_of {
        if b != n {
            return Err(ApiError::NotSupported {
                feature: "best_of different from n",
                param: "best_of",
                detail: format!(": got best_of={b}, n={n}."),
            });
        }
    }
    Ok(n)
}

/// Bounds the fan-out one request can cause.
pub const MAX_N: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::protocol::Stop;

    #[test]
    fn request_then_generation_config_then_vllm() {
        let fields = SamplingFields {
            top_p: Some(0.5),
            ..Default::default()
        };
        let defaults = SamplingDefaults {
            temperature: Some(0.2),
            top_p: Some(0.9),
            max_tokens: Some(7),
            ..Default::default()
        };
        let p = build(&fields, &EndpointSampling::default(), &defaults).unwrap();
        assert_eq!(p.top_p, 0.5);
        assert_eq!(p.temperature, 0.2);
        assert_eq!(p.repetition_penalty, 1.0);
        assert_eq!(p.max_tokens, Some(7));
        let ep = EndpointSampling {
            max_tokens: Some(3),
            ..Default::default()
        };
        assert_eq!(build(&fields, &ep, &defaults).unwrap().max_tokens, Some(3));
        let ep = EndpointSampling {
            max_tokens: Some(30),
            ..Default::default()
        };
        assert_eq!(build(&fields, &ep, &defaults).unwrap().max_tokens, Some(7));
    }

    #[test]
    fn narrowing_keeps_values_on_their_side_of_bounds() {
        assert!(narrow(5e-324) > 0.0);
        assert!(narrow(-5e-324) < 0.0);
        assert_eq!(narrow(0.0), 0.0);
        assert!(narrow(2.000_000_000_1) > 2.0);
        assert!(narrow(-2.000_000_000_1) < -2.0);
        assert!(narrow(1.000_000_000_1) > 1.0);
        assert_eq!(narrow(1.0), 1.0);
        assert_eq!(narrow(-2.0), -2.0);
        assert!(narrow(0.999_999_999_9) <= 1.0);
        assert_eq!(narrow(1e300), f32::MAX);
        assert_eq!(narrow(-1e300), -f32::MAX);
        assert_eq!(narrow(0.5), 0.5);
    }

    #[test]
    fn logit_bias_and_stop() {
        let mut fields = SamplingFields {
            stop: Some(Stop::One("\n".into())),
            ..Default::default()
        };
        fields.logit_bias = Some([("5".to_string(), 500.0)].into_iter().collect());
        let p = build(
            &fields,
            &EndpointSampling::default(),
            &SamplingDefaults::default(),
        )
        .unwrap();
        assert_eq!(p.logit_bias, vec![(5, 100.0)]);
        assert_eq!(p.stop, vec!["\n".to_string()]);
        fields.logit_bias = Some([("x".to_string(), 1.0)].into_iter().collect());
        let e = build(
            &fields,
            &EndpointSampling::default(),
            &SamplingDefaults::default(),
        )
        .unwrap_err();
        assert_eq!(e.param().as_deref(), Some("logit_bias"));
    }

    #[test]
    fn echo_logprobs_score_the_prompt() {
        let ep = EndpointSampling {
            logprobs: Some(2),
            echo_prompt_logprobs: true,
            ..Default::default()
        };
        let p = build(
            &SamplingFields::default(),
            &ep,
            &SamplingDefaults::default(),
        )
        .unwrap();
        assert_eq!(p.prompt_logprobs, Some(2));
    }

    #[test]
    fn fan_out_seeds_and_best_of() {
        let p = SamplingParams {
            n: 3,
            seed: Some(10),
            ..Default::default()
        };
        assert_eq!(for_sample(&p, 2).seed, Some(12));
        assert_eq!(for_sample(&p, 2).n, 1);
        assert_eq!(check_n(Some(2), Some(2)).unwrap(), 2);
        assert_eq!(
            check_n(Some(2), Some(3)).unwrap_err().param().as_deref(),
            Some("best_of")
        );
        assert!(check_n(Some(0), None).is_err());
    }

    #[test]
    fn structured_outputs_reach_the_params() {
        let fields = SamplingFields {
            response_format: Some(serde_json::json!({"type": "json_object"})),
            ..Default::default()
        };
        let p = build(
            &fields,
            &EndpointSampling::default(),
            &SamplingDefaults::default(),
        )
        .unwrap();
        let so = p.structured_outputs.expect("a constraint");
        assert_eq!(so.param, "response_format");
        // n > 1: every sample carries the constraint (each gets its own matcher).
        let p = SamplingParams {
            n: 2,
            structured_outputs: Some(so),
            ..Default::default()
        };
        assert!(for_sample(&p, 1).structured_outputs.is_some());
    }
}
