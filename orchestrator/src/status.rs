//! `orchestrator status`: a report built from a snapshot, rendered in Ray's
//! `ray status` layout or as JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::events::{self, Event};
use crate::resources::{fmt_amount, fmt_bytes, to_float, Resources, MEMORY};
use crate::state::{ActorState, NodeState, PgState, Snapshot};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeLine {
    pub id: String,
    pub ip: String,
    pub is_head: bool,
    pub total: Resources,
    pub used: Resources,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    pub id: String,
    pub ip: String,
    pub died_at: f64,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    pub name: String,
    pub used: u64,
    pub total: u64,
    pub pg_reserved: u64,
    pub pg_used: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub time: f64,
    pub leader: Option<String>,
    pub active: Vec<NodeLine>,
    pub failures: Vec<Failure>,
    pub usage: Vec<Usage>,
    pub demands: Vec<String>,
    /// Newest first.
    #[serde(default)]
    pub events: Vec<Event>,
}

/// Failures older than this drop out of "Recent failures".
const RECENT_S: f64 = 3600.0;

pub fn report(s: &Snapshot, now: f64) -> Report {
    let views: BTreeMap<String, _> = s
        .node_views()
        .into_iter()
        .map(|v| (v.id.clone(), v))
        .collect();
    let mut active = Vec::new();
    let mut total = Resources::new();
    let mut used = Resources::new();
    for n in s.alive_nodes() {
        let mut u = n.total.clone();
        if let Some(v) = views.get(&n.id) {
            u.sub(&v.avail);
        }
        total.add(&n.total);
        used.add(&u);
        active.push(NodeLine {
            id: n.id.clone(),
            ip: n.ip.clone(),
            is_head: n.is_head,
            total: n.total.clone(),
            used: u,
        });
    }
    active.sort_by(|a, b| (!a.is_head, &a.ip, &a.id).cmp(&(!b.is_head, &b.ip, &b.id)));
    let mut pg_reserved = Resources::new();
    for pg in s.pgs.values().filter(|p| p.holds_resources()) {
        for (b, a) in pg.bundles.iter().zip(&pg.assignments) {
            if a.as_ref().is_some_and(|a| views.contains_key(&a.node_id)) {
                pg_reserved.add(b);
            }
        }
    }
    let mut pg_used = Resources::new();
    for a in s.actors.values() {
        if a.holds_resources() && a.spec.placement_group.is_some() {
            pg_used.add(&a.spec.resources);
        }
    }
    let mut failures: Vec<Failure> = s
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Dead && n.died_at.is_some_and(|t| now - t < RECENT_S))
        .map(|n| Failure {
            id: n.id.clone(),
            ip: n.ip.clone(),
            died_at: n.died_at.unwrap_or(0.0),
            reason: n.death_reason.clone().unwrap_or_default(),
        })
        .collect();
    failures.sort_by(|a, b| b.died_at.total_cmp(&a.died_at));
    let usage = total
        .0
        .iter()
        .map(|(k, t)| Usage {
            name: k.clone(),
            used: used.get(k),
            total: *t,
            pg_reserved: pg_reserved.get(k),
            pg_used: pg_used.get(k),
        })
        .collect();
    let mut demands = Vec::new();
    let mut pgs: Vec<_> = s
        .pgs
        .values()
        .filter(|p| matches!(p.state, PgState::Pending | PgState::Rescheduling))
        .collect();
    pgs.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
    for pg in pgs {
        let missing: Vec<String> = pg
            .bundles
            .iter()
            .zip(&pg.assignments)
            .filter(|(_, a)| a.is_none())
            .map(|(b, _)| b.shape())
            .collect();
        demands.push(format!(
            "{} ({}): 1+ pending placement groups [{}]",
            group_shapes(&missing),
            pg.strategy,
            pg.id
        ));
    }
    let mut waiting: BTreeMap<String, usize> = BTreeMap::new();
    for a in s.actors.values() {
        if a.state != ActorState::Dead && a.node_id.is_none() {
            *waiting.entry(a.spec.resources.shape()).or_default() += 1;
        }
    }
    for (shape, n) in waiting {
        demands.push(format!("{shape}: {n}+ pending tasks/actors"));
    }
    Report {
        time: now,
        leader: s.leader.clone(),
        active,
        failures,
        usage,
        demands,
        events: s
            .events
            .values()
            .rev()
            .take(events::SHOWN)
            .cloned()
            .collect(),
    }
}

