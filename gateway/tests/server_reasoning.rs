//! `--reasoning-parser` over real sockets on SmolLM2 (in-process server, real
//! GGUF). SmolLM2 never writes `</think>`, so under deepseek_r1 its whole
//! greedy answer is reasoning with null content, and under qwen3 the same
//! answer stays content; streamed deltas reassemble to the same fields.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use clap::Parser;
use gateway::cli::{serve::prepare, Cli, Command};
use gateway::openai::{bind, serve_listener};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const QUESTION: &str = "What is the capital of France?";

struct Server {
    base: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), gateway::openai::ServerError>>,
}

async fn start(model: &str, parser: &str) -> Server {
    let cli = Cli::try_parse_from([
        "gateway",
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--max-model-len",
        "512",
        "--num-gpu-blocks-override",
        "64",
        "--reasoning-parser",
        parser,
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    let (state, cfg) = tokio::task::block_in_place(|| prepare(&args)).expect("engine loads");
    let listener = bind(&cfg).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve_listener(listener, state, cfg, shutdown.clone()));
    Server {
        base,
        shutdown,
        task,
    }
}

impl Server {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    async fn chat(&self, extra: Value) -> Value {
        let mut body = json!({
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 12,
            "temperature": 0,
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.json().await.unwrap()
    }

    /// Each choice's concatenated (reasoning, reasoning_content, content)
    /// deltas, after checking every chunk's shape.
    async fn chat_stream(&self, n: usize) -> Vec<[String; 3]> {
        let text = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", self.base))
            .json(&json!({
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 12,
                "temperature": 0,
                "n": n,
                "stream": true,
            }))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        let mut got = vec![<[String; 3]>::default(); n];
        for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if line == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(line).unwrap();
            for choice in chunk["choices"].as_array().unwrap() {
                let idx = choice["index"].as_u64().unwrap() as usize;
                let delta = &choice["delta"];
                assert_eq!(delta["reasoning"], delta["reasoning_content"], "{line}");
                for (field, key) in
                    got[idx]
                        .iter_mut()
                        .zip(["reasoning", "reasoning_content", "content"])
                {
                    if let Some(s) = delta[key].as_str() {
                        field.push_str(s);
                    } else {
                        assert!(delta.get(key).is_none(), "{key} is not a string: {line}");
                    }
                }
            }
        }
        got
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_parsers_over_http() {
    let Some(model) = fixtures::smollm2_gguf() else {
        return;
    };
    let model = model.to_str().unwrap();

    let ds = start(model, "deepseek_r1").await;
    let body = ds.chat(json!({})).await;
    let message = &body["choices"][0]["message"];
    let reasoning = message["reasoning"]
        .as_str()
        .expect("reasoning")
        .to_string();
    assert!(!reasoning.trim().is_empty(), "{body}");
    assert_eq!(message["reasoning_content"], message["reasoning"]);
    assert!(message["content"].is_null(), "{body}");
    assert_eq!(message["role"], "assistant");

    for (idx, [r, rc, c]) in ds.chat_stream(2).await.into_iter().enumerate() {
        assert_eq!(r, reasoning, "choice {idx}");
        assert_eq!(rc, reasoning, "choice {idx}");
        assert_eq!(c, "", "choice {idx}");
    }

    // Completions are not parsed (vLLM applies reasoning parsers to chat only).
    let body: Value = reqwest::Client::new()
        .post(format!("{}/v1/completions", ds.base))
        .json(&json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let choice = &body["choices"][0];
    assert!(
        choice["text"].as_str().unwrap().starts_with(" Paris"),
        "{body}"
    );
    assert!(choice.get("reasoning").is_none(), "{body}");
    ds.stop().await;

    let qw = start(model, "qwen3").await;
    let body = qw.chat(json!({})).await;
    let message = &body["choices"][0]["message"];
    assert_eq!(
        message["content"].as_str(),
        Some(reasoning.as_str()),
        "{body}"
    );
    assert!(message.get("reasoning").is_none(), "{body}");
    assert!(message.get("reasoning_content").is_none(), "{body}");
    let streamed = qw.chat_stream(1).await;
    assert_eq!(
        streamed,
        vec![[String::new(), String::new(), reasoning.clone()]]
    );
    qw.stop().await;
}

#[test]
fn unknown_parser_is_a_cli_error_naming_the_valid_ones() {
    let err = Cli::try_parse_from(["gateway", "serve", "m", "--reasoning-parser", "deepseek-r1"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("deepseek_r1") && err.contains("qwen3"),
        "{err}"
    );
}
