#!/usr/bin/env bash
# moto (mock AWS: SQS, SNS, Kinesis, EventBridge, ...) in server mode on 127.0.0.1:$MOTO_PORT.
# Installed from PyPI into a venv cached per version in $OUTBOX_CACHE/moto/$MOTO_VERSION/venv.
# moto keeps its state in memory: a restart starts empty.
#
# Usage: moto.sh install|start|stop|status|env
source "$(dirname "$0")/../lib/common.sh"

MOTO_HOME="$OUTBOX_CACHE/moto/$MOTO_VERSION"
VENV="$MOTO_HOME/venv"
STATE_DIR="$OUTBOX_STATE/moto"
PIDFILE="$STATE_DIR/moto.pid"
LOG="$OUTBOX_LOGS/moto.log"
URL="http://127.0.0.1:$MOTO_PORT"

do_install() {
  command -v curl >/dev/null || apt_install curl ca-certificates
  # The marker is written last, so an interrupted install is redone; the version check also catches a venv
  # whose base interpreter went away.
  if [[ -f $MOTO_HOME/.complete ]] && "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('moto') == '$MOTO_VERSION'" >/dev/null 2>&1; then
    return 0
  fi
  local python
  python=$(command -v python3) || die "python3 not found"
  log "installing moto[server]==$MOTO_VERSION into $VENV"
  rm -rf "$VENV" "$MOTO_HOME/.complete"
  mkdir -p "$MOTO_HOME"
  {
    "$python" -m venv "$VENV" &&
      "$VENV/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION"
  } >"$OUTBOX_LOGS/moto-install.log" 2>&1 ||
    { tail -n 20 "$OUTBOX_LOGS/moto-install.log" >&2; die "moto install failed; see $OUTBOX_LOGS/moto-install.log"; }
  touch "$MOTO_HOME/.complete"
}

# our_pid -> pid from the pid file when that process is alive and is our moto_server
our_pid() {
  local pid
  pid_alive "$PIDFILE" || return 1
  pid=$(cat "$PIDFILE")
  [[ $(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") == *"moto_server -H 127.0.0.1 -p $MOTO_PORT"* ]] || return 1
  echo "$pid"
}

healthy() { curl -sf -o /dev/null --max-time 3 "$URL/moto-api/"; }

is_running() { our_pid >/dev/null && healthy; }

do_start() {
  do_install
  mkdir -p "$STATE_DIR"
  if is_running; then
    log "moto already running on $URL"
    return 0
  fi
  if our_pid >/dev/null; then
    # Alive but not answering (still starting?): wait a bit before giving up on it.
    wait_for moto 20 healthy && return 0
    log "moto process is alive but not answering; restarting it"
    do_stop
  fi
  rm -f "$PIDFILE" # stale (e.g. after a machine restart)
  port_open "$MOTO_PORT" && die "port $MOTO_PORT is already in use by another process"

  log "starting moto on $URL"
  setsid nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  if ! wait_for moto 60 is_running; then
    tail -n 30 "$LOG" >&2
    do_stop
    die "moto failed to start; log: $LOG"
  fi
  log "moto ready: $URL"
}

do_stop() {
  if our_pid >/dev/null; then stop_pidfile moto "$PIDFILE"; fi
  rm -f "$PIDFILE"
}

do_status() {
  if is_running; then echo "moto running $MOTO_PORT"; else echo "moto stopped $MOTO_PORT"; fi
}

do_env() {
  echo "export AWS_ENDPOINT_URL=$URL"
  echo "export AWS_ACCESS_KEY_ID=test"
  echo "export AWS_SECRET_ACCESS_KEY=test"
  echo "export AWS_REGION=us-east-1"
  echo "export AWS_DEFAULT_REGION=us-east-1" # read by boto3/aws-cli (the Rust SDK reads AWS_REGION)
}

case "${1:-}" in
  install) do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  env) do_env ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
