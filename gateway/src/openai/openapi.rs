//! The OpenAPI 3.1 document served at `/openapi.json`, built from the same
//! route table the router logs at startup.
//!
//! The document is built for the served model and the server's settings, so
//! that it says what this server accepts: the model names as an enum, token
//! ids bounded by the vocabulary, `max_tokens` by the context, only the
//! routes the model's runner serves, bearer auth only with `--api-key`, and
//! every status a route can answer. Optional fields are nullable, as in
//! vLLM's pydantic schema (the server reads `null` as "not set").
//! What JSON Schema cannot say (a prompt's length in tokens against the
//! context, a compilable regex, grammar or JSON schema, one structured
//! output constraint at most, `min_tokens <= max_tokens`, `best_of == n`)
//! is checked by the server with vLLM's 400s and stated in the descriptions.

use serde_json::{json, Map, Value};

use worker::sampling_params::MAX_LOGPROBS;

use super::sampling::MAX_N;

/// Which model runner a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runner {
    Any,
    /// Completions and chat: generative models.
    Generate,
    /// Embeddings: `--runner pooling` models.
    Pooling,
}

/// One route: path, methods, summary, request schema (if it takes a body),
/// the runner it needs and the error statuses it can answer (401 is added
/// on /v1 routes when a key is configured).
pub struct RouteDoc {
    pub path: &'static str,
    pub methods: &'static [&'static str],
    pub summary: &'static str,
    pub request: Option<&'static str>,
    pub runner: Runner,
    pub errors: &'static [u16],
}

/// Routes whose handler reads a body and the model name.
const BODY_ERRORS: &[u16] = &[400, 404, 413];
/// Routes that also hand work to the engine (overloaded or stopped: 503).
const ENGINE_ERRORS: &[u16] = &[400, 404, 413, 503];

/// Development endpoints, served only with `VLLM_SERVER_DEV_MODE=1`.
pub const DEV_ROUTES: &[RouteDoc] = &[RouteDoc {
    path: "/reset_prefix_cache",
    methods: &["POST"],
    summary: "Forget every cached prefix (development mode); 200 whether or not requests still hold blocks, as vLLM",
    request: None,
    runner: Runner::Any,
    errors: &[503],
}];

/// The profiler's endpoints, served only with `VLLM_TORCH_PROFILER_DIR`.
pub const PROFILER_ROUTES: &[RouteDoc] = &[
    RouteDoc {
        path: "/start_profile",
        methods: &["POST"],
        summary: "Start recording engine steps (VLLM_TORCH_PROFILER_DIR)",
        request: None,
        runner: Runner::Any,
        errors: &[400, 503],
    },
    RouteDoc {
        path: "/stop_profile",
        methods: &["POST"],
        summary: "Stop recording; writes a Chrome-trace JSON file into VLLM_TORCH_PROFILER_DIR",
        request: None,
        runner: Runner::Any,
        errors: &[400, 503],
    },
];

pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        path: "/openapi.json",
        methods: &["GET"],
        summary: "This document",
        request: None,
        runner: Runner::Any,
        errors: &[],
    },
    RouteDoc {
        path: "/health",
        methods: &["GET"],
        summary: "200 while the engine is running, 503 once it has stopped",
        request: None,
        runner: Runner::Any,
        errors: &[503],
    },
    RouteDoc {
        path: "/ping",
        methods: &["GET", "POST"],
        summary: "Liveness probe (same as /health)",
        request: None,
        runner: Runner::Any,
        errors: &[503],
    },
    RouteDoc {
        path: "/version",
        methods: &["GET"],
        summary: "Server version",
        request: None,
        runner: Runner::Any,
        errors: &[],
    },
    RouteDoc {
        path: "/metrics",
        methods: &["GET"],
        summary: "Prometheus metrics (vllm: names)",
        request: None,
        runner: Runner::Any,
        errors: &[],
    },
    RouteDoc {
        path: "/tokenize",
        methods: &["POST"],
        summary: "Tokenize a prompt or chat messages",
        request: Some("TokenizeRequest"),
        runner: Runner::Any,
        errors: BODY_ERRORS,
    },
    RouteDoc {
        path: "/detokenize",
        methods: &["POST"],
        summary: "Token ids to text",
        request: Some("DetokenizeRequest"),
        runner: Runner::Any,
        errors: BODY_ERRORS,
    },
    RouteDoc {
        path: "/v1/models",
        methods: &["GET"],
        summary: "List the served models",
        request: None,
        runner: Runner::Any,
        errors: &[],
    },
    RouteDoc {
        path: "/v1/completions",
        methods: &["POST"],
        summary: "Create a completion",
        request: Some("CompletionRequest"),
        runner: Runner::Generate,
        errors: ENGINE_ERRORS,
    },
    RouteDoc {
        path: "/v1/chat/completions",
        methods: &["POST"],
        summary: "Create a chat completion",
        request: Some("ChatCompletionRequest"),
        runner: Runner::Generate,
        errors: ENGINE_ERRORS,
    },
    RouteDoc {
        path: "/v1/embeddings",
        methods: &["POST"],
        summary: "Create embeddings (pooling models: --runner pooling)",
        request: Some("EmbeddingRequest"),
        runner: Runner::Pooling,
        errors: ENGINE_ERRORS,
    },
];

