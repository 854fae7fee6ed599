//! `mistral` (Mistral 7B v0.3, Nemo, Small with HF tokenizers): content, then
//! `[TOOL_CALLS]` and a JSON list of `{"name": ..., "arguments": {...}}`.
//! The list reader also parses the output of `tool_choice: "required"`
//! (see `constrained`), which is the same list without the tag.
//!
//! vLLM gives back a malformed reply with the tag removed and the text
//! trimmed; here it comes back unchanged, like every other parser's.

use super::json_call::CallReader;
use super::stream_state::StreamState;
use super::{is_ws, push_content, Fed, FormatStream, ToolEvent};

const TAG: &str = "[TOOL_CALLS]";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// `[`
    Open,
    /// `{` or `]`
    FirstOrEnd,
    /// `,` or `]`
    CommaOrEnd,
    /// `{`
    Next,
}

enum Mode {
    /// Content before the tag.
    Text,
    List(Expect),
    Call(CallReader),
    /// After the list: dropped.
    Tail,
    Plain,
    Dead,
}

pub struct ListStream {
    tag: Option<&'static str>,
    args_keys: &'static [&'static str],
    mode: Mode,
    s: StreamState,
}

impl ListStream {
    pub fn mistral() -> Self {
        Self::new(Some(TAG), &["arguments"])
    }

    /// A bare list (no tag, no content before it) with these argument keys.
    pub fn new(tag: Option<&'static str>, args_keys: &'static [&'static str]) -> Self {
        Self {
            tag,
            args_keys,
            mode: if tag.is_some() {
                Mode::Text
            } else {
                Mode::List(Expect::Open)
            },
            s: StreamState::default(),
        }
    }

    fn fail(&mut self, out: &mut Vec<ToolEvent>) {
        self.mode = if self.s.fail(out) {
            Mode::Dead
        } else {
            Mode::Plain
        };
        self.s.buf.clear();
    }
}

impl FormatStream for ListStream {
    fn push(&mut self, text: &str, out: &mut Vec<ToolEvent>) {
        self.s.buf.push_str(text);
        loop {
            match &mut self.mode {
                Mode::Text => {
                    if !self.s.content_until(self.tag.unwrap_or_default(), out) {
                        return;
                    }
                    self.mode = Mode::List(Expect::Open);
                }
                Mode::List(expect) => {
                    let Some((i, c)) = self.s.buf.char_indices().find(|(_, c)| !is_ws(*c)) else {
                        self.s.hold_rest();
                        return;
                    };
                    let next = match (*expect, c) {
                        (Expect::Open, '[') => Some(Mode::List(Expect::FirstOrEnd)),
                        (Expect::FirstOrEnd | Expect::Next, '{') => {
                            Some(Mode::Call(CallReader::new(self.args_keys)))
                        }
                        (Expect::FirstOrEnd | Expect::CommaOrEnd, ']') => Some(Mode::Tail),
                        (Expect::CommaOrEnd, ',') => Some(Mode::List(Expect::Next)),
                        _ => None,
                    };
                    match next {
                        Some(mode) => {
                            // The reader consumes its own `{`.
                            let used = if c == '{' { i } else { i + 1 };
                            self.s.held.extend(self.s.buf.drain(..used));
                            self.mode = mode;
                        }
                        None => self.fail(out),
                    }
                }
                Mode::Call(reader) => match self.s.feed(reader, out) {
                    Fed::NeedMore => return,
                    Fed::Done(_) => self.mode = Mode::List(Expect::CommaOrEnd),
                    Fed::Error => self.fail(out),
                },
                Mode::Plain => {
                    push_content(out, &self.s.buf);
                    self.s.buf.clear();
                    return;
                }
                Mode::Tail | Mode::Dead => {
                    self.s.buf.clear();
                    return;
                }
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<ToolEvent>) {
        match self.mode {
            Mode::Text | Mode::Plain => push_content(out, &self.s.buf),
            Mode::List(_) | Mode::Call(_) => self.fail(out),
            Mode::Tail | Mode::Dead => {}
        }
        self.s.buf.clear();
    }

    fn failed(&self) -> bool {
        self.s.failed
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check_fixtures, Fixture};
    use super::super::ToolCallParser;

    #[test]
    fn fixtures() {
        let fixtures: &[Fixture] = &[
            (
                r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]"#,
                &[("get_weather", r#"{"city": "Paris"}"#)],
                None,
            ),
            (
                "[TOOL_CALLS][{\"name\":\"a\",\"arguments\":{\"n\":-0,\"f\":0.000012}},\n {\"name\":\"b\",\"arguments\":{\"t\":true}}]",
                &[("a", r#"{"n": 0, "f": 1.2e-05}"#), ("b", r#"{"t": true}"#)],
                None,
            ),
            (
                "Sure, calling it. [TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"k\": \"v\"}}]</s>",
                &[("f", r#"{"k": "v"}"#)],
                Some("Sure, calling it. "),
            ),
            ("No calls here [TOOL", &[], Some("No calls here [TOOL")),
            ("[TOOL_CALLS] not a list", &[], Some("[TOOL_CALLS] not a list")),
            ("[TOOL_CALLS] [{\"name\": \"f\"", &[], Some("[TOOL_CALLS] [{\"name\": \"f\"")),
        ];
        // The truncated call (5) went out before the reply ended.
        check_fixtures(ToolCallParser::Mistral, fixtures, &[5]);
    }
}
