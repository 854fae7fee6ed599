//! The CPU backend's threads: rayon's global pool, sized and pinned to
//! cores as `VLLM_CPU_OMP_THREADS_BIND` says (vLLM binds its OpenMP threads
//! the same way). The pool is built once, at process start, before any
//! rayon use: rayon builds it on first use otherwise, and then it can no
//! longer be changed.

use runtime::envs::{self, CpuThreadsBind};

#[derive(Debug, thiserror::Error)]
pub enum CpuThreadsError {
    #[error(transparent)]
    Env(#[from] envs::EnvError),
    #[error(
        "VLLM_CPU_OMP_THREADS_BIND names cores {cores:?} this process may not run on (allowed: {allowed:?})"
    )]
    NotAllowed {
        cores: Vec<usize>,
        allowed: Vec<usize>,
    },
    #[error("VLLM_CPU_OMP_THREADS_BIND: cannot {what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("VLLM_CPU_OMP_THREADS_BIND: cannot build the CPU thread pool: {0}")]
    Pool(#[from] rayon::ThreadPoolBuildError),
}

/// Builds rayon's global pool from `VLLM_CPU_OMP_THREADS_BIND` (and
/// `LOCAL_RANK`). Unbound settings leave the pool to rayon (and
/// RAYON_NUM_THREADS). Once it succeeded, later calls (a gateway that
/// builds its engine again) do nothing: the environment is the same.
pub fn init_from_env() -> Result<(), CpuThreadsError> {
    static DONE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if !*done {
        init(envs::cpu_threads_bind()?)?;
        *done = true;
    }
    Ok(())
}

/// `init_from_env` for a given setting.
pub fn init(bind: CpuThreadsBind) -> Result<(), CpuThreadsError> {
    let cores = match bind {
        CpuThreadsBind::Unbound => return Ok(()),
        CpuThreadsBind::Auto => {
            tracing::warn!(
                "VLLM_CPU_OMP_THREADS_BIND=auto: NUMA-aware binding is not available in Flotilla; \
                 threads are not pinned (give a core list such as 0-31 to pin them)"
            );
            return Ok(());
        }
        CpuThreadsBind::Cores(cores) => cores,
    };
    // Checked here, because a pin that fails inside a pool thread can only be logged.
    let allowed = allowed_cores()?;
    let outside: Vec<usize> = cores
        .iter()
        .copied()
        .filter(|c| !allowed.contains(c))
        .collect();
    if !outside.is_empty() {
        return Err(CpuThreadsError::NotAllowed {
            cores: outside,
            allowed,
        });
    }
    let n = cores.len();
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .start_handler(move |i| {
            if let Err(e) = pin_current_thread(cores[i]) {
                tracing::error!(
                    "VLLM_CPU_OMP_THREADS_BIND: cannot pin thread {i} to core {}: {e}",
                    cores[i]
                );
            }
        })
        .build_global()?;
    tracing::info!("CPU backend: {n} threads, pinned by VLLM_CPU_OMP_THREADS_BIND");
    Ok(())
}

/// The cores the calling thread may run on.
pub fn allowed_cores() -> Result<Vec<usize>, CpuThreadsError> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(CpuThreadsError::Os {
                what: "read the process's CPU affinity",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

fn pin_current_thread(core: usize) -> std::io::Result<()> {
    // SAFETY: as above; the set holds one core below CPU_SETSIZE (checked
    // against the allowed cores).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
