//! Finding the actor processes a previous run of this node's agent left
//! behind. Actors are not tied to their agent's life (no parent-death
//! signal): a crashed or upgraded agent leaves them running, and its
//! successor finds them here by the variables it started them with, then
//! keeps the ones etcd still assigns to the node (same incarnation) and
//! stops the rest (fencing).

use std::collections::BTreeMap;

/// An actor process found in /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub pid: u32,
    pub actor_id: String,
    pub incarnation: u64,
}

/// The actor a process runs for `node_id`, from its NUL-separated
/// environment; None for any other process.
pub fn parse_environ(environ: &[u8], node_id: &str) -> Option<(String, u64)> {
    let mut vars: BTreeMap<&[u8], &[u8]> = BTreeMap::new();
    for kv in environ.split(|&b| b == 0) {
        if let Some(i) = kv.iter().position(|&b| b == b'=') {
            vars.insert(&kv[..i], &kv[i + 1..]);
        }
    }
    if vars.get(&b"FLOTILLA_NODE_ID"[..]) != Some(&node_id.as_bytes()) {
        return None;
    }
    let id = std::str::from_utf8(vars.get(&b"FLOTILLA_ACTOR_ID"[..])?).ok()?;
    let inc = std::str::from_utf8(vars.get(&b"FLOTILLA_ACTOR_INCARNATION"[..])?)
        .ok()?
        .parse()
        .ok()?;
    Some((id.to_string(), inc))
}

/// The process group of a `/proc/PID/stat` line, and whether it is a zombie.
pub fn parse_stat(stat: &str) -> Option<(u32, bool)> {
    // "pid (comm) state ppid pgrp ..."; comm may hold spaces and parens.
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace();
    let state = f.next()?;
    let _ppid = f.next()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((pgrp, state == "Z"))
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
        .is_some_and(|(_, zombie)| !zombie)
}

/// Actor processes started for `node_id`: group leaders only (an actor
/// leads its own session and group; its children share its variables).
pub fn scan(node_id: &str) -> Vec<Found> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let Some((actor_id, incarnation)) = parse_environ(&env, node_id) else {
            continue;
        };
        let leader = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
            .is_some_and(|(pgrp, zombie)| pgrp == pid && !zombie);
        if leader {
            out.push(Found {
                pid,
                actor_id,
                incarnation,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environ_names_the_actor_of_this_node_only() {
        let env = b"PATH=/bin\0FLOTILLA_ACTOR_ID=actor_1\0FLOTILLA_NODE_ID=node_a\0FLOTILLA_ACTOR_INCARNATION=3\0X=a=b\0";
        assert_eq!(parse_environ(env, "node_a"), Some(("actor_1".into(), 3)));
        assert_eq!(parse_environ(env, "node_b"), None);
        assert_eq!(parse_environ(b"FLOTILLA_NODE_ID=node_a\0", "node_a"), None);
        assert_eq!(
            parse_environ(
                b"FLOTILLA_NODE_ID=node_a\0FLOTILLA_ACTOR_ID=x\0FLOTILLA_ACTOR_INCARNATION=z",
                "node_a"
            ),
            None
        );
    }

    #[test]
    fn stat_fields_after_the_command_name() {
        assert_eq!(parse_stat("42 (sleep) S 1 42 42 0"), Some((42, false)));
        assert_eq!(parse_stat("43 (a) b) (c) Z 1 7 7 0"), Some((7, true)));
        assert_eq!(parse_stat("garbage"), None);
        assert!(running(std::process::id()));
    }

    #[test]
    fn finds_a_process_it_started_with_the_variables() {
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new("sleep");
        c.arg("30")
            .env("FLOTILLA_NODE_ID", "node_scan")
            .env("FLOTILLA_ACTOR_ID", "actor_scan")
            .env("FLOTILLA_ACTOR_INCARNATION", "2");
        unsafe {
            c.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = c.spawn().unwrap();
        let found = scan("node_scan");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            found,
            vec![Found {
                pid: child.id(),
                actor_id: "actor_scan".into(),
                incarnation: 2
            }]
        );
    }
}
