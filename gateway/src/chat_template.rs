//! HF chat templates rendered with minijinja, with the helpers and settings
//! transformers gives them (trim_blocks, lstrip_blocks, raise_exception,
//! tojson, strftime_now, Python string/dict methods).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde_json::Value as Json;

use crate::tokenizer::Tokenizer;

const TEMPLATE_NAME: &str = "chat_template";

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("invalid chat template: {message}")]
    Syntax { message: String },
    /// A `raise_exception(...)` call in the template: its message as written.
    #[error("{message}")]
    Raised { message: String },
    #[error("error rendering the chat template: {message}")]
    Render { message: String },
    #[error("cannot read chat template file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid chat messages: {message}")]
    InvalidMessages { message: String },
    #[error("unsupported content part type '{part_type}': this model accepts text only")]
    UnsupportedContent { part_type: String },
    #[error("continue_final_message and add_generation_prompt cannot both be true")]
    ContinueWithGenerationPrompt,
    #[error("continue_final_message is set but {reason}")]
    ContinueFinalMessage { reason: String },
}

pub type Result<T> = std::result::Result<T, ChatTemplateError>;

/// vLLM's --chat-template-content-format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentFormat {
    /// `content` is a plain string.
    String,
    /// `content` is a list of parts (`{"type": "text", "text": ...}`).
    OpenAi,
}

impl ContentFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ContentFormat::String => "string",
            ContentFormat::OpenAi => "openai",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    pub tools: Option<Json>,
    pub documents: Option<Json>,
    pub chat_template_kwargs: serde_json::Map<String, Json>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    detected: OnceLock<ContentFormat>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The error a template's `raise_exception` produces, found again after
/// rendering through the error's source chain.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_formatter(python_formatter);
        let cleaned = strip_generation_tags(source);
        env.add_template_owned(TEMPLATE_NAME, cleaned)
            .map_err(|e| ChatTemplateError::Syntax {
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
            detected: OnceLock::new(),
        })
    }

    /// `--chat-template` is a file path or an inline template; None → the tokenizer's. Ok(None) = model has none.
    pub fn resolve(arg: Option<&str>, tokenizer: &Tokenizer) -> Result<Option<ChatTemplate>> {
        let source = match arg {
            Some(arg) => Some(load_template_arg(arg)?),
            None => tokenizer.chat_template().map(str::to_string),
        };
        source
            .map(|s| ChatTemplate::new(&s, tokenizer.bos_token(), tokenizer.eos_token()))
            .transpose()
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Detects from the template source whether it iterates over content parts
    /// ("openai") or uses content as a string; `configured` is the CLI choice
    /// ("auto" | "string" | "openai"). Log the detected format once (tracing::info!).
    pub fn content_format(&self, configured: &str) -> ContentFormat {
        match configured {
            "string" => ContentFormat::String,
            "openai" => ContentFormat::OpenAi,
            _ => *self.detected.get_or_init(|| {
                let format = detect_content_format(&self.source);
                if first_detection_of(&self.source) {
                    tracing::info!(
                        "Detected the chat template content format to be '{}'. You can set `--chat-template-content-format` to override this.",
                        format.as_str()
                    );
                }
                format
            }),
        }
    }

    /// messages: OpenAI chat messages as JSON (role, content as string or list of
    /// {"type":"text","text":..} parts, name, tool_calls, ...). Normalises content for the
    /// format (string: join text parts with "\n"; openai: list of parts) then renders.
    pub fn render(
        &self,
        messages: &[Json],
        format: ContentFormat,
        opts: &RenderOptions,
    ) -> Result<String> {
        if opts.continue_final_message && opts.add_generation_prompt {
            return Err(ChatTemplateError::ContinueWithGenerationPrompt);
        }
        let messages = messages
            .iter()
            .map(|m| normalize_message(m, format))
            .collect::<Result<Vec<_>>>()?;

        let mut ctx = serde_json::Map::new();
        // Request kwargs first, so they cannot replace the conversation itself.
        for (k, v) in &opts.chat_template_kwargs {
            ctx.insert(k.clone(), v.clone());
        }
        let token = |t: &Option<String>| t.clone().map(Json::String).unwrap_or(Json::Null);
        ctx.entry("bos_token")
            .or_insert_with(|| token(&self.bos_token));
        ctx.entry("eos_token")
            .or_insert_with(|| token(&self.eos_token));
        ctx.insert("messages".into(), Json::Array(messages.clone()));
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(opts.add_generation_prompt),
        );
        // Templates test `tools is not none`: absent must be none, not undefined.
        ctx.insert("tools".into(), opts.tools.clone().unwrap_or(Json::Null));
        ctx.insert(
            "documents".into(),
            opts.documents.clone().unwrap_or(Json::Null),
        );

        let template =
            self.env
                .get_template(TEMPLATE_NAME)
                .map_err(|e| ChatTemplateError::Syntax {
                    message: describe(&e),
                })?;
        let rendered = template
            .render(Value::from_serialize(&ctx))
            .map_err(render_error)?;
        if opts.continue_final_message {
            return cut_after_final_message(rendered, &messages);
        }
        Ok(rendered)
    }
}

