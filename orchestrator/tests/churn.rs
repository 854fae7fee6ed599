//! Churn: 20 node agents (real processes on 127.0.0.10-29) join and leave,
//! by clean stops and kill -9, while placement groups are created and
//! removed through the CLI; afterwards the books must balance.
//!
//! Duration: FLOTILLA_CHURN_SECS (default 120 s, 30 s when CI is set).
//! The full run: `FLOTILLA_CHURN_SECS=120 cargo test -p flotilla-orchestrator
//! --test churn -- --nocapture`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{wait_until, Cluster};
use runtime::envs;

const AGENTS: usize = 20;
const GPUS: u32 = 2;

/// A small deterministic generator (xorshift), so a failing run can be
/// repeated with the same sequence of joins, leaves and groups.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn churn_secs() -> u64 {
    match envs::get::<u64>(envs::FLOTILLA_CHURN_SECS) {
        Ok(Some(s)) => s,
        Ok(None) if envs::flag(envs::CI) => 30,
        Ok(None) => 120,
        Err(e) => panic!("{e}"),
    }
}

fn res(v: &serde_json::Value) -> BTreeMap<String, u64> {
    serde_json::from_value(v.clone()).unwrap_or_default()
}

fn add(into: &mut BTreeMap<String, u64>, r: &BTreeMap<String, u64>) {
    for (k, v) in r {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Marks a problem that must never show, even mid-churn (the others may
/// while the leader catches up with a node that just died or left).
const ALWAYS: &str = "[always] ";

/// The books, from `list nodes`, `list placement-groups` and `status`:
/// every problem found, or none.
fn audit(c: &Cluster) -> Vec<String> {
    let nodes = c.nodes();
    let pgs = c.pgs();
    let status = c.json(&["status"]);
    let mut bad = Vec::new();
    let alive: BTreeMap<String, &serde_json::Value> = nodes
        .iter()
        .filter(|n| n["alive"] == true)
        .map(|n| (n["id"].as_str().unwrap().to_string(), n))
        .collect();
    // What the live groups reserve, node by node, and GPU by GPU.
    let mut reserved: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut gpu: BTreeMap<(String, u64), u64> = BTreeMap::new();
    let mut names = BTreeSet::new();
    for pg in &pgs {
        let state = pg["state"].as_str().unwrap();
        if state == "REMOVED" {
            continue;
        }
        let name = pg["name"].as_str().unwrap().to_string();
        if !names.insert(name.clone()) {
            bad.push(format!("{ALWAYS}group name {name} is booked twice"));
        }
        if !matches!(state, "CREATED" | "RESCHEDULING") {
            continue;
        }
        let bundles = pg["bundles"].as_array().unwrap();
        let assigns = pg["assignments"].as_array().unwrap();
        for (b, a) in bundles.iter().zip(assigns) {
            if a.is_null() {
                if state == "CREATED" {
                    bad.push(format!("CREATED group {} has an unplaced bundle", pg["id"]));
                }
                continue;
            }
            let node = a["node_id"].as_str().unwrap().to_string();
            if !alive.contains_key(&node) {
                bad.push(format!(
                    "group {} keeps a bundle on dead node {node}",
                    pg["id"]
                ));
                continue;
            }
            add(reserved.entry(node.clone()).or_default(), &res(b));
            for g in a["gpus"].as_array().unwrap() {
                *gpu.entry((node.clone(), g["id"].as_u64().unwrap()))
                    .or_default() += g["share"].as_u64().unwrap();
            }
        }
    }
    for ((node, id), share) in &gpu {
        let ids = alive[node]["gpu_ids"].as_array().unwrap();
        if !ids.iter().any(|x| x.as_u64() == Some(*id)) {
            bad.push(format!(
                "{ALWAYS}node {node} has no GPU {id}, yet a bundle holds it"
            ));
        }
        if *share > 10_000 {
            bad.push(format!(
                "{ALWAYS}GPU {id} of node {node} is booked {share}/10000"
            ));
        }
    }
    // status: each active node's use is what its bundles reserve, within
    // its total; the cluster totals add up.
    let mut sum_used: BTreeMap<String, u64> = BTreeMap::new();
    let active = status["active"].as_array().unwrap();
    for line in active {
        let id = line["id"].as_str().unwrap().to_string();
        let used = res(&line["used"]);
        let total = res(&line["total"]);
        let want = reserved.remove(&id).unwrap_or_default();
        let nonzero = |m: &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
            m.iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        };
        if nonzero(&used) != nonzero(&want) {
            bad.push(format!(
                "node {id}: status says used {used:?}, its live bundles reserve {want:?}"
            ));
        }
        for (k, v) in &used {
            if *v > total.get(k).copied().unwrap_or(0) {
                bad.push(format!("{ALWAYS}node {id}: {k} used {v} > total {total:?}"));
            }
        }
        add(&mut sum_used, &used);
    }
    for (node, r) in reserved {
        bad.push(format!(
            "bundles reserve {r:?} on node {node}, which status does not list"
        ));
    }
    for u in status["usage"].as_array().unwrap() {
        let k = u["name"].as_str().unwrap();
        let used = u["used"].as_u64().unwrap();
        let want = sum_used.get(k).copied().unwrap_or(0);
        if used != want {
            bad.push(format!(
                "status total {k} used {used} != sum over nodes {want}"
            ));
        }
        // No actors run outside groups here: all use is group reservation.
        if u["pg_reserved"].as_u64().unwrap() != used {
            bad.push(format!(
                "status {k}: pg_reserved {} != used {used}",
                u["pg_reserved"]
            ));
        }
    }
    // Actors sit in their bundles: on the bundle's node, alive once their
    // group is CREATED, gone with their group.
    let by_id: BTreeMap<&str, &serde_json::Value> =
        pgs.iter().map(|p| (p["id"].as_str().unwrap(), p)).collect();
    for a in c.actors() {
        if a["state"] == "DEAD" {
            continue;
        }
        let pg = a["spec"]["placement_group"].as_str().unwrap_or_default();
        let Some(pg) = by_id.get(pg) else {
            bad.push(format!("actor {} in unknown group {pg}", a["id"]));
            continue;
        };
        let held = matches!(pg["state"].as_str(), Some("CREATED" | "RESCHEDULING"));
        if !held {
            bad.push(format!(
                "actor {} outlives its {} group",
                a["id"], pg["state"]
            ));
            continue;
        }
        let bundle = &pg["assignments"][a["spec"]["bundle_index"].as_u64().unwrap() as usize];
        if let Some(node) = a["node_id"].as_str() {
            if !alive.contains_key(node) {
                bad.push(format!("actor {} placed on dead node {node}", a["id"]));
            }
            if bundle["node_id"].as_str() != Some(node) {
                bad.push(format!(
                    "actor {} on {node}, its bundle on {}",
                    a["id"], bundle["node_id"]
                ));
            }
        }
        if pg["state"] == "CREATED" && a["state"] != "ALIVE" {
            bad.push(format!(
                "actor {} is {} in a CREATED group",
                a["id"], a["state"]
            ));
        }
    }
    if active.len() != alive.len() {
        bad.push(format!(
            "status lists {} active nodes, list nodes {} alive",
            active.len(),
            alive.len()
        ));
    }
    bad
}

#[test]
fn agents_churn_while_groups_come_and_go_and_the_books_balance() {
    let _serial = common::serial();
    let secs = churn_secs();
    let mut c = Cluster::new("churn", 31000);
    c.start_head("head", c.head_port, 0);
    wait_until(Duration::from_secs(20), "the head's node", || {
        c.alive_nodes() == 1
    });
    let ip = |i: usize| format!("127.0.0.{}", 10 + i);
    // Slot i: the index in c.procs of the agent running now, if any.
    let mut slots: Vec<Option<usize>> = vec![None; AGENTS];
    for (i, slot) in slots.iter_mut().enumerate() {
        *slot = Some(c.start_node(&format!("a{i}-0"), &ip(i), GPUS));
    }
    wait_until(Duration::from_secs(60), "all agents", || {
        c.alive_nodes() == AGENTS + 1
    });

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut groups: Vec<String> = Vec::new();
    let mut generation = [0usize; AGENTS];
    let (mut joins, mut stops, mut kills) = (0, 0, 0);
    let (mut created, mut pending, mut infeasible, mut removed) = (0, 0, 0, 0);
    let mut actors = 0;
    let t = Instant::now();
    let mut seq = 0;
    let mut audits = 0;
    while t.elapsed() < Duration::from_secs(secs) {
        match rng.below(10) {
            0..=2 => {
                let i = rng.below(AGENTS);
                match slots[i] {
                    None => {
                        generation[i] += 1;
                        let name = format!("a{i}-{}", generation[i]);
                        slots[i] = Some(c.start_node(&name, &ip(i), GPUS));
                        joins += 1;
                    }
                    Some(p) if rng.below(2) == 0 => {
                        // A clean stop: the node leaves at once.
                        unsafe { libc::kill(c.procs[p].pid() as i32, libc::SIGTERM) };
                        slots[i] = None;
                        stops += 1;
                    }
                    Some(p) => {
                        // A crash: the node goes silent, dead within the TTL.
                        c.procs[p].kill9();
                        slots[i] = None;
                        kills += 1;
                    }
                }
            }
            3..=6 => {
                seq += 1;
                let name = format!("g{seq}");
                let n = 1 + rng.below(3);
                let shapes = [
                    r#"{"GPU":1}"#,
                    r#"{"GPU":0.5}"#,
                    r#"{"CPU":1}"#,
                    r#"{"GPU":1,"CPU":2}"#,
                ];
                let bundles: Vec<&str> = (0..n).map(|_| shapes[rng.below(shapes.len())]).collect();
                let strategy = ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"][rng.below(4)];
                let out = c.cli_raw(&[
                    "placement-group",
                    "create",
                    "--bundles",
                    &format!("[{}]", bundles.join(",")),
                    "--strategy",
                    strategy,
                    "--name",
                    &name,
                    "--timeout",
                    "0.3",
                ]);
                let err = String::from_utf8_lossy(&out.stderr);
                if out.status.success() {
                    created += 1;
                    if rng.below(2) == 0 {
                        // An actor in its first bundle, restarted wherever
                        // the bundle goes; it must move with it.
                        let pg = String::from_utf8_lossy(&out.stdout).trim().to_string();
                        c.ok(&[
                            "actor",
                            "create",
                            "--command",
                            "sleep",
                            "--arg",
                            "600",
                            "--resources",
                            bundles[0],
                            "--placement-group",
                            &pg,
                            "--bundle-index",
                            "0",
                            "--max-restarts",
                            "-1",
                        ]);
                        actors += 1;
                    }
                } else if err.contains("still PENDING") {
                    pending += 1;
                } else if err.contains("No available node types can fulfill resource request") {
                    // Refused and not recorded: nothing to remove later.
                    infeasible += 1;
                    continue;
                } else {
                    panic!("creating {name}: {err}");
                }
                groups.push(name);
            }
            _ => {
                if groups.is_empty() {
                    continue;
                }
                let name = groups.swap_remove(rng.below(groups.len()));
                let out = c.cli_raw(&["placement-group", "remove", &name]);
                assert!(
                    out.status.success(),
                    "removing {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                removed += 1;
            }
        }
        if rng.below(20) == 0 {
            let always: Vec<String> = audit(&c)
                .into_iter()
                .filter(|p| p.starts_with(ALWAYS))
                .collect();
            assert!(always.is_empty(), "mid-churn:\n{}", always.join("\n"));
            audits += 1;
        }
        // Reap agents that stopped cleanly.
        for p in c.procs.iter_mut() {
            let _ = p.child.try_wait();
        }
        std::thread::sleep(Duration::from_millis(20 + rng.below(150) as u64));
    }
    eprintln!(
        "churn {secs} s: {joins} joins, {stops} clean stops, {kills} kill -9, {created} groups created ({actors} with an actor), {pending} left pending, {infeasible} infeasible, {removed} removed, {audits} audits mid-churn; {} groups and {} agents remain",
        groups.len(),
        slots.iter().flatten().count()
    );

    // Settled: the nodes alive are the agents running, and the books balance.
    let running: BTreeSet<String> = (0..AGENTS)
        .filter(|i| slots[*i].is_some())
        .map(ip)
        .collect();
    let mut last = Vec::new();
    let settled = Instant::now();
    let ok = wait_until_quiet(Duration::from_secs(45), || {
        let alive: BTreeSet<String> = c
            .nodes()
            .iter()
            .filter(|n| n["alive"] == true && n["ip"] != "127.0.0.1")
            .map(|n| n["ip"].as_str().unwrap().to_string())
            .collect();
        last = audit(&c);
        if alive != running {
            last.push(format!("alive agents {alive:?} != running {running:?}"));
        }
        last.is_empty()
    });
    assert!(
        ok,
        "the books do not balance after the churn:\n{}",
        last.join("\n")
    );
    eprintln!(
        "books balanced {:?} after the churn stopped",
        settled.elapsed()
    );

    // Removing every group frees everything.
    for name in groups.drain(..) {
        c.ok(&["placement-group", "remove", &name]);
    }
    let status = c.json(&["status"]);
    for u in status["usage"].as_array().unwrap() {
        assert_eq!(u["used"], 0, "{status}");
    }
    assert!(audit(&c).is_empty());
}

/// Polls `f` until it holds or `timeout` ends.
fn wait_until_quiet(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
