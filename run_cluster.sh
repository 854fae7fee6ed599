#!/usr/bin/env bash
# Starts one node of a Flotilla cluster in a Docker container, with the
# arguments of vLLM's examples/online_serving/run_cluster.sh:
#
#   bash run_cluster.sh docker_image head_node_address --head|--worker path_to_hf_home [additional_args...]
#
# On the head machine (its etcd and head service run in the container):
#   bash run_cluster.sh flotilla:latest 10.0.0.1 --head ~/.cache/huggingface -e VLLM_HOST_IP=10.0.0.1
# On every other machine, with the head's cluster token:
#   FLOTILLA_CLUSTER_TOKEN=$(ssh HEAD docker exec node cat /root/.cache/flotilla/cluster_token) \
#   bash run_cluster.sh flotilla:latest 10.0.0.1 --worker ~/.cache/huggingface -e VLLM_HOST_IP=10.0.0.2
#
# The container is named `node` and uses the host's network; extra arguments
# go to `docker run` (before the image). Keep the terminal open: the script
# removes its container when it exits, is interrupted or is killed (TERM).
# Then, on the head: `docker exec -it node orchestrator status`, and
# `docker exec -it node gateway serve /root/.cache/huggingface/MODEL ...`.
#
# Environment (Flotilla's additions):
#   FLOTILLA_CONTAINER_NAME  container name instead of `node` (two nodes on one machine)
#   FLOTILLA_HEAD_PORT       the head's port instead of 6379
#   FLOTILLA_CLUSTER_TOKEN   the cluster token, handed to the container without
#                            appearing on a command line
#   VLLM_HOST_IP             (given with -e) the address this node registers with

usage() {
  echo "Usage: $0 docker_image head_node_address --head|--worker path_to_hf_home [additional_args...]"
}

if [ $# -lt 4 ]; then
  usage >&2
  exit 1
fi

DOCKER_IMAGE=$1
HEAD_NODE_ADDRESS=$2
NODE_TYPE=$3
PATH_TO_HF_HOME=$4
shift 4
ADDITIONAL_ARGS=("$@")

if [ "$NODE_TYPE" != "--head" ] && [ "$NODE_TYPE" != "--worker" ]; then
  echo "Error: Node type must be --head or --worker" >&2
  usage >&2
  exit 1
fi

CONTAINER_NAME=${FLOTILLA_CONTAINER_NAME:-node}
HEAD_PORT=${FLOTILLA_HEAD_PORT:-6379}
HF_MOUNT=/root/.cache/huggingface
TOKEN_FILE=/root/.cache/flotilla/cluster_token

if ! docker info >/dev/null 2>&1; then
  echo "Error: cannot reach the Docker engine (\`docker info\` failed)" >&2
  exit 1
fi
# Removing a container this script did not start would stop someone else's node.
if docker container inspect "$CONTAINER_NAME" >/dev/null 2>&1; then
  echo "Error: a container named $CONTAINER_NAME already exists; remove it (docker rm -f $CONTAINER_NAME) or set FLOTILLA_CONTAINER_NAME to run another node on this machine" >&2
  exit 1
fi
# docker -v takes absolute paths only, and would create a missing one as root.
mkdir -p "$PATH_TO_HF_HOME" || exit 1
PATH_TO_HF_HOME=$(cd "$PATH_TO_HF_HOME" && pwd)

# The value docker would give VLLM_HOST_IP in the container: the last -e/--env
# that sets it, where a bare name takes the value from this environment.
host_ip=""
token_given=false
for ((i = 0; i < ${#ADDITIONAL_ARGS[@]}; i++)); do
  arg=${ADDITIONAL_ARGS[i]}
  case $arg in
    -e|--env) ((i++)); kv=${ADDITIONAL_ARGS[i]:-} ;;
    --env=*) kv=${arg#--env=} ;;
    -e?*) kv=${arg#-e} ;;
    # An env file may hold the token; its contents are the user's business.
    --env-file|--env-file=*) token_given=true; continue ;;
    *) continue ;;
  esac
  case $kv in
    VLLM_HOST_IP=*) host_ip=${kv#VLLM_HOST_IP=} ;;
    VLLM_HOST_IP) host_ip=${VLLM_HOST_IP:-} ;;
    FLOTILLA_CLUSTER_TOKEN|FLOTILLA_CLUSTER_TOKEN=*) token_given=true ;;
  esac
