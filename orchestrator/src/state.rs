//! The records kept in etcd (JSON) and the pure views derived from them.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::placement::{Assignment, GpuShare, NodeView, Strategy};
use crate::resources::Resources;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NodeState {
    Alive,
    Dead,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub ip: String,
    /// The node agent's gRPC address (logs).
    pub agent_address: String,
    pub is_head: bool,
    pub total: Resources,
    pub gpu_ids: Vec<u32>,
    #[serde(default)]
    pub gpu_model: Option<String>,
    #[serde(default)]
    pub gpu_memory_bytes: u64,
    pub state: NodeState,
    pub started_at: f64,
    #[serde(default)]
    pub died_at: Option<f64>,
    #[serde(default)]
    pub death_reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PgState {
    Pending,
    Created,
    Rescheduling,
    Removed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PgRecord {
    pub id: String,
    pub name: String,
    pub bundles: Vec<Resources>,
    pub strategy: Strategy,
    pub state: PgState,
    /// Per bundle: where it is reserved, if anywhere.
    pub assignments: Vec<Option<Assignment>>,
    pub created_at: f64,
    /// When it was removed; the leader forgets it some time later.
    #[serde(default)]
    pub ended_at: Option<f64>,
    /// The owner (see `OwnerRecord`) whose death removes this group; None:
    /// it stays until removed (created by the CLI, say).
    #[serde(default)]
    pub owner: Option<String>,
}

impl PgRecord {
    /// Whether its reservations count against node capacity.
    pub fn holds_resources(&self) -> bool {
        matches!(self.state, PgState::Created | PgState::Rescheduling)
    }
}

/// A client process that owns placement groups (Ray's non-detached
/// lifetime). Stored under `owners/ID` on an etcd lease the owner keeps
/// alive through the head: the key existing is what "alive" means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub id: String,
    pub name: String,
    pub ttl_s: u64,
    pub registered_at: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ActorState {
    PendingCreation,
    Alive,
    Restarting,
    Dead,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorSpec {
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    pub placement_group: Option<String>,
    pub bundle_index: Option<usize>,
    /// -1: restart forever.
    pub max_restarts: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorRecord {
    pub id: String,
    pub name: String,
    pub spec: ActorSpec,
    pub state: ActorState,
    /// Set by the reconciler; the node agent of that node runs it.
    pub node_id: Option<String>,
    pub gpus: Vec<GpuShare>,
    /// Bumped on every (re)start request, so an agent can tell a new
    /// incarnation from the one it already runs.
    pub incarnation: u64,
    /// The incarnation the agent last started.
    pub started_incarnation: u64,
    pub pid: Option<u32>,
    pub restarts: i64,
    pub exit_code: Option<i32>,
    pub log_path: Option<String>,
    pub death_cause: Option<String>,
    pub created_at: f64,
    /// When it died; the leader forgets it some time later.
    #[serde(default)]
    pub ended_at: Option<f64>,
    /// The owner (see `OwnerRecord`) whose death kills this actor (a
    /// gateway's workers die with the gateway, whoever owns the group they
    /// run in); None: it lives until killed or its group is removed.
    #[serde(default)]
    pub owner: Option<String>,
}

impl ActorRecord {
    /// A new actor, pending creation: not placed, never started.
    pub fn new(
        id: String,
        name: String,
        spec: ActorSpec,
        owner: Option<String>,
        created_at: f64,
    ) -> Self {
        Self {
            id,
            name,
            spec,
            state: ActorState::PendingCreation,
            node_id: None,
            gpus: Vec::new(),
            incarnation: 0,
            started_incarnation: 0,
            pid: None,
            restarts: 0,
            exit_code: None,
            log_path: None,
            death_cause: None,
            created_at,
            ended_at: None,
            owner,
        }
    }

    pub fn holds_resources(&self) -> bool {
        self.state != ActorState::Dead && self.node_id.is_some()
    }

    pub fn can_restart(&self) -> bool {
        self.spec.max_restarts < 0 || self.restarts < self.spec.max_restarts
    }
}

/// What a cluster event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    /// A node was declared dead (silent while etcd was healthy).
    NodeLost,
    /// A node registered again under its id (lease lapsed, or it returned
    /// after being declared dead).
    NodeRecovered,
    /// An actor restarts elsewhere because its node died.
    ActorRestarted,
    /// An actor that may not restart died with its node.
    ActorDied,
    /// A returning node stopped a superseded copy of an actor.
    ActorFenced,
    /// A restarted agent took back an actor process it found running.
    ActorAdopted,
    /// A placement group lost bundles with a node and is placed again.
    PlacementGroupRescheduling,
    /// The leader removed a placement group (and its actors) because its
    /// owner is gone.
    PlacementGroupRemoved,
    /// A head could not reach etcd for a while.
    EtcdUnreachable,
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// A cluster event (`status`'s "Recent events"), one key under `events/`;
/// `events` makes and expires them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time: f64,
    pub kind: EventKind,
    /// The node, actor, placement group or head concerned.
    pub subject: String,
    pub message: String,
}

impl Event {
    pub fn new(time: f64, kind: EventKind, subject: &str, message: String) -> Self {
        Event {
            time,
            kind,
            subject: subject.to_string(),
            message,
        }
    }

    /// The key suffix under `events/`: time first, so keys sort by time.
    pub fn key_suffix(&self) -> String {
        let u = uuid::Uuid::new_v4().simple().to_string();
        format!("{:016}-{}", (self.time * 1000.0) as u64, &u[..8])
    }
}

/// Everything under the cluster prefix, read at one etcd revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: i64,
    /// mod_revision of the allocation guard key (0 when absent).
    pub alloc_rev: i64,
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Node ids whose lease-bound liveness key exists.
    pub live: BTreeSet<String>,
    pub pgs: BTreeMap<String, PgRecord>,
    pub actors: BTreeMap<String, ActorRecord>,
    /// Owner ids whose lease-bound key exists.
    pub owners: BTreeSet<String>,
    /// mod_revision of every record key, for compare-and-swap writes.
    pub mod_revs: BTreeMap<String, i64>,
    pub leader: Option<String>,
    pub heads: Vec<String>,
    /// Recent events by key suffix (time-ordered).
    pub events: BTreeMap<String, Event>,
}

impl Snapshot {
    pub fn alive_nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes
            .values()
            .filter(|n| n.state == NodeState::Alive && self.live.contains(&n.id))
    }

    /// Free capacity of every live node after PG reservations and actors
    /// placed outside placement groups.
    pub fn node_views(&self) -> Vec<NodeView> {
        let mut views: BTreeMap<&str, NodeView> = self
            .alive_nodes()
            .map(|n| {
                (
                    n.id.as_str(),
                    NodeView::idle(&n.id, n.total.clone(), n.gpu_ids.clone()),
                )
            })
            .collect();
        for pg in self.pgs.values().filter(|p| p.holds_resources()) {
            for (b, a) in pg.bundles.iter().zip(&pg.assignments) {
                if let Some(a) = a {
                    if let Some(v) = views.get_mut(a.node_id.as_str()) {
                        v.take(b, &a.gpus);
                    }
                }
            }
        }
        for a in self.actors.values() {
            if a.holds_resources() && a.spec.placement_group.is_none() {
                if let Some(v) = views.get_mut(a.node_id.as_deref().unwrap_or_default()) {
                    v.take(&a.spec.resources, &a.gpus);
                }
            }
        }
        views.into_values().collect()
    }

    /// What is left of one bundle after the actors already placed in it.
    pub fn bundle_free(&self, pg_id: &str, index: usize) -> Option<Resources> {
        let pg = self.pgs.get(pg_id)?;
        let mut free = pg.bundles.get(index)?.clone();
        for a in self.actors.values() {
            if a.holds_resources()
                && a.spec.placement_group.as_deref() == Some(pg_id)
                && a.spec.bundle_index == Some(index)
            {
                free.sub(&a.spec.resources);
            }
        }
        Some(free)
    }

    pub fn find_pg(&self, name_or_id: &str) -> Option<&PgRecord> {
        self.pgs.get(name_or_id).or_else(|| {
            self.pgs
                .values()
                .filter(|p| p.state != PgState::Removed)
                .find(|p| p.name == name_or_id)
        })
    }

    pub fn find_actor(&self, name_or_id: &str) -> Option<&ActorRecord> {
        self.actors.get(name_or_id).or_else(|| {
            // A name may be reused after its actor died: prefer the live one.
            let mut named: Vec<&ActorRecord> = self
                .actors
                .values()
                .filter(|a| !a.name.is_empty() && a.name == name_or_id)
                .collect();
            named.sort_by(|a, b| {
                (a.state != ActorState::Dead, a.created_at)
                    .partial_cmp(&(b.state != ActorState::Dead, b.created_at))
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            named.last().copied()
        })
    }
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub fn new_id(prefix: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &u[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{GPU, UNIT};

    fn node(id: &str, gpus: u32) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            ip: "127.0.0.1".into(),
            agent_address: String::new(),
            is_head: false,
            total: Resources::new().with(GPU, gpus as f64),
            gpu_ids: (0..gpus).collect(),
            gpu_model: None,
            gpu_memory_bytes: 0,
            state: NodeState::Alive,
            started_at: 0.0,
            died_at: None,
            death_reason: None,
        }
    }

    #[test]
    fn views_subtract_reservations_of_live_nodes_only() {
        let mut s = Snapshot::default();
        s.nodes.insert("a".into(), node("a", 2));
        s.nodes.insert("b".into(), node("b", 2));
        s.live.insert("a".into());
        s.pgs.insert(
            "pg".into(),
            PgRecord {
                id: "pg".into(),
                name: String::new(),
                bundles: vec![Resources::new().with(GPU, 0.5)],
                strategy: Strategy::Pack,
                state: PgState::Created,
                assignments: vec![Some(Assignment {
                    node_id: "a".into(),
                    gpus: vec![GpuShare { id: 1, share: 5000 }],
                })],
                created_at: 0.0,
                ended_at: None,
                owner: None,
            },
        );
        let v = s.node_views();
        assert_eq!(v.len(), 1, "b has no liveness key");
        assert_eq!(v[0].avail.get(GPU), UNIT + 5000);
        assert_eq!(v[0].gpu_free, vec![UNIT, 5000]);
        assert_eq!(s.bundle_free("pg", 0).unwrap().get(GPU), 5000);
        assert!(s.bundle_free("pg", 1).is_none());
    }
}
