#!/usr/bin/env bash
# RabbitMQ (Debian's rabbitmq-server package) as our own node `outbox@localhost`: AMQP on 127.0.0.1:$AMQP_PORT,
# management UI/API on 127.0.0.1:$RABBITMQ_MGMT_PORT, Erlang distribution on 127.0.0.1:$RABBITMQ_DIST_PORT and
# epmd on loopback only. User `outbox`/`outbox` (administrator, full permissions on vhost /).
#
# The Debian service (node rabbit@<host>) is never started: package installation runs with a policy-rc.d that
# forbids starting services. Our node runs as root straight from /usr/lib/rabbitmq/bin/rabbitmq-server (so its
# files can stay in $OUTBOX_STATE/rabbitmq), with HOME=$OUTBOX_STATE/rabbitmq/home holding a copy of the rabbitmq
# user's Erlang cookie (/var/lib/rabbitmq/.erlang.cookie). That way the stock CLI, which as root switches to the
# rabbitmq user, works too: `rabbitmqctl -n outbox@localhost list_queues`.
#
# A second node, the TLS node `outbox-tls@localhost`, serves the TLS tests: amqps on 127.0.0.1:$AMQPS_PORT with
# the local CA's server certificate (hack/components/tls.sh), client certificates verified when presented,
# plus plain AMQP on $AMQP_TLS_NODE_PORT and management on $RABBITMQ_TLS_MGMT_PORT. It is a separate node
# because a listener cannot be added to a running node, and the plain node must keep running for everyone
# else. Two more nodes serve the TLS failure tests: `outbox-expired@localhost` presents the local CA's expired
# certificate on amqps 127.0.0.1:$AMQPS_EXPIRED_PORT, `outbox-wronghost@localhost` one valid only for
# wrong-host.invalid on amqps 127.0.0.1:$AMQPS_WRONGHOST_PORT (each needs its own node: a node's TLS listeners
# share one certificate). RABBITMQ_TLS_NODE=0 leaves all three out.
#
# Usage: rabbitmq.sh install|start|stop|status|env
#        rabbitmq.sh ctl ARGS...   (rabbitmqctl against our node)
#        RABBITMQ_INSTANCE=tls|expired|wronghost rabbitmq.sh start|stop|status|env|ctl   (only that node)
source "$(dirname "$0")/../lib/common.sh"

: "${AMQPS_PORT:=15676}"
: "${AMQP_TLS_NODE_PORT:=15675}"
: "${RABBITMQ_TLS_MGMT_PORT:=15677}"
: "${RABBITMQ_TLS_DIST_PORT:=25680}"
: "${RABBITMQ_TLS_NODE:=1}"
# The broken-certificate nodes: amqps, plain AMQP, management and Erlang distribution ports.
: "${AMQPS_EXPIRED_PORT:=15679}"
: "${AMQPS_WRONGHOST_PORT:=15682}"
INSTANCE=${RABBITMQ_INSTANCE:-plain}
TLS_DIR="$OUTBOX_STATE/tls"
RMQ_BIN=/usr/lib/rabbitmq/bin
# The certificate the amqps listener presents (a name in hack/components/tls.sh's directory).
CERT=server
if [[ $INSTANCE == tls ]]; then
  NODE=outbox-tls@localhost
  STATE_DIR="$OUTBOX_STATE/rabbitmq-tls"
  LOG="$OUTBOX_LOGS/rabbitmq-tls.log"
  AMQP_PORT=$AMQP_TLS_NODE_PORT
  RABBITMQ_MGMT_PORT=$RABBITMQ_TLS_MGMT_PORT
  RABBITMQ_DIST_PORT=$RABBITMQ_TLS_DIST_PORT
elif [[ $INSTANCE == expired || $INSTANCE == wronghost ]]; then
  NODE=outbox-$INSTANCE@localhost
  STATE_DIR="$OUTBOX_STATE/rabbitmq-$INSTANCE"
  LOG="$OUTBOX_LOGS/rabbitmq-$INSTANCE.log"
  CERT=$INSTANCE
  if [[ $INSTANCE == expired ]]; then AMQPS_PORT=$AMQPS_EXPIRED_PORT; else AMQPS_PORT=$AMQPS_WRONGHOST_PORT; fi
  AMQP_PORT=$((AMQPS_PORT - 1))
  RABBITMQ_MGMT_PORT=$((AMQPS_PORT + 1))
  RABBITMQ_DIST_PORT=$((AMQPS_PORT + 10000))
else
  NODE=${RABBITMQ_NODE:-outbox@localhost}
  STATE_DIR="$OUTBOX_STATE/rabbitmq"
  LOG="$OUTBOX_LOGS/rabbitmq.log"
