//! Cluster events for `status` ("Recent events"): what the leader and the
//! node agents decided about failures, and why. Kept in etcd under
//! `events/`, one key per event, named by time so a prefix read is
//! chronological; the leader forgets old ones.

use crate::reconcile::Changes;
use crate::state::{ActorState, NodeState, PgState, Snapshot};
// The event records live with the other records; the rules that make and
// expire them live here.
pub use crate::state::{Event, EventKind};

/// How many events are kept, and for how long.
pub const KEEP: usize = 200;
pub const KEEP_S: f64 = 3600.0;
/// How many `status` shows.
pub const SHOWN: usize = 20;

/// The events one reconcile decision makes: nodes declared dead and what
/// that did to their actors and placement groups.
pub fn from_changes(snap: &Snapshot, ch: &Changes, now: f64) -> Vec<Event> {
    let mut out = Vec::new();
    for n in ch.nodes.values() {
        let was_alive = snap
            .nodes
            .get(&n.id)
            .is_some_and(|b| b.state == NodeState::Alive);
        if was_alive && n.state == NodeState::Dead {
            out.push(Event::new(
                now,
                EventKind::NodeLost,
                &n.id,
                format!(
                    "node {} ({}) declared dead: {} while etcd was healthy",
                    n.id,
                    n.ip,
                    n.death_reason.as_deref().unwrap_or("its lease expired")
                ),
            ));
        }
    }
    for p in ch.pgs.values() {
        let before = snap.pgs.get(&p.id).map(|b| b.state);
        if p.state == PgState::Removed && before.is_some_and(|b| b != PgState::Removed) {
            let owner = p.owner.as_deref().unwrap_or("-");
            let named = if p.name.is_empty() {
                String::new()
            } else {
                format!(" ({})", p.name)
            };
            out.push(Event::new(
                now,
                EventKind::PlacementGroupRemoved,
                &p.id,
                format!(
                    "placement group {}{named} removed: its owner is gone (owner {owner} stopped refreshing its lease while etcd was healthy)",
                    p.id
                ),
            ));
        }
        if p.state == PgState::Rescheduling && before != Some(PgState::Rescheduling) {
            out.push(Event::new(
                now,
                EventKind::PlacementGroupRescheduling,
                &p.id,
                format!(
                    "placement group {} lost bundles with a dead node; placing them again",
                    p.id
                ),
            ));
        }
    }
    for a in ch.actors.values() {
        let was_live = snap
            .actors
            .get(&a.id)
            .is_some_and(|b| b.state != ActorState::Dead);
        if was_live
            && a.state == ActorState::Dead
            && a.death_cause.as_deref() == Some(crate::reconcile::ACTOR_OWNER_GONE)
        {
            let named = if a.name.is_empty() {
                String::new()
            } else {
                format!(" ({})", a.name)
            };
            out.push(Event::new(
                now,
                EventKind::ActorDied,
                &a.id,
                format!(
                    "actor {}{named} killed: its owner is gone (owner {} stopped refreshing its lease while etcd was healthy)",
                    a.id,
                    a.owner.as_deref().unwrap_or("-")
                ),
            ));
            continue;
        }
        let Some(old_node) = snap.actors.get(&a.id).and_then(|b| b.node_id.clone()) else {
            continue;
        };
        let moved_off = a.node_id.as_deref() != Some(old_node.as_str());
        if !moved_off {
            continue;
        }
        let node_dead = ch
            .nodes
            .get(&old_node)
            .or_else(|| snap.nodes.get(&old_node))
            .is_none_or(|n| n.state == NodeState::Dead);
        let (kind, what) = match a.state {
            ActorState::Dead => (EventKind::ActorDied, "died (no restarts left)".to_string()),
            _ => (
                EventKind::ActorRestarted,
                format!(
                    "restarts (restart {}) at incarnation {}",
                    a.restarts, a.incarnation
                ),
            ),
        };
        if a.state == ActorState::Dead && !node_dead {
            continue; // removed with its placement group: not a failure
        }
        let why = if node_dead {
            format!("its node {old_node} died")
        } else {
            format!("its bundle moved off node {old_node}")
        };
        out.push(Event::new(
            now,
            kind,
            &a.id,
            format!("actor {} {what}: {why}", a.id),
        ));
    }
    out
}

