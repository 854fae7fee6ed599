//! Files under the cache root (`$FLOTILLA_CACHE_ROOT`, else `~/.cache/flotilla`).

use std::path::{Path, PathBuf};

use runtime::envs;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct CacheRoot(pub PathBuf);

impl CacheRoot {
    pub fn from_env() -> Self {
        if let Some(p) = envs::raw(envs::FLOTILLA_CACHE_ROOT) {
            return CacheRoot(PathBuf::from(p));
        }
        let home = envs::home_dir().unwrap_or_else(|| PathBuf::from("/tmp"));
        CacheRoot(home.join(".cache").join("flotilla"))
    }

    pub fn ensure(&self) -> Result<()> {
        std::fs::create_dir_all(&self.0).map_err(|e| Error::io(&self.0, e))
    }

    /// The address of the head started on this machine, as Ray's
    /// /tmp/ray/ray_current_cluster.
    pub fn head_address_file(&self) -> PathBuf {
        self.0.join("head_address")
    }
    /// Every head address seen, so clients can follow a new leader.
    pub fn heads_file(&self) -> PathBuf {
        self.0.join("known_heads")
    }
    pub fn token_file(&self) -> PathBuf {
        self.0.join("cluster_token")
    }
    pub fn pids_dir(&self) -> PathBuf {
        self.0.join("pids")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.0.join("logs")
    }
    pub fn etcd_dir(&self, port: u16) -> PathBuf {
        self.0.join(format!("etcd-{port}"))
    }
}

pub fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub fn write_file(p: &Path, contents: &str) -> Result<()> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    // Write then rename, so a reader never sees half a file.
    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, contents).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, p).map_err(|e| Error::io(p, e))
}

/// Registers this process for `orchestrator stop`; removed on drop.
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn create(root: &CacheRoot, role: &str) -> Result<Self> {
        let p = root.pids_dir().join(format!("{}", std::process::id()));
        write_file(&p, role)?;
        Ok(PidFile(p))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
