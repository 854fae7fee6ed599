//! `--reasoning-parser`: splits a chat reply into `reasoning` (the text inside
//! `<think>…</think>`) and `content`, whole or delta by delta, with vLLM's
//! rules for `deepseek_r1` and `qwen3`.
//!
//! The streaming parser is exact: for every way of cutting a reply into
//! deltas, its reasoning deltas concatenate to the whole reply's `reasoning`
//! and its content deltas to its `content`. To make that possible without
//! holding the entire reply, an opening `<think>` counts only at the very
//! start of the reply, which is where models emit it (vLLM's `partition`
//! would also drop text written before a later `<think>`).

const START: &str = "<think>";
const END: &str = "</think>";

/// vLLM's names, in the order the CLI lists them.
pub const NAMES: &[&str] = &["deepseek_r1", "qwen3"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningParser {
    /// The chat template writes `<think>` into the prompt, so the reply may
    /// start inside the reasoning: text before `</think>` is reasoning even
    /// without an opening tag, and a reply that never closes it is all
    /// reasoning.
    DeepSeekR1,
    /// Reasoning needs both tags; a reply without them (thinking disabled,
    /// or cut off before `</think>`) is all content, tags included.
    Qwen3,
}

impl ReasoningParser {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "deepseek_r1" => Some(Self::DeepSeekR1),
            "qwen3" => Some(Self::Qwen3),
            _ => None,
        }
    }

    /// A whole reply's (reasoning, content). Content that would be empty is
    /// None, as vLLM's `content or None`.
    pub fn split(self, text: &str) -> Split {
        let opened = text.strip_prefix(START);
        let body = opened.unwrap_or(text);
        match (self, body.find(END)) {
            (Self::DeepSeekR1, None) => Split {
                reasoning: Some(body.to_string()),
                content: None,
            },
            (Self::Qwen3, Some(end)) if opened.is_some() => split_at_end(body, end),
            (Self::Qwen3, _) => Split {
                reasoning: None,
                content: Some(text.to_string()),
            },
            (Self::DeepSeekR1, Some(end)) => split_at_end(body, end),
        }
    }

    pub fn stream(self) -> ReasoningStream {
        ReasoningStream {
            parser: self,
            phase: Phase::Start,
            held: String::new(),
        }
    }
}

fn split_at_end(body: &str, end: usize) -> Split {
    let content = &body[end + END.len()..];
    Split {
        reasoning: Some(body[..end].to_string()),
        content: (!content.is_empty()).then(|| content.to_string()),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: Option<String>,
    pub content: Option<String>,
}

/// What one delta adds to each field; empty strings mean nothing to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not yet known whether the reply opens with `<think>`; `held` is a
    /// proper prefix of it.
    Start,
    /// Inside the reasoning. deepseek_r1 holds only a tail that may begin
    /// `</think>`; qwen3 holds all of it, because a reply that never closes
    /// the tag turns out to be content.
    Reasoning {
        opened: bool,
    },
    Content,
}

/// One choice's parser state across its deltas.
#[derive(Debug, Clone)]
pub struct ReasoningStream {
    parser: ReasoningParser,
    phase: Phase,
    held: String,
}

impl ReasoningStream {
    pub fn push(&mut self, text: &str) -> Delta {
        let mut out = Delta::default();
        self.held.push_str(text);
        if self.phase == Phase::Start {
            if let Some(rest) = self.held.strip_prefix(START) {
                self.held = rest.to_string();
                self.phase = Phase::Reasoning { opened: true };
            } else if START.starts_with(self.held.as_str()) {
                return out;
            } else {
                match self.parser {
                    ReasoningParser::DeepSeekR1 => {
                        self.phase = Phase::Reasoning { opened: false };
                    }
                    ReasoningParser::Qwen3 => self.phase = Phase::Content,
                }
            }
        }
        if let Phase::Reasoning { .. } = self.phase {
            if let Some(end) = self.held.find(END) {
                out.reasoning = self.held[..end].to_string();
                self.held.drain(..end + END.len());
                self.phase = Phase::Content;
            } else if self.parser == ReasoningParser::DeepSeekR1 {
                let keep = partial_tag_len(&self.held, END);
                out.reasoning = self.held[..self.held.len() - keep].to_string();
                self.held.drain(..self.held.len() - keep);
            }
        }
        if self.phase == Phase::Content {
            out.content = std::mem::take(&mut self.held);
        }
        out
    }

    /// The reply ended: what was held for a tag that never completed.
    pub fn finish(&mut self) -> Delta {
        let held = std::mem::take(&mut self.held);
        let phase = std::mem::replace(&mut self.phase, Phase::Content);
        match (self.parser, phase) {
            (ReasoningParser::DeepSeekR1, Phase::Start | Phase::Reasoning { .. }) => Delta {
                reasoning: held,
                content: String::new(),
            },
            (ReasoningParser::Qwen3, Phase::Reasoning { opened: true }) => Delta {
                reasoning: String::new(),
                content: format!("{START}{held}"),
            },
            _ => Delta {
                reasoning: String::new(),
                content: held,
            },
        }
    }
}

