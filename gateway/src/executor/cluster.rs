//! The `ray` executor (vLLM's name for it, so existing commands keep
//! working): worker actors placed by the orchestrator, one per rank, in a
//! placement group of world-size bundles (`{CPU: 1}` each, or
//! `{GPU: VLLM_RAY_PER_WORKER_GPUS}` on CUDA), PACK. Once the actors listen,
//! they are driven exactly as the `mp` executor drives its processes
//! (`remote::RemoteWorkers`).
//!
//! The gateway finds the cluster as `ray.init(address="auto")` does:
//! `FLOTILLA_ADDRESS`, else the head recorded under the cache root; the
//! token as the orchestrator CLI finds it. The placement group is removed
//! (and with it the actors) when the executor is dropped; it is owned by
//! this process (Ray's non-detached lifetime), so when the gateway dies
//! without dropping it (kill -9) the orchestrator removes it once the
//! owner's lease lapses. As vLLM does, bundle 0 asks for a sliver of
//! `node:<driver ip>` so that rank 0 runs on the gateway's node.
//!
//! A gateway that itself runs as an actor in a placement group (the node
//! agent sets `FLOTILLA_PLACEMENT_GROUP_ID`, Ray's
//! `get_current_placement_group()`) uses that group instead, as vLLM does:
//! its device bundles must hold at most one device each and be at least
//! the world size, and the ranks take the first of them. That group belongs
//! to whoever created it: the gateway never owns or removes it, but its
//! worker actors are still its own (owned through the same owner lease), so
//! they go when the gateway drops them or dies.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use orchestrator::client::{Client, HeadDialer, OwnerKeeper};
use orchestrator::paths::CacheRoot;
use orchestrator::resources::Resources;
use orchestrator::state::{ActorRecord, ActorState, NodeRecord, PgRecord, PgState};
use proto::orchestrator::{
    CreateActorRequest, CreatePlacementGroupRequest, KillActorRequest, ListRequest, NameOrId,
};
use worker::config::ModelConfig;
use worker::{Device, MemoryProfile, ModelRunnerOutput, SchedulerOutput, WorkerConfig};

use super::remote::{
    block_on, locate_worker_bin, plan_rendezvous, port_allocator, RemoteWorkers, LISTENING,
};
use super::{worker_env, Executor, ExecutorError, KvCacheCapacity, Result};
use crate::envs;

/// vLLM logs the pending demand this often while the group waits.
const PENDING_LOG_EVERY: Duration = Duration::from_secs(10);
/// vLLM's placement-group wait before it gives up.
const PENDING_TIMEOUT: Duration = Duration::from_secs(1800);

pub struct ClusterExecutor {
    model_config: ModelConfig,
    // Dropped first: the streams close before the group is removed.
    workers: RemoteWorkers,
    /// Held for its `Drop`, which removes the placement group and actors.
    _group: ActorGroup,
}

fn cluster_err(message: impl Into<String>) -> ExecutorError {
    ExecutorError::Cluster {
        message: message.into(),
    }
}

fn status_err(what: &str, s: tonic::Status) -> ExecutorError {
    cluster_err(format!("{what}: {}", s.message()))
}

/// `VLLM_RAY_BUNDLE_INDICES` with vLLM's checks (and its messages), plus a
/// range check against the group's `bundles`. `None` when unset.
pub fn parse_bundle_indices(
    raw: Option<&str>,
    world: usize,
    bundles: usize,
) -> Result<Option<Vec<usize>>> {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let bad = |message: String| ExecutorError::InvalidEnv {
        name: envs::VLLM_RAY_BUNDLE_INDICES.name,
        message,
    };
    let indices = raw
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| {
            bad(format!(
                "{raw:?} is not a comma-separated list of bundle indices"
            ))
        })?;
    let shown = format!(
        "[{}]",
        indices
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if indices.len() != world {
        return Err(bad(format!(
            "VLLM_RAY_BUNDLE_INDICES must have the same size as the world size, but got \
             bundle_indices={shown} and self.parallel_config.world_size={world}"
        )));
    }
    let mut seen = indices.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != indices.len() {
        return Err(bad(format!(
            "VLLM_RAY_BUNDLE_INDICES cannot have duplicate values, but got bundle_indices={shown}"
        )));
    }
    if let Some(i) = indices.iter().find(|&&i| i >= bundles) {
        return Err(bad(format!(
            "bundle index {i} is out of range: the placement group has {bundles} bundles (0..{bundles})"
        )));
    }
    Ok(Some(indices))
}

