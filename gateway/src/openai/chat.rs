//! `POST /v1/chat/completions`: messages → chat template → token ids → engine.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;

use super::error::{parse_request, ApiError, Result};
use super::fanout::{self, ChoiceState, MergedStream};
use super::logprobs::{chat_logprobs, prompt_logprobs_json};
use super::protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatMessage, DeltaMessage,
};
use super::reasoning::{Delta, ReasoningParser, ReasoningStream};
use super::sampling::{self, EndpointSampling};
use super::sse::{json_event, stream_response, ChunkEncoder};
use super::state::{base_request_id, engine_request_id, unix_now, AppState, SharedState};
use super::tool_parsers::{ParsedCall, ToolEvent, ToolStream};
use super::tools::{self, ToolMode};
use crate::chat_template::{ChatTemplate, RenderOptions};
use crate::engine::{EngineRequest, RequestOutput};

/// The rendered conversation, ready for the engine.
pub struct RenderedChat {
    pub prompt: String,
    pub token_ids: Vec<u32>,
}

/// Chat-template settings a request may carry (chat and /tokenize share them).
pub struct ChatRenderArgs<'a> {
    pub messages: &'a [Value],
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    pub add_special_tokens: bool,
    pub chat_template: Option<&'a str>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    pub tools: Option<Value>,
    pub documents: Option<Value>,
}

/// Renders and tokenizes a conversation; CPU work, so callers run it off the
/// async threads.
pub fn render_chat(state: &AppState, args: ChatRenderArgs<'_>) -> Result<RenderedChat> {
    if args.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty.",
            Some("messages"),
        ));
    }
    let per_request;
    let template = match args.chat_template {
        Some(src) => {
            per_request = ChatTemplate::new(
                src,
                state.tokenizer.bos_token(),
                state.tokenizer.eos_token(),
            )?;
            &per_request
        }
        None => state
            .chat_template
            .as_ref()
            .ok_or(ApiError::NoChatTemplate)?,
    };
    let format = template.content_format(&state.content_format);
    let opts = RenderOptions {
        add_generation_prompt: args.add_generation_prompt,
        continue_final_message: args.continue_final_message,
        tools: args.tools,
        documents: args.documents,
        chat_template_kwargs: args.chat_template_kwargs.unwrap_or_default(),
    };
    let prompt = template.render(args.messages, format, &opts)?;
    let token_ids = state.tokenizer.encode(&prompt, args.add_special_tokens)?;
    Ok(RenderedChat { prompt, token_ids })
}

/// Text of a message's content, whether a string or a list of text parts.
fn content_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

