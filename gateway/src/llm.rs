//! The offline API, as vLLM's `LLM` class: load a model once, then run
//! batches of prompts or conversations to completion. Blocking; it owns a
//! small tokio runtime to drive the engine's async handle.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use worker::{SamplingParams, TokenLogprobs};

use crate::chat_template::{ChatTemplate, ChatTemplateError, RenderOptions};
use crate::engine::{
    EngineArgs, EngineClient, EngineError, EngineRequest, FinishReason, LoadedEngine,
};
use crate::tokenizer::{Tokenizer, TokenizerError};

pub type Result<T> = std::result::Result<T, LlmError>;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
    #[error("the model has no chat template; use generate() instead of chat()")]
    NoChatTemplate,
    #[error("cannot start the runtime for the offline API: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("request {request_id} failed: {message}")]
    RequestFailed { request_id: String, message: String },
}

/// One prompt's results (vLLM's `RequestOutput`).
#[derive(Clone, Debug)]
pub struct Completion {
    /// The prompt text; `None` when the prompt was given as token ids.
    pub prompt: Option<String>,
    pub prompt_token_ids: Vec<u32>,
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    pub num_cached_tokens: usize,
    /// `n` outputs, in index order.
    pub outputs: Vec<CompletionOutput>,
}

#[derive(Clone, Debug)]
pub struct CompletionOutput {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    /// One entry per token when `logprobs` was requested.
    pub logprobs: Option<Vec<TokenLogprobs>>,
    pub finish_reason: FinishReason,
}

/// How `chat` renders conversations.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    /// "auto", "string" or "openai".
    pub content_format: String,
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            add_generation_prompt: true,
            continue_final_message: false,
            content_format: "auto".into(),
            chat_template_kwargs: serde_json::Map::new(),
        }
    }
}

pub struct LLM {
    runtime: tokio::runtime::Runtime,
    engine: LoadedEngine,
    chat_template: Option<ChatTemplate>,
    next_id: AtomicU64,
}

impl LLM {
    /// Loads the model and starts the engine.
    pub fn new(model: impl AsRef<Path>, args: EngineArgs) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LlmError::Runtime)?;
        let engine = args.build(model.as_ref())?;
        engine.client.set_log_stats(false);
        let chat_template = ChatTemplate::resolve(None, &engine.tokenizer)?;
        Ok(Self {
            runtime,
            engine,
            chat_template,
            next_id: AtomicU64::new(0),
        })
    }

    pub fn engine(&self) -> &EngineClient {
        &self.engine.client
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.engine.tokenizer
    }

    pub fn max_model_len(&self) -> usize {
        self.engine.max_model_len
    }

    /// Completes each prompt (`n` outputs each); results in input order.
    pub fn generate(
        &self,
        prompts: Vec<String>,
        params: &SamplingParams,
    ) -> Result<Vec<Completion>> {
        let mut inputs = Vec::with_capacity(prompts.len());
        for p in prompts {
            let ids = self.engine.tokenizer.encode(&p, true)?;
            inputs.push((Some(p), ids));
        }
        self.run(inputs, params)
    }

    /// Like `generate`, for prompts already tokenized.
    pub fn generate_token_ids(
        &self,
        prompts: Vec<Vec<u32>>,
        params: &SamplingParams,
    ) -> Result<Vec<Completion>> {
        self.run(prompts.into_iter().map(|ids| (None, ids)).collect(), params)
    }

    /// Renders each conversation (OpenAI chat messages) with the model's
    /// chat template and completes it.
    pub fn chat(
        &self,
        conversations: Vec<Vec<serde_json::Value>>,
        params: &SamplingParams,
        options: &ChatOptions,
    ) -> Result<Vec<Completion>> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(LlmError::NoChatTemplate)?;
        let format = template.content_format(&options.content_format);
        let opts = RenderOptions {
            add_generation_prompt: options.add_generation_prompt,
            continue_final_message: options.continue_final_message,
            chat_template_kwargs: options.chat_template_kwargs.clone(),
            ..Default::default()
        };
        let mut inputs = Vec::with_capacity(conversations.len());
        for messages in conversations {
            let text = template.render(&messages, format, &opts)?;
            // The template writes the special tokens itself.
            let ids = self.engine.tokenizer.encode(&text, false)?;
            inputs.push((Some(text), ids));
        }
        self.run(inputs, params)
    }

    fn run(
        &self,
        inputs: Vec<(Option<String>, Vec<u32>)>,
        params: &SamplingParams,
    ) -> Result<Vec<Completion>> {
        let batch = self.next_id.fetch_add(1, Ordering::Relaxed);
        let client = self.engine.client.clone();
        let n = params.n.max(1);
        self.runtime.block_on(async move {
            let mut tasks = Vec::with_capacity(inputs.len());
            for (i, (prompt, ids)) in inputs.into_iter().enumerate() {
                let mut streams = Vec::with_capacity(n);
                for j in 0..n {
                    // n > 1 fans out into single sequences, seeded seed+j so
                    // each differs and the whole stays reproducible.
                    let sampling_params = SamplingParams {
                        n: 1,
                        seed: params.seed.map(|s| s.wrapping_add(j as u64)),
                        ..params.clone()
                    };
                    let req = EngineRequest {
                        request_id: format!("llm-{batch}-{i}-{j}"),
                        prompt_token_ids: ids.clone(),
                        sampling_params,
                        priority: 0,
                        arrival_time: Instant::now(),
                    };
                    streams.push(client.add_request(req).await?);
                }
                tasks.push(collect(prompt, ids, streams, params.logprobs.is_some()));
            }
            futures::future::join_all(tasks).await.into_iter().collect()
        })
    }
}

async fn collect(
    prompt: Option<String>,
    prompt_token_ids: Vec<u32>,
    streams: Vec<crate::engine::RequestStream>,
    want_logprobs: bool,
) -> Result<Completion> {
    let mut completion = Completion {
        prompt,
        prompt_token_ids,
        prompt_logprobs: None,
        num_cached_tokens: 0,
        outputs: Vec::with_capacity(streams.len()),
    };
    let outputs = futures::future::join_all(streams.into_iter().enumerate().map(
        |(index, mut s)| async move {
            let mut out = CompletionOutput {
                index,
                text: String::new(),
                token_ids: Vec::new(),
                logprobs: want_logprobs.then(Vec::new),
                finish_reason: FinishReason::Abort,
            };
            let mut prompt_logprobs = None;
            let mut cached = 0;
            while let Some(o) = s.next().await {
                if let Some(message) = o.error {
                    return Err(LlmError::RequestFailed {
                        request_id: o.request_id,
                        message,
                    });
                }
                out.text.push_str(&o.new_text);
                out.token_ids.extend_from_slice(&o.new_token_ids);
                if let Some(l) = out.logprobs.as_mut() {
                    l.extend(o.new_logprobs);
                }
                if o.prompt_logprobs.is_some() {
                    prompt_logprobs = o.prompt_logprobs;
                }
                cached = o.num_cached_tokens;
                if let Some(r) = o.finished {
                    out.finish_reason = r;
                    break;
                }
            }
            Ok((out, prompt_logprobs, cached))
        },
    ))
    .await;
    for r in outputs {
        let (out, prompt_logprobs, cached) = r?;
        if out.index == 0 {
            completion.prompt_logprobs = prompt_logprobs;
            completion.num_cached_tokens = cached;
        }
        completion.outputs.push(out);
    }
    Ok(completion)
}

impl Drop for LLM {
    fn drop(&mut self) {
        let client = self.engine.client.clone();
        self.runtime.block_on(client.shutdown());
    }
}
