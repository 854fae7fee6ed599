//! End-to-end: real `orchestrator` processes, a real etcd, 127.0.0.1/.2/.3.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{pid_alive, wait_until, Cluster};

fn nodes_of(pg: &serde_json::Value) -> Vec<String> {
    pg["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["node_id"].as_str().unwrap_or("-").to_string())
        .collect()
}

fn gpu_ids_of(pg: &serde_json::Value) -> Vec<u64> {
    pg["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["gpus"][0]["id"].as_u64().unwrap())
        .collect()
}

fn wait_actor_state(c: &Cluster, id: &str, state: &str, secs: u64) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_until(
        Duration::from_secs(secs),
        &format!("actor {id} {state}"),
        || {
            last = c.actor(id);
            last["state"] == state
        },
    );
    last
}

#[test]
fn three_nodes_strategies_and_shared_gpus() {
    let _serial = common::serial();
    let mut c = Cluster::new("strategies", 32100);
    c.start_head("head", c.head_port, 2);
    c.start_node("n2", "127.0.0.2", 2);
    c.start_node("n3", "127.0.0.3", 2);
    wait_until(Duration::from_secs(20), "three nodes", || {
        c.alive_nodes() == 3
    });

    let status = c.ok(&["status"]);
    assert_eq!(status.matches("\n 1 node_").count(), 3, "{status}");
    assert!(status.contains(" 0.0/6.0 GPU\n"), "{status}");
    assert!(status.contains(" 0.0/12.0 CPU\n"), "{status}");
    for ip in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        assert!(status.contains(ip), "{status}");
    }

    // STRICT_PACK: one node.
    let sp = c.ok(&[
        "placement-group",
        "create",
        "--bundles",
        r#"[{"GPU":1},{"GPU":1}]"#,
        "--strategy",
        "STRICT_PACK",
    ]);
    let sp = sp.trim().to_string();
    let pg = c.pg(&sp);
    assert_eq!(pg["state"], "CREATED");
    let n = nodes_of(&pg);
    assert_eq!(n[0], n[1]);
    assert_ne!(gpu_ids_of(&pg)[0], gpu_ids_of(&pg)[1]);

    // STRICT_SPREAD over three nodes cannot fit now (one node is full):
    // it waits, shows as a pending demand, and is placed once room frees up.
    let out = c.fails(&[
        "placement-group",
        "create",
        "--bundles",
        r#"[{"GPU":1},{"GPU":1},{"GPU":1}]"#,
        "--strategy",
        "STRICT_SPREAD",
        "--name",
        "ss",
        "--timeout",
        "0.5",
    ]);
    assert!(out.contains("still PENDING"), "{out}");
    let status = c.ok(&["status"]);
    assert!(
        status.contains("(STRICT_SPREAD): 1+ pending placement groups"),
        "{status}"
    );
    assert!(
        status.contains(" 2.0/6.0 GPU (0.0 used of 2.0 reserved in placement groups)"),
        "{status}"
    );
    c.ok(&["placement-group", "remove", &sp]);
    let ss = wait_until(Duration::from_secs(10), "STRICT_SPREAD created", || {
        c.pgs()
            .iter()
            .any(|p| p["name"] == "ss" && p["state"] == "CREATED")
    });
    let _ = ss;
    let pg = c.pgs().into_iter().find(|p| p["name"] == "ss").unwrap();
    let distinct: BTreeSet<String> = nodes_of(&pg).into_iter().collect();
    assert_eq!(distinct.len(), 3, "{pg}");

    // PACK of two 0.5 GPU bundles: one node, one GPU id; an actor in each
    // bundle sees the same CUDA_VISIBLE_DEVICES.
    let half = c.ok(&[
        "placement-group",
        "create",
        "--bundles",
        r#"[{"GPU":0.5},{"GPU":0.5}]"#,
        "--strategy",
        "PACK",
    ]);
    let half = half.trim().to_string();
    let pg = c.pg(&half);
    assert_eq!(nodes_of(&pg)[0], nodes_of(&pg)[1]);
    assert_eq!(gpu_ids_of(&pg)[0], gpu_ids_of(&pg)[1]);
    let mut ids = Vec::new();
    for i in ["0", "1"] {
        let id = c.ok(&[
            "actor",
            "create",
            "--command",
            "sh",
            "--arg",
            "-c",
            "--arg",
            "echo CVD=$CUDA_VISIBLE_DEVICES; exec sleep 600",
            "--resources",
            r#"{"GPU":0.5}"#,
            "--placement-group",
            &half,
            "--bundle-index",
            i,
        ]);
        ids.push(id.trim().to_string());
    }
    let mut seen = Vec::new();
    for id in &ids {
        let a = wait_actor_state(&c, id, "ALIVE", 15);
        assert_eq!(a["node_id"], nodes_of(&pg)[0]);
        let mut logs = String::new();
        wait_until(Duration::from_secs(10), "actor log", || {
            logs = c.ok(&["actor", "logs", id]);
            logs.contains("CVD=")
        });
        seen.push(logs.trim().to_string());
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], format!("CVD={}", gpu_ids_of(&pg)[0]));

    // SPREAD prefers distinct nodes.
    let spread = c.ok(&[
        "placement-group",
        "create",
        "--bundles",
        r#"[{"CPU":1},{"CPU":1},{"CPU":1}]"#,
        "--strategy",
        "SPREAD",
    ]);
    let pg = c.pg(spread.trim());
    assert_eq!(
        nodes_of(&pg).into_iter().collect::<BTreeSet<_>>().len(),
        3,
        "{pg}"
    );

    // PACK of two CPU bundles lands on one node.
    let pack = c.ok(&[
        "placement-group",
        "create",
        "--bundles",
        r#"[{"CPU":1},{"CPU":1}]"#,
        "--strategy",
        "PACK",
    ]);
    let pg = c.pg(pack.trim());
    assert_eq!(nodes_of(&pg)[0], nodes_of(&pg)[1]);

    let v = c.ok(&["status", "-v"]);
    assert!(v.contains("Node: "), "{v}");
    let j = c.json(&["status"]);
    assert_eq!(j["active"].as_array().unwrap().len(), 3);
}

