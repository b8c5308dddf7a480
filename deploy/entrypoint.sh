#!/bin/sh
# Container start: build the demonstration index from mounted data when none is mounted, then
# hand the process to the server (exec: it receives SIGTERM and drains).
set -eu
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
