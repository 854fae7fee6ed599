//! The OpenAPI 3.1 document served at `/openapi.json`, built from the same
//! route table the router logs at startup.

use serde_json::{json, Map, Value};

/// One route: path, methods, summary, request schema (if it takes a body).
pub struct RouteDoc {
    pub path: &'static str,
    pub methods: &'static [&'static str],
    pub summary: &'static str,
    pub request: Option<&'static str>,
}

/// Development endpoints, served only with `VLLM_SERVER_DEV_MODE=1`.
pub const DEV_ROUTES: &[RouteDoc] = &[RouteDoc {
    path: "/reset_prefix_cache",
    methods: &["POST"],
    summary: "Forget every cached prefix (development mode); 200 whether or not requests still hold blocks, as vLLM",
    request: None,
}];

/// The profiler's endpoints, served only with `VLLM_TORCH_PROFILER_DIR`.
pub const PROFILER_ROUTES: &[RouteDoc] = &[
    RouteDoc {
        path: "/start_profile",
        methods: &["POST"],
        summary: "Start recording engine steps (VLLM_TORCH_PROFILER_DIR)",
        request: None,
    },
    RouteDoc {
        path: "/stop_profile",
        methods: &["POST"],
        summary: "Stop recording; writes a Chrome-trace JSON file into VLLM_TORCH_PROFILER_DIR",
        request: None,
    },
];

pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        path: "/openapi.json",
        methods: &["GET"],
        summary: "This document",
        request: None,
    },
    RouteDoc {
        path: "/health",
        methods: &["GET"],
        summary: "200 while the engine is running",
        request: None,
    },
    RouteDoc {
        path: "/ping",
        methods: &["GET", "POST"],
        summary: "Liveness probe (same as /health)",
        request: None,
    },
    RouteDoc {
        path: "/version",
        methods: &["GET"],
        summary: "Server version",
        request: None,
    },
    RouteDoc {
        path: "/metrics",
        methods: &["GET"],
        summary: "Prometheus metrics (vllm: names)",
        request: None,
    },
    RouteDoc {
        path: "/tokenize",
        methods: &["POST"],
        summary: "Tokenize a prompt or chat messages",
        request: Some("TokenizeRequest"),
    },
    RouteDoc {
        path: "/detokenize",
        methods: &["POST"],
        summary: "Token ids to text",
        request: Some("DetokenizeRequest"),
    },
    RouteDoc {
        path: "/v1/models",
        methods: &["GET"],
        summary: "List the served models",
        request: None,
    },
    RouteDoc {
        path: "/v1/completions",
        methods: &["POST"],
        summary: "Create a completion",
        request: Some("CompletionRequest"),
    },
    RouteDoc {
        path: "/v1/chat/completions",
        methods: &["POST"],
        summary: "Create a chat completion",
        request: Some("ChatCompletionRequest"),
    },
    RouteDoc {
        path: "/v1/embeddings",
        methods: &["POST"],
        summary: "Create embeddings (pooling models: --runner pooling)",
        request: Some("EmbeddingRequest"),
    },
];

