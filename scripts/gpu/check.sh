#!/usr/bin/env bash
# The GPU checks of the CUDA backend, run on the GPU machine through the
# device tool. DIR holds the binaries built here (scripts/gpu/build.sh):
#   bash scripts/gpu/check.sh DIR [tests|hf|bench|kernels|graphs]...   (default: the first three)
# `kernels` holds the kernels that have alternatives side by side (tiled vs
# lanes attention, cuBLAS vs GEMV for small batches) and runs 8B decode with
# each choice (FLOTILLA_CUDA_ATTENTION / FLOTILLA_CUDA_SMALL_BATCH_LINEAR);
# `graphs` runs decode eagerly (--enforce-eager) and as CUDA graphs.
# Without a GPU it prints SKIP and exits 0.
set -uo pipefail
D=${1:?usage: check.sh DIR [tests|hf|bench]...}
shift
parts=${*:-tests hf bench}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "SKIP: no NVIDIA GPU here"
  exit 0
fi
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export FLOTILLA_CACHE_ROOT=${FLOTILLA_CACHE_ROOT:-/tmp/flotilla-gpu-check}
OUT=${OUT:-/tmp/flotilla-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
rc=0
for part in $parts; do
  case $part in
  tests)
    echo "== kernels and model steps against the CPU backend"
    "$D"/cuda_backend --test-threads 1 2>&1 | tee "$OUT/tests.log" | grep -E "rel err|max logprob|identical|differ|test |SKIP|panicked|result" | grep -vE "^\s*$" | tail -80
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    ;;
  hf)
    echo "== end to end against HF transformers (bf16, random weights at real shapes)"
    python3 - > /tmp/prompts.json <<'PY'
import json, random
random.seed(1)
print(json.dumps([[random.randrange(1000, 100000) for _ in range(n)] for n in (5, 17, 64, 130)]))
PY
    # bf16: both sides round every op to bf16, so a greedy choice may flip
    # where HF's top two logits are within bf16 resolution (a near tie);
    # float32 (the same bf16 weights, f32 compute) must agree token for token.
    for kind in llama8b qwen2; do
      python3 scripts/gpu/hf_compare.py make $kind /tmp/$kind >/dev/null 2>"$OUT/make-$kind.log" || { echo "make $kind failed"; tail -5 "$OUT/make-$kind.log"; rc=1; continue; }
      for dt in bfloat16:0.25 float32:0.002; do
        dtype=${dt%%:*} tol=${dt##*:}
        python3 scripts/gpu/hf_compare.py reference /tmp/$kind /tmp/prompts.json 32 /tmp/$kind-$dtype-ref.json $dtype 2>"$OUT/ref-$kind.log" || { echo "HF reference $kind failed"; tail -5 "$OUT/ref-$kind.log"; rc=1; continue; }
        "$D"/generate /tmp/$kind /tmp/prompts.json 32 --device cuda --dtype $dtype > /tmp/$kind-$dtype-ours.json 2>"$OUT/ours-$kind.log" || { echo "generate $kind failed"; tail -5 "$OUT/ours-$kind.log"; rc=1; continue; }
        echo "-- $kind $dtype"
        python3 scripts/gpu/hf_compare.py compare /tmp/$kind-$dtype-ours.json /tmp/$kind-$dtype-ref.json $tol || rc=1
      done
    done
    ;;
  bench)
    echo "== decode speed (dummy weights), cold then warm kernel cache"
    rm -rf "$FLOTILLA_CACHE_ROOT/kernels"
    "$D"/gpu_bench bench/configs/smollm2-135m --batch 1 --new-tokens 16 > "$OUT/cold.txt" && head -1 "$OUT/cold.txt"
    "$D"/gpu_bench bench/configs/smollm2-135m --batch 1,32,256 --prompt-len 128 --new-tokens 64
    "$D"/gpu_bench bench/configs/llama-3.1-8b --batch 1,8,32,256 --prompt-len 256 --new-tokens 64 ${BENCH_OPS:+--ops} || rc=1
    ;;
  kernels)
    echo "== kernels with alternatives, one layer / one linear at Llama-3.1-8B's shapes"
    "$D"/gpu_bench bench/configs/llama-3.1-8b --attention || rc=1
    "$D"/gpu_bench bench/configs/llama-3.1-8b --batch 1 --prompt-len 16 --new-tokens 8 --ops | grep -E "^\\| (qkv|o|gate_up|down|lm_head) |linear" || rc=1
    echo "-- whole model steps with tiled attention + gemv against the CPU backend"
    FLOTILLA_CUDA_ATTENTION=tiled FLOTILLA_CUDA_SMALL_BATCH_LINEAR=gemv "$D"/cuda_backend --test-threads 1 \
      runner pipeline 2>&1 | grep -E "^test |test result|max logprob|panicked" || rc=1
    for choice in "tiled blas" "lanes blas" "lanes gemv"; do
      set -- $choice
      echo "-- 8B decode, attention $1, small-batch linear $2"
      FLOTILLA_CUDA_ATTENTION=$1 FLOTILLA_CUDA_SMALL_BATCH_LINEAR=$2 \
        "$D"/gpu_bench bench/configs/llama-3.1-8b --batch 1,8,256 --prompt-len 256 --new-tokens 64 || rc=1
    done
    ;;
  graphs)
    echo "== decode eagerly and as CUDA graphs (dummy weights)"
    for eager in --enforce-eager ""; do
      echo "-- Llama-3.1-8B ${eager:-graphs}"
      "$D"/gpu_bench bench/configs/llama-3.1-8b --batch 1,8,32,64,128,256 --prompt-len 256 --new-tokens 64 $eager || rc=1
      echo "-- SmolLM2-135M ${eager:-graphs}"
      "$D"/gpu_bench bench/configs/smollm2-135m --batch 1,32,256 --prompt-len 128 --new-tokens 64 $eager || rc=1
    done
    ;;
  esac
done
exit $rc
