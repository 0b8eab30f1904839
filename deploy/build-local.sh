#!/usr/bin/env bash
# Build the TAP images here with podman, without pulling anything from an image registry.
#
#   deploy/build-local.sh            # base image (once), then tap-server and tap-client
#   deploy/build-local.sh --clean    # remove the images, the base and the build cache
#
# 1. Base: a minimal Debian bookworm with Python 3.11 made by debootstrap and `podman import`ed as
#    $TAP_BASE_IMAGE (default localhost/tap-base:bookworm). Made once; rebuilt when this recipe changes.
# 2. Images: deploy/Dockerfile.server and deploy/Dockerfile.client with --build-arg BASE_IMAGE=<that base>,
#    tagged localhost/tap-server:$TAP_IMAGE_TAG and localhost/tap-client:$TAP_IMAGE_TAG (default: dev).
#    Python packages come from PyPI through the hash-pinned locks; the CPU torch wheel from
#    $TORCH_WHEELS (default /opt/wheels, mounted into the build) when it holds it, else from
#    PyTorch's wheel page. Layers are cached: a code change rebuilds only the last layers.
#
# Needs root or rootless podman, buildah's runc runtime and debootstrap (Debian: apt-get install podman
# buildah runc debootstrap). Network: the Debian mirror (base and tini) and PyPI.
# Environment: TAP_BASE_IMAGE, TAP_IMAGE_TAG, TORCH_WHEELS, DEBIAN_MIRROR, PODMAN_RUNTIME (default runc).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${TAP_BASE_IMAGE:-localhost/tap-base:bookworm}
TAG=${TAP_IMAGE_TAG:-dev}
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_PACKAGES=python3,python3-venv,ca-certificates
# Settings that work where the kernel runs cgroups v1/hybrid and the process lacks CAP_SYS_RESOURCE:
# runc (crun fails there), cgroupfs, and ulimits at or below the defaults instead of podman's own.
PODMAN=(podman --runtime "${PODMAN_RUNTIME:-runc}" --cgroup-manager cgroupfs)
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1000:1000)
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# Certificates this machine trusts beyond Debian's bundle (e.g. a TLS-inspecting proxy in front of PyPI):
# the local base trusts them too, or pip inside the build could not reach PyPI.
host_cas() {
  [ -r "$HOST_CA_BUNDLE" ] || return 0
  python3 - "$HOST_CA_BUNDLE" /usr/share/ca-certificates/mozilla <<'PY'
import pathlib, re, sys
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
known = {m.group(0) for p in pathlib.Path(sys.argv[2]).glob("*.crt") for m in pem.finditer(p.read_text())}
extra = [c for c in pem.findall(pathlib.Path(sys.argv[1]).read_text()) if c not in known]
print("\n".join(extra))
PY
}
EXTRA_CAS=$(host_cas)
EXTRA_CAS_ID=$( [ -n "$EXTRA_CAS" ] && echo "+host-cas:$(echo "$EXTRA_CAS" | sha256sum | cut -c1-12)" || true)
RECIPE="debootstrap --variant=minbase --include=$BASE_PACKAGES bookworm$EXTRA_CAS_ID"

rootfs=""
cleanup() {
  if [ -n "$rootfs" ]; then rm -rf "$rootfs"; fi
}
trap cleanup EXIT
log() { echo "== $*" >&2; }
die() { echo "build-local.sh: $*" >&2; exit 1; }

if [ "${1:-}" = "--clean" ]; then
  for image in "localhost/tap-server:$TAG" "localhost/tap-client:$TAG" "$BASE_IMAGE"; do
    "${PODMAN[@]}" rmi -f "$image" >/dev/null 2>&1 && log "removed $image" || true
  done
  "${PODMAN[@]}" image prune -f >/dev/null  # the dangling layers of the build cache
  exit 0
fi

command -v podman >/dev/null || die "podman not found (Debian: apt-get install podman buildah runc debootstrap)"

build_base() {
  command -v debootstrap >/dev/null || die "debootstrap not found (Debian: apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || die "making the base image with debootstrap needs root (or set TAP_BASE_IMAGE to an image you have)"
  rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/tap-base.XXXXXX")
  log "debootstrap bookworm ($BASE_PACKAGES) from $DEBIAN_MIRROR"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (full log: $rootfs.log)"; }
  rm -f "$rootfs.log"
  if [ -n "$EXTRA_CAS" ]; then
    log "adding $(grep -c 'BEGIN CERT' <<<"$EXTRA_CAS") certificate(s) this machine trusts beyond Debian's bundle"
    printf '%s\n' "$EXTRA_CAS" | awk -v dir="$rootfs/usr/local/share/ca-certificates" \
      '/BEGIN CERT/ { n++ } { print > (dir "/build-host-" n ".crt") }'
    chroot "$rootfs" update-ca-certificates >/dev/null
  fi
  # What a container never needs: downloaded packages, package lists, documentation.
  rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log
  log "podman import -> $BASE_IMAGE"
  tar --numeric-owner -C "$rootfs" -c . | "${PODMAN[@]}" import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
    --change "LABEL org.tap.base.recipe=\"$RECIPE\"" - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  rootfs=""
}

base_recipe=$("${PODMAN[@]}" image inspect --format '{{ index .Labels "org.tap.base.recipe" }}' "$BASE_IMAGE" 2>/dev/null || true)
if [ "$base_recipe" != "$RECIPE" ]; then
  if [ -n "${TAP_BASE_IMAGE:-}" ] && "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    log "using $BASE_IMAGE as is (not made by this script)"
  else
    start=$SECONDS
    build_base
    log "base image made in $((SECONDS - start))s"
  fi
else
  log "base image $BASE_IMAGE is up to date"
fi

# The CPU torch wheel from a local folder, mounted into the build's RUN steps (a constant path keeps the cache).
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if compgen -G "$TORCH_WHEELS/torch-2.13.0+cpu-*.whl" >/dev/null; then
  build_args+=(--volume "$TORCH_WHEELS:/tmp/torch-wheels:ro" --build-arg "TORCH_FIND_LINKS=/tmp/torch-wheels")
  log "CPU torch wheel from $TORCH_WHEELS"
fi

for name in server client; do
  start=$SECONDS
  log "podman build deploy/Dockerfile.$name -> localhost/tap-$name:$TAG"
  "${PODMAN[@]}" build --network host --format docker "${ULIMITS[@]}" "${build_args[@]}" \
    --file "deploy/Dockerfile.$name" --ignorefile "deploy/Dockerfile.$name.dockerignore" \
    --tag "localhost/tap-$name:$TAG" .
  log "tap-$name built in $((SECONDS - start))s"
done
"${PODMAN[@]}" images --filter reference=localhost/tap-server --filter reference=localhost/tap-client \
  --filter "reference=$BASE_IMAGE" --format '{{.Repository}}:{{.Tag}} {{.Size}}' >&2
