#!/usr/bin/env bash
# docker/build.sh and run_cluster.sh against the real Docker engine: builds
# flotilla:test from the debug binaries the suite already built, starts a
# head (127.0.0.1) and a worker (127.0.0.2) as two containers on this
# machine, waits for `orchestrator status` to list both, checks the usage
# errors, and stops each node by signalling its run_cluster.sh (TERM for the
# worker, INT as Ctrl-C sends for the head), whose trap must remove the
# container. Everything it makes is removed on exit, pass or fail; the base
# image (debian:bookworm-slim, made locally without a registry) is kept for
# the next run. With FLOTILLA_KEEP_TEST_IMAGE=1 flotilla:test stays too, for
# tests/docker/docker_helper_test.sh to use without building it again.
#
#   bash tests/docker/run_cluster_test.sh    (FLOTILLA_BIN_DIR: binaries, default target/debug)
#
# Without a usable Docker engine it prints SKIP and exits 0.
set -uo pipefail
cd "$(dirname "$0")/../.."

# What run_cluster.sh asks of docker, with a stand-in `docker` on PATH that
# records its arguments: the GPU switch and the address flags cannot all be
# exercised on an engine without the NVIDIA runtime. Needs no engine.
check_arguments() {
  local d bad="" what a
  d=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-docker-args.XXXXXX") || exit 1
  mkdir "$d/bin" "$d/hf"
  cat >"$d/bin/docker" <<'STANDIN'
#!/usr/bin/env bash
case $1 in
  info) [ "${2:-}" = --format ] && echo "$STANDIN_RUNTIMES"; exit 0 ;;
  container) exit 1 ;;
  run) shift; printf '%s\n' "$@" >"$STANDIN_DIR/run.args"; exit 0 ;;
  stop|rm) echo "$*" >>"$STANDIN_DIR/cleanup"; exit 0 ;;
esac
echo "stand-in docker: unexpected $*" >&2
exit 1
STANDIN
  chmod +x "$d/bin/docker"
  expect() { grep -qxF -- "$1" "$d/run.args" 2>/dev/null || bad+=" [$2: no '$1']"; }
  expect_not() { ! grep -qF -- "$1" "$d/run.args" 2>/dev/null || bad+=" [$2: '$1' given]"; }
  runs() {
    rm -f "$d/run.args" "$d/cleanup"
    PATH="$d/bin:$PATH" STANDIN_DIR=$d "$@" >"$d/out" 2>&1 || bad+=" [$what: exit status $?: $(cat "$d/out")]"
  }

  what="head, NVIDIA runtime"
  runs env STANDIN_RUNTIMES='{"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}}' \
    bash run_cluster.sh img 10.0.0.1 --head "$d/hf" -e VLLM_HOST_IP=10.0.0.5 --label x=y
  for a in --init --network host --name node --shm-size 10.24g --gpus all "$d/hf:/root/.cache/huggingface" \
    VLLM_HOST_IP=10.0.0.5 x=y --entrypoint orchestrator img start --block --head --port=6379 \
    --node-ip-address=10.0.0.5; do
    expect "$a" "$what"
  done
  { grep -q '^stop .*node$' "$d/cleanup" && grep -q '^rm -f .*node$' "$d/cleanup"; } 2>/dev/null ||
    bad+=" [$what: container node not removed on exit]"

  what="head, no NVIDIA runtime"
  runs env STANDIN_RUNTIMES='{"runc":{"path":"runc"}}' bash run_cluster.sh img 10.0.0.1 --head "$d/hf"
  expect_not --gpus "$what"
  expect --node-ip-address=10.0.0.1 "$what"
  grep -q 'without --gpus' "$d/out" || bad+=" [$what: no notice]"

  what="worker"
  runs env STANDIN_RUNTIMES='{}' FLOTILLA_CLUSTER_TOKEN=s3cret FLOTILLA_CONTAINER_NAME=node2 FLOTILLA_HEAD_PORT=7000 \
    bash run_cluster.sh img 10.0.0.1 --worker "$d/hf" --env=VLLM_HOST_IP=10.0.0.7
  for a in node2 --address=10.0.0.1:7000 --node-ip-address=10.0.0.7 FLOTILLA_CLUSTER_TOKEN; do
    expect "$a" "$what"
  done
  expect_not s3cret "$what (token on the command line)"

  what="worker, VLLM_HOST_IP from the environment"
  runs env STANDIN_RUNTIMES='{}' VLLM_HOST_IP=10.0.0.8 \
    bash run_cluster.sh img 10.0.0.1 --worker "$d/hf" -e VLLM_HOST_IP -e FLOTILLA_CLUSTER_TOKEN=t
  expect --node-ip-address=10.0.0.8 "$what"

  rm -rf "$d"
  [ -z "$bad" ] || { echo "FAIL: run_cluster.sh arguments:$bad" >&2; exit 1; }
  echo "== run_cluster.sh arguments (stand-in docker): ok"
}
check_arguments

if ! docker info >/dev/null 2>&1; then
  echo "SKIP: tests/docker/run_cluster_test.sh: no usable Docker engine (\`docker info\` failed)"
  exit 0
fi

TAG=flotilla:test
HEAD=flotilla-test-head-$$
WORKER=flotilla-test-worker-$$
BIN_DIR=${FLOTILLA_BIN_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/debug}
work=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-docker-test.XXXXXX")
head_pid="" worker_pid=""
t_start=$SECONDS

