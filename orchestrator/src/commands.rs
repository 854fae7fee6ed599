//! What each subcommand does.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use proto::orchestrator::{
    CreateActorRequest, CreatePlacementGroupRequest, KillActorRequest, ListRequest, NameOrId,
    StatusRequest,
};

use crate::agent::{self, AgentConfig, NodeSpec};
use crate::auth;
use crate::cli::{ActorCmd, Cmd, Conn, Format, PgCmd, StartArgs};
use crate::client;
use crate::detach;
use crate::detect;
use crate::error::{Error, Result};
use crate::etcd_proc::OwnedEtcd;
use crate::head_agent;
use crate::head_service::{self, HeadService};
use crate::leader;
use crate::liveness::alive;
use crate::paths::{read_trimmed, write_file, CacheRoot, PidFile};
use crate::resources::{node_resource, to_fixed, Resources, CPU, GPU, MEMORY, NODE_PREFIX};
use crate::state::{ActorRecord, PgRecord};
use crate::status;
use crate::store::{EtcdConfig, Store};

pub async fn run(cmd: Cmd) -> Result<()> {
    let root = CacheRoot::from_env();
    match cmd {
        Cmd::Start(a) => start(a, &root).await,
        Cmd::Status {
            conn,
            verbose,
            format,
        } => {
            let (mut c, _) = connect(&conn, &root).await?;
            let r = c.status(StatusRequest {}).await?.into_inner();
            if format == Format::Json {
                println!("{}", r.json);
            } else {
                let rep: status::Report =
                    serde_json::from_str(&r.json).map_err(|source| Error::BadReply {
                        what: "status report",
                        source,
                    })?;
                print!("{}", status::render(&rep, verbose));
            }
            Ok(())
        }
        Cmd::List { kind, conn, format } => {
            if !["nodes", "placement-groups", "actors"].contains(&kind.as_str()) {
                return Err(Error::invalid(
                    "list kind",
                    format!("'{kind}' (expected nodes, placement-groups or actors)"),
                ));
            }
            let (mut c, _) = connect(&conn, &root).await?;
            let r = c
                .list(ListRequest { kind: kind.clone() })
                .await?
                .into_inner();
            if format == Format::Json {
                println!("{}", r.json);
            } else {
                print!("{}", list_text(&kind, &r.json)?);
            }
            Ok(())
        }
        Cmd::PlacementGroup { cmd } => match cmd {
            PgCmd::Create {
                conn,
                bundles,
                strategy,
                name,
                timeout,
                format,
                hold,
            } => {
                // Validate before dialing, so bad input is named even with no head.
                crate::resources::parse_bundles(&bundles)?;
                strategy.parse::<crate::placement::Strategy>()?;
                let (mut c, _) = connect(&conn, &root).await?;
                // The owner is alive before the group exists, and kept
                // alive while the create waits for room.
                let keeper = if hold {
                    let who = if name.is_empty() {
                        format!("orchestrator-cli-{}", std::process::id())
                    } else {
                        name.clone()
                    };
                    let owner = client::register_owner(&mut c, &who, 0.0, None).await?;
                    let dialer = client::HeadDialer {
                        address: conn.address.clone(),
                        root: root.clone(),
                        token: auth::client_token(conn.token.as_deref(), &root)?,
                    };
                    Some(client::OwnerKeeper::spawn(
                        c.clone(),
                        dialer,
                        owner.clone(),
                        who,
                    )?)
                    .map(|k| (k, owner.owner_id))
                } else {
                    None
                };
                let r = c
                    .create_placement_group(CreatePlacementGroupRequest {
                        bundles_json: bundles,
                        strategy,
                        name,
                        timeout_s: timeout,
                        owner: keeper
                            .as_ref()
                            .map(|(_, id)| id.clone())
                            .unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                let pg: PgRecord = parse(&r.json)?;
                if format == Format::Json {
                    println!("{}", r.json);
                } else {
                    println!("{}", pg.id);
                }
                if let Some((keeper, _)) = keeper {
                    let held = hold_group(&mut c, &pg.id).await;
                    drop(keeper);
                    held?;
                }
                Ok(())
            }
            PgCmd::Remove { name_or_id, conn } => {
                let (mut c, _) = connect(&conn, &root).await?;
                let r = c
                    .remove_placement_group(NameOrId { name_or_id })
                    .await?
                    .into_inner();
                let pg: PgRecord = parse(&r.json)?;
                println!("removed placement group {}", pg.id);
                Ok(())
            }
        },
        Cmd::Actor { cmd } => actor(cmd, &root).await,
        Cmd::Stop { conn: _ } => stop(&root),
        Cmd::Bench(a) => crate::bench::run(a, &root).await,
        Cmd::Docker { cmd } => crate::docker::run(cmd).await,
    }
}

/// Until Ctrl-C or SIGTERM (then removes the group), or until the group is
/// gone (an error: someone removed it, or the head took this owner for dead).
async fn hold_group(c: &mut client::Client, pg_id: &str) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::os("cannot watch for SIGTERM"))?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let Ok(r) = c
            .list(ListRequest {
                kind: "placement-groups".into(),
            })
            .await
        else {
            // The head is away: the owner keep-alive says so; keep holding.
            continue;
        };
        let pgs: Vec<PgRecord> = parse(&r.into_inner().json)?;
        let live = pgs
            .iter()
            .any(|p| p.id == pg_id && p.state != crate::state::PgState::Removed);
        if !live {
            return Err(Error::GroupRemoved {
                id: pg_id.to_string(),
                during: "held (see `orchestrator status`)",
            });
        }
    }
    c.remove_placement_group(NameOrId {
        name_or_id: pg_id.to_string(),
    })
    .await?;
    println!("removed placement group {pg_id}");
    Ok(())
}

