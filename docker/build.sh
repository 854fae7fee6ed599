#!/usr/bin/env bash
# Builds Flotilla's runtime image from docker/Dockerfile.
#
#   bash docker/build.sh [--cuda] [--tag T] [--bin-dir DIR] [--base IMAGE]
#
# Without --bin-dir it builds the release binaries (with the `cuda` feature
# for --cuda); with it, it takes orchestrator/gateway/worker from DIR (the
# tests pass target/debug). The build context is a staging folder holding
# the Dockerfile and the three binaries (debug info stripped), never target/.
#
# When the base image is neither present nor pullable (a machine without a
# registry) and it is debian:bookworm-slim, that image is made here from
# Debian's packages (debootstrap + docker import) and kept for later builds,
# so the Dockerfile stays the one a user with registry access builds.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CPU_BASE=debian:bookworm-slim
CUDA_BASE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

usage() {
  cat <<EOF
Usage: $0 [--cuda] [--tag T] [--bin-dir DIR] [--base IMAGE]
  --cuda          CUDA image: base $CUDA_BASE, binaries with --features cuda,
                  tag flotilla:cuda
  --tag T         image tag (default flotilla:latest, or flotilla:cuda)
  --bin-dir DIR   take orchestrator, gateway and worker from DIR instead of
                  building release binaries (for --cuda they must have been
                  built with --features cuda)
  --base IMAGE    base image (default $CPU_BASE, or $CUDA_BASE with --cuda)
EOF
}

cuda=false tag="" bin_dir="" base=""
while [ $# -gt 0 ]; do
  case $1 in
    --cuda) cuda=true ;;
    --tag) tag=${2:?--tag needs a value}; shift ;;
    --tag=*) tag=${1#*=} ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a value}; shift ;;
    --bin-dir=*) bin_dir=${1#*=} ;;
    --base) base=${2:?--base needs a value}; shift ;;
    --base=*) base=${1#*=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if $cuda; then
  tag=${tag:-flotilla:cuda} base=${base:-$CUDA_BASE}
else
  tag=${tag:-flotilla:latest} base=${base:-$CPU_BASE}
fi

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
staging="" rootfs=""
cleanup() {
  [ -n "$staging" ] && rm -rf "$staging"
  # The root file system belongs to root (debootstrap ran as root).
  [ -n "$rootfs" ] && $SUDO rm -rf "$rootfs"
  return 0
}
trap cleanup EXIT

docker info >/dev/null 2>&1 || {
  echo "build.sh: cannot reach the Docker engine (\`docker info\` failed)" >&2
  exit 1
}

# --- binaries -------------------------------------------------------------
if [ -z "$bin_dir" ]; then
  features=()
  $cuda && features=(--features flotilla-gateway/cuda,flotilla-worker/cuda)
  echo "== cargo build --release (orchestrator, gateway, worker${features:+, cuda})"
  (cd "$ROOT" && cargo build --release --locked --bins \
    -p flotilla-orchestrator -p flotilla-gateway -p flotilla-worker "${features[@]}")
  target=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  bin_dir=$target/release
fi
for b in orchestrator gateway worker; do
  [ -x "$bin_dir/$b" ] || {
    echo "build.sh: $bin_dir/$b is missing or not executable (build the binaries first, or drop --bin-dir)" >&2
    exit 1
  }
done

staging=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-image.XXXXXX")
mkdir "$staging/bin"
cp "$ROOT/docker/Dockerfile" "$staging/"
for b in orchestrator gateway worker; do
  # Line tables are most of a binary's size; function names stay for backtraces.
  if command -v objcopy >/dev/null 2>&1; then
    objcopy --strip-debug "$bin_dir/$b" "$staging/bin/$b"
  else
    cp "$bin_dir/$b" "$staging/bin/$b"
  fi
done

# --- base image -------------------------------------------------------------
make_debian_base() {
  # /usr/sbin is not on every user's PATH.
  if [ ! -x /usr/sbin/debootstrap ] && ! command -v debootstrap >/dev/null 2>&1; then
    echo "== installing debootstrap"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  fi
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-rootfs.XXXXXX")
  local mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  echo "== making $CPU_BASE locally: debootstrap --variant=minbase bookworm ($mirror)"
  local t0=$SECONDS
  if ! $SUDO debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    echo "build.sh: debootstrap failed; its last lines:" >&2
    tail -20 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    exit 1
  fi
  rm -f "$rootfs.log"
  # As Debian's slim images do: no documentation, manuals or translations,
  # now or in packages installed later (copyright files stay).
  $SUDO tee "$rootfs/etc/dpkg/dpkg.cfg.d/slim" >/dev/null <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
EOF
  $SUDO find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  $SUDO rm -rf "$rootfs"/usr/share/{man,info,locale,groff,lintian}/* \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/* "$rootfs/etc/apt/sources.list"
  # Security and point-release updates too, as the registry's image has.
  $SUDO tee "$rootfs/etc/apt/sources.list.d/debian.sources" >/dev/null <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  $SUDO tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase bookworm (made by Flotilla's docker/build.sh)" \
    - "$CPU_BASE" >/dev/null
  $SUDO rm -rf "$rootfs"
  rootfs=""
  echo "== $CPU_BASE made in $((SECONDS - t0)) s"
}

if docker image inspect "$base" >/dev/null 2>&1; then
  :
elif pull_err=$(docker pull -q "$base" 2>&1); then
  echo "== pulled $base"
elif [ "$base" = "$CPU_BASE" ]; then
  echo "== $base is not here and cannot be pulled ($(echo "$pull_err" | tail -1))"
  make_debian_base
else
  echo "build.sh: base image $base is not here and cannot be pulled:" >&2
  echo "$pull_err" >&2
  echo "Only $CPU_BASE can be made without a registry; load $base with \`docker load\` or build where it can be pulled." >&2
  exit 1
fi

# --- image --------------------------------------------------------------------
echo "== docker build -t $tag (base $base)"
t0=$SECONDS
previous=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
# The legacy builder warns that it is deprecated; BuildKit is not installed
# on every engine this runs on, and the build needs nothing from it.
# --force-rm: a failed step leaves no stopped container behind.
docker build -q --force-rm --build-arg "BASE_IMAGE=$base" -t "$tag" "$staging" >/dev/null
# A binary that cannot start in the base (glibc too old, wrong architecture)
# fails here, not on the first node that runs it.
for b in orchestrator gateway worker; do
  if ! out=$(docker run --rm --entrypoint "$b" "$tag" --help 2>&1); then
    echo "build.sh: $b does not run in $tag:" >&2
    echo "$out" | tail -5 >&2
    exit 1
  fi
done
# A rebuild leaves the image it replaced untagged; drop it unless a
# container or another tag still uses it.
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect --format '{{.Id}}' "$tag")" ] &&
  [ "$(docker image inspect --format '{{len .RepoTags}}' "$previous" 2>/dev/null)" = 0 ]; then
  docker rmi "$previous" >/dev/null 2>&1 || true
fi
size=$(docker image inspect --format '{{.Size}}' "$tag")
echo "== built $tag in $((SECONDS - t0)) s: $((size / 1000000)) MB"
