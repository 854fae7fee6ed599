#!/usr/bin/env bash
# `orchestrator docker up|status|down` against the real Docker engine: the
# three refusals (image missing, engine unreachable, name taken), Ctrl-C
# during `up`, then a head and 2 workers: `status` shows 3 nodes, a
# `docker kill`ed worker is dead within the head's detection time, and
# `down` leaves no container or network behind.
#
# It uses the image flotilla:test when it is there (scripts/test.sh runs
# run_cluster_test.sh first with FLOTILLA_KEEP_TEST_IMAGE=1, so the image is
# built once) and builds it from the debug binaries otherwise; it removes
# the image and everything labelled with its cluster names on exit, pass or
# fail.
#
#   bash tests/docker/docker_helper_test.sh   (FLOTILLA_BIN_DIR: binaries, default target/debug)
#
# Without a usable Docker engine it prints SKIP and exits 0.
set -uo pipefail
cd "$(dirname "$0")/../.."

if ! docker info >/dev/null 2>&1; then
  echo "SKIP: tests/docker/docker_helper_test.sh: no usable Docker engine (\`docker info\` failed)"
  exit 0
fi

TAG=flotilla:test
NAME=flotilla-dh-$$
# The cluster a Ctrl-C interrupts; its own name, so a leftover is told apart.
INT_NAME=flotilla-dh-int-$$
BIN_DIR=${FLOTILLA_BIN_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/debug}
ORCH=$BIN_DIR/orchestrator
# The head's default node TTL (orchestrator start --node-ttl-s): a killed
# worker must be reported dead within it plus the reaper's round.
TTL_S=3
work=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-docker-helper.XXXXXX")
up_pid=""
t_start=$SECONDS