fi
PIDFILE="$STATE_DIR/rabbitmq.pid"
SYSTEM_COOKIE=/var/lib/rabbitmq/.erlang.cookie

# Environment of our node and of the CLI calls made by this script.
export RABBITMQ_NODENAME=$NODE
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$AMQP_PORT
export RABBITMQ_DIST_PORT
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_MNESIA_BASE="$STATE_DIR/mnesia"
export RABBITMQ_LOG_BASE="$STATE_DIR/log"
export RABBITMQ_LOGS=- # node log to stdout, i.e. into $LOG
export RABBITMQ_CONFIG_FILE="$STATE_DIR/rabbitmq.conf"
export RABBITMQ_ADVANCED_CONFIG_FILE="$STATE_DIR/advanced.config"
export RABBITMQ_ENABLED_PLUGINS_FILE="$STATE_DIR/enabled_plugins"
export RABBITMQ_CONF_ENV_FILE="$STATE_DIR/rabbitmq-env.conf" # instead of /etc/rabbitmq/rabbitmq-env.conf
export RABBITMQ_PID_FILE="$STATE_DIR/beam.pid"
# Erlang distribution listens on loopback only (the node and our CLI calls).
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"

# with_policy_rc_d CMD... -> runs CMD while /usr/sbin/policy-rc.d forbids apt from starting services
with_policy_rc_d() {
  if [[ -e /usr/sbin/policy-rc.d ]]; then "$@"; return; fi
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT # apt_install may `die`
  "$@"
  rm -f /usr/sbin/policy-rc.d
  trap - EXIT
}

ctl() { HOME="$STATE_DIR/home" "$RMQ_BIN/rabbitmqctl" -n "$NODE" "$@"; }

# stop_system_node -> stops a Debian-started rabbit@<host> node if one runs (it would listen on 0.0.0.0:5672)
stop_system_node() {
  [[ $(ss -Hltnp 'sport = :5672' 2>/dev/null) == *beam* ]] || return 0
  log "stopping the Debian rabbitmq-server node (we run our own on port $AMQP_PORT)"
  # The stock wrapper switches to the rabbitmq user and its cookie; the default node name is rabbit@<short host>.
  env -i PATH="$PATH" timeout 60 /usr/sbin/rabbitmqctl stop >/dev/null 2>&1 || log "WARNING: could not stop the Debian rabbitmq node"
}

do_install() {
  ((EUID == 0)) || die "rabbitmq.sh must run as root"
  if [[ ! -x $RMQ_BIN/rabbitmq-server ]]; then
    with_policy_rc_d apt_install rabbitmq-server
    [[ -x $RMQ_BIN/rabbitmq-server ]] || die "rabbitmq-server install did not provide $RMQ_BIN/rabbitmq-server"
  fi
  command -v curl >/dev/null || apt_install curl ca-certificates
  stop_system_node
}

# ensure_epmd -> an epmd bound to loopback only (Erlang would otherwise spawn one on all interfaces)
ensure_epmd() {
  local listeners exposed
  listeners=$(ss -Hltn 'sport = :4369' 2>/dev/null | awk '{print $4}')
  exposed=$(grep -vE '^(127\.0\.0\.1|\[::1\]|\[::ffff:127\.0\.0\.1\]):' <<<"$listeners" | grep . | tr '\n' ' ' || true)
  if [[ -n $exposed ]]; then
    if [[ $(epmd -names 2>/dev/null) == *$'\nname '* ]]; then
      log "WARNING: an epmd with registered nodes listens beyond loopback ($exposed); leaving it alone"
      return 0
    fi
    log "restarting epmd, which listens beyond loopback ($exposed), on 127.0.0.1"
    epmd -kill >/dev/null 2>&1 || true
    wait_for epmd-exit 10 bash -c '! (exec 3<>/dev/tcp/127.0.0.1/4369) 2>/dev/null'
    listeners=
  fi
  if [[ -z $listeners ]]; then
    epmd -address 127.0.0.1 -daemon
    wait_for epmd 10 epmd -names
  fi
}

ensure_cookie() {
  mkdir -p "$STATE_DIR/home"
  chmod 700 "$STATE_DIR/home"
  if [[ ! -s $SYSTEM_COOKIE ]]; then
    mkdir -p "$(dirname "$SYSTEM_COOKIE")"
    (umask 077; head -c 64 /dev/urandom | sha256sum | tr -dc 'a-f0-9' | head -c 32 | tr a-f A-F >"$SYSTEM_COOKIE")
    chown rabbitmq:rabbitmq "$SYSTEM_COOKIE" 2>/dev/null || true
    chmod 400 "$SYSTEM_COOKIE"
  fi
  if ! cmp -s "$SYSTEM_COOKIE" "$STATE_DIR/home/.erlang.cookie"; then
    rm -f "$STATE_DIR/home/.erlang.cookie"
    install -m 400 "$SYSTEM_COOKIE" "$STATE_DIR/home/.erlang.cookie"
  fi
}

