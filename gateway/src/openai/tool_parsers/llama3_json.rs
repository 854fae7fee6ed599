//! `llama3_json` (Llama 3.1/3.2 JSON tool calling): the whole reply is
//! `{"name": ..., "parameters": {...}}` objects (`arguments` also accepted)
//! joined by `;`, optionally after `<|python_tag|>`. A reply that does not
//! start that way is content; with calls, content is null.

use super::json_call::CallReader;
use super::{drain_reader, feed_str, is_ws, push_content, Fed, FormatStream, ToolEvent};

const TAG: &str = "<|python_tag|>";
const ARGS: &[&str] = &["parameters", "arguments"];

enum Mode {
    /// Not yet known whether the reply opens with the tag or `{`.
    Start,
    Call(CallReader),
    /// After a call: `;` (seen or not), then the next `{`.
    Sep(bool),
    Plain,
    /// Malformed after a call went out: the rest is dropped.
    Dead,
}

pub struct Llama3JsonStream {
    mode: Mode,
    buf: String,
    held: String,
    index: usize,
    released: bool,
    failed: bool,
}

impl Default for Llama3JsonStream {
    fn default() -> Self {
        Self {
            mode: Mode::Start,
            buf: String::new(),
            held: String::new(),
            index: 0,
            released: false,
            failed: false,
        }
    }
}

impl Llama3JsonStream {
    fn fail(&mut self, out: &mut Vec<ToolEvent>) {
        self.failed = true;
        if self.released {
            self.mode = Mode::Dead;
            self.buf.clear();
        } else {
            push_content(out, &self.held);
            push_content(out, &self.buf);
            self.held.clear();
            self.buf.clear();
            self.mode = Mode::Plain;
        }
    }
}

impl FormatStream for Llama3JsonStream {
    fn push(&mut self, text: &str, out: &mut Vec<ToolEvent>) {
        self.buf.push_str(text);
        loop {
            match &mut self.mode {
                Mode::Start => {
                    if self.buf.starts_with(TAG) {
                        self.held.push_str(TAG);
                        self.buf.drain(..TAG.len());
                        self.mode = Mode::Call(CallReader::new(ARGS));
                    } else if self.buf.starts_with('{') {
                        self.mode = Mode::Call(CallReader::new(ARGS));
                    } else if self.buf.is_empty() || TAG.starts_with(self.buf.as_str()) {
                        return;
                    } else {
                        self.mode = Mode::Plain;
                    }
                }
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
                            self.held.extend(self.buf.drain(..n));
                            self.index += 1;
                            self.mode = Mode::Sep(false);
                        }
                        Fed::Error => self.fail(out),
                    }
                }
                Mode::Sep(semi) => {
                    let mut used = 0;
                    let mut next = None;
                    for c in self.buf.chars() {
                        if is_ws(c) {
                        } else if c == ';' && !*semi {
                            *semi = true;
                        } else {
                            next = Some(c == '{' && *semi);
                            break;
                        }
                        used += c.len_utf8();
                    }
                    self.held.extend(self.buf.drain(..used));
                    match next {
                        None => return,
                        Some(true) => self.mode = Mode::Call(CallReader::new(ARGS)),
                        Some(false) => self.fail(out),
                    }
                }
                Mode::Plain => {
                    push_content(out, &self.buf);
                    self.buf.clear();
                    return;
                }
                Mode::Dead => {
                    self.buf.clear();
                    return;
                }
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<ToolEvent>) {
        match self.mode {
            Mode::Start | Mode::Plain => push_content(out, &self.buf),
            Mode::Call(_) => self.fail(out),
            Mode::Sep(_) | Mode::Dead => {}
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

    #[test]
    fn fixtures() {
        let fixtures: &[Fixture] = &[
            (
                r#"{"name": "get_weather", "parameters": {"city": "San Francisco", "days": 3}}"#,
                &[("get_weather", r#"{"city": "San Francisco", "days": 3}"#)],
                None,
            ),
            (
                "<|python_tag|>{\"name\": \"a\", \"arguments\": {\"x\": 1e3}}; {\"name\": \"b\", \"parameters\": {\"s\": \"\\u65e5\\n\"}}",
                &[("a", r#"{"x": 1000.0}"#), ("b", r#"{"s": "日\n"}"#)],
                None,
            ),
            (
                "The answer is {\"name\": \"f\", \"parameters\": {}}",
                &[],
                Some("The answer is {\"name\": \"f\", \"parameters\": {}}"),
            ),
            ("Plain answer.", &[], Some("Plain answer.")),
            ("{\"answer\": 42}", &[], Some("{\"answer\": 42}")),
            ("{not json", &[], Some("{not json")),
            ("<|python_ta", &[], Some("<|python_ta")),
            ("", &[], Some("")),
            // Text after a call that went out (see the module notes).
            (
                "{\"name\": \"f\", \"parameters\": {}} and more",
                &[],
                Some("{\"name\": \"f\", \"parameters\": {}} and more"),
            ),
        ];
        check_fixtures(ToolCallParser::Llama3Json, fixtures, &[8]);
    }
}