cleanup() {
  trap - EXIT INT TERM
  [ -n "$up_pid" ] && kill -TERM "$up_pid" 2>/dev/null && wait "$up_pid" 2>/dev/null
  local n
  for n in "$NAME" "$INT_NAME"; do
    "$ORCH" docker down --name "$n" >/dev/null 2>&1
    docker rm -f $(docker ps -aq --filter "label=flotilla.cluster=$n") >/dev/null 2>&1
    docker network rm $(docker network ls -q --filter "label=flotilla.cluster=$n") >/dev/null 2>&1
  done
  docker rm -f "$NAME-worker-1" >/dev/null 2>&1
  docker rmi "$TAG" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

[ -x "$ORCH" ] || fail "$ORCH is missing (cargo build --bins first, or set FLOTILLA_BIN_DIR)"

nothing_left() {
  local n=$1
  [ -z "$(docker ps -aq --filter "label=flotilla.cluster=$n")" ] &&
    [ -z "$(docker network ls -q --filter "label=flotilla.cluster=$n")" ]
}
active_nodes() { sed -n '/^Active:/,/^Pending:/p' "$1" | grep -c '^ 1 node_'; }

if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "== using $TAG (built by run_cluster_test.sh)"
else
  echo "== docker/build.sh --bin-dir $BIN_DIR --tag $TAG"
  bash docker/build.sh --bin-dir "$BIN_DIR" --tag "$TAG" >"$work/build.log" 2>&1 ||
    { tail -20 "$work/build.log" >&2; fail "docker/build.sh"; }
fi

echo "== refusals"
out=$("$ORCH" docker up --image flotilla:no-such-$$ --name "$NAME" 2>&1) && fail "a missing image was accepted"
echo "$out" | grep -qF "image flotilla:no-such-$$ not found: build it with docker/build.sh" ||
  fail "missing image: $out"
out=$("$ORCH" docker up --image "$TAG" --name "$NAME" --docker-host unix://$work/no.sock 2>&1) &&
  fail "an absent engine was accepted"
echo "$out" | grep -qF "cannot reach the Docker engine at unix://$work/no.sock" || fail "absent engine: $out"
out=$("$ORCH" docker status --name "$NAME" --docker-host tcp://127.0.0.1:1 2>&1) &&
  fail "an engine nobody listens for was accepted"
echo "$out" | grep -qF "cannot reach the Docker engine at tcp://127.0.0.1:1" || fail "refused engine: $out"
# Someone else's container holds a name `up` would use: refused, and left alone.
docker create --name "$NAME-worker-1" "$TAG" >/dev/null || fail "docker create $NAME-worker-1"
out=$("$ORCH" docker up --image "$TAG" --name "$NAME" 2>&1) && fail "a taken name was accepted"
echo "$out" | grep -qF "a container named $NAME-worker-1 already exists and is not part of cluster $NAME" ||
  fail "taken name: $out"
docker container inspect "$NAME-worker-1" >/dev/null 2>&1 || fail "a refused up removed someone else's container"
docker rm -f "$NAME-worker-1" >/dev/null
nothing_left "$NAME" || fail "a refused up left something labelled flotilla.cluster=$NAME"

echo "== Ctrl-C during up"
set -m
"$ORCH" docker up --image "$TAG" --name "$INT_NAME" --workers 1 >"$work/int.log" 2>&1 &
up_pid=$!
deadline=$((SECONDS + 30))
until docker container inspect "$INT_NAME-head" >/dev/null 2>&1; do
  kill -0 "$up_pid" 2>/dev/null || { cat "$work/int.log" >&2; fail "up exited before its head existed"; }
  [ $SECONDS -ge $deadline ] && fail "no head container within 30 s"
  sleep 0.1
done
kill -INT "$up_pid"
wait "$up_pid" && fail "an interrupted up exited 0"
up_pid=""
set +m
grep -q "interrupted" "$work/int.log" || fail "interrupted up: $(cat "$work/int.log")"
nothing_left "$INT_NAME" || fail "an interrupted up left containers or its network"

echo "== orchestrator docker up --image $TAG --workers 2 --name $NAME"
t0=$(date +%s.%N)
"$ORCH" docker up --image "$TAG" --workers 2 --name "$NAME" >"$work/up.log" 2>&1 ||
  { cat "$work/up.log" >&2; fail "docker up"; }
t1=$(date +%s.%N)
[ "$(active_nodes "$work/up.log")" = 3 ] || fail "up printed no 3 active nodes: $(cat "$work/up.log")"
grep '^cluster ' "$work/up.log"
echo "   up returned after $(python3 -c "print(f'{$t1 - $t0:.1f}')") s"

out=$("$ORCH" docker up --image "$TAG" --name "$NAME" 2>&1) && fail "a second up of $NAME was accepted"
echo "$out" | grep -qF "cluster $NAME is already up" || fail "second up: $out"

"$ORCH" docker status --name "$NAME" >"$work/status.txt" 2>&1 || fail "docker status: $(cat "$work/status.txt")"
for c in head worker-1 worker-2; do
  grep -Eq "^$NAME-$c +(head|worker) +running +[0-9.]+$" "$work/status.txt" ||
    fail "status has no running $NAME-$c: $(cat "$work/status.txt")"
done
[ "$(active_nodes "$work/status.txt")" = 3 ] || fail "status shows no 3 nodes: $(cat "$work/status.txt")"
echo "== status: 3 containers running, 3 active nodes"

echo "== docker kill $NAME-worker-1"
ip=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$NAME-net\").IPAddress}}" "$NAME-worker-1")
docker kill "$NAME-worker-1" >/dev/null || fail "docker kill"
t0=$(date +%s.%N)
limit=$((TTL_S + 5))
until "$ORCH" docker status --name "$NAME" >"$work/status.txt" 2>&1 &&
  [ "$(active_nodes "$work/status.txt")" = 2 ] && grep -q "NodeTerminated (ip: $ip)" "$work/status.txt"; do
  python3 -c "import sys; sys.exit($(date +%s.%N) - $t0 < $limit)" &&
    fail "worker $ip not dead within $limit s: $(cat "$work/status.txt")"
  sleep 0.2
done
echo "   dead after $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s (node TTL $TTL_S s)"
grep -Eq "^$NAME-worker-1 +worker +exited" "$work/status.txt" || fail "status: worker-1 not exited: $(cat "$work/status.txt")"

echo "== orchestrator docker down --name $NAME"
"$ORCH" docker down --name "$NAME" >"$work/down.log" 2>&1 || fail "docker down: $(cat "$work/down.log")"
for r in "container $NAME-head" "container $NAME-worker-1" "container $NAME-worker-2" "network $NAME-net"; do
  grep -qxF "removed $r" "$work/down.log" || fail "down did not say it removed $r: $(cat "$work/down.log")"
done
nothing_left "$NAME" || fail "down left containers or the network"
docker network inspect "$NAME-net" >/dev/null 2>&1 && fail "network $NAME-net still exists"
out=$("$ORCH" docker down --name "$NAME" 2>&1) || fail "a second down failed: $out"
echo "$out" | grep -qF "nothing labelled flotilla.cluster=$NAME" || fail "second down: $out"

echo "PASS: tests/docker/docker_helper_test.sh in $((SECONDS - t_start)) s"
