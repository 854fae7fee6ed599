//! The reconciler: the leader's decision step as a pure function, snapshot
//! in, changed records out. The leader commits them in one guarded etcd
//! transaction.

use std::collections::{BTreeMap, BTreeSet};

use crate::placement::{place, Assignment, GpuShare, NodeView, PlaceError, Strategy};
use crate::resources::{Resources, GPU};
use crate::state::{ActorRecord, ActorState, NodeRecord, NodeState, PgRecord, PgState, Snapshot};

#[derive(Debug, Default, Clone)]
pub struct Changes {
    pub nodes: BTreeMap<String, NodeRecord>,
    pub pgs: BTreeMap<String, PgRecord>,
    pub actors: BTreeMap<String, ActorRecord>,
    /// Owners whose absence removed groups in this decision: the commit
    /// holds only while their keys are still absent.
    pub owners_gone: BTreeSet<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.pgs.is_empty() && self.actors.is_empty()
    }
}

/// Why the leader removes a placement group whose owner is gone.
pub const OWNER_GONE: &str = "its placement group was removed: its owner is gone";

/// Why the leader kills an actor whose own owner is gone.
pub const ACTOR_OWNER_GONE: &str = "its owner is gone";

/// Whether `owner` (of a group or an actor) is gone: its key lapsed while
/// etcd was healthy (see `orphaned_groups`).
fn owner_gone(snap: &Snapshot, owner: Option<&String>, lapse_means_dead: bool) -> bool {
    lapse_means_dead && owner.is_some_and(|o| !snap.owners.contains(o))
}

/// Placement groups to remove because their owner's key is gone: the
/// owner stopped refreshing its lease while etcd was healthy.
///
/// Only with `lapse_means_dead` (etcd has answered without a break for
/// the grace): an owner lease that lapsed because etcd itself was away, or
/// whose owner has not yet had the grace to register again, says nothing
/// about the owner. Groups without an owner are never touched.
pub fn orphaned_groups(snap: &Snapshot, lapse_means_dead: bool) -> Vec<&PgRecord> {
    if !lapse_means_dead {
        return Vec::new();
    }
    snap.pgs
        .values()
        .filter(|p| p.state != PgState::Removed)
        .filter(|p| owner_gone(snap, p.owner.as_ref(), lapse_means_dead))
        .collect()
}