done

ENV_ARGS=()
if [ -n "${FLOTILLA_CLUSTER_TOKEN:-}" ]; then
  # A bare -e NAME copies the value from this environment: it never shows in `ps`.
  ENV_ARGS+=(-e FLOTILLA_CLUSTER_TOKEN)
  token_given=true
fi

START_ARGS=(start --block)
if [ "$NODE_TYPE" = "--head" ]; then
  START_ARGS+=(--head "--port=$HEAD_PORT")
  # The head listens on its node IP only, so it must be the address workers
  # are told to dial unless VLLM_HOST_IP says otherwise.
  if [ -z "$host_ip" ] && [[ $HEAD_NODE_ADDRESS =~ ^[0-9]+(\.[0-9]+){3}$ ]]; then
    host_ip=$HEAD_NODE_ADDRESS
  fi
else
  START_ARGS+=("--address=$HEAD_NODE_ADDRESS:$HEAD_PORT")
  if ! $token_given; then
    echo "Error: a worker needs the head's cluster token: run it with FLOTILLA_CLUSTER_TOKEN=\$(docker exec node cat $TOKEN_FILE) on the head's machine (or pass -e FLOTILLA_CLUSTER_TOKEN=...)" >&2
    exit 1
  fi
fi
[ -n "$host_ip" ] && START_ARGS+=("--node-ip-address=$host_ip")

GPU_ARGS=()
if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"nvidia"'; then
  GPU_ARGS=(--gpus all)
else
  echo "No NVIDIA runtime in this Docker engine: starting $CONTAINER_NAME without --gpus (CPU only)."
fi
if [ "$NODE_TYPE" = "--head" ] && ! $token_given; then
  echo "Workers join with: FLOTILLA_CLUSTER_TOKEN=\$(docker exec $CONTAINER_NAME cat $TOKEN_FILE) bash $0 $DOCKER_IMAGE $HEAD_NODE_ADDRESS --worker $PATH_TO_HF_HOME -e VLLM_HOST_IP=<worker address>"
fi

# docker writes the id of the container it created here: cleanup removes
# exactly that one.
CID_FILE=$(mktemp -u "${TMPDIR:-/tmp}/flotilla-run-cluster.XXXXXX")
docker_pid=""
cleanup() {
  # A second Ctrl-C must not cut the removal short.
  trap - EXIT
  trap '' INT TERM HUP
  local ref=$CONTAINER_NAME
  [ -s "$CID_FILE" ] && ref=$(cat "$CID_FILE")
  # A graceful stop first: the orchestrator deregisters the node and stops
  # its actors (and, on the head, its etcd) on SIGTERM.
  docker stop -t 10 "$ref" >/dev/null 2>&1
  docker rm -f "$ref" >/dev/null 2>&1
  if [ -n "$docker_pid" ]; then
    kill "$docker_pid" 2>/dev/null
    wait "$docker_pid" 2>/dev/null
  fi
  # The name was free when this script started, so a container that
  # appeared under it since (created while the signal arrived) is ours.
  docker rm -f "$CONTAINER_NAME" >/dev/null 2>&1
  rm -f "$CID_FILE"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# --init: a small init as PID 1 reaps the processes the orchestrator detaches
# (its etcd, the head's node agent, actors) when they exit.
# docker run waits in the background so a signal to this script runs its
# trap at once instead of after the container exits.
docker run \
  --init \
  --network host \
  --name "$CONTAINER_NAME" \
  --cidfile "$CID_FILE" \
  --shm-size 10.24g \
  "${GPU_ARGS[@]}" \
  -v "$PATH_TO_HF_HOME:$HF_MOUNT" \
  "${ENV_ARGS[@]}" \
  "${ADDITIONAL_ARGS[@]}" \
  --entrypoint orchestrator \
  "$DOCKER_IMAGE" "${START_ARGS[@]}" <&0 &
docker_pid=$!
wait "$docker_pid"
status=$?
docker_pid=""
exit "$status"
