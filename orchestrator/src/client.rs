//! Client side of the Orchestrator service: finds a head (the given address,
//! the local head file, then every head seen before) and authenticates.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use proto::orchestrator::orchestrator_client::OrchestratorClient;
use proto::orchestrator::HelloRequest;

use crate::auth::Bearer;
use crate::error::{Error, Result};
use crate::paths::{read_trimmed, write_file, CacheRoot};

pub type Client = OrchestratorClient<InterceptedService<Channel, Bearer>>;

/// Addresses to try, in order: explicit, the local head, known heads.
pub fn candidates(explicit: Option<&str>, root: &CacheRoot) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |a: &str| {
        let a = a.trim();
        if !a.is_empty() && !out.iter().any(|x| x == a) {
            out.push(a.to_string());
        }
    };
    if let Some(e) = explicit {
        for a in e.split(',') {
            push(a);
        }
    }
    if let Some(a) = read_trimmed(&root.head_address_file()) {
        push(&a);
    }
    if let Some(all) = read_trimmed(&root.heads_file()) {
        for a in all.lines() {
            push(a);
        }
    }
    out
}

pub fn remember_heads(root: &CacheRoot, heads: &[String]) {
    let mut all: Vec<String> = read_trimmed(&root.heads_file())
        .map(|s| s.lines().map(String::from).collect())
        .unwrap_or_default();
    for h in heads {
        if !all.contains(h) {
            all.push(h.clone());
        }
    }
    let _ = write_file(&root.heads_file(), &(all.join("\n") + "\n"));
}

async fn dial(addr: &str, token: &str) -> Result<Client> {
    let url = if addr.starts_with("http://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ep = Endpoint::from_shared(url)
        .map_err(|e| Error::invalid("address", format!("'{addr}': {e}")))?
        .connect_timeout(Duration::from_millis(1500))
        .tcp_nodelay(true);
    let ch = ep.connect().await.map_err(|e| Error::Connect {
        address: addr.to_string(),
        reason: e.to_string(),
    })?;
    Ok(OrchestratorClient::with_interceptor(
        ch,
        Bearer::new(token)?,
    ))
}

/// Connects to `addr` and no other head, retrying until `patience` ends:
/// for the head's own node agent, which must belong to its head (a head
/// whose fresh etcd member is still catching up answers a moment later).
pub async fn connect_only(addr: &str, token: &str, patience: Duration) -> Result<Client> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        let err = match dial(addr, token).await {
            Ok(mut c) => match c.hello(HelloRequest {}).await {
                Ok(_) => return Ok(c),
                Err(e) if e.code() == tonic::Code::Unauthenticated => {
                    return Err(Error::Unauthenticated(e.message().to_string()));
                }
                Err(e) => Error::Connect {
                    address: addr.to_string(),
                    reason: e.message().to_string(),
                },
            },
            Err(e) => e,
        };
        if std::time::Instant::now() >= deadline {
            return Err(err);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Connects to the first head that answers, preferring the given address.
pub async fn connect(
    explicit: Option<&str>,
    root: &CacheRoot,
    token: &str,
) -> Result<(Client, String)> {
    let cands = candidates(explicit, root);
    if cands.is_empty() {
        return Err(Error::Connect {
            address: "(none)".into(),
            reason: format!(
                "no --address given and no local head found at {}; start one with `orchestrator start --head`",
                root.head_address_file().display()
            ),
        });
    }
    let mut errors = Vec::new();
    for a in &cands {
        match dial(a, token).await {
            Ok(mut c) => match c.hello(HelloRequest {}).await {
                Ok(h) => {
                    // Learn the other heads so a later call can follow a failover.
                    remember_heads(root, &h.into_inner().head_addresses);
                    return Ok((c, a.clone()));
                }
                Err(e) if e.code() == tonic::Code::Unauthenticated => {
                    return Err(Error::Unauthenticated(e.message().to_string()));
                }
                Err(e) => errors.push(format!("{a}: {}", e.message())),
            },
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(Error::Connect {
        address: cands.join(","),
        reason: errors.join("; "),
    })
}
