//! `orchestrator bench` (hidden): the latencies BENCHMARKS.md reports,
//! measured against a running cluster.

use std::time::{Duration, Instant};

use etcd_client::{PutOptions, Txn, TxnOp};
use proto::orchestrator::{CreatePlacementGroupRequest, HelloRequest, NameOrId, StatusRequest};

use crate::auth;
use crate::cli::BenchArgs;
use crate::client;
use crate::error::{Error, Result};
use crate::head_service::HeadService;
use crate::paths::CacheRoot;
use crate::resources::{Resources, CPU, GPU};
use crate::state::{now, NodeRecord, NodeState};
use crate::store::{EtcdConfig, Store};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub async fn run(a: BenchArgs, root: &CacheRoot) -> Result<()> {
    let token = auth::client_token(a.conn.token.as_deref(), root)?;
    let (mut c, addr) = client::connect(a.conn.address.as_deref(), root, &token).await?;
    let hello = c.hello(HelloRequest {}).await?.into_inner();
    println!("head {addr}, {} iterations", a.iterations);

    // 1. Placement group create -> CREATED: 8 one-GPU bundles.
    let mut pg_ms = Vec::new();
    for _ in 0..a.iterations {
        let t = Instant::now();
        let r = c
            .create_placement_group(CreatePlacementGroupRequest {
                bundles_json: r#"[{"GPU":1},{"GPU":1},{"GPU":1},{"GPU":1},{"GPU":1},{"GPU":1},{"GPU":1},{"GPU":1}]"#.into(),
                strategy: "SPREAD".into(),
                name: String::new(),
                timeout_s: 10.0,
                owner: String::new(),
            })
            .await?
            .into_inner();
        pg_ms.push(ms(t.elapsed()));
        let pg: serde_json::Value =
            serde_json::from_str(&r.json).map_err(|source| Error::BadReply {
                what: "placement group reply",
                source,
            })?;
        let id = pg["id"].as_str().unwrap_or_default().to_string();
        c.remove_placement_group(NameOrId { name_or_id: id })
            .await?;
    }
    println!(
        "pg create (8 x GPU:1, SPREAD) -> CREATED: p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut pg_ms.clone(), 0.5),
        pct(&mut pg_ms, 0.99)
    );

    // 2. status.
    let mut st_ms = Vec::new();
    for _ in 0..a.iterations {
        let t = Instant::now();
        c.status(StatusRequest {}).await?;
        st_ms.push(ms(t.elapsed()));
    }
    println!(
        "status RPC: p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut st_ms.clone(), 0.5),
        pct(&mut st_ms, 0.99)
    );

    // 3. Placement with simulated nodes registered in etcd, in a cluster
    // prefix of its own so the real cluster is untouched.
    let etcd = EtcdConfig::new(hello.etcd_endpoints.clone(), &a.etcd);
    let sim = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let store = Store::connect(&etcd, &sim).await?;
    let mut ec = store.client();
    let lease = ec.lease_grant(120, None).await?.id();
    let nodes = a.sim_nodes;
    for chunk in (0..nodes).collect::<Vec<_>>().chunks(50) {
        let mut ops = Vec::new();
        for i in chunk {
            let id = format!("node_sim{i:05}");
            let rec = NodeRecord {
                id: id.clone(),
                ip: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
                agent_address: String::new(),
                is_head: false,
                total: Resources::new().with(GPU, 8.0).with(CPU, 64.0),
                gpu_ids: (0..8).collect(),
                gpu_model: None,
                gpu_memory_bytes: 0,
                state: NodeState::Alive,
                started_at: now(),
                died_at: None,
                death_reason: None,
            };
            ops.push(TxnOp::put(
                store.node_key(&id),
                serde_json::to_string(&rec).expect("serialize"),
                None,
            ));
            ops.push(TxnOp::put(
                store.live_key(&id),
                "",
                Some(PutOptions::new().with_lease(lease)),
            ));
        }
        ec.txn(Txn::new().and_then(ops)).await?;
    }
    let svc = HeadService {
        store: store.clone(),
        etcd_endpoints: hello.etcd_endpoints.clone(),
        cluster: sim.clone(),
        address: String::new(),
        token: String::new(),
        ttl_s: 3,
        health: Default::default(),
        etcd_members: false,
    };
    let mut sim_ms = Vec::new();
    for strategy in ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] {
        for _ in 0..5 {
            let t = Instant::now();
            svc.create_pg_for_bench(strategy).await?;
            sim_ms.push(ms(t.elapsed()));
        }
    }
    println!(
        "pg create with {nodes} simulated nodes in etcd (snapshot + place + txn): p50 {:.2} ms, max {:.2} ms",
        pct(&mut sim_ms.clone(), 0.5),
        pct(&mut sim_ms, 1.0)
    );
    let _ = ec.lease_revoke(lease).await;
    ec.delete(
        store.prefix(),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await?;

    // 4. Failure detection: a node agent we start here, then kill -9.
    let exe = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
    let mut child = std::process::Command::new(exe)
        .args([
            "start",
            "--address",
            &addr,
            "--block",
            "--node-ip-address",
            "127.0.0.99",
            "--num-gpus",
            "0",
        ])
        .env("FLOTILLA_CLUSTER_TOKEN", &token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| Error::io("orchestrator", e))?;
    let report = |c: &client::Client| {
        let mut c = c.clone();
        async move {
            let r = c.status(StatusRequest {}).await.ok()?.into_inner();
            serde_json::from_str::<crate::status::Report>(&r.json).ok()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let node_id = loop {
        let joined = report(&c)
            .await
            .and_then(|r| r.active.into_iter().find(|n| n.ip == "127.0.0.99"));
        if let Some(n) = joined {
            break n.id;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(Error::Timeout {
                what: "the bench node to join".into(),
                seconds: 30.0,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let t = Instant::now();
    let _ = child.kill();
    let _ = child.wait();
    loop {
        if report(&c)
            .await
            .is_some_and(|r| r.failures.iter().any(|f| f.id == node_id))
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(Error::Timeout {
                what: "the bench node to be shown dead".into(),
                seconds: 30.0,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "failure detection (kill -9 of a node agent -> shown dead), TTL {} s: {:.0} ms",
        hello.node_ttl_s,
        ms(t.elapsed())
    );
    Ok(())
}

impl HeadService {
    /// The create path of the RPC, minus the network hop.
    pub async fn create_pg_for_bench(&self, strategy: &str) -> Result<()> {
        let pg = self
            .create_pg(CreatePlacementGroupRequest {
                bundles_json: r#"[{"GPU":1},{"GPU":1},{"GPU":1},{"GPU":1},{"GPU":1},{"GPU":1},{"GPU":1},{"GPU":1}]"#.into(),
                strategy: strategy.into(),
                name: String::new(),
                timeout_s: 5.0,
                owner: String::new(),
            })
            .await?;
        self.remove_pg(&pg.id).await?;
        Ok(())
    }
}
