//! Compiles every `.proto` file in this crate's root, so adding a service is
//! adding a file (and one `pub mod` line in lib.rs).
#[allow(clippy::disallowed_methods)] // cargo's variable for build scripts
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not baked in when it is compiled: a build
    // script binary can be reused for another checkout of the same crate.
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut protos: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    protos.sort();
    println!("cargo:rerun-if-changed={}", dir.display());
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    if protos.is_empty() {
        return Ok(());
    }
    // A step's encoded bytes are shared by every rank's stream: `Bytes`
    // clones are reference counts, `Vec<u8>` clones would copy each step.
    tonic_prost_build::configure()
        .bytes(".flotilla.worker.ExecuteRequest.scheduler_output")
        .compile_protos(&protos, std::slice::from_ref(&dir))?;
    Ok(())
}
