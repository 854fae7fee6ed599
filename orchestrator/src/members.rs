//! Heads that share one etcd cluster, each running a member of it, as k3s
//! does with its embedded etcd: `start --head --address FIRST_HEAD` adds a
//! member to the first head's etcd and runs it locally, so three heads on
//! three machines survive the loss of any one machine, store included. A
//! head that stops cleanly removes its member again.

use std::time::Duration;

use etcd_client::Client;

use crate::error::{Error, Result};
use crate::etcd_proc::{free_port, member_name, Membership, OwnedEtcd};
use crate::paths::CacheRoot;
use crate::store::EtcdConfig;

/// One member as MemberList reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

impl From<&etcd_client::Member> for MemberInfo {
    fn from(m: &etcd_client::Member) -> Self {
        MemberInfo {
            id: m.id(),
            name: m.name().to_string(),
            peer_urls: m.peer_urls().to_vec(),
            client_urls: m.client_urls().to_vec(),
        }
    }
}

/// etcd's --initial-cluster for a new member `me` (already added, hence
/// listed without a name until it starts) joining `members`.
pub fn initial_cluster(members: &[MemberInfo], me: &str, my_peer: &str) -> Result<String> {
    let mut parts = Vec::new();
    for m in members {
        if m.peer_urls.iter().any(|u| u == my_peer) {
            continue;
        }
        if m.name.is_empty() {
            // Added but never started: etcd cannot name it, and a cluster
            // waiting for it may have no quorum.
            return Err(Error::EtcdMembership(format!(
                "member {:x} ({}) was added but never started; remove it with `etcdctl member remove {:x}` first",
                m.id,
                m.peer_urls.join(","),
                m.id
            )));
        }
        for u in &m.peer_urls {
            parts.push(format!("{}={u}", m.name));
        }
    }
    parts.push(format!("{me}={my_peer}"));
    Ok(parts.join(","))
}

/// Every member's client URLs: what agents and clients should dial.
pub fn client_urls(members: &[MemberInfo]) -> Vec<String> {
    let mut v: Vec<String> = members
        .iter()
        .flat_map(|m| m.client_urls.iter().cloned())
        .collect();
    v.sort();
    v.dedup();
    v
}

async fn client(cfg: &EtcdConfig) -> Result<Client> {
    cfg.connect("/flotilla/").await
}

pub async fn list(cfg: &EtcdConfig) -> Result<Vec<MemberInfo>> {
    let mut c = client(cfg).await?;
    let r = c.member_list().await?;
    Ok(r.members().iter().map(MemberInfo::from).collect())
}

/// Adds a member on `ip` to the cluster behind `existing` and starts it;
/// or, when this head (`slot`) crashed as a member, starts that member
/// again on its data (it is still in the cluster).
pub async fn join(
    root: &CacheRoot,
    ip: &str,
    slot: &str,
    existing: &EtcdConfig,
) -> Result<OwnedEtcd> {
    if let Some(s) = crate::etcd_proc::saved(root, slot) {
        tracing::info!("resuming etcd member {} on its data", s.name);
        return OwnedEtcd::start(root, ip, slot, Membership::Resume(s));
    }
    let mut c = client(existing).await?;
    let client_port = free_port(ip)?;
    let peer = free_port(ip)?;
    let name = member_name(ip, client_port);
    let peer_url = format!("http://{ip}:{peer}");
    // etcd refuses a member while the cluster is "unhealthy", e.g. for the
    // few seconds after another member joined (strict reconfig check):
    // that is worth waiting for; any other answer is not.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let added = loop {
        match c.member_add([peer_url.as_str()], None).await {
            Ok(r) => break r,
            Err(e)
                if e.to_string().contains("unhealthy cluster")
                    && std::time::Instant::now() < deadline =>
            {
                tracing::info!("etcd is not ready for another member yet ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let my_id = added.member().map(|m| m.id()).unwrap_or(0);
    let members: Vec<MemberInfo> = added.member_list().iter().map(MemberInfo::from).collect();
    let started = initial_cluster(&members, &name, &peer_url).and_then(|ic| {
        OwnedEtcd::start(
            root,
            ip,
            slot,
            Membership::Join {
                name: name.clone(),
                client: client_port,
                peer,
                initial_cluster: ic,
            },
        )
    });
    match started {
        Ok(e) => {
            tracing::info!("etcd member {name} ({my_id:x}) joined at {}", e.endpoint);
            Ok(e)
        }
        Err(e) => {
            // Leave no member behind that will never start.
            if my_id != 0 {
                let _ = tokio::time::timeout(Duration::from_secs(5), c.member_remove(my_id)).await;
            }
            Err(e)
        }
    }
}

/// Removes this head's member (found by its peer URL) when others remain,
/// so the cluster's quorum no longer counts it.
pub async fn leave(cfg: &EtcdConfig, peer_url: &str) -> Result<bool> {
    let mut c = client(cfg).await?;
    let members: Vec<MemberInfo> = c
        .member_list()
        .await?
        .members()
        .iter()
        .map(MemberInfo::from)
        .collect();
    let Some(me) = members
        .iter()
        .find(|m| m.peer_urls.iter().any(|u| u == peer_url))
    else {
        return Ok(false);
    };
    if members.len() < 2 {
        return Ok(false);
    }
    // Refused while the cluster is settling (a member joined moments ago):
    // retry briefly, as for joining.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match c.member_remove(me.id).await {
            Ok(_) => return Ok(true),
            Err(e) if crate::store::unreachable(&e) && std::time::Instant::now() < deadline => {
                tracing::info!(
                    "etcd refuses to remove member {} yet ({e}); retrying",
                    me.name
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u64, name: &str, peer: &str, client: &str) -> MemberInfo {
        MemberInfo {
            id,
            name: name.into(),
            peer_urls: vec![peer.into()],
            client_urls: if client.is_empty() {
                vec![]
            } else {
                vec![client.into()]
            },
        }
    }

    #[test]
    fn initial_cluster_lists_the_others_then_me() {
        let ms = [
            m(1, "a", "http://10.0.0.1:2380", "http://10.0.0.1:2379"),
            m(2, "", "http://10.0.0.2:2380", ""),
        ];
        assert_eq!(
            initial_cluster(&ms, "b", "http://10.0.0.2:2380").unwrap(),
            "a=http://10.0.0.1:2380,b=http://10.0.0.2:2380"
        );
        let e = initial_cluster(&ms, "c", "http://10.0.0.3:2380").unwrap_err();
        assert!(e.to_string().contains("never started"), "{e}");
        assert_eq!(client_urls(&ms), ["http://10.0.0.1:2379"]);
    }
}
