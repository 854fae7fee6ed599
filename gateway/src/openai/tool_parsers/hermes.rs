//! `hermes` (Hermes 2 Pro, Qwen 2.5 and their chat templates): content, then
//! `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks. As in
//! vLLM, the content is what comes before the first block; text between and
//! after blocks is dropped, and a last block may lack its closing tag.

use super::json_call::CallReader;
use super::{drain_reader, feed_str, is_ws, push_content, Fed, FormatStream, ToolEvent};
use crate::openai::reasoning::partial_tag_len;

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

pub struct HermesStream {
    mode: Mode,
    buf: String,
    /// The current block's raw text, for giving back as content.
    held: String,
    index: usize,
    released: bool,
    failed: bool,
}

impl Default for HermesStream {
    fn default() -> Self {
        Self {
            mode: Mode::Text,
            buf: String::new(),
            held: String::new(),
            index: 0,
            released: false,
            failed: false,
        }
    }
}

impl HermesStream {
    fn fail(&mut self, out: &mut Vec<ToolEvent>) {
        self.failed = true;
        if self.released {
            self.mode = Mode::Between;
        } else {
            push_content(out, &self.held);
            self.held.clear();
            self.mode = Mode::Plain;
        }
    }

    fn open_block(&mut self, at: usize) {
        self.buf.drain(..at + START.len());
        self.held = START.to_string();
        self.mode = Mode::Call(CallReader::new(ARGS));
    }
}

impl FormatStream for HermesStream {
    fn push(&mut self, text: &str, out: &mut Vec<ToolEvent>) {
        self.buf.push_str(text);
        loop {
            match &mut self.mode {
                Mode::Text => match self.buf.find(START) {
                    Some(at) => {
                        push_content(out, &self.buf[..at]);
                        self.open_block(at);
                    }
                    None => {
                        let keep = partial_tag_len(&self.buf, START);
                        let cut = self.buf.len() - keep;
                        push_content(out, &self.buf[..cut]);
                        self.buf.drain(..cut);
                        return;
                    }
                },
                Mode::Between => match self.buf.find(START) {
                    Some(at) => self.open_block(at),
                    None => {
                        let keep = partial_tag_len(&self.buf, START);
                        self.buf.drain(..self.buf.len() - keep);
                        return;
                    }
                },
                Mode::Call(reader) => {
                    let fed = feed_str(reader, &self.buf);
                    self.released |= drain_reader(reader, self.index, out);
                    match fed {
                        Fed::NeedMore => {
                            self.held.push_str(&self.buf);
                            self.buf.clear();
                            return;
                        }
                        Fed::Done(n) => {
                            self.buf.drain(..n);
                            self.index += 1;
                            self.mode = Mode::Close(0);
                        }
                        Fed::Error => {
                            self.held.push_str(&self.buf);
                            self.buf.clear();
                            self.fail(out);
                        }
                    }
                }
                Mode::Close(matched) => {
                    let mut used = 0;
                    let mut ok = true;
                    for c in self.buf.chars() {
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
                    self.buf.drain(..used);
                    if !ok {
                        self.fail(out);
                    } else if complete {
                        self.mode = Mode::Between;
                    } else {
                        return;
                    }
                }
                Mode::Plain => {
                    push_content(out, &self.buf);
                    self.buf.clear();
                    return;
                }
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<ToolEvent>) {
        match self.mode {
            Mode::Text | Mode::Plain => push_content(out, &self.buf),
            Mode::Call(_) => {
                self.held.push_str(&self.buf);
                self.fail(out);
            }
            Mode::Close(_) | Mode::Between => {}
        }
        self.buf.clear();
    }

    fn failed(&self) -> bool {
        self.failed
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