/// Bundle per rank as vLLM orders them: the driver's node first, then by
/// node IP (bundle order within a node).
pub fn order_bundles(bundle_ips: &[String], driver_ip: &str) -> Vec<usize> {
    let mut order: Vec<usize> = (0..bundle_ips.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| (bundle_ips[i] != driver_ip, bundle_ips[i].clone(), i);
        key(a).cmp(&key(b))
    });
    order
}

/// vLLM's request for the driver's node in bundle 0.
const DRIVER_NODE_SHARE: f64 = 0.001;

/// The bundles: `world` copies of `bundle`, the first also pinned to the
/// driver's node.
pub fn bundles_for(bundle: &serde_json::Value, world: usize, driver_ip: &str) -> serde_json::Value {
    let mut all = vec![bundle.clone(); world];
    if let Some(serde_json::Value::Object(first)) = all.first_mut() {
        first.insert(
            orchestrator::resources::node_resource(driver_ip),
            serde_json::json!(DRIVER_NODE_SHARE),
        );
    }
    serde_json::Value::Array(all)
}

/// The driver must run on a cluster node: rank 0 goes there.
pub fn check_driver_node(nodes: &[NodeRecord], driver_ip: &str, why: &str) -> Result<()> {
    if nodes
        .iter()
        .any(|n| n.ip == driver_ip && n.state == orchestrator::state::NodeState::Alive)
    {
        return Ok(());
    }
    let ips: Vec<&str> = nodes
        .iter()
        .filter(|n| n.state == orchestrator::state::NodeState::Alive)
        .map(|n| n.ip.as_str())
        .collect();
    Err(cluster_err(format!(
        "the gateway's node {driver_ip} ({why}) is not a node of the cluster (its nodes: {}): \
         the first worker runs on the gateway's node, so the gateway must run on a cluster node \
         (start one there with `orchestrator start --address HEAD_IP:PORT`), or set VLLM_HOST_IP \
         to the IP of the cluster node it runs on",
        if ips.is_empty() {
            "none".to_string()
        } else {
            ips.join(", ")
        }
    )))
}

/// The resource Ray calls the device key: what a worker's bundle holds one
/// of (the executor asks `{CPU: 1}` per worker on CPU, `{GPU: n}` on CUDA).
pub fn device_key(device: Device) -> &'static str {
    match device {
        Device::Cuda => orchestrator::resources::GPU,
        _ => orchestrator::resources::CPU,
    }
}

/// vLLM's checks of a placement group the gateway runs in, with its
/// wording: no bundle holds more than one device, and at least `world`
/// bundles hold one. Returns the indices of the device bundles, in order.
pub fn device_bundles(
    pg_id: &str,
    bundles: &[Resources],
    key: &str,
    world: usize,
) -> Result<Vec<usize>> {
    let mut found = Vec::new();
    for (i, b) in bundles.iter().enumerate() {
        let amount = b.get(key);
        if amount > orchestrator::resources::UNIT {
            return Err(cluster_err(format!(
                "Placement group bundle cannot have more than 1 {key}. (placement group {pg_id}, \
                 bundle {i}: {})",
                b.shape()
            )));
        }
        if amount > 0 {
            found.push(i);
        }
    }
    if world > found.len() {
        return Err(cluster_err(format!(
            "The number of required {key}s exceeds the total number of available {key}s in the \
             placement group. Required number of devices: {world}. Total number of devices: {}. \
             (placement group {pg_id}, which this gateway runs in)",
            found.len()
        )));
    }
    Ok(found)
}

/// Rank -> bundle in a group the gateway runs in: `indices` (from
/// VLLM_RAY_BUNDLE_INDICES) as given, else the first `world` device
/// bundles, ordered as `order_bundles` orders a group of the gateway's own
/// (driver's node first, then by node IP).
pub fn enclosing_rank_bundles(
    device_bundles: &[usize],
    bundle_ips: &[String],
    world: usize,
    driver_ip: &str,
    indices: Option<Vec<usize>>,
) -> Vec<usize> {
    if let Some(indices) = indices {
        return indices;
    }
    let first: Vec<usize> = device_bundles.iter().copied().take(world).collect();
    let ips: Vec<String> = first.iter().map(|&b| bundle_ips[b].clone()).collect();
    order_bundles(&ips, driver_ip)
        .into_iter()
        .map(|i| first[i])
        .collect()
}