/// One pass: declare lost nodes dead, remove groups whose owner is gone,
/// reschedule what dead nodes held, place pending placement groups and
/// actors.
///
/// `lapse_means_dead`: whether a node without a lease is silent (etcd has
/// been healthy for the grace, see `health.rs`). When false, such a node is
/// only unreachable: nothing new lands on it, but it keeps its actors and
/// reservations, so an etcd outage moves nothing.
pub fn reconcile(snap: &Snapshot, now: f64, lapse_means_dead: bool) -> Changes {
    let mut ch = Changes::default();
    let mut nodes = snap.nodes.clone();
    for n in nodes.values_mut() {
        if lapse_means_dead && n.state == NodeState::Alive && !snap.live.contains(&n.id) {
            n.state = NodeState::Dead;
            n.died_at = Some(now);
            n.death_reason = Some("node agent lease expired".into());
            ch.nodes.insert(n.id.clone(), n.clone());
        }
    }
    // Whether what a node holds stays there: only a node declared dead
    // gives up its actors and bundles (an unreachable one keeps them).
    let alive = |id: &str| nodes.get(id).is_some_and(|n| n.state == NodeState::Alive);

    let mut pgs = snap.pgs.clone();
    let mut orphaned = BTreeSet::new();
    for o in orphaned_groups(snap, lapse_means_dead) {
        let mut p = o.clone();
        p.state = PgState::Removed;
        p.ended_at = Some(now);
        orphaned.insert(p.id.clone());
        ch.owners_gone.extend(p.owner.clone());
        ch.pgs.insert(p.id.clone(), p.clone());
        pgs.insert(p.id.clone(), p);
    }
    for pg in pgs.values_mut().filter(|p| p.holds_resources()) {
        let mut lost = false;
        for a in pg.assignments.iter_mut() {
            if a.as_ref().is_some_and(|a| !alive(&a.node_id)) {
                *a = None;
                lost = true;
            }
        }
        if lost {
            pg.state = PgState::Rescheduling;
            ch.pgs.insert(pg.id.clone(), pg.clone());
        }
    }

    // Work on a view where this pass's own decisions are already taken.
    let mut view_snap = snap.clone();
    view_snap.nodes = nodes.clone();
    view_snap.pgs = pgs.clone();
    let mut views = view_snap.node_views();

    let mut waiting: Vec<&mut PgRecord> = pgs
        .values_mut()
        .filter(|p| matches!(p.state, PgState::Pending | PgState::Rescheduling))
        .collect();
    waiting.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
    for pg in waiting {
        if try_place_pg(&mut views, pg) {
            ch.pgs.insert(pg.id.clone(), pg.clone());
        }
    }

    let mut actors: Vec<ActorRecord> = snap.actors.values().cloned().collect();
    actors.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
    for mut a in actors {
        if a.state == ActorState::Dead {
            continue;
        }
        let before = a.clone();
        if let Some(pg_id) = &a.spec.placement_group {
            if pgs.get(pg_id).is_none_or(|p| p.state == PgState::Removed) {
                a.state = ActorState::Dead;
                a.ended_at = Some(now);
                a.death_cause = Some(if orphaned.contains(pg_id) {
                    OWNER_GONE.into()
                } else {
                    "its placement group was removed".into()
                });
            }
        }
        // An actor that belongs to a process (a gateway's worker) goes with
        // it, whoever owns the group it runs in.
        if a.state != ActorState::Dead && owner_gone(snap, a.owner.as_ref(), lapse_means_dead) {
            a.state = ActorState::Dead;
            a.ended_at = Some(now);
            a.death_cause = Some(ACTOR_OWNER_GONE.into());
            ch.owners_gone.extend(a.owner.clone());
        }
        if a.state != ActorState::Dead {
            if let Some(node) = a.node_id.clone() {
                let bundle_moved = bundle_of(&pgs, &a).is_some_and(|b| b.node_id != node);
                if !alive(&node) || (a.spec.placement_group.is_some() && bundle_moved) {
                    if a.can_restart() {
                        a.state = ActorState::Restarting;
                        a.restarts += 1;
                    } else {
                        a.state = ActorState::Dead;
                        a.ended_at = Some(now);
                        a.death_cause = Some(format!("its node {node} died"));
                    }
                    a.node_id = None;
                    a.gpus.clear();
                    a.pid = None;
                }
            }
        }
        if a.state != ActorState::Dead && a.node_id.is_none() {
            place_actor(&mut views, &pgs, &ch.actors, snap, &mut a);
        }
        if a != before {
            ch.actors.insert(a.id.clone(), a);
        }
    }
    ch
}

fn bundle_of<'a>(pgs: &'a BTreeMap<String, PgRecord>, a: &ActorRecord) -> Option<&'a Assignment> {
    let pg = pgs.get(a.spec.placement_group.as_ref()?)?;
    pg.assignments.get(a.spec.bundle_index?)?.as_ref()
}

/// How long removed groups and dead actors stay listed.
pub const RETAIN_S: f64 = 600.0;
/// How long dead nodes stay under "Recent failures".
pub const RETAIN_NODES_S: f64 = 3600.0;

/// Keys of records old enough to forget, so snapshots stay small.
pub fn expired(
    store_keys: &dyn Fn(&str, &str) -> String,
    snap: &Snapshot,
    now: f64,
) -> Vec<String> {
    let old = |t: Option<f64>, keep: f64| t.is_some_and(|t| now - t > keep);
    let mut out = Vec::new();
    for p in snap.pgs.values() {
        if p.state == PgState::Removed && old(p.ended_at, RETAIN_S) {
            out.push(store_keys("pgs", &p.id));
        }
    }
    for a in snap.actors.values() {
        if a.state == ActorState::Dead && old(a.ended_at, RETAIN_S) {
            out.push(store_keys("actors", &a.id));
        }
    }
    for n in snap.nodes.values() {
        if n.state == NodeState::Dead && old(n.died_at, RETAIN_NODES_S) {
            out.push(store_keys("nodes", &n.id));
        }
    }
    out
}

