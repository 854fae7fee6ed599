//! `gateway serve --tensor-parallel-size 3` as a real process with its real
//! `worker` processes: a completion over HTTP, then a worker killed with
//! SIGKILL mid-generation. The in-flight requests must end with an error
//! (HTTP 500 JSON, an error event on a stream), `/health` must answer 503,
//! the gateway must stay up, replace its workers by itself and serve again;
//! the old group's other workers must be gone, and the new ones must die
//! with the gateway when it is killed in turn. A worker lost while the engine
//! is idle makes `/health` answer 503 too, until the workers are replaced.

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
/// The gateway, its base URL, its workers' pids by rank, and its further
/// stdout lines.
fn start_gateway(
    model: &std::path::Path,
    tp: usize,
) -> (Gateway, String, HashMap<usize, u32>, mpsc::Receiver<String>) {
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
        if let Some((rank, pid)) = worker_line(&line) {
            workers.insert(rank, pid);
        }
    }
    (gw, base.unwrap(), workers, rx)
}

/// (rank, pid) from a worker's log line.
fn worker_line(line: &str) -> Option<(usize, u32)> {
    let rest = line.strip_prefix("(Worker rank=")?;
    let rank = rest.split(' ').next()?.parse().ok()?;
    let pid = rest.split("pid=").nth(1)?.split(')').next()?.parse().ok()?;
    Some((rank, pid))
}

/// Waits for /health 200 again (the workers replaced) and returns the pids
/// of the new workers seen on the gateway's output meanwhile.
async fn wait_recovered(
    c: &reqwest::Client,
    base: &str,
    lines: &mpsc::Receiver<String>,
    old: &HashMap<usize, u32>,
) -> HashMap<usize, u32> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut new = HashMap::new();
    loop {
        for line in lines.try_iter() {
            if let Some((rank, pid)) = worker_line(&line) {
                if old.get(&rank) != Some(&pid) {
                    new.insert(rank, pid);
                }
            }
        }
        let status = c
            .get(format!("{base}/health"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 && new.len() == old.len() {
            return new;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not replace its workers within 90 s (health {status}, new workers {new:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A short greedy completion; the model knows the answer.
async fn paris(c: &reqwest::Client, base: &str) {
    let r = c
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_lost_between_requests_makes_the_gateway_unhealthy() {
    let Some(model) = fixtures::smollm2_gguf() else {
        return;
    };
    let (mut gw, base, workers, lines) = start_gateway(&model, 3);
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
    assert!(gw.0.try_wait().unwrap().is_none(), "the gateway exited");
    // The engine dropped the old group (its other ranks are gone) and
    // serves again on a new one.
    let new = wait_recovered(&c, &base, &lines, &workers).await;
    for r in [1, 2] {
        assert!(!process_alive(workers[&r]), "rank {r} outlived its group");
    }
    paris(&c, &base).await;
    sigkill(gw.0.id());
    let _ = gw.0.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while new.values().any(|&p| process_alive(p)) {
        assert!(
            Instant::now() < deadline,
            "new workers outlived the gateway"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tp3_serves_and_fails_cleanly_when_a_worker_dies() {
    let Some(model) = fixtures::smollm2_gguf() else {
        return;
    };
    let (mut gw, base, workers, lines) = start_gateway(&model, 3);
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

    // Unhealthy, but up and answering, then serving again on new workers.
    assert_eq!(health(&c).await.unwrap(), 503);
    let r = c.get(format!("{base}/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(gw.0.try_wait().unwrap().is_none(), "the gateway exited");
    let new = wait_recovered(&c, &base, &lines, &workers).await;
    eprintln!(
        "serving again {:.1}s after the worker was killed",
        killed_at.elapsed().as_secs_f64()
    );
    for r in [0, 2] {
        assert!(!process_alive(workers[&r]), "rank {r} outlived its group");
    }
    paris(&c, &base).await;

    // kill -9 of the gateway takes its workers with it.
    sigkill(gateway_pid);
    let _ = gw.0.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while new.values().any(|&p| process_alive(p)) {
        assert!(
            Instant::now() < deadline,
            "workers outlived the gateway: {new:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