/// What the document depends on besides the route table: the served model
/// and whether clients must send a key.
#[derive(Clone, Debug)]
pub struct Served {
    /// `--served-model-name` (or the model path); the first is the default.
    pub model_names: Vec<String>,
    pub vocab_size: usize,
    pub max_model_len: usize,
    /// A `--runner pooling` model: embeddings instead of generation.
    pub pooling: bool,
    /// `--api-key` set: /v1 routes need `Authorization: Bearer <key>`.
    pub auth: bool,
}

impl Served {
    fn serves(&self, runner: Runner) -> bool {
        match runner {
            Runner::Any => true,
            Runner::Generate => !self.pooling,
            Runner::Pooling => self.pooling,
        }
    }
}

/// An optional field: `null` reads as "not set", as in vLLM.
fn opt(schema: Value) -> Value {
    json!({"anyOf": [schema, {"type": "null"}]})
}

fn int_range(min: i64, max: u64) -> Value {
    json!({"type": "integer", "minimum": min, "maximum": max})
}

/// A token id of the served vocabulary.
fn token_id(s: &Served) -> Value {
    int_range(0, s.vocab_size.saturating_sub(1) as u64)
}

/// The model field: one of the served names; empty or null means the first.
fn model_field(s: &Served) -> Value {
    let mut names: Vec<Value> = s.model_names.iter().map(|n| json!(n)).collect();
    names.push(json!(""));
    opt(json!({"type": "string", "enum": names,
        "description": "A served model name; empty or absent means the first one. Any other name is a 404."}))
}

/// The message list of chat and chat-tokenize requests: what the chat
/// template renders (text content, as a string or text parts). Content is
/// required: templates concatenate it, and a missing one is a 400.
fn messages_schema() -> Value {
    // A bare string is a text part, and a part without `type` is text, as
    // vLLM reads them.
    let part = json!({"anyOf": [
        {"type": "string"},
        {"type": "object", "required": ["text"], "properties": {
            "type": {"type": "string", "enum": ["text", "input_text", "output_text"]},
            "text": {"type": "string"}}},
        {"type": "object", "required": ["type", "refusal"], "properties": {
            "type": {"const": "refusal"}, "refusal": {"type": "string"}}}]});
    json!({"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"],
        "properties": {
        // Any role: vLLM's custom message role, which the template renders.
        "role": {"type": "string"},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}}}})
}

/// A prompt: text, texts, token ids or lists of them (never empty: vLLM's
/// "The decoder prompt cannot be empty").
fn prompt_schema(s: &Served) -> Value {
    let ids = json!({"type": "array", "minItems": 1, "items": token_id(s)});
    json!({"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        ids,
        {"type": "array", "minItems": 1, "items": ids}]})
}

/// `if` `field` is present and not null `then` `then`.
fn when_set(field: &str, then: Value) -> Value {
    json!({"if": {"required": [field], "properties": {field: {"not": {"type": "null"}}}}, "then": then})
}