/// The rank in a worker actor's name (`...-rank<N>`, as the ray executor
/// names them).
pub fn rank_of(name: &str) -> Option<usize> {
    let (_, n) = name.rsplit_once("-rank")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|source| Error::BadReply {
        what: "reply",
        source,
    })
}

async fn connect(conn: &Conn, root: &CacheRoot) -> Result<(client::Client, String)> {
    let token = auth::client_token(conn.token.as_deref(), root)?;
    client::connect(conn.address.as_deref(), root, &token).await
}

async fn actor(cmd: ActorCmd, root: &CacheRoot) -> Result<()> {
    match cmd {
        ActorCmd::Create {
            conn,
            command,
            args,
            env,
            resources,
            placement_group,
            bundle_index,
            max_restarts,
            name,
            format,
        } => {
            let mut envs = std::collections::HashMap::new();
            for kv in env {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| Error::invalid("env", format!("'{kv}' (expected K=V)")))?;
                envs.insert(k.to_string(), v.to_string());
            }
            if !resources.trim().is_empty() {
                Resources::from_json_str("resources", &resources)?;
            }
            let (mut c, _) = connect(&conn, root).await?;
            let r = c
                .create_actor(CreateActorRequest {
                    command,
                    args,
                    env: envs,
                    resources_json: resources,
                    placement_group,
                    bundle_index: bundle_index.unwrap_or(-1),
                    max_restarts,
                    name,
                    // Lives until killed: the CLI process is gone at once.
                    owner: String::new(),
                })
                .await?
                .into_inner();
            let a: ActorRecord = parse(&r.json)?;
            if format == Format::Json {
                println!("{}", r.json);
            } else {
                println!("{}", a.id);
            }
            Ok(())
        }
        ActorCmd::Kill { name_or_id, conn } => {
            let (mut c, _) = connect(&conn, root).await?;
            let r = c
                .kill_actor(KillActorRequest {
                    name_or_id,
                    reason: String::new(),
                })
                .await?
                .into_inner();
            let a: ActorRecord = parse(&r.json)?;
            println!("killed actor {}", a.id);
            Ok(())
        }
        ActorCmd::Logs { name_or_id, conn } => {
            let (mut c, _) = connect(&conn, root).await?;
            let r = c.actor_logs(NameOrId { name_or_id }).await?.into_inner();
            use std::io::Write;
            std::io::stdout()
                .write_all(&r.data)
                .map_err(|e| Error::io("stdout", e))?;
            Ok(())
        }
    }
}

