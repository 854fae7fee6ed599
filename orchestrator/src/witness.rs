//! Self-fencing of a node agent cut off from etcd, decided with the heads
//! as witnesses.
//!
//! An agent that cannot renew its lease cannot tell by itself whether it is
//! isolated (the cluster goes on without it: the leader will declare the
//! node dead and start its restartable actors elsewhere) or etcd is away for
//! everyone (nobody declares anything, and its actors must keep running:
//! outage is not failure). So once its lease has gone unrenewed for
//! [`ask_after`] (half the TTL), it asks every head it knows, and
//! stops its actors unless every head is accounted for as unable to declare
//! the node dead:
//!
//! - a head that answers "etcd is unhealthy for me" (a bounded read failed,
//!   came late, or etcd came back less than the grace ago) cannot: while
//!   etcd is away no lapse reads as a death (health.rs);
//! - a head whose port refuses the connection is not running, so it cannot;
//! - a head that answers "etcd is healthy and your liveness key is still
//!   there" cannot yet, until the lease is surely gone by our own clock
//!   (TTL since the last confirmed renewal was sent);
//! - a head that answers "healthy, and your key is gone", or that cannot
//!   be reached at all (timeout, no route), may be declaring the node dead
//!   right now: fence.
//!
//! What this guarantees: two incarnations never run past the detection time
//! when a node is cut off from etcd and the heads (it fences at about two
//! half the TTL plus one witness round, before its lease can lapse),
//! and no actor is stopped while etcd is away for heads that the agent can
//! still reach (paused, restarted, unreachable for everyone).
//!
//! What it trades: an agent that can reach neither etcd nor any head (a
//! silent network, not a refusing one) stops its actors even if the whole
//! control plane happens to be down at the same time; it cannot tell the
//! two apart, and the lease it holds is the only promise it made. This is
//! Ray's choice (a raylet that loses the GCS for long exits and takes its
//! workers with it) on a shorter clock, and stricter than Kubernetes'
//! kubelet, which keeps pods running when cut off and so lets a
//! StatefulSet's replacement pod wait for an operator's force delete. A
//! firewall that REJECTs (answers with resets) looks like stopped heads and
//! so spares the actors: cut links, or DROP.

use std::time::Duration;

use proto::orchestrator::orchestrator_client::OrchestratorClient;
use proto::orchestrator::WitnessRequest;
use tonic::transport::Endpoint;

use crate::auth::Bearer;

/// How long a head's read of etcd may take before it answers "unhealthy".
pub const HEAD_READ: Duration = Duration::from_millis(1000);
/// How long the agent waits for one head's whole answer.
const ASK: Duration = Duration::from_millis(1800);
const CONNECT: Duration = Duration::from_millis(800);

/// Silence (since the last renewal etcd confirmed was sent) after which
/// the agent asks the heads: half the TTL, one renewal (lease.rs renews
/// every third of the TTL) late by half a period. Asking early costs only
/// questions: a head that still sees the lease keeps the actors until the
/// lease has surely lapsed; asking late would let the leader restart them
/// elsewhere first.
pub fn ask_after(ttl_s: u64) -> Duration {
    Duration::from_millis(ttl_s.max(1) * 1000 / 2)
}

/// One head's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// etcd answers it steadily; whether the node's liveness key exists.
    Healthy { node_live: bool },
    /// etcd is away for it too (or came back less than the grace ago).
    Unhealthy,
    /// Its port refused the connection: the head is not running.
    Refused,
    /// No answer: timeout, no route, or an error.
    Silent(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Keep,
    /// Stop every actor; why, for the log and the event.
    Fence(String),
}

/// The rule (module docs). `lease_surely_gone`: TTL has passed since the
/// last confirmed renewal was sent.
pub fn verdict(answers: &[(String, Answer)], lease_surely_gone: bool) -> Verdict {
    if answers.is_empty() {
        return Verdict::Fence("it knows no head to ask".into());
    }
    let mut why = Vec::new();
    for (head, a) in answers {
        match a {
            Answer::Healthy { node_live: false } => why.push(format!(
                "head {head} reaches etcd and sees this node's lease gone"
            )),
            Answer::Healthy { node_live: true } if lease_surely_gone => why.push(format!(
                "head {head} reaches etcd while this node's lease has surely lapsed"
            )),
            Answer::Silent(e) => why.push(format!("head {head} cannot be reached ({e})")),
            Answer::Healthy { node_live: true } | Answer::Unhealthy | Answer::Refused => {}
        }
    }
    if why.is_empty() {
        Verdict::Keep
    } else {
        Verdict::Fence(why.join("; "))
    }
}