write_config() {
  mkdir -p "$STATE_DIR" "$RABBITMQ_MNESIA_BASE" "$RABBITMQ_LOG_BASE"
  cat >"$RABBITMQ_CONFIG_FILE" <<EOF
# Managed by hack/components/rabbitmq.sh; rewritten on every start.
listeners.tcp.default = 127.0.0.1:$AMQP_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $RABBITMQ_MGMT_PORT
loopback_users = none
EOF
  if [[ $INSTANCE != plain ]]; then
    "$HACK_DIR/components/tls.sh" start
    cat >>"$RABBITMQ_CONFIG_FILE" <<EOF
listeners.ssl.default = 127.0.0.1:$AMQPS_PORT
ssl_options.cacertfile = $TLS_DIR/ca.crt
ssl_options.certfile = $TLS_DIR/$CERT.crt
ssl_options.keyfile = $TLS_DIR/$CERT.key
# A client certificate is optional, and checked against the CA when one is presented.
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
EOF
  fi
  echo '[rabbitmq_management].' >"$RABBITMQ_ENABLED_PLUGINS_FILE"
  echo '[].' >"$RABBITMQ_ADVANCED_CONFIG_FILE"
  echo '# Intentionally empty: hack/components/rabbitmq.sh sets everything through the environment.' \
    >"$RABBITMQ_CONF_ENV_FILE"
}

# our_pid -> pid of our node's launcher (pid file) or, if the launcher is gone, of its Erlang VM (the VM writes
# $RABBITMQ_PID_FILE); the environment check makes sure a pid reused after a machine restart is not taken for ours.
our_pid() {
  local f pid
  for f in "$PIDFILE" "$RABBITMQ_PID_FILE"; do
    pid_alive "$f" || continue
    pid=$(cat "$f")
    if grep -qzx "RABBITMQ_NODENAME=$NODE" "/proc/$pid/environ" 2>/dev/null; then
      [[ $f == "$PIDFILE" ]] || echo "$pid" >"$PIDFILE"
      echo "$pid"
      return 0
    fi
  done
  return 1
}

mgmt_ok() { curl -sf -o /dev/null --max-time 3 -u outbox:outbox "http://127.0.0.1:$RABBITMQ_MGMT_PORT/api/overview"; }

# The management API is part of "running": a node whose API fails (for instance one started from a
# clone that was deleted since, so its working directory is gone) is restarted, not trusted.
is_running() { our_pid >/dev/null && port_open "$AMQP_PORT" && port_open "$RABBITMQ_MGMT_PORT" && mgmt_ok; }

# wait_ready TIMEOUT -> waits for the node to boot, failing early when its process dies
wait_ready() {
  local deadline=$((SECONDS + $1))
  until ctl -q ping >/dev/null 2>&1; do
    our_pid >/dev/null || { log "rabbitmq exited during startup"; return 1; }
    ((SECONDS < deadline)) || { log "rabbitmq did not answer within $1s"; return 1; }
    sleep 1
  done
  ctl -q await_startup --timeout $((deadline - SECONDS > 10 ? deadline - SECONDS : 10)) >/dev/null 2>&1
}

