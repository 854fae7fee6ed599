//! `POST /v1/completions`.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;

use super::error::{parse_request, ApiError, Result};
use super::fanout::{self, ChoiceState, MergedStream};
use super::logprobs::{prompt_logprobs_json, CompletionLogprobsBuilder};
use super::protocol::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Prompt, Usage,
};
use super::sampling::{self, EndpointSampling};
use super::sse::{json_event, stream_response, ChunkEncoder};
use super::state::{base_request_id, engine_request_id, unix_now, SharedState};
use crate::engine::{EngineRequest, RequestOutput};
use crate::tokenizer::Tokenizer;

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: usize = 16;

/// One prompt: its text (for echo and logs) and token ids.
struct PromptInput {
    text: Option<String>,
    ids: Vec<u32>,
}

fn prompt_inputs(
    prompt: Prompt,
    tokenizer: &Tokenizer,
    add_special: bool,
) -> Result<Vec<PromptInput>> {
    let encode = |text: String| -> Result<PromptInput> {
        let ids = tokenizer.encode(&text, add_special)?;
        Ok(PromptInput {
            text: Some(text),
            ids,
        })
    };
    let inputs = match prompt {
        Prompt::Text(t) => vec![encode(t)?],
        Prompt::Texts(ts) => ts.into_iter().map(encode).collect::<Result<_>>()?,
        Prompt::Tokens(ids) => vec![PromptInput { text: None, ids }],
        Prompt::TokenLists(lists) => lists
            .into_iter()
            .map(|ids| PromptInput { text: None, ids })
            .collect(),
    };
    if inputs.is_empty() {
        return Err(ApiError::invalid(
            "prompt must not be empty.",
            Some("prompt"),
        ));
    }
    Ok(inputs)
}

