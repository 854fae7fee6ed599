//! What every route handler shares: the engine handle, the tokenizer, the
//! chat template and the server's settings.

use std::sync::Arc;

use axum::http::HeaderMap;

use super::error::{ApiError, Result};
use super::reasoning::ReasoningParser;
use super::sampling::SamplingDefaults;
use super::tool_parsers::ToolCallParser;
use crate::chat_template::ChatTemplate;
use crate::engine::client::EngineClient;
use crate::tokenizer::Tokenizer;

pub struct AppState {
    pub engine: EngineClient,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    /// `--chat-template-content-format`: "auto", "string" or "openai".
    pub content_format: String,
    /// The first is reported when a request names none.
    pub served_model_names: Vec<String>,
    /// The model path, shown as `root` in /v1/models.
    pub model_root: String,
    pub max_model_len: usize,
    pub response_role: String,
    /// `--reasoning-parser`: chat replies split into reasoning and content.
    pub reasoning_parser: Option<ReasoningParser>,
    /// `--enable-auto-tool-choice`: `tool_choice: "auto"` is served.
    pub enable_auto_tool_choice: bool,
    /// `--exclude-tools-when-tool-choice-none`: `none` hides the tools from the template.
    pub exclude_tools_when_tool_choice_none: bool,
    /// `--tool-call-parser`: how tool calls are read from replies.
    pub tool_parser: Option<ToolCallParser>,
    pub defaults: SamplingDefaults,
    pub log_requests: bool,
    /// Unix seconds at startup (the models' `created`).
    pub created: i64,
    /// A pooling (embedding) model's pooler and output size; `None` for a
    /// generative model.
    pub pooling: Option<PoolingModel>,
}

/// What /v1/embeddings needs to know about the served pooling model.
#[derive(Clone, Debug)]
pub struct PoolingModel {
    pub pooler: worker::pooling::PoolerConfig,
    /// The pooled vector's length (the model's hidden size).
    pub hidden_size: usize,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// vLLM's answer on an endpoint the served model's runner lacks
    /// (`api`: "Completions", "Chat Completions", "Embeddings").
    pub fn require_api(&self, api: &'static str) -> Result<()> {
        let pooling = self.pooling.is_some();
        if pooling == (api == "Embeddings") {
            return Ok(());
        }
        Err(ApiError::invalid(
            format!("The model does not support {api} API"),
            None,
        ))
    }

    /// The model name to report, or 404 when the request names another model.
    pub fn check_model(&self, requested: Option<&str>) -> Result<String> {
        match requested {
            None | Some("") => Ok(self.served_model_names[0].clone()),
            Some(name) if self.served_model_names.iter().any(|n| n == name) => Ok(name.to_string()),
            Some(name) => Err(ApiError::ModelNotFound {
                model: name.to_string(),
            }),
        }
    }
}

/// The request's id: the body's `request_id`, else `X-Request-Id`, else random.
pub fn base_request_id(body_id: Option<&str>, headers: &HeaderMap) -> String {
    if let Some(id) = body_id.filter(|s| !s.is_empty()) {
        return id.to_string();
    }
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// Unix time in seconds, for `created`.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Engine request ids for a fan-out: one per (prompt, sample), as vLLM names them.
pub fn engine_request_id(
    base: &str,
    prompt_idx: usize,
    num_prompts: usize,
    sample: usize,
    n: usize,
) -> String {
    let mut id = base.to_string();
    if num_prompts > 1 {
        id.push_str(&format!("-{prompt_idx}"));
    }
    if n > 1 {
        id.push_str(&format!("-{sample}"));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        assert_eq!(base_request_id(Some("b"), &h), "b");
        h.insert("x-request-id", "hdr".parse().unwrap());
        assert_eq!(base_request_id(None, &h), "hdr");
        assert_eq!(engine_request_id("x", 0, 1, 0, 1), "x");
        assert_eq!(engine_request_id("x", 0, 1, 1, 2), "x-1");
        assert_eq!(engine_request_id("x", 2, 3, 1, 2), "x-2-1");
    }
}