#[test]
fn bad_input_and_tokens_change_nothing() {
    let _serial = common::serial();
    // This head starts and owns its etcd (no --etcd-endpoints).
    let root = common::TempDir::new("badinput");
    let cache = root.0.join("cache");
    let _reaper = common::KillListed(cache.clone());
    let port = 32210;
    let mut head = common::Proc {
        child: std::process::Command::new(common::BIN)
            .args([
                "start",
                "--head",
                "--block",
                "--port",
                &port.to_string(),
                "--node-ip-address",
                "127.0.0.1",
            ])
            .args(["--num-gpus", "1", "--num-cpus", "2"])
            .env("FLOTILLA_CACHE_ROOT", &cache)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(root.0.join("head.log")).unwrap())
            .spawn()
            .unwrap(),
        name: "head".into(),
    };
    common::wait_port(port, Duration::from_secs(30));
    let addr = format!("127.0.0.1:{port}");
    let run = |args: &[&str], token: Option<&str>| {
        let mut cmd = std::process::Command::new(common::BIN);
        cmd.args(args)
            .args(["--address", &addr])
            .env("FLOTILLA_CACHE_ROOT", &cache);
        cmd.env_remove("FLOTILLA_CLUSTER_TOKEN");
        if let Some(t) = token {
            cmd.env("FLOTILLA_CLUSTER_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let token_file = cache.join("cluster_token");
    wait_until(Duration::from_secs(20), "token file", || {
        token_file.exists()
    });
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    wait_until(Duration::from_secs(20), "head node", || {
        run(&["status"], None).status.success()
    });

    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "placement-group",
                "create",
                "--bundles",
                "[{\"GPU\":1",
                "--strategy",
                "PACK",
            ],
            "malformed JSON",
        ),
        (
            &[
                "placement-group",
                "create",
                "--bundles",
                "[{\"GPU\":1}]",
                "--strategy",
                "SIDEWAYS",
            ],
            "unknown strategy 'SIDEWAYS'",
        ),
        (
            &[
                "placement-group",
                "create",
                "--bundles",
                "[{\"GPU\":-1}]",
                "--strategy",
                "PACK",
            ],
            "must be a finite number >= 0",
        ),
        (
            &[
                "placement-group",
                "create",
                "--bundles",
                "[{\"GPU\":4}]",
                "--strategy",
                "PACK",
            ],
            "No available node types can fulfill resource request",
        ),
        (
            &["placement-group", "remove", "nope"],
            "placement group 'nope' not found",
        ),
        (&["actor", "kill", "ghost"], "actor 'ghost' not found"),
        (&["actor", "logs", "ghost"], "actor 'ghost' not found"),
        (
            &[
                "actor",
                "create",
                "--command",
                "true",
                "--resources",
                "{\"GPU\": 8}",
            ],
            "No available node types",
        ),
        (
            &[
                "actor",
                "create",
                "--command",
                "true",
                "--placement-group",
                "nope",
            ],
            "placement group 'nope' not found",
        ),
        (
            &["list", "things"],
            "expected nodes, placement-groups or actors",
        ),
    ];
    for (args, want) in cases {
        let out = run(args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let neg = std::process::Command::new(common::BIN)
        .args([
            "start",
            "--address",
            &addr,
            "--block",
            "--num-gpus",
            "-1",
            "--node-ip-address",
            "127.0.0.2",
        ])
        .env("FLOTILLA_CACHE_ROOT", &cache)
        .output()
        .unwrap();
    assert!(!neg.status.success());
    assert!(
        String::from_utf8_lossy(&neg.stderr).contains("--num-gpus"),
        "{}",
        String::from_utf8_lossy(&neg.stderr)
    );

    // Wrong token: refused, nothing created.
    let out = run(
        &["placement-group", "create", "--bundles", "[{\"CPU\":1}]"],
        Some("wrong-token"),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong cluster token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &[
            "actor",
            "create",
            "--command",
            "touch",
            "--arg",
            "/tmp/should-not-exist",
        ],
        Some("wrong-token"),
    );
    assert!(!out.status.success());

    // Missing token on the wire: a raw gRPC call without metadata.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        let mut c = proto::orchestrator::orchestrator_client::OrchestratorClient::connect(format!(
            "http://{addr}"
        ))
        .await
        .unwrap();
        c.create_placement_group(proto::orchestrator::CreatePlacementGroupRequest {
            bundles_json: "[{\"CPU\":1}]".into(),
            strategy: "PACK".into(),
            name: String::new(),
            timeout_s: 1.0,
            owner: String::new(),
        })
        .await
        .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let pgs = run(&["list", "placement-groups", "--format", "json"], None);
    assert!(pgs.status.success());
    assert_eq!(String::from_utf8_lossy(&pgs.stdout).trim(), "[]");
    let actors = run(&["list", "actors", "--format", "json"], None);
    assert_eq!(String::from_utf8_lossy(&actors.stdout).trim(), "[]");
    let log = std::fs::read_to_string(root.0.join("head.log")).unwrap();
    assert!(log.contains("refused a Orchestrator call"), "{log}");

    // `stop` ends the head, which stops the etcd it owns.
    let out = std::process::Command::new(common::BIN)
        .arg("stop")
        .env("FLOTILLA_CACHE_ROOT", &cache)
        .output()
        .unwrap();
    assert!(out.status.success());
    wait_until(Duration::from_secs(20), "head exit", || {
        matches!(head.child.try_wait(), Ok(Some(_)))
    });
    head.kill9();
}

