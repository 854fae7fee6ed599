//! VLLM_CPU_OMP_THREADS_BIND builds rayon's global pool: a test binary of
//! its own, because the global pool can be built only once per process.

use runtime::envs::CpuThreadsBind;
use worker::cpu_threads::{allowed_cores, init, CpuThreadsError};

#[test]
fn a_core_list_sizes_and_pins_the_global_pool() {
    // Unbound settings change nothing (the pool is still unbuilt after them).
    init(CpuThreadsBind::Unbound).unwrap();
    init(CpuThreadsBind::Auto).unwrap();
    let allowed = allowed_cores().unwrap();
    let outside = allowed.iter().max().unwrap() + 1;
    let e = init(CpuThreadsBind::Cores(vec![outside])).unwrap_err();
    assert!(matches!(e, CpuThreadsError::NotAllowed { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("VLLM_CPU_OMP_THREADS_BIND names cores"),
        "{e}"
    );

    let core = allowed[0];
    init(CpuThreadsBind::Cores(vec![core])).unwrap();
    assert_eq!(rayon::current_num_threads(), 1);
    let (tx, rx) = std::sync::mpsc::channel();
    rayon::spawn(move || tx.send(allowed_cores().unwrap()).unwrap());
    assert_eq!(rx.recv().unwrap(), vec![core]);
    // The pool exists now: a second build is an error, not a silent no-op.
    assert!(matches!(
        init(CpuThreadsBind::Cores(vec![core])),
        Err(CpuThreadsError::Pool(_))
    ));
}
