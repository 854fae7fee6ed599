//! Conversions between the step protocol's types (`crate::step`) and their
//! protobuf mirrors in `proto::worker`: the one place where the two meet, so
//! the executor and the worker binary cannot disagree on a field.

use proto::worker as pb;

use crate::error::{Error, Result};
use crate::sampling_params::SamplingParams;
use crate::step::{
    CachedRequestData, GrammarBitmask, ModelRunnerOutput, NewRequestData, SchedulerOutput,
    TokenLogprobs,
};

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl From<&SchedulerOutput> for pb::SchedulerOutput {
    fn from(s: &SchedulerOutput) -> Self {
        pb::SchedulerOutput {
            new_requests: s.new_requests.iter().map(Into::into).collect(),
            cached_requests: s
                .cached_requests
                .iter()
                .map(|c| pb::CachedRequestData {
                    req_id: c.req_id.clone(),
                    new_block_ids: c.new_block_ids.clone(),
                    num_computed_tokens: c.num_computed_tokens as u64,
                    new_token_ids: c.new_token_ids.clone(),
                })
                .collect(),
            num_scheduled_tokens: s
                .num_scheduled_tokens
                .iter()
                .map(|(id, n)| pb::ScheduledTokens {
                    req_id: id.clone(),
                    num_tokens: *n as u64,
                })
                .collect(),
            finished_req_ids: s.finished_req_ids.clone(),
            grammar_bitmask: s.grammar_bitmask.as_ref().map(|g| pb::GrammarBitmask {
                req_ids: g.req_ids.clone(),
                words_per_row: g.words_per_row as u64,
                words: g.words.clone(),
            }),
        }
    }
}

impl TryFrom<pb::SchedulerOutput> for SchedulerOutput {
    type Error = Error;
    fn try_from(s: pb::SchedulerOutput) -> Result<Self> {
        Ok(SchedulerOutput {
            new_requests: s
                .new_requests
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
            cached_requests: s
                .cached_requests
                .into_iter()
                .map(|c| CachedRequestData {
                    req_id: c.req_id,
                    new_block_ids: c.new_block_ids,
                    num_computed_tokens: to_usize(c.num_computed_tokens),
                    new_token_ids: c.new_token_ids,
                })
                .collect(),
            num_scheduled_tokens: s
                .num_scheduled_tokens
                .into_iter()
                .map(|t| (t.req_id, to_usize(t.num_tokens)))
                .collect(),
            finished_req_ids: s.finished_req_ids,
            grammar_bitmask: s.grammar_bitmask.map(|g| GrammarBitmask {
                req_ids: g.req_ids,
                words_per_row: to_usize(g.words_per_row),
                words: g.words,
            }),
        })
    }
}

impl From<&NewRequestData> for pb::NewRequestData {
    fn from(r: &NewRequestData) -> Self {
        pb::NewRequestData {
            req_id: r.req_id.clone(),
            prompt_token_ids: r.prompt_token_ids.clone(),
            output_token_ids: r.output_token_ids.clone(),
            sampling_params: Some((&r.sampling_params).into()),
            block_ids: r.block_ids.clone(),
            num_computed_tokens: r.num_computed_tokens as u64,
        }
    }
}

impl TryFrom<pb::NewRequestData> for NewRequestData {
    type Error = Error;
    fn try_from(r: pb::NewRequestData) -> Result<Self> {
        let params = r
            .sampling_params
            .ok_or_else(|| Error::bad_step(&r.req_id, "the step carries no sampling params"))?;
        Ok(NewRequestData {
            req_id: r.req_id,
            prompt_token_ids: r.prompt_token_ids,
            output_token_ids: r.output_token_ids,
            sampling_params: params.into(),
            block_ids: r.block_ids,
            num_computed_tokens: to_usize(r.num_computed_tokens),
        })
    }
}

