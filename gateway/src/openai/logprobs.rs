//! Engine logprobs → the completions shape (parallel lists with text
//! offsets) and the chat shape (one entry per token, with bytes).

use serde_json::{Map, Value};
use worker::TokenLogprobs;

use super::protocol::{ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs};

/// OpenAI clients choke on -inf; vLLM floors logprobs here.
const MIN_LOGPROB: f32 = -9999.0;

fn floor(lp: f32) -> f32 {
    if lp.is_nan() {
        MIN_LOGPROB
    } else {
        lp.max(MIN_LOGPROB)
    }
}

/// How token ids become the strings and bytes shown to clients.
pub trait TokenText {
    fn text(&self, id: u32) -> String;
    fn bytes(&self, id: u32) -> Vec<u8>;
}

impl TokenText for crate::tokenizer::Tokenizer {
    fn text(&self, id: u32) -> String {
        self.decode(&[id], false)
            .unwrap_or_else(|_| self.id_to_token(id).unwrap_or_default())
    }

    fn bytes(&self, id: u32) -> Vec<u8> {
        self.token_bytes(id)
    }
}

/// Builds completions logprobs across stream chunks: text offsets continue
/// from one chunk to the next.
#[derive(Debug, Default, Clone)]
pub struct CompletionLogprobsBuilder {
    next_offset: usize,
}

impl CompletionLogprobsBuilder {
    pub fn new(initial_offset: usize) -> Self {
        Self {
            next_offset: initial_offset,
        }
    }

    /// `entries[i]` is `None` for a token without a score (the first prompt
    /// token); `ids[i]` is the token itself.
    pub fn push(
        &mut self,
        ids: &[u32],
        entries: &[Option<&TokenLogprobs>],
        num_top: usize,
        text: &impl TokenText,
    ) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        for (i, &id) in ids.iter().enumerate() {
            let token = text.text(id);
            out.text_offset.push(self.next_offset);
            self.next_offset += token.chars().count();
            match entries.get(i).copied().flatten() {
                Some(lp) => {
                    out.token_logprobs.push(Some(floor(lp.logprob)));
                    let mut top = Map::new();
                    for &(tid, tlp) in lp.top.iter().take(num_top) {
                        top.insert(text.text(tid), Value::from(floor(tlp)));
                    }
                    // As vLLM: the chosen token always appears among the alternatives.
                    if num_top > 0 {
                        top.entry(token.clone())
                            .or_insert(Value::from(floor(lp.logprob)));
                    }
                    out.top_logprobs.push(Some(top));
                }
                None => {
                    out.token_logprobs.push(None);
                    out.top_logprobs.push(None);
                }
            }
            out.tokens.push(token);
        }
        out
    }
}

/// The chat shape for the given generated tokens.
pub fn chat_logprobs(
    entries: &[TokenLogprobs],
    num_top: usize,
    text: &impl TokenText,
) -> ChatLogprobs {
    ChatLogprobs {
        content: entries
            .iter()
            .map(|lp| ChatTokenLogprob {
                token: text.text(lp.token_id),
                logprob: floor(lp.logprob),
                bytes: Some(text.bytes(lp.token_id)),
                top_logprobs: lp
                    .top
                    .iter()
                    .take(num_top)
                    .map(|&(tid, tlp)| ChatTopLogprob {
                        token: text.text(tid),
                        logprob: floor(tlp),
                        bytes: Some(text.bytes(tid)),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// `prompt_logprobs` as vLLM returns them: per prompt token, `None` or a map
/// from token id (as a string) to `{logprob, rank, decoded_token}`.
pub fn prompt_logprobs_json(
    entries: &[Option<TokenLogprobs>],
    text: &impl TokenText,
) -> Vec<Option<Value>> {
    entries
        .iter()
        .map(|e| {
            e.as_ref().map(|lp| {
                let mut m = Map::new();
                m.insert(
                    lp.token_id.to_string(),
                    serde_json::json!({"logprob": floor(lp.logprob), "rank": lp.rank,
                                       "decoded_token": text.text(lp.token_id)}),
                );
                for (rank, &(tid, tlp)) in lp.top.iter().enumerate() {
                    m.entry(tid.to_string()).or_insert_with(|| {
                        serde_json::json!({"logprob": floor(tlp), "rank": rank + 1,
                                           "decoded_token": text.text(tid)})
                    });
                }
                Value::Object(m)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Letters;
    impl TokenText for Letters {
        fn text(&self, id: u32) -> String {
            ["a", "bb", "ccc", "é"][id as usize].to_string()
        }
        fn bytes(&self, id: u32) -> Vec<u8> {
            self.text(id).into_bytes()
        }
    }

    fn lp(id: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprobs {
        TokenLogprobs {
            token_id: id,
            logprob,
            rank: 1,
            top: top.to_vec(),
        }
    }

    #[test]
    fn completion_offsets_continue_across_chunks() {
        let mut b = CompletionLogprobsBuilder::new(4);
        let a = lp(1, -0.5, &[(1, -0.5), (2, -1.0)]);
        let first = b.push(&[1], &[Some(&a)], 1, &Letters);
        assert_eq!(first.text_offset, vec![4]);
        assert_eq!(first.tokens, vec!["bb"]);
        assert_eq!(first.top_logprobs[0].as_ref().unwrap().len(), 1);
        let c = lp(3, f32::NEG_INFINITY, &[]);
        let second = b.push(&[3, 0], &[Some(&c), None], 0, &Letters);
        assert_eq!(second.text_offset, vec![6, 7]);
        assert_eq!(second.token_logprobs, vec![Some(-9999.0), None]);
        assert_eq!(second.top_logprobs[1], None);
    }

    #[test]
    fn chat_shape_has_bytes_and_top() {
        let out = chat_logprobs(&[lp(3, -0.1, &[(3, -0.1), (0, -3.0)])], 2, &Letters);
        assert_eq!(out.content[0].token, "é");
        assert_eq!(out.content[0].bytes, Some(vec![0xc3, 0xa9]));
        assert_eq!(out.content[0].top_logprobs.len(), 2);
        assert_eq!(out.content[0].top_logprobs[1].token, "a");
    }
}
