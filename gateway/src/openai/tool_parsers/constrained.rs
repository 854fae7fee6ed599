//! Tool calls from output that structured outputs constrained (vLLM's way
//! of enforcing `tool_choice: "required"` and a named function): `required`
//! yields a JSON list of `{"name": ..., "parameters": {...}}`, a named choice
//! the function's arguments object itself.

use super::mistral::ListStream;
use super::{push_args, FormatStream, ToolEvent, ToolStream};

/// `tool_choice: "required"`: arguments re-serialized as vLLM's json.dumps.
pub fn required_stream() -> ToolStream {
    ToolStream::new(Box::new(ListStream::new(None, &["parameters"])))
}

/// A named function: the output is its arguments, passed through as written
/// (vLLM does not re-serialize them).
pub fn named_stream(name: &str) -> ToolStream {
    ToolStream::new(Box::new(NamedStream {
        name: Some(name.to_string()),
    }))
}

struct NamedStream {
    /// Until the first delta: the name to send with it.
    name: Option<String>,
}

impl NamedStream {
    fn start(&mut self, out: &mut Vec<ToolEvent>) {
        if let Some(name) = self.name.take() {
            out.push(ToolEvent::Start { index: 0, name });
        }
    }
}

impl FormatStream for NamedStream {
    fn push(&mut self, text: &str, out: &mut Vec<ToolEvent>) {
        self.start(out);
        push_args(out, 0, text.to_string());
    }

    fn finish(&mut self, out: &mut Vec<ToolEvent>) {
        self.start(out);
    }

    fn failed(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{check_fixtures_with, Fixture};
    use super::*;

    #[test]
    fn required_lists() {
        let fixtures: &[Fixture] = &[
            (
                r#"[{"name": "get_weather", "parameters": {"city": "Paris"}}]"#,
                &[("get_weather", r#"{"city": "Paris"}"#)],
                None,
            ),
            (
                "[{\"name\":\"a\",\"parameters\":{}},{\"name\":\"b\",\"parameters\":{\"x\":[1,{\"y\":\"\\u00fc\"}]}}]",
                &[("a", "{}"), ("b", r#"{"x": [1, {"y": "ü"}]}"#)],
                None,
            ),
        ];
        check_fixtures_with(required_stream, fixtures, &[]);
    }

    #[test]
    fn named_passes_arguments_through() {
        let fixtures: &[Fixture] = &[(
            "{\"city\":  \"Paris\"}",
            &[("get_weather", "{\"city\":  \"Paris\"}")],
            None,
        )];
        check_fixtures_with(|| named_stream("get_weather"), fixtures, &[]);
    }
}