fn sampling_properties(s: &Served) -> Map<String, Value> {
    let boolean = json!({"type": "boolean"});
    let i32_range = int_range(i32::MIN as i64, i32::MAX as u64);
    let logprobs = int_range(0, MAX_LOGPROBS as u64);
    let structured = "Structured outputs: at most one constraint per request, and it must compile \
                      (llguidance); otherwise 400.";
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.into(), opt(v));
    };
    put("temperature", json!({"type": "number", "minimum": 0}));
    put(
        "top_p",
        json!({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    );
    put(
        "min_p",
        json!({"type": "number", "minimum": 0, "maximum": 1}),
    );
    put(
        "repetition_penalty",
        json!({"type": "number", "exclusiveMinimum": 0}),
    );
    for k in ["presence_penalty", "frequency_penalty"] {
        put(k, json!({"type": "number", "minimum": -2, "maximum": 2}));
    }
    put("n", int_range(1, MAX_N as u64));
    put(
        "top_k",
        json!({"type": "integer", "minimum": -1, "maximum": i32::MAX,
        "description": "0 or -1 disables"}),
    );
    put("seed", int_range(i64::MIN, i64::MAX as u64));
    put(
        "min_tokens",
        json!({"type": "integer", "minimum": 0, "maximum": u64::MAX,
        "description": "At most max_tokens (400 otherwise)"}),
    );
    put("prompt_logprobs", logprobs.clone());
    put("truncate_prompt_tokens", int_range(1, u64::MAX));
    put("priority", i32_range);
    put(
        "max_tokens",
        json!({"type": "integer", "minimum": 1, "maximum": s.max_model_len,
        "description": "Prompt tokens plus max_tokens must fit the model's context (400 otherwise)"}),
    );
    for k in [
        "stream",
        "ignore_eos",
        "include_stop_str_in_output",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "echo",
        "add_special_tokens",
    ] {
        put(k, boolean.clone());
    }
    put(
        "stop_token_ids",
        json!({"type": "array", "items": int_range(0, u32::MAX as u64)}),
    );
    put(
        "allowed_token_ids",
        json!({"type": "array", "minItems": 1, "items": token_id(s)}),
    );
    put(
        "request_id",
        json!({"type": "string",
        "description": "Must not name a request that is still running (400)"}),
    );
    put("user", json!({"type": "string"}));
    // Structured outputs (openai/structured_outputs.rs).
    for k in [
        "guided_regex",
        "guided_grammar",
        "guided_whitespace_pattern",
    ] {
        put(k, json!({"type": "string", "description": structured}));
    }
    put(
        "guided_decoding_backend",
        json!({"type": "string", "enum": ["auto", "guidance", "llguidance"]}),
    );
    put(
        "guided_choice",
        json!({"type": "array", "items": {"type": "string"}, "description": structured}),
    );
    put(
        "guided_json",
        json!({"anyOf": [{"type": "object"}, {"type": "string"}], "description": structured}),
    );
    put(
        "structured_outputs",
        json!({"type": "object", "description": structured}),
    );
    put(
        "response_format",
        json!({"type": "object", "required": ["type"], "properties": {
            "type": {"type": "string", "enum": ["text", "json_object", "json_schema", "structural_tag"]}},
            "description": structured}),
    );
    put(
        "stop",
        json!({"anyOf": [{"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}}]}),
    );
    put(
        "logit_bias",
        json!({"type": "object", "additionalProperties": {"type": "number"},
        "description": "Token ids (as strings, below the vocabulary size) to biases, clamped to [-100, 100]"}),
    );
    put(
        "stream_options",
        json!({"type": "object", "properties": {
        "include_usage": opt(json!({"type": "boolean"})),
        "continuous_usage_stats": opt(json!({"type": "boolean"}))},
        "description": "Only with stream: true"}),
    );
    m.insert("model".into(), model_field(s));
    m
}

/// vLLM's rule: stream_options only with `stream: true`.
fn stream_options_need_stream() -> Value {
    when_set(
        "stream_options",
        json!({"required": ["stream"], "properties": {"stream": {"const": true}}}),
    )
}

fn schemas(s: &Served) -> Value {
    let mut completion = sampling_properties(s);
    completion.insert("prompt".into(), prompt_schema(s));
    completion.insert("logprobs".into(), opt(int_range(0, MAX_LOGPROBS as u64)));
    completion.insert(
        "best_of".into(),
        opt(json!({"type": "integer", "minimum": 1, "maximum": MAX_N,
        "description": "Only equal to n (other values are not supported: 400)"})),
    );
    completion.insert(
        "suffix".into(),
        opt(json!({"type": "string", "maxLength": 0, "description": "not supported: empty only"})),
    );
    let mut chat = sampling_properties(s);
    chat.insert("messages".into(), messages_schema());
    chat.insert("logprobs".into(), opt(json!({"type": "boolean"})));
    chat.insert(
        "top_logprobs".into(),
        opt(
            json!({"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
        "description": "Above 0 only with logprobs: true"}),
        ),
    );
    chat.insert(
        "max_completion_tokens".into(),
        opt(json!({"type": "integer", "minimum": 1, "maximum": s.max_model_len})),
    );
    for k in ["add_generation_prompt", "continue_final_message"] {
        chat.insert(k.into(), opt(json!({"type": "boolean"})));
    }
    chat.insert(
        "chat_template".into(),
        opt(json!({"type": "string", "description": "A Jinja template (400 if it does not render)"})),
    );
    chat.insert(
        "chat_template_kwargs".into(),
        opt(json!({"type": "object"})),
    );
    // continue_final_message needs add_generation_prompt: false (it defaults to true).
    let continue_rule = json!({"if": {"required": ["continue_final_message"],
        "properties": {"continue_final_message": {"const": true}}},
        "then": {"required": ["add_generation_prompt"],
            "properties": {"add_generation_prompt": {"const": false}}}});
    let top_logprobs_rule = json!({"if": {"required": ["top_logprobs"],
        "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": true}}}});
    let flag = || opt(json!({"type": "boolean"}));
    json!({
        "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": completion,
            "allOf": [stream_options_need_stream()]},
        "ChatCompletionRequest": {"type": "object", "required": ["messages"], "properties": chat,
            "allOf": [stream_options_need_stream(), continue_rule, top_logprobs_rule]},
        "TokenizeRequest": {"anyOf": [
            {"type": "object", "required": ["prompt"],
                // With messages the request is a chat one (null messages: not).
                "not": {"required": ["messages"], "properties": {"messages": {"not": {"type": "null"}}}},
                "properties": {
                "model": model_field(s), "prompt": {"type": "string"},
                "add_special_tokens": flag(), "return_token_strs": flag()}},
            {"type": "object", "required": ["messages"], "properties": {
                "model": model_field(s), "messages": messages_schema(),
                "add_generation_prompt": flag(), "continue_final_message": flag(),
                "add_special_tokens": flag(), "return_token_strs": flag(),
                "chat_template": opt(json!({"type": "string"})),
                "chat_template_kwargs": opt(json!({"type": "object"}))},
                "allOf": [continue_rule]}]},
        "EmbeddingRequest": {"type": "object", "required": ["input"], "properties": {
            "model": model_field(s),
            "input": prompt_schema(s),
            "encoding_format": opt(json!({"type": "string", "enum": ["float", "base64"]})),
            "dimensions": opt(json!({"type": "integer", "minimum": 1,
                "description": "Only for matryoshka models, at most the embedding size"})),
            "user": opt(json!({"type": "string"})),
            "truncate_prompt_tokens": opt(json!({"anyOf": [{"const": -1},
                {"type": "integer", "minimum": 1, "maximum": s.max_model_len}]})),
            "add_special_tokens": flag(),
            "normalize": flag(),
            "priority": opt(int_range(i32::MIN as i64, i32::MAX as u64)),
            "request_id": opt(json!({"type": "string"}))}},
        "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
            "model": model_field(s), "tokens": {"type": "array", "items": token_id(s)}}},
        "ErrorResponse": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "code"], "properties": {
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

pub fn document(root_path: &str, on: Optional, served: &Served) -> Value {
    let error_body = json!({"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}});
    let mut paths = Map::new();
    for r in served_routes(on).filter(|r| served.serves(r.runner)) {
        let guarded = served.auth && (r.path == "/v1" || r.path.starts_with("/v1/"));
        let mut ops = Map::new();
        for m in r.methods {
            let mut responses = Map::new();
            responses.insert("200".into(), json!({"description": "Successful Response"}));
            let mut codes = r.errors.to_vec();
            if guarded {
                codes.push(401);
            }
            for code in codes {
                let response = match code {
                    // axum's body limit answers in plain text.
                    413 => json!({"description": "Request body larger than 32 MiB"}),
                    _ => json!({"description": status_text(code), "content": error_body}),
                };
                responses.insert(code.to_string(), response);
            }
            let mut op = json!({"summary": r.summary, "responses": responses});
            if let Some(schema) = r.request {
                op["requestBody"] = json!({"required": true, "content": {"application/json": {
                    "schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
            }
            if guarded {
                op["security"] = json!([{"bearer": []}]);
            }
            ops.insert(m.to_ascii_lowercase(), op);
        }
        paths.insert(r.path.to_string(), Value::Object(ops));
    }
    let server = if root_path.is_empty() { "/" } else { root_path };
    let mut components = json!({"schemas": schemas(served)});
    if served.auth {
        components["securitySchemes"] = json!({"bearer": {"type": "http", "scheme": "bearer"}});
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Flotilla OpenAI-compatible API", "version": env!("CARGO_PKG_VERSION")},
        "servers": [{"url": server}],
        "paths": paths,
        "components": components,
    })
}

fn status_text(code: u16) -> &'static str {
    match code {
        400 => "Bad request (vLLM's validation messages)",
        401 => "Missing or wrong API key (Authorization: Bearer <--api-key>)",
        404 => "The model named in the request is not served",
        503 => {
            "The engine is overloaded (--max-concurrent-requests, with Retry-After) or has stopped"
        }
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(pooling: bool, auth: bool) -> Served {
        Served {
            model_names: vec!["m".into(), "alias".into()],
            vocab_size: 100,
            max_model_len: 64,
            pooling,
            auth,
        }
    }

    #[test]
    fn every_route_is_documented_with_its_schema() {
        let all = Optional {
            dev_mode: true,
            profiler: true,
        };
        let doc = document("/api", all, &served(false, false));
        assert_eq!(doc["servers"][0]["url"], "/api");
        let plain = document("/api", Optional::default(), &served(false, false));
        assert!(!plain["paths"]["/reset_prefix_cache"].is_object());
        assert!(!plain["paths"]["/start_profile"].is_object());
        for r in ROUTES.iter().chain(DEV_ROUTES).chain(PROFILER_ROUTES) {
            if r.runner == Runner::Pooling {
                continue;
            }
            for m in r.methods {
                let op = &doc["paths"][r.path][m.to_ascii_lowercase()];
                assert!(op.is_object(), "{} {}", m, r.path);
                for code in r.errors {
                    assert!(
                        op["responses"][code.to_string()].is_object(),
                        "{code} {}",
                        r.path
                    );
                }
                if let Some(s) = r.request {
                    assert!(doc["components"]["schemas"][s].is_object(), "{s}");
                }
            }
        }
    }

    #[test]
    fn routes_follow_the_runner() {
        let generate = document("", Optional::default(), &served(false, false));
        assert!(generate["paths"]["/v1/completions"].is_object());
        assert!(generate["paths"]["/v1/chat/completions"].is_object());
        assert!(!generate["paths"]["/v1/embeddings"].is_object());
        let pooling = document("", Optional::default(), &served(true, false));
        assert!(pooling["paths"]["/v1/embeddings"].is_object());
        assert!(!pooling["paths"]["/v1/completions"].is_object());
        assert!(pooling["paths"]["/tokenize"].is_object());
    }

    #[test]
    fn bearer_auth_only_with_a_key() {
        let open = document("", Optional::default(), &served(false, false));
        assert!(open["components"]["securitySchemes"].is_null());
        let op = &open["paths"]["/v1/completions"]["post"];
        assert!(op["security"].is_null());
        assert!(op["responses"]["401"].is_null());
        let keyed = document("", Optional::default(), &served(false, true));
        assert_eq!(
            keyed["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let op = &keyed["paths"]["/v1/models"]["get"];
        assert_eq!(op["security"], json!([{"bearer": []}]));
        assert!(op["responses"]["401"].is_object());
        // Only /v1 is guarded (middleware::needs_auth).
        let op = &keyed["paths"]["/tokenize"]["post"];
        assert!(op["security"].is_null() && op["responses"]["401"].is_null());
    }

    #[test]
    fn schemas_state_the_served_model() {
        let doc = document("", Optional::default(), &served(false, false));
        let schemas = &doc["components"]["schemas"];
        let model = &schemas["CompletionRequest"]["properties"]["model"]["anyOf"];
        assert_eq!(model[0]["enum"], json!(["m", "alias", ""]));
        assert_eq!(model[1], json!({"type": "null"}));
        let tokens = &schemas["DetokenizeRequest"]["properties"]["tokens"]["items"];
        assert_eq!(tokens["maximum"], 99);
        assert_eq!(tokens["minimum"], 0);
        let max_tokens = &schemas["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"][0];
        assert_eq!(max_tokens["minimum"], 1);
        assert_eq!(max_tokens["maximum"], 64);
        let n = &schemas["CompletionRequest"]["properties"]["n"]["anyOf"][0];
        assert_eq!(n["maximum"], MAX_N);
        // Every optional property accepts null; required ones do not.
        for name in ["CompletionRequest", "ChatCompletionRequest"] {
            let s = &schemas[name];
            let required: Vec<&str> = s["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            for (k, v) in s["properties"].as_object().unwrap() {
                let nullable = v["anyOf"]
                    .as_array()
                    .is_some_and(|a| a.contains(&json!({"type": "null"})));
                assert_eq!(nullable, !required.contains(&k.as_str()), "{name}.{k}");
            }
        }
    }
}
