//! etcd TLS (client certificates) and user/password auth pass through to
//! every process that talks to etcd: real etcd, real certificates.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{wait_until, Cluster, BIN};

/// Runs the binary and insists it exits within `secs` (a head that wrongly
/// starts would otherwise block the test forever).
fn run_bounded(c: &Cluster, args: &[String], secs: u64) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("FLOTILLA_CACHE_ROOT", c.cache())
        .env_remove("FLOTILLA_CLUSTER_TOKEN")
        .env_remove("FLOTILLA_ETCD_USER")
        .env_remove("FLOTILLA_ETCD_PASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} still running after {secs}s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn head_args(c: &Cluster, port: u16, etcd: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "start",
        "--head",
        "--block",
        "--port",
        &port.to_string(),
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "1",
        "--etcd-endpoints",
        &c.endpoint(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(etcd.iter().map(|s| s.to_string()));
    a
}

fn refused(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("refused as expected: {}", err.trim());
    assert!(!out.status.success(), "should be refused: {err}");
    for n in needles {
        assert!(err.contains(n), "error should name '{n}': {err}");
    }
}

#[test]
fn etcd_tls_with_client_certificates() {
    let (mut c, pki) = Cluster::new_tls("etcdtls", 32700);
    c.start_head("head", c.head_port, 0);
    c.start_node("n2", "127.0.0.2", 1);
    wait_until(Duration::from_secs(20), "two nodes over TLS", || {
        c.alive_nodes() == 2
    });
    let st = c.json(&["status"]);
    assert_eq!(st["leader"], c.head_addr(), "{st}");

    let ca = pki.ca.to_str().unwrap();
    // Trusting etcd's CA is not enough: etcd checks client certificates.
    let out = run_bounded(&c, &head_args(&c, 32712, &["--etcd-cacert", ca]), 30);
    refused(
        &out,
        &["cannot reach etcd", "TLS with CA", "no client certificate"],
    );
    // No TLS options at all against a TLS endpoint.
    let out = run_bounded(&c, &head_args(&c, 32712, &[]), 30);
    refused(&out, &["https://", "--etcd-cacert"]);
    // A plain http:// endpoint with TLS options contradicts itself.
    let mut a = head_args(&c, 32712, &["--etcd-cacert", ca]);
    let i = a.iter().position(|s| s.starts_with("https://")).unwrap();
    a[i] = a[i].replace("https://", "http://");
    refused(&run_bounded(&c, &a, 30), &["plain http://", "TLS"]);
    // A certificate without its key.
    let cert = pki.client_cert.to_str().unwrap();
    let out = run_bounded(
        &c,
        &head_args(&c, 32712, &["--etcd-cacert", ca, "--etcd-cert", cert]),
        30,
    );
    refused(&out, &["--etcd-cert and --etcd-key go together"]);
    // The refused heads changed nothing.
    assert_eq!(c.alive_nodes(), 2);
}

/// Adds the root user and turns etcd auth on, through etcd's own API.
fn enable_auth(endpoint: &str, password: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut cl = etcd_client::Client::connect([endpoint], None)
            .await
            .unwrap();
        cl.role_add("root").await.unwrap();
        cl.user_add("root", password, None).await.unwrap();
        cl.user_grant_role("root", "root").await.unwrap();
        cl.auth_enable().await.unwrap();
    });
}

#[test]
fn etcd_user_and_password() {
    let mut c = Cluster::new("etcdauth", 31800);
    enable_auth(&c.endpoint(), "s3cret-pw");
    c.etcd_args = ["--etcd-user", "root", "--etcd-password", "s3cret-pw"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    c.start_head("head", c.head_port, 0);
    c.start_node("n2", "127.0.0.2", 1);
    wait_until(Duration::from_secs(20), "two nodes with etcd auth", || {
        c.alive_nodes() == 2
    });

    let out = run_bounded(
        &c,
        &head_args(
            &c,
            31812,
            &["--etcd-user", "root", "--etcd-password", "wrong"],
        ),
        30,
    );
    refused(
        &out,
        &[
            "cannot reach etcd",
            "etcd user 'root'",
            "authentication failed",
        ],
    );
    // Without credentials etcd refuses the first read.
    let out = run_bounded(&c, &head_args(&c, 31812, &[]), 30);
    refused(&out, &["cannot reach etcd", "no etcd user"]);
    assert_eq!(c.alive_nodes(), 2);
}
