//! The node agent: holds the node's etcd lease, runs the actors the
//! scheduler assigned to this node, and serves their logs.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

use proto::orchestrator::node_agent_server::{NodeAgent, NodeAgentServer};
use proto::orchestrator::{LogsReply, NameOrId};

use crate::adopt;
use crate::auth::Checker;
use crate::error::{Error, Result};
use crate::events::{Event, EventKind};
use crate::identity;
use crate::lease::{spawn_keeper, LeaseState};
use crate::paths::CacheRoot;
use crate::resources::Resources;
use crate::state::{now, ActorRecord, ActorState, NodeRecord, NodeState, Snapshot};
use crate::store::{EtcdConfig, Store};
use crate::witness::{self, Verdict};
use runtime::envs;

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
    /// The heads it joined through: witnesses (witness.rs) until a
    /// snapshot lists the live ones.
    pub heads: Vec<String>,
}

/// The agent on its own thread and runtime. Actors are not tied to it:
/// they run in sessions of their own with no parent-death signal, so a
/// crashed agent leaves them running and its successor adopts them.
pub fn spawn(
    cfg: AgentConfig,
    cancel: CancellationToken,
    ready: std::sync::mpsc::Sender<Result<String>>,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("node-agent".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready.send(Err(Error::Os {
                        what: "agent runtime",
                        source: e,
                    }));
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
        .map_err(Error::os("cannot start the node agent thread"))
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
    )?;

    // The same machine keeps its node id across agent restarts.
    let node_id = identity::load(&cfg.root, &cfg.cluster, &cfg.node.ip, adopt::running)
        .unwrap_or_else(|| crate::state::new_id("node_"));
    let mut sup = Supervisor {
        store: store.clone(),
        root: cfg.root.clone(),
        ip: cfg.node.ip.clone(),
        children: HashMap::new(),
        exits: HashMap::new(),
        last_error: None,
        pending: Vec::new(),
        heads: cfg.heads.clone(),
    };
    // Actor processes a previous run left: the first pass keeps those etcd
    // still assigns here and stops the rest, before anything starts.
    for f in adopt::scan(&node_id) {
        tracing::info!(
            "found actor {} (pid {}, incarnation {}) left by a previous agent of node {node_id}",
            f.actor_id,
            f.pid,
            f.incarnation
        );
        sup.children.insert(
            f.actor_id,
            Running {
                proc: Proc::Adopted(f.pid),
                incarnation: f.incarnation,
                kill_at: None,
                adopted: true,
            },
        );
    }
    let snap = store.snapshot().await?;
    sup.fence(&snap, &node_id);
    register(&store, &cfg, &agent_address, &lease, &node_id, &snap).await?;
    identity::save(&cfg.root, &cfg.cluster, &cfg.node.ip, &node_id)?;
    let _ = ready.send(Ok(node_id.clone()));
    let mut ticker = tokio::time::interval(Duration::from_millis(150));
    let mut last_register_error: Option<Instant> = None;
    let result = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break Ok(()),
            _ = ticker.tick() => {}
        }
        // A stop cancels the keeper (a child token) too: that is a clean
        // stop, not a keeper that died, so cancellation is checked first.
        if cancel.is_cancelled() {
            break Ok(());
        }
        if lease.keeper_stopped.load(Ordering::SeqCst) {
            // Read after the flag: a cancel that stopped the keeper is
            // already visible here.
            if cancel.is_cancelled() {
                break Ok(());
            }
            // Nobody renews our lease any more: leave the actors running
            // for the next agent to adopt, as a crash would.
            break Err(Error::KeeperStopped(format!(
                "node {node_id} cannot keep its lease; actors are left running"
            )));
        }
        let snap = match sup.tick(&node_id).await {
            Seen::Registered => continue,
            Seen::NoEtcd => {
                sup.fence_if_cut_off(&node_id, &lease, &cfg).await;
                continue;
            }
            Seen::Unregistered(snap) => snap,
        };
        // etcd answers but our lease is gone: it lapsed while etcd was away
        // (actors kept) or this node was declared dead while silent (its
        // actors moved; `tick` has just stopped our superseded copies).
        // Either way: the same node registers again with a new lease.
        let was_dead = snap
            .nodes
            .get(&node_id)
            .is_some_and(|n| n.state == NodeState::Dead);
        match register(&store, &cfg, &agent_address, &lease, &node_id, &snap).await {
            Ok(()) => {
                last_register_error = None;
                let msg = if was_dead {
                    format!(
                        "node {node_id} ({}) was declared dead while away; it stopped its superseded actors and registered again",
                        cfg.node.ip
                    )
                } else {
                    format!(
                        "node {node_id} ({}) lost its lease (etcd was away?); it kept its {} actor(s) and registered again",
                        cfg.node.ip,
                        sup.children.len()
                    )
                };
                tracing::warn!("{msg}");
                store
                    .record_events(&[Event::new(now(), EventKind::NodeRecovered, &node_id, msg)])
                    .await;
            }
            Err(e) => {
                if last_register_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!("node {node_id}: registering again failed: {e}");
                    last_register_error = Some(Instant::now());
                }
            }
        }
    };
    if result.is_err() {
        keeper_cancel.cancel();
        let _ = tokio::task::spawn_blocking(move || keeper.join()).await;
        return result;
    }
    sup.kill_all(Duration::from_secs(3)).await;
    // A clean stop shows up at once instead of after the lease TTL, and
    // the next start on this machine is a new node.
    let _ = mark_stopped(&store, &node_id).await;
    identity::forget(&cfg.root, &cfg.cluster, &cfg.node.ip);
    let id = lease.id.load(Ordering::SeqCst);
    keeper_cancel.cancel();
    if id != 0 {
        let mut c = store.client();
        let _ = tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(id)).await;
    }
    let _ = tokio::task::spawn_blocking(move || keeper.join()).await;
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

