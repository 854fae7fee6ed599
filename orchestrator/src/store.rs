//! The thin etcd layer: key layout under one prefix per cluster, one-range
//! snapshots, and the guarded transactions that make reservations atomic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse,
};

use crate::error::{Error, Result};
use crate::state::{ActorRecord, NodeRecord, PgRecord, Snapshot};

/// How to reach etcd (endpoints plus the auth options that pass through).
#[derive(Debug, Clone, Default)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub cacert: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>, a: &crate::cli::EtcdArgs) -> Self {
        EtcdConfig {
            endpoints,
            user: a.etcd_user.clone(),
            password: a.etcd_password.clone(),
            cacert: a.etcd_cacert.clone(),
            cert: a.etcd_cert.clone(),
            key: a.etcd_key.clone(),
        }
    }

    pub fn tls(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// Checks the TLS/auth flags agree with each other, without reading files.
    pub fn validate(&self) -> Result<()> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(Error::invalid(
                "etcd TLS options",
                "--etcd-cert and --etcd-key go together (client certificate and its key)",
            ));
        }
        if self.tls() && self.cacert.is_none() {
            // This build trusts no system roots: etcd's CA must be named.
            return Err(Error::invalid(
                "etcd TLS options",
                "--etcd-cacert is required with --etcd-cert/--etcd-key (the CA that signed etcd's server certificate)",
            ));
        }
        if self.password.is_some() && self.user.is_none() {
            return Err(Error::invalid(
                "etcd auth options",
                "--etcd-password given without --etcd-user",
            ));
        }
        Ok(())
    }

    /// The endpoints as URLs: https:// when TLS options are given, http://
    /// otherwise; a scheme that contradicts the options is an error.
    pub fn urls(&self) -> Result<Vec<String>> {
        self.validate()?;
        if self.endpoints.is_empty() {
            return Err(Error::invalid("--etcd-endpoints", "no etcd endpoint given"));
        }
        self.endpoints
            .iter()
            .map(|e| {
                let e = e.trim();
                let (scheme, rest) = match e.split_once("://") {
                    Some((s, r)) => (Some(s), r),
                    None => (None, e),
                };
                if rest.is_empty() {
                    return Err(Error::invalid("etcd endpoint", format!("'{e}' has no host")));
                }
                match (scheme, self.tls()) {
                    (None, true) | (Some("https"), true) => Ok(format!("https://{rest}")),
                    (None, false) | (Some("http"), false) => Ok(format!("http://{rest}")),
                    (Some("http"), true) => Err(Error::invalid(
                        "etcd endpoint",
                        format!("'{e}' is plain http:// but etcd TLS options were given; use https://{rest}"),
                    )),
                    (Some("https"), false) => Err(Error::invalid(
                        "etcd endpoint",
                        format!("'{e}' is https:// (TLS): pass --etcd-cacert (and --etcd-cert/--etcd-key if etcd checks client certificates)"),
                    )),
                    (Some(s), _) => Err(Error::invalid(
                        "etcd endpoint",
                        format!("'{e}' has scheme '{s}' (expected http:// or https://)"),
                    )),
                }
            })
            .collect()
    }

    /// How this config talks to etcd, for error messages.
    pub fn transport(&self) -> String {
        let mut t = match (&self.cacert, &self.cert) {
            (None, _) => "plain HTTP, no TLS".to_string(),
            (Some(ca), None) => format!("TLS with CA {ca}, no client certificate"),
            (Some(ca), Some(cert)) => format!("TLS with CA {ca}, client certificate {cert}"),
        };
        match &self.user {
            Some(u) => t += &format!(", etcd user '{u}'"),
            None => t += ", no etcd user",
        }
        t
    }

    pub fn options(&self) -> Result<ConnectOptions> {
        self.validate()?;
        let mut o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(ca) = &self.cacert {
            let read = |p: &str| std::fs::read(p).map_err(|e| Error::io(p, e));
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            o = o.with_tls(tls);
        }
        if let Some(u) = &self.user {
            o = o.with_user(u.clone(), self.password.clone().unwrap_or_default());
        }
        Ok(o)
    }

    /// Connects and makes one read, so that TLS and auth failures surface
    /// here with the options named rather than on some later call.
    pub async fn connect(&self, probe_key: &str) -> Result<Client> {
        Ok(self.connect_from(probe_key, 0).await?.0)
    }

    /// A client of one endpoint: the first, from `start` on (wrapping),
    /// that answers a read; and its index. One endpoint at a time rather
    /// than etcd-client's balanced channel, which keeps sending a share of
    /// the requests to a member that is gone.
    pub async fn connect_from(&self, probe_key: &str, start: usize) -> Result<(Client, usize)> {
        let urls = self.urls()?;
        let opts = self.options()?;
        let mut reasons = Vec::new();
        for i in 0..urls.len() {
            let k = (start + i) % urls.len();
            let attempt = async {
                let mut c = Client::connect([urls[k].as_str()], Some(opts.clone())).await?;
                c.get(probe_key, Some(GetOptions::new().with_keys_only()))
                    .await?;
                Ok::<_, etcd_client::Error>(c)
            };
            match attempt.await {
                Ok(c) => return Ok((c, k)),
                Err(e) if urls.len() > 1 => {
                    reasons.push(format!("{}: {}", urls[k], error_chain(&e)))
                }
                Err(e) => reasons.push(error_chain(&e)),
            }
        }
        let mut reason = reasons.join("; ");
        if self.tls() && self.cert.is_none() {
            reason += " (an etcd with --client-cert-auth also needs --etcd-cert/--etcd-key)";
        }
        Err(Error::EtcdConnect {
            endpoints: urls.join(","),
            transport: self.transport(),
            reason,
        })
    }
}