#[test]
fn node_failure_reschedules_and_restarts() {
    let _serial = common::serial();
    let mut c = Cluster::new("failure", 32300);
    c.start_head("head", c.head_port, 0);
    let head_up = std::time::Instant::now();
    let mut a = c.start_node("n2", "127.0.0.2", 1);
    wait_until(Duration::from_secs(20), "two nodes", || {
        c.alive_nodes() == 2
    });

    let pg = c.ok(&[
        "placement-group",
        "create",
        "--bundles",
        r#"[{"GPU":1}]"#,
        "--strategy",
        "PACK",
        "--name",
        "g",
    ]);
    let pg = pg.trim().to_string();
    let actor = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"GPU":1}"#,
        "--placement-group",
        "g",
        "--bundle-index",
        "0",
        "--max-restarts",
        "2",
        "--name",
        "keeper",
    ]);
    let actor = actor.trim().to_string();
    let first = wait_actor_state(&c, &actor, "ALIVE", 15);
    let old_pid = first["pid"].as_u64().unwrap();
    assert_eq!(c.node_ip(first["node_id"].as_str().unwrap()), "127.0.0.2");

    // An actor that exits is restarted in place, then recorded dead with its code.
    let flaky = c.ok(&[
        "actor",
        "create",
        "--command",
        "sh",
        "--arg",
        "-c",
        "--arg",
        "exit 3",
        "--max-restarts",
        "1",
    ]);
    let dead = wait_actor_state(&c, flaky.trim(), "DEAD", 15);
    assert_eq!(dead["restarts"], 1);
    assert_eq!(dead["exit_code"], 3);

    // kill -9 the node agent: dead within 6 s. Its actor process is not
    // tied to the agent and keeps running (a restarted agent would adopt
    // it); once the actor runs elsewhere, the returning agent stops it.
    // A head that just started gives lapsed leases 2 TTLs (health.rs); the
    // 6 s bound is for a head that has been up longer, as in service.
    std::thread::sleep(Duration::from_secs(7).saturating_sub(head_up.elapsed()));
    let t = std::time::Instant::now();
    c.procs[a].kill9();
    wait_until(Duration::from_secs(8), "node shown dead", || {
        c.ok(&["status"]).contains("NodeTerminated (ip: 127.0.0.2)")
    });
    assert!(
        t.elapsed() < Duration::from_secs(6) + Duration::from_millis(900),
        "took {:?}",
        t.elapsed()
    );
    assert!(pid_alive(old_pid), "the actor died with its agent");
    wait_until(Duration::from_secs(5), "group rescheduling", || {
        c.pg(&pg)["state"] == "RESCHEDULING"
    });
    let r = c.actor(&actor);
    assert_eq!(r["state"], "RESTARTING");

    // A new node joins: the group is placed there and the actor comes back.
    a = c.start_node("n3", "127.0.0.3", 1);
    let _ = a;
    wait_until(Duration::from_secs(20), "group created again", || {
        c.pg(&pg)["state"] == "CREATED"
    });
    let back = wait_actor_state(&c, &actor, "ALIVE", 15);
    assert_eq!(back["restarts"], 1);
    assert_eq!(c.node_ip(back["node_id"].as_str().unwrap()), "127.0.0.3");
    assert_ne!(back["pid"].as_u64().unwrap(), old_pid);
    // n2's agent comes back: its copy was superseded, so it stops it.
    c.start_node("n2-again", "127.0.0.2", 1);
    wait_until(Duration::from_secs(10), "superseded copy stopped", || {
        !pid_alive(old_pid)
    });
    assert_eq!(c.actor(&actor)["pid"], back["pid"]);

    c.ok(&["actor", "kill", "keeper"]);
    let k = wait_actor_state(&c, &actor, "DEAD", 10);
    wait_until(Duration::from_secs(10), "killed process gone", || {
        !pid_alive(k["pid"].as_u64().unwrap_or(0))
    });
}

#[test]
fn standby_head_takes_over_without_killing_actors() {
    let _serial = common::serial();
    let mut c = Cluster::new("failover", 32400);
    let h1 = c.start_head("head1", c.head_port, 0);
    c.start_head("head2", 32410, 0);
    c.start_node("n2", "127.0.0.2", 1);
    wait_until(Duration::from_secs(20), "three nodes", || {
        c.alive_nodes() == 3
    });
    let st = c.json(&["status"]);
    assert_eq!(st["leader"], c.head_addr());

    let actor = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"GPU":1}"#,
    ]);
    let actor = actor.trim().to_string();
    let a = wait_actor_state(&c, &actor, "ALIVE", 15);
    let pid = a["pid"].as_u64().unwrap();

    c.procs[h1].kill9();
    // The client follows: the first head's address fails, the standby answers.
    let mut leader = String::new();
    wait_until(Duration::from_secs(10), "standby leads", || {
        let out = c.cli(&["status", "--format", "json"]);
        if !out.status.success() {
            return false;
        }
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        leader = j["leader"].as_str().unwrap_or("").to_string();
        leader == "127.0.0.1:32410"
    });
    let again = c.actor(&actor);
    assert_eq!(again["state"], "ALIVE");
    assert_eq!(again["pid"].as_u64().unwrap(), pid);
    assert!(pid_alive(pid));
    // The new leader schedules: a new actor still gets placed.
    let n = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"CPU":1}"#,
    ]);
    wait_actor_state(&c, n.trim(), "ALIVE", 15);

    // The old head comes back: it recovers from etcd as a standby and
    // touches nothing that runs.
    c.start_head("head1-again", c.head_port, 0);
    let st = c.json(&["status"]);
    assert_eq!(st["leader"], "127.0.0.1:32410");
    assert_eq!(c.actor(&actor)["pid"].as_u64().unwrap(), pid);
    assert!(pid_alive(pid));
}

#[test]
fn head_crash_leaves_its_node_and_actors_running() {
    let _serial = common::serial();
    let mut c = Cluster::new("headcrash", 31900);
    let h = c.start_head_with("head", c.head_port, 0, &["--resources", r#"{"on_head":1}"#]);
    c.start_node("n2", "127.0.0.2", 1);
    wait_until(Duration::from_secs(20), "two nodes", || {
        c.alive_nodes() == 2
    });
    let actor = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"on_head":1}"#,
    ]);
    let actor = actor.trim().to_string();
    let a = wait_actor_state(&c, &actor, "ALIVE", 15);
    assert_eq!(c.node_ip(a["node_id"].as_str().unwrap()), "127.0.0.1");
    let pid = a["pid"].as_u64().unwrap();
    let head_node = a["node_id"].as_str().unwrap().to_string();

    c.procs[h].kill9();
    // Longer than the node TTL: the head's node keeps its lease on its own.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        pid_alive(pid),
        "the actor on the head's node died with the head"
    );

    // The restarted head recovers from etcd and adopts its running agent:
    // same node, same actor process, no second node for 127.0.0.1.
    c.start_head_with(
        "head-again",
        c.head_port,
        0,
        &["--resources", r#"{"on_head":1}"#],
    );
    wait_until(Duration::from_secs(15), "restarted head leads", || {
        let out = c.cli(&["status", "--format", "json"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["leader"]
                == c.head_addr()
    });
    let nodes = c.nodes();
    let alive: Vec<_> = nodes.iter().filter(|n| n["alive"] == true).collect();
    assert_eq!(alive.len(), 2, "{nodes:?}");
    assert!(
        alive.iter().any(|n| n["id"] == head_node.as_str()),
        "{nodes:?}"
    );
    let again = c.actor(&actor);
    assert_eq!(again["state"], "ALIVE");
    assert_eq!(again["pid"].as_u64().unwrap(), pid);
    assert_eq!(again["restarts"], 0);
    assert!(pid_alive(pid));
    let log = std::fs::read_to_string(c.root.0.join("head-again.log")).unwrap();
    assert!(log.contains("adopting it"), "{log}");

    // `stop` still ends the head, its node agent and the actor.
    let out = c.cli_raw(&["stop"]);
    assert!(out.status.success());
    wait_until(
        Duration::from_secs(20),
        "actor stopped with its node",
        || !pid_alive(pid),
    );
}

/// What must not change through control-plane trouble: per actor its
/// state, pid, node, incarnation and restarts.
fn actor_facts(c: &Cluster) -> BTreeMap<String, String> {
    c.actors()
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_string(),
                format!(
                    "{} pid {} node {} incarnation {} restarts {}",
                    a["state"], a["pid"], a["node_id"], a["incarnation"], a["restarts"]
                ),
            )
        })
        .collect()
}