/// Registers `id` with a new lease: the node record (Alive) and its
/// lease-bound liveness key, in one transaction guarded on the node record
/// as `snap` saw it, so a decision the leader took meanwhile (declaring the
/// node dead, moving its actors) is read and obeyed before we come back.
async fn register(
    store: &Store,
    cfg: &AgentConfig,
    agent_address: &str,
    lease: &LeaseState,
    id: &str,
    snap: &Snapshot,
) -> Result<()> {
    let mut c = store.client();
    let sent = Instant::now();
    let grant = c.lease_grant(cfg.ttl_s as i64, None).await?;
    let started_at = snap
        .nodes
        .get(id)
        .filter(|n| n.state == NodeState::Alive)
        .map_or_else(now, |n| n.started_at);
    let rec = NodeRecord {
        id: id.to_string(),
        ip: cfg.node.ip.clone(),
        agent_address: agent_address.to_string(),
        is_head: cfg.node.is_head,
        total: cfg.node.total.clone(),
        gpu_ids: cfg.node.gpu_ids.clone(),
        gpu_model: cfg.node.gpu_model.clone(),
        gpu_memory_bytes: cfg.node.gpu_memory_bytes,
        state: NodeState::Alive,
        started_at,
        died_at: None,
        death_reason: None,
    };
    let g = Store::guarded(store.node_key(id), snap, &rec);
    let txn = Txn::new()
        .when([Compare::mod_revision(
            g.key.as_str(),
            CompareOp::Equal,
            g.expect_rev,
        )])
        .and_then([
            TxnOp::put(g.key.as_str(), g.value.as_str(), None),
            TxnOp::put(
                store.live_key(id),
                "",
                Some(PutOptions::new().with_lease(grant.id())),
            ),
        ]);
    let ok = match c.txn(txn).await {
        Ok(r) => r.succeeded(),
        Err(e) => {
            let _ = c.lease_revoke(grant.id()).await;
            return Err(e.into());
        }
    };
    if !ok {
        // The leader changed the node meanwhile: read again, obey, retry.
        let _ = c.lease_revoke(grant.id()).await;
        return Err(Error::Contention { attempts: 1 });
    }
    lease.id.store(grant.id(), Ordering::SeqCst);
    lease.lost.store(false, Ordering::SeqCst);
    lease.renewed_at(sent);
    tracing::info!(
        "registered node {id} at {} ({})",
        cfg.node.ip,
        cfg.node.total.shape()
    );
    Ok(())
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

/// A process this agent runs: its own child, or one a previous agent of
/// this node started (adopted: it can be signalled, not waited for).
enum Proc {
    Child(Child),
    Adopted(u32),
}

impl Proc {
    fn pid(&self) -> u32 {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted(p) => *p,
        }
    }

    /// Some(exit code, if known) once it has ended.
    fn try_exit(&mut self) -> Option<Option<i32>> {
        match self {
            Proc::Child(c) => match c.try_wait() {
                Ok(Some(st)) => Some(Some(exit_code(st))),
                _ => None,
            },
            Proc::Adopted(p) => (!adopt::running(*p)).then_some(None),
        }
    }

    fn signal(&self, sig: i32) {
        // Actors lead their own session and process group, so this reaches
        // their children too.
        // SAFETY: a plain signal to a process group this node started.
        unsafe {
            libc::kill(-(self.pid() as i32), sig);
        }
    }
}