pub async fn create_chat_completion(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    state.require_api("Chat Completions")?;
    let mut req: ChatCompletionRequest = parse_request(&body)?;
    let model = state.check_model(req.model.as_deref())?;
    let stream = req.stream.unwrap_or(false);
    if req.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "Stream options can only be defined when `stream=True`.",
            Some("stream_options"),
        ));
    }
    let tool_request = tools::resolve(req.tools.as_ref(), req.tool_choice.as_ref())?;
    let tool_mode = tools::mode(
        &tool_request,
        state.enable_auto_tool_choice,
        state.tool_parser,
    )?;
    if let Some(ToolMode::Auto(parser)) = &tool_mode {
        if parser.keeps_special_tokens() {
            req.sampling.skip_special_tokens = Some(false);
        }
    }
    let n = sampling::check_n(req.sampling.n, None)?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(
                "when using `top_logprobs`, `logprobs` must be set to true.",
                Some("top_logprobs"),
            ))
        }
        (true, Some(k)) if k > worker::sampling_params::MAX_LOGPROBS => {
            return Err(ApiError::invalid(
                format!(
                    "top_logprobs must be at most {}, got {k}.",
                    worker::sampling_params::MAX_LOGPROBS
                ),
                Some("top_logprobs"),
            ))
        }
        (true, k) => Some(k.unwrap_or(0)),
        (false, _) => None,
    };
    let endpoint = EndpointSampling {
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        logprobs,
        echo_prompt_logprobs: false,
    };
    let mut params = sampling::build(&req.sampling, &endpoint, &state.defaults)?;
    params
        .validate(state.tokenizer.vocab_size())
        .map_err(|e| ApiError::invalid(e.message, Some(e.param)))?;
    if let Some(schema) = tools::tool_schema(&tool_request)? {
        tools::constrain_to_tool_schema(&mut params, &tool_request.choice, schema)?;
    }

    let add_generation_prompt = req.add_generation_prompt.unwrap_or(true);
    let rendered = {
        let state = state.clone();
        let req = req.clone();
        let hide = state.exclude_tools_when_tool_choice_none
            && tool_request.choice == tools::ToolChoice::None;
        let template_tools = tool_request.tools.clone().filter(|_| !hide);
        tokio::task::spawn_blocking(move || {
            render_chat(
                &state,
                ChatRenderArgs {
                    messages: &req.messages,
                    add_generation_prompt,
                    continue_final_message: req.continue_final_message.unwrap_or(false),
                    add_special_tokens: req.sampling.add_special_tokens.unwrap_or(false),
                    chat_template: req.chat_template.as_deref(),
                    chat_template_kwargs: req.chat_template_kwargs.clone(),
                    tools: template_tools,
                    documents: req.documents.clone(),
                },
            )
        })
        .await
        .map_err(|e| ApiError::Internal {
            message: format!("chat template task failed: {e}"),
        })??
    };
    // vLLM: the reply continues the last message's role when no generation prompt is added.
    let role = if add_generation_prompt {
        state.response_role.clone()
    } else {
        req.messages
            .last()
            .and_then(|m| m.get("role"))
            .and_then(|r| r.as_str())
            .unwrap_or(&state.response_role)
            .to_string()
    };
    let echo = if req.echo.unwrap_or(false) {
        req.messages
            .last()
            .filter(|m| m.get("role").and_then(|r| r.as_str()) == Some(role.as_str()))
            .map(content_text)
            .unwrap_or_default()
    } else {
        String::new()
    };

    let id = format!(
        "chatcmpl-{}",
        base_request_id(req.sampling.request_id.as_deref(), &headers)
    );
    let arrival = Instant::now();
    let mut requests = Vec::with_capacity(n);
    for i in 0..n {
        let request_id = engine_request_id(&id, 0, 1, i, n);
        let sampling_params = sampling::for_sample(&params, i);
        if state.log_requests {
            tracing::info!(
                "Received request {request_id}: prompt: {:?}, params: {sampling_params:?}, prompt_token_ids: {:?}.",
                rendered.prompt,
                rendered.token_ids
            );
        }
        requests.push(EngineRequest {
            request_id,
            prompt_token_ids: rendered.token_ids.clone(),
            sampling_params,
            priority: req.sampling.priority.unwrap_or(0),
            arrival_time: arrival,
        });
    }
    let merged = fanout::submit(&state.engine, requests).await?;
    let ctx = Ctx {
        id,
        model,
        created: unix_now(),
        n,
        role,
        echo,
        top_logprobs: logprobs,
        tool_mode,
        state,
    };
    if stream {
        let opts = req.stream_options.unwrap_or_default();
        let encoder = StreamEncoder {
            choices: vec![ChoiceState::default(); n],
            reasoning: ctx
                .state
                .reasoning_parser
                .map(|p| vec![p.stream(); n])
                .unwrap_or_default(),
            tools: ctx
                .tool_mode
                .as_ref()
                .map(|m| (0..n).map(|_| m.stream()).collect())
                .unwrap_or_default(),
            include_usage: opts.include_usage.unwrap_or(false),
            continuous_usage: opts.continuous_usage_stats.unwrap_or(false),
            ctx,
        };
        Ok(stream_response(encoder, merged))
    } else {
        Ok(collect(ctx, merged).await?.into_response())
    }
}

struct Ctx {
    id: String,
    model: String,
    created: i64,
    n: usize,
    role: String,
    echo: String,
    top_logprobs: Option<usize>,
    /// How tool calls are read from the reply; None: plain content.
    tool_mode: Option<ToolMode>,
    state: SharedState,
}

