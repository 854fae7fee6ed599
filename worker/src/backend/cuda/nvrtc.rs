//! Kernels are `.cu` sources in the repository, compiled at start by NVRTC
//! for the device's own architecture (a cubin, so no PTX JIT at load) and
//! cached on disk: the key is the source hash, the architecture and the
//! NVRTC version, so a second start loads the cubin without compiling.

use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result as nvrtc, sys};

use crate::error::{Error, Result};

/// FNV-1a, 64 bits: stable across builds and Rust versions (the cache key
/// must not change when only the compiler does).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: plain out-parameters.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    r.result().map_err(|e| Error::cuda("nvrtcVersion", e))?;
    Ok((major, minor))
}

/// Where compiled kernels are kept: `$FLOTILLA_CACHE_ROOT/kernels`, else
/// `$VLLM_CACHE_ROOT/kernels`, else `~/.cache/flotilla/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    runtime::envs::cache_root().map(|r| r.join("kernels"))
}

/// A cubin for `src` on `sm_{major}{minor}`, from the cache when it is there.
/// `name` only labels the cache file and errors.
pub fn cubin(name: &str, src: &str, cc: (i32, i32), cache: Option<&Path>) -> Result<Vec<u8>> {
    let (vmaj, vmin) = nvrtc_version()?;
    let arch = format!("sm_{}{}", cc.0, cc.1);
    let key = fnv1a(format!("{src}\0{arch}\0{vmaj}.{vmin}").as_bytes());
    let path = cache.map(|d| d.join(format!("{name}-{arch}-nvrtc{vmaj}.{vmin}-{key:016x}.cubin")));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            tracing::debug!("kernel cache hit: {}", p.display());
            return Ok(bytes);
        }
    }
    let started = std::time::Instant::now();
    let bin = compile(name, src, &arch)?;
    tracing::info!(
        "Compiled {name} kernels for {arch} with NVRTC {vmaj}.{vmin} in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    if let Some(p) = &path {
        // A cache that cannot be written only costs the next start a compile.
        let write = || -> std::io::Result<()> {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &bin)?;
            std::fs::rename(&tmp, p)
        };
        if let Err(e) = write() {
            tracing::warn!("cannot cache compiled kernels at {}: {e}", p.display());
        }
    }
    Ok(bin)
}

fn compile(name: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    let c_src = CString::new(src).map_err(|e| Error::cuda("nvrtc source", e))?;
    let c_name = CString::new(format!("{name}.cu")).map_err(|e| Error::cuda("nvrtc name", e))?;
    let prog = nvrtc::create_program(&c_src, Some(&c_name))
        .map_err(|e| Error::cuda("nvrtcCreateProgram", e))?;
    let opts = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    // SAFETY: `prog` is a live program; the options outlive the call.
    let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
    let result = match compiled {
        Err(e) => {
            // SAFETY: as above.
            let log = unsafe { nvrtc::get_program_log(prog) }
                .map(|l| c_chars_to_string(&l))
                .unwrap_or_default();
            Err(Error::Cuda {
                op: "nvrtcCompileProgram".into(),
                msg: format!("{e:?}\n{log}"),
            })
        }
        Ok(()) => get_cubin(prog),
    };
    // SAFETY: destroyed once, after its last use.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}

fn get_cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    // SAFETY: a compiled program; out-parameter.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
        .result()
        .map_err(|e| Error::cuda("nvrtcGetCUBINSize", e))?;
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds `size` bytes as NVRTC asked.
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) }
        .result()
        .map_err(|e| Error::cuda("nvrtcGetCUBIN", e))?;
    Ok(buf)
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_is_stable() {
        // Pinned: a change here would silently invalidate every user's cache.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