/// Per-request templates are rebuilt each time; log their format once.
fn first_detection_of(source: &str) -> bool {
    use std::collections::HashSet;
    use std::hash::{Hash, Hasher};
    use std::sync::Mutex;
    static SEEN: OnceLock<Mutex<HashSet<u64>>> = OnceLock::new();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    source.hash(&mut h);
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    seen.insert(h.finish())
}

/// `--chat-template`: an existing file is read, otherwise the argument is
/// the template itself (unless it only looks like a missing file).
fn load_template_arg(arg: &str) -> Result<String> {
    let path = Path::new(arg);
    if path.is_file() {
        return std::fs::read_to_string(path).map_err(|source| ChatTemplateError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    let looks_inline = arg.contains("{{") || arg.contains("{%") || arg.contains('\n');
    if !looks_inline {
        return Err(ChatTemplateError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file, and the argument is not a Jinja template",
            ),
        });
    }
    Ok(arg.to_string())
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        if !s.contains("line") {
            s.push_str(&format!(" (line {line})"));
        }
    }
    s
}

fn render_error(e: minijinja::Error) -> ChatTemplateError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(raised) = err.downcast_ref::<RaisedException>() {
            return ChatTemplateError::Raised {
                message: raised.0.clone(),
            };
        }
        source = err.source();
    }
    ChatTemplateError::Render {
        message: describe(&e),
    }
}

/// Prints values as Python's str() would (None, True, ['a', 1]), since
/// templates are written against jinja2.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            python_repr(value, &mut s);
            out.write_str(&s).map_err(|e| {
                minijinja::Error::new(ErrorKind::WriteFailure, "cannot write output").with_source(e)
            })
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

fn python_repr(value: &Value, out: &mut String) {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::String => python_str_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            out.push('[');
            if let Ok(items) = value.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&item, out);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(keys) = value.try_iter() {
                for (i, key) in keys.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&key, out);
                    out.push_str(": ");
                    python_repr(&value.get_item(&key).unwrap_or_default(), out);
                }
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
}

fn python_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedException(message)),
    )
}

fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format string '{format}'"),
        ));
    }
    Ok(chrono::Local::now()
        .format_with_items(items.into_iter())
        .to_string())
}

/// HF's tojson: Python's json.dumps with ensure_ascii=False by default,
/// honouring indent, separators and sort_keys.
fn tojson(
    value: Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: indent must be an integer or string, got {v}"),
                    )
                })?;
                Some(" ".repeat(n.max(0) as usize))
            }
        }
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair (item_separator, key_separator)",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: cannot serialize value: {e}"),
        )
    })?;
    let style = PyJsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// Python json.dumps formatting.
pub struct PyJsonStyle {
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
    pub ensure_ascii: bool,
}

impl PyJsonStyle {
    pub fn write(&self, v: &Json, depth: usize, out: &mut String) {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => out.push_str(&n.to_string()),
            Json::String(s) => self.write_str(s, out),
            Json::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separator(i, depth + 1, out);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push(']');
            }
            Json::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, val)) in entries.into_iter().enumerate() {
                    self.separator(i, depth + 1, out);
                    self.write_str(k, out);
                    out.push_str(&self.key_sep);
                    self.write(val, depth + 1, out);
                }
                self.newline(depth, out);
                out.push('}');
            }
        }
    }

    fn separator(&self, i: usize, depth: usize, out: &mut String) {
        if i > 0 {
            out.push_str(&self.item_sep);
        }
        self.newline(depth, out);
    }

    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{:04x}", unit));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// transformers' `{% generation %}` tag only marks assistant spans for
