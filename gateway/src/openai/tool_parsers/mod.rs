//! `--tool-call-parser`: finds the tool calls a model wrote in its reply, in
//! the formats vLLM parses (`hermes`, `llama3_json`, `mistral`, `pythonic`),
//! whole or delta by delta.
//!
//! Streaming is exact for well-formed replies: for every way of cutting a
//! reply into deltas, the content deltas concatenate to the whole reply's
//! content and each call's argument fragments to its arguments (both paths
//! re-serialize arguments as vLLM's `json.dumps(..., ensure_ascii=False)`).
//! A reply that turns out malformed is all content, as in vLLM, which the
//! stream can match only while no call has been sent: once a call's name is
//! out it cannot be taken back, so a later fault leaves the calls sent so far
//! (vLLM's streaming parsers behave the same way).

pub mod constrained;
pub mod hermes;
pub mod json_call;
pub mod llama3_json;
pub mod mistral;
pub mod pythonic;
mod stream_state;

use json_call::{CallReader, Step};

/// vLLM's names, in the order the CLI lists them.
pub const NAMES: &[&str] = &["hermes", "llama3_json", "mistral", "pythonic"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallParser {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, after any content.
    Hermes,
    /// The reply is `{"name": ..., "parameters"|"arguments": ...}` objects
    /// joined by `; `, optionally after `<|python_tag|>`.
    Llama3Json,
    /// Content, then `[TOOL_CALLS] [{"name": ..., "arguments": ...}, ...]`.
    Mistral,
    /// The reply is a Python list of calls: `[f(a=1), g(b='x')]`.
    Pythonic,
}

/// One call as the response carries it; `arguments` is JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// A whole reply's calls and remaining content (None when empty and calls
/// were made, as vLLM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub calls: Vec<ParsedCall>,
    pub content: Option<String>,
}

/// What a delta adds; the chat layer turns these into vLLM's delta shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    Content(String),
    /// A new call: its name, whole. Comes before any of its arguments.
    Start {
        index: usize,
        name: String,
    },
    Arguments {
        index: usize,
        fragment: String,
    },
}

/// One format's incremental parser.
pub trait FormatStream: Send {
    fn push(&mut self, text: &str, out: &mut Vec<ToolEvent>);
    /// The reply ended.
    fn finish(&mut self, out: &mut Vec<ToolEvent>);
    /// Whether the reply was found malformed (the whole reply is then content).
    fn failed(&self) -> bool;
}

/// One choice's parser state across its deltas.
pub struct ToolStream {
    inner: Box<dyn FormatStream>,
    calls: usize,
}

impl ToolStream {
    pub fn new(inner: Box<dyn FormatStream>) -> Self {
        Self { inner, calls: 0 }
    }

    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        self.inner.push(text, &mut out);
        self.count(&out);
        out
    }

    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        self.inner.finish(&mut out);
        self.count(&out);
        out
    }

    /// Calls started so far (a finished stream with calls ends with
    /// `finish_reason: "tool_calls"`).
    pub fn calls(&self) -> usize {
        self.calls
    }

    fn count(&mut self, events: &[ToolEvent]) {
        self.calls += events
            .iter()
            .filter(|e| matches!(e, ToolEvent::Start { .. }))
            .count();
    }

    /// Runs a whole reply through and applies vLLM's whole-reply rules.
    pub fn extract(mut self, text: &str) -> Extracted {
        let mut events = self.push(text);
        events.extend(self.finish());
        if self.inner.failed() {
            return Extracted {
                calls: Vec::new(),
                content: Some(text.to_string()),
            };
        }
        let (content, calls) = assemble(events);
        if calls.is_empty() {
            return Extracted {
                calls,
                content: Some(text.to_string()),
            };
        }
        Extracted {
            calls,
            content: (!content.is_empty()).then_some(content),
        }
    }
}

/// Concatenates events into (content, calls).
pub fn assemble(events: impl IntoIterator<Item = ToolEvent>) -> (String, Vec<ParsedCall>) {
    let mut content = String::new();
    let mut calls: Vec<ParsedCall> = Vec::new();
    for e in events {
        match e {
            ToolEvent::Content(c) => content.push_str(&c),
            ToolEvent::Start { index, name } => {
                debug_assert_eq!(index, calls.len());
                calls.push(ParsedCall {
                    name,
                    arguments: String::new(),
                });
            }
            ToolEvent::Arguments { index, fragment } => {
                if let Some(c) = calls.get_mut(index) {
                    c.arguments.push_str(&fragment);
                }
            }
        }
    }
    (content, calls)
}

impl ToolCallParser {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" => Some(Self::Hermes),
            "llama3_json" => Some(Self::Llama3Json),
            "mistral" => Some(Self::Mistral),
            "pythonic" => Some(Self::Pythonic),
            _ => None,
        }
    }

    pub fn stream(self) -> ToolStream {
        ToolStream::new(match self {
            Self::Hermes => Box::new(hermes::HermesStream::default()),
            Self::Llama3Json => Box::new(llama3_json::Llama3JsonStream::default()),
            Self::Mistral => Box::new(mistral::ListStream::mistral()),
            Self::Pythonic => Box::new(pythonic::PythonicStream::default()),
        })
    }

    pub fn extract(self, text: &str) -> Extracted {
        self.stream().extract(text)
    }

    /// vLLM's `adjust_request`: these formats open calls with a special
    /// token, which detokenizing must keep.
    pub fn keeps_special_tokens(self) -> bool {
        matches!(self, Self::Hermes | Self::Mistral)
    }
}

/// Pushes argument text, merged into the previous event when that was the
/// same call's arguments.
pub(crate) fn push_args(out: &mut Vec<ToolEvent>, index: usize, fragment: String) {
    if fragment.is_empty() {
        return;
    }
    if let Some(ToolEvent::Arguments {
        index: i,
        fragment: f,
    }) = out.last_mut()
    {
        if *i == index {
            f.push_str(&fragment);
            return;
        }
    }
    out.push(ToolEvent::Arguments { index, fragment });
}

pub(crate) fn push_content(out: &mut Vec<ToolEvent>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(ToolEvent::Content(c)) = out.last_mut() {
        c.push_str(text);
        return;
    }
    out.push(ToolEvent::Content(text.to_string()));
}

/// Releases what a call reader has ready: its name first, then arguments.
/// Returns whether the name went out now.
pub(crate) fn drain_reader(
    reader: &mut CallReader,
    index: usize,
    out: &mut Vec<ToolEvent>,
) -> bool {
    let started = match reader.take_name() {
        Some(name) => {
            out.push(ToolEvent::Start { index, name });
            true
        }
        None => false,
    };
    push_args(out, index, reader.take_args());
    started
}

pub(crate) enum Fed {
    /// All of the text went in; the call is not complete.
    NeedMore,
    /// The call closed after this many bytes.
    Done(usize),
    Error,
}

pub(crate) fn feed_str(reader: &mut CallReader, text: &str) -> Fed {
    for (i, c) in text.char_indices() {
        match reader.feed(c) {
            Step::Consumed if reader.is_done() => return Fed::Done(i + c.len_utf8()),
            Step::Consumed => {}
            Step::Done | Step::Error => return Fed::Error,
        }
    }
    Fed::NeedMore
}

pub(crate) fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

#[cfg(test)]
pub(crate) mod testing;