/// Alive node ids and the resource usage lines, as `status` reports them;
/// None while status fails.
fn status_facts(c: &Cluster) -> Option<(BTreeSet<String>, serde_json::Value)> {
    let out = c.cli(&["status", "--format", "json"]);
    if !out.status.success() {
        return None;
    }
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let nodes = j["active"]
        .as_array()?
        .iter()
        .map(|n| n["id"].as_str().unwrap_or("").to_string())
        .collect();
    Some((nodes, j["usage"].clone()))
}

fn live_pids(c: &Cluster) -> Vec<u64> {
    c.actors()
        .iter()
        .filter_map(|a| a["pid"].as_u64())
        .collect()
}

/// Waits until status and every actor are back exactly as `before`;
/// returns how long that took.
fn converges(
    c: &Cluster,
    before: &(BTreeSet<String>, serde_json::Value),
    actors: &BTreeMap<String, String>,
    what: &str,
) -> Duration {
    let took = wait_until(Duration::from_secs(10), what, || {
        status_facts(c).as_ref() == Some(before) && actor_facts(c) == *actors
    });
    eprintln!(
        "{what}: converged {:.2} s after etcd came back",
        took.as_secs_f64()
    );
    took
}

#[test]
fn etcd_pause_and_restart_keep_every_actor() {
    let _serial = common::serial();
    let mut c = Cluster::new("outage", 32500);
    c.start_head_with("head", c.head_port, 0, &["--resources", r#"{"on_head":1}"#]);
    c.start_node("n2", "127.0.0.2", 2);
    wait_until(Duration::from_secs(20), "two nodes", || {
        c.alive_nodes() == 2
    });
    let pg = c.ok(&["placement-group", "create", "--bundles", r#"[{"GPU":1}]"#]);
    let in_pg = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--placement-group",
        pg.trim(),
        "--resources",
        r#"{"GPU":1}"#,
        "--max-restarts",
        "-1",
    ]);
    let on_head = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"on_head":1}"#,
        "--max-restarts",
        "-1",
    ]);
    wait_actor_state(&c, in_pg.trim(), "ALIVE", 15);
    wait_actor_state(&c, on_head.trim(), "ALIVE", 15);
    let actors = actor_facts(&c);
    let before = status_facts(&c).unwrap();
    assert_eq!(before.0.len(), 2);
    let pids = live_pids(&c);
    assert_eq!(pids.len(), 2);

    // 10 s of etcd frozen (as on an fsync stall): status says so meanwhile.
    c.pause_etcd(true);
    let t = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let out = c.cli(&["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("etcd unreachable since"), "{err}");
    std::thread::sleep(Duration::from_secs(10).saturating_sub(t.elapsed()));
    assert!(
        pids.iter().all(|p| pid_alive(*p)),
        "an actor died in the outage"
    );
    c.pause_etcd(false);
    converges(&c, &before, &actors, "after a 10 s etcd pause");

    // etcd killed and started again on the same data, 10 s later.
    c.kill_etcd();
    std::thread::sleep(Duration::from_secs(10));
    assert!(
        pids.iter().all(|p| pid_alive(*p)),
        "an actor died in the outage"
    );
    c.restart_etcd();
    converges(&c, &before, &actors, "after etcd was down 10 s");
    // The leader reconciles again: a new actor is placed and started.
    let fresh = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"CPU":1}"#,
    ]);
    wait_actor_state(&c, fresh.trim(), "ALIVE", 15);
    let log = std::fs::read_to_string(c.root.0.join("head.log")).unwrap();
    assert!(!log.contains("is dead:"), "{log}");
    assert!(log.contains("etcd is back after"), "{log}");
    let mut st = String::new();
    wait_until(Duration::from_secs(10), "an ETCD_UNREACHABLE event", || {
        st = c.ok(&["status"]);
        st.contains("ETCD_UNREACHABLE: etcd was unreachable from head")
    });
    assert!(!st.contains("NODE_LOST"), "{st}");

    // The books still balance: two GPUs, one held, one more fits, a third never does.
    c.ok(&["placement-group", "create", "--bundles", r#"[{"GPU":1}]"#]);
    let err = c.fails(&[
        "placement-group",
        "create",
        "--bundles",
        r#"[{"GPU":1}]"#,
        "--timeout",
        "0.5",
    ]);
    assert!(err.contains("still PENDING"), "{err}");
    let mut per_gpu: BTreeMap<(String, u64), u64> = Default::default();
    for p in c.pgs().iter().filter(|p| p["state"] == "CREATED") {
        for a in p["assignments"].as_array().unwrap() {
            for g in a["gpus"].as_array().unwrap() {
                *per_gpu
                    .entry((
                        a["node_id"].as_str().unwrap().to_string(),
                        g["id"].as_u64().unwrap(),
                    ))
                    .or_default() += g["share"].as_u64().unwrap();
            }
        }
    }
    assert_eq!(per_gpu.len(), 2, "{per_gpu:?}");
    assert!(
        per_gpu.values().all(|s| *s == 10_000),
        "double-booked: {per_gpu:?}"
    );
}

/// The pid of the head's node agent, from the pid files.
fn head_node_agent_pid(c: &Cluster) -> Option<i32> {
    std::fs::read_dir(c.cache().join("pids"))
        .ok()?
        .flatten()
        .find_map(|e| {
            let role = std::fs::read_to_string(e.path()).ok()?;
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            (role.contains("head-node ready") && pid_alive(pid as u64)).then_some(pid)
        })
}

#[test]
fn agent_kill9_leaves_actors_and_its_restart_adopts_them() {
    let _serial = common::serial();
    let mut c = Cluster::new("adopt", 32600);
    c.start_head_with("head", c.head_port, 0, &["--resources", r#"{"on_head":1}"#]);
    let n = c.start_node("n2", "127.0.0.2", 1);
    wait_until(Duration::from_secs(20), "two nodes", || {
        c.alive_nodes() == 2
    });
    let mut ids = Vec::new();
    for res in [r#"{"GPU":1}"#, r#"{"on_head":1}"#] {
        let id = c.ok(&[
            "actor",
            "create",
            "--command",
            "sleep",
            "--arg",
            "600",
            "--resources",
            res,
            "--max-restarts",
            "-1",
        ]);
        ids.push(id.trim().to_string());
    }
    for id in &ids {
        wait_actor_state(&c, id, "ALIVE", 15);
    }
    let actors = actor_facts(&c);
    let before = status_facts(&c).unwrap();
    let pids = live_pids(&c);

    // kill -9 of both agents: the head starts its own again, we restart n2.
    let head_agent = head_node_agent_pid(&c).expect("the head's node agent");
    unsafe { libc::kill(head_agent, libc::SIGKILL) };
    c.procs[n].kill9();
    assert!(
        pids.iter().all(|p| pid_alive(*p)),
        "actors died with their agent"
    );
    c.start_node("n2-again", "127.0.0.2", 1);
    let took = wait_until(Duration::from_secs(10), "both agents back", || {
        head_node_agent_pid(&c).is_some_and(|p| p != head_agent)
            && status_facts(&c).as_ref() == Some(&before)
            && actor_facts(&c) == actors
    });
    eprintln!("agents back with their actors after {took:?}");
    // The killed agents' leases run out 3 s (the TTL) after the kill; the
    // nodes must outlive them on the new agents' leases, unchanged.
    let since_kill = std::time::Instant::now() - took;
    std::thread::sleep(Duration::from_secs(5).saturating_sub(since_kill.elapsed()));
    assert_eq!(status_facts(&c).as_ref(), Some(&before));
    assert_eq!(actor_facts(&c), actors);
    assert!(pids.iter().all(|p| pid_alive(*p)));
    let log = std::fs::read_to_string(c.root.0.join("n2-again.log")).unwrap();
    assert!(log.contains("adopted actor"), "{log}");
    // Each agent records its adoption on its first pass.
    wait_until(Duration::from_secs(10), "two ACTOR_ADOPTED events", || {
        c.ok(&["status"]).matches("ACTOR_ADOPTED").count() == 2
    });
    let head_log = std::fs::read_to_string(c.root.0.join("head.log")).unwrap();
    assert!(head_log.contains("starting it again"), "{head_log}");
    assert!(!head_log.contains("is dead:"), "{head_log}");
    // Adopted actors are still supervised: killing one is seen and recorded.
    c.ok(&["actor", "kill", &ids[0]]);
    wait_until(
        Duration::from_secs(10),
        "killed actor's process gone",
        || !pid_alive(pids[0]) || !pid_alive(pids[1]),
    );
}

#[test]
fn silent_node_is_declared_dead_and_fenced_when_it_returns() {
    let _serial = common::serial();
    let mut c = Cluster::new("fence", 32800);
    c.start_head("head", c.head_port, 0);
    let head_up = std::time::Instant::now();
    let n = c.start_node("n2", "127.0.0.2", 1);
    wait_until(Duration::from_secs(20), "two nodes", || {
        c.alive_nodes() == 2
    });
    let actor = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"GPU":1}"#,
        "--max-restarts",
        "-1",
    ]);
    let actor = actor.trim().to_string();
    let first = wait_actor_state(&c, &actor, "ALIVE", 15);
    let old_node = first["node_id"].as_str().unwrap().to_string();
    let old_pid = first["pid"].as_u64().unwrap();
    c.start_node("n3", "127.0.0.3", 1);
    wait_until(Duration::from_secs(20), "three nodes", || {
        c.alive_nodes() == 3
    });

    // Freeze n2's agent while etcd stays healthy: declared dead within 6 s,
    // its restartable actor runs again on n3.
    // A head that just started gives lapsed leases 2 TTLs (health.rs); this
    // measures detection by a head that has been up longer, as in service.
    std::thread::sleep(Duration::from_secs(7).saturating_sub(head_up.elapsed()));
    let pid = c.procs[n].pid() as i32;
    let t = std::time::Instant::now();
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_until(Duration::from_secs(8), "frozen node dead", || {
        c.ok(&["status"])
            .contains(&format!("{old_node}: NodeTerminated"))
    });
    let detected = t.elapsed();
    eprintln!("silent node declared dead after {detected:?}");
    assert!(detected < Duration::from_secs(6) + Duration::from_millis(900));
    let moved = wait_actor_state(&c, &actor, "ALIVE", 15);
    let new_pid = moved["pid"].as_u64().unwrap();
    assert_eq!(c.node_ip(moved["node_id"].as_str().unwrap()), "127.0.0.3");
    assert_eq!(moved["restarts"], 1);

    // It returns: its superseded copy stops, it registers again under the
    // same id, and the copy on n3 stays the only one.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let t = std::time::Instant::now();
    wait_until(Duration::from_secs(6), "superseded copy stopped", || {
        !pid_alive(old_pid)
    });
    eprintln!(
        "superseded copy stopped {:?} after the node returned",
        t.elapsed()
    );
    wait_until(Duration::from_secs(10), "n2 back as the same node", || {
        c.nodes()
            .iter()
            .any(|n| n["id"] == old_node.as_str() && n["alive"] == true)
    });
    assert_eq!(c.alive_nodes(), 3);
    let now = c.actor(&actor);
    assert_eq!(now["pid"].as_u64().unwrap(), new_pid);
    assert_eq!(now["incarnation"], moved["incarnation"]);
    assert!(pid_alive(new_pid));
    let log = std::fs::read_to_string(c.root.0.join("n2.log")).unwrap();
    assert!(log.contains("stopping actor"), "{log}");
    // What happened is in status, newest first.
    let st = c.ok(&["status"]);
    eprintln!("{st}");
    let at = |k: &str| st.find(k).unwrap_or_else(|| panic!("{k} missing: {st}"));
    assert!(at("NODE_RECOVERED") < at("ACTOR_FENCED"), "{st}");
    assert!(at("ACTOR_FENCED") < at("ACTOR_RESTARTED"), "{st}");
    // Decided together, in one batch: both listed after (older than) the fencing.
    assert!(at("NODE_LOST") > at("ACTOR_FENCED"), "{st}");
}

