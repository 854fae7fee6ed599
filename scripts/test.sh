#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (real etcd, real
# binaries, real model files), then the OpenAI-client suite against a real
# gateway serving SmolLM2. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A CI build is cold and thrown away: incremental caches would only take disk.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
cargo build --workspace --bins
cargo test --workspace
# The CUDA backend builds without a GPU or a CUDA toolkit (cudarc loads the
# libraries at run time); its GPU tests print SKIP here and run on a GPU
# machine through scripts/gpu/check.sh. NVRTC from PyPI compiles the kernel
# sources here all the same (kernels_compile_without_a_gpu).
nvrtc_lib=$(python3 scripts/nvrtc-lib-dir)
LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test -p flotilla-worker --features cuda --test cuda_backend
cargo check -p flotilla-gateway --features cuda --bins
# The Docker image and run_cluster.sh, from the debug binaries built above,
# then `orchestrator docker up|status|down` on that same image, which it
# removes (both SKIP without a usable Docker engine).
FLOTILLA_KEEP_TEST_IMAGE=1 bash tests/docker/run_cluster_test.sh ||
  { docker rmi flotilla:test >/dev/null 2>&1; exit 1; }
bash tests/docker/docker_helper_test.sh
FLOTILLA_GATEWAY_BIN="$PWD/target/debug/gateway" python3 -m pytest -q tests/python
# What the build took on disk (CI machines have had little to spare).
du -sh target 2>/dev/null || true
