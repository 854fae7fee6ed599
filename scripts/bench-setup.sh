#!/usr/bin/env bash
# Peers for BENCHMARKS.md, kept out of the test suite's environment: HF
# transformers on torch (CPU) and llama-cpp-python (compiles llama.cpp, takes
# minutes). Installs into a venv under the cache root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv=${FLOTILLA_BENCH_VENV:-${FLOTILLA_CACHE_ROOT:-$HOME/.cache/flotilla}/bench-venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
  torch transformers accelerate gguf numpy requests openai llama-cpp-python
echo "$venv"
