//! `hermes` (Hermes 2 Pro, Qwen 2.5 and their chat templates): content, then
//! `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks. As in
//! vLLM, the content is what comes before the first block; text between and
//! after blocks is dropped, and a last block may lack its closing tag.

use super::json_call::CallReader;
use super::stream_state::StreamState;
use super::{is_ws, push_content, Fed, FormatStream, ToolEvent};

const START: &str = "<tool_call>";
const END: &str = "</tool_call>";
const ARGS: &[&str] = &["arguments"];

enum Mode {
    /// Content before the first block.
    Text,
    Call(CallReader),
    /// After a call's object: whitespace, then how much of `</tool_call>`.
    Close(usize),
    /// Between and after blocks: dropped until the next `<tool_call>`.
    Between,
    /// The reply was malformed before any call went out: all content.
    Plain,
}

/// `s.held` is the current block's raw text.
pub struct HermesStream {
    mode: Mode,
    s: StreamState,
}

impl Default for HermesStream {
    fn default() -> Self {
        Self {
            mode: Mode::Text,
            s: StreamState::default(),
        }
    }
}

impl HermesStream {
    /// After a call went out, what follows is skipped up to the next block.
    fn fail(&mut self, out: &mut Vec<ToolEvent>) {
        self.mode = if self.s.fail(out) {
            Mode::Between
        } else {
            Mode::Plain
        };
    }
}

impl FormatStream for HermesStream {
    fn push(&mut self, text: &str, out: &mut Vec<ToolEvent>) {
        self.s.buf.push_str(text);
        loop {
            match &mut self.mode {
                Mode::Text => {
                    if !self.s.content_until(START, out) {
                        return;
                    }
                    self.mode = Mode::Call(CallReader::new(ARGS));
                }
                Mode::Between => {
                    // Dropped text, so nothing of it goes out as content.
                    if !self.s.content_until(START, &mut Vec::new()) {
                        return;
                    }
                    self.mode = Mode::Call(CallReader::new(ARGS));
                }
                Mode::Call(reader) => match self.s.feed(reader, out) {
                    Fed::NeedMore => return,
                    Fed::Done(_) => self.mode = Mode::Close(0),
                    Fed::Error => {
                        self.s.hold_rest();
                        self.fail(out);
                    }
                },
                Mode::Close(matched) => {
                    let mut used = 0;
                    let mut ok = true;
                    for c in self.s.buf.chars() {
                        if *matched == END.len() {
                            break;
                        }
                        if *matched == 0 && is_ws(c) {
                        } else if END[*matched..].starts_with(c) {
                            *matched += c.len_utf8();
                        } else {
                            ok = false;
                            break;
                        }
                        used += c.len_utf8();
                    }
                    let complete = *matched == END.len();
                    self.s.buf.drain(..used);
                    if !ok {
                        self.fail(out);
                    } else if complete {
                        self.mode = Mode::Between;
                    } else {
                        return;
                    }
                }
                Mode::Plain => {
                    push_content(out, &self.s.buf);
                    self.s.buf.clear();
                    return;
                }
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<ToolEvent>) {
        match self.mode {
            Mode::Text | Mode::Plain => push_content(out, &self.s.buf),
            Mode::Call(_) => {
                self.s.hold_rest();
                self.fail(out);
            }
            Mode::Close(_) | Mode::Between => {}
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

    const P: ToolCallParser = ToolCallParser::Hermes;

    #[test]
    fn fixtures() {
        let fixtures: &[Fixture] = &[
            // (model text, expected calls (name, arguments), expected content)
            (
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>",
                &[("get_weather", r#"{"city": "Paris", "unit": "celsius"}"#)],
                None,
            ),
            (
                "<tool_call>{\"name\":\"a\",\"arguments\":{\"x\":1}}</tool_call>\n<tool_call>{\"name\":\"b\",\"arguments\":{\"y\":[1,2.50,{\"z\":null}]}}</tool_call>",
                &[("a", r#"{"x": 1}"#), ("b", r#"{"y": [1, 2.5, {"z": null}]}"#)],
                None,
            ),
            (
                "Let me check.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>trailing text",
                &[("f", "{}")],
                Some("Let me check.\n"),
            ),
            // The last block may be unclosed; arguments may come first.
            (
                "<tool_call>{\"arguments\": {\"q\": \"caf\\u00e9 \\\"x\\\"\"}, \"name\": \"search\"}",
                &[("search", "{\"q\": \"café \\\"x\\\"\"}")],
                None,
            ),
            ("No tools needed: 2 + 2 = 4.", &[], Some("No tools needed: 2 + 2 = 4.")),
            ("<tool_call>not json</tool_call>", &[], Some("<tool_call>not json</tool_call>")),
            ("before <tool_call>{\"name\": 3}", &[], Some("before <tool_call>{\"name\": 3}")),
            ("<tool_call>{\"arguments\": {}}</tool_call>", &[], Some("<tool_call>{\"arguments\": {}}</tool_call>")),
            ("a <tool_ca", &[], Some("a <tool_ca")),
            // Broken after the call went out: whole-reply content, but the
            // stream has already sent the call (see the module notes).
            (
                "<tool_call>{\"name\": \"f\", \"arguments\": {}} junk</tool_call>",
                &[],
                Some("<tool_call>{\"name\": \"f\", \"arguments\": {}} junk</tool_call>"),
            ),
        ];
        check_fixtures(P, fixtures, &[9]);
    }
}
