#!/usr/bin/env bash
# Builds the CUDA test and benchmark binaries (no GPU or CUDA toolkit
# needed here) and copies them, stripped, to DIR for the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:?usage: build.sh DIR}
mkdir -p "$D"
cargo build -q -p flotilla-worker --features cuda --examples
test_bin=$(cargo test -q -p flotilla-worker --features cuda --test cuda_backend --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"] == "cuda_backend"][-1])')
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$test_bin" "$D/cuda_backend"
cp "$target/debug/examples/gpu_bench" "$target/debug/examples/generate" "$D/"
strip "$D"/cuda_backend "$D"/gpu_bench "$D"/generate
ls -la "$D"
