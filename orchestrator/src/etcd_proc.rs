//! The etcd a head starts for itself when given no `--etcd-endpoints`.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::paths::CacheRoot;

pub struct OwnedEtcd {
    child: Child,
    pub endpoint: String,
    /// This member's name and peer URL in the etcd cluster.
    pub name: String,
    pub peer_url: String,
    /// Where its resume record lives (see `Saved`).
    record: std::path::PathBuf,
    data_dir: std::path::PathBuf,
}

/// What it takes to start this head's member again on its own data after
/// a crash: same name, same ports (agents dial that client URL), same
/// data directory. Kept per head address under the cache root; a clean
/// stop deletes it, so the next start is a new cluster as before.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    pub name: String,
    pub client: u16,
    pub peer: u16,
    pub initial_cluster: String,
}

fn record_path(root: &CacheRoot, slot: &str) -> std::path::PathBuf {
    let safe: String = slot
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    root.0.join("etcd-members").join(safe)
}

/// The member a crashed head at `slot` (its address) left, if its data is
/// still there.
pub fn saved(root: &CacheRoot, slot: &str) -> Option<Saved> {
    let s: Saved =
        serde_json::from_str(&std::fs::read_to_string(record_path(root, slot)).ok()?).ok()?;
    root.etcd_dir(s.client)
        .join("data")
        .join("member")
        .is_dir()
        .then_some(s)
}

/// How the etcd to start relates to others.
#[derive(Debug, Clone)]
pub enum Membership {
    /// A new one-member cluster.
    New,
    /// This head's member again, on the data a crash left.
    Resume(Saved),
    /// A member already added (MemberAdd) to a running cluster, named
    /// `name` at ports `client`/`peer`; `initial_cluster` lists every member
    /// as etcd's --initial-cluster wants it.
    Join {
        name: String,
        client: u16,
        peer: u16,
        initial_cluster: String,
    },
}

/// A member name unique per machine and port.
pub fn member_name(ip: &str, client_port: u16) -> String {
    format!("flotilla-{}-{client_port}", ip.replace(['.', ':'], "-"))
}

pub fn free_port(ip: &str) -> Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0)).map_err(|e| Error::io(format!("{ip}:0"), e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("socket", e))
}

impl OwnedEtcd {
    pub fn start(root: &CacheRoot, ip: &str, slot: &str, membership: Membership) -> Result<Self> {
        let (name, client, peer, initial_cluster, state) = match membership {
            // With its data directory present etcd ignores the initial
            // cluster flags and resumes from its WAL.
            Membership::Resume(s) => (s.name, s.client, s.peer, s.initial_cluster, "existing"),
            Membership::New => {
                let client = free_port(ip)?;
                let peer = free_port(ip)?;
                let name = member_name(ip, client);
                let ic = format!("{name}=http://{ip}:{peer}");
                (name, client, peer, ic, "new")
            }
            Membership::Join {
                name,
                client,
                peer,
                initial_cluster,
            } => (name, client, peer, initial_cluster, "existing"),
        };
        let dir = root.etcd_dir(client);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("etcd.log"))
            .map_err(|e| Error::io(&dir, e))?;
        let endpoint = format!("http://{ip}:{client}");
        let peer_url = format!("http://{ip}:{peer}");
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&name)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--listen-client-urls")
            .arg(&endpoint)
            .arg("--advertise-client-urls")
            .arg(&endpoint)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&initial_cluster)
            .arg("--initial-cluster-state")
            .arg(state)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| Error::io(&dir, e))?)
            .stderr(log);
        // A head killed with -9 must not leave its etcd behind.
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|source| Error::EtcdMissing { source })?;
        let record = record_path(root, slot);
        let saved = Saved {
            name: name.clone(),
            client,
            peer,
            initial_cluster,
        };
        let mut me = OwnedEtcd {
            child,
            endpoint,
            name,
            peer_url,
            record: record.clone(),
            data_dir: dir.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = me.child.try_wait() {
                return Err(Error::EtcdExited {
                    status: st,
                    log: dir.join("etcd.log"),
                });
            }
            if std::net::TcpStream::connect(("127.0.0.1", client)).is_ok()
                || std::net::TcpStream::connect((ip, client)).is_ok()
            {
                let json =
                    serde_json::to_string(&saved).map_err(|e| Error::io(&record, e.into()))?;
                crate::paths::write_file(&record, &json)?;
                return Ok(me);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Error::Timeout {
            what: "waiting for the head's etcd to listen".into(),
            seconds: 20.0,
        })
    }
}

impl OwnedEtcd {
    /// After a clean stop: stops etcd, then deletes its resume record and
    /// data, so the next start on this address is a new cluster.
    pub fn stop_and_forget(self) {
        let (record, data) = (self.record.clone(), self.data_dir.clone());
        drop(self);
        let _ = std::fs::remove_file(record);
        let _ = std::fs::remove_dir_all(data);
    }
}

impl Drop for OwnedEtcd {
    fn drop(&mut self) {
        // SIGTERM first so etcd syncs its WAL.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
