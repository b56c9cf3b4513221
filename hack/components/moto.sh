#!/usr/bin/env bash
# moto (mock AWS: SQS, SNS, Kinesis, EventBridge, ...) in server mode on 127.0.0.1:$MOTO_PORT.
# Installed from PyPI into a venv cached per version in $OUTBOX_CACHE/moto/$MOTO_VERSION/venv.
# moto keeps its state in memory: a restart starts empty.
#
# A second moto, the TLS instance, serves HTTPS on 127.0.0.1:$MOTO_TLS_PORT with the local CA's server
# certificate (hack/components/tls.sh), for the CA-bundle tests of endpoint overrides (the AWS SDK for Rust
# does not read AWS_CA_BUNDLE). It has its own state. MOTO_TLS=0 leaves it out.
#
# Usage: moto.sh install|start|stop|status|env
#        MOTO_INSTANCE=tls moto.sh start|stop|status|env   (only the TLS instance)
source "$(dirname "$0")/../lib/common.sh"

: "${MOTO_TLS_PORT:=15001}"
: "${MOTO_TLS:=1}"
INSTANCE=${MOTO_INSTANCE:-plain}
MOTO_HOME="$OUTBOX_CACHE/moto/$MOTO_VERSION"
VENV="$MOTO_HOME/venv"
TLS_DIR="$OUTBOX_STATE/tls"
if [[ $INSTANCE == tls ]]; then
  MOTO_PORT=$MOTO_TLS_PORT
  STATE_DIR="$OUTBOX_STATE/moto-tls"
  LOG="$OUTBOX_LOGS/moto-tls.log"
  URL="https://127.0.0.1:$MOTO_PORT"
  # curl checks the certificate against the local CA, as the relay does.
  CURL_TLS=(--cacert "$TLS_DIR/ca.crt")
  SERVER_ARGS=(-c "$TLS_DIR/server.crt" -k "$TLS_DIR/server.key")
else
  STATE_DIR="$OUTBOX_STATE/moto"
  LOG="$OUTBOX_LOGS/moto.log"
  URL="http://127.0.0.1:$MOTO_PORT"
  CURL_TLS=()
  SERVER_ARGS=()
fi
PIDFILE="$STATE_DIR/moto.pid"

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

healthy() { curl -sf -o /dev/null --max-time 3 "${CURL_TLS[@]}" "$URL/moto-api/"; }

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

  if [[ $INSTANCE == tls ]]; then "$HACK_DIR/components/tls.sh" start; fi
  log "starting moto on $URL"
  setsid nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" "${SERVER_ARGS[@]}" >"$LOG" 2>&1 </dev/null &
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
  local name=moto
  [[ $INSTANCE == tls ]] && name=moto-tls
  if is_running; then echo "$name running $MOTO_PORT"; else echo "$name stopped $MOTO_PORT"; fi
}

do_env() {
  if [[ $INSTANCE == tls ]]; then
    echo "export MOTO_TLS_ENDPOINT_URL=$URL"
    return 0
  fi
  echo "export AWS_ENDPOINT_URL=$URL"
  echo "export AWS_ACCESS_KEY_ID=test"
  echo "export AWS_SECRET_ACCESS_KEY=test"
  echo "export AWS_REGION=us-east-1"
  echo "export AWS_DEFAULT_REGION=us-east-1" # read by boto3/aws-cli (the Rust SDK reads AWS_REGION)
}

# both ACTION -> ACTION on the plain instance, then on the TLS one (unless MOTO_TLS=0)
both() {
  "do_$1"
  if [[ $INSTANCE == plain && $MOTO_TLS == 1 ]]; then MOTO_INSTANCE=tls "$0" "$1"; fi
}

case "${1:-}" in
  install) do_install ;;
  start) both start ;;
  stop) both stop ;;
  status) both status ;;
  env) both env ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