impl From<&SamplingParams> for pb::SamplingParams {
    fn from(p: &SamplingParams) -> Self {
        let opt = |v: Option<usize>| v.map(|v| v as u64);
        pb::SamplingParams {
            n: p.n as u64,
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed,
            max_tokens: opt(p.max_tokens),
            min_tokens: p.min_tokens as u64,
            stop: p.stop.clone(),
            stop_token_ids: p.stop_token_ids.clone(),
            ignore_eos: p.ignore_eos,
            include_stop_str_in_output: p.include_stop_str_in_output,
            skip_special_tokens: p.skip_special_tokens,
            spaces_between_special_tokens: p.spaces_between_special_tokens,
            logprobs: opt(p.logprobs),
            prompt_logprobs: opt(p.prompt_logprobs),
            logit_bias: p
                .logit_bias
                .iter()
                .map(|&(token_id, bias)| pb::LogitBias { token_id, bias })
                .collect(),
            allowed_token_ids: p
                .allowed_token_ids
                .as_ref()
                .map(|ids| pb::TokenIds { ids: ids.clone() }),
            truncate_prompt_tokens: opt(p.truncate_prompt_tokens),
            all_stop_token_ids: p.all_stop_token_ids.clone(),
        }
    }
}

impl From<pb::SamplingParams> for SamplingParams {
    fn from(p: pb::SamplingParams) -> Self {
        let opt = |v: Option<u64>| v.map(to_usize);
        SamplingParams {
            n: to_usize(p.n),
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed,
            max_tokens: opt(p.max_tokens),
            min_tokens: to_usize(p.min_tokens),
            stop: p.stop,
            stop_token_ids: p.stop_token_ids,
            ignore_eos: p.ignore_eos,
            include_stop_str_in_output: p.include_stop_str_in_output,
            skip_special_tokens: p.skip_special_tokens,
            spaces_between_special_tokens: p.spaces_between_special_tokens,
            logprobs: opt(p.logprobs),
            prompt_logprobs: opt(p.prompt_logprobs),
            logit_bias: p
                .logit_bias
                .into_iter()
                .map(|b| (b.token_id, b.bias))
                .collect(),
            allowed_token_ids: p.allowed_token_ids.map(|t| t.ids),
            truncate_prompt_tokens: opt(p.truncate_prompt_tokens),
            all_stop_token_ids: p.all_stop_token_ids,
            // The engine core keeps the grammar; workers get its bitmasks.
            structured_outputs: None,
        }
    }
}

impl From<&TokenLogprobs> for pb::TokenLogprobs {
    fn from(t: &TokenLogprobs) -> Self {
        pb::TokenLogprobs {
            token_id: t.token_id,
            logprob: t.logprob,
            rank: t.rank as u64,
            top: t
                .top
                .iter()
                .map(|&(token_id, logprob)| pb::TopLogprob { token_id, logprob })
                .collect(),
        }
    }
}

impl From<pb::TokenLogprobs> for TokenLogprobs {
    fn from(t: pb::TokenLogprobs) -> Self {
        TokenLogprobs {
            token_id: t.token_id,
            logprob: t.logprob,
            rank: to_usize(t.rank),
            top: t.top.into_iter().map(|x| (x.token_id, x.logprob)).collect(),
        }
    }
}

impl From<&ModelRunnerOutput> for pb::ModelRunnerOutput {
    fn from(o: &ModelRunnerOutput) -> Self {
        pb::ModelRunnerOutput {
            req_ids: o.req_ids.clone(),
            sampled_token_ids: o
                .sampled_token_ids
                .iter()
                .map(|&token_id| pb::MaybeToken { token_id })
                .collect(),
            logprobs: o
                .logprobs
                .iter()
                .map(|l| pb::MaybeLogprobs {
                    logprobs: l.as_ref().map(Into::into),
                })
                .collect(),
            prompt_logprobs: o
                .prompt_logprobs
                .iter()
                .map(|p| pb::PromptLogprobs {
                    entries: p.iter().map(Into::into).collect(),
                })
                .collect(),
            pooled: o
                .pooled
                .iter()
                .map(|p| pb::MaybePooled {
                    present: p.is_some(),
                    values: p.clone().unwrap_or_default(),
                })
                .collect(),
        }
    }
}

