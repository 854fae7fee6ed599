//! Re-launching this binary in the background: the non-`--block` `start`
//! and the head's own node agent both run detached from their parent.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::paths::CacheRoot;

/// A command for this binary with `args`, in a session of its own (so neither
/// a terminal hang-up nor a kill of the parent's process group reaches it),
/// stdout and stderr to a new `{log_prefix}-{timestamp}.log` under the cache
/// root. Returns the command, ready for extra env, and the log's path.
pub fn self_command(
    root: &CacheRoot,
    log_prefix: &str,
    args: &[String],
) -> Result<(Command, PathBuf)> {
    let exe = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
    std::fs::create_dir_all(root.logs_dir()).map_err(|e| Error::io(root.logs_dir(), e))?;
    let log_path = root.logs_dir().join(format!(
        "{log_prefix}-{}.log",
        chrono::Utc::now().format("%Y%m%d-%H%M%S%.3f")
    ));
    let log = std::fs::File::create(&log_path).map_err(|e| Error::io(&log_path, e))?;
    let err = log.try_clone().map_err(|e| Error::io(&log_path, e))?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(err);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok((cmd, log_path))
}