/// Length of the longest tail of `text` that is a proper prefix of `tag`,
/// the only part that cannot be released yet.
pub(crate) fn partial_tag_len(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DS: ReasoningParser = ReasoningParser::DeepSeekR1;
    const QW: ReasoningParser = ReasoningParser::Qwen3;

    fn split(r: Option<&str>, c: Option<&str>) -> Split {
        Split {
            reasoning: r.map(str::to_string),
            content: c.map(str::to_string),
        }
    }

    #[test]
    fn names() {
        for name in NAMES {
            assert!(ReasoningParser::from_name(name).is_some());
        }
        assert_eq!(ReasoningParser::from_name("deepseek-r1"), None);
    }

    #[test]
    fn deepseek_r1_whole() {
        let cases = [
            ("<think>a b</think>answer", Some("a b"), Some("answer")),
            ("a b</think>answer", Some("a b"), Some("answer")),
            ("<think>a b", Some("a b"), None),
            ("just an answer", Some("just an answer"), None),
            ("<think></think>answer", Some(""), Some("answer")),
            ("</think>answer", Some(""), Some("answer")),
            ("<think>r</think>", Some("r"), None),
            ("", Some(""), None),
            ("r</think>c</think>d", Some("r"), Some("c</think>d")),
            ("<think><think>r</think>c", Some("<think>r"), Some("c")),
        ];
        for (text, r, c) in cases {
            assert_eq!(DS.split(text), split(r, c), "{text:?}");
        }
    }

    #[test]
    fn qwen3_whole() {
        let cases = [
            ("<think>a b</think>answer", Some("a b"), Some("answer")),
            (
                "<think>\n\n</think>\n\nanswer",
                Some("\n\n"),
                Some("\n\nanswer"),
            ),
            ("a b</think>answer", None, Some("a b</think>answer")),
            ("<think>a b", None, Some("<think>a b")),
            ("just an answer", None, Some("just an answer")),
            ("<think></think>answer", Some(""), Some("answer")),
            ("<think>r</think>", Some("r"), None),
            ("", None, Some("")),
            (" <think>r</think>c", None, Some(" <think>r</think>c")),
        ];
        for (text, r, c) in cases {
            assert_eq!(QW.split(text), split(r, c), "{text:?}");
        }
    }

    const FIXTURES: &[&str] = &[
        "<think>Let me think.\nOK.</think>\n\nThe answer is 4.",
        "reasoning without the opening tag</think>content",
        "<think>never closed, cut off at max_tokens",
        "no tags at all",
        "<think></think>",
        "<think></think>after",
        "</think>",
        "<thin",
        "<think",
        "<",
        "",
        "a < b <th </th </thinker> <think> </think> tail",
        "<think>x</thin</think>y</think>z",
        "<think>é✓ ünïcode</think>日本語",
        "<<think>>",
        "<think>r</think",
    ];

    /// Streams `text` cut at every `size` bytes (moved forward to a char
    /// boundary), with `offset` for the first cut, so tags land across every
    /// delta boundary.
    fn chunks(text: &str, size: usize, offset: usize) -> Vec<&str> {
        let mut cuts = vec![0];
        let mut at = offset.max(1);
        while at < text.len() {
            let mut cut = at;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            if cut > *cuts.last().unwrap() && cut < text.len() {
                cuts.push(cut);
            }
            at += size;
        }
        cuts.push(text.len());
        cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect()
    }

    fn streamed(parser: ReasoningParser, pieces: &[&str]) -> (String, String) {
        let mut s = parser.stream();
        let (mut r, mut c) = (String::new(), String::new());
        for p in pieces {
            let d = s.push(p);
            r += &d.reasoning;
            c += &d.content;
        }
        let d = s.finish();
        r += &d.reasoning;
        c += &d.content;
        (r, c)
    }

    #[test]
    fn streaming_matches_whole_for_every_chunking() {
        for parser in [DS, QW] {
            for text in FIXTURES {
                let whole = parser.split(text);
                let want = (
                    whole.reasoning.clone().unwrap_or_default(),
                    whole.content.clone().unwrap_or_default(),
                );
                for size in 1..=text.len().max(1) {
                    for offset in 1..=size {
                        let pieces = chunks(text, size, offset);
                        assert_eq!(pieces.concat(), *text);
                        assert_eq!(
                            streamed(parser, &pieces),
                            want,
                            "{parser:?} {text:?} in {pieces:?}"
                        );
                    }
                }
                // Empty deltas (a step that produced no text) change nothing.
                let mut pieces = vec![""];
                for ch in chunks(text, 1, 1) {
                    pieces.extend([ch, ""]);
                }
                assert_eq!(streamed(parser, &pieces), want, "{parser:?} {text:?}");
            }
        }
    }

    #[test]
    fn deepseek_streams_reasoning_as_it_comes() {
        let mut s = DS.stream();
        assert_eq!(s.push("<thi").reasoning, "");
        assert_eq!(s.push("nk>Hmm, ").reasoning, "Hmm, ");
        // Only the part that could start `</think>` waits.
        assert_eq!(s.push("so</th").reasoning, "so");
        let d = s.push("ink>Done");
        assert_eq!((d.reasoning.as_str(), d.content.as_str()), ("", "Done"));
        assert_eq!(s.push(" now").content, " now");
        assert_eq!(s.finish(), Delta::default());
    }

    #[test]
    fn qwen3_streams_plain_replies_as_content_at_once() {
        let mut s = QW.stream();
        assert_eq!(s.push("Hel").content, "Hel");
        assert_eq!(s.push("lo <think>").content, "lo <think>");
        let mut s = QW.stream();
        assert_eq!(s.push("<think>r").reasoning, "");
        let d = s.push("</think>c");
        assert_eq!((d.reasoning.as_str(), d.content.as_str()), ("r", "c"));
    }

    #[test]
    fn partial_tail() {
        assert_eq!(partial_tag_len("abc</th", END), 4);
        assert_eq!(partial_tag_len("abc<", END), 1);
        assert_eq!(partial_tag_len("abc", END), 0);
        assert_eq!(partial_tag_len("</think", END), 7);
        assert_eq!(partial_tag_len("é", END), 0);
    }
}
