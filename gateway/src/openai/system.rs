//! Routes about the server itself: /v1/models, /health, /ping, /version, /metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::protocol::{ModelCard, ModelList};
use super::state::SharedState;

pub async fn list_models(State(state): State<SharedState>) -> Json<ModelList> {
    let data = state
        .served_model_names
        .iter()
        .map(|name| ModelCard {
            id: name.clone(),
            object: "model",
            created: state.created,
            owned_by: "vllm",
            root: state.model_root.clone(),
            parent: None,
            max_model_len: state.max_model_len,
            permission: vec![json!({
                "id": format!("modelperm-{}", uuid::Uuid::new_v4().simple()),
                "object": "model_permission",
                "created": state.created,
                "allow_create_engine": false,
                "allow_sampling": true,
                "allow_logprobs": true,
                "allow_search_indices": false,
                "allow_view": true,
                "allow_fine_tuning": false,
                "organization": "*",
                "group": null,
                "is_blocking": false,
            })],
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

/// 200 with an empty body while the engine runs; 503 once it died.
pub async fn health(State(state): State<SharedState>) -> Response {
    if state.engine.is_alive() {
        StatusCode::OK.into_response()
    } else {
        ApiError::Engine(crate::engine::EngineError::EngineDead {
            reason: "the engine loop has stopped".into(),
        })
        .into_response()
    }
}

/// `POST /reset_prefix_cache` (development mode). As vLLM, 200 either
/// way; the log says whether the cache could be reset.
pub async fn reset_prefix_cache(State(state): State<SharedState>) -> Response {
    match state.engine.reset_prefix_cache().await {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => ApiError::Engine(e).into_response(),
    }
}

/// `POST /start_profile` (with `VLLM_TORCH_PROFILER_DIR`).
pub async fn start_profile(State(state): State<SharedState>) -> Response {
    match state.engine.start_profile().await {
        Ok(Ok(())) => StatusCode::OK.into_response(),
        Ok(Err(why)) => ApiError::invalid(why, None).into_response(),
        Err(e) => ApiError::Engine(e).into_response(),
    }
}

/// `POST /stop_profile`: writes the trace into `VLLM_TORCH_PROFILER_DIR`.
pub async fn stop_profile(State(state): State<SharedState>) -> Response {
    match state.engine.stop_profile().await {
        Ok(Ok(_)) => StatusCode::OK.into_response(),
        Ok(Err(why)) => ApiError::invalid(why, None).into_response(),
        Err(e) => ApiError::Engine(e).into_response(),
    }
}

pub async fn version() -> Json<serde_json::Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

pub async fn metrics(State(state): State<SharedState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.engine.render_metrics(),
    )
        .into_response()
}