/// training masks; it renders as its body, so the tags are dropped.
pub fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner =
            tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(tag);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// "openai" when the template loops over a message's content (directly or
/// through a variable set from it), as vLLM's detection does on the AST.
pub fn detect_content_format(source: &str) -> ContentFormat {
    let is_content_access = |expr: &str, vars: &[String]| {
        let e = expr.trim();
        e.ends_with("['content']")
            || e.ends_with("[\"content\"]")
            || e.ends_with(".content")
            || vars.iter().any(|v| v == e)
    };
    let mut content_vars: Vec<String> = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let inner = rest[start + 2..start + len]
            .trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        rest = &rest[start + len + 2..];
        if let Some(set) = inner.strip_prefix("set ") {
            if let Some((name, expr)) = set.split_once('=') {
                let expr = expr.split('|').next().unwrap_or("");
                if is_content_access(expr, &content_vars) {
                    content_vars.push(name.trim().to_string());
                }
            }
        } else if let Some(f) = inner.strip_prefix("for ") {
            if let Some((_, iter)) = f.split_once(" in ") {
                let iter = iter.split('|').next().unwrap_or("");
                let iter = iter.split(" if ").next().unwrap_or("");
                let iter = iter.trim().trim_end_matches("recursive").trim();
                if is_content_access(iter, &content_vars) {
                    return ContentFormat::OpenAi;
                }
            }
        }
    }
    ContentFormat::String
}

fn text_of_part(part: &Json) -> Result<Option<String>> {
    match part {
        Json::String(s) => Ok(Some(s.clone())),
        Json::Object(o) => {
            let ty = match o.get("type") {
                None => "text",
                Some(Json::String(t)) => t.as_str(),
                Some(other) => {
                    return Err(ChatTemplateError::InvalidMessages {
                        message: format!("a content part's `type` must be a string, got {other}"),
                    })
                }
            };
            match ty {
                "text" | "input_text" | "output_text" => match o.get("text") {
                    Some(Json::String(s)) => Ok(Some(s.clone())),
                    // vLLM's schema requires the text: a part without it is an error, not "".
                    _ => Err(ChatTemplateError::InvalidMessages {
                        message: format!("a {ty} content part needs a string `text`, got {part}"),
                    }),
                },
                "refusal" => match o.get("refusal") {
                    Some(Json::String(s)) => Ok(Some(s.clone())),
                    _ => Err(ChatTemplateError::InvalidMessages {
                        message: format!(
                            "a refusal content part needs a string `refusal`, got {part}"
                        ),
                    }),
                },
                other => Err(ChatTemplateError::UnsupportedContent {
                    part_type: other.to_string(),
                }),
            }
        }
        other => Err(ChatTemplateError::InvalidMessages {
            message: format!("content part must be an object, got {other}"),
        }),
    }
}

fn normalize_message(message: &Json, format: ContentFormat) -> Result<Json> {
    let Json::Object(obj) = message else {
        return Err(ChatTemplateError::InvalidMessages {
            message: format!("each message must be an object, got {message}"),
        });
    };
    if !obj.get("role").is_some_and(Json::is_string) {
        return Err(ChatTemplateError::InvalidMessages {
            message: "each message needs a string 'role'".into(),
        });
    }
    let mut obj = obj.clone();
    if let Some(content) = obj.get("content").cloned() {
        let normalized = match (&content, format) {
            (Json::Null, _) => Json::Null,
            (Json::String(_), ContentFormat::String) => content,
            (Json::String(s), ContentFormat::OpenAi) => {
                serde_json::json!([{"type": "text", "text": s}])
            }
            (Json::Array(parts), ContentFormat::String) => {
                let texts = parts.iter().map(text_of_part).collect::<Result<Vec<_>>>()?;
                Json::String(texts.into_iter().flatten().collect::<Vec<_>>().join("\n"))
            }
            (Json::Array(parts), ContentFormat::OpenAi) => {
                let mut out = Vec::with_capacity(parts.len());
                for part in parts {
                    let text = text_of_part(part)?.unwrap_or_default();
                    out.push(serde_json::json!({"type": "text", "text": text}));
                }
                Json::Array(out)
            }
            (other, _) => {
                return Err(ChatTemplateError::InvalidMessages {
                    message: format!("content must be a string or a list of parts, got {other}"),
                })
            }
        };
        obj.insert("content".into(), normalized);
    }
    // Templates index into tool-call arguments as a dict (vLLM parses them too).
    if let Some(Json::Array(calls)) = obj.get_mut("tool_calls") {
        for call in calls {
            if let Some(f) = call.get_mut("function") {
                if let Some(Json::String(args)) = f.get("arguments") {
                    if let Ok(parsed @ Json::Object(_)) = serde_json::from_str::<Json>(args) {
                        f["arguments"] = parsed;
                    }
                }
            }
        }
    }
    Ok(Json::Object(obj))
}