impl From<pb::ModelRunnerOutput> for ModelRunnerOutput {
    fn from(o: pb::ModelRunnerOutput) -> Self {
        ModelRunnerOutput {
            req_ids: o.req_ids,
            sampled_token_ids: o
                .sampled_token_ids
                .into_iter()
                .map(|t| t.token_id)
                .collect(),
            logprobs: o
                .logprobs
                .into_iter()
                .map(|l| l.logprobs.map(Into::into))
                .collect(),
            prompt_logprobs: o
                .prompt_logprobs
                .into_iter()
                .map(|p| p.entries.into_iter().map(Into::into).collect())
                .collect(),
            pooled: o
                .pooled
                .into_iter()
                .map(|p| p.present.then_some(p.values))
                .collect(),
        }
    }
}

/// Encodes a step once; every rank's stream carries these same bytes.
pub fn encode_step(step: &SchedulerOutput) -> prost::bytes::Bytes {
    use prost::Message;
    pb::SchedulerOutput::from(step).encode_to_vec().into()
}

/// The inverse of `encode_step`.
pub fn decode_step(bytes: &[u8]) -> Result<SchedulerOutput> {
    use prost::Message;
    let pb = pb::SchedulerOutput::decode(bytes).map_err(|e| Error::Wire {
        what: "scheduler output",
        msg: e.to_string(),
    })?;
    pb.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_and_its_output_survive_the_wire() {
        let step = SchedulerOutput {
            new_requests: vec![NewRequestData {
                req_id: "a".into(),
                prompt_token_ids: vec![1, 2, 3],
                output_token_ids: vec![4],
                sampling_params: SamplingParams {
                    seed: Some(7),
                    max_tokens: None,
                    logprobs: Some(3),
                    logit_bias: vec![(5, -1.5)],
                    allowed_token_ids: Some(vec![1, 9]),
                    stop: vec!["\n".into()],
                    all_stop_token_ids: vec![2],
                    temperature: 0.7,
                    top_k: -1,
                    ..Default::default()
                },
                block_ids: vec![0, 3],
                num_computed_tokens: 2,
            }],
            cached_requests: vec![CachedRequestData {
                req_id: "b".into(),
                new_block_ids: vec![8],
                num_computed_tokens: 40,
                new_token_ids: vec![17],
            }],
            num_scheduled_tokens: vec![("a".into(), 2), ("b".into(), 1)],
            finished_req_ids: vec!["c".into()],
            grammar_bitmask: Some(GrammarBitmask {
                req_ids: vec!["b".into()],
                words_per_row: 2,
                words: vec![0b101, u32::MAX],
            }),
        };
        assert_eq!(decode_step(&encode_step(&step)).unwrap(), step);
        // Defaults (None vs Some(0), empty vs absent allow-list) survive too.
        let plain = SchedulerOutput {
            new_requests: vec![NewRequestData {
                sampling_params: SamplingParams::default(),
                ..step.new_requests[0].clone()
            }],
            ..Default::default()
        };
        assert_eq!(decode_step(&encode_step(&plain)).unwrap(), plain);

        let lp = TokenLogprobs {
            token_id: 3,
            logprob: -0.25,
            rank: 2,
            top: vec![(1, -0.1), (3, -0.25)],
        };
        let out = ModelRunnerOutput {
            req_ids: vec!["a".into(), "b".into()],
            sampled_token_ids: vec![Some(3), None],
            logprobs: vec![Some(lp.clone()), None],
            prompt_logprobs: vec![vec![lp], vec![]],
            pooled: Vec::new(),
        };
        let back: ModelRunnerOutput = pb::ModelRunnerOutput::from(&out).into();
        assert_eq!(back, out);
        // A pooling model's vectors, and a request without one.
        let pooled = ModelRunnerOutput {
            req_ids: vec!["e".into(), "f".into()],
            sampled_token_ids: vec![None, None],
            logprobs: vec![None, None],
            prompt_logprobs: vec![vec![], vec![]],
            pooled: vec![Some(vec![0.5, -1.25, 3e-8]), None],
        };
        let back: ModelRunnerOutput = pb::ModelRunnerOutput::from(&pooled).into();
        assert_eq!(back, pooled);
        assert!(decode_step(&[0xff, 0xff]).is_err());
    }
}
