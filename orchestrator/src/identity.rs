//! A node agent's identity across restarts: the node id it registered,
//! kept under the cache root per (cluster, IP). A restarted agent on the
//! same machine takes the same id back, so its actors and bundles, which
//! etcd records by node id, stay its own (kubelet keeps its node name).

use std::path::PathBuf;

use crate::paths::{read_trimmed, write_file, CacheRoot};

/// Where the id of the agent for `cluster` at `ip` is kept.
pub fn path(root: &CacheRoot, cluster: &str, ip: &str) -> PathBuf {
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    root.0
        .join("node-ids")
        .join(format!("{}@{}", safe(cluster), safe(ip)))
}

/// "NODE_ID PID": the id and the agent process that holds it.
pub fn format(node_id: &str, pid: u32) -> String {
    format!("{node_id} {pid}")
}

pub fn parse(s: &str) -> Option<(String, u32)> {
    let (id, pid) = s.trim().split_once(' ')?;
    let ok = id.starts_with("node_") && id[5..].chars().all(|c| c.is_ascii_alphanumeric());
    Some((id.to_string(), pid.parse().ok()?)).filter(|_| ok)
}

/// The id to take back: none when no file, or when another live agent
/// process still holds it (two agents must not share one node).
pub fn load(
    root: &CacheRoot,
    cluster: &str,
    ip: &str,
    holder_alive: impl Fn(u32) -> bool,
) -> Option<String> {
    let (id, pid) = parse(&read_trimmed(&path(root, cluster, ip))?)?;
    if pid != std::process::id() && holder_alive(pid) {
        tracing::warn!(
            "node id {id} is held by a running agent (pid {pid}); registering a new node"
        );
        return None;
    }
    Some(id)
}

pub fn save(root: &CacheRoot, cluster: &str, ip: &str, node_id: &str) -> crate::Result<()> {
    write_file(
        &path(root, cluster, ip),
        &format(node_id, std::process::id()),
    )
}

/// A clean stop leaves the cluster: the next start is a new node.
pub fn forget(root: &CacheRoot, cluster: &str, ip: &str) {
    let _ = std::fs::remove_file(path(root, cluster, ip));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        assert_eq!(
            parse(&format("node_ab12", 42)),
            Some(("node_ab12".into(), 42))
        );
        for bad in ["", "node_ab12", "node_ab12 x", "pg_ab 1", "node_a/b 1"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_live_holder_keeps_its_id() {
        let dir = std::env::temp_dir().join(format!("flotilla-ident-{}", std::process::id()));
        let root = CacheRoot(dir.clone());
        assert_eq!(load(&root, "c", "10.0.0.1", |_| false), None);
        write_file(&path(&root, "c", "10.0.0.1"), &format("node_ab", 1)).unwrap();
        assert_eq!(load(&root, "c", "10.0.0.1", |_| true), None);
        assert_eq!(
            load(&root, "c", "10.0.0.1", |_| false).as_deref(),
            Some("node_ab")
        );
        assert_eq!(load(&root, "c", "10.0.0.2", |_| false), None, "per IP");
        forget(&root, "c", "10.0.0.1");
        assert_eq!(load(&root, "c", "10.0.0.1", |_| false), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