struct Running {
    proc: Proc,
    incarnation: u64,
    kill_at: Option<Instant>,
    /// Found at start-up; logged once when etcd confirms it is ours.
    adopted: bool,
}

/// The longest one pass waits for its snapshot.
const TICK_READ: Duration = Duration::from_millis(1000);

/// What one pass saw.
enum Seen {
    /// etcd did not answer: nothing changes (outage is not failure),
    /// unless the heads show this node cut off (`fence_if_cut_off`).
    NoEtcd,
    Registered,
    /// etcd answers but this node has no live lease.
    Unregistered(Box<Snapshot>),
}

struct Supervisor {
    store: Store,
    root: CacheRoot,
    ip: String,
    children: HashMap<String, Running>,
    /// Exits not yet recorded in etcd: actor id -> (incarnation, code).
    exits: HashMap<String, (u64, Option<i32>)>,
    last_error: Option<Instant>,
    /// Events to record on the next pass etcd answers.
    pending: Vec<Event>,
    /// The live heads as the last snapshot listed them: the witnesses.
    heads: Vec<String>,
}

impl Supervisor {
    /// Stops every process etcd no longer assigns to this node at its
    /// incarnation: the actor moved (this node was declared dead meanwhile),
    /// was killed, or a newer incarnation replaced it. Runs on every pass
    /// etcd answers, registered or not, so a returning node stops its
    /// superseded copies before it registers again.
    fn fence(&mut self, snap: &Snapshot, node_id: &str) {
        for (id, r) in self.children.iter_mut() {
            let rec = snap.actors.get(id);
            let keep = rec.is_some_and(|a| {
                a.state != ActorState::Dead
                    && a.node_id.as_deref() == Some(node_id)
                    && a.incarnation == r.incarnation
            });
            if keep {
                if r.adopted {
                    r.adopted = false;
                    let msg = format!(
                        "adopted actor {id} (pid {}, incarnation {}) left running by a previous agent of node {node_id}",
                        r.proc.pid(),
                        r.incarnation
                    );
                    tracing::info!("{msg}");
                    self.pending
                        .push(Event::new(now(), EventKind::ActorAdopted, id, msg));
                }
                continue;
            }
            if r.kill_at.is_none() {
                let why = match rec {
                    None => "it is no longer recorded".to_string(),
                    Some(a) if a.state == ActorState::Dead => a
                        .death_cause
                        .clone()
                        .unwrap_or_else(|| "it was killed".to_string()),
                    Some(a) if a.node_id.as_deref() != Some(node_id) => format!(
                        "it now belongs to node {} at incarnation {}",
                        a.node_id.as_deref().unwrap_or("(none yet)"),
                        a.incarnation
                    ),
                    Some(a) => format!("incarnation {} superseded it", a.incarnation),
                };
                let msg = format!(
                    "stopping actor {id} (pid {}, incarnation {}) on node {node_id}: {why}",
                    r.proc.pid(),
                    r.incarnation
                );
                tracing::warn!("{msg}");
                self.pending
                    .push(Event::new(now(), EventKind::ActorFenced, id, msg));
                r.proc.signal(libc::SIGTERM);
                r.kill_at = Some(Instant::now() + Duration::from_secs(3));
            }
        }
    }