fn list_text(kind: &str, js: &str) -> Result<String> {
    let v: Vec<serde_json::Value> = parse(js)?;
    let mut o = String::new();
    let s = |x: &serde_json::Value| match x {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    match kind {
        "nodes" => {
            o += "NODE_ID\tIP\tSTATE\tHEAD\tRESOURCES\n";
            for n in &v {
                let total: Resources =
                    serde_json::from_value(n["total"].clone()).unwrap_or_default();
                let state = if n["alive"] == serde_json::Value::Bool(true) {
                    "ALIVE"
                } else {
                    "DEAD"
                };
                o += &format!(
                    "{}\t{}\t{state}\t{}\t{}\n",
                    s(&n["id"]),
                    s(&n["ip"]),
                    s(&n["is_head"]),
                    total.shape()
                );
            }
        }
        "placement-groups" => {
            o += "PLACEMENT_GROUP_ID\tNAME\tSTATE\tSTRATEGY\tBUNDLES\tOWNER\n";
            for p in &v {
                o += &format!(
                    "{}\t{}\t{}\t{}\t{}\t{}\n",
                    s(&p["id"]),
                    s(&p["name"]),
                    s(&p["state"]),
                    s(&p["strategy"]),
                    p["bundles"].as_array().map(|a| a.len()).unwrap_or(0),
                    s(&p["owner"])
                );
            }
        }
        _ => {
            o += "ACTOR_ID\tNAME\tSTATE\tNODE_ID\tPID\tRESTARTS\tEXIT_CODE\tPLACEMENT_GROUP\tBUNDLE\tRANK\n";
            for a in &v {
                let rank = a["name"]
                    .as_str()
                    .and_then(rank_of)
                    .map_or("-".to_string(), |r| r.to_string());
                o += &format!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{rank}\n",
                    s(&a["id"]),
                    s(&a["name"]),
                    s(&a["state"]),
                    s(&a["node_id"]),
                    s(&a["pid"]),
                    s(&a["restarts"]),
                    s(&a["exit_code"]),
                    s(&a["spec"]["placement_group"]),
                    s(&a["spec"]["bundle_index"])
                );
            }
        }
    }
    Ok(o)
}

/// What this node offers, from flags and detection.
fn node_spec(a: &StartArgs, ip: &str) -> Result<NodeSpec> {
    let detected = detect::gpus();
    let mut total = Resources::new();
    let (gpu_ids, model, gmem) = match a.num_gpus {
        Some(n) if !n.is_finite() || n < 0.0 || n.fract() != 0.0 => {
            return Err(Error::invalid(
                "--num-gpus",
                format!("{n} (must be a whole number >= 0)"),
            ))
        }
        Some(n) => (
            (0..n as u32).collect::<Vec<_>>(),
            detected.model.clone(),
            detected.memory_bytes,
        ),
        None => (
            detected.ids.clone(),
            detected.model.clone(),
            detected.memory_bytes,
        ),
    };
    total.set(GPU, gpu_ids.len() as u64 * crate::resources::UNIT);
    let cpus = match a.num_cpus {
        Some(n) if !n.is_finite() || n < 0.0 => {
            return Err(Error::invalid("--num-cpus", format!("{n} (must be >= 0)")))
        }
        Some(n) => n,
        None => detect::cpu_count() as f64,
    };
    total.set(CPU, to_fixed(cpus));
    total.set(
        MEMORY,
        detect::memory_bytes().saturating_mul(crate::resources::UNIT),
    );
    if let (Some(m), false) = (&model, gpu_ids.is_empty()) {
        total.set(&format!("accelerator_type:{m}"), crate::resources::UNIT);
    }
    if let Some(js) = &a.resources {
        let custom = Resources::from_json_str("--resources", js)?;
        for k in [CPU, GPU] {
            if custom.get(k) > 0 {
                return Err(Error::invalid(
                    "--resources",
                    format!("use --num-{} for {k}", k.to_lowercase()),
                ));
            }
        }
        if let Some(k) = custom.0.keys().find(|k| k.starts_with(NODE_PREFIX)) {
            return Err(Error::invalid(
                "--resources",
                format!("'{k}': every node has {NODE_PREFIX}<its ip> = 1 already; set the ip with --node-ip-address"),
            ));
        }
        total.add(&custom);
    }
    total.set(&node_resource(ip), crate::resources::UNIT);
    Ok(NodeSpec {
        ip: ip.to_string(),
        is_head: a.head || a.head_node,
        total,
        gpu_ids,
        gpu_model: model,
        gpu_memory_bytes: gmem,
    })
}