/// Places the unassigned bundles of `pg`; true when the record changed.
pub fn try_place_pg(views: &mut [NodeView], pg: &mut PgRecord) -> bool {
    let missing: Vec<usize> = (0..pg.bundles.len())
        .filter(|&i| pg.assignments[i].is_none())
        .collect();
    if missing.is_empty() {
        if pg.state != PgState::Created {
            pg.state = PgState::Created;
            return true;
        }
        return false;
    }
    let occupied: Vec<String> = pg
        .assignments
        .iter()
        .flatten()
        .map(|a| a.node_id.clone())
        .collect();
    let want: Vec<Resources> = missing.iter().map(|&i| pg.bundles[i].clone()).collect();
    match place(views, &want, pg.strategy, &occupied) {
        Ok(placed) => {
            for (&i, a) in missing.iter().zip(placed) {
                if let Some(v) = views.iter_mut().find(|v| v.id == a.node_id) {
                    v.take(&pg.bundles[i], &a.gpus);
                }
                pg.assignments[i] = Some(a);
            }
            pg.state = PgState::Created;
            true
        }
        Err(_) => false,
    }
}

fn place_actor(
    views: &mut [NodeView],
    pgs: &BTreeMap<String, PgRecord>,
    decided: &BTreeMap<String, ActorRecord>,
    snap: &Snapshot,
    a: &mut ActorRecord,
) {
    if let Some(pg_id) = a.spec.placement_group.clone() {
        let idx = a.spec.bundle_index.unwrap_or(0);
        let Some(pg) = pgs.get(&pg_id) else { return };
        let Some(Some(bundle)) = pg.assignments.get(idx) else {
            return;
        };
        // Capacity left in the bundle, counting actors placed in this pass.
        let mut free = pg.bundles[idx].clone();
        let fresh = decided
            .values()
            .filter(|d| !snap.actors.contains_key(&d.id));
        for other in snap.actors.values().chain(fresh) {
            let o = decided.get(&other.id).unwrap_or(other);
            if o.id != a.id
                && o.holds_resources()
                && o.spec.placement_group.as_deref() == Some(pg_id.as_str())
                && o.spec.bundle_index == Some(idx)
            {
                free.sub(&o.spec.resources);
            }
        }
        if !a.spec.resources.fits_in(&free) {
            return;
        }
        a.node_id = Some(bundle.node_id.clone());
        a.gpus = if a.spec.resources.get(GPU) > 0 {
            bundle_gpus_for(&bundle.gpus, a.spec.resources.get(GPU))
        } else {
            Vec::new()
        };
    } else {
        let Ok(mut p) = place(
            views,
            std::slice::from_ref(&a.spec.resources),
            Strategy::Pack,
            &[],
        ) else {
            return;
        };
        let asg = p.remove(0);
        if let Some(v) = views.iter_mut().find(|v| v.id == asg.node_id) {
            v.take(&a.spec.resources, &asg.gpus);
        }
        a.node_id = Some(asg.node_id);
        a.gpus = asg.gpus;
    }
    a.incarnation += 1;
    a.pid = None;
    if a.state != ActorState::Restarting {
        a.state = ActorState::PendingCreation;
    }
}

/// An actor inside a bundle sees the bundle's devices; with a whole number
/// of GPUs it takes that many of them.
fn bundle_gpus_for(bundle: &[GpuShare], amount: u64) -> Vec<GpuShare> {
    let n = (amount / crate::resources::UNIT).max(1) as usize;
    bundle
        .iter()
        .take(n)
        .map(|g| GpuShare {
            id: g.id,
            share: amount.min(g.share),
        })
        .collect()
}