/// Asks every head at once.
pub async fn ask_all(heads: &[String], token: &str, node_id: &str) -> Vec<(String, Answer)> {
    let asks = heads.iter().map(|h| async move {
        let a = match tokio::time::timeout(ASK, ask(h, token, node_id)).await {
            Ok(a) => a,
            Err(_) => Answer::Silent(format!("no answer within {:.1} s", ASK.as_secs_f64())),
        };
        (h.clone(), a)
    });
    futures::future::join_all(asks).await
}

async fn ask(head: &str, token: &str, node_id: &str) -> Answer {
    let ep = match Endpoint::from_shared(format!("http://{head}")) {
        Ok(ep) => ep.connect_timeout(CONNECT).tcp_nodelay(true),
        Err(e) => return Answer::Silent(format!("bad address: {e}")),
    };
    let ch = match ep.connect().await {
        Ok(ch) => ch,
        Err(e) => {
            return if refused(&e) {
                Answer::Refused
            } else {
                Answer::Silent(chain(&e))
            }
        }
    };
    let bearer = match Bearer::new(token) {
        Ok(b) => b,
        Err(e) => return Answer::Silent(e.to_string()),
    };
    let mut c = OrchestratorClient::with_interceptor(ch, bearer);
    match c
        .witness(WitnessRequest {
            node_id: node_id.to_string(),
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            if r.etcd_healthy {
                Answer::Healthy {
                    node_live: r.node_live,
                }
            } else {
                Answer::Unhealthy
            }
        }
        Err(s) => Answer::Silent(format!("{}: {}", s.code(), s.message())),
    }
}

/// Whether the connection was refused (a reset from the head's host):
/// only an io::Error of that kind somewhere in the source chain counts.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if let Some(io) = x.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cur = x.source();
    }
    false
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(x) = cur {
        out.push_str(": ");
        out.push_str(&x.to_string());
        cur = x.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(list: &[Answer]) -> Vec<(String, Answer)> {
        list.iter()
            .enumerate()
            .map(|(i, a)| (format!("10.0.0.{i}:6379"), a.clone()))
            .collect()
    }

    #[test]
    fn an_outage_for_everyone_keeps_the_actors() {
        // etcd paused or restarting: every head says so.
        assert_eq!(
            verdict(&a(&[Answer::Unhealthy, Answer::Unhealthy]), true),
            Verdict::Keep
        );
        // The only head crashed together with its own etcd member.
        assert_eq!(verdict(&a(&[Answer::Refused]), true), Verdict::Keep);
        assert_eq!(
            verdict(&a(&[Answer::Refused, Answer::Unhealthy]), true),
            Verdict::Keep
        );
    }

    #[test]
    fn a_live_lease_keeps_the_actors_until_it_surely_lapsed() {
        let live = a(&[Answer::Healthy { node_live: true }]);
        assert_eq!(verdict(&live, false), Verdict::Keep);
        assert!(matches!(verdict(&live, true), Verdict::Fence(w) if w.contains("surely lapsed")));
    }

    #[test]
    fn isolation_or_a_cluster_that_moved_on_fences() {
        let cut = a(&[Answer::Silent("no route to host".into())]);
        assert!(matches!(verdict(&cut, false), Verdict::Fence(w) if w.contains("no route")));
        let gone = a(&[Answer::Unhealthy, Answer::Healthy { node_live: false }]);
        assert!(matches!(verdict(&gone, false), Verdict::Fence(w) if w.contains("lease gone")));
        // One head unaccounted for may be the leader declaring us dead.
        let mixed = a(&[Answer::Unhealthy, Answer::Silent("timeout".into())]);
        assert!(matches!(verdict(&mixed, false), Verdict::Fence(_)));
        assert!(matches!(verdict(&[], false), Verdict::Fence(w) if w.contains("no head")));
    }

    #[test]
    fn asking_starts_half_a_ttl_after_the_last_renewal() {
        assert_eq!(ask_after(3), Duration::from_millis(1500));
        assert_eq!(ask_after(0), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        assert_eq!(ask(&addr, "t0ken", "node_x").await, Answer::Refused);
    }
}
