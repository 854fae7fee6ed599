//! One request's state inside the scheduler.

use std::time::Instant;

use worker::SamplingParams;

use super::types::{EngineRequest, FinishReason, StopMatch};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestStatus {
    Waiting,
    Running,
    /// Evicted for recompute; waits again and restarts from token 0.
    Preempted,
    FinishedStopped(StopMatch),
    FinishedLength,
    FinishedAborted,
}

impl RequestStatus {
    pub fn is_finished(&self) -> bool {
        self.finish_reason().is_some()
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        match self {
            RequestStatus::FinishedStopped(m) => Some(FinishReason::Stop(m.clone())),
            RequestStatus::FinishedLength => Some(FinishReason::Length),
            RequestStatus::FinishedAborted => Some(FinishReason::Abort),
            _ => None,
        }
    }

    pub fn from_finish_reason(reason: &FinishReason) -> Self {
        match reason {
            FinishReason::Stop(m) => RequestStatus::FinishedStopped(m.clone()),
            FinishReason::Length => RequestStatus::FinishedLength,
            FinishReason::Abort => RequestStatus::FinishedAborted,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Request {
    pub request_id: String,
    /// Prompt followed by the generated tokens.
    pub all_token_ids: Vec<u32>,
    pub num_prompt_tokens: usize,
    pub sampling_params: SamplingParams,
    /// Resolved: `max_tokens`, or what is left of the context.
    pub max_tokens: usize,
    /// EOS ids of the model (empty when `ignore_eos`), to tell EOS from a stop token id.
    pub eos_token_ids: Vec<u32>,
    pub priority: i32,
    pub arrival_time: Instant,
    /// Admission order, breaks ties between equal arrival times.
    pub arrival_seq: u64,
    pub status: RequestStatus,
    /// Tokens whose KV is in the cache (or will be once the scheduled step runs).
    pub num_computed_tokens: usize,
    /// Prompt tokens served from the prefix cache at first scheduling.
    pub num_cached_tokens: Option<usize>,
    pub num_preemptions: usize,
}

impl Request {
    pub fn new(
        req: EngineRequest,
        max_model_len: usize,
        eos_token_ids: &[u32],
        arrival_seq: u64,
    ) -> Self {
        let EngineRequest {
            request_id,
            prompt_token_ids,
            sampling_params,
            priority,
            arrival_time,
        } = req;
        let num_prompt_tokens = prompt_token_ids.len();
        let room = max_model_len.saturating_sub(num_prompt_tokens);
        let max_tokens = sampling_params.max_tokens.map_or(room, |m| m.min(room));
        let eos_token_ids = if sampling_params.ignore_eos {
            Vec::new()
        } else {
            eos_token_ids.to_vec()
        };
        Self {
            request_id,
            all_token_ids: prompt_token_ids,
            num_prompt_tokens,
            sampling_params,
            max_tokens,
            eos_token_ids,
            priority,
            arrival_time,
            arrival_seq,
            status: RequestStatus::Waiting,
            num_computed_tokens: 0,
            num_cached_tokens: None,
            num_preemptions: 0,
        }
    }

    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.all_token_ids[..self.num_prompt_tokens]
    }

    pub fn output_token_ids(&self) -> &[u32] {
        &self.all_token_ids[self.num_prompt_tokens..]
    }

    pub fn num_tokens(&self) -> usize {
        self.all_token_ids.len()
    }

    pub fn num_output_tokens(&self) -> usize {
        self.all_token_ids.len() - self.num_prompt_tokens
    }

    pub fn is_finished(&self) -> bool {
        self.status.is_finished()
    }

    /// Appends a sampled token and says whether it ends the request (vLLM's
    /// order: length caps first, then `min_tokens`, then EOS, then stop ids).
    pub fn append_and_check_stop(
        &mut self,
        token: u32,
        max_model_len: usize,
    ) -> Option<FinishReason> {
        self.all_token_ids.push(token);
        let reason =
            if self.num_tokens() >= max_model_len || self.num_output_tokens() >= self.max_tokens {
                Some(FinishReason::Length)
            } else if self.num_output_tokens() < self.sampling_params.min_tokens {
                None
            } else if self.eos_token_ids.contains(&token) {
                Some(FinishReason::Stop(StopMatch::Eos))
            } else if self.sampling_params.stop_token_ids.contains(&token) {
                Some(FinishReason::Stop(StopMatch::TokenId(token)))
            } else {
                None
            };
        if let Some(r) = &reason {
            self.status = RequestStatus::from_finish_reason(r);
        }
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(params: SamplingParams) -> Request {
        let r = EngineRequest {
            request_id: "r".into(),
            prompt_token_ids: vec![1, 2, 3],
            sampling_params: params,
            priority: 0,
            arrival_time: Instant::now(),
        };
        Request::new(r, 10, &[0], 0)
    }

    #[test]
    fn stop_conditions_in_vllm_order() {
        // (params, tokens to append, expected reason after the last one)
        let cases: Vec<(SamplingParams, Vec<u32>, Option<FinishReason>)> = vec![
            (
                SamplingParams::default(),
                vec![5, 0],
                Some(FinishReason::Stop(StopMatch::Eos)),
            ),
            (
                SamplingParams {
                    ignore_eos: true,
                    ..Default::default()
                },
                vec![5, 0],
                None,
            ),
            (
                SamplingParams {
                    stop_token_ids: vec![7],
                    ..Default::default()
                },
                vec![7],
                Some(FinishReason::Stop(StopMatch::TokenId(7))),
            ),
            (
                SamplingParams {
                    min_tokens: 3,
                    ..Default::default()
                },
                vec![0, 0],
                None,
            ),
            (
                SamplingParams {
                    max_tokens: Some(2),
                    ..Default::default()
                },
                vec![5, 6],
                Some(FinishReason::Length),
            ),
            // Context of 10 with 3 prompt tokens: the 7th token fills it.
            (
                SamplingParams {
                    max_tokens: None,
                    ..Default::default()
                },
                vec![5; 7],
                Some(FinishReason::Length),
            ),
            // Length wins over EOS on the same token, as in vLLM.
            (
                SamplingParams {
                    max_tokens: Some(1),
                    ..Default::default()
                },
                vec![0],
                Some(FinishReason::Length),
            ),
        ];
        for (i, (params, tokens, want)) in cases.into_iter().enumerate() {
            let mut r = req(params);
            let mut got = None;
            for t in tokens {
                got = r.append_and_check_stop(t, 10);
            }
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn max_tokens_is_capped_by_context() {
        let r = req(SamplingParams {
            max_tokens: Some(100),
            ..Default::default()
        });
        assert_eq!(r.max_tokens, 7);
        assert_eq!(r.prompt_token_ids(), &[1, 2, 3]);
        assert!(r.output_token_ids().is_empty());
    }
}
