//! Keeps an etcd lease alive from its own thread and runtime, so a busy
//! process can never starve the keep-alive and lose its node or leadership.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio_util::sync::CancellationToken;

use crate::store::EtcdConfig;

/// Shared between the keeper thread and the lease's owner.
#[derive(Debug, Default)]
pub struct LeaseState {
    /// The lease to keep alive; 0 = none yet.
    pub id: AtomicI64,
    /// Set when etcd says the lease is gone; the owner must re-register.
    pub lost: AtomicBool,
}

pub fn spawn_keeper(
    cfg: EtcdConfig,
    state: Arc<LeaseState>,
    ttl_s: u64,
    cancel: CancellationToken,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("lease-keepalive".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("lease keep-alive runtime: {e}");
                    state.lost.store(true, Ordering::SeqCst);
                    return;
                }
            };
            rt.block_on(keep(cfg, state, ttl_s, cancel));
        })
        .expect("spawn keep-alive thread")
}

async fn keep(cfg: EtcdConfig, state: Arc<LeaseState>, ttl_s: u64, cancel: CancellationToken) {
    let period = Duration::from_millis((ttl_s * 1000 / 3).max(300));
    let mut client: Option<Client> = None;
    let mut stream: Option<(
        i64,
        etcd_client::LeaseKeeper,
        etcd_client::LeaseKeepAliveStream,
    )> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let id = state.id.load(Ordering::SeqCst);
        if id == 0 || state.lost.load(Ordering::SeqCst) {
            stream = None;
            continue;
        }
        if client.is_none() {
            let (Ok(urls), Ok(opts)) = (cfg.urls(), cfg.options()) else {
                return;
            };
            match Client::connect(&urls, Some(opts)).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::debug!("keep-alive: etcd unreachable: {e}");
                    continue;
                }
            }
        }
        if stream.as_ref().is_none_or(|s| s.0 != id) {
            let c = client.as_mut().expect("connected above");
            match c.lease_keep_alive(id).await {
                Ok((k, s)) => stream = Some((id, k, s)),
                Err(e) => {
                    tracing::debug!("keep-alive: {e}");
                    client = None;
                    continue;
                }
            }
        }
        let (_, keeper, s) = stream.as_mut().expect("opened above");
        let ok = match keeper.keep_alive().await {
            Ok(()) => tokio::time::timeout(Duration::from_secs(2), s.message()).await,
            Err(e) => Ok(Err(e)),
        };
        match ok {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
            Ok(Ok(Some(_))) => {
                tracing::warn!("lease {id:x} expired in etcd");
                state.lost.store(true, Ordering::SeqCst);
                stream = None;
            }
            other => {
                // etcd is away: keep trying; after a restart etcd renews
                // its leases, so the lease usually survives an outage.
                tracing::debug!("keep-alive for lease {id:x} failed: {other:?}");
                stream = None;
                client = None;
            }
        }
    }
}