/// An error and its sources on one line: etcd-client's own message often
/// hides the TLS or socket cause underneath.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s += ": ";
            s += &m;
        }
        cur = c.source();
    }
    s
}

/// Whether `e` means etcd did not answer (down, paused, unreachable), as
/// opposed to etcd answering with an error: only the former is an outage.
pub fn unreachable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        _ => false,
    }
}

/// Whether etcd says a lease does not exist (it expired or was revoked).
pub fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::NotFound && s.message().contains("lease not found")
        }
        // What etcd-client makes of a keep-alive stream's first answer.
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

/// A record write guarded by the record's mod_revision (0 = must not exist).
#[derive(Debug, Clone)]
pub struct Guarded {
    pub key: String,
    pub expect_rev: i64,
    pub value: String,
}

#[derive(Clone)]
pub struct Store {
    /// The client in use and the index of its endpoint in `cfg`.
    client: Arc<RwLock<(Client, usize)>>,
    cfg: EtcdConfig,
    prefix: String,
    failing_over: Arc<AtomicBool>,
}

impl Store {
    pub async fn connect(cfg: &EtcdConfig, cluster: &str) -> Result<Self> {
        let prefix = format!("/flotilla/{cluster}/");
        let client = cfg.connect_from(&prefix, 0).await?;
        Ok(Store {
            client: Arc::new(RwLock::new(client)),
            cfg: cfg.clone(),
            prefix,
            failing_over: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn client(&self) -> Client {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Passes `r` on; when etcd did not answer and other endpoints are
    /// configured, switches to the next one that does.
    async fn check<T>(&self, r: std::result::Result<T, etcd_client::Error>) -> Result<T> {
        if let Err(e) = &r {
            if unreachable(e) {
                self.failover().await;
            }
        }
        Ok(r?)
    }

    async fn failover(&self) {
        if self.cfg.endpoints.len() < 2 || self.failing_over.swap(true, Ordering::SeqCst) {
            return;
        }
        // Callers bound their reads with timeouts that may drop this future
        // mid-connect (the agent's pass does): the flag must come down
        // then too, or no later call would ever fail over again.
        struct Lower<'a>(&'a AtomicBool);
        impl Drop for Lower<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let _lower = Lower(&self.failing_over);
        let current = self.client.read().unwrap_or_else(|p| p.into_inner()).1;
        if let Ok((c, k)) = self.cfg.connect_from(&self.prefix, current + 1).await {
            if k != current {
                tracing::warn!(
                    "etcd at {} does not answer; now using {}",
                    self.cfg.endpoints[current % self.cfg.endpoints.len()],
                    self.cfg.endpoints[k]
                );
            }
            *self.client.write().unwrap_or_else(|p| p.into_inner()) = (c, k);
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn node_key(&self, id: &str) -> String {
        format!("{}nodes/{id}", self.prefix)
    }
    pub fn live_key(&self, id: &str) -> String {
        format!("{}live/{id}", self.prefix)
    }
    pub fn pg_key(&self, id: &str) -> String {
        format!("{}pgs/{id}", self.prefix)
    }
    pub fn actor_key(&self, id: &str) -> String {
        format!("{}actors/{id}", self.prefix)
    }
    pub fn owner_key(&self, id: &str) -> String {
        format!("{}owners/{id}", self.prefix)
    }
    pub fn alloc_key(&self) -> String {
        format!("{}alloc", self.prefix)
    }
    pub fn leader_key(&self) -> String {
        format!("{}leader", self.prefix)
    }
    pub fn head_key(&self, addr: &str) -> String {
        format!("{}heads/{addr}", self.prefix)
    }
    pub fn event_key(&self, suffix: &str) -> String {
        format!("{}events/{suffix}", self.prefix)
    }
    pub fn token_key(&self) -> String {
        format!("{}token", self.prefix)
    }

    /// Everything under the prefix in one range read, so all records agree.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let mut c = self.client();
        let resp = self
            .check(
                c.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
                    .await,
            )
            .await?;
        let mut s = Snapshot {
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            ..Default::default()
        };
        for kv in resp.kvs() {
            let key = kv.key_str().map_err(Error::Etcd)?;
            let rest = &key[self.prefix.len()..];
            let corrupt = |e: serde_json::Error| Error::Corrupt {
                key: key.to_string(),
                reason: e.to_string(),
            };
            if let Some(id) = rest.strip_prefix("nodes/") {
                let n: NodeRecord = serde_json::from_slice(kv.value()).map_err(corrupt)?;
                s.nodes.insert(id.to_string(), n);
            } else if let Some(id) = rest.strip_prefix("live/") {
                s.live.insert(id.to_string());
            } else if let Some(id) = rest.strip_prefix("owners/") {
                // Presence is what counts (the key lives on the owner's
                // lease); the value is for people reading etcd.
                s.owners.insert(id.to_string());
                continue;
            } else if let Some(id) = rest.strip_prefix("pgs/") {
                let p: PgRecord = serde_json::from_slice(kv.value()).map_err(corrupt)?;
                s.pgs.insert(id.to_string(), p);
            } else if let Some(id) = rest.strip_prefix("actors/") {
                let a: ActorRecord = serde_json::from_slice(kv.value()).map_err(corrupt)?;
                s.actors.insert(id.to_string(), a);
            } else if let Some(k) = rest.strip_prefix("events/") {
                // An event that does not parse is skipped, not fatal: events
                // only inform.
                if let Ok(e) = serde_json::from_slice(kv.value()) {
                    s.events.insert(k.to_string(), e);
                }
            } else if let Some(addr) = rest.strip_prefix("heads/") {
                s.heads.push(addr.to_string());
                continue;
            } else if rest == "alloc" {
                s.alloc_rev = kv.mod_revision();
                continue;
            } else if rest == "leader" {
                s.leader = Some(String::from_utf8_lossy(kv.value()).into_owned());
                continue;
            } else {
                continue;
            }
            s.mod_revs.insert(key.to_string(), kv.mod_revision());
        }
        Ok(s)
    }

    /// The leader's address and the live heads, in one read of just those
    /// keys: what `Hello` answers, without a whole snapshot (whose size
    /// grows with every record kept).
    pub async fn leader_and_heads(&self) -> Result<(Option<String>, Vec<String>)> {
        let mut c = self.client();
        let heads = format!("{}heads/", self.prefix);
        let txn = Txn::new().and_then([
            TxnOp::get(self.leader_key(), None),
            TxnOp::get(heads.as_str(), Some(GetOptions::new().with_prefix())),
        ]);
        let resp = self.check(c.txn(txn).await).await?;
        let mut leader = None;
        let mut addrs = Vec::new();
        for (i, op) in resp.op_responses().into_iter().enumerate() {
            let TxnOpResponse::Get(g) = op else { continue };
            for kv in g.kvs() {
                if i == 0 {
                    leader = Some(String::from_utf8_lossy(kv.value()).into_owned());
                } else if let Some(a) = kv.key_str().map_err(Error::Etcd)?.strip_prefix(&heads) {
                    addrs.push(a.to_string());
                }
            }
        }
        Ok((leader, addrs))
    }

    /// Writes `records` atomically, only if nobody changed them and (when
    /// `alloc_rev` is given) nobody reserved anything since the snapshot
    /// this decision was made on. False means: re-read and decide again.
    pub async fn commit(&self, alloc_rev: Option<i64>, records: &[Guarded]) -> Result<bool> {
        self.commit_if_absent(alloc_rev, records, &[]).await
    }

    /// [`Store::commit`], also guarded on `absent` keys not existing: a
    /// decision taken because a lease-bound key was gone must not land
    /// after its holder registered again.
    pub async fn commit_if_absent(
        &self,
        alloc_rev: Option<i64>,
        records: &[Guarded],
        absent: &[String],
    ) -> Result<bool> {
        let mut cmps = Vec::with_capacity(records.len() + absent.len() + 1);
        for k in absent {
            cmps.push(Compare::create_revision(k.as_str(), CompareOp::Equal, 0));
        }
        let mut ops = Vec::with_capacity(records.len() + 1);
        if let Some(rev) = alloc_rev {
            cmps.push(Compare::mod_revision(
                self.alloc_key(),
                CompareOp::Equal,
                rev,
            ));
            ops.push(TxnOp::put(self.alloc_key(), "", None));
        }
        for r in records {
            cmps.push(Compare::mod_revision(
                r.key.as_str(),
                CompareOp::Equal,
                r.expect_rev,
            ));
            ops.push(TxnOp::put(r.key.as_str(), r.value.as_str(), None));
        }
        let mut c = self.client();
        let resp = self
            .check(c.txn(Txn::new().when(cmps).and_then(ops)).await)
            .await?;
        Ok(resp.succeeded())
    }

    pub fn guarded<T: serde::Serialize>(key: String, snap: &Snapshot, rec: &T) -> Guarded {
        let expect_rev = snap.mod_revs.get(&key).copied().unwrap_or(0);
        Guarded {
            key,
            expect_rev,
            value: serde_json::to_string(rec).expect("records serialize"),
        }
    }

    pub async fn put(&self, key: &str, value: &str, lease: Option<i64>) -> Result<()> {
        let mut c = self.client();
        self.check(
            c.put(key, value, lease.map(|l| PutOptions::new().with_lease(l)))
                .await,
        )
        .await?;
        Ok(())
    }

    pub async fn grant(&self, ttl_s: u64) -> Result<i64> {
        let mut c = self.client();
        Ok(self
            .check(c.lease_grant(ttl_s as i64, None).await)
            .await?
            .id())
    }

    /// `key`'s value and the lease it is attached to (0: none); None when
    /// `key` is absent.
    pub async fn get_with_lease(&self, key: &str) -> Result<Option<(String, i64)>> {
        let mut c = self.client();
        let r = self.check(c.get(key, None).await).await?;
        Ok(r.kvs()
            .first()
            .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease())))
    }

    /// One keep-alive of `lease` (etcd-client sends it and reads etcd's
    /// answer); false when etcd no longer has the lease.
    pub async fn keep_alive_once(&self, lease: i64) -> Result<bool> {
        let mut c = self.client();
        match c.lease_keep_alive(lease).await {
            Ok(_) => Ok(true),
            Err(e) if lease_not_found(&e) => Ok(false),
            Err(e) => self.check(Err(e)).await,
        }
    }

    pub async fn get_string(&self, key: &str) -> Result<Option<String>> {
        let mut c = self.client();
        let r = self.check(c.get(key, None).await).await?;
        Ok(r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Puts `value` only when `key` does not exist yet; returns the value
    /// that is there afterwards.
    pub async fn put_if_absent(
        &self,
        key: &str,
        value: &str,
        lease: Option<i64>,
    ) -> Result<String> {
        let mut c = self.client();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                lease.map(|l| PutOptions::new().with_lease(l)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.check(c.txn(txn).await).await?;
        if resp.succeeded() {
            return Ok(value.to_string());
        }
        for r in resp.op_responses() {
            if let etcd_client::TxnOpResponse::Get(g) = r {
                if let Some(kv) = g.kvs().first() {
                    return Ok(String::from_utf8_lossy(kv.value()).into_owned());
                }
            }
        }
        Ok(value.to_string())
    }

    /// Appends events (best effort: they inform, they decide nothing).
    pub async fn record_events(&self, events: &[crate::events::Event]) {
        if events.is_empty() {
            return;
        }
        let ops: Vec<TxnOp> = events
            .iter()
            .filter_map(|e| {
                let v = serde_json::to_string(e).ok()?;
                Some(TxnOp::put(self.event_key(&e.key_suffix()), v, None))
            })
            .collect();
        let mut c = self.client();
        if let Err(e) = c.txn(Txn::new().and_then(ops)).await {
            tracing::debug!("recording {} event(s) failed: {e}", events.len());
        }
    }

    /// Deletes records that nobody changed since `snap` was read.
    pub async fn delete_unchanged(&self, snap: &Snapshot, keys: &[String]) -> Result<bool> {
        let cmps: Vec<Compare> = keys
            .iter()
            .map(|k| {
                Compare::mod_revision(
                    k.as_str(),
                    CompareOp::Equal,
                    snap.mod_revs.get(k).copied().unwrap_or(0),
                )
            })
            .collect();
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::delete(k.as_str(), None))
            .collect();
        let mut c = self.client();
        Ok(self
            .check(c.txn(Txn::new().when(cmps).and_then(ops)).await)
            .await?
            .succeeded())
    }

    /// `prefix/kind/id` for the record kinds in a snapshot.
    pub fn record_key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}/{id}", self.prefix)
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        let mut c = self.client();
        self.check(c.delete(key, None).await).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(eps: &[&str], ca: bool, cert: bool, key: bool) -> EtcdConfig {
        EtcdConfig {
            endpoints: eps.iter().map(|s| s.to_string()).collect(),
            cacert: ca.then(|| "ca.pem".into()),
            cert: cert.then(|| "c.pem".into()),
            key: key.then(|| "k.pem".into()),
            ..Default::default()
        }
    }

    #[test]
    fn endpoint_schemes_follow_tls_options() {
        let plain = cfg(&["127.0.0.1:2379", "http://h:1"], false, false, false);
        assert_eq!(
            plain.urls().unwrap(),
            ["http://127.0.0.1:2379", "http://h:1"]
        );
        let tls = cfg(&["127.0.0.1:2379", "https://h:1"], true, true, true);
        assert_eq!(
            tls.urls().unwrap(),
            ["https://127.0.0.1:2379", "https://h:1"]
        );
        let cases: &[(EtcdConfig, &str)] = &[
            (cfg(&["http://h:1"], true, false, false), "plain http://"),
            (cfg(&["https://h:1"], false, false, false), "--etcd-cacert"),
            (cfg(&["unix://x"], false, false, false), "scheme 'unix'"),
            (cfg(&["http://"], false, false, false), "no host"),
            (cfg(&[], false, false, false), "no etcd endpoint"),
            (cfg(&["h:1"], true, true, false), "go together"),
            (
                cfg(&["h:1"], false, true, true),
                "--etcd-cacert is required",
            ),
        ];
        for (c, want) in cases {
            let e = c.urls().unwrap_err().to_string();
            assert!(e.contains(want), "{c:?}: {e}");
        }
    }

    #[test]
    fn transport_names_tls_and_user() {
        let mut c = cfg(&["h:1"], true, false, false);
        assert_eq!(
            c.transport(),
            "TLS with CA ca.pem, no client certificate, no etcd user"
        );
        c.user = Some("root".into());
        c.cacert = None;
        assert_eq!(c.transport(), "plain HTTP, no TLS, etcd user 'root'");
        c.user = None;
        c.password = Some("x".into());
        assert!(c.validate().is_err());
    }

    #[test]
    fn missing_certificate_file_is_named() {
        let c = cfg(&["h:1"], true, false, false);
        let e = c.options().unwrap_err().to_string();
        assert!(e.contains("ca.pem"), "{e}");
    }
}