async fn collect(ctx: Ctx, mut merged: MergedStream) -> Result<axum::Json<ChatCompletionResponse>> {
    let mut choices = vec![ChoiceState::default(); ctx.n];
    while let Some((idx, out)) = merged.next().await {
        if let Some(c) = choices.get_mut(idx) {
            c.apply(&out);
            if let Some(err) = c.failure() {
                return Err(err);
            }
        }
    }
    let tok = ctx.state.tokenizer.as_ref();
    let out = choices
        .iter()
        .enumerate()
        .map(|(idx, c)| {
            let (message, called) = message(&ctx, &c.text);
            ChatChoice {
                index: idx,
                message,
                logprobs: ctx.top_logprobs.map(|k| chat_logprobs(&c.logprobs, k, tok)),
                finish_reason: if called {
                    Some("tool_calls".into())
                } else {
                    fanout::finish_reason(&c.finished)
                },
                stop_reason: fanout::stop_reason(&c.finished),
            }
        })
        .collect();
    let prompt_logprobs = choices
        .first()
        .and_then(|c| c.prompt_logprobs.as_ref())
        .map(|p| prompt_logprobs_json(p, tok));
    Ok(axum::Json(ChatCompletionResponse {
        id: ctx.id,
        object: "chat.completion",
        created: ctx.created,
        model: ctx.model,
        usage: fanout::usage(&choices, ctx.n),
        choices: out,
        prompt_logprobs,
    }))
}

/// The reply's message, and whether it ends in tool calls (`finish_reason:
/// "tool_calls"`); the echo stays in front of the content, since the
/// reasoning and tool parsers read only what the model generated, and tool
/// calls come from the content alone.
fn message(ctx: &Ctx, text: &str) -> (ChatMessage, bool) {
    let reply = split_reply(ctx.state.reasoning_parser, ctx.tool_mode.as_ref(), text);
    let content = match reply.content {
        Some(c) => Some(format!("{}{c}", ctx.echo)),
        None => (!ctx.echo.is_empty()).then(|| ctx.echo.clone()),
    };
    let message = ChatMessage {
        role: ctx.role.clone(),
        content,
        reasoning_content: reply.reasoning.clone(),
        reasoning: reply.reasoning,
        tool_calls: reply.calls.into_iter().map(tool_call_json).collect(),
    };
    (message, reply.tool_calls_finish)
}

/// A whole reply's fields.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    reasoning: Option<String>,
    content: Option<String>,
    calls: Vec<ParsedCall>,
    /// `finish_reason: "tool_calls"`.
    tool_calls_finish: bool,
}

/// Reasoning first; tool calls come from what is left as content.
fn split_reply(
    reasoning_parser: Option<ReasoningParser>,
    tool_mode: Option<&ToolMode>,
    text: &str,
) -> Reply {
    let (reasoning, content) = match reasoning_parser {
        None => (None, Some(text.to_string())),
        Some(parser) => {
            let split = parser.split(text);
            (split.reasoning, split.content)
        }
    };
    let mut reply = Reply {
        reasoning,
        content,
        calls: Vec::new(),
        tool_calls_finish: false,
    };
    if let (Some(mode), Some(text)) = (tool_mode, &reply.content) {
        let extracted = mode.stream().extract(text);
        if !extracted.calls.is_empty() {
            reply.tool_calls_finish = mode.finish_reason_tool_calls();
            reply.calls = extracted.calls;
            reply.content = extracted.content.or_else(|| mode.empty_content());
        }
    }
    reply
}

/// vLLM's tool-call ids.
fn tool_call_id() -> String {
    format!("chatcmpl-tool-{}", uuid::Uuid::new_v4().simple())
}

fn tool_call_json(call: ParsedCall) -> Value {
    serde_json::json!({
        "id": tool_call_id(),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    })
}

/// One tool event as vLLM's delta: the name whole with the call's id, type
/// and index first, then argument fragments.
fn tool_delta(event: ToolEvent) -> Option<DeltaMessage> {
    let call = match event {
        ToolEvent::Content(_) => return None,
        ToolEvent::Start { index, name } => serde_json::json!({
            "index": index,
            "id": tool_call_id(),
            "type": "function",
            "function": {"name": name},
        }),
        ToolEvent::Arguments { index, fragment } => serde_json::json!({
            "index": index,
            "function": {"arguments": fragment},
        }),
    };
    Some(DeltaMessage {
        tool_calls: Some(vec![call]),
        ..Default::default()
    })
}

