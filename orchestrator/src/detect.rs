//! What this machine has: GPUs through NVML (loaded at run time), CPUs,
//! memory, and which IP address to announce.

use runtime::envs;
use std::net::{IpAddr, UdpSocket};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gpus {
    /// Ids as processes see them, after CUDA_VISIBLE_DEVICES.
    pub ids: Vec<u32>,
    pub model: Option<String>,
    pub memory_bytes: u64,
}

/// Which NVML indices CUDA_VISIBLE_DEVICES exposes; None when unset.
pub fn visible_indices(cvd: Option<&str>, count: u32, uuids: &[String]) -> Vec<u32> {
    let Some(cvd) = cvd else {
        return (0..count).collect();
    };
    let mut out = Vec::new();
    for part in cvd.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        // As CUDA does, an invalid entry hides it and everything after it.
        let idx = match part.parse::<u32>() {
            Ok(i) if i < count => Some(i),
            Ok(_) => None,
            Err(_) => uuids
                .iter()
                .position(|u| u.starts_with(part) || u.starts_with(&format!("GPU-{part}")))
                .map(|i| i as u32),
        };
        match idx {
            Some(i) if !out.contains(&i) => out.push(i),
            _ => break,
        }
    }
    out
}

type NvmlRet = i32;

/// Asks NVML; no library or no device means no GPUs.
pub fn gpus() -> Gpus {
    match nvml_gpus() {
        Ok(g) => g,
        Err(why) => {
            tracing::debug!("no GPUs detected: {why}");
            Gpus::default()
        }
    }
}

fn nvml_gpus() -> std::result::Result<Gpus, String> {
    // SAFETY: NVML's documented C ABI; handles and buffers stay in scope.
    unsafe {
        let lib = libloading::Library::new("libnvidia-ml.so.1").map_err(|e| e.to_string())?;
        let init: libloading::Symbol<unsafe extern "C" fn() -> NvmlRet> =
            lib.get(b"nvmlInit_v2").map_err(|e| e.to_string())?;
        if init() != 0 {
            return Err("nvmlInit failed".into());
        }
        let count_fn: libloading::Symbol<unsafe extern "C" fn(*mut u32) -> NvmlRet> = lib
            .get(b"nvmlDeviceGetCount_v2")
            .map_err(|e| e.to_string())?;
        let handle_fn: libloading::Symbol<
            unsafe extern "C" fn(u32, *mut *mut std::ffi::c_void) -> NvmlRet,
        > = lib
            .get(b"nvmlDeviceGetHandleByIndex_v2")
            .map_err(|e| e.to_string())?;
        let name_fn: libloading::Symbol<
            unsafe extern "C" fn(*mut std::ffi::c_void, *mut std::ffi::c_char, u32) -> NvmlRet,
        > = lib.get(b"nvmlDeviceGetName").map_err(|e| e.to_string())?;
        let uuid_fn: libloading::Symbol<
            unsafe extern "C" fn(*mut std::ffi::c_void, *mut std::ffi::c_char, u32) -> NvmlRet,
        > = lib.get(b"nvmlDeviceGetUUID").map_err(|e| e.to_string())?;
        let mem_fn: libloading::Symbol<
            unsafe extern "C" fn(*mut std::ffi::c_void, *mut [u64; 3]) -> NvmlRet,
        > = lib
            .get(b"nvmlDeviceGetMemoryInfo")
            .map_err(|e| e.to_string())?;
        let mut count = 0u32;
        if count_fn(&mut count) != 0 {
            return Err("nvmlDeviceGetCount failed".into());
        }
        let mut names = Vec::new();
        let mut uuids = Vec::new();
        let mut mems = Vec::new();
        for i in 0..count {
            let mut h = std::ptr::null_mut();
            if handle_fn(i, &mut h) != 0 {
                return Err(format!("no handle for GPU {i}"));
            }
            let mut buf = [0 as std::ffi::c_char; 96];
            let name = if name_fn(h, buf.as_mut_ptr(), buf.len() as u32) == 0 {
                std::ffi::CStr::from_ptr(buf.as_ptr())
                    .to_string_lossy()
                    .into_owned()
            } else {
                String::new()
            };
            let mut ubuf = [0 as std::ffi::c_char; 96];
            let uuid = if uuid_fn(h, ubuf.as_mut_ptr(), ubuf.len() as u32) == 0 {
                std::ffi::CStr::from_ptr(ubuf.as_ptr())
                    .to_string_lossy()
                    .into_owned()
            } else {
                String::new()
            };
            let mut mem = [0u64; 3];
            let total = if mem_fn(h, &mut mem) == 0 { mem[0] } else { 0 };
            names.push(name);
            uuids.push(uuid);
            mems.push(total);
        }
        let cvd = envs::raw(envs::CUDA_VISIBLE_DEVICES);
        let ids = visible_indices(cvd.as_deref(), count, &uuids);
        let first = ids.first().map(|&i| i as usize);
        Ok(Gpus {
            model: first.map(|i| accelerator_name(&names[i])),
            memory_bytes: first.map(|i| mems[i]).unwrap_or(0),
            ids,
        })
    }
}

