//! Incremental detokenization of one sequence's generated tokens, with stop
//! strings. Text is only released once it is valid UTF-8 and can no longer
//! turn out to be the start of a stop string.

use std::sync::Arc;

use crate::tokenizer::Tokenizer;

/// Prompt tokens decoded as context before the first output token, so that
/// leading spaces (SentencePiece) come out as a full decode would give them.
const PROMPT_CONTEXT_TOKENS: usize = 5;

/// Token ids kept before the decode window are dropped past this many, so
/// memory stays bounded on long generations.
const TRIM_THRESHOLD: usize = 4096;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DetokenizerStep {
    /// Text that may be emitted now.
    pub text: String,
    /// The stop string that matched; the request is over.
    pub stop: Option<String>,
}

pub struct IncrementalDetokenizer {
    tokenizer: Arc<Tokenizer>,
    /// Prompt tail + output ids from `prefix_offset`'s window onwards.
    tokens: Vec<u32>,
    /// Start of the already-decoded context window.
    prefix_offset: usize,
    /// First token whose text has not been appended yet.
    read_offset: usize,
    skip_special_tokens: bool,
    spaces_between_special_tokens: bool,
    stop: Vec<String>,
    include_stop_str_in_output: bool,
    min_tokens: usize,
    num_output_tokens: usize,
    /// Decoded output (cut at the stop string once one matched).
    text: String,
    /// Bytes of `text` handed out so far.
    emitted: usize,
    finished: bool,
}