/// Every chosen bundle of a group the gateway runs in must have room for
/// one worker (`need`) beside the actors already in it (the gateway itself,
/// in its own bundle): a worker that does not fit would wait forever.
pub fn check_bundle_room(
    pg: &PgRecord,
    actors: &[ActorRecord],
    rank_bundles: &[usize],
    need: &Resources,
) -> Result<()> {
    for (rank, &b) in rank_bundles.iter().enumerate() {
        let mut free = pg.bundles[b].clone();
        for a in actors.iter().filter(|a| {
            a.state != ActorState::Dead
                && a.spec.placement_group.as_deref() == Some(pg.id.as_str())
                && a.spec.bundle_index == Some(b)
        }) {
            free.sub(&a.spec.resources);
        }
        // Earlier ranks of this gateway in the same bundle.
        for _ in rank_bundles[..rank].iter().filter(|&&o| o == b) {
            free.sub(need);
        }
        if !need.fits_in(&free) {
            return Err(cluster_err(format!(
                "bundle {b} of placement group {} ({}) has {} free, but the worker of rank {rank} \
                 needs {} (VLLM_RAY_PER_WORKER_GPUS on CUDA, 1 CPU on CPU); choose other bundles \
                 with VLLM_RAY_BUNDLE_INDICES or give the group larger bundles",
                pg.id,
                pg.bundles[b].shape(),
                free.shape(),
                need.shape()
            )));
        }
    }
    Ok(())
}

/// The placement group the workers run in and the actors this gateway
/// started there. A group of the gateway's own is removed on drop (and its
/// actors with it); a group the gateway only runs in belongs to whoever
/// created it and stays, and only the gateway's actors are killed.
struct ActorGroup {
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    pg_id: String,
    owns_group: bool,
    /// The worker actors created so far.
    actors: Vec<String>,
    /// Keeps this process a live owner of its group (when it owns one) and
    /// of its actors; stopped after the drop below, so that the head kills
    /// whatever the drop could not (within the owner TTL).
    _owner: OwnerKeeper,
}

impl ActorGroup {
    fn call<F: std::future::Future + Send>(&self, fut: F) -> F::Output
    where
        F::Output: Send,
    {
        block_on(self.runtime.as_ref().expect("live").handle(), fut)
    }

    fn remove_group(&self) {
        let mut client = self.client.clone();
        let name_or_id = self.pg_id.clone();
        let removed = self.call(async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                client.remove_placement_group(NameOrId { name_or_id }),
            )
            .await
        });
        match removed {
            Ok(Ok(_)) => tracing::info!("Removed placement group {} and its workers", self.pg_id),
            Ok(Err(s)) => tracing::warn!(
                "Cannot remove placement group {}: {} (remove it with `orchestrator placement-group remove {}`)",
                self.pg_id,
                s.message(),
                self.pg_id
            ),
            Err(_) => tracing::warn!(
                "Removing placement group {} timed out (remove it with `orchestrator placement-group remove {}`)",
                self.pg_id,
                self.pg_id
            ),
        }
    }

    fn kill_actors(&self) {
        for id in &self.actors {
            let mut client = self.client.clone();
            let req = KillActorRequest {
                name_or_id: id.clone(),
                reason: format!(
                    "its gateway (pid {}) stopped; placement group {} stays with its creator",
                    std::process::id(),
                    self.pg_id
                ),
            };
            let killed = self.call(async move {
                tokio::time::timeout(Duration::from_secs(10), client.kill_actor(req)).await
            });
            match killed {
                Ok(Ok(_)) => tracing::info!("Stopped worker actor {id}"),
                Ok(Err(s)) => tracing::warn!(
                    "Cannot stop worker actor {id}: {}; the orchestrator stops it once this gateway's owner lease lapses",
                    s.message()
                ),
                Err(_) => tracing::warn!(
                    "Stopping worker actor {id} timed out; the orchestrator stops it once this gateway's owner lease lapses"
                ),
            }
        }
    }
}

