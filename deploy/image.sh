#!/usr/bin/env bash
# `make image`: build the CPU image (tag erc:cpu) from this checkout.
#   deploy/image.sh [extra docker build arguments]
# With a Docker daemon and a registry at hand it is a plain `docker build --target cpu`. On a
# machine like ours it also starts what is missing, and stops what it started:
#   * no daemon answering: installs docker.io if absent and starts one it owns
#     (deploy/dockerd.sh; store in ERC_DOCKER_ROOT, default /var/lib/erc-docker, kept);
#   * the base image neither present nor pullable: builds it locally (deploy/build-base.sh);
#   * torch 2.13.0+cpu not reachable on the PyTorch index: the wheel from pip's find-links
#     folder (`pip config list`) goes into deploy/build-extra/, as do the machine's locally
#     added CA certificates (an egress proxy's, as ca.pem); the folder is served on 127.0.0.1
#     for the build only (BUILD_EXTRA_URL), so neither ever lands in an image layer.
# Settings: ERC_IMAGE (erc:cpu), ERC_TARGET (cpu), ERC_KEEP_DOCKERD=1 leaves a daemon it
# started running (then `eval "$(deploy/dockerd.sh env | sed 's/^/export /')"` and `docker run ...`).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${ERC_IMAGE:-erc:cpu}"
TARGET="${ERC_TARGET:-cpu}"
BASE="${ERC_BASE_IMAGE:-python:3.11-slim-bookworm}"
log() { echo "image.sh: $*" >&2; }

started=0
if ! docker info >/dev/null 2>&1; then
    eval "export $(deploy/dockerd.sh start)"
    started=1
    log "started dockerd ($DOCKER_HOST)"
fi
extra_server=""
cleanup() {
    if [ -n "$extra_server" ]; then kill "$extra_server" 2>/dev/null || true; fi
    rm -f deploy/build-extra/*.whl deploy/build-extra/*.pem
    if [ "$started" = 1 ] && [ "${ERC_KEEP_DOCKERD:-0}" != 1 ]; then deploy/dockerd.sh stop; fi
}
trap cleanup EXIT

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    if ! timeout 120 docker pull "$BASE" >/dev/null 2>&1; then
        log "$BASE cannot be pulled: building it locally"
        deploy/build-base.sh "$BASE"
    fi
fi

build_args=()
if ! curl -fsS -m 10 -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
    torch="$(grep -m1 -o '^torch==[^ ]*' deploy/requirements-cpu.lock | cut -d= -f3)"
    links="${ERC_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}"
    wheel=""
    for d in $links /opt/wheels; do
        for f in "$d"/torch-"$torch"-*.whl; do [ -f "$f" ] && wheel="$f" && break 2; done
    done
    if [ -z "$wheel" ]; then
        log "the PyTorch CPU index is unreachable and no torch-$torch wheel is in pip's find-links ($links)"
        exit 1
    fi
    log "PyTorch index unreachable: using $wheel"
    cp "$wheel" deploy/build-extra/
    build_args+=(--build-arg TORCH_INDEX_URL=)
fi
rm -f deploy/build-extra/ca.pem
for crt in /usr/local/share/ca-certificates/*.crt; do [ -f "$crt" ] && cat "$crt" >> deploy/build-extra/ca.pem; done
if ls deploy/build-extra/*.whl deploy/build-extra/*.pem >/dev/null 2>&1; then
    touch deploy/build-extra/ca.pem  # the build's RUNs ask for it
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    python3 -m http.server --bind 127.0.0.1 --directory deploy/build-extra "$port" >/dev/null 2>&1 &
    extra_server=$!
    for _ in $(seq 50); do curl -fsS -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null && break; sleep 0.1; done
    build_args+=(--build-arg "BUILD_EXTRA_URL=http://127.0.0.1:$port")
    log "build input served at http://127.0.0.1:$port: $(cd deploy/build-extra && ls *.whl *.pem 2>/dev/null | tr '\n' ' ')"
fi

# The legacy builder: BuildKit needs buildx, which machines like this one lack.
start=$(date +%s)
DOCKER_BUILDKIT=0 docker build --network host --target "$TARGET" -t "$IMAGE" "${build_args[@]}" "$@" .
log "built $IMAGE in $(( $(date +%s) - start )) s: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
