#!/usr/bin/env bash
# The orchestrator on a real GPU host: NVML detection (model, memory,
# CUDA_VISIBLE_DEVICES), status, two 0.5-GPU actors sharing one GPU id.
# Skips cleanly without an NVIDIA GPU. Usage: scripts/gpu-check.sh [DIR]
# where DIR holds the `orchestrator` and `etcd` binaries (default: PATH).
set -u
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "SKIP: no NVIDIA GPU on this machine"; exit 0
fi
[ -n "${1:-}" ] && export PATH=$1:$PATH
export FLOTILLA_CACHE_ROOT=$(mktemp -d)
nvidia-smi --query-gpu=index,name,memory.total --format=csv
orchestrator start --head --block --port 6390 --node-ip-address 127.0.0.1 > /tmp/head.log 2>&1 &
for i in $(seq 1 50); do orchestrator status --address 127.0.0.1:6390 >/dev/null 2>&1 && break; sleep 0.2; done
echo "== status -v"; orchestrator status -v --address 127.0.0.1:6390
echo "== list nodes"; orchestrator list nodes --format json --address 127.0.0.1:6390 | head -c 1500; echo
orchestrator actor create --address 127.0.0.1:6390 --name a1 --command bash --arg -c --arg 'echo CVD=$CUDA_VISIBLE_DEVICES; nvidia-smi -L; sleep 30' --resources '{"GPU": 0.5}'
orchestrator actor create --address 127.0.0.1:6390 --name a2 --command bash --arg -c --arg 'echo CVD=$CUDA_VISIBLE_DEVICES; sleep 30' --resources '{"GPU": 0.5}'
sleep 3
echo "== actors"; orchestrator list actors --address 127.0.0.1:6390
echo "== logs a1"; orchestrator actor logs a1 --address 127.0.0.1:6390
echo "== logs a2"; orchestrator actor logs a2 --address 127.0.0.1:6390
echo "== status after"; orchestrator status --address 127.0.0.1:6390
echo "== CUDA_VISIBLE_DEVICES='' head"; orchestrator stop; sleep 1
CUDA_VISIBLE_DEVICES= orchestrator start --head --block --port 6391 --node-ip-address 127.0.0.1 > /tmp/head2.log 2>&1 &
for i in $(seq 1 50); do orchestrator status --address 127.0.0.1:6391 >/dev/null 2>&1 && break; sleep 0.2; done
orchestrator status --address 127.0.0.1:6391 | grep -iE 'GPU|CPU'
orchestrator stop; sleep 1
echo "== head log tail"; tail -5 /tmp/head.log