/// Keys (suffixes) of events to forget: older than `KEEP_S`, or beyond the
/// newest `KEEP`. `suffixes` are in key (= time) order.
pub fn expired<'a>(
    events: impl DoubleEndedIterator<Item = (&'a String, &'a Event)>,
    now: f64,
) -> Vec<String> {
    let mut out = Vec::new();
    for (i, (k, e)) in events.rev().enumerate() {
        if i >= KEEP || now - e.time > KEEP_S {
            out.push(k.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::reconcile;
    use crate::resources::Resources;
    use crate::state::{ActorRecord, ActorSpec, NodeRecord};

    fn node(id: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            ip: "10.0.0.1".into(),
            agent_address: String::new(),
            is_head: false,
            total: Resources::new().with("CPU", 4.0),
            gpu_ids: vec![],
            gpu_model: None,
            gpu_memory_bytes: 0,
            state: NodeState::Alive,
            started_at: 0.0,
            died_at: None,
            death_reason: None,
        }
    }

    fn actor(id: &str, max_restarts: i64) -> ActorRecord {
        ActorRecord {
            state: ActorState::Alive,
            node_id: Some("a".into()),
            incarnation: 1,
            started_incarnation: 1,
            pid: Some(1),
            ..ActorRecord::new(
                id.into(),
                String::new(),
                ActorSpec {
                    command: "true".into(),
                    args: vec![],
                    env: Default::default(),
                    resources: Resources::new().with("CPU", 1.0),
                    placement_group: None,
                    bundle_index: None,
                    max_restarts,
                },
                None,
                0.0,
            )
        }
    }

    #[test]
    fn a_lost_node_names_itself_and_its_actors() {
        let mut s = Snapshot::default();
        s.nodes.insert("a".into(), node("a"));
        s.nodes.insert("b".into(), node("b"));
        s.live.insert("b".into());
        s.actors.insert("keep".into(), actor("keep", -1));
        s.actors.insert("once".into(), actor("once", 0));
        let ch = reconcile(&s, 10.0, true);
        let ev = from_changes(&s, &ch, 10.0);
        let kinds: Vec<(EventKind, &str)> =
            ev.iter().map(|e| (e.kind, e.subject.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (EventKind::NodeLost, "a"),
                (EventKind::ActorRestarted, "keep"),
                (EventKind::ActorDied, "once")
            ]
        );
        assert!(ev[0].message.contains("while etcd was healthy"), "{ev:?}");
        assert!(ev[1].message.contains("its node a died"), "{ev:?}");
        // Nothing happened: no events.
        assert!(from_changes(&s, &Changes::default(), 10.0).is_empty());
        assert!(from_changes(&s, &reconcile(&s, 10.0, false), 10.0).is_empty());
    }

    #[test]
    fn old_and_surplus_events_expire() {
        let mut m = std::collections::BTreeMap::new();
        for i in 0..(KEEP + 3) {
            let e = Event::new(5000.0 + i as f64, EventKind::NodeLost, "n", String::new());
            m.insert(format!("{i:05}"), e);
        }
        let old = Event::new(0.0, EventKind::NodeLost, "n", String::new());
        m.insert("00000-old".into(), old);
        let gone = expired(m.iter(), 5000.0 + KEEP as f64);
        assert_eq!(gone.len(), 4, "{gone:?}");
        assert!(gone.contains(&"00000-old".to_string()));
        assert!(gone.contains(&"00000".to_string()));
        assert!(!gone.contains(&format!("{:05}", KEEP + 2)));
        assert_eq!(EventKind::ActorFenced.to_string(), "ACTOR_FENCED");
    }

    #[test]
    fn an_orphaned_group_is_an_event_and_its_actors_are_not_failures() {
        let mut s = Snapshot::default();
        s.nodes.insert("a".into(), node("a"));
        s.live.insert("a".into());
        s.pgs.insert(
            "pg".into(),
            crate::state::PgRecord {
                id: "pg".into(),
                name: "gw".into(),
                bundles: vec![Resources::new().with("CPU", 1.0)],
                strategy: crate::placement::Strategy::Pack,
                state: PgState::Created,
                assignments: vec![Some(crate::placement::Assignment {
                    node_id: "a".into(),
                    gpus: vec![],
                })],
                created_at: 0.0,
                ended_at: None,
                owner: Some("owner_1".into()),
            },
        );
        let mut a = actor("w", 0);
        a.spec.placement_group = Some("pg".into());
        a.spec.bundle_index = Some(0);
        s.actors.insert("w".into(), a);
        let ch = reconcile(&s, 10.0, true);
        let ev = from_changes(&s, &ch, 10.0);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].kind, EventKind::PlacementGroupRemoved);
        assert!(
            ev[0]
                .message
                .contains("placement group pg (gw) removed: its owner is gone"),
            "{ev:?}"
        );
        assert!(ev[0].message.contains("owner_1"), "{ev:?}");
    }

    #[test]
    fn an_actor_killed_with_its_owner_is_an_event() {
        let mut s = Snapshot::default();
        s.nodes.insert("a".into(), node("a"));
        s.live.insert("a".into());
        let mut a = actor("w", 0);
        a.name = "gw-rank0".into();
        a.owner = Some("owner_2".into());
        s.actors.insert("w".into(), a);
        let ch = reconcile(&s, 10.0, true);
        let ev = from_changes(&s, &ch, 10.0);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].kind, EventKind::ActorDied);
        assert!(
            ev[0]
                .message
                .contains("actor w (gw-rank0) killed: its owner is gone (owner owner_2"),
            "{ev:?}"
        );
        // While the owner lives, nothing.
        s.owners.insert("owner_2".into());
        assert!(from_changes(&s, &reconcile(&s, 11.0, true), 11.0).is_empty());
    }
}
