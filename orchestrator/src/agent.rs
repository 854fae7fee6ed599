//! The node agent: holds the node's etcd lease, runs the actors the
//! scheduler assigned to this node, and serves their logs.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{PutOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

use proto::orchestrator::node_agent_server::{NodeAgent, NodeAgentServer};
use proto::orchestrator::{LogsReply, NameOrId};

use crate::auth::Checker;
use crate::error::{Error, Result};
use crate::lease::{spawn_keeper, LeaseState};
use crate::paths::CacheRoot;
use crate::resources::Resources;
use crate::state::{now, ActorRecord, ActorState, NodeRecord, NodeState, Snapshot};
use crate::store::{EtcdConfig, Store};

/// What this node offers.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub ip: String,
    pub is_head: bool,
    pub total: Resources,
    pub gpu_ids: Vec<u32>,
    pub gpu_model: Option<String>,
    pub gpu_memory_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub etcd: EtcdConfig,
    pub cluster: String,
    pub node: NodeSpec,
    pub ttl_s: u64,
    pub root: CacheRoot,
    pub token: String,
}

struct Running {
    child: Child,
    incarnation: u64,
    kill_at: Option<Instant>,
}

/// The agent on its own thread and runtime; actors are spawned from that
/// thread, whose life bounds theirs (PR_SET_PDEATHSIG).
pub fn spawn(
    cfg: AgentConfig,
    cancel: CancellationToken,
    ready: std::sync::mpsc::Sender<Result<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("node-agent".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready.send(Err(Error::Other(format!("agent runtime: {e}"))));
                    return;
                }
            };
            rt.block_on(async move {
                if let Err(e) = run(cfg, cancel, &ready).await {
                    tracing::error!("node agent stopped: {e}");
                    let _ = ready.send(Err(e));
                }
            });
        })
        .expect("spawn node agent thread")
}

async fn run(
    cfg: AgentConfig,
    cancel: CancellationToken,
    ready: &std::sync::mpsc::Sender<Result<String>>,
) -> Result<()> {
    let store = Store::connect(&cfg.etcd, &cfg.cluster).await?;
    std::fs::create_dir_all(cfg.root.logs_dir()).map_err(|e| Error::io(cfg.root.logs_dir(), e))?;

    let listener = tokio::net::TcpListener::bind((cfg.node.ip.as_str(), 0))
        .await
        .map_err(|e| Error::io(format!("{}:0", cfg.node.ip), e))?;
    let agent_address = listener
        .local_addr()
        .map_err(|e| Error::io("agent socket", e))?
        .to_string();
    let svc = NodeAgentServer::with_interceptor(
        LogService {
            root: cfg.root.clone(),
        },
        Checker::new(cfg.token.clone(), "NodeAgent"),
    );
    let server_cancel = cancel.clone();
    tokio::spawn(async move {
        let incoming = tokio_stream_listener(listener);
        let r = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, server_cancel.cancelled())
            .await;
        if let Err(e) = r {
            tracing::error!("node agent gRPC server: {e}");
        }
    });

    let lease = Arc::new(LeaseState::default());
    let keeper_cancel = cancel.child_token();
    let keeper = spawn_keeper(
        cfg.etcd.clone(),
        lease.clone(),
        cfg.ttl_s,
        keeper_cancel.clone(),
    );

    let mut node_id = register(&store, &cfg, &agent_address, &lease).await?;
    let _ = ready.send(Ok(node_id.clone()));
    let mut sup = Supervisor {
        store: store.clone(),
        root: cfg.root.clone(),
        ip: cfg.node.ip.clone(),
        children: HashMap::new(),
        exits: HashMap::new(),
        last_error: None,
    };
    let mut ticker = tokio::time::interval(Duration::from_millis(150));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if lease.lost.load(Ordering::SeqCst) {
            // Our node was declared dead and its actors moved: this agent's
            // processes must not run twice. Start over as a new node.
            tracing::warn!(
                "node {node_id} lost its lease; stopping its actors and registering again"
            );
            sup.kill_all(Duration::from_secs(2));
            loop {
                match register(&store, &cfg, &agent_address, &lease).await {
                    Ok(id) => {
                        node_id = id;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("re-register failed: {e}");
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
            if cancel.is_cancelled() {
                break;
            }
        }
        if !sup.tick(&node_id).await {
            lease.lost.store(true, Ordering::SeqCst);
        }
    }
    sup.kill_all(Duration::from_secs(3));
    // A clean stop shows up at once instead of after the lease TTL.
    let _ = mark_stopped(&store, &node_id).await;
    let id = lease.id.load(Ordering::SeqCst);
    keeper_cancel.cancel();
    if id != 0 {
        let mut c = store.client();
        let _ = tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(id)).await;
    }
    let _ = keeper.join();
    Ok(())
}

