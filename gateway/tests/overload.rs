//! `--max-concurrent-requests` under 10x its capacity (real SmolLM2, real
//! sockets on 127.0.0.1): every request is either accepted and completed in
//! full, or refused at once with 503 and `Retry-After`; nothing crashes and
//! the server's memory stays bounded.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use clap::Parser;
use gateway::cli::{serve::prepare, Cli, Command};
use gateway::openai::{bind, serve_listener};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Resident memory of this process (the server runs in it), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_capacity_is_refused_cleanly_and_accepted_work_completes() {
    let Some(model) = fixtures::smollm2_gguf() else {
        return;
    };
    const LIMIT: usize = 4;
    const TOKENS: u64 = 8;
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
        "--max-model-len",
        "256",
        "--num-gpu-blocks-override",
        "64",
        "--max-num-seqs",
        "2",
        "--max-concurrent-requests",
        &LIMIT.to_string(),
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    let (state, cfg) = tokio::task::block_in_place(|| prepare(&args)).expect("engine loads");
    let listener = bind(&cfg).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve_listener(listener, state, cfg, shutdown.clone()));
    let c = reqwest::Client::new();

    let body = json!({"model": "smol", "prompt": "Count to ten:", "max_tokens": TOKENS,
        "temperature": 0, "ignore_eos": true});
    let flood = |n: usize| {
        let calls = (0..n).map(|_| {
            let req = c.post(format!("{base}/v1/completions")).json(&body).send();
            async move {
                let r = req.await.expect("the server answers");
                let status = r.status().as_u16();
                let retry = r.headers().get("retry-after").cloned();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                (status, retry, v)
            }
        });
        futures::future::join_all(calls)
    };
    // Warm up (first allocations), then measure memory over repeated floods.
    flood(LIMIT).await;
    let before = rss_kib();
    let mut accepted = 0;
    let mut refused = 0;
    for _ in 0..3 {
        for (status, retry, v) in flood(10 * LIMIT).await {
            match status {
                200 => {
                    accepted += 1;
                    assert_eq!(v["usage"]["completion_tokens"], TOKENS, "{v}");
                }
                503 => {
                    refused += 1;
                    assert_eq!(retry.as_ref().map(|h| h.to_str().unwrap()), Some("1"));
                    assert_eq!(v["error"]["type"], "ServiceUnavailableError", "{v}");
                    let msg = v["error"]["message"].as_str().unwrap_or_default();
                    assert!(msg.contains("--max-concurrent-requests"), "{msg}");
                }
                other => panic!("unexpected status {other}: {v}"),
            }
        }
    }
    let grown = rss_kib().saturating_sub(before);
    eprintln!(
        "3 floods of {}: {accepted} accepted and completed, {refused} refused with 503; RSS grew {grown} KiB",
        10 * LIMIT
    );
    assert!(accepted >= 3 * LIMIT, "too few accepted: {accepted}");
    assert!(refused > 0, "a flood of 10x the bound must see refusals");
    assert!(
        grown < 64 * 1024,
        "memory grew by {grown} KiB over the floods"
    );

    // The bound frees up as requests finish: the server serves again.
    let (status, _, v) = flood(1).await.remove(0);
    assert_eq!(status, 200, "{v}");
    shutdown.cancel();
    server.await.unwrap().unwrap();
}