#[test]
fn partitioned_node_is_declared_dead_and_fenced_when_the_link_returns() {
    let _serial = common::serial();
    // The node runs in a network namespace; etcd and the head in the root
    // one, reached over a veth pair that the test cuts.
    let ns = match common::NetNs::create("31600", "10.213.16.1", "10.213.16.2") {
        Ok(ns) => ns,
        Err(e) => panic!("network namespaces are needed for this test (run as root): {e}"),
    };
    let mut c = Cluster::new_on("partition", 31600, "10.213.16.1");
    c.start_head("head", c.head_port, 0);
    let head_up = std::time::Instant::now();
    c.start_node_in(Some(&ns.name), "n2", "10.213.16.2", 1);
    wait_until(Duration::from_secs(20), "two nodes", || {
        c.alive_nodes() == 2
    });
    let actor = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"GPU":1}"#,
        "--max-restarts",
        "-1",
    ]);
    let actor = actor.trim().to_string();
    let first = wait_actor_state(&c, &actor, "ALIVE", 15);
    let old_node = first["node_id"].as_str().unwrap().to_string();
    let old_pid = first["pid"].as_u64().unwrap();
    assert_eq!(c.node_ip(&old_node), "10.213.16.2");
    c.start_node("n3", "127.0.0.3", 1);
    wait_until(Duration::from_secs(20), "three nodes", || {
        c.alive_nodes() == 3
    });
    // Past the fresh head's grace (health.rs), as in service.
    std::thread::sleep(Duration::from_secs(7).saturating_sub(head_up.elapsed()));

    // Cut: etcd and the head stay healthy, the node goes silent.
    let t = std::time::Instant::now();
    ns.link(false);
    // The cut-off agent fences itself (witness.rs): its copy stops within
    // the detection time, while the link is still down.
    let fenced = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        while pid_alive(old_pid) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        t.elapsed()
    });
    wait_until(Duration::from_secs(8), "partitioned node dead", || {
        c.ok(&["status"])
            .contains(&format!("{old_node}: NodeTerminated"))
    });
    let detected = t.elapsed();
    eprintln!("partitioned node declared dead after {detected:?}");
    assert!(detected < Duration::from_secs(6) + Duration::from_millis(900));
    let moved = wait_actor_state(&c, &actor, "ALIVE", 15);
    assert_eq!(c.node_ip(moved["node_id"].as_str().unwrap()), "127.0.0.3");
    let new_pid = moved["pid"].as_u64().unwrap();
    let stopped = fenced.join().unwrap();
    eprintln!("cut-off copy stopped {stopped:?} after the cut (declared dead after {detected:?})");
    assert!(!pid_alive(old_pid), "the cut-off copy still runs");
    assert!(stopped < Duration::from_secs(6), "fenced after {stopped:?}");
    let log = std::fs::read_to_string(c.root.0.join("n2.log")).unwrap();
    assert!(log.contains("cut off"), "{log}");

    // Healed: the returning agent registers again; one copy runs throughout.
    ns.link(true);
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert!(
            !pid_alive(old_pid) && pid_alive(new_pid),
            "two copies or none"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_until(
        Duration::from_secs(15),
        "the node back under its id",
        || {
            c.nodes()
                .iter()
                .any(|n| n["id"] == old_node.as_str() && n["alive"] == true)
        },
    );
    let now = c.actor(&actor);
    assert_eq!(now["pid"].as_u64().unwrap(), new_pid);
    assert_eq!(now["incarnation"], moved["incarnation"]);
    assert!(pid_alive(new_pid) && !pid_alive(old_pid));
    let st = c.ok(&["status"]);
    assert!(
        st.contains("ACTOR_FENCED") && st.contains("cut off"),
        "{st}"
    );
    drop(c);
    drop(ns);
}

