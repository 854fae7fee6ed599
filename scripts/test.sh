#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (real etcd, real
# binaries, real model files), then the OpenAI-client suite against a real
# gateway serving SmolLM2. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins
cargo test --workspace
FLOTILLA_GATEWAY_BIN="$PWD/target/debug/gateway" python3 -m pytest -q tests/python
