//! The step protocol between the engine core and the workers (vLLM v1's shape).
//!
//! One step is a flat, variable-length batch that mixes prefill chunks and
//! decodes. The worker keeps a persistent batch: it remembers each request's
//! tokens, block table and sampler state between steps, appends the tokens it
//! samples itself, and forgets a request when it appears in
//! `finished_req_ids`. A request preempted by the scheduler is listed there
//! too and comes back later as a new request carrying the tokens it had
//! generated so far.

use serde::{Deserialize, Serialize};

use crate::SamplingParams;

pub type RequestId = String;

/// A request the worker has not seen (or has forgotten after preemption).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewRequestData {
    pub req_id: RequestId,
    pub prompt_token_ids: Vec<u32>,
    /// Tokens generated before a preemption; empty for a fresh request.
    /// Penalties and `min_tokens` count these as output, not prompt.
    pub output_token_ids: Vec<u32>,
    pub sampling_params: SamplingParams,
    /// KV cache blocks holding this request's tokens, in order.
    pub block_ids: Vec<u32>,
    /// Tokens whose KV is already in the cache (prefix-cache hits); this
    /// step's tokens start at this position.
    pub num_computed_tokens: usize,
}

/// A request already in the worker's persistent batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CachedRequestData {
    pub req_id: RequestId,
    /// Blocks appended to the request's block table for this step.
    pub new_block_ids: Vec<u32>,
    /// Tokens with KV in the cache before this step; the worker checks it
    /// against its own count.
    pub num_computed_tokens: usize,
    /// The output tokens among this step's scheduled ones: positions
    /// `max(num_computed_tokens, prompt_len) .. num_computed_tokens + n`.
    /// Pipeline stages before the last never sample, so this is how they
    /// learn what the last stage sampled; the last stage already has them.
    #[serde(default)]
    pub new_token_ids: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SchedulerOutput {
    pub new_requests: Vec<NewRequestData>,
    pub cached_requests: Vec<CachedRequestData>,
    /// Tokens to run this step for each scheduled request, in batch order.
    /// For request r the tokens are positions
    /// `num_computed_tokens .. num_computed_tokens + n` of prompt ++ output.
    pub num_scheduled_tokens: Vec<(RequestId, usize)>,
    /// Requests the worker drops before running this step (finished,
    /// aborted or preempted).
    pub finished_req_ids: Vec<RequestId>,
    /// Token bitmasks of the structured-output requests that sample this
    /// step (vLLM v1's `grammar_bitmask`): the engine core owns the
    /// grammars, the worker only applies the masks.
    #[serde(default)]
    pub grammar_bitmask: Option<GrammarBitmask>,
}

/// One bitmask row per listed request: bit `t % 32` of word `t / 32` set
/// means token `t` may be sampled. Tokens past the row (a model vocabulary
/// padded beyond the tokenizer's) are never allowed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GrammarBitmask {
    pub req_ids: Vec<RequestId>,
    pub words_per_row: usize,
    /// `req_ids.len() * words_per_row` words, row after row.
    pub words: Vec<u32>,
}

impl GrammarBitmask {
    pub fn new(words_per_row: usize) -> Self {
        Self {
            words_per_row,
            ..Default::default()
        }
    }

    pub fn push(&mut self, req_id: RequestId, row: &[u32]) {
        debug_assert_eq!(row.len(), self.words_per_row);
        self.req_ids.push(req_id);
        self.words.extend_from_slice(row);
    }

    pub fn row(&self, i: usize) -> &[u32] {
        &self.words[i * self.words_per_row..(i + 1) * self.words_per_row]
    }

    /// Each request's row, by request id.
    pub fn rows(&self) -> impl Iterator<Item = (&str, &[u32])> {
        self.req_ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), self.row(i)))
    }

    /// Checks the shape (a step from the wire is not trusted).
    pub fn is_well_formed(&self) -> bool {
        self.words.len() == self.req_ids.len() * self.words_per_row
    }
}

impl SchedulerOutput {
    pub fn total_num_scheduled_tokens(&self) -> usize {
        self.num_scheduled_tokens.iter().map(|(_, n)| n).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.num_scheduled_tokens.is_empty()
    }
}

/// Log-probability of one chosen token, with the top alternatives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    pub token_id: u32,
    pub logprob: f32,
    /// 1-based rank of `token_id` among all tokens.
    pub rank: usize,
    /// The `k` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelRunnerOutput {
    /// Same order as `SchedulerOutput::num_scheduled_tokens`.
    pub req_ids: Vec<RequestId>,
    /// The token sampled for each request; `None` when this step ran a prefill
    /// chunk that did not reach the end of the known tokens.
    pub sampled_token_ids: Vec<Option<u32>>,
    /// For requests with `logprobs` set and a sampled token.
    pub logprobs: Vec<Option<TokenLogprobs>>,
    /// For requests with `prompt_logprobs` set: entries for the prompt tokens
    /// at indices `start + 1 ..= min(end, prompt_len - 1)` where this step
    /// covered positions `start .. end` (the logprob of prompt token i given
    /// tokens before i, from the logits at position i - 1, so each prompt
    /// token appears in exactly one step). Empty for requests without prompt
    /// logprobs.
    pub prompt_logprobs: Vec<Vec<TokenLogprobs>>,
    /// Pooling models: each request's pooled hidden state (before
    /// normalization, which the engine applies with the request's
    /// `dimensions`). Empty for generative models.
    #[serde(default)]
    pub pooled: Vec<Option<Vec<f32>>>,
}