/// The final message's text, as transformers finds it for continue_final_message.
fn final_message_text(messages: &[Json]) -> Result<String> {
    let last = messages
        .last()
        .ok_or_else(|| ChatTemplateError::ContinueFinalMessage {
            reason: "there are no messages".into(),
        })?;
    match last.get("content") {
        Some(Json::String(s)) => Ok(s.clone()),
        Some(Json::Array(parts)) => parts
            .iter()
            .rev()
            .find_map(|p| p.get("text").and_then(Json::as_str))
            .map(str::to_string)
            .ok_or_else(|| ChatTemplateError::ContinueFinalMessage {
                reason: "no text to continue was found in the final message".into(),
            }),
        _ => Err(ChatTemplateError::ContinueFinalMessage {
            reason: "the final message has no content".into(),
        }),
    }
}

/// Cuts the rendered chat right after the final message's content, so the
/// model continues it instead of starting a new turn.
fn cut_after_final_message(rendered: String, messages: &[Json]) -> Result<String> {
    let final_text = final_message_text(messages)?;
    let stripped = final_text.trim();
    let Some(loc) = rendered.rfind(stripped) else {
        return Err(ChatTemplateError::ContinueFinalMessage {
            reason: "the final message does not appear in the rendered chat".into(),
        });
    };
    let lstripped_len = final_text.trim_start().len();
    let keep = if rendered[loc..].starts_with(final_text.as_str())
        && loc + lstripped_len <= rendered.len()
    {
        loc + lstripped_len
    } else {
        loc + stripped.len()
    };
    let mut rendered = rendered;
    rendered.truncate(keep);
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn py(v: &Json, indent: Option<usize>) -> String {
        let style = PyJsonStyle {
            indent: indent.map(|n| " ".repeat(n)),
            item_sep: if indent.is_some() { "," } else { ", " }.into(),
            key_sep: ": ".into(),
            sort_keys: false,
            ensure_ascii: false,
        };
        let mut s = String::new();
        style.write(v, 0, &mut s);
        s
    }

    #[test]
    fn python_json_layout() {
        let v = json!({"b": [1, 2.5, "é\n"], "a": {}, "c": []});
        assert_eq!(py(&v, None), r#"{"b": [1, 2.5, "é\n"], "a": {}, "c": []}"#);
        assert_eq!(
            py(&v, Some(2)),
            "{\n  \"b\": [\n    1,\n    2.5,\n    \"é\\n\"\n  ],\n  \"a\": {},\n  \"c\": []\n}"
        );
    }

    #[test]
    fn generation_tags_are_dropped() {
        let src = "a{% generation %}b{%- endgeneration -%}c{% if x %}d{% endif %}";
        assert_eq!(strip_generation_tags(src), "abc{% if x %}d{% endif %}");
    }

    #[test]
    fn detects_content_loops() {
        assert_eq!(
            detect_content_format("{% for m in messages %}{{ m['content'] }}{% endfor %}"),
            ContentFormat::String
        );
        assert_eq!(
            detect_content_format(
                "{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}"
            ),
            ContentFormat::OpenAi
        );
        assert_eq!(
            detect_content_format(
                "{%- for m in messages %}{%- set c = m.content %}{%- for p in c if p.type == 'text' %}{{ p.text }}{% endfor %}{% endfor %}"
            ),
            ContentFormat::OpenAi
        );
    }

    #[test]
    fn tool_call_arguments_become_objects() {
        let m = json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}
        ]});
        let n = normalize_message(&m, ContentFormat::String).unwrap();
        assert_eq!(n["tool_calls"][0]["function"]["arguments"]["x"], 1);
    }

    #[test]
    fn image_parts_are_refused() {
        let m =
            json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]});
        let e = normalize_message(&m, ContentFormat::String).unwrap_err();
        assert!(e.to_string().contains("image_url"), "{e}");
    }
}