#[test]
fn etcd_paused_45_s_keeps_every_actor() {
    let _serial = common::serial();
    let mut c = Cluster::new("pause45", 31500);
    c.start_head("head", c.head_port, 0);
    c.start_node("n2", "127.0.0.2", 2);
    wait_until(Duration::from_secs(20), "two nodes", || {
        c.alive_nodes() == 2
    });
    let pg = c.ok(&["placement-group", "create", "--bundles", r#"[{"GPU":1}]"#]);
    let a = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--placement-group",
        pg.trim(),
        "--resources",
        r#"{"GPU":1}"#,
        "--max-restarts",
        "-1",
    ]);
    wait_actor_state(&c, a.trim(), "ALIVE", 15);
    let actors = actor_facts(&c);
    let before = status_facts(&c).unwrap();
    let pids = live_pids(&c);

    c.pause_etcd(true);
    std::thread::sleep(Duration::from_secs(45));
    assert!(
        pids.iter().all(|p| pid_alive(*p)),
        "an actor died in the outage"
    );
    c.pause_etcd(false);
    converges(&c, &before, &actors, "after a 45 s etcd pause");
    let fresh = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"GPU":1}"#,
    ]);
    wait_actor_state(&c, fresh.trim(), "ALIVE", 15);
    let log = std::fs::read_to_string(c.root.0.join("head.log")).unwrap();
    assert!(!log.contains("is dead:"), "{log}");
}

/// The etcd client URL a head's log names (the member it started).
fn member_endpoint(c: &Cluster, head: &str) -> String {
    let log = std::fs::read_to_string(c.root.0.join(format!("{head}.log"))).unwrap();
    let line = log
        .lines()
        .find(|l| l.starts_with("started etcd at ") || l.starts_with("joined the etcd of head"))
        .unwrap_or_else(|| panic!("no etcd in {head}'s log: {log}"));
    line.rsplit(' ').next().unwrap().to_string()
}

fn member_count(endpoint: &str) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg = orchestrator::store::EtcdConfig {
        endpoints: vec![endpoint.to_string()],
        ..Default::default()
    };
    rt.block_on(orchestrator::members::list(&cfg))
        .map(|m| m.len())
        .unwrap_or(0)
}

#[test]
fn three_heads_with_etcd_members_survive_losing_one() {
    let _serial = common::serial();
    let mut c = Cluster::bare("members", 31400);
    let h1 = c.start_member_head("head1", "127.0.0.1", 31402, None);
    c.start_member_head("head2", "127.0.0.2", 31412, Some("127.0.0.1:31402"));
    let h3 = c.start_member_head("head3", "127.0.0.3", 31422, Some("127.0.0.1:31402"));
    let ep2 = member_endpoint(&c, "head2");
    assert_eq!(member_count(&ep2), 3);

    // A clean stop of a head removes its member; it can join again, here
    // through the second head.
    unsafe { libc::kill(c.procs[h3].pid() as i32, libc::SIGTERM) };
    wait_until(Duration::from_secs(20), "head3 stopped", || {
        matches!(c.procs[h3].child.try_wait(), Ok(Some(_)))
    });
    assert_eq!(member_count(&ep2), 2);
    c.start_member_head("head3-again", "127.0.0.3", 31422, Some("127.0.0.2:31412"));
    assert_eq!(member_count(&ep2), 3);

    c.start_node("n4", "127.0.0.4", 1);
    wait_until(Duration::from_secs(20), "three head nodes and n4", || {
        c.alive_nodes() == 4
    });
    let actor = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"GPU":1}"#,
    ]);
    let a = wait_actor_state(&c, actor.trim(), "ALIVE", 15);
    let pid = a["pid"].as_u64().unwrap();
    assert_eq!(c.json(&["status"])["leader"], "127.0.0.1:31402");

    // The first machine goes: its head, its etcd member, its node agent.
    let ep1 = member_endpoint(&c, "head1");
    let etcd1 = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.starts_with("etcd ") && cmd.contains(&ep1)).then_some(pid)
        })
        .expect("head1's etcd member");
    let agent1 = head_node_agent_pid_of(&c, "127.0.0.1:31402").expect("head1's node agent");
    let t = std::time::Instant::now();
    c.procs[h1].kill9();
    unsafe {
        libc::kill(etcd1, libc::SIGKILL);
        libc::kill(agent1, libc::SIGKILL);
    }
    // Placement keeps working through the other heads within 15 s.
    wait_until(Duration::from_secs(15), "placement through head2", || {
        c.cli_raw(&[
            "placement-group",
            "create",
            "--bundles",
            r#"[{"CPU":1}]"#,
            "--timeout",
            "2",
            "--address",
            "127.0.0.2:31412",
        ])
        .status
        .success()
    });
    eprintln!(
        "placement works again {:?} after losing the first machine",
        t.elapsed()
    );
    let fresh = c.cli_raw(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"CPU":1}"#,
        "--address",
        "127.0.0.2:31412",
    ]);
    assert!(
        fresh.status.success(),
        "{}",
        String::from_utf8_lossy(&fresh.stderr)
    );
    let fresh_id = String::from_utf8_lossy(&fresh.stdout).trim().to_string();
    wait_until(
        Duration::from_secs(15),
        "a new leader starts a new actor",
        || {
            let out = c.cli_raw(&[
                "list",
                "actors",
                "--format",
                "json",
                "--address",
                "127.0.0.2:31412",
            ]);
            out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .ok()
                    .and_then(|v| v.as_array().cloned())
                    .is_some_and(|v| {
                        v.iter()
                            .any(|a| a["id"] == fresh_id.as_str() && a["state"] == "ALIVE")
                    })
        },
    );
    eprintln!(
        "a new leader placed and started an actor {:?} after the loss",
        t.elapsed()
    );
    assert!(
        pid_alive(pid),
        "the actor on n4 died with the first machine"
    );
}

