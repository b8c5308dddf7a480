#!/usr/bin/env bash
# A Docker daemon this project owns, for machines without one (no systemd, no registry).
#   deploy/dockerd.sh start   # installs docker.io if absent, starts dockerd, prints DOCKER_HOST=...
#   deploy/dockerd.sh stop    # stops the daemon this script started (and only that one)
#   deploy/dockerd.sh env     # prints DOCKER_HOST=... for the daemon this script manages
# The daemon leaves the firewall and IP forwarding alone (--bridge=none --iptables=false
# --ip-forward=false): containers and builds use --network host. Its store lives in
# ERC_DOCKER_ROOT (default /var/lib/erc-docker) and survives a stop, so images and the build
# cache stay for the next start.
set -euo pipefail
ROOT="${ERC_DOCKER_ROOT:-/var/lib/erc-docker}"
SOCK="unix://$ROOT/docker.sock"
PIDFILE="$ROOT/dockerd.pid"
LOG="$ROOT/dockerd.log"

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "${1:-}" in
start)
    if ! command -v dockerd >/dev/null && [ ! -x /usr/sbin/dockerd ]; then
        echo "dockerd.sh: installing docker.io (Debian)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
    fi
    mkdir -p "$ROOT"
    if ! running; then
        PATH="$PATH:/usr/sbin:/sbin" setsid dockerd --data-root "$ROOT/data" --exec-root "$ROOT/exec" \
            --pidfile "$PIDFILE" -H "$SOCK" --bridge=none --iptables=false --ip-forward=false \
            >"$LOG" 2>&1 </dev/null &
    fi
    for _ in $(seq 1 60); do
        if DOCKER_HOST="$SOCK" docker info >/dev/null 2>&1; then
            echo "DOCKER_HOST=$SOCK"
            exit 0
        fi
        sleep 1
    done
    echo "dockerd.sh: dockerd did not answer within 60 s; last lines of $LOG:" >&2
    tail -20 "$LOG" >&2 || true
    exit 1
    ;;
stop)
    if running; then
        pid="$(cat "$PIDFILE")"
        kill "$pid"
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "dockerd.sh: dockerd $pid still up after 30 s; sending SIGKILL" >&2
            kill -9 "$pid" || true
        fi
    fi
    ;;
env)
    echo "DOCKER_HOST=$SOCK"
    ;;
*)
    echo "usage: $0 start|stop|env" >&2
    exit 2
    ;;
esac
