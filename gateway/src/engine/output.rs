//! Output processing: turns the scheduler's per-step updates into client
//! outputs (incremental text, stop strings, logprobs, prompt logprobs
//! assembled across prefill chunks) and feeds the latency metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;
use worker::TokenLogprobs;

use super::scheduler::RequestUpdate;
use super::types::{EngineRequest, FinishReason, RequestOutput, StopMatch};
use crate::detokenizer::IncrementalDetokenizer;
use crate::metrics::EngineMetrics;
use crate::tokenizer::Tokenizer;

/// An output and the channel of the client waiting for it.
pub(crate) struct Ready {
    pub tx: UnboundedSender<RequestOutput>,
    pub out: RequestOutput,
}

#[derive(Default)]
pub(crate) struct Processed {
    pub ready: Option<Ready>,
    /// A stop string ended a request the scheduler still holds: the caller
    /// must end it there too.
    pub stopped_by_string: Option<FinishReason>,
}

struct OutputState {
    tx: UnboundedSender<RequestOutput>,
    detokenizer: IncrementalDetokenizer,
    /// Index i holds prompt token i's entry; `None` when not requested.
    prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    prompt_logprobs_sent: bool,
    arrival: Instant,
    last_token: Option<Instant>,
}

pub(crate) struct OutputProcessor {
    tokenizer: Arc<Tokenizer>,
    states: HashMap<String, OutputState>,
}

impl OutputProcessor {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            states: HashMap::new(),
        }
    }

    pub fn add(&mut self, req: &EngineRequest, tx: UnboundedSender<RequestOutput>) {
        let detokenizer = IncrementalDetokenizer::new(
            self.tokenizer.clone(),
            &req.prompt_token_ids,
            &req.sampling_params,
        );
        self.states.insert(
            req.request_id.clone(),
            OutputState {
                tx,
                detokenizer,
                // The first prompt token has no logprob.
                prompt_logprobs: req.sampling_params.prompt_logprobs.map(|_| vec![None]),
                prompt_logprobs_sent: false,
                arrival: req.arrival_time,
                last_token: None,
            },
        );
    }

    pub fn process(&mut self, u: RequestUpdate, now: Instant, m: &mut EngineMetrics) -> Processed {
        let Some(st) = self.states.get_mut(&u.request_id) else {
            return Processed::default();
        };
        if let (Some(reason), true) = (&u.finished, u.pooled.is_some()) {
            // A pooling request: one output, its vector, the prompt counted
            // and its latency observed as a generation request's first token.
            m.prompt_tokens += u.num_prompt_tokens as u64;
            m.ttft.observe(now.duration_since(st.arrival).as_secs_f64());
            let out = RequestOutput {
                request_id: u.request_id.clone(),
                num_prompt_tokens: u.num_prompt_tokens,
                pooled: u.pooled,
                ..Default::default()
            };
            return Processed {
                ready: self.finish(out, reason.clone(), now, m),
                stopped_by_string: None,
            };
        }
        if !u.new_token_ids.is_empty() {
            m.generation_tokens += u.new_token_ids.len() as u64;
            match st.last_token {
                None => {
                    m.prompt_tokens += u.num_prompt_tokens as u64;
                    m.ttft.observe(now.duration_since(st.arrival).as_secs_f64());
                }
                Some(t) => m.itl.observe(now.duration_since(t).as_secs_f64()),
            }
            st.last_token = Some(now);
        }
        if !st.prompt_logprobs_sent {
            if let Some(acc) = st.prompt_logprobs.as_mut() {
                // A recompute after preemption starts over at chunk 0.
                acc.truncate(u.chunk_start + 1);
                acc.extend(u.prompt_logprobs.into_iter().map(Some));
            }
        }

        let mut finished = u.finished.clone();
        let mut text = String::new();
        // The token that stopped generation (EOS or a stop id) has no text, as in vLLM.
        let stopped_by_token = matches!(
            finished,
            Some(FinishReason::Stop(StopMatch::Eos | StopMatch::TokenId(_)))
        );
        let n_text = u.new_token_ids.len() - usize::from(stopped_by_token);
        for &tok in &u.new_token_ids[..n_text] {
            let d = st.detokenizer.push(tok);
            text.push_str(&d.text);
            if let Some(s) = d.stop {
                finished = Some(FinishReason::Stop(StopMatch::String(s)));
                break;
            }
        }
        let by_stop_string = matches!(finished, Some(FinishReason::Stop(StopMatch::String(_))));
        if finished.is_some() && !by_stop_string {
            text.push_str(&st.detokenizer.flush());
        }

        let mut out = RequestOutput {
            request_id: u.request_id.clone(),
            new_token_ids: u.new_token_ids,
            new_text: text,
            new_logprobs: u.logprobs.into_iter().collect(),
            num_prompt_tokens: u.num_prompt_tokens,
            num_cached_tokens: u.num_cached_tokens,
            num_output_tokens: u.num_output_tokens,
            ..Default::default()
        };
        if !out.new_token_ids.is_empty() && !st.prompt_logprobs_sent {
            out.prompt_logprobs = st.prompt_logprobs.take();
            st.prompt_logprobs_sent = true;
        }
        match finished {
            Some(reason) => Processed {
                stopped_by_string: u.finished.is_none().then(|| reason.clone()),
                ready: self.finish(out, reason, now, m),
            },
            // A partial prefill chunk has nothing to tell the client.
            None if out.new_token_ids.is_empty() && out.new_text.is_empty() => Processed::default(),
            None => Processed {
                ready: Some(Ready {
                    tx: st.tx.clone(),
                    out,
                }),
                stopped_by_string: None,
            },
        }
    }

    /// The final output of a request; forgets the request.
    pub fn finish(
        &mut self,
        mut out: RequestOutput,
        reason: FinishReason,
        now: Instant,
        m: &mut EngineMetrics,
    ) -> Option<Ready> {
        let st = self.states.remove(&out.request_id)?;
        m.record_finished(reason.as_str(), now.duration_since(st.arrival));
        tracing::debug!(request_id = %out.request_id, reason = reason.as_str(), "Finished request");
        out.finished = Some(reason);
        Some(Ready { tx: st.tx, out })
    }
}

/// The chunks a step's outputs are sent in (`VLLM_V1_OUTPUT_PROC_CHUNK_SIZE`):
/// as vLLM's AsyncLLM output handler splits them (numpy's array_split into
/// ceil(n / chunk_size) parts, the first ones one longer), so that no chunk
/// is much smaller than the others.
pub(crate) fn output_chunks(n: usize, chunk_size: usize) -> Vec<std::ops::Range<usize>> {
    if n == 0 {
        return Vec::new();
    }
    let parts = n.div_ceil(chunk_size.max(1));
    let (base, longer) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < longer);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::output_chunks;

    #[test]
    fn outputs_are_split_like_numpy_array_split() {
        assert!(output_chunks(0, 128).is_empty());
        assert_eq!(output_chunks(5, 128), vec![0..5]);
        assert_eq!(output_chunks(128, 128), vec![0..128]);
        // 129 outputs: two parts of 65 and 64, not 128 and 1.
        assert_eq!(output_chunks(129, 128), vec![0..65, 65..129]);
        assert_eq!(output_chunks(7, 2), vec![0..2, 2..4, 4..6, 6..7]);
        assert_eq!(output_chunks(3, 1), vec![0..1, 1..2, 2..3]);
    }
}