async fn start(a: StartArgs, root: &CacheRoot) -> Result<()> {
    if !a.head && a.address.is_none() {
        return Err(Error::invalid(
            "start",
            "pass --head (a head; with --address FIRST_HEAD:PORT, one that joins the first head's etcd) or --address HEAD_IP:PORT (a node)",
        ));
    }
    if a.head && a.address.is_some() && !a.etcd_endpoints.is_empty() {
        return Err(Error::invalid(
            "start",
            "--head --address runs a member of the first head's etcd; with an external etcd (--etcd-endpoints) start further heads without --address",
        ));
    }
    if a.node_ttl_s < 2 {
        return Err(Error::invalid(
            "--node-ttl-s",
            "must be at least 2 (etcd's minimum lease)",
        ));
    }
    let toward = a
        .address
        .as_deref()
        .map(|s| s.split(',').next().unwrap_or(s).to_string());
    let (ip, why) = detect::node_ip(a.node_ip_address.as_deref(), toward.as_deref());
    let spec = node_spec(&a, &ip)?;
    // Refuse contradicting etcd options before starting anything.
    let etcd = etcd_config(&a, a.etcd_endpoints.clone());
    etcd.validate()?;
    if a.head && !a.etcd_endpoints.is_empty() {
        etcd.urls()?;
    }
    if a.head && a.etcd_endpoints.is_empty() && etcd.tls() {
        return Err(Error::invalid(
            "etcd TLS options",
            "they need --etcd-endpoints: the etcd a head starts itself serves plain HTTP",
        ));
    }
    root.ensure()?;
    if !a.block {
        return daemonize(root);
    }
    eprintln!("node IP {ip} ({why})");
    let cancel = CancellationToken::new();
    let sig = cancel.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        sig.cancel();
    });
    if a.head {
        run_head(a, spec, root, cancel).await
    } else {
        run_node(a, spec, root, cancel).await
    }
}