    /// Self-fencing while etcd does not answer (witness.rs has the rule):
    /// once the lease has gone unrenewed for half the TTL, the heads
    /// are asked, and unless each is accounted for as unable to declare
    /// this node dead, every actor is stopped before the lease can lapse,
    /// so that its restarted copy elsewhere is the only one. The node
    /// registers again through the usual path once etcd answers.
    async fn fence_if_cut_off(&mut self, node_id: &str, lease: &LeaseState, cfg: &AgentConfig) {
        if self.children.values().all(|r| r.kill_at.is_some()) {
            return;
        }
        let ttl = Duration::from_secs(cfg.ttl_s.max(1));
        let Some(silent) = lease.since_renewal() else {
            return;
        };
        if silent < witness::ask_after(cfg.ttl_s) {
            return;
        }
        let answers = witness::ask_all(&self.heads, &cfg.token, node_id).await;
        // Measured again: the question itself took time.
        let silent = lease.since_renewal().unwrap_or(silent);
        let Verdict::Fence(why) = witness::verdict(&answers, silent >= ttl) else {
            return;
        };
        // Before the lease can lapse by our clock (TTL since the last
        // renewal sent), or at once if it may have: no later than that
        // the leader may restart these actors elsewhere.
        let deadline = Instant::now() + ttl.saturating_sub(silent);
        for (id, r) in self.children.iter_mut() {
            if r.kill_at.is_some() {
                continue;
            }
            let msg = format!(
                "actor {id} (pid {}, incarnation {}) fenced: node {node_id} ({}) cut off, etcd unanswered for {:.1} s and {why}",
                r.proc.pid(),
                r.incarnation,
                self.ip,
                silent.as_secs_f64()
            );
            tracing::warn!("{msg}");
            self.pending
                .push(Event::new(now(), EventKind::ActorFenced, id, msg));
            r.proc.signal(libc::SIGTERM);
            r.kill_at = Some(deadline);
        }
        self.poll();
    }

    /// Escalates overdue stops and collects exits.
    fn poll(&mut self) {
        let mut ended = Vec::new();
        for (id, r) in self.children.iter_mut() {
            if r.kill_at.is_some_and(|t| Instant::now() > t) {
                r.proc.signal(libc::SIGKILL);
            }
            if let Some(code) = r.proc.try_exit() {
                ended.push((id.clone(), r.incarnation, code));
            }
        }
        for (id, inc, code) in ended {
            self.children.remove(&id);
            self.exits.insert(id, (inc, code));
        }
    }

