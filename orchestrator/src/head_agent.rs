//! The head's own node agent, as a process the head finds, starts, watches
//! and stops (the agent's code is `agent.rs`). It runs as a process of its
//! own (the same binary, `start --address` to its head) rather than inside
//! the head, so a crashed head leaves the node and its actors running, and a
//! restarted head adopts the agent it finds instead of starting a second one.

use std::time::{Duration, Instant};

use crate::cli::{EtcdArgs, StartArgs};
use crate::detach;
use crate::error::{Error, Result};
use crate::liveness::alive;
use crate::paths::{read_trimmed, CacheRoot};

/// Ends the pid-file role of a head's node agent.
const MARK: &str = "head-node ready";

/// The pid-file role the head's node agent writes once registered.
pub fn role(node_id: &str, head: &str) -> String {
    format!("node {node_id} head {head} {MARK}")
}

/// The node id, when `role` is that of the node agent of head `head`.
pub fn parse_role(role: &str, head: &str) -> Option<String> {
    let rest = role.strip_prefix("node ")?;
    let (id, rest) = rest.split_once(' ')?;
    let (h, mark) = rest.strip_prefix("head ")?.split_once(' ')?;
    (h == head && mark == MARK && !id.is_empty()).then(|| id.to_string())
}

/// The arguments that start the head's node agent; the token and the etcd
/// user/password travel in the environment, out of `ps`.
pub fn agent_args(a: &StartArgs, ip: &str, head: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        "start",
        "--address",
        head,
        "--block",
        "--head-node",
        "--node-ip-address",
        ip,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut opt = |flag: &str, val: Option<String>| {
        if let Some(val) = val {
            v.push(flag.to_string());
            v.push(val);
        }
    };
    opt("--num-gpus", a.num_gpus.map(|n| n.to_string()));
    opt("--num-cpus", a.num_cpus.map(|n| n.to_string()));
    opt("--resources", a.resources.clone());
    opt("--etcd-cacert", a.etcd.etcd_cacert.clone());
    opt("--etcd-cert", a.etcd.etcd_cert.clone());
    opt("--etcd-key", a.etcd.etcd_key.clone());
    v
}

/// A running node agent of this head's node.
#[derive(Debug)]
pub struct HeadAgent {
    pub pid: i32,
    pub node_id: String,
}

/// The node agent a previous run of head `head` left running, if any.
pub fn find(root: &CacheRoot, head: &str) -> Option<HeadAgent> {
    let rd = std::fs::read_dir(root.pids_dir()).ok()?;
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Some(node_id) = read_trimmed(&e.path()).and_then(|r| parse_role(&r, head)) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if alive(pid) && String::from_utf8_lossy(&cmdline).contains("orchestrator") {
            return Some(HeadAgent { pid, node_id });
        }
    }
    None
}

/// Starts the agent in a session of its own (no parent-death signal, not
/// in the head's process group) and waits until it has registered.
pub fn spawn(
    root: &CacheRoot,
    head: &str,
    args: &[String],
    token: &str,
    etcd: &EtcdArgs,
) -> Result<HeadAgent> {
    let (mut cmd, log_path) = detach::self_command(root, "head-node-agent", args)?;
    cmd.env("FLOTILLA_CLUSTER_TOKEN", token);
    if let Some(u) = &etcd.etcd_user {
        cmd.env("FLOTILLA_ETCD_USER", u);
    }
    if let Some(p) = &etcd.etcd_password {
        cmd.env("FLOTILLA_ETCD_PASSWORD", p);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io("orchestrator (head node agent)", e))?;
    let pid = child.id() as i32;
    let pid_file = root.pids_dir().join(pid.to_string());
    let deadline = Instant::now() + Duration::from_secs(30);
    let tail = || std::fs::read_to_string(&log_path).unwrap_or_default();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(Error::ExitedEarly {
                what: "the head's node agent",
                status: st,
                log: tail(),
            });
        }
        if let Some(node_id) = read_trimmed(&pid_file).and_then(|r| parse_role(&r, head)) {
            // Reap it whenever it exits; the head may outlive it.
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(HeadAgent { pid, node_id });
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Timeout {
                what: format!(
                    "the head's node agent to register (log {}):\n{}",
                    log_path.display(),
                    tail()
                ),
                seconds: 30.0,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl HeadAgent {
    pub fn is_alive(&self) -> bool {
        alive(self.pid)
    }

    /// SIGTERM (the agent stops its actors), SIGKILL if it lingers.
    pub fn stop(self) {
        // SAFETY: plain signals to a pid this head started or adopted.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while alive(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(self.pid) {
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_name_their_head() {
        let r = role("node_ab12", "127.0.0.1:6379");
        assert_eq!(r, "node node_ab12 head 127.0.0.1:6379 head-node ready");
        assert_eq!(
            parse_role(&r, "127.0.0.1:6379").as_deref(),
            Some("node_ab12")
        );
        for (role, head) in [
            (r.as_str(), "127.0.0.1:6380"),
            ("node node_ab12 head 127.0.0.1:6379 ready", "127.0.0.1:6379"),
            ("head 127.0.0.1:6379 node node_ab12 ready", "127.0.0.1:6379"),
            (
                "node  head 127.0.0.1:6379 head-node ready",
                "127.0.0.1:6379",
            ),
            ("", "127.0.0.1:6379"),
        ] {
            assert_eq!(parse_role(role, head), None, "{role}");
        }
    }

    #[test]
    fn agent_args_pass_resources_and_tls_but_no_secrets() {
        use clap::Parser;
        let cli = crate::cli::Cli::parse_from([
            "orchestrator",
            "start",
            "--head",
            "--num-gpus",
            "2",
            "--resources",
            r#"{"x":1}"#,
            "--etcd-cacert",
            "ca.pem",
            "--etcd-user",
            "root",
            "--etcd-password",
            "pw",
        ]);
        let crate::cli::Cmd::Start(a) = cli.cmd else {
            panic!("start")
        };
        let v = agent_args(&a, "10.0.0.1", "10.0.0.1:6379");
        assert_eq!(
            v,
            [
                "start",
                "--address",
                "10.0.0.1:6379",
                "--block",
                "--head-node",
                "--node-ip-address",
                "10.0.0.1",
                "--num-gpus",
                "2",
                "--resources",
                r#"{"x":1}"#,
                "--etcd-cacert",
                "ca.pem"
            ]
        );
        // What the agent's own parser makes of them.
        let back =
            crate::cli::Cli::parse_from(std::iter::once("orchestrator".to_string()).chain(v));
        let crate::cli::Cmd::Start(b) = back.cmd else {
            panic!("start")
        };
        assert!(b.head_node && !b.head);
        assert_eq!(b.num_gpus, Some(2.0));
    }
}
