//! One API request becomes several engine requests (prompts × n); their
//! output streams are merged here and folded into per-choice state.

use futures::stream::{BoxStream, SelectAll, StreamExt};
use worker::TokenLogprobs;

use super::error::{ApiError, Result};
use super::protocol::Usage;
use crate::engine::{EngineClient, EngineRequest, FinishReason, RequestOutput, StopMatch};

/// Outputs of all choices, tagged with the choice index. Dropping it drops
/// every engine stream, which aborts the requests still running.
pub type MergedStream = SelectAll<BoxStream<'static, (usize, RequestOutput)>>;

/// Submits the requests in choice order. On an error the ones already
/// submitted are dropped, hence aborted.
pub async fn submit(engine: &EngineClient, requests: Vec<EngineRequest>) -> Result<MergedStream> {
    let mut merged = SelectAll::new();
    for (idx, req) in requests.into_iter().enumerate() {
        let stream = engine.add_request(req).await?;
        merged.push(stream.map(move |out| (idx, out)).boxed());
    }
    Ok(merged)
}

/// Everything known about one choice so far.
#[derive(Debug, Default, Clone)]
pub struct ChoiceState {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprobs>,
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    pub finished: Option<FinishReason>,
    pub num_prompt_tokens: usize,
    pub num_cached_tokens: usize,
    pub num_output_tokens: usize,
    /// The engine failed this request (not a client abort).
    pub error: Option<String>,
    /// Whether any output has arrived (streams send the echo/role first).
    pub started: bool,
}

impl ChoiceState {
    /// The API error for a request the engine failed (not a client abort).
    pub fn failure(&self) -> Option<ApiError> {
        self.error.as_ref().map(|e| ApiError::Internal {
            message: format!("The engine failed the request: {e}"),
        })
    }

    pub fn apply(&mut self, out: &RequestOutput) {
        self.started = true;
        self.text.push_str(&out.new_text);
        self.token_ids.extend_from_slice(&out.new_token_ids);
        self.logprobs.extend(out.new_logprobs.iter().cloned());
        if out.prompt_logprobs.is_some() {
            self.prompt_logprobs = out.prompt_logprobs.clone();
        }
        if out.finished.is_some() {
            self.finished = out.finished.clone();
        }
        self.num_prompt_tokens = out.num_prompt_tokens;
        self.num_cached_tokens = out.num_cached_tokens;
        self.num_output_tokens = out.num_output_tokens;
        if out.error.is_some() {
            self.error = out.error.clone();
        }
    }
}

/// OpenAI's `stop_reason` (vLLM's extension): the matched stop string or
/// token id; null for EOS, length and abort.
pub fn stop_reason(finish: &Option<FinishReason>) -> Option<serde_json::Value> {
    match finish {
        Some(FinishReason::Stop(StopMatch::String(s))) => Some(s.clone().into()),
        Some(FinishReason::Stop(StopMatch::TokenId(t))) => Some((*t).into()),
        _ => None,
    }
}

pub fn finish_reason(finish: &Option<FinishReason>) -> Option<String> {
    finish.as_ref().map(|f| f.as_str().to_string())
}

/// Usage over all choices: prompt tokens count once per prompt (not per
/// sample), output tokens for every choice.
pub fn usage(choices: &[ChoiceState], n: usize) -> Usage {
    let n = n.max(1);
    let prompt: usize = choices.iter().step_by(n).map(|c| c.num_prompt_tokens).sum();
    let cached: usize = choices.iter().step_by(n).map(|c| c.num_cached_tokens).sum();
    let completion: usize = choices.iter().map(|c| c.num_output_tokens).sum();
    Usage::new(prompt, completion, cached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_prompts_once() {
        let c = |p, o, cached| ChoiceState {
            num_prompt_tokens: p,
            num_output_tokens: o,
            num_cached_tokens: cached,
            ..Default::default()
        };
        let u = usage(&[c(5, 2, 0), c(5, 3, 4), c(7, 1, 0), c(7, 1, 0)], 2);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (12, 7, 19)
        );
        assert!(u.prompt_tokens_details.is_none());
    }

    #[test]
    fn stop_reasons() {
        let s = Some(FinishReason::Stop(StopMatch::String("\n".into())));
        assert_eq!(stop_reason(&s), Some("\n".into()));
        assert_eq!(finish_reason(&s).as_deref(), Some("stop"));
        let t = Some(FinishReason::Stop(StopMatch::TokenId(2)));
        assert_eq!(stop_reason(&t), Some(2.into()));
        assert_eq!(stop_reason(&Some(FinishReason::Length)), None);
    }

    #[test]
    fn apply_accumulates() {
        let mut s = ChoiceState::default();
        s.apply(&RequestOutput {
            new_text: "Pa".into(),
            new_token_ids: vec![1],
            num_prompt_tokens: 3,
            num_output_tokens: 1,
            ..Default::default()
        });
        s.apply(&RequestOutput {
            new_text: "ris".into(),
            new_token_ids: vec![2],
            num_output_tokens: 2,
            num_prompt_tokens: 3,
            finished: Some(FinishReason::Length),
            ..Default::default()
        });
        assert_eq!(s.text, "Paris");
        assert_eq!(s.token_ids, vec![1, 2]);
        assert_eq!(s.finished, Some(FinishReason::Length));
    }
}