fn sampling_properties() -> Map<String, Value> {
    let num = json!({"type": "number"});
    let int = json!({"type": "integer"});
    let boolean = json!({"type": "boolean"});
    let ints = json!({"type": "array", "items": {"type": "integer"}});
    let mut m = Map::new();
    for k in [
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ] {
        m.insert(k.into(), num.clone());
    }
    for k in [
        "n",
        "top_k",
        "seed",
        "min_tokens",
        "prompt_logprobs",
        "truncate_prompt_tokens",
        "priority",
        "max_tokens",
    ] {
        m.insert(k.into(), int.clone());
    }
    for k in [
        "stream",
        "ignore_eos",
        "include_stop_str_in_output",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "echo",
        "add_special_tokens",
    ] {
        m.insert(k.into(), boolean.clone());
    }
    m.insert("stop_token_ids".into(), ints.clone());
    m.insert("allowed_token_ids".into(), ints);
    m.insert("model".into(), json!({"type": "string"}));
    m.insert("request_id".into(), json!({"type": "string"}));
    // Structured outputs (openai/structured_outputs.rs).
    for k in [
        "guided_regex",
        "guided_grammar",
        "guided_whitespace_pattern",
        "guided_decoding_backend",
    ] {
        m.insert(k.into(), json!({"type": "string"}));
    }
    m.insert(
        "guided_choice".into(),
        json!({"type": "array", "items": {"type": "string"}}),
    );
    m.insert(
        "guided_json".into(),
        json!({"anyOf": [{"type": "object"}, {"type": "string"}]}),
    );
    m.insert("structured_outputs".into(), json!({"type": "object"}));
    m.insert("response_format".into(), json!({"type": "object"}));
    m.insert(
        "stop".into(),
        json!({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
    );
    m.insert(
        "logit_bias".into(),
        json!({"type": "object", "additionalProperties": {"type": "number"}}),
    );
    m.insert(
        "stream_options".into(),
        json!({"type": "object", "properties": {
        "include_usage": {"type": "boolean"}, "continuous_usage_stats": {"type": "boolean"}}}),
    );
    m
}

fn schemas() -> Value {
    let mut completion = sampling_properties();
    completion.insert(
        "prompt".into(),
        json!({"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}]}),
    );
    completion.insert("logprobs".into(), json!({"type": "integer"}));
    completion.insert("best_of".into(), json!({"type": "integer"}));
    completion.insert(
        "suffix".into(),
        json!({"type": "string", "description": "not supported"}),
    );
    let mut chat = sampling_properties();
    chat.insert("messages".into(), json!({"type": "array", "items": {"type": "object", "properties": {
        "role": {"type": "string"},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}}}}));
    chat.insert("logprobs".into(), json!({"type": "boolean"}));
    chat.insert("top_logprobs".into(), json!({"type": "integer"}));
    chat.insert("max_completion_tokens".into(), json!({"type": "integer"}));
    chat.insert("add_generation_prompt".into(), json!({"type": "boolean"}));
    chat.insert("continue_final_message".into(), json!({"type": "boolean"}));
    chat.insert("chat_template".into(), json!({"type": "string"}));
    chat.insert("chat_template_kwargs".into(), json!({"type": "object"}));
    json!({
        "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": completion},
        "ChatCompletionRequest": {"type": "object", "required": ["messages"], "properties": chat},
        "TokenizeRequest": {"anyOf": [
            {"type": "object", "required": ["prompt"], "properties": {
                "model": {"type": "string"}, "prompt": {"type": "string"},
                "add_special_tokens": {"type": "boolean"}, "return_token_strs": {"type": "boolean"}}},
            {"type": "object", "required": ["messages"], "properties": {
                "model": {"type": "string"}, "messages": {"type": "array"},
                "add_generation_prompt": {"type": "boolean"}, "continue_final_message": {"type": "boolean"},
                "add_special_tokens": {"type": "boolean"}}}]},
        "EmbeddingRequest": {"type": "object", "required": ["input"], "properties": {
            "model": {"type": "string"},
            "input": {"anyOf": [
                {"type": "string"}, {"type": "array", "items": {"type": "string"}},
                {"type": "array", "items": {"type": "integer"}},
                {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}]},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": {"type": "integer"},
            "user": {"type": "string"},
            "truncate_prompt_tokens": {"type": "integer"},
            "add_special_tokens": {"type": "boolean"},
            "normalize": {"type": "boolean"},
            "priority": {"type": "integer"},
            "request_id": {"type": "string"}}},
        "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
            "model": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer"}}}},
        "ErrorResponse": {"type": "object", "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": "integer"}}}}},
    })
}

/// Which optional endpoints the server has (from the environment).
#[derive(Clone, Copy, Debug, Default)]
pub struct Optional {
    /// `VLLM_SERVER_DEV_MODE=1`.
    pub dev_mode: bool,
    /// `VLLM_TORCH_PROFILER_DIR` set.
    pub profiler: bool,
}

impl Optional {
    pub fn from_env() -> Self {
        use runtime::envs;
        Self {
            dev_mode: envs::flag(envs::VLLM_SERVER_DEV_MODE),
            profiler: envs::raw(envs::VLLM_TORCH_PROFILER_DIR).is_some(),
        }
    }
}

/// The routes served: `ROUTES`, and the optional ones that are on.
pub fn served_routes(on: Optional) -> impl Iterator<Item = &'static RouteDoc> {
    ROUTES
        .iter()
        .chain(DEV_ROUTES.iter().filter(move |_| on.dev_mode))
        .chain(PROFILER_ROUTES.iter().filter(move |_| on.profiler))
}

pub fn document(root_path: &str, on: Optional) -> Value {
    let mut paths = Map::new();
    for r in served_routes(on) {
        let mut ops = Map::new();
        for m in r.methods {
            let mut op = json!({
                "summary": r.summary,
                "responses": {
                    "200": {"description": "Successful Response"},
                    "400": {"description": "Bad request", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}},
                },
            });
            if let Some(schema) = r.request {
                op["requestBody"] = json!({"required": true, "content": {"application/json": {
                    "schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
            }
            if r.path.starts_with("/v1/") {
                op["security"] = json!([{"bearer": []}]);
            }
            ops.insert(m.to_ascii_lowercase(), op);
        }
        paths.insert(r.path.to_string(), Value::Object(ops));
    }
    let server = if root_path.is_empty() { "/" } else { root_path };
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Flotilla OpenAI-compatible API", "version": env!("CARGO_PKG_VERSION")},
        "servers": [{"url": server}],
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_with_its_schema() {
        let all = Optional {
            dev_mode: true,
            profiler: true,
        };
        let doc = document("/api", all);
        assert_eq!(doc["servers"][0]["url"], "/api");
        let plain = document("/api", Optional::default());
        assert!(!plain["paths"]["/reset_prefix_cache"].is_object());
        assert!(!plain["paths"]["/start_profile"].is_object());
        for r in ROUTES.iter().chain(DEV_ROUTES).chain(PROFILER_ROUTES) {
            for m in r.methods {
                let op = &doc["paths"][r.path][m.to_ascii_lowercase()];
                assert!(op.is_object(), "{} {}", m, r.path);
                if let Some(s) = r.request {
                    assert!(doc["components"]["schemas"][s].is_object(), "{s}");
                }
            }
        }
    }
}