cleanup() {
  trap - EXIT INT TERM
  local p
  for p in $head_pid $worker_pid; do kill -TERM "$p" 2>/dev/null; done
  for p in $head_pid $worker_pid; do wait "$p" 2>/dev/null; done
  # In case a run_cluster.sh died before its trap could run.
  docker rm -f "$HEAD" "$WORKER" >/dev/null 2>&1
  # scripts/test.sh keeps the image for docker_helper_test.sh, which removes it.
  [ "${FLOTILLA_KEEP_TEST_IMAGE:-}" = 1 ] || docker rmi "$TAG" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  echo "FAIL: $*" >&2
  local f
  for f in "$work"/*.log; do
    [ -f "$f" ] && { echo "--- $(basename "$f")" >&2; tail -20 "$f" >&2; }
  done
  exit 1
}

# Polls `$@` until it succeeds; fails after $1 seconds or when process $2
# (a run_cluster.sh) has exited.
wait_for() {
  local what=$1 seconds=$2 pid=$3
  shift 3
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && fail "$what: run_cluster.sh exited first"
    [ $SECONDS -ge $deadline ] && fail "$what: not within $seconds s"
    sleep 0.5
  done
}

active_nodes() { docker exec "$HEAD" orchestrator status | sed -n '/^Active:/,/^Pending:/p' | grep -c '^ 1 node_'; }
two_nodes() {
  local s
  s=$(docker exec "$HEAD" orchestrator status) || return 1
  echo "$s" >"$work/status.txt"
  echo "$s" | grep -q '^ 1 node_.* (127\.0\.0\.1, head)$' && echo "$s" | grep -q '^ 1 node_.* (127\.0\.0\.2)$'
}
one_node() { [ "$(active_nodes)" = 1 ]; }
container_gone() { ! docker container inspect "$1" >/dev/null 2>&1; }
process_gone() { ! kill -0 "$1" 2>/dev/null; }

# Stops a node the way a user does, by signalling its run_cluster.sh.
stop_node() {
  local sig=$1 pid=$2 name=$3
  kill "-$sig" "$pid" || fail "kill -$sig $pid"
  wait_for "run_cluster.sh exits on SIG$sig" 30 "" process_gone "$pid"
  wait_for "SIG$sig to run_cluster.sh removes container $name" 5 "" container_gone "$name"
}

echo "== docker/build.sh --bin-dir $BIN_DIR --tag $TAG"
t0=$SECONDS
bash docker/build.sh --bin-dir "$BIN_DIR" --tag "$TAG" >"$work/build.log" 2>&1 || fail "docker/build.sh"
grep '^==' "$work/build.log"
echo "   image built in $((SECONDS - t0)) s"

echo "== usage errors"
out=$(bash run_cluster.sh "$TAG" 127.0.0.1 --boss "$work/hf" 2>&1) && fail "--boss was accepted"
echo "$out" | grep -q '^Error: Node type must be --head or --worker$' || fail "--boss: no error: $out"
echo "$out" | grep -q '^Usage: .*run_cluster.sh docker_image head_node_address --head|--worker path_to_hf_home \[additional_args...\]$' ||
  fail "--boss: no usage: $out"
out=$(bash run_cluster.sh "$TAG" 127.0.0.1 --head 2>&1) && fail "three arguments were accepted"
echo "$out" | grep -q '^Usage: ' || fail "three arguments: no usage: $out"
out=$(env -u FLOTILLA_CLUSTER_TOKEN FLOTILLA_CONTAINER_NAME="$WORKER" \
  bash run_cluster.sh "$TAG" 127.0.0.1 --worker "$work/hf" 2>&1) && fail "a worker without a token was started"
echo "$out" | grep -q 'cluster token' || fail "worker without a token: $out"
container_gone "$WORKER" || fail "a refused start left container $WORKER"

# A port nobody listens on: other clusters (and other test runs) may be up here.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Job control: a background job of a script otherwise ignores SIGINT, which
# run_cluster.sh must be able to trap.
set -m
echo "== head: run_cluster.sh $TAG 127.0.0.1 --head (container $HEAD, port $port)"
t0=$SECONDS
FLOTILLA_CONTAINER_NAME=$HEAD FLOTILLA_HEAD_PORT=$port \
  bash run_cluster.sh "$TAG" 127.0.0.1 --head "$work/hf" -e VLLM_HOST_IP=127.0.0.1 >"$work/head.log" 2>&1 &
head_pid=$!
wait_for "the head answers orchestrator status" 60 "$head_pid" docker exec "$HEAD" orchestrator status
echo "   head up in $((SECONDS - t0)) s"

token=$(docker exec "$HEAD" cat /root/.cache/flotilla/cluster_token) || fail "reading the head's token"
echo "== worker: run_cluster.sh $TAG 127.0.0.1 --worker (container $WORKER, VLLM_HOST_IP=127.0.0.2)"
t0=$SECONDS
FLOTILLA_CLUSTER_TOKEN=$token FLOTILLA_CONTAINER_NAME=$WORKER FLOTILLA_HEAD_PORT=$port \
  bash run_cluster.sh "$TAG" 127.0.0.1 --worker "$work/hf" -e VLLM_HOST_IP=127.0.0.2 >"$work/worker.log" 2>&1 &
worker_pid=$!
wait_for "orchestrator status lists the head and the worker" 60 "$worker_pid" two_nodes
echo "   2 nodes after $((SECONDS - t0)) s:"
sed -n '/^Active:/,/^Pending:/p' "$work/status.txt" | sed -n '2,3p'
[ "$(active_nodes)" = 2 ] || fail "expected 2 active nodes"

echo "== SIGTERM to the worker's run_cluster.sh"
stop_node TERM "$worker_pid" "$WORKER"
worker_pid=""
wait_for "the head sees the worker leave" 30 "$head_pid" one_node
echo "== SIGINT to the head's run_cluster.sh"
stop_node INT "$head_pid" "$HEAD"
head_pid=""
set +m

echo "PASS: tests/docker/run_cluster_test.sh in $((SECONDS - t_start)) s"
