#!/usr/bin/env bash
# Build a local stand-in for the CPU base image (python:3.11-slim-bookworm) when no registry
# can be reached: a Debian bookworm minbase root file system with python3.11, venv and pip
# (mmdebstrap, from the machine's own apt sources), imported under the name the Dockerfile's
# FROM asks for, so the build resolves it without a pull.
#   deploy/build-base.sh [TAG]     (needs DOCKER_HOST pointing at a running daemon; root)
# No CA certificate of this machine goes into it: the Dockerfile's build stages take the
# proxy's CA from the build context (deploy/build-extra/), and the runtime stage never does.
set -euo pipefail
TAG="${1:-python:3.11-slim-bookworm}"
if ! command -v mmdebstrap >/dev/null; then
    echo "build-base.sh: installing mmdebstrap (Debian)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mmdebstrap --quiet --variant=minbase \
    --include=ca-certificates,python3,python3-venv,python3-pip,python-is-python3 \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm "$tmp/rootfs.tar"
docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["python3"]' \
    "$tmp/rootfs.tar" "$TAG" >/dev/null
echo "build-base.sh: imported $TAG ($(du -h "$tmp/rootfs.tar" | cut -f1) root file system)"
