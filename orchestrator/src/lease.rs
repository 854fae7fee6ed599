//! Keeps an etcd lease alive from its own thread and runtime, so a busy
//! process can never starve the keep-alive and lose its node or leadership.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::store::EtcdConfig;

/// Shared between the keeper thread and the lease's owner.
#[derive(Debug, Default)]
pub struct LeaseState {
    /// The lease to keep alive; 0 = none yet.
    pub id: AtomicI64,
    /// Set when etcd says the lease is gone, and whenever the keeper
    /// stops: either way nobody renews it, so the owner must act.
    pub lost: AtomicBool,
    /// Set when the keeper thread has ended (the owner cannot re-register
    /// into a lease nobody keeps; it must stop or start a new keeper).
    pub keeper_stopped: AtomicBool,
    /// When the latest renewal (or grant) that etcd confirmed was sent:
    /// etcd cannot expire the lease before this plus the TTL, so its owner
    /// can tell from its own clock how long the lease surely lives.
    pub renewed: std::sync::Mutex<Option<Instant>>,
}

impl LeaseState {
    /// Records a renewal or grant that etcd confirmed, sent at `sent`.
    pub fn renewed_at(&self, sent: Instant) {
        if let Ok(mut r) = self.renewed.lock() {
            if r.is_none_or(|t| t < sent) {
                *r = Some(sent);
            }
        }
    }

    /// How long since the latest confirmed renewal; None: never renewed.
    pub fn since_renewal(&self) -> Option<Duration> {
        self.renewed
            .lock()
            .ok()
            .and_then(|r| r.map(|t| t.elapsed()))
    }
}

/// Marks the lease lost and the keeper stopped however the keeper ends:
/// return, cancel, error or panic.
struct StopGuard(Arc<LeaseState>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the lease keep-alive thread panicked");
        } else {
            tracing::debug!("the lease keep-alive thread ended");
        }
        self.0.lost.store(true, Ordering::SeqCst);
        self.0.keeper_stopped.store(true, Ordering::SeqCst);
    }
}

pub fn spawn_keeper(
    cfg: EtcdConfig,
    state: Arc<LeaseState>,
    ttl_s: u64,
    cancel: CancellationToken,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("lease-keepalive".into())
        .spawn(move || {
            let _guard = StopGuard(state.clone());
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("lease keep-alive runtime: {e}");
                    return;
                }
            };
            rt.block_on(keep(cfg, state, ttl_s, cancel));
        })
        .map_err(|e| Error::KeeperStopped(format!("cannot start its thread: {e}")))
}

/// Marks lease `id` lost, unless the owner has meanwhile moved on to a new
/// lease: a late verdict on the old one must not stop renewing the new one.
fn mark_lost(state: &LeaseState, id: i64) {
    if state.id.load(Ordering::SeqCst) != id {
        return;
    }
    state.lost.store(true, Ordering::SeqCst);
    if state.id.load(Ordering::SeqCst) != id {
        // The owner registered between the check and the store.
        state.lost.store(false, Ordering::SeqCst);
    }
}

async fn keep(cfg: EtcdConfig, state: Arc<LeaseState>, ttl_s: u64, cancel: CancellationToken) {
    let period = Duration::from_millis((ttl_s * 1000 / 3).max(300));
    let mut client: Option<Client> = None;
    let mut next = 0usize;
    let mut stream: Option<(
        i64,
        etcd_client::LeaseKeeper,
        etcd_client::LeaseKeepAliveStream,
    )> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                tracing::debug!("lease keep-alive cancelled");
                return;
            }
            _ = tokio::time::sleep(period) => {}
        }
        let id = state.id.load(Ordering::SeqCst);
        if id == 0 || state.lost.load(Ordering::SeqCst) {
            stream = None;
            continue;
        }
        if client.is_none() {
            if let Err(e) = cfg.urls().and_then(|_| cfg.options()) {
                tracing::error!("lease keep-alive cannot dial etcd: {e}");
                return;
            }
            // One endpoint at a time, moving on past one that failed.
            match cfg.connect_from("/flotilla/", next).await {
                Ok((c, k)) => {
                    client = Some(c);
                    next = k + 1;
                }
                Err(e) => {
                    tracing::debug!("keep-alive: etcd unreachable: {e}");
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        if stream.as_ref().is_none_or(|s| s.0 != id) {
            match c.lease_keep_alive(id).await {
                Ok((k, s)) => stream = Some((id, k, s)),
                Err(e) if crate::store::lease_not_found(&e) => {
                    tracing::warn!("lease {id:x} is gone from etcd");
                    mark_lost(&state, id);
                    continue;
                }
                Err(e) => {
                    tracing::debug!("keep-alive: {e}");
                    client = None;
                    continue;
                }
            }
        }
        let Some((_, keeper, s)) = stream.as_mut() else {
            continue;
        };
        let sent = Instant::now();
        let ok = match keeper.keep_alive().await {
            Ok(()) => tokio::time::timeout(Duration::from_secs(2), s.message()).await,
            Err(e) => Ok(Err(e)),
        };
        match ok {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => state.renewed_at(sent),
            Ok(Ok(Some(_))) => {
                tracing::warn!("lease {id:x} expired in etcd");
                mark_lost(&state, id);
                stream = None;
            }
            Ok(Err(e)) if crate::store::lease_not_found(&e) => {
                tracing::warn!("lease {id:x} is gone from etcd");
                mark_lost(&state, id);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_verdict_on_an_old_lease_spares_the_new_one() {
        let s = LeaseState::default();
        s.id.store(7, Ordering::SeqCst);
        mark_lost(&s, 7);
        assert!(s.lost.load(Ordering::SeqCst));
        // The owner registers again: new lease, not lost.
        s.id.store(8, Ordering::SeqCst);
        s.lost.store(false, Ordering::SeqCst);
        mark_lost(&s, 7);
        assert!(!s.lost.load(Ordering::SeqCst));
    }
}
