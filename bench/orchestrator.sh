#!/usr/bin/env bash
# Orchestrator benchmark (issue 3): a head that owns its etcd plus 3 node
# agents on 127.0.0.1-.4, each declaring 2 GPUs, then `orchestrator bench`
# (placement-group create -> CREATED p50/p99 for 8 one-GPU bundles, status
# latency, placement with N simulated nodes in etcd, failure detection of a
# kill -9'd agent) and the `status` CLI's wall time. Everything started is
# stopped on exit.
# Usage: bench/orchestrator.sh [path/to/orchestrator] [iterations]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/orchestrator}
iters=${2:-200}
work=$(mktemp -d)
export FLOTILLA_CACHE_ROOT=$work/cache
pids=()
# `stop` first: the head's node agent is its own process and outlives a kill -9 of the head.
cleanup() { "$bin" stop >/dev/null 2>&1 || true; for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pkill -9 -f "$work" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port=$((20000 + RANDOM % 20000))
"$bin" start --head --block --port "$port" --node-ip-address 127.0.0.1 --num-gpus 2 --num-cpus 4 >"$work/head.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [ -f "$FLOTILLA_CACHE_ROOT/cluster_token" ] && "$bin" status --address "127.0.0.1:$port" >/dev/null 2>&1 && break; sleep 0.1; done
for i in 2 3 4; do
  "$bin" start --address "127.0.0.1:$port" --block --node-ip-address "127.0.0.$i" --num-gpus 2 --num-cpus 4 >"$work/node$i.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 1 100); do
  n=$("$bin" list nodes --address "127.0.0.1:$port" --format json | python3 -c 'import json,sys; print(sum(1 for n in json.load(sys.stdin) if n.get("state") == "ALIVE"))' 2>/dev/null || echo 0)
  [ "$n" = 4 ] && break; sleep 0.1
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); binary: $bin"
"$bin" bench --address "127.0.0.1:$port" --iterations "$iters"
# status as a user runs it: the whole CLI process.
python3 - "$bin" "127.0.0.1:$port" <<'PY'
import subprocess, sys, time
ts = []
for _ in range(20):
    t = time.perf_counter(); subprocess.run([sys.argv[1], "status", "--address", sys.argv[2]], check=True, capture_output=True); ts.append(time.perf_counter() - t)
ts.sort(); print(f"status CLI wall time: p50 {ts[len(ts)//2]*1e3:.1f} ms, max {ts[-1]*1e3:.1f} ms")
PY
# Time to converge after a 10 s etcd outage (issue 10): an actor runs, the
# head's etcd is frozen (SIGSTOP, as on an fsync stall) for 10 s, then the
# clock runs from SIGCONT until `status` reports the same nodes and usage as
# before and the actor still runs with the same pid and incarnation.
etcd_pid=$(pgrep -f -- "--data-dir $FLOTILLA_CACHE_ROOT/etcd-" | head -1)
"$bin" actor create --address "127.0.0.1:$port" --command sleep --arg 600 --resources '{"GPU":1}' --max-restarts -1 >/dev/null
python3 - "$bin" "127.0.0.1:$port" "$etcd_pid" <<'PY'
import json, os, signal, subprocess, sys, time
bin, addr, etcd = sys.argv[1], sys.argv[2], int(sys.argv[3])
def run(*a):
    r = subprocess.run([bin, *a, "--address", addr, "--format", "json"], capture_output=True, timeout=30)
    return json.loads(r.stdout) if r.returncode == 0 else None
def facts():
    s, acts = run("status"), run("list", "actors")
    if s is None or acts is None:
        return None
    return (sorted(n["id"] for n in s["active"]), s["usage"],
            sorted((a["id"], a["state"], a["pid"], a["incarnation"], a["restarts"]) for a in acts))
deadline = time.time() + 30
while True:
    before = facts()
    if before and before[2] and all(a[1] == "ALIVE" for a in before[2]):
        break
    if time.time() > deadline:
        sys.exit("the bench actor never became ALIVE")
    time.sleep(0.1)
os.kill(etcd, signal.SIGSTOP)
time.sleep(10)
os.kill(etcd, signal.SIGCONT)
t = time.perf_counter()
while facts() != before:
    if time.perf_counter() - t > 60:
        sys.exit(f"no convergence within 60 s after a 10 s etcd pause: {facts()} != {before}")
    time.sleep(0.05)
print(f"converged after a 10 s etcd pause (SIGSTOP): {time.perf_counter() - t:.2f} s after SIGCONT "
      f"({len(before[0])} nodes and usage as before, actor pid {before[2][0][2]} kept, 0 restarts)")
PY
