//! `llama3_json` (Llama 3.1/3.2 JSON tool calling): the whole reply is
//! `{"name": ..., "parameters": {...}}` objects (`arguments` also accepted)
//! joined by `;`, optionally after `<|python_tag|>`. A reply that does not
//! start that way is content; with calls, content is null.

use super::json_call::CallReader;
use super::stream_state::StreamState;
use super::{is_ws, push_content, Fed, FormatStream, ToolEvent};

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
    s: StreamState,
}

impl Default for Llama3JsonStream {
    fn default() -> Self {
        Self {
            mode: Mode::Start,
            s: StreamState::default(),
        }
    }
}

impl Llama3JsonStream {
    fn fail(&mut self, out: &mut Vec<ToolEvent>) {
        self.mode = if self.s.fail(out) {
            self.s.buf.clear();
            Mode::Dead
        } else {
            Mode::Plain
        };
    }
}

impl FormatStream for Llama3JsonStream {
    fn push(&mut self, text: &str, out: &mut Vec<ToolEvent>) {
        self.s.buf.push_str(text);
        loop {
            match &mut self.mode {
                Mode::Start => {
                    if self.s.buf.starts_with(TAG) {
                        self.s.held.push_str(TAG);
                        self.s.buf.drain(..TAG.len());
                        self.mode = Mode::Call(CallReader::new(ARGS));
                    } else if self.s.buf.starts_with('{') {
                        self.mode = Mode::Call(CallReader::new(ARGS));
                    } else if self.s.buf.is_empty() || TAG.starts_with(self.s.buf.as_str()) {
                        return;
                    } else {
                        self.mode = Mode::Plain;
                    }
                }
                Mode::Call(reader) => match self.s.feed(reader, out) {
                    Fed::NeedMore => return,
                    Fed::Done(_) => self.mode = Mode::Sep(false),
                    Fed::Error => self.fail(out),
                },
                Mode::Sep(semi) => {
                    let mut used = 0;
                    let mut next = None;
                    for c in self.s.buf.chars() {
                        if is_ws(c) {
                        } else if c == ';' && !*semi {
                            *semi = true;
                        } else {
                            next = Some(c == '{' && *semi);
                            break;
                        }
                        used += c.len_utf8();
                    }
                    self.s.held.extend(self.s.buf.drain(..used));
                    match next {
                        None => return,
                        Some(true) => self.mode = Mode::Call(CallReader::new(ARGS)),
                        Some(false) => self.fail(out),
                    }
                }
                Mode::Plain => {
                    push_content(out, &self.s.buf);
                    self.s.buf.clear();
                    return;
                }
                Mode::Dead => {
                    self.s.buf.clear();
                    return;
                }
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<ToolEvent>) {
        match self.mode {
            Mode::Start | Mode::Plain => push_content(out, &self.s.buf),
            Mode::Call(_) => self.fail(out),
            Mode::Sep(_) | Mode::Dead => {}
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