/// Without --block: run the same command in the background and return once
/// it is up, as `ray start` does.
fn daemonize(root: &CacheRoot) -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.push("--block".into());
    let (mut cmd, log_path) = detach::self_command(root, "orchestrator", &args)?;
    let mut child = cmd.spawn().map_err(|e| Error::io("orchestrator", e))?;
    let pid_file = root.pids_dir().join(child.id().to_string());
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(Error::ExitedEarly {
                what: "orchestrator",
                status: st,
                log: tail,
            });
        }
        if read_trimmed(&pid_file).is_some_and(|s| s.contains("ready")) {
            print!("{}", std::fs::read_to_string(&log_path).unwrap_or_default());
            println!(
                "Started (pid {}); logs in {}. Stop it with `orchestrator stop`.",
                child.id(),
                log_path.display()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(Error::Timeout {
        what: format!(
            "waiting for the orchestrator to start (see {})",
            log_path.display()
        ),
        seconds: 60.0,
    })
}

fn etcd_config(a: &StartArgs, endpoints: Vec<String>) -> EtcdConfig {
    EtcdConfig::new(endpoints, &a.etcd)
}

/// The head's token: the one given, else the local file, else the one in
/// etcd (a standby joining), else a new one. It must match etcd's.
async fn head_token(store: &Store, explicit: Option<&str>, root: &CacheRoot) -> Result<String> {
    let local = explicit
        .filter(|t| !t.is_empty())
        .map(String::from)
        .or_else(|| read_trimmed(&root.token_file()));
    let proposal = local.clone().unwrap_or_else(auth::generate);
    let stored = store
        .put_if_absent(&store.token_key(), &proposal, None)
        .await?;
    if explicit.is_some_and(|t| !t.is_empty() && t != stored) {
        return Err(Error::Unauthenticated(
            "the given --token is not this cluster's token".into(),
        ));
    }
    auth::write_token_file(root, &stored)?;
    Ok(stored)
}

async fn run_head(
    a: StartArgs,
    spec: NodeSpec,
    root: &CacheRoot,
    cancel: CancellationToken,
) -> Result<()> {
    let mut a = a;
    let slot = format!("{}:{}", spec.ip, a.port);
    // Started from this (the main) thread on purpose: etcd's parent-death
    // signal follows the spawning thread, and this one lives as long as the
    // head process (the main future is polled on the main thread).
    let (owned, endpoints) = if !a.etcd_endpoints.is_empty() {
        (None, a.etcd_endpoints.clone())
    } else if let Some(first) = a.address.clone() {
        // A further head: it joins the first head's cluster and its etcd.
        let token = auth::client_token(a.token.as_deref(), root)?;
        let (mut c, _) = client::connect(Some(&first), root, &token).await?;
        let hello = c
            .hello(proto::orchestrator::HelloRequest {})
            .await?
            .into_inner();
        a.cluster_name = hello.cluster_prefix.clone();
        if hello.node_ttl_s >= 2 {
            a.node_ttl_s = hello.node_ttl_s as u64;
        }
        a.token = Some(token);
        let existing = etcd_config(&a, hello.etcd_endpoints.clone());
        let e = crate::members::join(root, &spec.ip, &slot, &existing).await?;
        eprintln!(
            "joined the etcd of head {first} as member {} at {}",
            e.name, e.endpoint
        );
        let mut eps = vec![e.endpoint.clone()];
        eps.extend(
            hello
                .etcd_endpoints
                .into_iter()
                .filter(|x| *x != e.endpoint),
        );
        (Some(e), eps)
    } else {
        // After a crash, the same member on the same data and ports: agents
        // still dial it, and the cluster's state is all there.
        let (m, what) = match crate::etcd_proc::saved(root, &slot) {
            Some(s) => (crate::etcd_proc::Membership::Resume(s), "resumed"),
            None => (crate::etcd_proc::Membership::New, "started"),
        };
        let e = OwnedEtcd::start(root, &spec.ip, &slot, m)?;
        eprintln!("{what} etcd at {}", e.endpoint);
        let ep = e.endpoint.clone();
        (Some(e), vec![ep])
    };
    let etcd = etcd_config(&a, endpoints.clone());
    let store = Store::connect(&etcd, &a.cluster_name).await?;
    let token = head_token(&store, a.token.as_deref(), root).await?;
    let address = format!("{}:{}", spec.ip, a.port);
    let listener = tokio::net::TcpListener::bind((spec.ip.as_str(), a.port))
        .await
        .map_err(|e| Error::io(format!("head port {address}"), e))?;
    let health = crate::health::SharedHealth::default();
    let svc = HeadService {
        store: store.clone(),
        etcd_endpoints: endpoints,
        cluster: a.cluster_name.clone(),
        address: address.clone(),
        token: token.clone(),
        ttl_s: a.node_ttl_s,
        health: health.clone(),
        etcd_members: owned.is_some(),
    };
    let server_cancel = cancel.clone();
    let server = tokio::spawn(async move {
        let incoming = futures::stream::unfold(listener, |l| async move {
            let r = l.accept().await.map(|(s, _)| {
                // Small RPCs must not wait on Nagle + delayed ACK (40 ms).
                let _ = s.set_nodelay(true);
                s
            });
            Some((r, l))
        });
        tonic::transport::Server::builder()
            .add_service(head_service::server(svc))
            .serve_with_incoming_shutdown(incoming, server_cancel.cancelled())
            .await
    });
    let leading = Arc::new(AtomicBool::new(false));
    let leader = tokio::spawn(leader::leader_loop(
        store.clone(),
        etcd.clone(),
        address.clone(),
        a.node_ttl_s,
        leading.clone(),
        health,
        cancel.clone(),
    ));
    // The head file names the first live head on this machine.
    let existing = read_trimmed(&root.head_address_file());
    let stale = existing.as_deref().is_none_or(|e| {
        e == address
            || std::net::TcpStream::connect_timeout(
                &e.parse()
                    .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 1))),
                Duration::from_millis(300),
            )
            .is_err()
    });
    if stale {
        write_file(&root.head_address_file(), &address)?;
    }
    client::remember_heads(root, std::slice::from_ref(&address));

    let agent = match head_agent::find(root, &address) {
        Some(found) => {
            eprintln!(
                "the head's node agent (pid {}, node {}) is still running: adopting it",
                found.pid, found.node_id
            );
            Ok(found)
        }
        None => {
            let args = head_agent::agent_args(&a, &spec.ip, &address);
            let (root, head, token, etcd) =
                (root.clone(), address.clone(), token.clone(), a.etcd.clone());
            tokio::task::spawn_blocking(move || {
                head_agent::spawn(&root, &head, &args, &token, &etcd)
            })
            .await
            .map_err(|source| Error::TaskFailed {
                what: "head node agent",
                source,
            })
            .and_then(|r| r)
        }
    };
    let result = match agent {
        Ok(agent) => {
            let node_id = agent.node_id.clone();
            let pid = match PidFile::create(root, &format!("head {address} node {node_id} ready")) {
                Ok(p) => p,
                Err(e) => {
                    let _ = tokio::task::spawn_blocking(move || agent.stop()).await;
                    cancel.cancel();
                    let _ = leader.await;
                    return Err(e);
                }
            };
            eprintln!(
                "head listening on {address} (node {node_id}, agent pid {}); join with `orchestrator start --address {address}`; token in {}",
                agent.pid,
                root.token_file().display()
            );
            let agent =
                watch_head_agent(agent, &a, &spec.ip, &address, root, &token, &cancel).await;
            // A graceful stop takes the head's node along; only a crash
            // leaves it running.
            if let Some(agent) = agent {
                let _ = tokio::task::spawn_blocking(move || agent.stop()).await;
            }
            drop(pid);
            Ok(())
        }
        Err(e) => {
            cancel.cancel();
            Err(e)
        }
    };
    let _ = leader.await;
    // Graceful shutdown waits for clients to hang up; don't let one keep
    // the head (and its etcd) alive.
    let mut server = server;
    if tokio::time::timeout(Duration::from_secs(2), &mut server)
        .await
        .is_err()
    {
        server.abort();
    }
    if read_trimmed(&root.head_address_file()).as_deref() == Some(address.as_str()) {
        let _ = std::fs::remove_file(root.head_address_file());
    }
    if let Some(e) = &owned {
        // A clean stop leaves the etcd cluster, so the others' quorum no
        // longer counts this member (a crash keeps it: it may come back).
        let left = tokio::time::timeout(
            Duration::from_secs(12),
            crate::members::leave(&etcd, &e.peer_url),
        )
        .await;
        match left {
            Ok(Ok(true)) => eprintln!("removed etcd member {}", e.name),
            Ok(Ok(false)) => {}
            Ok(Err(err)) => eprintln!("could not remove etcd member {}: {err}", e.name),
            Err(_) => eprintln!("could not remove etcd member {}: timed out", e.name),
        }
    }
    if let Some(e) = owned {
        e.stop_and_forget();
    }
    result
}

