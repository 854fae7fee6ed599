#!/usr/bin/env bash
# Serving throughput on the GPU machine: `gateway serve` of Llama-3.1-8B's
# shapes (dummy weights, the Llama 3 vocabulary from the fixtures) and
# `gateway bench serve` with 1,000 requests of 256 in / 256 out sent at once.
#   bash scripts/gpu/serve_bench.sh DIR [SERVE ARGS...]
#   (DIR: gateway binary + ggml-vocab-llama-bpe.gguf; SERVE ARGS go to
#   `gateway serve`, e.g. --async-scheduling)
#   READY_ONLY=1: stop once the server is ready (cold start times).
set -uo pipefail
D=${1:?usage: serve_bench.sh DIR [SERVE ARGS...]}
shift
OUT=${OUT:-/tmp/flotilla-gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
t0=$(date +%s%N)
"$D"/gateway serve bench/configs/llama-3.1-8b --load-format dummy \
  --tokenizer "$D"/ggml-vocab-llama-bpe.gguf --port 8011 --max-model-len 1024 \
  --max-num-batched-tokens 8192 "$@" > "$OUT/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  curl -sf http://127.0.0.1:8011/health >/dev/null && break
  kill -0 $pid 2>/dev/null || { echo "server died"; tail -20 "$OUT/serve.log"; exit 1; }
  sleep 1
done
echo "server ready after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
grep -E "Memory profiling|GPU blocks|Maximum concurrency|Loaded|Captured|CUDA device" "$OUT/serve.log"
if [ "${READY_ONLY:-0}" = 1 ]; then
  kill $pid; wait $pid 2>/dev/null
  exit 0
fi
trap 'grep -E "GPU busy" "$OUT/serve.log" | tail -8' EXIT
"$D"/gateway bench serve --url http://127.0.0.1:8011/v1 --num-prompts 1000 --max-concurrency 1000 \
  --random-input-len 256 --random-output-len 256 --ignore-eos --result-file "$OUT/serve.json" 2>&1 | tail -25
rc=$?
kill $pid; wait $pid 2>/dev/null
exit $rc
