//! The Orchestrator gRPC service every head serves: nodes, placement
//! groups, actors, owners, status. Requests that change the cluster commit
//! their own guarded decisions; the periodic reconcile is the leader's
//! (`leader`).

use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use proto::orchestrator::node_agent_client::NodeAgentClient;
use proto::orchestrator::orchestrator_server::{Orchestrator, OrchestratorServer};
use proto::orchestrator::{
    CreateActorRequest, CreatePlacementGroupRequest, HelloReply, HelloRequest, JsonReply,
    KillActorRequest, ListRequest, LogsReply, NameOrId, RegisterOwnerRequest, StatusRequest,
    WitnessReply, WitnessRequest,
};

use crate::auth::{Bearer, Checker};
use crate::error::{Error, Result};
use crate::health::{self, note_etcd_error, SharedHealth};
use crate::leader::commit_changes;
use crate::placement::{describe, place, PlaceError, Strategy};
use crate::reconcile::Changes;
use crate::resources::{parse_bundles, Resources};
use crate::state::{
    new_id, now, ActorRecord, ActorSpec, ActorState, OwnerRecord, PgRecord, PgState, Snapshot,
};
use crate::status;
use crate::store::Store;

type RpcResult<T> = std::result::Result<Response<T>, Status>;

#[derive(Clone)]
pub struct HeadService {
    pub store: Store,
    /// etcd endpoints as node agents should dial them.
    pub etcd_endpoints: Vec<String>,
    pub cluster: String,
    pub address: String,
    pub token: String,
    pub ttl_s: u64,
    /// This head's etcd health, kept by the leader loop.
    pub health: SharedHealth,
    /// Whether heads run the etcd members (no --etcd-endpoints): then
    /// agents are told every member's client URL, so that losing one
    /// machine leaves them a store to reach.
    pub etcd_members: bool,
}

fn json<T: serde::Serialize>(v: &T) -> JsonReply {
    JsonReply {
        json: serde_json::to_string(v).expect("records serialize"),
    }
}

/// What RegisterOwner and RefreshOwner answer (as JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OwnerReply {
    pub owner_id: String,
    pub ttl_s: u64,
}

/// An owner's TTL in whole seconds (etcd leases are): 0 means the node
/// TTL. At most three node TTLs, so that an owner whose lease lapsed in an
/// etcd outage refreshes (every TTL/3), learns it, and registers again
/// within the grace the leader gives after the outage (two node TTLs).
pub fn owner_ttl(requested: f64, node_ttl_s: u64) -> Result<u64> {
    if !requested.is_finite() || requested < 0.0 {
        return Err(Error::invalid(
            "owner ttl",
            format!("{requested} (must be a number of seconds >= 0; 0 means the node TTL)"),
        ));
    }
    if requested == 0.0 {
        return Ok(node_ttl_s.max(2));
    }
    let ttl = requested.ceil() as u64;
    let max = 3 * node_ttl_s.max(2);
    if !(2..=max).contains(&ttl) {
        return Err(Error::invalid(
            "owner ttl",
            format!(
                "{requested} s: must be between 2 s (etcd's shortest lease) and {max} s (three node TTLs, so that an owner re-registers within the grace after an etcd outage)"
            ),
        ));
    }
    Ok(ttl)
}

const ATTEMPTS: u32 = 50;

impl HeadService {
    /// A snapshot, or an error that says since when etcd is unreachable.
    async fn snapshot(&self) -> Result<Snapshot> {
        let r = self.store.snapshot().await;
        self.read_result(r)
    }

