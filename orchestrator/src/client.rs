//! Client side of the Orchestrator service: finds a head (the given address,
//! the local head file, then every head seen before) and authenticates.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use proto::orchestrator::orchestrator_client::OrchestratorClient;
use proto::orchestrator::{HelloRequest, NameOrId, RegisterOwnerRequest};
use tokio_util::sync::CancellationToken;

use crate::auth::Bearer;
use crate::error::{Error, Result};
pub use crate::head_service::OwnerReply as Owner;
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

/// How to reach the head again (another head after a failover).
#[derive(Debug, Clone)]
pub struct HeadDialer {
    pub address: Option<String>,
    pub root: CacheRoot,
    pub token: String,
}

impl HeadDialer {
    pub async fn connect(&self) -> Result<(Client, String)> {
        connect(self.address.as_deref(), &self.root, &self.token).await
    }
}

fn owner_reply(
    r: std::result::Result<tonic::Response<proto::orchestrator::JsonReply>, tonic::Status>,
    id: &str,
) -> Result<Owner> {
    match r {
        Ok(r) => serde_json::from_str(&r.into_inner().json).map_err(|source| Error::BadReply {
            what: "owner reply",
            source,
        }),
        Err(s) if s.code() == tonic::Code::NotFound => Err(Error::NotFound {
            kind: "owner",
            name: id.to_string(),
        }),
        Err(s) => Err(s.into()),
    }
}

/// Registers an owner (`owner_id`: again, under that id); `ttl_s` 0 takes
/// the head's node TTL.
pub async fn register_owner(
    c: &mut Client,
    name: &str,
    ttl_s: f64,
    owner_id: Option<&str>,
) -> Result<Owner> {
    let r = c
        .register_owner(RegisterOwnerRequest {
            name: name.to_string(),
            ttl_s,
            owner_id: owner_id.unwrap_or_default().to_string(),
        })
        .await;
    owner_reply(r, owner_id.unwrap_or_default())
}

/// One keep-alive of the owner's lease; `Error::NotFound` when the head no
/// longer has the owner (register it again).
pub async fn refresh_owner(c: &mut Client, owner_id: &str) -> Result<Owner> {
    let r = c
        .refresh_owner(NameOrId {
            name_or_id: owner_id.to_string(),
        })
        .await;
    owner_reply(r, owner_id)
}

/// Keeps an owner alive from a thread and runtime of its own (a busy
/// engine thread must never starve it), refreshing every TTL/3; stops on
/// drop. When the head says the owner is gone (its lease lapsed while etcd
/// was away) it registers the same id again; when the head does not
/// answer, it dials the heads again.
pub struct OwnerKeeper {
    cancel: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OwnerKeeper {
    pub fn spawn(client: Client, dialer: HeadDialer, owner: Owner, name: String) -> Result<Self> {
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("owner-keepalive".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(
                            "owner {} keep-alive runtime: {e}; its placement groups go once its lease lapses",
                            owner.owner_id
                        );
                        return;
                    }
                };
                rt.block_on(keep_owner(client, dialer, owner, name, stop));
            })
            .map_err(Error::os("cannot start the owner keep-alive thread"))?;
        Ok(OwnerKeeper {
            cancel,
            thread: Some(thread),
        })
    }
}

impl Drop for OwnerKeeper {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn keep_owner(
    mut client: Client,
    dialer: HeadDialer,
    owner: Owner,
    name: String,
    cancel: CancellationToken,
) {
    let id = owner.owner_id.clone();
    let period = Duration::from_millis((owner.ttl_s * 1000 / 3).max(300));
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let r = tokio::time::timeout(period, refresh_owner(&mut client, &id)).await;
        let err = match r {
            Ok(Ok(_)) => {
                if let Some(t) = failing_since.take() {
                    tracing::info!(
                        "owner {id}: the head answers again after {:.1} s",
                        t.elapsed().as_secs_f64()
                    );
                }
                continue;
            }
            Ok(Err(Error::NotFound { .. })) => {
                // Its lease lapsed (etcd was away longer than the TTL): the
                // leader removes nothing during the grace after an outage,
                // which is this chance to come back under the same id.
                match register_owner(&mut client, &name, owner.ttl_s as f64, Some(&id)).await {
                    Ok(_) => {
                        tracing::warn!("owner {id}: its lease had lapsed; registered again");
                        failing_since = None;
                        continue;
                    }
                    Err(e) => e.to_string(),
                }
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {period:?}"),
        };
        match failing_since {
            None => {
                tracing::warn!("owner {id}: refreshing its lease failed: {err}; retrying");
                failing_since = Some(std::time::Instant::now());
            }
            Some(t) => tracing::debug!(
                "owner {id}: refreshing its lease failing for {:.1} s: {err}",
                t.elapsed().as_secs_f64()
            ),
        }
        if let Ok(Ok((c, head))) = tokio::time::timeout(period, dialer.connect()).await {
            tracing::debug!("owner {id}: dialed the head at {head}");
            client = c;
        }
    }
}