/// Why a request cannot be placed right now, for errors and status.
pub fn classify(snap: &Snapshot, bundles: &[Resources], strategy: Strategy) -> Option<PlaceError> {
    place(&snap.node_views(), bundles, strategy, &[]).err()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ActorSpec;

    fn node(id: &str, gpus: u32) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            ip: format!("10.0.0.{}", id.len()),
            agent_address: String::new(),
            is_head: false,
            total: Resources::new().with(GPU, gpus as f64).with("CPU", 4.0),
            gpu_ids: (0..gpus).collect(),
            gpu_model: None,
            gpu_memory_bytes: 0,
            state: NodeState::Alive,
            started_at: 0.0,
            died_at: None,
            death_reason: None,
        }
    }

    fn pg(id: &str, bundles: Vec<Resources>, strategy: Strategy) -> PgRecord {
        PgRecord {
            id: id.into(),
            name: String::new(),
            assignments: vec![None; bundles.len()],
            bundles,
            strategy,
            state: PgState::Pending,
            created_at: 1.0,
            ended_at: None,
            owner: None,
        }
    }

    fn actor(id: &str, pg: Option<&str>, idx: usize, gpu: f64, max_restarts: i64) -> ActorRecord {
        ActorRecord {
            ..ActorRecord::new(
                id.into(),
                String::new(),
                ActorSpec {
                    command: "true".into(),
                    args: vec![],
                    env: Default::default(),
                    resources: Resources::new().with(GPU, gpu),
                    placement_group: pg.map(String::from),
                    bundle_index: pg.map(|_| idx),
                    max_restarts,
                },
                None,
                2.0,
            )
        }
    }

    fn cluster(ids: &[&str]) -> Snapshot {
        let mut s = Snapshot::default();
        for id in ids {
            s.nodes.insert(id.to_string(), node(id, 2));
            s.live.insert(id.to_string());
        }
        s
    }

    fn apply(s: &mut Snapshot, ch: Changes) {
        s.nodes.extend(ch.nodes);
        s.pgs.extend(ch.pgs);
        s.actors.extend(ch.actors);
    }

    #[test]
    fn pending_group_then_actors_in_bundles() {
        let mut s = cluster(&["a", "b"]);
        s.pgs.insert(
            "pg".into(),
            pg(
                "pg",
                vec![Resources::new().with(GPU, 1.0); 2],
                Strategy::StrictSpread,
            ),
        );
        s.actors
            .insert("x".into(), actor("x", Some("pg"), 0, 0.5, 0));
        s.actors
            .insert("y".into(), actor("y", Some("pg"), 0, 0.5, 0));
        s.actors
            .insert("z".into(), actor("z", Some("pg"), 0, 0.5, 0));
        let ch = reconcile(&s, 10.0, true);
        apply(&mut s, ch);
        assert_eq!(s.pgs["pg"].state, PgState::Created);
        let x = &s.actors["x"];
        let y = &s.actors["y"];
        assert_eq!(x.node_id, y.node_id);
        assert_eq!(
            x.gpus[0].id, y.gpus[0].id,
            "two half-GPU actors share one id"
        );
        assert_eq!(x.incarnation, 1);
        assert!(s.actors["z"].node_id.is_none(), "the bundle is full");
        // Nothing left to do: a second pass changes nothing.
        assert!(reconcile(&s, 11.0, true).is_empty());
    }

    #[test]
    fn lost_node_reschedules_group_and_restarts_actors() {
        let mut s = cluster(&["a", "b"]);
        s.pgs.insert(
            "pg".into(),
            pg(
                "pg",
                vec![Resources::new().with(GPU, 1.0); 2],
                Strategy::StrictSpread,
            ),
        );
        s.actors
            .insert("keep".into(), actor("keep", Some("pg"), 0, 1.0, 3));
        s.actors
            .insert("once".into(), actor("once", Some("pg"), 1, 1.0, 0));
        let ch = reconcile(&s, 10.0, true);
        apply(&mut s, ch);
        let lost = s.pgs["pg"].assignments[0].as_ref().unwrap().node_id.clone();
        s.live.remove(&lost);
        let ch = reconcile(&s, 20.0, true);
        apply(&mut s, ch);
        assert_eq!(s.nodes[&lost].state, NodeState::Dead);
        assert_eq!(
            s.pgs["pg"].state,
            PgState::Rescheduling,
            "strict spread needs a new node"
        );
        assert_eq!(s.actors["keep"].state, ActorState::Restarting);
        assert_eq!(s.actors["keep"].restarts, 1);
        assert!(s.actors["once"].node_id.is_some(), "its bundle survived");
        // A new node joins: the group is whole again and the actor comes back.
        s.nodes.insert("c".into(), node("c", 2));
        s.live.insert("c".into());
        let ch = reconcile(&s, 30.0, true);
        apply(&mut s, ch);
        assert_eq!(s.pgs["pg"].state, PgState::Created);
        assert_eq!(s.pgs["pg"].assignments[0].as_ref().unwrap().node_id, "c");
        assert_eq!(s.actors["keep"].node_id.as_deref(), Some("c"));
        assert_eq!(s.actors["keep"].incarnation, 2);
    }

    #[test]
    fn lapsed_lease_during_an_outage_moves_nothing() {
        let mut s = cluster(&["a", "b"]);
        s.pgs.insert(
            "pg".into(),
            pg("pg", vec![Resources::new().with(GPU, 1.0)], Strategy::Pack),
        );
        s.actors
            .insert("x".into(), actor("x", Some("pg"), 0, 1.0, -1));
        s.actors.insert("y".into(), actor("y", None, 0, 1.0, 0));
        let ch = reconcile(&s, 1.0, true);
        apply(&mut s, ch);
        let before = s.clone();
        // etcd was away: every lease lapsed.
        s.live.clear();
        let ch = reconcile(&s, 2.0, false);
        assert!(ch.is_empty(), "{ch:?}");
        // Only one node comes back before the grace ends: still nothing moves,
        // and a new actor waits rather than land on the unreachable node.
        s.live.insert("a".into());
        s.actors.insert("z".into(), actor("z", None, 0, 2.0, 0));
        let ch = reconcile(&s, 3.0, false);
        assert!(ch.nodes.is_empty() && ch.pgs.is_empty(), "{ch:?}");
        for id in ["x", "y"] {
            assert_eq!(s.actors[id], before.actors[id]);
        }
        // Silent past the grace while etcd is healthy: now it is dead.
        let ch = reconcile(&s, 9.0, true);
        assert_eq!(ch.nodes.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn a_group_goes_with_its_owner_but_not_in_an_outage() {
        let mut s = cluster(&["a"]);
        let mut owned = pg(
            "owned",
            vec![Resources::new().with(GPU, 2.0)],
            Strategy::Pack,
        );
        owned.owner = Some("o1".into());
        owned.created_at = 0.5; // placed first
        s.pgs.insert("owned".into(), owned);
        s.pgs.insert(
            "cli".into(),
            pg("cli", vec![Resources::new().with(GPU, 1.0)], Strategy::Pack),
        );
        s.actors
            .insert("x".into(), actor("x", Some("owned"), 0, 1.0, -1));
        s.owners.insert("o1".into());
        let ch = reconcile(&s, 1.0, true);
        apply(&mut s, ch);
        assert_eq!(s.pgs["owned"].state, PgState::Created);
        assert_eq!(s.pgs["cli"].state, PgState::Pending, "the node is full");
        assert!(s.actors["x"].node_id.is_some());

        // The owner's key is gone, but etcd was away (or the grace is not
        // over): nothing is removed.
        s.owners.clear();
        assert!(orphaned_groups(&s, false).is_empty());
        assert!(reconcile(&s, 2.0, false).is_empty());

        // Gone while etcd was healthy: the group and its actor go, and the
        // GPUs they held place the waiting group in the same pass.
        let ids: Vec<&str> = orphaned_groups(&s, true)
            .iter()
            .map(|p| p.id.as_str())
            .collect();
        assert_eq!(ids, ["owned"], "a group without owner is never orphaned");
        let ch = reconcile(&s, 3.0, true);
        assert_eq!(ch.owners_gone.iter().collect::<Vec<_>>(), ["o1"]);
        apply(&mut s, ch);
        assert_eq!(s.pgs["owned"].state, PgState::Removed);
        assert_eq!(s.pgs["owned"].ended_at, Some(3.0));
        assert_eq!(s.actors["x"].state, ActorState::Dead);
        assert_eq!(s.actors["x"].death_cause.as_deref(), Some(OWNER_GONE));
        assert_eq!(s.pgs["cli"].state, PgState::Created);
        // Removed once: nothing more to do.
        assert!(orphaned_groups(&s, true).is_empty());
        assert!(reconcile(&s, 4.0, true).is_empty());
    }

    #[test]
    fn an_owned_actor_goes_with_its_owner_and_leaves_the_group() {
        // A gateway running in a group someone else holds: its workers are
        // its own, the group is not.
        let mut s = cluster(&["a"]);
        s.pgs.insert(
            "held".into(),
            pg(
                "held",
                vec![Resources::new().with(GPU, 1.0); 2],
                Strategy::Pack,
            ),
        );
        let mut w = actor("w", Some("held"), 1, 1.0, -1);
        w.owner = Some("gw".into());
        s.actors.insert("w".into(), w);
        s.actors
            .insert("other".into(), actor("other", Some("held"), 0, 1.0, 0));
        s.owners.insert("gw".into());
        let ch = reconcile(&s, 1.0, true);
        apply(&mut s, ch);
        assert!(s.actors["w"].node_id.is_some() && s.actors["other"].node_id.is_some());

        // The owner's key lapsed in an outage: nothing happens.
        s.owners.clear();
        assert!(reconcile(&s, 2.0, false).is_empty());

        let ch = reconcile(&s, 3.0, true);
        assert_eq!(ch.owners_gone.iter().collect::<Vec<_>>(), ["gw"]);
        assert!(ch.pgs.is_empty(), "the group is not the actor's owner's");
        apply(&mut s, ch);
        assert_eq!(s.actors["w"].state, ActorState::Dead);
        assert_eq!(s.actors["w"].death_cause.as_deref(), Some(ACTOR_OWNER_GONE));
        assert_eq!(s.actors["w"].ended_at, Some(3.0));
        assert_ne!(s.actors["other"].state, ActorState::Dead);
        assert_eq!(s.pgs["held"].state, PgState::Created);
        assert!(reconcile(&s, 4.0, true).is_empty());
    }

    #[test]
    fn a_live_owner_keeps_its_pending_group() {
        let mut s = cluster(&["a"]);
        let mut p = pg("p", vec![Resources::new().with(GPU, 9.0)], Strategy::Pack);
        p.owner = Some("o".into());
        s.pgs.insert("p".into(), p);
        s.owners.insert("o".into());
        assert!(reconcile(&s, 1.0, true).is_empty());
        s.owners.clear();
        let ch = reconcile(&s, 2.0, true);
        assert_eq!(ch.pgs["p"].state, PgState::Removed, "pending ones go too");
    }

    #[test]
    fn non_restartable_actor_dies_with_its_node() {
        let mut s = cluster(&["a"]);
        s.actors.insert("x".into(), actor("x", None, 0, 1.0, 0));
        let ch = reconcile(&s, 1.0, true);
        apply(&mut s, ch);
        assert_eq!(s.actors["x"].node_id.as_deref(), Some("a"));
        s.live.clear();
        let ch = reconcile(&s, 2.0, true);
        apply(&mut s, ch);
        assert_eq!(s.actors["x"].state, ActorState::Dead);
        assert!(s.actors["x"]
            .death_cause
            .as_deref()
            .unwrap()
            .contains("died"));
    }

    #[test]
    fn two_groups_in_one_pass_do_not_double_book() {
        let mut s = cluster(&["a"]);
        for id in ["p1", "p2"] {
            s.pgs.insert(
                id.into(),
                pg(id, vec![Resources::new().with(GPU, 2.0)], Strategy::Pack),
            );
        }
        let ch = reconcile(&s, 1.0, true);
        apply(&mut s, ch);
        let created = s
            .pgs
            .values()
            .filter(|p| p.state == PgState::Created)
            .count();
        assert_eq!(created, 1);
    }

    #[test]
    fn old_removed_and_dead_records_expire() {
        let mut s = cluster(&["a"]);
        let mut p = pg("p", vec![Resources::new().with(GPU, 1.0)], Strategy::Pack);
        p.state = PgState::Removed;
        p.ended_at = Some(0.0);
        s.pgs.insert("p".into(), p);
        let mut young = actor("young", None, 0, 0.0, 0);
        young.state = ActorState::Dead;
        young.ended_at = Some(RETAIN_S);
        s.actors.insert("young".into(), young);
        let key = |k: &str, id: &str| format!("{k}/{id}");
        assert_eq!(expired(&key, &s, RETAIN_S + 1.0), vec!["pgs/p".to_string()]);
        assert!(expired(&key, &s, 1.0).is_empty());
    }
}