pub async fn create_completion(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    state.require_api("Completions")?;
    let req: CompletionRequest = parse_request(&body)?;
    let model = state.check_model(req.model.as_deref())?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::NotSupported {
            feature: "suffix",
            param: "suffix",
            detail: " by this server.".into(),
        });
    }
    let stream = req.stream.unwrap_or(false);
    if req.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "Stream options can only be defined when `stream=True`.",
            Some("stream_options"),
        ));
    }
    let n = sampling::check_n(req.sampling.n, req.best_of)?;
    let echo = req.echo.unwrap_or(false);
    let endpoint = EndpointSampling {
        max_tokens: Some(req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
        logprobs: req.logprobs,
        echo_prompt_logprobs: echo && req.logprobs.is_some(),
    };
    let params = sampling::build(&req.sampling, &endpoint, &state.defaults)?;
    params
        .validate(state.tokenizer.vocab_size())
        .map_err(|e| ApiError::invalid(e.message, Some(e.param)))?;
    let add_special = req.sampling.add_special_tokens.unwrap_or(true);
    let tokenizer = state.tokenizer.clone();
    let prompt = req.prompt.clone();
    let inputs =
        tokio::task::spawn_blocking(move || prompt_inputs(prompt, &tokenizer, add_special))
            .await
            .map_err(|e| ApiError::Internal {
                message: format!("tokenization task failed: {e}"),
            })??;

    let id = format!(
        "cmpl-{}",
        base_request_id(req.sampling.request_id.as_deref(), &headers)
    );
    let arrival = Instant::now();
    let mut requests = Vec::with_capacity(inputs.len() * n);
    for (p, input) in inputs.iter().enumerate() {
        for i in 0..n {
            let request_id = engine_request_id(&id, p, inputs.len(), i, n);
            let sampling_params = sampling::for_sample(&params, i);
            if state.log_requests {
                tracing::info!(
                    "Received request {request_id}: prompt: {:?}, params: {sampling_params:?}, prompt_token_ids: {:?}.",
                    input.text.as_deref().unwrap_or(""),
                    input.ids
                );
            }
            requests.push(EngineRequest {
                request_id,
                prompt_token_ids: input.ids.clone(),
                sampling_params,
                priority: req.sampling.priority.unwrap_or(0),
                arrival_time: arrival,
            });
        }
    }
    let merged = fanout::submit(&state.engine, requests).await?;
    let echoes: Vec<Echo> = if echo {
        inputs
            .iter()
            .map(|input| {
                let text = match &input.text {
                    Some(t) => t.clone(),
                    None => state.tokenizer.decode(&input.ids, false)?,
                };
                Ok(Echo {
                    text,
                    ids: input.ids.clone(),
                })
            })
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let ctx = Ctx {
        id,
        model,
        created: unix_now(),
        n,
        num_choices: inputs.len() * n,
        echoes,
        logprobs: req.logprobs,
        state,
    };
    if stream {
        let opts = req.stream_options.unwrap_or_default();
        let encoder = StreamEncoder {
            choices: vec![ChoiceState::default(); ctx.num_choices],
            builders: vec![CompletionLogprobsBuilder::default(); ctx.num_choices],
            include_usage: opts.include_usage.unwrap_or(false),
            continuous_usage: opts.continuous_usage_stats.unwrap_or(false),
            ctx,
        };
        Ok(stream_response(encoder, merged))
    } else {
        Ok(collect(ctx, merged).await?.into_response())
    }
}

struct Echo {
    text: String,
    ids: Vec<u32>,
}

/// What both response paths need.
struct Ctx {
    id: String,
    model: String,
    created: i64,
    n: usize,
    num_choices: usize,
    echoes: Vec<Echo>,
    logprobs: Option<usize>,
    state: SharedState,
}

impl Ctx {
    fn echo_for(&self, idx: usize) -> Option<&Echo> {
        self.echoes.get(idx / self.n)
    }

    /// Logprobs for the echoed prompt (first token unscored) then generated tokens.
    fn logprobs_for(
        &self,
        builder: &mut CompletionLogprobsBuilder,
        echo: Option<(&Echo, &ChoiceState)>,
        out_ids: &[u32],
        out_logprobs: &[worker::TokenLogprobs],
    ) -> Option<CompletionLogprobs> {
        let k = self.logprobs?;
        let tok = self.state.tokenizer.as_ref();
        let mut all = CompletionLogprobs::default();
        if let Some((echo, choice)) = echo {
            let scored: Vec<Option<&worker::TokenLogprobs>> = match &choice.prompt_logprobs {
                Some(p) => echo
                    .ids
                    .iter()
                    .enumerate()
                    .map(|(i, _)| p.get(i).and_then(|e| e.as_ref()))
                    .collect(),
                None => vec![None; echo.ids.len()],
            };
            all.extend(builder.push(&echo.ids, &scored, k, tok));
        }
        let entries: Vec<Option<&worker::TokenLogprobs>> = out_logprobs.iter().map(Some).collect();
        let ids: Vec<u32> = if out_logprobs.len() == out_ids.len() {
            out_ids.to_vec()
        } else {
            out_logprobs.iter().map(|l| l.token_id).collect()
        };
        all.extend(builder.push(&ids, &entries, k, tok));
        Some(all)
    }
}

async fn collect(ctx: Ctx, mut merged: MergedStream) -> Result<axum::Json<CompletionResponse>> {
    let mut choices = vec![ChoiceState::default(); ctx.num_choices];
    while let Some((idx, out)) = merged.next().await {
        if let Some(c) = choices.get_mut(idx) {
            c.apply(&out);
            if let Some(err) = c.failure() {
                return Err(err);
            }
        }
    }
    let tok = ctx.state.tokenizer.clone();
    let mut out = Vec::with_capacity(choices.len());
    for (idx, c) in choices.iter().enumerate() {
        let echo = ctx.echo_for(idx);
        let mut text = String::new();
        if let Some(e) = echo {
            text.push_str(&e.text);
        }
        text.push_str(&c.text);
        let mut builder = CompletionLogprobsBuilder::default();
        let logprobs = ctx.logprobs_for(
            &mut builder,
            echo.map(|e| (e, c)),
            &c.token_ids,
            &c.logprobs,
        );
        out.push(CompletionChoice {
            index: idx,
            text,
            logprobs,
            finish_reason: fanout::finish_reason(&c.finished),
            stop_reason: fanout::stop_reason(&c.finished),
            prompt_logprobs: c
                .prompt_logprobs
                .as_ref()
                .map(|p| prompt_logprobs_json(p, tok.as_ref())),
        });
    }
    Ok(axum::Json(CompletionResponse {
        id: ctx.id,
        object: "text_completion",
        created: ctx.created,
        model: ctx.model,
        usage: Some(fanout::usage(&choices, ctx.n)),
        choices: out,
    }))
}

struct StreamEncoder {
    ctx: Ctx,
    choices: Vec<ChoiceState>,
    builders: Vec<CompletionLogprobsBuilder>,
    include_usage: bool,
    continuous_usage: bool,
}

impl StreamEncoder {
    fn chunk(&self, choice: serde_json::Value, usage: Option<Usage>) -> Event {
        let mut v = json!({
            "id": self.ctx.id,
            "object": "text_completion",
            "created": self.ctx.created,
            "model": self.ctx.model,
            "choices": [choice],
        });
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        json_event(&v)
    }
}

impl ChunkEncoder for StreamEncoder {
    fn start(&mut self) -> Vec<Event> {
        Vec::new()
    }

    fn on_output(&mut self, idx: usize, out: RequestOutput) -> Vec<Event> {
        let Some(choice) = self.choices.get_mut(idx) else {
            return Vec::new();
        };
        let first = !choice.started;
        choice.apply(&out);
        if let Some(err) = choice.failure() {
            return vec![json_event(&err.body())];
        }
        let echo = if first { self.ctx.echo_for(idx) } else { None };
        let mut text = String::new();
        if let Some(e) = echo {
            text.push_str(&e.text);
        }
        text.push_str(&out.new_text);
        let finished = out.finished.is_some();
        if text.is_empty() && !finished && out.new_logprobs.is_empty() {
            return Vec::new();
        }
        let choice = &self.choices[idx];
        let logprobs = self.ctx.logprobs_for(
            &mut self.builders[idx],
            echo.map(|e| (e, choice)),
            &out.new_token_ids,
            &out.new_logprobs,
        );
        let body = json!({
            "index": idx,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": fanout::finish_reason(&out.finished),
            "stop_reason": fanout::stop_reason(&out.finished),
        });
        let usage = self
            .continuous_usage
            .then(|| fanout::usage(&self.choices, self.ctx.n));
        vec![self.chunk(body, usage)]
    }

    fn finish(&mut self) -> Vec<Event> {
        if !self.include_usage {
            return Vec::new();
        }
        let usage = fanout::usage(&self.choices, self.ctx.n);
        vec![json_event(&json!({
            "id": self.ctx.id,
            "object": "text_completion",
            "created": self.ctx.created,
            "model": self.ctx.model,
            "choices": [],
            "usage": usage,
        }))]
    }
}