fn head_node_agent_pid_of(c: &Cluster, head: &str) -> Option<i32> {
    std::fs::read_dir(c.cache().join("pids"))
        .ok()?
        .flatten()
        .find_map(|e| {
            let role = std::fs::read_to_string(e.path()).ok()?;
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            (role.contains(&format!("head {head} head-node ready")) && pid_alive(pid as u64))
                .then_some(pid)
        })
}

#[test]
fn head_owning_its_etcd_crashes_and_resumes_on_the_same_data() {
    let _serial = common::serial();
    // No external etcd: the head's own, which dies with it (kill -9).
    let mut c = Cluster::bare("resume", 31300);
    let h = c.start_member_head("head", "127.0.0.1", 31302, None);
    c.start_node("n2", "127.0.0.2", 1);
    wait_until(Duration::from_secs(20), "two nodes", || {
        c.alive_nodes() == 2
    });
    let id = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"GPU":1}"#,
        "--max-restarts",
        "-1",
    ]);
    wait_actor_state(&c, id.trim(), "ALIVE", 15);
    let actors = actor_facts(&c);
    let before = status_facts(&c).unwrap();
    let pids = live_pids(&c);

    c.procs[h].kill9();
    // Past the node TTL with the store down: nothing is lost meanwhile.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        pids.iter().all(|p| pid_alive(*p)),
        "an actor died with the head"
    );
    c.start_member_head("head-again", "127.0.0.1", 31302, None);
    let log = std::fs::read_to_string(c.root.0.join("head-again.log")).unwrap();
    assert!(log.contains("resumed etcd at"), "{log}");
    assert!(log.contains("adopting it"), "{log}");
    converges(
        &c,
        &before,
        &actors,
        "after the head and its etcd restarted",
    );
    let fresh = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--resources",
        r#"{"CPU":1}"#,
    ]);
    wait_actor_state(&c, fresh.trim(), "ALIVE", 15);
    assert!(pids.iter().all(|p| pid_alive(*p)));

    // A clean stop ends every actor (they are not tied to their agents, so
    // the agents must) and forgets the store: the next head starts anew.
    let all = live_pids(&c);
    assert_eq!(all.len(), 2);
    let out = c.cli_raw(&["stop"]);
    assert!(out.status.success());
    wait_until(
        Duration::from_secs(10),
        "actors stopped with their nodes",
        || !all.iter().any(|p| pid_alive(*p)),
    );
    assert!(!c
        .cache()
        .join("etcd-members")
        .join("127.0.0.1_31302")
        .exists());
}