impl Drop for ActorGroup {
    fn drop(&mut self) {
        if self.owns_group {
            self.remove_group();
        } else {
            self.kill_actors();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The driver's IP: VLLM_HOST_IP, else (a gateway running as an actor) the
/// node its agent says it runs on, else the source address toward the head.
fn driver_ip(head: &str) -> (String, String) {
    match (
        envs::raw(envs::VLLM_HOST_IP),
        envs::raw(envs::FLOTILLA_NODE_IP),
    ) {
        (None, Some(ip)) => (
            ip,
            "from FLOTILLA_NODE_IP: the node this gateway's actor runs on".into(),
        ),
        _ => orchestrator::detect::node_ip(None, Some(head)),
    }
}

impl ClusterExecutor {
    pub fn start(config: &WorkerConfig, profile: Option<MemoryProfile>) -> Result<Self> {
        let world = config.parallel.tp_size * config.parallel.pp_size;
        let model_config =
            ModelConfig::load(&config.model, config.load_format, &config.hf_overrides)?;
        let raw_indices = envs::raw(envs::VLLM_RAY_BUNDLE_INDICES);
        // Ray's get_current_placement_group(): the group this process runs
        // in as an actor, which the workers then share.
        let enclosing = envs::raw(envs::FLOTILLA_PLACEMENT_GROUP_ID);
        // A group of our own has `world` bundles: check the indices before
        // dialing anything.
        let own_indices = match enclosing {
            None => parse_bundle_indices(raw_indices.as_deref(), world, world)?,
            Some(_) => None,
        };
        let bin = locate_worker_bin()?;
        // The workers run where the GPUs are: a gateway told `--device cuda`
        // may have none itself (a Kubernetes gateway pod), so only `auto`
        // looks at this machine; the workers check their own devices.
        let device = match config.device {
            Device::Auto => config.device.resolve()?,
            explicit => explicit,
        };
        let bundle = match device {
            Device::Cuda => {
                let gpus: f64 = envs::get(envs::VLLM_RAY_PER_WORKER_GPUS)?.unwrap_or(1.0);
                if !(gpus > 0.0 && gpus.is_finite()) {
                    return Err(ExecutorError::InvalidEnv {
                        name: envs::VLLM_RAY_PER_WORKER_GPUS.name,
                        message: format!("must be a positive number of GPUs, got {gpus}"),
                    });
                }
                serde_json::json!({ "GPU": gpus })
            }
            _ => serde_json::json!({ "CPU": 1 }),
        };
        let need = Resources::from_json_value("worker resources", &bundle)
            .map_err(|e| cluster_err(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cluster-client")
            .enable_all()
            .build()
            .map_err(|e| cluster_err(format!("cannot start the async runtime: {e}")))?;

        // Find and dial the head.
        let root = CacheRoot::from_env();
        let token = orchestrator::auth::client_token(
            envs::raw(envs::FLOTILLA_CLUSTER_TOKEN).as_deref(),
            &root,
        )
        .map_err(|e| cluster_err(e.to_string()))?;
        let dialer = HeadDialer {
            address: envs::raw(envs::FLOTILLA_ADDRESS),
            root: root.clone(),
            token: token.clone(),
        };
        let (client, head) = block_on(runtime.handle(), dialer.connect())
            .map_err(|e| cluster_err(format!("cannot reach the orchestrator: {e}")))?;
        tracing::info!("Connected to the orchestrator head at {head}");
        let (driver_ip, driver_why) = driver_ip(&head);
        let nodes: Vec<NodeRecord> = list_with(&runtime, &client, "nodes")?;
        check_driver_node(&nodes, &driver_ip, &driver_why)?;

        // This process owns its workers (and a group it creates): they go
        // when it drops them, or by the orchestrator if this process dies.
        let name = format!(
            "flotilla-gateway-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut c = client.clone();
        let owner = block_on(runtime.handle(), async {
            orchestrator::client::register_owner(&mut c, &name, 0.0, None).await
        })
        .map_err(|e| cluster_err(format!("registering the gateway as an owner: {e}")))?;
        let owner_id = owner.owner_id.clone();
        let keeper = OwnerKeeper::spawn(client.clone(), dialer, owner, name.clone())
            .map_err(|e| cluster_err(e.to_string()))?;

        let (mut group, pg, rank_bundles, bundle_ips) = match enclosing {
            Some(pg_id) => {
                let in_bundle = envs::raw(envs::FLOTILLA_PLACEMENT_GROUP_BUNDLE_INDEX)
                    .map(|b| format!(" (this gateway runs in its bundle {b})"))
                    .unwrap_or_default();
                tracing::info!("Using the existing placement group {pg_id}{in_bundle}");
                let group = ActorGroup {
                    runtime: Some(runtime),
                    client: client.clone(),
                    pg_id,
                    owns_group: false,
                    actors: Vec::new(),
                    _owner: keeper,
                };
                let pgs: Vec<PgRecord> = list(&group, "placement-groups")?;
                let pg = pgs
                    .into_iter()
                    .find(|p| p.id == group.pg_id)
                    .ok_or_else(|| {
                        cluster_err(format!(
                            "the placement group this gateway runs in ({}, from FLOTILLA_PLACEMENT_GROUP_ID) is unknown to the orchestrator",
                            group.pg_id
                        ))
                    })?;
                let spec = serde_json::to_value(&pg.bundles).unwrap_or_default();
                let pg = wait_created(&group, pg, &spec)?;
                let devices = device_bundles(&pg.id, &pg.bundles, device_key(device), world)?;
                let indices =
                    parse_bundle_indices(raw_indices.as_deref(), world, pg.bundles.len())?;
                let bundle_ips = ips_of_bundles(&group, &pg)?;
                let rank_bundles =
                    enclosing_rank_bundles(&devices, &bundle_ips, world, &driver_ip, indices);
                let actors: Vec<ActorRecord> = list(&group, "actors")?;
                check_bundle_room(&pg, &actors, &rank_bundles, &need)?;
                (group, pg, rank_bundles, bundle_ips)
            }
            None => {
                tracing::info!("No current placement group found. Creating a new placement group.");
                let bundles = bundles_for(&bundle, world, &driver_ip);
                let pg = create_placement_group(&runtime, &client, &name, &bundles, &owner_id)?;
                let group = ActorGroup {
                    runtime: Some(runtime),
                    client: client.clone(),
                    pg_id: pg.id.clone(),
                    owns_group: true,
                    actors: Vec::new(),
                    _owner: keeper,
                };
                let pg = wait_created(&group, pg, &bundles)?;
                let bundle_ips = ips_of_bundles(&group, &pg)?;
                let rank_bundles =
                    own_indices.unwrap_or_else(|| order_bundles(&bundle_ips, &driver_ip));
                (group, pg, rank_bundles, bundle_ips)
            }
        };

        // One actor per rank, running the worker binary on its node.
        let forwarded = worker_env::forwarded(std::env::vars());
        tracing::info!(
            "Copying the following environment variables to workers: {:?}",
            forwarded
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
        );
        let mut per_node: HashMap<&str, usize> = HashMap::new();
        for (rank, &b) in rank_bundles.iter().enumerate() {
            let ip = bundle_ips[b].as_str();
            let local_rank = {
                let n = per_node.entry(ip).or_default();
                *n += 1;
                *n - 1
            };
            let mut env: HashMap<String, String> = forwarded.iter().cloned().collect();
            env.insert("LOCAL_RANK".into(), local_rank.to_string());
            // The gateway's own thread setting wins; else a CPU bundle
            // reserves one CPU for this worker.
            match envs::raw(envs::RAYON_NUM_THREADS) {
                Some(n) => {
                    env.insert("RAYON_NUM_THREADS".into(), n);
                }
                None if bundle.get("CPU").is_some() => {
                    env.insert("RAYON_NUM_THREADS".into(), "1".into());
                }
                None => {}
            }
            let req = CreateActorRequest {
                command: bin.to_string_lossy().into_owned(),
                args: vec!["--listen".into(), format!("{ip}:0")],
                env,
                resources_json: bundle.to_string(),
                placement_group: pg.id.clone(),
                bundle_index: b as i64,
                max_restarts: 0,
                name: format!("{name}-rank{rank}"),
                owner: owner_id.clone(),
            };
            let mut c = client.clone();
            let reply = group
                .call(async move { c.create_actor(req).await })
                .map_err(|s| status_err(&format!("creating the actor of rank {rank}"), s))?;
            let actor: ActorRecord = serde_json::from_str(&reply.into_inner().json)
                .map_err(|e| cluster_err(format!("bad actor record from the head: {e}")))?;
            tracing::info!(
                "Worker rank {rank}: actor {} in bundle {b} of placement group {} on {ip}",
                actor.id,
                pg.id
            );
            group.actors.push(actor.id);
        }

        let timeout = envs::rpc_timeout()?.max(Duration::from_secs(30));
        let mut addresses = Vec::with_capacity(world);
        for (rank, id) in group.actors.iter().enumerate() {
            addresses.push(wait_listening(&group, rank, id, timeout)?);
        }
        let hosts: Vec<String> = rank_bundles
            .iter()
            .map(|&b| bundle_ips[b].clone())
            .collect();
        let rendezvous = plan_rendezvous(&hosts, &config.parallel, port_allocator()?)?;
        tracing::info!(
            "Workers listen at {addresses:?}; collective group at {}",
            rendezvous[0].collective
        );
        let workers = RemoteWorkers::connect(&addresses, config, &rendezvous, profile)?;
        Ok(Self {
            model_config,
            workers,
            _group: group,
        })
    }
}

/// Each bundle's node IP.
fn ips_of_bundles(group: &ActorGroup, pg: &PgRecord) -> Result<Vec<String>> {
    let nodes: Vec<NodeRecord> = list(group, "nodes")?;
    let ip_of: HashMap<&str, &str> = nodes
        .iter()
        .map(|n| (n.id.as_str(), n.ip.as_str()))
        .collect();
    pg.assignments
        .iter()
        .map(|a| {
            a.as_ref()
                .and_then(|a| ip_of.get(a.node_id.as_str()))
                .map(|ip| ip.to_string())
                .ok_or_else(|| {
                    cluster_err(format!("placement group {} has an unplaced bundle", pg.id))
                })
        })
        .collect()
}

fn create_placement_group(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    name: &str,
    bundles: &serde_json::Value,
    owner: &str,
) -> Result<PgRecord> {
    let mut c = client.clone();
    let req = CreatePlacementGroupRequest {
        bundles_json: bundles.to_string(),
        strategy: "PACK".into(),
        name: name.to_string(),
        // Short: the wait below logs while the group is pending.
        timeout_s: 1.0,
        owner: owner.to_string(),
    };
    match block_on(runtime.handle(), async move {
        c.create_placement_group(req).await
    }) {
        Ok(r) => serde_json::from_str(&r.into_inner().json)
            .map_err(|e| cluster_err(format!("bad placement group record from the head: {e}"))),
        // Still pending: it stays queued under its name.
        Err(s) if s.code() == tonic::Code::DeadlineExceeded => Ok(PgRecord {
            id: name.to_string(),
            name: name.to_string(),
            bundles: Vec::new(),
            strategy: orchestrator::placement::Strategy::Pack,
            state: PgState::Pending,
            assignments: Vec::new(),
            created_at: 0.0,
            ended_at: None,
            owner: Some(owner.to_string()),
        }),
        Err(s) => Err(status_err("creating the placement group", s)),
    }
}

fn list<T: serde::de::DeserializeOwned>(group: &ActorGroup, kind: &str) -> Result<Vec<T>> {
    list_with(group.runtime.as_ref().expect("live"), &group.client, kind)
}

fn list_with<T: serde::de::DeserializeOwned>(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    kind: &str,
) -> Result<Vec<T>> {
    let mut c = client.clone();
    let kind_s = kind.to_string();
    let reply = block_on(runtime.handle(), async move {
        c.list(ListRequest { kind: kind_s }).await
    })
    .map_err(|s| status_err(&format!("listing {kind}"), s))?;
    serde_json::from_str(&reply.into_inner().json)
        .map_err(|e| cluster_err(format!("bad {kind} list from the head: {e}")))
}

/// Waits for a pending group, logging the demand as vLLM does.
fn wait_created(group: &ActorGroup, pg: PgRecord, bundles: &serde_json::Value) -> Result<PgRecord> {
    if pg.state == PgState::Created {
        return Ok(pg);
    }
    let started = Instant::now();
    let mut logged = Instant::now() - PENDING_LOG_EVERY;
    loop {
        let pgs: Vec<PgRecord> = list(group, "placement-groups")?;
        match pgs
            .into_iter()
            .find(|p| p.id == group.pg_id || p.name == group.pg_id)
        {
            Some(p) if p.state == PgState::Created => return Ok(p),
            Some(p) if p.state == PgState::Removed => {
                return Err(cluster_err(format!(
                    "placement group {} was removed while pending",
                    p.id
                )))
            }
            _ => {}
        }
        if started.elapsed() > PENDING_TIMEOUT {
            return Err(cluster_err(format!(
                "the placement group {bundles} was not placed within {PENDING_TIMEOUT:?}"
            )));
        }
        if logged.elapsed() >= PENDING_LOG_EVERY {
            tracing::info!(
                "Waiting for creating a placement group of specs for {:.0} seconds. specs={bundles}. \
                 Check `orchestrator status` to see if you have enough resources.",
                started.elapsed().as_secs_f64()
            );
            logged = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The worker's gRPC address, read from its log once it listens.
fn wait_listening(group: &ActorGroup, rank: usize, id: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut c = group.client.clone();
        let name_or_id = id.to_string();
        if let Ok(r) = group.call(async move { c.actor_logs(NameOrId { name_or_id }).await }) {
            let text = String::from_utf8_lossy(&r.into_inner().data).into_owned();
            if let Some(addr) = text.lines().find_map(|l| l.strip_prefix(LISTENING)) {
                return Ok(addr.trim().to_string());
            }
        }
        let actors: Vec<ActorRecord> = list(group, "actors")?;
        if let Some(a) = actors
            .iter()
            .find(|a| a.id == id && a.state == ActorState::Dead)
        {
            return Err(ExecutorError::Spawn {
                rank,
                message: format!(
                    "worker actor {id} died before it listened: {}",
                    a.death_cause.as_deref().unwrap_or("no cause recorded")
                ),
            });
        }
        if Instant::now() >= deadline {
            return Err(ExecutorError::Spawn {
                rank,
                message: format!("worker actor {id} did not report its address within {timeout:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Executor for ClusterExecutor {
    fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    fn kv_cache_capacity(&self) -> Result<KvCacheCapacity> {
        self.workers.kv_cache_capacity()
    }

    fn initialize_kv_cache(&mut self, num_blocks: usize) -> Result<()> {
        self.workers.initialize_kv_cache(num_blocks)
    }

    fn capture_graphs(&mut self, max_num_seqs: usize) -> Result<usize> {
        self.workers.capture_graphs(max_num_seqs)
    }

    fn execute_model(&mut self, step: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        self.workers.execute_model(step)
    }

    fn max_concurrent_batches(&self) -> usize {
        self.workers.max_concurrent_batches()
    }

    fn submit(&mut self, step: &SchedulerOutput) -> Result<()> {
        self.workers.submit(step)
    }

    fn wait_oldest(&mut self) -> Result<ModelRunnerOutput> {
        self.workers.wait_oldest()
    }

    fn check_health(&mut self) -> Result<()> {
        self.workers.check_health()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_indices_are_checked_as_vllm_checks_them() {
        assert_eq!(parse_bundle_indices(None, 2, 2).unwrap(), None);
        assert_eq!(parse_bundle_indices(Some(" "), 2, 2).unwrap(), None);
        assert_eq!(
            parse_bundle_indices(Some("1,0"), 2, 2).unwrap(),
            Some(vec![1, 0])
        );
        let e = parse_bundle_indices(Some("0,1"), 4, 4)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("VLLM_RAY_BUNDLE_INDICES must have the same size as the world size, but got bundle_indices=[0, 1] and self.parallel_config.world_size=4"),
            "{e}"
        );
        let e = parse_bundle_indices(Some("1,1"), 2, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("VLLM_RAY_BUNDLE_INDICES cannot have duplicate values, but got bundle_indices=[1, 1]"),
            "{e}"
        );
        let e = parse_bundle_indices(Some("0,2"), 2, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of range"), "{e}");
        let e = parse_bundle_indices(Some("0,x"), 2, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("VLLM_RAY_BUNDLE_INDICES"), "{e}");
    }

    #[test]
    fn bundle_zero_asks_for_the_driver_node() {
        let b = bundles_for(&serde_json::json!({"CPU": 1}), 3, "10.0.0.4");
        assert_eq!(
            b,
            serde_json::json!([{"CPU": 1, "node:10.0.0.4": 0.001}, {"CPU": 1}, {"CPU": 1}])
        );
        let parsed = orchestrator::resources::parse_bundles(&b.to_string()).unwrap();
        assert_eq!(parsed[0].get("node:10.0.0.4"), 10);
    }

    #[test]
    fn a_driver_off_the_cluster_is_a_clear_error() {
        let node = |ip: &str| NodeRecord {
            id: format!("node_{ip}"),
            ip: ip.into(),
            agent_address: String::new(),
            is_head: false,
            total: Default::default(),
            gpu_ids: vec![],
            gpu_model: None,
            gpu_memory_bytes: 0,
            state: orchestrator::state::NodeState::Alive,
            started_at: 0.0,
            died_at: None,
            death_reason: None,
        };
        let nodes = vec![node("10.0.0.1"), node("10.0.0.2")];
        check_driver_node(&nodes, "10.0.0.2", "x").unwrap();
        let e = check_driver_node(&nodes, "10.0.0.9", "from VLLM_HOST_IP")
            .unwrap_err()
            .to_string();
        for want in [
            "10.0.0.9 (from VLLM_HOST_IP) is not a node of the cluster",
            "10.0.0.1, 10.0.0.2",
            "must run on a cluster node",
            "VLLM_HOST_IP",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn ranks_start_on_the_driver_node_then_go_by_ip() {
        let ips: Vec<String> = ["10.0.0.3", "10.0.0.2", "10.0.0.9", "10.0.0.2"]
            .map(String::from)
            .to_vec();
        assert_eq!(order_bundles(&ips, "10.0.0.9"), vec![2, 1, 3, 0]);
        assert_eq!(order_bundles(&ips, "10.0.0.1"), vec![1, 3, 0, 2]);
    }

    fn res(json: serde_json::Value) -> Resources {
        Resources::from_json_value("t", &json).unwrap()
    }

    #[test]
    fn an_enclosing_group_is_checked_as_vllm_checks_it() {
        let gpu = |n: f64| res(serde_json::json!({ "GPU": n }));
        let cpu_only = res(serde_json::json!({ "CPU": 4 }));
        // Fractions count as device bundles; CPU-only bundles do not.
        let bundles = vec![cpu_only.clone(), gpu(1.0), gpu(0.5), gpu(1.0)];
        assert_eq!(
            device_bundles("pg_1", &bundles, "GPU", 3).unwrap(),
            vec![1, 2, 3]
        );
        let e = device_bundles("pg_1", &bundles, "GPU", 4)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "The number of required GPUs exceeds the total number of available GPUs in the \
                 placement group. Required number of devices: 4. Total number of devices: 3."
            ),
            "{e}"
        );
        let e = device_bundles("pg_1", &[gpu(1.0), gpu(2.0)], "GPU", 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Placement group bundle cannot have more than 1 GPU."),
            "{e}"
        );
        assert!(e.contains("bundle 1"), "{e}");
        // On CPU the device is the CPU, as the executor asks {CPU: 1} per worker.
        let cpus = vec![res(serde_json::json!({"CPU": 1})); 2];
        assert_eq!(device_bundles("pg_2", &cpus, "CPU", 2).unwrap(), [0, 1]);
        let e = device_bundles("pg_2", &cpus, "CPU", 3)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Required number of devices: 3. Total number of devices: 2."),
            "{e}"
        );
        assert!(device_bundles("pg_3", &[cpu_only], "CPU", 1).is_err());
        assert_eq!(device_key(Device::Cuda), "GPU");
        assert_eq!(device_key(Device::Cpu), "CPU");
    }

    #[test]
    fn ranks_take_the_first_device_bundles_driver_node_first() {
        let ips: Vec<String> = ["10.0.0.1", "10.0.0.3", "10.0.0.2", "10.0.0.2", "10.0.0.1"]
            .map(String::from)
            .to_vec();
        // Bundle 0 holds no device (the gateway's own, say).
        let devices = [1, 2, 3, 4];
        assert_eq!(
            enclosing_rank_bundles(&devices, &ips, 3, "10.0.0.2", None),
            vec![2, 3, 1]
        );
        assert_eq!(
            enclosing_rank_bundles(&devices, &ips, 4, "10.0.0.1", None),
            vec![4, 2, 3, 1]
        );
        // VLLM_RAY_BUNDLE_INDICES wins, as in a group of the gateway's own.
        assert_eq!(
            enclosing_rank_bundles(&devices, &ips, 2, "10.0.0.1", Some(vec![3, 0])),
            vec![3, 0]
        );
    }

    #[test]
    fn a_bundle_without_room_for_a_worker_is_named() {
        let pg = PgRecord {
            id: "pg_1".into(),
            name: String::new(),
            bundles: vec![
                res(serde_json::json!({"CPU": 1})),
                res(serde_json::json!({"CPU": 1})),
            ],
            strategy: orchestrator::placement::Strategy::Pack,
            state: PgState::Created,
            assignments: vec![None, None],
            created_at: 0.0,
            ended_at: None,
            owner: None,
        };
        let actor = |bundle: usize, cpus: f64, state: ActorState| ActorRecord {
            state,
            ..ActorRecord::new(
                format!("actor_{bundle}"),
                String::new(),
                orchestrator::state::ActorSpec {
                    command: "gateway".into(),
                    args: vec![],
                    env: Default::default(),
                    resources: Resources::new().with("CPU", cpus),
                    placement_group: Some("pg_1".into()),
                    bundle_index: Some(bundle),
                    max_restarts: 0,
                },
                None,
                0.0,
            )
        };
        let need = res(serde_json::json!({"CPU": 1}));
        // The gateway sits in bundle 0 asking nothing: both bundles fit.
        let gateway = actor(0, 0.0, ActorState::Alive);
        check_bundle_room(&pg, &[gateway], &[0, 1], &need).unwrap();
        // A gateway that took bundle 0's CPU leaves no room for rank 0.
        let e = check_bundle_room(&pg, &[actor(0, 1.0, ActorState::Alive)], &[0, 1], &need)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bundle 0 of placement group pg_1") && e.contains("rank 0"),
            "{e}"
        );
        // Dead actors hold nothing.
        check_bundle_room(&pg, &[actor(0, 1.0, ActorState::Dead)], &[0, 1], &need).unwrap();
        // Two ranks in one bundle of one CPU do not fit.
        let e = check_bundle_room(&pg, &[], &[1, 1], &need)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1"), "{e}");
    }
}