/// "NVIDIA H100 80GB HBM3" -> "H100", as Ray's accelerator_type labels.
pub fn accelerator_name(full: &str) -> String {
    let s = full.trim_start_matches("NVIDIA ").trim();
    s.split_whitespace().next().unwrap_or(s).replace('-', "_")
}

pub fn cpu_count() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

pub fn memory_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_meminfo(&s)
}

fn parse_meminfo(s: &str) -> u64 {
    s.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The node IP and why it was chosen (printed, since several addresses are
/// often possible).
pub fn node_ip(flag: Option<&str>, toward: Option<&str>) -> (String, String) {
    if let Some(ip) = flag.filter(|s| !s.is_empty()) {
        return (ip.to_string(), "from --node-ip-address".into());
    }
    if let Some(ip) = envs::raw(envs::VLLM_HOST_IP) {
        return (ip, "from VLLM_HOST_IP".into());
    }
    let target = toward.unwrap_or("8.8.8.8:80");
    if let Some(ip) = route_source(target) {
        let why = match toward {
            Some(h) => format!("source address of the route to the head {h}"),
            None => "source address of the default route".into(),
        };
        return (
            ip.to_string(),
            format!("{why}; set --node-ip-address or VLLM_HOST_IP to choose another"),
        );
    }
    ("127.0.0.1".into(), "no route found; using loopback".into())
}

fn route_source(target: &str) -> Option<IpAddr> {
    // connect() on UDP sends nothing; it only asks the kernel for a route.
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect(target).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_devices() {
        let uuids = vec![
            "GPU-aaa".to_string(),
            "GPU-bbb".to_string(),
            "GPU-ccc".to_string(),
        ];
        assert_eq!(visible_indices(None, 3, &uuids), vec![0, 1, 2]);
        assert_eq!(visible_indices(Some("2,0"), 3, &uuids), vec![2, 0]);
        assert_eq!(visible_indices(Some(""), 3, &uuids), Vec::<u32>::new());
        assert_eq!(visible_indices(Some("1,7,2"), 3, &uuids), vec![1]);
        assert_eq!(visible_indices(Some("GPU-bbb"), 3, &uuids), vec![1]);
    }

    #[test]
    fn names_and_meminfo() {
        assert_eq!(accelerator_name("NVIDIA H100 80GB HBM3"), "H100");
        assert_eq!(accelerator_name("Tesla T4"), "Tesla");
        assert_eq!(
            parse_meminfo("MemTotal:       16384 kB\nMemFree: 1 kB\n"),
            16384 * 1024
        );
    }

    #[test]
    fn explicit_ip_wins() {
        assert_eq!(node_ip(Some("127.0.0.2"), None).0, "127.0.0.2");
    }
}
