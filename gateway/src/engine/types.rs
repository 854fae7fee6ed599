//! What the server hands the engine and what the engine streams back.

use std::time::Instant;

use worker::{SamplingParams, TokenLogprobs};

/// One sequence to generate. The server fans `n > 1` out into several of
/// these (ids `"{id}-{i}"`), so the engine always works on single sequences.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling_params: SamplingParams,
    /// Lower runs first under `--scheduling-policy priority`.
    pub priority: i32,
    pub arrival_time: Instant,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop(StopMatch),
    /// `max_tokens` or the context length.
    Length,
    /// Aborted: client went away or the server is shutting down.
    Abort,
}

/// What ended a request that finished with `stop` (OpenAI `stop_reason`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopMatch {
    Eos,
    TokenId(u32),
    String(String),
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop(_) => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// An incremental update for one request. The stream for a request ends
/// with exactly one output whose `finished` is `Some`.
#[derive(Clone, Debug, Default)]
pub struct RequestOutput {
    pub request_id: String,
    /// Tokens generated since the previous update.
    pub new_token_ids: Vec<u32>,
    /// Text for those tokens. May lag the tokens: text is held back while a
    /// stop string or a UTF-8 sequence could still be forming, and stop
    /// strings are cut unless `include_stop_str_in_output`.
    pub new_text: String,
    /// One entry per new token when `logprobs` was requested.
    pub new_logprobs: Vec<TokenLogprobs>,
    /// Sent once, with the first update, when `prompt_logprobs` was requested;
    /// the first prompt token has no entry (`None`).
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    pub finished: Option<FinishReason>,
    pub num_prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub num_cached_tokens: usize,
    /// Tokens generated so far in total.
    pub num_output_tokens: usize,
    /// Set, with `finished: Some(Abort)`, when the request failed inside the
    /// engine (a worker error or the engine stopping) rather than by a client.
    pub error: Option<String>,
    /// A pooling request's vector, in its final output.
    pub pooled: Option<Vec<f32>>,
}