/// Until `cancel`: starts the head's node agent again whenever it dies (a
/// crash or kill -9; it takes its node id and actors back, see
/// identity.rs and adopt.rs). Returns the agent running at the end.
async fn watch_head_agent(
    mut agent: head_agent::HeadAgent,
    a: &StartArgs,
    ip: &str,
    address: &str,
    root: &CacheRoot,
    token: &str,
    cancel: &CancellationToken,
) -> Option<head_agent::HeadAgent> {
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Some(agent),
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        if agent.is_alive() {
            continue;
        }
        // `stop` signals the agent and the head together: an agent that
        // ended because of it is not one to start again.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if cancel.is_cancelled() {
            return Some(agent);
        }
        tracing::warn!(
            "the head's node agent (pid {}, node {}) died; starting it again",
            agent.pid,
            agent.node_id
        );
        let args = head_agent::agent_args(a, ip, address);
        let (r, h, t, e) = (
            root.clone(),
            address.to_string(),
            token.to_string(),
            a.etcd.clone(),
        );
        match tokio::task::spawn_blocking(move || head_agent::spawn(&r, &h, &args, &t, &e)).await {
            Ok(Ok(new)) => {
                tracing::info!(
                    "the head's node agent runs again (pid {}, node {})",
                    new.pid,
                    new.node_id
                );
                agent = new;
            }
            Ok(Err(e)) => tracing::warn!("restarting the head's node agent failed: {e}"),
            Err(e) => tracing::warn!("restarting the head's node agent failed: {e}"),
        }
    }
}

fn start_agent(
    etcd: &EtcdConfig,
    a: &StartArgs,
    spec: NodeSpec,
    root: &CacheRoot,
    token: &str,
    cancel: CancellationToken,
) -> Result<(String, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let cfg = AgentConfig {
        etcd: etcd.clone(),
        cluster: a.cluster_name.clone(),
        node: spec,
        ttl_s: a.node_ttl_s,
        root: root.clone(),
        token: token.to_string(),
        heads: a
            .address
            .iter()
            .flat_map(|x| x.split(','))
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect(),
    };
    let handle = agent::spawn(cfg, cancel, tx)?;
    let id = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| Error::Timeout {
            what: "node agent registration".into(),
            seconds: 30.0,
        })??;
    Ok((id, handle))
}

