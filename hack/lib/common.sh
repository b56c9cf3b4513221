#!/usr/bin/env bash
# Shared settings and helpers for the local development stack (sourced, never executed).
# Everything listens on 127.0.0.1. Downloads and builds are cached outside the repository,
# keyed by version; running state (data dirs, pid files, logs) lives in $OUTBOX_STATE.

set -euo pipefail

: "${OUTBOX_CACHE:=${XDG_CACHE_HOME:-$HOME/.cache}/inventory-outbox}"
: "${OUTBOX_STATE:=${XDG_STATE_HOME:-$HOME/.local/state}/inventory-outbox}"
OUTBOX_LOGS="$OUTBOX_STATE/logs"
OUTBOX_ENV_FILE="$OUTBOX_STATE/env.sh"
HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_ROOT="$(cd "$HACK_DIR/.." && pwd)"
export OUTBOX_CACHE OUTBOX_STATE OUTBOX_LOGS OUTBOX_ENV_FILE HACK_DIR REPO_ROOT

# Fixed loopback ports, chosen away from the usual defaults so a system service cannot collide.
: "${PG_PORT:=15432}"
: "${KAFKA_PORT:=19092}"
: "${KAFKA_CONTROLLER_PORT:=19093}"
: "${AMQP_PORT:=15673}"
: "${RABBITMQ_MGMT_PORT:=15674}"
: "${RABBITMQ_DIST_PORT:=25673}"
: "${MOTO_PORT:=15000}"
: "${ETCD_PORT:=12379}"
: "${ETCD_PEER_PORT:=12380}"
: "${APISERVER_PORT:=16443}"
: "${KARAPACE_PORT:=18081}"
export PG_PORT KAFKA_PORT KAFKA_CONTROLLER_PORT AMQP_PORT RABBITMQ_MGMT_PORT RABBITMQ_DIST_PORT \
  MOTO_PORT ETCD_PORT ETCD_PEER_PORT APISERVER_PORT KARAPACE_PORT

# Pinned versions (cache keys).
: "${KUBERNETES_VERSION:=v1.37.2}"
: "${ETCD_VERSION:=v3.6.16}"
: "${HELM_VERSION:=v3.22.0}"
: "${KAFKA_VERSION:=4.1.1}"
: "${MOTO_VERSION:=5.2.1}"
export KUBERNETES_VERSION ETCD_VERSION HELM_VERSION KAFKA_VERSION MOTO_VERSION

mkdir -p "$OUTBOX_CACHE" "$OUTBOX_STATE" "$OUTBOX_LOGS"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# port_open PORT -> 0 when something accepts TCP connections on 127.0.0.1:PORT
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for NAME TIMEOUT_SECONDS CMD... -> polls CMD until it succeeds or the timeout passes
wait_for() {
  local name=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "$name did not become ready within ${timeout}s"
      return 1
    fi
    sleep 0.5
  done
}

# pid_alive PIDFILE -> 0 when the process recorded in PIDFILE is running
pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# await_exec PIDFILE BINARY -> returns once the pid in PIDFILE runs BINARY (or has died, or 5 s
# passed). Launchers write the pid from a shell that then execs the binary; until the exec
# lands /proc/PID/exe is still bash, and a "still running our binary?" check made in that
# window took a starting process for an exited one (a fresh-machine env-up failed so).
await_exec() {
  local pid _ exe; pid=$(cat "$1" 2>/dev/null) || return 0
  for _ in $(seq 1 50); do
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 0
    [[ $(basename "${exe% (deleted)}") == "$(basename "$2")" ]] && return 0
    sleep 0.1
  done
}

# stop_pidfile NAME PIDFILE -> TERM, then KILL after 20 s, then remove the pid file
stop_pidfile() {
  local name=$1 pidfile=$2
  if pid_alive "$pidfile"; then
    local pid; pid=$(cat "$pidfile")
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# apt_install PKG... -> installs Debian packages that are missing (runs apt-get update once)
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]} == 0)) && return 0
  if [[ ! -f "$OUTBOX_STATE/.apt-updated" ]] || [[ -n $(find "$OUTBOX_STATE/.apt-updated" -mmin +720 2>/dev/null) ]]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$OUTBOX_LOGS/apt-update.log" 2>&1 && touch "$OUTBOX_STATE/.apt-updated"
  fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >>"$OUTBOX_LOGS/apt-install.log" 2>&1 || die "apt-get install ${missing[*]} failed; see $OUTBOX_LOGS/apt-install.log"
}