fn tokio_stream_listener(
    l: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            // Small RPCs must not wait on Nagle + delayed ACK (40 ms).
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

async fn register(
    store: &Store,
    cfg: &AgentConfig,
    agent_address: &str,
    lease: &LeaseState,
) -> Result<String> {
    let mut c = store.client();
    let grant = c.lease_grant(cfg.ttl_s as i64, None).await?;
    let id = crate::state::new_id("node_");
    let rec = NodeRecord {
        id: id.clone(),
        ip: cfg.node.ip.clone(),
        agent_address: agent_address.to_string(),
        is_head: cfg.node.is_head,
        total: cfg.node.total.clone(),
        gpu_ids: cfg.node.gpu_ids.clone(),
        gpu_model: cfg.node.gpu_model.clone(),
        gpu_memory_bytes: cfg.node.gpu_memory_bytes,
        state: NodeState::Alive,
        started_at: now(),
        died_at: None,
        death_reason: None,
    };
    let value = serde_json::to_string(&rec).expect("records serialize");
    c.txn(Txn::new().and_then([
        TxnOp::put(store.node_key(&id), value, None),
        TxnOp::put(
            store.live_key(&id),
            "",
            Some(PutOptions::new().with_lease(grant.id())),
        ),
    ]))
    .await?;
    lease.id.store(grant.id(), Ordering::SeqCst);
    lease.lost.store(false, Ordering::SeqCst);
    tracing::info!(
        "registered node {id} at {} ({})",
        cfg.node.ip,
        cfg.node.total.shape()
    );
    Ok(id)
}

async fn mark_stopped(store: &Store, node_id: &str) -> Result<()> {
    let snap = store.snapshot().await?;
    if let Some(mut n) = snap.nodes.get(node_id).cloned() {
        n.state = NodeState::Dead;
        n.died_at = Some(now());
        n.death_reason = Some("stopped by `orchestrator stop`".into());
        store
            .commit(None, &[Store::guarded(store.node_key(node_id), &snap, &n)])
            .await?;
    }
    Ok(())
}

struct Supervisor {
    store: Store,
    root: CacheRoot,
    ip: String,
    children: HashMap<String, Running>,
    /// Exits not yet recorded in etcd: actor id -> (incarnation, code).
    exits: HashMap<String, (u64, i32)>,
    last_error: Option<Instant>,
}

impl Supervisor {
    /// One pass; false when this node is no longer registered.
    async fn tick(&mut self, node_id: &str) -> bool {
        let snap = match self.store.snapshot().await {
            Ok(s) => s,
            Err(e) => {
                // Actors keep running through an etcd outage.
                if self
                    .last_error
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(5))
                {
                    tracing::warn!("node agent cannot read etcd: {e}");
                    self.last_error = Some(Instant::now());
                }
                self.reap_only();
                return true;
            }
        };
        self.last_error = None;
        let gone = !snap.live.contains(node_id)
            || snap
                .nodes
                .get(node_id)
                .is_none_or(|n| n.state == NodeState::Dead);
        if gone {
            // etcd answers but our node is gone: the lease expired while this
            // process could not renew it (frozen, partitioned).
            return false;
        }
        let mine: Vec<&ActorRecord> = snap
            .actors
            .values()
            .filter(|a| a.node_id.as_deref() == Some(node_id))
            .collect();
        // Processes that are no longer wanted here.
        let wanted: HashMap<&str, &ActorRecord> = mine
            .iter()
            .filter(|a| a.state != ActorState::Dead)
            .map(|a| (a.id.as_str(), *a))
            .collect();
        for (id, r) in self.children.iter_mut() {
            let keep = wanted
                .get(id.as_str())
                .is_some_and(|a| a.incarnation == r.incarnation);
            if !keep && r.kill_at.is_none() {
                signal_group(&r.child, libc::SIGTERM);
                r.kill_at = Some(Instant::now() + Duration::from_secs(3));
            }
        }
        for a in wanted.values() {
            let running = self
                .children
                .get(&a.id)
                .is_some_and(|r| r.incarnation == a.incarnation);
            if let Some(&(inc, code)) = self.exits.get(&a.id) {
                if inc == a.incarnation {
                    if self
                        .report_exit(&snap, a, Some(code), format!("exited with code {code}"))
                        .await
                    {
                        self.exits.remove(&a.id);
                    }
                    continue;
                }
            }
            if !running
                && a.started_incarnation < a.incarnation
                && !self.children.contains_key(&a.id)
            {
                self.start(&snap, a, node_id).await;
            } else if running && a.started_incarnation < a.incarnation {
                // The ALIVE write lost a race earlier; say it again.
                let pid = self.children[&a.id].child.id();
                self.report_alive(&snap, a, pid).await;
            } else if !running
                && a.started_incarnation == a.incarnation
                && a.state == ActorState::Alive
                && !self.children.contains_key(&a.id)
            {
                // Recorded alive here but not ours to watch: it is gone.
                self.report_exit(&snap, a, None, "its process is gone".into())
                    .await;
            }
        }
        // Exits: recorded on the next pass, against a fresh snapshot.
        for (id, r) in self.children.iter_mut() {
            if let Some(t) = r.kill_at {
                if Instant::now() > t {
                    signal_group(&r.child, libc::SIGKILL);
                }
            }
            if let Ok(Some(st)) = r.child.try_wait() {
                self.exits
                    .insert(id.clone(), (r.incarnation, exit_code(st)));
            }
        }
        for (id, (inc, code)) in self.exits.clone() {
            if self.children.get(&id).is_some_and(|r| r.incarnation == inc) {
                self.children.remove(&id);
            }
            match snap.actors.get(&id) {
                Some(a)
                    if a.incarnation == inc
                        && a.state != ActorState::Dead
                        && a.node_id.as_deref() == Some(node_id) => {}
                Some(a) if a.state == ActorState::Dead && a.exit_code.is_none() => {
                    let mut d = a.clone();
                    d.exit_code = Some(code);
                    d.pid = None;
                    let g = Store::guarded(self.store.actor_key(&id), &snap, &d);
                    if self.store.commit(None, &[g]).await.unwrap_or(false) {
                        self.exits.remove(&id);
                    }
                }
                _ => {
                    self.exits.remove(&id);
                }
            }
        }
        true
    }

    fn reap_only(&mut self) {
        self.children
            .retain(|_, r| !matches!(r.child.try_wait(), Ok(Some(_))));
    }

    async fn start(&mut self, snap: &Snapshot, a: &ActorRecord, node_id: &str) {
        let log_path = self.root.logs_dir().join(format!("actor-{}.log", a.id));
        match spawn_process(a, node_id, &self.ip, &log_path) {
            Ok(child) => {
                let pid = child.id();
                tracing::info!(
                    "started actor {} (pid {pid}, incarnation {})",
                    a.id,
                    a.incarnation
                );
                self.children.insert(
                    a.id.clone(),
                    Running {
                        child,
                        incarnation: a.incarnation,
                        kill_at: None,
                    },
                );
                let mut r = a.clone();
                r.log_path = Some(log_path.display().to_string());
                self.report_alive(snap, &r, pid).await;
            }
            Err(e) => {
                tracing::warn!("cannot start actor {}: {e}", a.id);
                let _ =
                    std::fs::write(&log_path, format!("cannot start {}: {e}\n", a.spec.command));
                self.report_exit(snap, a, Some(127), format!("cannot start: {e}"))
                    .await;
            }
        }
    }

    async fn report_alive(&self, snap: &Snapshot, a: &ActorRecord, pid: u32) {
        let mut r = a.clone();
        r.state = ActorState::Alive;
        r.pid = Some(pid);
        r.started_incarnation = a.incarnation;
        r.exit_code = None;
        let _ = self
            .store
            .commit(
                None,
                &[Store::guarded(self.store.actor_key(&a.id), snap, &r)],
            )
            .await;
    }

    async fn report_exit(
        &self,
        snap: &Snapshot,
        a: &ActorRecord,
        code: Option<i32>,
        why: String,
    ) -> bool {
        let mut r = a.clone();
        r.pid = None;
        r.exit_code = code;
        r.started_incarnation = a.incarnation;
        if a.state != ActorState::Dead && a.can_restart() {
            r.state = ActorState::Restarting;
            r.restarts += 1;
            r.incarnation += 1;
        } else if a.state != ActorState::Dead {
            r.state = ActorState::Dead;
            r.ended_at = Some(now());
            r.death_cause = Some(why);
        }
        self.store
            .commit(
                None,
                &[Store::guarded(self.store.actor_key(&a.id), snap, &r)],
            )
            .await
            .unwrap_or(false)
    }

    fn kill_all(&mut self, grace: Duration) {
        for r in self.children.values() {
            signal_group(&r.child, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !self.children.is_empty() {
            self.reap_only();
            std::thread::sleep(Duration::from_millis(20));
        }
        for r in self.children.values_mut() {
            signal_group(&r.child, libc::SIGKILL);
            let _ = r.child.wait();
        }
        self.children.clear();
    }
}

fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

fn signal_group(child: &Child, sig: i32) {
    // Actors lead their own process group, so this reaches their children too.
    unsafe {
        libc::kill(-(child.id() as i32), sig);
    }
}

fn spawn_process(
    a: &ActorRecord,
    node_id: &str,
    ip: &str,
    log_path: &std::path::Path,
) -> Result<Child> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| Error::io(log_path, e))?;
    let err = log.try_clone().map_err(|e| Error::io(log_path, e))?;
    let mut cmd = Command::new(&a.spec.command);
    cmd.args(&a.spec.args)
        .envs(&a.spec.env)
        .env("FLOTILLA_ACTOR_ID", &a.id)
        .env("FLOTILLA_NODE_ID", node_id)
        .env("FLOTILLA_NODE_IP", ip)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    if !a.gpus.is_empty() {
        let ids: Vec<String> = a.gpus.iter().map(|g| g.id.to_string()).collect();
        cmd.env("CUDA_VISIBLE_DEVICES", ids.join(","));
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| Error::io(&a.spec.command, e))
}

struct LogService {
    root: CacheRoot,
}

/// The most of a log one call returns (its tail).
const LOG_TAIL: u64 = 1 << 20;

#[tonic::async_trait]
impl NodeAgent for LogService {
    async fn actor_logs(
        &self,
        req: tonic::Request<NameOrId>,
    ) -> std::result::Result<tonic::Response<LogsReply>, tonic::Status> {
        let id = req.into_inner().name_or_id;
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::invalid("actor id", format!("'{id}'")).into());
        }
        let path = self.root.logs_dir().join(format!("actor-{id}.log"));
        let data = read_tail(&path, LOG_TAIL)
            .map_err(|e| tonic::Status::not_found(format!("{}: {e}", path.display())))?;
        Ok(tonic::Response::new(LogsReply {
            data,
            path: path.display().to_string(),
        }))
    }
}

fn read_tail(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len > max {
        f.seek(SeekFrom::Start(len - max))?;
    }
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}