    /// `r`, or an error that says since when etcd is unreachable.
    fn read_result<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| {
            note_etcd_error(&self.health, &e);
            let since = self.health.lock().ok().and_then(|h| h.down_since());
            match since {
                Some(since) if matches!(&e, Error::Etcd(x) if crate::store::unreachable(x)) => {
                    Error::EtcdUnreachable {
                        since: crate::status::fmt_time(since),
                        seconds: (now() - since).max(0.0),
                        reason: e.to_string(),
                    }
                }
                _ => e,
            }
        })
    }

    /// What this head can say about `node_id` right now (see witness.rs).
    /// It reads etcd afresh rather than trusting the leader loop's view: a
    /// loop stuck in a call to a frozen etcd has not failed yet, but this
    /// read, bounded, does, and the head then answers "unhealthy".
    async fn witness(&self, node_id: &str) -> WitnessReply {
        let started = Instant::now();
        let mut c = self.store.client();
        let read = tokio::time::timeout(
            crate::witness::HEAD_READ,
            c.get(self.store.live_key(node_id), None),
        )
        .await;
        let at = Instant::now();
        let node_live = match read {
            Ok(Ok(resp)) => !resp.kvs().is_empty(),
            _ => {
                if let Ok(mut h) = self.health.lock() {
                    h.failed(started, now());
                }
                return WitnessReply {
                    etcd_healthy: false,
                    node_live: false,
                };
            }
        };
        let slow = at.duration_since(started) >= health::slow_answer(self.ttl_s);
        let steady = self
            .health
            .lock()
            .map(|h| h.lapse_means_dead(at, health::grace(self.ttl_s)))
            .unwrap_or(false);
        WitnessReply {
            etcd_healthy: steady && !slow,
            node_live,
        }
    }

    pub(crate) async fn create_pg(&self, req: CreatePlacementGroupRequest) -> Result<PgRecord> {
        let bundles = parse_bundles(&req.bundles_json)?;
        let strategy: Strategy = req.strategy.parse()?;
        if !req.timeout_s.is_finite() || req.timeout_s < 0.0 {
            return Err(Error::invalid(
                "timeout",
                format!("{} (must be >= 0)", req.timeout_s),
            ));
        }
        let owner = Some(req.owner.trim().to_string()).filter(|o| !o.is_empty());
        let id = new_id("pg_");
        let mut record = None;
        for _ in 0..ATTEMPTS {
            let snap = self.store.snapshot().await?;
            if !req.name.is_empty() && snap.find_pg(&req.name).is_some() {
                return Err(Error::AlreadyExists {
                    what: "placement group",
                    name: req.name.clone(),
                });
            }
            if let Some(o) = owner.as_ref().filter(|o| !snap.owners.contains(*o)) {
                // A group for a dead owner would only be removed again.
                return Err(Error::NotFound {
                    kind: "owner",
                    name: o.clone(),
                });
            }
            let mut pg = PgRecord {
                id: id.clone(),
                name: req.name.clone(),
                assignments: vec![None; bundles.len()],
                bundles: bundles.clone(),
                strategy,
                state: PgState::Pending,
                created_at: now(),
                ended_at: None,
                owner: owner.clone(),
            };
            match place(&snap.node_views(), &bundles, strategy, &[]) {
                Ok(a) => {
                    pg.assignments = a.into_iter().map(Some).collect();
                    pg.state = PgState::Created;
                }
                Err(PlaceError::Infeasible) => {
                    return Err(Error::Infeasible {
                        shape: describe(&bundles, strategy),
                    })
                }
                Err(PlaceError::Busy) => {}
            }
            let g = Store::guarded(self.store.pg_key(&id), &snap, &pg);
            if self.store.commit(Some(snap.alloc_rev), &[g]).await? {
                record = Some(pg);
                break;
            }
        }
        let pg = record.ok_or(Error::Contention { attempts: ATTEMPTS })?;
        if pg.state == PgState::Created {
            return Ok(pg);
        }
        let deadline = Instant::now() + Duration::from_secs_f64(req.timeout_s);
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let snap = self.store.snapshot().await?;
            match snap.pgs.get(&id) {
                Some(p) if p.state == PgState::Created => return Ok(p.clone()),
                Some(p) if p.state == PgState::Removed => {
                    return Err(Error::GroupRemoved {
                        id,
                        during: "pending",
                    })
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "placement group {id} {} is still PENDING; it stays queued (see `orchestrator status`), remove it with `orchestrator placement-group remove {id}`",
                        describe(&bundles, strategy)
                    ),
                    seconds: req.timeout_s,
                });
            }
        }
    }

    pub(crate) async fn remove_pg(&self, name_or_id: &str) -> Result<PgRecord> {
        for _ in 0..ATTEMPTS {
            let snap = self.store.snapshot().await?;
            let pg = snap
                .find_pg(name_or_id)
                .filter(|p| p.state != PgState::Removed)
                .ok_or_else(|| Error::NotFound {
                    kind: "placement group",
                    name: name_or_id.to_string(),
                })?;
            let mut ch = Changes::default();
            let mut p = pg.clone();
            p.state = PgState::Removed;
            p.ended_at = Some(now());
            ch.pgs.insert(p.id.clone(), p.clone());
            for a in snap.actors.values() {
                if a.state != ActorState::Dead
                    && a.spec.placement_group.as_deref() == Some(p.id.as_str())
                {
                    let mut d = a.clone();
                    d.state = ActorState::Dead;
                    d.ended_at = Some(now());
                    d.death_cause = Some("its placement group was removed".into());
                    ch.actors.insert(d.id.clone(), d);
                }
            }
            if commit_changes(&self.store, &snap, &ch, false).await? {
                return Ok(p);
            }
        }
        Err(Error::Contention { attempts: ATTEMPTS })
    }

    async fn register_owner(&self, req: RegisterOwnerRequest) -> Result<OwnerReply> {
        let ttl_s = owner_ttl(req.ttl_s, self.ttl_s)?;
        let id = match req.owner_id.trim() {
            "" => new_id("owner_"),
            given => {
                if given.contains('/') || given.chars().any(char::is_whitespace) {
                    return Err(Error::invalid(
                        "owner_id",
                        format!("'{given}' (expected an id RegisterOwner returned)"),
                    ));
                }
                given.to_string()
            }
        };
        let rec = OwnerRecord {
            id: id.clone(),
            name: req.name,
            ttl_s,
            registered_at: now(),
        };
        let value = serde_json::to_string(&rec).expect("records serialize");
        let r = async {
            let lease = self.store.grant(ttl_s).await?;
            self.store
                .put(&self.store.owner_key(&id), &value, Some(lease))
                .await
        }
        .await;
        if let Err(e) = &r {
            note_etcd_error(&self.health, e);
        }
        r?;
        Ok(OwnerReply {
            owner_id: id,
            ttl_s,
        })
    }

    async fn refresh_owner(&self, id: &str) -> Result<OwnerReply> {
        let gone = || Error::NotFound {
            kind: "owner",
            name: id.to_string(),
        };
        let r = async {
            let key = self.store.owner_key(id);
            let Some((value, lease)) = self.store.get_with_lease(&key).await? else {
                return Err(gone());
            };
            if lease == 0 || !self.store.keep_alive_once(lease).await? {
                return Err(gone());
            }
            let ttl_s = serde_json::from_str::<OwnerRecord>(&value).map_or(self.ttl_s, |o| o.ttl_s);
            Ok(OwnerReply {
                owner_id: id.to_string(),
                ttl_s,
            })
        }
        .await;
        if let Err(e) = &r {
            note_etcd_error(&self.health, e);
        }
        r
    }

    async fn create_actor(&self, req: CreateActorRequest) -> Result<ActorRecord> {
        if req.command.trim().is_empty() {
            return Err(Error::invalid("command", "must not be empty"));
        }
        let resources = if req.resources_json.trim().is_empty() {
            Resources::new()
        } else {
            Resources::from_json_str("resources", &req.resources_json)?
        };
        if req.max_restarts < -1 {
            return Err(Error::invalid(
                "max-restarts",
                format!("{} (use -1 for unlimited)", req.max_restarts),
            ));
        }
        for k in req.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(Error::invalid("env", format!("bad variable name '{k}'")));
            }
        }
        let owner = Some(req.owner.trim().to_string()).filter(|o| !o.is_empty());
        let snap = self.store.snapshot().await?;
        if let Some(o) = owner.as_ref().filter(|o| !snap.owners.contains(*o)) {
            // An actor of a dead owner would only be killed again.
            return Err(Error::NotFound {
                kind: "owner",
                name: o.clone(),
            });
        }
        if !req.name.is_empty() {
            if let Some(a) = snap
                .find_actor(&req.name)
                .filter(|a| a.state != ActorState::Dead)
            {
                return Err(Error::AlreadyExists {
                    what: "live actor named",
                    name: format!("{} ({})", req.name, a.id),
                });
            }
        }
        let (pg, bundle_index) = if req.placement_group.is_empty() {
            if req.bundle_index >= 0 {
                return Err(Error::invalid(
                    "bundle-index",
                    "given without --placement-group",
                ));
            }
            if let Err(PlaceError::Infeasible) = place(
                &snap.node_views(),
                std::slice::from_ref(&resources),
                Strategy::Pack,
                &[],
            ) {
                return Err(Error::Infeasible {
                    shape: resources.shape(),
                });
            }
            (None, None)
        } else {
            let pg = snap
                .find_pg(&req.placement_group)
                .filter(|p| p.state != PgState::Removed)
                .ok_or_else(|| Error::NotFound {
                    kind: "placement group",
                    name: req.placement_group.clone(),
                })?;
            let idx = if req.bundle_index < 0 {
                0
            } else {
                req.bundle_index as usize
            };
            let bundle = pg.bundles.get(idx).ok_or_else(|| {
                Error::invalid(
                    "bundle-index",
                    format!(
                        "{idx} is out of range: placement group {} has {} bundles",
                        pg.id,
                        pg.bundles.len()
                    ),
                )
            })?;
            if !resources.fits_in(bundle) {
                return Err(Error::invalid(
                    "resources",
                    format!(
                        "{} does not fit in bundle {idx} {}",
                        resources.shape(),
                        bundle.shape()
                    ),
                ));
            }
            (Some(pg.id.clone()), Some(idx))
        };
        let a = ActorRecord::new(
            new_id("actor_"),
            req.name,
            ActorSpec {
                command: req.command,
                args: req.args,
                env: req.env.into_iter().collect(),
                resources,
                placement_group: pg,
                bundle_index,
                max_restarts: req.max_restarts,
            },
            owner,
            now(),
        );
        let g = Store::guarded(self.store.actor_key(&a.id), &snap, &a);
        if !self.store.commit(None, &[g]).await? {
            return Err(Error::Contention { attempts: 1 });
        }
        Ok(a)
    }

    async fn kill_actor(&self, name_or_id: &str, reason: &str) -> Result<ActorRecord> {
        let cause = match reason.trim() {
            "" => "killed by `orchestrator actor kill`".to_string(),
            r => r.to_string(),
        };
        for _ in 0..ATTEMPTS {
            let snap = self.store.snapshot().await?;
            let a = snap.find_actor(name_or_id).ok_or_else(|| Error::NotFound {
                kind: "actor",
                name: name_or_id.to_string(),
            })?;
            if a.state == ActorState::Dead {
                return Ok(a.clone());
            }
            let mut d = a.clone();
            d.state = ActorState::Dead;
            d.ended_at = Some(now());
            d.death_cause = Some(cause.clone());
            if self
                .store
                .commit(
                    None,
                    &[Store::guarded(self.store.actor_key(&d.id), &snap, &d)],
                )
                .await?
            {
                return Ok(d);
            }
        }
        Err(Error::Contention { attempts: ATTEMPTS })
    }

    async fn actor_logs(&self, name_or_id: &str) -> Result<LogsReply> {
        let snap = self.store.snapshot().await?;
        let a = snap.find_actor(name_or_id).ok_or_else(|| Error::NotFound {
            kind: "actor",
            name: name_or_id.to_string(),
        })?;
        let node_id = a.node_id.clone().ok_or_else(|| Error::ActorOffNode {
            id: a.id.clone(),
            state: format!("{:?}", a.state),
        })?;
        let node = snap.nodes.get(&node_id).ok_or_else(|| Error::NotFound {
            kind: "node",
            name: node_id.clone(),
        })?;
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{}", node.agent_address))
            .map_err(|e| Error::BadAddress {
                address: node.agent_address.clone(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(2));
        let ch = ep.connect().await.map_err(|e| Error::Connect {
            address: node.agent_address.clone(),
            reason: e.to_string(),
        })?;
        let mut c = NodeAgentClient::with_interceptor(ch, Bearer::new(&self.token)?);
        let r = c
            .actor_logs(NameOrId {
                name_or_id: a.id.clone(),
            })
            .await?;
        Ok(r.into_inner())
    }
}

#[tonic::async_trait]
impl Orchestrator for HeadService {
    async fn hello(&self, _r: Request<HelloRequest>) -> RpcResult<HelloReply> {
        // Every client call starts with a Hello: two keys, not a snapshot.
        let r = self.store.leader_and_heads().await;
        let (leader, heads) = self.read_result(r).map_err(Status::from)?;
        let mut etcd_endpoints = self.etcd_endpoints.clone();
        if self.etcd_members {
            let mut c = self.store.client();
            if let Ok(r) = c.member_list().await {
                let ms: Vec<crate::members::MemberInfo> =
                    r.members().iter().map(Into::into).collect();
                let urls = crate::members::client_urls(&ms);
                if !urls.is_empty() {
                    etcd_endpoints = urls;
                }
            }
        }
        Ok(Response::new(HelloReply {
            etcd_endpoints,
            cluster_prefix: self.cluster.clone(),
            leader_address: leader.unwrap_or_default(),
            head_addresses: heads,
            node_ttl_s: self.ttl_s as u32,
        }))
    }

    async fn status(&self, _r: Request<StatusRequest>) -> RpcResult<JsonReply> {
        let snap = self.snapshot().await.map_err(Status::from)?;
        Ok(Response::new(json(&status::report(&snap, now()))))
    }

    async fn list(&self, r: Request<ListRequest>) -> RpcResult<JsonReply> {
        let kind = r.into_inner().kind;
        let snap = self.snapshot().await.map_err(Status::from)?;
        let out = match kind.as_str() {
            "nodes" => {
                let v: Vec<serde_json::Value> = snap
                    .nodes
                    .values()
                    .map(|n| {
                        let mut j = serde_json::to_value(n).expect("records serialize");
                        j["alive"] = serde_json::Value::Bool(
                            snap.live.contains(&n.id) && n.state == crate::state::NodeState::Alive,
                        );
                        j
                    })
                    .collect();
                json(&v)
            }
            "placement-groups" => json(&snap.pgs.values().collect::<Vec<_>>()),
            "actors" => json(&snap.actors.values().collect::<Vec<_>>()),
            other => {
                return Err(Error::invalid(
                    "list kind",
                    format!("'{other}' (expected nodes, placement-groups or actors)"),
                )
                .into())
            }
        };
        Ok(Response::new(out))
    }

    async fn create_placement_group(
        &self,
        r: Request<CreatePlacementGroupRequest>,
    ) -> RpcResult<JsonReply> {
        let pg = self.create_pg(r.into_inner()).await?;
        Ok(Response::new(json(&pg)))
    }

    async fn remove_placement_group(&self, r: Request<NameOrId>) -> RpcResult<JsonReply> {
        let pg = self.remove_pg(&r.into_inner().name_or_id).await?;
        Ok(Response::new(json(&pg)))
    }

    async fn register_owner(&self, r: Request<RegisterOwnerRequest>) -> RpcResult<JsonReply> {
        let o = HeadService::register_owner(self, r.into_inner()).await?;
        Ok(Response::new(json(&o)))
    }

    async fn refresh_owner(&self, r: Request<NameOrId>) -> RpcResult<JsonReply> {
        let o = HeadService::refresh_owner(self, &r.into_inner().name_or_id).await?;
        Ok(Response::new(json(&o)))
    }

    async fn witness(&self, r: Request<WitnessRequest>) -> RpcResult<WitnessReply> {
        let node_id = r.into_inner().node_id;
        if node_id.is_empty()
            || !node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(Error::invalid("node id", format!("'{node_id}'")).into());
        }
        Ok(Response::new(self.witness(&node_id).await))
    }

    async fn create_actor(&self, r: Request<CreateActorRequest>) -> RpcResult<JsonReply> {
        let a = HeadService::create_actor(self, r.into_inner()).await?;
        Ok(Response::new(json(&a)))
    }

    async fn kill_actor(&self, r: Request<KillActorRequest>) -> RpcResult<JsonReply> {
        let r = r.into_inner();
        let a = HeadService::kill_actor(self, &r.name_or_id, &r.reason).await?;
        Ok(Response::new(json(&a)))
    }

    async fn actor_logs(&self, r: Request<NameOrId>) -> RpcResult<LogsReply> {
        Ok(Response::new(
            HeadService::actor_logs(self, &r.into_inner().name_or_id).await?,
        ))
    }
}

pub fn server(
    svc: HeadService,
) -> tonic::service::interceptor::InterceptedService<OrchestratorServer<HeadService>, Checker> {
    let checker = Checker::new(svc.token.clone(), "Orchestrator");
    OrchestratorServer::with_interceptor(svc, checker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_ttl_defaults_to_the_node_ttl_and_stays_within_the_grace() {
        assert_eq!(owner_ttl(0.0, 3).unwrap(), 3);
        assert_eq!(owner_ttl(2.2, 3).unwrap(), 3, "whole seconds, rounded up");
        assert_eq!(owner_ttl(9.0, 3).unwrap(), 9);
        for bad in [1.0, 10.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = owner_ttl(bad, 3).unwrap_err().to_string();
            assert!(e.contains("invalid owner ttl"), "{bad}: {e}");
        }
        assert!(owner_ttl(10.0, 3)
            .unwrap_err()
            .to_string()
            .contains("between 2 s (etcd's shortest lease) and 9 s"));
    }
}