ensure_user() {
  if ! awk '{print $1}' <<<"$(ctl -q list_users 2>/dev/null)" | grep -qx outbox; then
    ctl -q add_user outbox outbox >/dev/null
  fi
  ctl -q set_user_tags outbox administrator >/dev/null
  ctl -q set_permissions -p / outbox '.*' '.*' '.*' >/dev/null
  if [[ $INSTANCE == tls ]]; then
    # The TLS tests' user: its password lives in a file only, as a mounted Secret would.
    local pwfile="$STATE_DIR/relay.password"
    [[ -s $pwfile ]] || (umask 077; head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$pwfile")
    if ! awk '{print $1}' <<<"$(ctl -q list_users 2>/dev/null)" | grep -qx relay; then
      ctl -q add_user relay "$(cat "$pwfile")" >/dev/null
    fi
    ctl -q set_permissions -p / relay '.*' '.*' '.*' >/dev/null
  fi
}

do_start() {
  do_install
  mkdir -p "$STATE_DIR"
  if is_running; then
    if [[ $INSTANCE == tls ]]; then ensure_user; fi
    log "rabbitmq already running on 127.0.0.1:$AMQP_PORT"
    return 0
  fi
  if our_pid >/dev/null; then
    log "rabbitmq process is alive but not serving; waiting for it"
    if wait_ready 60 && wait_for rabbitmq 30 is_running; then ensure_user; return 0; fi
    do_stop
  fi
  rm -f "$PIDFILE" "$RABBITMQ_PID_FILE" # stale (e.g. after a machine restart)
  local p
  local ports=("$AMQP_PORT" "$RABBITMQ_MGMT_PORT" "$RABBITMQ_DIST_PORT")
  if [[ $INSTANCE != plain ]]; then ports+=("$AMQPS_PORT"); fi
  for p in "${ports[@]}"; do
    port_open "$p" && die "port $p is already in use by another process"
  done

  write_config
  ensure_cookie
  ensure_epmd
  log "starting rabbitmq node $NODE on 127.0.0.1:$AMQP_PORT"
  # Started from its state directory: the node outlives the checkout that started it (CI clones
  # are deleted), and with its working directory gone the management API fails with enoent.
  env -C "$STATE_DIR" HOME="$STATE_DIR/home" ERL_CRASH_DUMP="$STATE_DIR/erl_crash.dump" \
    setsid nohup "$RMQ_BIN/rabbitmq-server" >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  if ! wait_ready 120 || ! ensure_user || ! wait_for rabbitmq 30 mgmt_ok; then
    tail -n 40 "$LOG" >&2
    do_stop
    die "rabbitmq failed to start; log: $LOG"
  fi
  log "rabbitmq ready: amqp://outbox:outbox@127.0.0.1:$AMQP_PORT/%2f, management http://127.0.0.1:$RABBITMQ_MGMT_PORT"
}

do_stop() {
  if our_pid >/dev/null; then
    log "stopping rabbitmq node $NODE"
    # `stop PIDFILE` returns once the Erlang VM has exited.
    local args=(-q stop)
    [[ -f $RABBITMQ_PID_FILE ]] && args+=("$RABBITMQ_PID_FILE")
    HOME="$STATE_DIR/home" timeout 60 "$RMQ_BIN/rabbitmqctl" -n "$NODE" "${args[@]}" >/dev/null 2>&1 || true
    stop_pidfile rabbitmq "$PIDFILE"
  fi
  rm -f "$PIDFILE"
}

do_status() {
  local name=rabbitmq
  [[ $INSTANCE != plain ]] && name=rabbitmq-$INSTANCE
  if is_running; then echo "$name running $AMQP_PORT"; else echo "$name stopped $AMQP_PORT"; fi
}

do_env() {
  if [[ $INSTANCE == expired || $INSTANCE == wronghost ]]; then
    echo "export AMQPS_${INSTANCE^^}_CERT_URL=amqps://127.0.0.1:$AMQPS_PORT/%2f"
    return 0
  fi
  if [[ $INSTANCE == tls ]]; then
    # Without credentials: the relay reads them from files (tests write them).
    echo "export AMQPS_URL=amqps://127.0.0.1:$AMQPS_PORT/%2f"
    echo "export AMQPS_LOCALHOST_URL=amqps://localhost:$AMQPS_PORT/%2f"
    echo "export RABBITMQ_TLS_MANAGEMENT_URL=http://127.0.0.1:$RABBITMQ_MGMT_PORT"
    echo "export RABBITMQ_TLS_USERNAME=relay"
    echo "export RABBITMQ_TLS_PASSWORD_FILE=$STATE_DIR/relay.password"
    return 0
  fi
  echo "export AMQP_URL=amqp://outbox:outbox@127.0.0.1:$AMQP_PORT/%2f"
  echo "export RABBITMQ_MANAGEMENT_URL=http://127.0.0.1:$RABBITMQ_MGMT_PORT"
}

# both ACTION -> ACTION on the plain node, then on the TLS nodes (unless RABBITMQ_TLS_NODE=0)
both() {
  "do_$1"
  if [[ $INSTANCE == plain && $RABBITMQ_TLS_NODE == 1 ]]; then
    local i
    for i in tls expired wronghost; do RABBITMQ_INSTANCE=$i "$0" "$1"; done
  fi
}

case "${1:-}" in
  install) do_install ;;
  start) both start ;;
  stop) both stop ;;
  status) both status ;;
  env) both env ;;
  ctl) shift; ctl "$@" ;;
  *) echo "usage: $0 install|start|stop|status|env|ctl ARGS..." >&2; exit 2 ;;
esac