/// `{"GPU": 1.0} * 2, {"CPU": 1.0}` as Ray groups equal bundles.
fn group_shapes(shapes: &[String]) -> String {
    let mut out: Vec<(String, usize)> = Vec::new();
    for s in shapes {
        match out.last_mut() {
            Some((last, n)) if last == s => *n += 1,
            _ => out.push((s.clone(), 1)),
        }
    }
    out.iter()
        .map(|(s, n)| {
            if *n > 1 {
                format!("{s} * {n}")
            } else {
                s.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn usage_line(name: &str, used: u64, total: u64) -> String {
    if name == MEMORY {
        format!(
            "{}/{} {name}",
            fmt_bytes(to_float(used)),
            fmt_bytes(to_float(total))
        )
    } else {
        format!("{}/{} {name}", fmt_amount(used), fmt_amount(total))
    }
}

pub fn fmt_time(t: f64) -> String {
    chrono::DateTime::from_timestamp(t as i64, ((t.fract()) * 1e9) as u32)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
        .unwrap_or_default()
}

const RULE: &str = "---------------------------------------------------------------";

pub fn render(r: &Report, verbose: bool) -> String {
    let mut o = String::new();
    o += &format!(
        "======== Autoscaler status: {} ========\n",
        fmt_time(r.time)
    );
    o += &format!("Node status\n{RULE}\nActive:\n");
    if r.active.is_empty() {
        o += " (no active nodes)\n";
    }
    for n in &r.active {
        let head = if n.is_head { ", head" } else { "" };
        o += &format!(" 1 {} ({}{head})\n", n.id, n.ip);
    }
    o += "Pending:\n (no pending nodes)\nRecent failures:\n";
    if r.failures.is_empty() {
        o += " (no failures)\n";
    }
    for f in &r.failures {
        o += &format!(
            " {}: NodeTerminated (ip: {}) at {}: {}\n",
            f.id,
            f.ip,
            fmt_time(f.died_at),
            f.reason
        );
    }
    o += &format!("\nResources\n{RULE}\nUsage:\n");
    // Ray's order: CPU, GPU, memory, then the rest.
    let rank = |n: &str| match n {
        "CPU" => 0,
        "GPU" => 1,
        "memory" => 2,
        _ => 3,
    };
    // As `ray status`: node:<ip> resources sum to nothing meaningful over
    // the cluster; they show per node under --verbose.
    let mut usage: Vec<&Usage> = r
        .usage
        .iter()
        .filter(|u| !u.name.starts_with(crate::resources::NODE_PREFIX))
        .collect();
    usage.sort_by(|a, b| (rank(&a.name), &a.name).cmp(&(rank(&b.name), &b.name)));
    for u in usage {
        let mut line = usage_line(&u.name, u.used, u.total);
        if u.pg_reserved > 0 {
            if u.name == MEMORY {
                line += &format!(
                    " ({} used of {} reserved in placement groups)",
                    fmt_bytes(to_float(u.pg_used)),
                    fmt_bytes(to_float(u.pg_reserved))
                );
            } else {
                line += &format!(
                    " ({} used of {} reserved in placement groups)",
                    fmt_amount(u.pg_used),
                    fmt_amount(u.pg_reserved)
                );
            }
        }
        o += &format!(" {line}\n");
    }
    o += "\nPending Demands:\n";
    if r.demands.is_empty() {
        o += " (no resource demands)\n";
    }
    for d in &r.demands {
        o += &format!(" {d}\n");
    }
    o += "\nRecent events:\n";
    if r.events.is_empty() {
        o += " (no events)\n";
    }
    for e in &r.events {
        o += &format!(" {} {}: {}\n", fmt_time(e.time), e.kind, e.message);
    }
    if verbose {
        for n in &r.active {
            o += &format!("\nNode: {} ({})\n Usage:\n", n.id, n.ip);
            for (k, t) in &n.total.0 {
                o += &format!("  {}\n", usage_line(k, n.used.get(k), *t));
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{Assignment, GpuShare, Strategy};
    use crate::resources::{GPU, UNIT};
    use crate::state::{NodeRecord, PgRecord};

    fn node(id: &str, ip: &str, gpus: u32, state: NodeState) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            ip: ip.into(),
            agent_address: String::new(),
            is_head: id == "h",
            total: Resources::new()
                .with(GPU, gpus as f64)
                .with("CPU", 4.0)
                .with(MEMORY, 1024.0 * 1024.0 * 1024.0)
                .with(&crate::resources::node_resource(ip), 1.0),
            gpu_ids: (0..gpus).collect(),
            gpu_model: None,
            gpu_memory_bytes: 0,
            state,
            started_at: 0.0,
            died_at: (state == NodeState::Dead).then_some(90.0),
            death_reason: Some("node agent lease expired".into()),
        }
    }

    #[test]
    fn ray_layout() {
        let mut s = Snapshot::default();
        s.nodes
            .insert("h".into(), node("h", "127.0.0.1", 2, NodeState::Alive));
        s.nodes
            .insert("a".into(), node("a", "127.0.0.2", 2, NodeState::Alive));
        s.nodes
            .insert("d".into(), node("d", "127.0.0.3", 2, NodeState::Dead));
        s.live.extend(["h".to_string(), "a".to_string()]);
        s.pgs.insert(
            "pg1".into(),
            PgRecord {
                id: "pg1".into(),
                name: String::new(),
                bundles: vec![Resources::new().with(GPU, 1.0); 2],
                strategy: Strategy::Pack,
                state: crate::state::PgState::Created,
                assignments: vec![
                    Some(Assignment {
                        node_id: "h".into(),
                        gpus: vec![GpuShare { id: 0, share: UNIT }],
                    }),
                    Some(Assignment {
                        node_id: "h".into(),
                        gpus: vec![GpuShare { id: 1, share: UNIT }],
                    }),
                ],
                created_at: 0.0,
                ended_at: None,
                owner: None,
            },
        );
        s.pgs.insert(
            "pg2".into(),
            PgRecord {
                id: "pg2".into(),
                name: String::new(),
                bundles: vec![Resources::new().with(GPU, 2.0); 2],
                strategy: Strategy::StrictPack,
                state: crate::state::PgState::Pending,
                assignments: vec![None, None],
                created_at: 1.0,
                ended_at: None,
                owner: None,
            },
        );
        for (k, t) in [("0001", 1.0), ("0002", 2.0)] {
            s.events.insert(
                k.into(),
                Event::new(
                    t,
                    crate::events::EventKind::NodeLost,
                    "d",
                    format!("node d lost at {t}"),
                ),
            );
        }
        let r = report(&s, 100.0);
        assert_eq!(r.active.len(), 2);
        assert_eq!(r.events[0].time, 2.0, "newest first");
        assert_eq!(r.failures.len(), 1);
        let text = render(&r, true);
        assert!(
            text.contains(" 2.0/4.0 GPU (0.0 used of 2.0 reserved in placement groups)\n"),
            "{text}"
        );
        assert!(text.contains(" 0.0/8.0 CPU\n"), "{text}");
        assert!(text.contains(" 0B/2.00GiB memory\n"), "{text}");
        assert!(text.contains("d: NodeTerminated (ip: 127.0.0.3)"), "{text}");
        assert!(
            text.contains("{\"GPU\": 2.0} * 2 (STRICT_PACK): 1+ pending placement groups"),
            "{text}"
        );
        assert!(text.contains("Node: a (127.0.0.2)"), "{text}");
        assert!(!text.contains("\n 0.0/1.0 node:"), "cluster-wide: {text}");
        assert!(
            text.contains("\n  0.0/1.0 node:127.0.0.2\n"),
            "per node: {text}"
        );
        assert!(
            text.contains(
                "Recent events:\n 1970-01-01 00:00:02.000000 NODE_LOST: node d lost at 2\n"
            ),
            "{text}"
        );
        let ai = text.find("Active:").unwrap();
        let ri = text.find("Resources").unwrap();
        let di = text.find("Pending Demands:").unwrap();
        assert!(ai < ri && ri < di);
    }
}