    /// One pass against a fresh snapshot.
    async fn tick(&mut self, node_id: &str) -> Seen {
        // Bounded well below the client's own timeout: behind a cut link a
        // read hangs rather than fails, and self-fencing (which runs
        // between passes) must not wait for it past the lease's life.
        let read = tokio::time::timeout(TICK_READ, self.store.snapshot()).await;
        let read = read.unwrap_or_else(|_| {
            Err(Error::Timeout {
                what: "the agent's snapshot read".into(),
                seconds: TICK_READ.as_secs_f64(),
            })
        });
        let snap = match read {
            Ok(s) => s,
            Err(e) => {
                // Actors keep running through an etcd outage.
                if self
                    .last_error
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(5))
                {
                    tracing::warn!("node agent cannot read etcd (actors keep running): {e}");
                    self.last_error = Some(Instant::now());
                }
                self.poll();
                return Seen::NoEtcd;
            }
        };
        self.last_error = None;
        if !snap.heads.is_empty() {
            self.heads = snap.heads.clone();
        }
        self.fence(&snap, node_id);
        if !self.pending.is_empty() {
            let evs = std::mem::take(&mut self.pending);
            self.store.record_events(&evs).await;
        }
        let registered = snap.live.contains(node_id)
            && snap
                .nodes
                .get(node_id)
                .is_some_and(|n| n.state == NodeState::Alive);
        if !registered {
            // Start nothing and record nothing until registered again.
            self.poll();
            return Seen::Unregistered(Box::new(snap));
        }
        let wanted: Vec<&ActorRecord> = snap
            .actors
            .values()
            .filter(|a| a.node_id.as_deref() == Some(node_id) && a.state != ActorState::Dead)
            .collect();
        for a in wanted {
            let running = self
                .children
                .get(&a.id)
                .is_some_and(|r| r.incarnation == a.incarnation);
            if let Some(&(inc, code)) = self.exits.get(&a.id) {
                if inc == a.incarnation {
                    let why = match code {
                        Some(c) => format!("exited with code {c}"),
                        None => "its process is gone".to_string(),
                    };
                    if self.report_exit(&snap, a, code, why).await {
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
                let pid = self.children[&a.id].proc.pid();
                self.report_alive(&snap, a, pid).await;
            } else if !running
                && a.started_incarnation == a.incarnation
                && a.state == ActorState::Alive
                && !self.children.contains_key(&a.id)
            {
                // Recorded alive here but no process of ours runs it: gone.
                self.report_exit(&snap, a, None, "its process is gone".into())
                    .await;
            }
        }
        // Exits: recorded on the next pass, against a fresh snapshot.
        self.poll();
        for (id, (inc, code)) in self.exits.clone() {
            match snap.actors.get(&id) {
                Some(a)
                    if a.incarnation == inc
                        && a.state != ActorState::Dead
                        && a.node_id.as_deref() == Some(node_id) => {}
                Some(a)
                    if a.state == ActorState::Dead && a.exit_code.is_none() && code.is_some() =>
                {
                    let mut d = a.clone();
                    d.exit_code = code;
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
        Seen::Registered
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
                        proc: Proc::Child(child),
                        incarnation: a.incarnation,
                        kill_at: None,
                        adopted: false,
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

    /// Stops every actor (a clean stop of the node): SIGTERM, then SIGKILL
    /// after `grace`.
    async fn kill_all(&mut self, grace: Duration) {
        for r in self.children.values() {
            r.proc.signal(libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !self.children.is_empty() {
            self.poll();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for r in self.children.values_mut() {
            r.proc.signal(libc::SIGKILL);
            if let Proc::Child(c) = &mut r.proc {
                let _ = c.wait();
            }
        }
        self.children.clear();
    }
}

fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// What an actor process learns about itself, set over its spec's
/// environment: a creator that is itself an actor may pass its own copies
/// along, and those must never describe the child. `None`: removed (an
/// actor outside any placement group has none, as Ray's
/// `get_current_placement_group()` returns None there).
pub fn identity_env(
    a: &ActorRecord,
    node_id: &str,
    ip: &str,
) -> Vec<(&'static str, Option<String>)> {
    let group = a.spec.placement_group.clone();
    let bundle = group
        .as_ref()
        .map(|_| a.spec.bundle_index.unwrap_or(0).to_string());
    vec![
        (envs::FLOTILLA_ACTOR_ID.name, Some(a.id.clone())),
        (
            envs::FLOTILLA_ACTOR_INCARNATION.name,
            Some(a.incarnation.to_string()),
        ),
        (envs::FLOTILLA_NODE_ID.name, Some(node_id.to_string())),
        (envs::FLOTILLA_NODE_IP.name, Some(ip.to_string())),
        (envs::FLOTILLA_PLACEMENT_GROUP_ID.name, group),
        (envs::FLOTILLA_PLACEMENT_GROUP_BUNDLE_INDEX.name, bundle),
    ]
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
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    for (name, value) in identity_env(a, node_id, ip) {
        match value {
            Some(v) => cmd.env(name, v),
            None => cmd.env_remove(name),
        };
    }
    if !a.gpus.is_empty() {
        let ids: Vec<String> = a.gpus.iter().map(|g| g.id.to_string()).collect();
        cmd.env("CUDA_VISIBLE_DEVICES", ids.join(","));
    }
    // A session of its own (hence its own process group) and deliberately
    // no parent-death signal: an actor outlives a crash of its agent, as
    // containers outlive kubelet, and the restarted agent adopts it
    // (adopt.rs). A clean stop, fencing and `actor kill` still stop it.
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ActorSpec;

    fn actor(pg: Option<&str>, bundle: Option<usize>) -> ActorRecord {
        ActorRecord {
            node_id: Some("node_a".into()),
            incarnation: 3,
            ..ActorRecord::new(
                "actor_1".into(),
                String::new(),
                ActorSpec {
                    command: "true".into(),
                    args: vec![],
                    // A creator inside another group passed its own along.
                    env: [
                        ("FLOTILLA_PLACEMENT_GROUP_ID", "pg_parent"),
                        ("FLOTILLA_ACTOR_ID", "actor_parent"),
                    ]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into(),
                    resources: Resources::new(),
                    placement_group: pg.map(String::from),
                    bundle_index: bundle,
                    max_restarts: 0,
                },
                None,
                0.0,
            )
        }
    }

    fn env_of(a: &ActorRecord) -> BTreeMap<&'static str, Option<String>> {
        identity_env(a, "node_a", "10.0.0.7").into_iter().collect()
    }

    use std::collections::BTreeMap;

    #[test]
    fn an_actor_in_a_bundle_learns_its_group() {
        let e = env_of(&actor(Some("pg_1"), Some(2)));
        assert_eq!(e["FLOTILLA_ACTOR_ID"].as_deref(), Some("actor_1"));
        assert_eq!(e["FLOTILLA_ACTOR_INCARNATION"].as_deref(), Some("3"));
        assert_eq!(e["FLOTILLA_NODE_ID"].as_deref(), Some("node_a"));
        assert_eq!(e["FLOTILLA_NODE_IP"].as_deref(), Some("10.0.0.7"));
        assert_eq!(e["FLOTILLA_PLACEMENT_GROUP_ID"].as_deref(), Some("pg_1"));
        assert_eq!(
            e["FLOTILLA_PLACEMENT_GROUP_BUNDLE_INDEX"].as_deref(),
            Some("2")
        );
    }

    #[test]
    fn an_actor_outside_groups_gets_none_not_its_creators() {
        let e = env_of(&actor(None, None));
        assert_eq!(e["FLOTILLA_PLACEMENT_GROUP_ID"], None);
        assert_eq!(e["FLOTILLA_PLACEMENT_GROUP_BUNDLE_INDEX"], None);
        assert_eq!(e["FLOTILLA_ACTOR_ID"].as_deref(), Some("actor_1"));
    }

    #[test]
    fn the_agent_really_sets_and_removes_them() {
        // The variables reach the process over what its spec carries.
        let dir = std::env::temp_dir().join(format!("flotilla-agent-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (a, want) in [
            (actor(Some("pg_1"), Some(1)), "pg_1/1/actor_1"),
            (actor(None, None), "-/-/actor_1"),
        ] {
            let mut a = a;
            a.spec.command = "sh".into();
            a.spec.args = vec![
                "-c".into(),
                "echo ${FLOTILLA_PLACEMENT_GROUP_ID:--}/${FLOTILLA_PLACEMENT_GROUP_BUNDLE_INDEX:--}/$FLOTILLA_ACTOR_ID".into(),
            ];
            let log = dir.join("log");
            let _ = std::fs::remove_file(&log);
            let st = spawn_process(&a, "node_a", "10.0.0.7", &log)
                .unwrap()
                .wait()
                .unwrap();
            assert!(st.success());
            assert_eq!(std::fs::read_to_string(&log).unwrap().trim(), want);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