struct StreamEncoder {
    ctx: Ctx,
    choices: Vec<ChoiceState>,
    /// One parser state per choice; empty without `--reasoning-parser`.
    reasoning: Vec<ReasoningStream>,
    /// One tool-call parser per choice; empty when the reply is plain content.
    tools: Vec<ToolStream>,
    include_usage: bool,
    continuous_usage: bool,
}

impl StreamEncoder {
    fn chunk(&self, choices: Vec<ChatChunkChoice>) -> Event {
        json_event(&ChatCompletionChunk {
            id: self.ctx.id.clone(),
            object: "chat.completion.chunk",
            created: self.ctx.created,
            model: self.ctx.model.clone(),
            choices,
            usage: self
                .continuous_usage
                .then(|| fanout::usage(&self.choices, self.ctx.n)),
        })
    }
}

impl ChunkEncoder for StreamEncoder {
    /// The role first for every choice, as OpenAI and vLLM do; then the echo.
    fn start(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        for idx in 0..self.ctx.n {
            events.push(self.chunk(vec![ChatChunkChoice {
                index: idx,
                delta: DeltaMessage {
                    role: Some(self.ctx.role.clone()),
                    content: Some(String::new()),
                    ..Default::default()
                },
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
            }]));
            if !self.ctx.echo.is_empty() {
                events.push(self.chunk(vec![ChatChunkChoice {
                    index: idx,
                    delta: DeltaMessage {
                        content: Some(self.ctx.echo.clone()),
                        ..Default::default()
                    },
                    logprobs: None,
                    finish_reason: None,
                    stop_reason: None,
                }]));
            }
        }
        events
    }

    fn on_output(&mut self, idx: usize, out: RequestOutput) -> Vec<Event> {
        let Some(choice) = self.choices.get_mut(idx) else {
            return Vec::new();
        };
        choice.apply(&out);
        if let Some(err) = choice.failure() {
            return vec![json_event(&err.body())];
        }
        let finished = out.finished.is_some();
        let delta = match self.reasoning.get_mut(idx) {
            None => DeltaMessage {
                content: (!out.new_text.is_empty() || !finished).then_some(out.new_text),
                ..Default::default()
            },
            Some(parser) => {
                let mut d = parser.push(&out.new_text);
                if finished {
                    let rest = parser.finish();
                    d.reasoning += &rest.reasoning;
                    d.content += &rest.content;
                }
                reasoning_delta(d)
            }
        };
        // Tool calls come from the content only: the content delta goes
        // through the choice's tool parser, which may hold it back or turn it
        // into call deltas (each sent as a chunk of its own).
        let mut deltas = vec![delta];
        let mut called = false;
        if let Some(parser) = self.tools.get_mut(idx) {
            let text = deltas[0].content.take().unwrap_or_default();
            let mut events = parser.push(&text);
            if finished {
                events.extend(parser.finish());
            }
            let mut content = String::new();
            for e in &events {
                if let ToolEvent::Content(c) = e {
                    content.push_str(c);
                }
            }
            deltas[0].content = (!content.is_empty()).then_some(content);
            deltas.extend(events.into_iter().filter_map(tool_delta));
            called = parser.calls() > 0
                && self
                    .ctx
                    .tool_mode
                    .as_ref()
                    .is_some_and(ToolMode::finish_reason_tool_calls);
            let first_empty = deltas[0].content.is_none() && deltas[0].reasoning.is_none();
            if first_empty && deltas.len() > 1 {
                deltas.remove(0);
            }
        }
        let only = &deltas[0];
        let empty = deltas.len() == 1
            && only.content.as_ref().is_none_or(|c| c.is_empty())
            && only.reasoning.is_none()
            && only.tool_calls.is_none();
        if empty && !finished && out.new_logprobs.is_empty() {
            return Vec::new();
        }
        let mut logprobs = self
            .ctx
            .top_logprobs
            .map(|k| chat_logprobs(&out.new_logprobs, k, self.ctx.state.tokenizer.as_ref()));
        let last = deltas.len() - 1;
        let mut events = Vec::with_capacity(deltas.len());
        for (i, delta) in deltas.into_iter().enumerate() {
            let (finish_reason, stop_reason) = if i < last {
                (None, None)
            } else if called && finished {
                (
                    Some("tool_calls".to_string()),
                    fanout::stop_reason(&out.finished),
                )
            } else {
                (
                    fanout::finish_reason(&out.finished),
                    fanout::stop_reason(&out.finished),
                )
            };
            events.push(self.chunk(vec![ChatChunkChoice {
                index: idx,
                delta,
                logprobs: logprobs.take(),
                finish_reason,
                stop_reason,
            }]));
        }
        events
    }