impl IncrementalDetokenizer {
    /// Uses params.skip_special_tokens, spaces_between_special_tokens, stop,
    /// include_stop_str_in_output, min_tokens (stop strings are not checked before
    /// min_tokens output tokens, as vLLM).
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        prompt_token_ids: &[u32],
        params: &worker::SamplingParams,
    ) -> Self {
        let tail = prompt_token_ids.len().saturating_sub(PROMPT_CONTEXT_TOKENS);
        let tokens = prompt_token_ids[tail..].to_vec();
        let read_offset = tokens.len();
        IncrementalDetokenizer {
            tokenizer,
            tokens,
            prefix_offset: 0,
            read_offset,
            skip_special_tokens: params.skip_special_tokens,
            spaces_between_special_tokens: params.spaces_between_special_tokens,
            stop: params
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            include_stop_str_in_output: params.include_stop_str_in_output,
            min_tokens: params.min_tokens,
            num_output_tokens: 0,
            text: String::new(),
            emitted: 0,
            finished: false,
        }
    }

    /// Feeds one generated token. `text` is what may be emitted now: never broken UTF-8
    /// (hold back while the bytes are incomplete, i.e. a trailing U+FFFD), and held back
    /// while a stop string could still be forming across tokens. When a stop string
    /// matches, `stop` is Some(that string), `text` ends right before it (or includes
    /// it with include_stop_str_in_output), and the request is over.
    pub fn push(&mut self, token_id: u32) -> DetokenizerStep {
        if self.finished {
            return DetokenizerStep::default();
        }
        self.num_output_tokens += 1;
        self.tokens.push(token_id);
        let check_from = self.text.len();
        let delta = self.decode_next();
        self.text.push_str(&delta);

        let stop_checked = self.min_tokens == 0 || self.num_output_tokens > self.min_tokens;
        if stop_checked && !delta.is_empty() {
            if let Some((stop, end)) = find_stop(
                &self.text,
                check_from,
                &self.stop,
                self.include_stop_str_in_output,
            ) {
                self.text.truncate(end);
                self.finished = true;
                let text = self.take_until(self.text.len());
                return DetokenizerStep {
                    text,
                    stop: Some(stop),
                };
            }
        }
        let hold = if self.include_stop_str_in_output {
            // Emitted text never needs taking back: a match is kept whole.
            0
        } else {
            partial_stop_suffix(&self.text, &self.stop)
        };
        let text = self.take_until(self.text.len() - hold);
        DetokenizerStep { text, stop: None }
    }

    /// The held-back text, for a request that ended for another reason (EOS, length).
    pub fn flush(&mut self) -> String {
        if self.finished {
            return String::new();
        }
        self.finished = true;
        self.take_until(self.text.len())
    }

    /// All text emitted so far.
    pub fn output_text(&self) -> &str {
        &self.text[..self.emitted]
    }

    /// Whether a stop string matched or `flush` was called.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn num_output_tokens(&self) -> usize {
        self.num_output_tokens
    }

    fn take_until(&mut self, end: usize) -> String {
        if end <= self.emitted {
            return String::new();
        }
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }

    /// Decodes the window before and after the new token and returns the
    /// difference, once it no longer ends in an incomplete character.
    fn decode_next(&mut self) -> String {
        let decode = |ids: &[u32]| {
            self.tokenizer
                .decode_with(
                    ids,
                    self.skip_special_tokens,
                    self.spaces_between_special_tokens,
                )
                .unwrap_or_else(|e| {
                    tracing::warn!("detokenizer: {e}");
                    String::new()
                })
        };
        let prefix_text = decode(&self.tokens[self.prefix_offset..self.read_offset]);
        let new_text = decode(&self.tokens[self.prefix_offset..]);
        if new_text.len() <= prefix_text.len() || new_text.ends_with('\u{FFFD}') {
            // Incomplete bytes, or a skipped special token: wait for more.
            return String::new();
        }
        let delta = match new_text.strip_prefix(prefix_text.as_str()) {
            Some(rest) => rest.to_string(),
            None => {
                let mut at = prefix_text.len();
                while !new_text.is_char_boundary(at) {
                    at += 1;
                }
                new_text[at..].to_string()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        if self.prefix_offset > TRIM_THRESHOLD {
            self.tokens.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        delta
    }
}

/// vLLM's rule: the first stop string (in request order) found ending in the
/// text added since `check_from`. Returns it and where to cut the text.
pub fn find_stop(
    text: &str,
    check_from: usize,
    stops: &[String],
    include_in_output: bool,
) -> Option<(String, usize)> {
    for stop in stops {
        if stop.is_empty() {
            continue;
        }
        let mut start = check_from.saturating_sub(stop.len() - 1);
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        if let Some(pos) = text[start..].find(stop.as_str()) {
            let at = start + pos;
            let end = if include_in_output {
                at + stop.len()
            } else {
                at
            };
            return Some((stop.clone(), end));
        }
    }
    None
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of
/// some stop string: text that might still become a stop match.
pub fn partial_stop_suffix(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for stop in stops {
        for (k, _) in stop.char_indices().skip(1) {
            if k > hold && text.ends_with(&stop[..k]) {
                hold = k;
            }
        }
    }
    hold
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn stop_found_only_when_it_ends_in_new_text() {
        let stops = s(&["ab"]);
        assert_eq!(find_stop("xxab", 3, &stops, false), Some(("ab".into(), 2)));
        assert_eq!(find_stop("xxab", 3, &stops, true), Some(("ab".into(), 4)));
        // Entirely inside old text: not a new match.
        assert_eq!(find_stop("abxx", 3, &stops, false), None);
    }

    #[test]
    fn request_order_wins() {
        let stops = s(&["cd", "ab"]);
        assert_eq!(find_stop("abcd", 0, &stops, false), Some(("cd".into(), 2)));
    }

    #[test]
    fn partial_suffix_is_held() {
        let stops = s(&["STOP", "é!"]);
        assert_eq!(partial_stop_suffix("hello ST", &stops), 2);
        assert_eq!(partial_stop_suffix("hello", &stops), 0);
        assert_eq!(partial_stop_suffix("café", &stops), 'é'.len_utf8());
        // A complete stop is not "partial".
        assert_eq!(partial_stop_suffix("xSTOP", &s(&["STOP"])), 0);
    }

    #[test]
    fn multibyte_boundaries_are_respected() {
        let stops = s(&["日本"]);
        let text = "é日本";
        assert_eq!(find_stop(text, 2, &stops, false), Some(("日本".into(), 2)));
    }
}
