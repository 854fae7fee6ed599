//! The server's one error type and its single mapping to OpenAI's error body:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::chat_template::ChatTemplateError;
use crate::engine::EngineError;
use crate::tokenizer::TokenizerError;

use super::tools::ToolError;

pub type Result<T> = std::result::Result<T, ApiError>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, wrong types, or a parameter out of range.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("The model `{model}` does not exist.")]
    ModelNotFound { model: String },
    #[error("Route {path} not found.")]
    RouteNotFound { path: String },
    #[error("Unauthorized")]
    Unauthorized,
    /// A request feature this server does not implement (yet).
    #[error("{feature} is not supported{detail}")]
    NotSupported {
        feature: &'static str,
        param: &'static str,
        detail: String,
    },
    #[error(
        "The model has no chat template: pass one with --chat-template, or use /v1/completions."
    )]
    NoChatTemplate,
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// `tools` / `tool_choice` problems, and choices this build cannot enforce.
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{message}")]
    Internal { message: String },
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_string),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::NotSupported { .. }
            | ApiError::NoChatTemplate
            | ApiError::Tool(_)
            | ApiError::ChatTemplate(_) => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound { .. } | ApiError::RouteNotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Tokenizer(_) | ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Engine(e) if e.is_bad_request() => StatusCode::BAD_REQUEST,
            ApiError::Engine(EngineError::Unsupported { .. }) => StatusCode::BAD_REQUEST,
            ApiError::Engine(EngineError::EngineDead { .. } | EngineError::Overloaded { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// vLLM's `type` names.
    pub fn error_type(&self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::UNAUTHORIZED => "AuthenticationError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            _ => "InternalServerError",
        }
    }

    pub fn param(&self) -> Option<String> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.clone(),
            ApiError::NotSupported { param, .. } => Some(param.to_string()),
            ApiError::Tool(e) => Some(e.param().to_string()),
            ApiError::ModelNotFound { .. } => Some("model".into()),
            ApiError::NoChatTemplate | ApiError::ChatTemplate(_) => Some("messages".into()),
            ApiError::Engine(EngineError::StructuredOutput(e)) => e.param().map(str::to_string),
            ApiError::Engine(e) => e.param().map(str::to_string),
            _ => None,
        }
    }

    /// The JSON body, also used for errors sent inside an SSE stream.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.to_string(),
                "type": self.error_type(),
                "param": self.param(),
                "code": self.status().as_u16(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Engine(EngineError::Overloaded { .. }) = self {
            // Expected under load, not a server fault: no error log line.
            let mut r = (status, axum::Json(self.body())).into_response();
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            return r;
        }
        if status.is_server_error() {
            tracing::error!("{self}");
        }
        (status, axum::Json(self.body())).into_response()
    }
}

/// Parses a JSON body whatever its content type (curl's `-d` sends form
/// encoding), naming the offending field in `param`.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let mut value: serde_json::Value =
        serde_path_to_error::deserialize(de).map_err(to_api_error)?;
    integral_floats_to_ints(&mut value);
    serde_path_to_error::deserialize(value).map_err(to_api_error)
}

/// `10.0` where an integer is expected is 10, as pydantic (vLLM) reads it
/// and as JSON Schema's `integer` says; serde alone would refuse it.
fn integral_floats_to_ints(v: &mut serde_json::Value) {
    use serde_json::Value;
    // 2^64 and 2^63: the ranges of u64 and i64, exact in f64.
    const U64_END: f64 = 18_446_744_073_709_551_616.0;
    const I64_START: f64 = -9_223_372_036_854_775_808.0;
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                if f.fract() == 0.0 && (0.0..U64_END).contains(&f) {
                    *v = Value::from(f as u64);
                } else if f.fract() == 0.0 && (I64_START..0.0).contains(&f) {
                    *v = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_to_ints),
        Value::Object(map) => map.values_mut().for_each(integral_floats_to_ints),
        _ => {}
    }
}

/// As [`parse_json`] for completion and chat bodies: the shared sampling
/// fields are checked on their own first, because serde loses the field
/// name inside `#[serde(flatten)]`.
pub fn parse_request<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    let value: serde_json::Value = parse_json(body)?;
    if value.is_object() {
        serde_path_to_error::deserialize::<_, super::protocol::SamplingFields>(&value)
            .map_err(to_api_error)?;
    }
    serde_path_to_error::deserialize(&value).map_err(to_api_error)
}

fn to_api_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return ApiError::InvalidRequest {
            message: format!("JSON decode error: {inner}"),
            param: None,
        };
    }
    // "." is the root and "?" an unknown position (e.g. inside an untagged enum).
    let param = (!matches!(path.as_str(), "." | "?" | ""))
        .then_some(path)
        .or_else(|| missing_field(&inner.to_string()));
    let message = match &param {
        Some(p) => format!("Invalid value for `{p}`: {inner}"),
        None => format!("Invalid request: {inner}"),
    };
    ApiError::InvalidRequest { message, param }
}

/// The field named by serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let e = ApiError::ModelNotFound { model: "x".into() };
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            e.body(),
            json!({"error": {"message": "The model `x` does not exist.", "type": "NotFoundError",
                             "param": "model", "code": 404}})
        );
    }

    #[test]
    fn engine_errors_map_to_400_with_param() {
        let e = ApiError::from(EngineError::PromptTooLong {
            max_model_len: 8,
            prompt: 9,
        });
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.param().as_deref(), Some("prompt"));
        let e = ApiError::from(EngineError::EngineDead { reason: "x".into() });
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[derive(serde::Deserialize, Debug)]
    struct T {
        #[allow(dead_code)]
        temperature: f32,
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<T>(br#"{"temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param().as_deref(), Some("temperature"));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e = parse_json::<T>(b"{}").unwrap_err();
        assert_eq!(e.param().as_deref(), Some("temperature"));
        let e = parse_request::<crate::openai::protocol::CompletionRequest>(
            br#"{"prompt": "x", "top_p": "high"}"#,
        )
        .unwrap_err();
        assert_eq!(e.param().as_deref(), Some("top_p"), "{e}");
        let e = parse_json::<T>(b"{nope").unwrap_err();
        assert!(e.to_string().starts_with("JSON decode error"));
        #[derive(serde::Deserialize)]
        struct Ids {
            tokens: Vec<u32>,
        }
        assert_eq!(
            parse_json::<Ids>(br#"{"tokens": [10.0, 2]}"#)
                .unwrap()
                .tokens,
            [10, 2]
        );
        assert!(parse_json::<Ids>(br#"{"tokens": [1.5]}"#).is_err());
        assert!(parse_json::<Ids>(br#"{"tokens": [-1.0]}"#).is_err());
        let e = parse_json::<T>(b"{nope").unwrap_err();
        assert!(e.to_string().starts_with("JSON decode error"));
        assert!(e.param().is_none());
    }
}
