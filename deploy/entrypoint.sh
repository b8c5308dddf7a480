#!/bin/sh
# Container start: build the demonstration index from mounted data when none is mounted, then
# hand the process to the server (exec: it receives SIGTERM and drains).
set -eu
# The compile cache, kept where a volume is mounted at /cache (compose.yaml): the engine then
# reloads its compiled model at a restart instead of compiling it again (several times slower;
# docs/performance.md). Without one (a read-only root, /tmp a tmpfs) it stays under HOME=/tmp. Per
# host: the compiled kernels are for this machine's CPU, so the cache is not baked into the image.
if [ -w /cache ]; then
    export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-/cache/vllm}"
    export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/cache/inductor}"
fi
index="${ERC_INDEX_ROOT:-/app/index}/meld"
if [ ! -f "$index/manifest.json" ]; then
    if [ -d "${ERC_DATA_DIR:-/data}/MELD" ]; then
        erc index build --dataset meld
    else
        echo "no index at $index and no data at ${ERC_DATA_DIR:-/data}/MELD: mount one of them" >&2
        exit 1
    fi
fi
exec erc serve "$@"
