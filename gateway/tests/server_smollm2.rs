//! The OpenAI server in-process on SmolLM2 (real GGUF, real sockets on
//! 127.0.0.1): greedy " Paris", auth, root path, request ids, CORS, errors,
//! and a clean shutdown.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use std::time::Duration;

use clap::Parser;
use gateway::cli::{serve::prepare, Cli, Command};
use gateway::openai::{bind, serve_listener};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

async fn post(c: &reqwest::Client, url: &str, key: Option<&str>, body: Value) -> (u16, Value) {
    let mut rb = c.post(url).json(&body);
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    let resp = rb.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_served_over_http() {
    let Some(model) = fixtures::smollm2_gguf() else {
        return;
    };
    let cli = Cli::try_parse_from([
        "gateway",
        "serve",
        model.to_str().unwrap(),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--served-model-name",
        "smol",
        "alias",
        "--max-model-len",
        "512",
        "--num-gpu-blocks-override",
        "64",
        "--api-key",
        "sekret",
        "--root-path",
        "/api",
        "--enable-request-id-headers",
        "--allowed-origins",
        r#"["http://example.com"]"#,
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    // The only test in this binary: nothing else reads the environment.
    std::env::set_var("VLLM_SERVER_DEV_MODE", "1");
    let traces = std::env::temp_dir().join(format!("flotilla-traces-{}", std::process::id()));
    std::env::set_var("VLLM_TORCH_PROFILER_DIR", &traces);
    let (state, cfg) = tokio::task::block_in_place(|| prepare(&args)).expect("engine loads");
    let listener = bind(&cfg).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve_listener(listener, state, cfg, shutdown.clone()));
    let c = reqwest::Client::new();
    let key = Some("sekret");

    let (status, body) = post(
        &c,
        &format!("{base}/v1/completions"),
        key,
        json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
    assert_eq!(body["model"], "smol");

    // The second served name works too and is echoed back.
    let (status, body) = post(
        &c,
        &format!("{base}/api/v1/completions"),
        key,
        json!({"model": "alias", "prompt": [504, 3575], "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "alias");

    let (status, body) = post(
        &c,
        &format!("{base}/v1/completions"),
        Some("wrong"),
        json!({"prompt": "x"}),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], 401);
    let (status, _) = post(
        &c,
        &format!("{base}/api/v1/completions"),
        None,
        json!({"prompt": "x"}),
    )
    .await;
    assert_eq!(status, 401);

    let (status, body) = post(
        &c,
        &format!("{base}/v1/chat/completions"),
        key,
        json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        body["error"]["message"],
        "The model `gpt-4` does not exist."
    );

    let (status, body) = post(
        &c,
        &format!("{base}/v1/completions"),
        key,
        json!({"prompt": "hi", "max_tokens": 600}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 512"),
        "{body}"
    );

    let resp = c
        .get(format!("{base}/health"))
        .header("X-Request-Id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    let resp = c.get(format!("{base}/no/such/route")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "NotFoundError");
    let resp = c.get(format!("{base}/version")).send().await.unwrap();
    assert!(resp.headers().contains_key("x-request-id"));

    let preflight = c
        .request(reqwest::Method::OPTIONS, format!("{base}/v1/completions"))
        .header("Origin", "http://example.com")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "http://example.com"
    );

    // Development mode (set before the server started): the cache reset
    // endpoint is served and documented.
    let r = c
        .post(format!("{base}/api/reset_prefix_cache"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let doc: Value = c
        .get(format!("{base}/api/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/reset_prefix_cache"]["post"].is_object());

    // The profiler (VLLM_TORCH_PROFILER_DIR, set before the server
    // started): a trace of the steps between start and stop.
    let profile = |what: &'static str| {
        c.post(format!("{base}/api/{what}"))
            .bearer_auth("sekret")
            .send()
    };
    assert_eq!(
        profile("start_profile").await.unwrap().status().as_u16(),
        200
    );
    assert_eq!(
        profile("start_profile").await.unwrap().status().as_u16(),
        400,
        "already recording"
    );
    let (status, _) = post(
        &c,
        &format!("{base}/api/v1/completions"),
        Some("sekret"),
        json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        profile("stop_profile").await.unwrap().status().as_u16(),
        200
    );
    let files: Vec<_> = std::fs::read_dir(&traces).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one trace file");
    let trace: Value = serde_json::from_slice(&std::fs::read(files[0].path()).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let steps: Vec<&Value> = events
        .iter()
        .filter(|e| e["name"] == "execute_model")
        .collect();
    assert!(steps.len() >= 3, "prefill + decodes: {events:?}");
    assert!(steps
        .iter()
        .all(|e| e["ph"] == "X" && e["args"]["num_tokens"].as_u64() > Some(0)));
    for phase in ["schedule", "process_outputs"] {
        assert!(events.iter().any(|e| e["name"] == phase), "{phase}");
    }
    std::fs::remove_dir_all(&traces).unwrap();

    // A stream left open is ended by the shutdown, and the server returns.
    let streaming = c
        .post(format!("{base}/v1/completions"))
        .bearer_auth("sekret")
        .json(&json!({"prompt": "Count:", "max_tokens": 400, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(streaming.status().as_u16(), 200);
    shutdown.cancel();
    let body = tokio::time::timeout(Duration::from_secs(30), streaming.text())
        .await
        .expect("stream ends");
    // The client learns in-band that the request did not complete.
    let body = body.unwrap_or_default();
    assert!(
        body.contains("shut down") && body.ends_with("data: [DONE]\n\n"),
        "{body}"
    );
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
}