#[test]
fn owned_placement_group_goes_with_its_owner() {
    let _serial = common::serial();
    let mut c = Cluster::new("owner", 31200);
    let ttl = Duration::from_secs(3); // the default --node-ttl-s
    c.start_head("head", c.head_port, 0);
    c.start_node("n2", "127.0.0.2", 2);
    wait_until(Duration::from_secs(20), "two nodes", || {
        c.alive_nodes() == 2
    });

    // Every node offers node:<ip> = 1; status shows it per node only.
    for n in c.nodes() {
        let key = format!("node:{}", n["ip"].as_str().unwrap());
        assert_eq!(n["total"][&key], 10_000, "{n}");
    }
    let st = c.ok(&["status"]);
    assert!(!st.contains("node:127."), "{st}");
    let st = c.ok(&["status", "--verbose"]);
    assert!(st.contains("  0.0/1.0 node:127.0.0.2\n"), "{st}");

    // Three {CPU: 4} bundles each fit a node, but never the 8 CPUs of the
    // cluster together: refused at once rather than queued.
    for strategy in ["PACK", "SPREAD"] {
        let t = std::time::Instant::now();
        let err = c.fails(&[
            "placement-group",
            "create",
            "--bundles",
            r#"[{"CPU":4},{"CPU":4},{"CPU":4}]"#,
            "--strategy",
            strategy,
            "--timeout",
            "20",
        ]);
        assert!(
            err.contains("No available node types can fulfill resource request"),
            "{strategy}: {err}"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{strategy}: waited");
    }

    // The owner RPCs refuse what they cannot honour, with the reason.
    owner_rpcs_refuse_bad_input(&c);

    // A group without owner (the CLI's) stays whatever happens below.
    let cli_pg = c.ok(&["placement-group", "create", "--bundles", r#"[{"CPU":1}]"#]);
    let cli_pg = cli_pg.trim().to_string();

    // The owning process: it holds both GPUs; an actor runs in bundle 1.
    let owner = c.spawn_cli(
        "owner",
        &[
            "placement-group",
            "create",
            "--bundles",
            r#"[{"GPU":1},{"GPU":1}]"#,
            "--name",
            "held",
            "--hold",
        ],
    );
    let mut pg = String::new();
    wait_until(Duration::from_secs(15), "the held group's id", || {
        pg = c
            .log("owner")
            .lines()
            .find(|l| l.starts_with("pg_"))
            .unwrap_or_default()
            .to_string();
        !pg.is_empty()
    });
    let rec = c.pg(&pg);
    assert_eq!(rec["state"], "CREATED");
    let owner_id = rec["owner"].as_str().unwrap().to_string();
    assert!(owner_id.starts_with("owner_"), "{rec}");
    let actor = c.ok(&[
        "actor",
        "create",
        "--command",
        "sleep",
        "--arg",
        "600",
        "--placement-group",
        &pg,
        "--bundle-index",
        "1",
        "--resources",
        r#"{"GPU":1}"#,
        "--name",
        "held-rank1",
    ]);
    let actor = actor.trim().to_string();
    let a = wait_actor_state(&c, &actor, "ALIVE", 15);
    let pid = a["pid"].as_u64().unwrap();
    let table = c.ok(&["list", "placement-groups"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&pg) && l.ends_with(&owner_id)),
        "{table}"
    );
    let table = c.ok(&["list", "actors"]);
    assert!(table.starts_with("ACTOR_ID\tNAME\tSTATE\tNODE_ID\tPID\tRESTARTS\tEXIT_CODE\tPLACEMENT_GROUP\tBUNDLE\tRANK\n"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&actor) && l.ends_with(&format!("\t{pg}\t1\t1"))),
        "{table}"
    );

    // Within the cluster's total but held by the owner: it waits.
    let err = c.fails(&[
        "placement-group",
        "create",
        "--bundles",
        r#"[{"GPU":1}]"#,
        "--name",
        "waiter",
        "--timeout",
        "0.5",
    ]);
    assert!(err.contains("still PENDING"), "{err}");
    c.ok(&["placement-group", "remove", "waiter"]);

    // A live owner's group outlives many TTLs.
    std::thread::sleep(4 * ttl);
    assert_eq!(c.pg(&pg)["state"], "CREATED");

    // etcd frozen a little longer than the TTL: calls answer late rather
    // than fail, and etcd may revoke the owner's lease on resuming; the
    // head counts the late answer as an outage and removes nothing.
    c.pause_etcd(true);
    std::thread::sleep(ttl + Duration::from_millis(700));
    c.pause_etcd(false);
    std::thread::sleep(2 * ttl + ttl + Duration::from_secs(2));
    assert_eq!(c.pg(&pg)["state"], "CREATED", "{}", c.log("head"));
    assert!(pid_alive(pid));
    assert!(
        c.log("head").contains("etcd is back after"),
        "the stall went unnoticed: {}",
        c.log("head")
    );

    // etcd frozen longer than the owner's TTL: the owner's lease may lapse
    // in etcd, but the leader removes nothing during the outage or its
    // grace, and the owner registers again meanwhile.
    c.pause_etcd(true);
    std::thread::sleep(Duration::from_secs(8));
    c.pause_etcd(false);
    std::thread::sleep(2 * ttl + ttl + Duration::from_secs(3));
    assert_eq!(c.pg(&pg)["state"], "CREATED", "{}", c.log("head"));
    assert_eq!(c.actor(&actor)["state"], "ALIVE");
    assert!(pid_alive(pid));
    assert!(
        !c.log("head").contains("its owner is gone"),
        "{}",
        c.log("head")
    );
    eprintln!(
        "owner across the etcd pause: {}",
        if c.log("owner").contains("registered again") {
            "its lease lapsed and it registered again"
        } else {
            "its lease survived"
        }
    );

    // kill -9 of the owner: the head removes its group and the actor.
    c.procs[owner].kill9();
    let t = std::time::Instant::now();
    wait_until(Duration::from_secs(20), "the owner's group removed", || {
        c.pg(&pg)["state"] == "REMOVED"
    });
    let took = t.elapsed();
    eprintln!(
        "placement group removed {:.2} s after its owner was killed (owner TTL {} s)",
        took.as_secs_f64(),
        ttl.as_secs()
    );
    assert!(took <= ttl + Duration::from_secs(2), "took {took:?}");
    let a = wait_actor_state(&c, &actor, "DEAD", 5);
    assert!(
        a["death_cause"]
            .as_str()
            .unwrap()
            .contains("its owner is gone"),
        "{a}"
    );
    wait_until(Duration::from_secs(10), "the actor process gone", || {
        !pid_alive(pid)
    });
    let st = c.ok(&["status"]);
    assert!(st.contains(" 0.0/2.0 GPU\n"), "{st}");
    assert!(
        st.contains("PLACEMENT_GROUP_REMOVED: placement group"),
        "{st}"
    );
    assert!(st.contains("(held) removed: its owner is gone"), "{st}");
    assert!(c.log("head").contains("its owner is gone"));
    assert_eq!(c.pg(&cli_pg)["state"], "CREATED");

    // SIGTERM (as Ctrl-C) of a holder removes its group at once.
    let holder = c.spawn_cli(
        "holder",
        &[
            "placement-group",
            "create",
            "--bundles",
            r#"[{"GPU":1}]"#,
            "--hold",
        ],
    );
    let mut held = String::new();
    wait_until(Duration::from_secs(15), "the second held group", || {
        held = c
            .log("holder")
            .lines()
            .find(|l| l.starts_with("pg_"))
            .unwrap_or_default()
            .to_string();
        !held.is_empty()
    });
    unsafe { libc::kill(c.procs[holder].pid() as i32, libc::SIGTERM) };
    wait_until(Duration::from_secs(5), "removed on SIGTERM", || {
        c.pg(&held)["state"] == "REMOVED"
    });
    assert!(c
        .log("holder")
        .contains(&format!("removed placement group {held}")));
}

fn owner_rpcs_refuse_bad_input(c: &Cluster) {
    use orchestrator::client;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let root = orchestrator::paths::CacheRoot(c.cache());
        let token = orchestrator::auth::client_token(None, &root).unwrap();
        let (mut cl, _) = client::connect(Some(&c.head_addr()), &root, &token)
            .await
            .unwrap();
        let e = client::refresh_owner(&mut cl, "owner_nope")
            .await
            .unwrap_err();
        assert!(matches!(e, orchestrator::Error::NotFound { .. }), "{e}");
        let e = client::register_owner(&mut cl, "x", 1.0, None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("between 2 s"), "{e}");
        let e = client::register_owner(&mut cl, "x", 0.0, Some("a/b"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("invalid owner_id"), "{e}");
        let e = cl
            .create_placement_group(proto::orchestrator::CreatePlacementGroupRequest {
                bundles_json: r#"[{"CPU":1}]"#.into(),
                strategy: "PACK".into(),
                name: String::new(),
                timeout_s: 1.0,
                owner: "owner_nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert!(e.message().contains("owner 'owner_nope"), "{e:?}");
        // The default TTL is the node TTL; a live owner refreshes.
        let o = client::register_owner(&mut cl, "t", 0.0, None)
            .await
            .unwrap();
        assert_eq!(o.ttl_s, 3);
        let r = client::refresh_owner(&mut cl, &o.owner_id).await.unwrap();
        assert_eq!(r.owner_id, o.owner_id);
    });
}