    fn finish(&mut self) -> Vec<Event> {
        if !self.include_usage {
            return Vec::new();
        }
        vec![json_event(&ChatCompletionChunk {
            id: self.ctx.id.clone(),
            object: "chat.completion.chunk",
            created: self.ctx.created,
            model: self.ctx.model.clone(),
            choices: Vec::new(),
            usage: Some(fanout::usage(&self.choices, self.ctx.n)),
        })]
    }
}

/// A parsed delta as the wire has it: only the fields that gained text.
fn reasoning_delta(d: Delta) -> DeltaMessage {
    let reasoning = (!d.reasoning.is_empty()).then_some(d.reasoning);
    DeltaMessage {
        content: (!d.content.is_empty()).then_some(d.content),
        reasoning_content: reasoning.clone(),
        reasoning,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::tool_parsers::ToolCallParser;

    fn call(name: &str, arguments: &str) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn tool_calls_come_from_the_content_only() {
        let hermes = ToolMode::Auto(ToolCallParser::Hermes);
        let text =
            "<think>maybe <tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call></think>\
                    Calling.<tool_call>{\"name\": \"b\", \"arguments\": {\"x\": 1}}</tool_call>";
        let r = split_reply(Some(ReasoningParser::DeepSeekR1), Some(&hermes), text);
        assert_eq!(
            r,
            Reply {
                reasoning: Some(
                    "maybe <tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>".into()
                ),
                content: Some("Calling.".into()),
                calls: vec![call("b", r#"{"x": 1}"#)],
                tool_calls_finish: true,
            }
        );
        // All reasoning: nothing to parse.
        let r = split_reply(
            Some(ReasoningParser::DeepSeekR1),
            Some(&hermes),
            "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>",
        );
        assert!(r.calls.is_empty() && r.content.is_none());
        // No tool mode: the text is left alone.
        let r = split_reply(
            None,
            None,
            "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>",
        );
        assert!(r.calls.is_empty() && r.content.is_some());
    }

    #[test]
    fn constrained_replies_as_vllm() {
        let r = split_reply(
            None,
            Some(&ToolMode::Required),
            r#"[{"name": "a", "parameters": {"k": "v"}}]"#,
        );
        assert_eq!(r.calls, vec![call("a", r#"{"k": "v"}"#)]);
        assert_eq!(
            (r.content.as_deref(), r.tool_calls_finish),
            (Some(""), true)
        );
        let r = split_reply(None, Some(&ToolMode::Named("f".into())), r#"{"k": 1}"#);
        assert_eq!(r.calls, vec![call("f", r#"{"k": 1}"#)]);
        assert_eq!(
            (r.content.as_deref(), r.tool_calls_finish),
            (Some(""), false)
        );
    }

    #[test]
    fn tool_deltas_have_vllm_shape() {
        let d = tool_delta(ToolEvent::Start {
            index: 1,
            name: "f".into(),
        })
        .unwrap();
        let v = serde_json::to_value(&d).unwrap();
        let call = &v["tool_calls"][0];
        assert!(call["id"].as_str().unwrap().starts_with("chatcmpl-tool-"));
        assert_eq!(
            (&call["index"], &call["type"], &call["function"]),
            (
                &serde_json::json!(1),
                &serde_json::json!("function"),
                &serde_json::json!({"name": "f"})
            )
        );
        let d = tool_delta(ToolEvent::Arguments {
            index: 1,
            fragment: "{\"".into(),
        })
        .unwrap();
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({"tool_calls": [{"index": 1, "function": {"arguments": "{\""}}]})
        );
        assert!(tool_delta(ToolEvent::Content("x".into())).is_none());
    }
}
