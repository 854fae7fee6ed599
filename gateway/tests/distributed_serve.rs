//! `gateway serve --tensor-parallel-size 3` as a real process with its real
//! `worker` processes: a completion over HTTP, then a worker killed with
//! SIGKILL mid-generation. The in-flight requests must end with an error
//! (HTTP 500 JSON, an error event on a stream), `/health` must answer 503,
//! the gateway must stay up and answer, and its other workers must die with
//! it when it is killed in turn. A worker lost while the engine is idle
//! makes `/health` answer 503 too.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

/// Kills the gateway if the test fails half-way.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Alive and not a zombie.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn sigkill(pid: u32) {
    // SAFETY: kill(2) on a pid this test started (directly or through the gateway).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

/// `gateway serve --tensor-parallel-size tp` on `model`; returns it, its
/// base URL and each worker rank's pid (from the log prefixes).
fn start_gateway(model: &std::path::Path, tp: usize) -> (Gateway, String, HashMap<usize, u32>) {
    fixtures::build_worker_binary();
    let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["serve", model.to_str().unwrap()])
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--served-model-name",
            "smol",
        ])
        .args([
            "--tensor-parallel-size",
            &tp.to_string(),
            "--max-model-len",
            "1024",
        ])
        .args(["--num-gpu-blocks-override", "128"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start gateway");
    let mut gw = Gateway(child);
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = gw.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        // Echoed so a failure shows the gateway's side.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("gateway| {line}");
            let _ = tx.send(line);
        }
    });
    let mut base = None;
    let mut workers: HashMap<usize, u32> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while base.is_none() || workers.len() < tp {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("gateway starts within 120 s");
        if let Some(url) = line.split("Starting API server on ").nth(1) {
            base = Some(url.trim().to_string());
        }
        if let Some(rest) = line.strip_prefix("(Worker rank=") {
            let rank: usize = rest.split(' ').next().unwrap().parse().unwrap();
            let pid: u32 = rest
                .split("pid=")
                .nth(1)
                .and_then(|p| p.split(')').next())
                .unwrap()
                .parse()
                .unwrap();
            workers.insert(rank, pid);
        }
    }
    (gw, base.unwrap(), workers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_lost_between_requests_makes_the_gateway_unhealthy() {
    let Some(model) = fixtures::smollm2_gguf() else {
        return;
    };
    let (mut gw, base, workers) = start_gateway(&model, 3);
    let c = reqwest::Client::new();
    let health = || {
        c.get(format!("{base}/health"))
            .timeout(Duration::from_secs(10))
            .send()
    };
    assert_eq!(health().await.unwrap().status(), 200);
    // Idle: no step notices the loss; the engine's idle check does.
    sigkill(workers[&0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while health().await.unwrap().status() != 503 {
        assert!(
            Instant::now() < deadline,
            "/health still 200 after a worker died"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = c
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "smol", "prompt": "Hello", "max_tokens": 2}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    assert!(gw.0.try_wait().unwrap().is_none(), "the gateway exited");
    // The engine stopped and dropped its executor: the other ranks are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while [1, 2].iter().any(|r| process_alive(workers[r])) {
        assert!(Instant::now() < deadline, "workers outlived their executor");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tp3_serves_and_fails_cleanly_when_a_worker_dies() {
    let Some(model) = fixtures::smollm2_gguf() else {
        return;
    };
    let (mut gw, base, workers) = start_gateway(&model, 3);
    let gateway_pid = gw.0.id();
    let c = reqwest::Client::new();
    let health = |c: &reqwest::Client| {
        let url = format!("{base}/health");
        let req = c.get(url).timeout(Duration::from_secs(10));
        async move { req.send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(health(&c).await.unwrap(), 200);

    let r = c
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");

    // Two long generations in flight: one plain, one streamed.
    let long = json!({"model": "smol", "prompt": "Write a long story about a dragon.",
        "max_tokens": 800, "temperature": 0, "ignore_eos": true});
    let plain = tokio::spawn(
        c.post(format!("{base}/v1/completions"))
            .json(&long)
            .timeout(Duration::from_secs(60))
            .send(),
    );
    let mut streamed_body = long.clone();
    streamed_body["stream"] = json!(true);
    let streamed = c
        .post(format!("{base}/v1/completions"))
        .json(&streamed_body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let mut events = streamed.bytes_stream();
    // Wait for tokens to flow, then kill rank 1.
    let first = events.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    sigkill(workers[&1]);
    let killed_at = Instant::now();

    let mut rest = String::new();
    while let Some(chunk) = events.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(
        rest.contains("\"error\"") && rest.contains("lost worker rank 1"),
        "no error event on the stream: {rest}"
    );
    let plain = plain.await.unwrap().unwrap();
    assert_eq!(plain.status(), 500);
    let err: Value = plain.json().await.unwrap();
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("lost worker rank 1"), "{err}");
    assert!(
        killed_at.elapsed() < Duration::from_secs(15),
        "errors took {:?}",
        killed_at.elapsed()
    );

    // Unhealthy, but up and answering.
    assert_eq!(health(&c).await.unwrap(), 503);
    let r = c
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "smol", "prompt": "Hello", "max_tokens": 2}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    let r = c.get(format!("{base}/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(gw.0.try_wait().unwrap().is_none(), "the gateway exited");

    // kill -9 of the gateway takes its remaining workers with it.
    sigkill(gateway_pid);
    let _ = gw.0.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while [0, 2].iter().any(|r| process_alive(workers[r])) {
        assert!(
            Instant::now() < deadline,
            "workers outlived the gateway: {workers:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
