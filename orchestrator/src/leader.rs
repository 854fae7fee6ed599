//! The leader: campaigns through etcd so that one head at a time leads,
//! and while leading runs the reconciler each tick and commits its
//! decisions. Every head also serves the Orchestrator service
//! (`head_service`); only the leader changes the cluster on its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::events::{self, Event, EventKind};
use crate::health::{self, note_etcd_error, SharedHealth};
use crate::lease::{spawn_keeper, LeaseState};
use crate::reconcile::{expired, reconcile, Changes};
use crate::state::{now, Snapshot};
use crate::store::{Guarded, Store};

/// Commits the changes of one decision: guarded on every record and, when
/// `alloc` is set, on the allocation key.
pub async fn commit_changes(
    store: &Store,
    snap: &Snapshot,
    ch: &Changes,
    alloc: bool,
) -> Result<bool> {
    let mut recs: Vec<Guarded> = Vec::new();
    for n in ch.nodes.values() {
        recs.push(Store::guarded(store.node_key(&n.id), snap, n));
    }
    for p in ch.pgs.values() {
        recs.push(Store::guarded(store.pg_key(&p.id), snap, p));
    }
    for a in ch.actors.values() {
        recs.push(Store::guarded(store.actor_key(&a.id), snap, a));
    }
    let absent: Vec<String> = ch.owners_gone.iter().map(|o| store.owner_key(o)).collect();
    store
        .commit_if_absent(alloc.then_some(snap.alloc_rev), &recs, &absent)
        .await
}

/// Campaigns for leadership and, while leading, reconciles the cluster.
pub async fn leader_loop(
    store: Store,
    etcd: crate::store::EtcdConfig,
    address: String,
    ttl_s: u64,
    leading: Arc<AtomicBool>,
    health: SharedHealth,
    cancel: CancellationToken,
) {
    let lease = Arc::new(LeaseState::default());
    let keeper = match spawn_keeper(etcd, lease.clone(), ttl_s, cancel.child_token()) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!("head {address} cannot lead or stand by: {e}");
            return;
        }
    };
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let mut last_err: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let lapse_means_dead = health
            .lock()
            .map(|h| h.lapse_means_dead(Instant::now(), health::grace(ttl_s)))
            .unwrap_or(false);
        let (started, wall) = (Instant::now(), now());
        let r = leader_step(
            &store,
            &address,
            ttl_s,
            &lease,
            &leading,
            lapse_means_dead,
            started,
        )
        .await;
        if let Err(Error::Etcd(e)) = &r {
            if crate::store::lease_not_found(e) {
                // Our lease lapsed (etcd was away longer than the TTL):
                // campaign again with a new one on the next step.
                lease.lost.store(true, Ordering::SeqCst);
            }
        }
        // Slow, whatever its outcome: a stall may end in an error that
        // is not an outage (our own lease revoked on etcd's resuming).
        if let Ok(mut h) = health.lock() {
            h.round_trip(started, wall, Instant::now(), health::slow_answer(ttl_s));
        }
        if r.is_ok() {
            let ended = health.lock().ok().and_then(|mut h| h.ok(Instant::now()));
            if let Some(o) = ended {
                let msg = format!(
                    "etcd was unreachable from head {address} for {:.1} s (since {})",
                    o.lasted.as_secs_f64(),
                    crate::status::fmt_time(o.since)
                );
                store
                    .record_events(&[Event::new(now(), EventKind::EtcdUnreachable, &address, msg)])
                    .await;
                tracing::warn!(
                    "head {address}: etcd is back after {:.1} s away (since {}); nodes whose lease lapsed meanwhile get {} s to register again before any is declared dead",
                    o.lasted.as_secs_f64(),
                    crate::status::fmt_time(o.since),
                    health::grace(ttl_s).as_secs()
                );
            }
        }
        if let Err(e) = r {
            if cancel.is_cancelled() {
                break;
            }
            note_etcd_error(&health, &e);
            leading.store(false, Ordering::SeqCst);
            if last_err.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                tracing::warn!("head {address}: {e}");
                last_err = Some(Instant::now());
            }
        }
    }
    // Step down at once so a standby need not wait for the TTL.
    let id = lease.id.load(Ordering::SeqCst);
    if id != 0 {
        let mut c = store.client();
        let _ = tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(id)).await;
    }
    let _ = tokio::task::spawn_blocking(move || keeper.join()).await;
}

async fn leader_step(
    store: &Store,
    address: &str,
    ttl_s: u64,
    lease: &LeaseState,
    leading: &AtomicBool,
    lapse_means_dead: bool,
    started: Instant,
) -> Result<()> {
    if lease.keeper_stopped.load(Ordering::SeqCst) {
        return Err(Error::KeeperStopped(format!(
            "head {address} has no lease keeper"
        )));
    }
    if lease.id.load(Ordering::SeqCst) == 0 || lease.lost.load(Ordering::SeqCst) {
        let mut c = store.client();
        let g = c.lease_grant(ttl_s as i64, None).await?;
        lease.id.store(g.id(), Ordering::SeqCst);
        lease.lost.store(false, Ordering::SeqCst);
        store
            .put(&store.head_key(address), "", Some(g.id()))
            .await?;
    }
    let id = lease.id.load(Ordering::SeqCst);
    let holder = store
        .put_if_absent(&store.leader_key(), address, Some(id))
        .await?;
    let now_leading = holder == address;
    if now_leading != leading.swap(now_leading, Ordering::SeqCst) {
        if now_leading {
            tracing::info!("head {address} is now the leader");
        } else {
            tracing::info!("head {address} is a standby; {holder} leads");
        }
    }
    if !now_leading {
        return Ok(());
    }
    let snap = store.snapshot().await?;
    // A snapshot that came late may be etcd's first answer after a stall,
    // in which it revoked the leases it could not renew: not evidence
    // (the caller starts the grace once this step returns).
    let lapse_means_dead = lapse_means_dead && started.elapsed() < health::slow_answer(ttl_s);
    let t = now();
    let ch = reconcile(&snap, t, lapse_means_dead);
    if !ch.is_empty() {
        if commit_changes(store, &snap, &ch, true).await? {
            let evs = events::from_changes(&snap, &ch, t);
            for e in &evs {
                tracing::warn!("{}: {}", e.kind, e.message);
            }
            store.record_events(&evs).await;
        }
        return Ok(());
    }
    let mut old = expired(&|kind, id| store.record_key(kind, id), &snap, t);
    old.extend(
        events::expired(snap.events.iter(), t)
            .iter()
            .map(|k| store.event_key(k)),
    );
    if !old.is_empty() {
        store.delete_unchanged(&snap, &old).await?;
    }
    Ok(())
}