async fn join(h: std::thread::JoinHandle<()>) {
    let _ = tokio::task::spawn_blocking(move || h.join()).await;
}

async fn run_node(
    a: StartArgs,
    spec: NodeSpec,
    root: &CacheRoot,
    cancel: CancellationToken,
) -> Result<()> {
    let token = auth::client_token(a.token.as_deref(), root)?;
    let (mut c, addr) = match (a.head_node, a.address.as_deref()) {
        (true, Some(head)) => (
            client::connect_only(head, &token, Duration::from_secs(20)).await?,
            head.to_string(),
        ),
        _ => client::connect(a.address.as_deref(), root, &token).await?,
    };
    let hello = c
        .hello(proto::orchestrator::HelloRequest {})
        .await?
        .into_inner();
    let mut args = a.clone();
    args.cluster_name = hello.cluster_prefix.clone();
    if hello.node_ttl_s >= 2 {
        args.node_ttl_s = hello.node_ttl_s as u64;
    }
    let etcd = etcd_config(&a, hello.etcd_endpoints.clone());
    let agent_cancel = cancel.child_token();
    let (node_id, agent) = start_agent(&etcd, &args, spec, root, &token, agent_cancel.clone())?;
    let role = if a.head_node {
        head_agent::role(&node_id, &addr)
    } else {
        format!("node {node_id} head {addr} ready")
    };
    let pid = PidFile::create(root, &role)?;
    eprintln!("node {node_id} joined the cluster of head {addr}");
    cancel.cancelled().await;
    agent_cancel.cancel();
    join(agent).await;
    drop(pid);
    Ok(())
}

/// Stops the orchestrator processes this machine's cache root lists.
fn stop(root: &CacheRoot) -> Result<()> {
    let dir = root.pids_dir();
    let mut pids: BTreeMap<i32, String> = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("orchestrator") {
                pids.insert(pid, read_trimmed(&e.path()).unwrap_or_default());
            } else {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if pids.is_empty() {
        println!(
            "No orchestrator processes found under {}.",
            root.0.display()
        );
        return Ok(());
    }
    for pid in pids.keys() {
        unsafe {
            libc::kill(*pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && pids.keys().any(|p| alive(*p)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in pids.keys().filter(|p| alive(**p)) {
        unsafe {
            libc::kill(*pid, libc::SIGKILL);
        }
        let _ = std::fs::remove_file(dir.join(pid.to_string()));
    }
    println!("Stopped {} orchestrator process(es).", pids.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_comes_from_the_worker_name() {
        assert_eq!(rank_of("flotilla-gateway-12-ab12cd34-rank0"), Some(0));
        assert_eq!(rank_of("x-rank17"), Some(17));
        assert_eq!(rank_of("x-rank"), None);
        assert_eq!(rank_of("x-rank1a"), None);
        assert_eq!(rank_of("trainer"), None);
        assert_eq!(rank_of(""), None);
    }

    #[test]
    fn actor_and_group_tables_show_placement_and_owner() {
        let actors = serde_json::json!([
            {"id": "actor_1", "name": "gw-rank1", "state": "ALIVE", "node_id": "n1",
             "pid": 42, "restarts": 0, "exit_code": null,
             "spec": {"placement_group": "pg_1", "bundle_index": 1}},
            {"id": "actor_2", "name": "", "state": "ALIVE", "node_id": "n1",
             "pid": 43, "restarts": 0, "exit_code": null,
             "spec": {"placement_group": null, "bundle_index": null}}
        ]);
        let t = list_text("actors", &actors.to_string()).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("\tPLACEMENT_GROUP\tBUNDLE\tRANK"), "{t}");
        assert!(lines[1].ends_with("\tpg_1\t1\t1"), "{t}");
        assert!(lines[2].ends_with("\t-\t-\t-"), "{t}");
        let pgs = serde_json::json!([
            {"id": "pg_1", "name": "", "state": "CREATED", "strategy": "PACK",
             "bundles": [{}], "owner": "owner_9"},
            {"id": "pg_2", "name": "", "state": "CREATED", "strategy": "PACK",
             "bundles": [{}], "owner": null}
        ]);
        let t = list_text("placement-groups", &pgs.to_string()).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("\tBUNDLES\tOWNER"), "{t}");
        assert!(lines[1].ends_with("\t1\towner_9"), "{t}");
        assert!(lines[2].ends_with("\t1\t-"), "{t}");
    }
}
