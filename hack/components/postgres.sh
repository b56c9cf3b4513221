#!/usr/bin/env bash
# PostgreSQL for local development and tests: one cluster on 127.0.0.1:$PG_PORT with a superuser role `outbox`
# (password `outbox`) and a database `outbox`.
#
# Two more small clusters serve the TLS failure tests: `expired` on 127.0.0.1:$PG_EXPIRED_PORT presents the
# local CA's expired certificate, `wronghost` on 127.0.0.1:$PG_WRONGHOST_PORT one valid only for
# wrong-host.invalid (hack/components/tls.sh). They are real servers with the same role and database; the tests
# that own them switch them to the valid certificate (ALTER SYSTEM + reload) and back. PG_TLS_BROKEN=0 leaves
# them out.
#
# Usage: postgres.sh install|start|stop|status|env
#        PG_INSTANCE=expired|wronghost postgres.sh start|stop|status|env   (only that cluster)
#
# Data location: PostgreSQL refuses to run as root, so when this script runs as root the server runs as the Debian
# `postgres` user (via runuser), which has to reach its data directory. $OUTBOX_STATE normally lives under /root
# (mode 700) and we do not loosen /root, so as root the cluster lives in /var/lib/inventory-outbox/postgres
# (data/ = PGDATA, run/ = unix socket). Override with OUTBOX_PG_DIR (every path component must be traversable by
# the postgres user). Run as an ordinary user, the cluster stays in $OUTBOX_STATE/postgres and runs as that user.
# The pid file and the log still live in $OUTBOX_STATE/postgres and $OUTBOX_LOGS (written by root, not postgres).
source "$(dirname "$0")/../lib/common.sh"

: "${PG_EXPIRED_PORT:=15433}"
: "${PG_WRONGHOST_PORT:=15434}"
: "${PG_TLS_BROKEN:=1}"
INSTANCE=${PG_INSTANCE:-main}
# The certificate the cluster presents (a name in hack/components/tls.sh's directory).
CERT=server
NAME=postgres
case $INSTANCE in
  main) ;;
  expired) NAME=postgres-expired CERT=expired PG_PORT=$PG_EXPIRED_PORT ;;
  wronghost) NAME=postgres-wronghost CERT=wronghost PG_PORT=$PG_WRONGHOST_PORT ;;
  *) die "unknown PG_INSTANCE $INSTANCE (main, expired or wronghost)" ;;
esac
STATE_DIR="$OUTBOX_STATE/$NAME"
PIDFILE="$STATE_DIR/postgres.pid"
LOG="$OUTBOX_LOGS/$NAME.log"
if [[ $INSTANCE != main ]]; then
  if ((EUID == 0)); then PG_DIR="/var/lib/inventory-outbox/$NAME"; else PG_DIR="$STATE_DIR"; fi
elif ((EUID == 0)); then
  PG_DIR="${OUTBOX_PG_DIR:-/var/lib/inventory-outbox/postgres}"
else
  PG_DIR="${OUTBOX_PG_DIR:-$STATE_DIR}"
fi
PGDATA_DIR="$PG_DIR/data"
SOCKET_DIR="$PG_DIR/run"

# as_pg CMD... -> runs CMD as the postgres user when we are root, as ourselves otherwise
as_pg() {
  if ((EUID == 0)); then runuser -u postgres -- "$@"; else "$@"; fi
}

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

# pg_bin -> the bin directory of the server version the cluster was created with (newest installed otherwise)
pg_bin() {
  if [[ -s $PGDATA_DIR/PG_VERSION && -x /usr/lib/postgresql/$(cat "$PGDATA_DIR/PG_VERSION")/bin/postgres ]]; then
    echo "/usr/lib/postgresql/$(cat "$PGDATA_DIR/PG_VERSION")/bin"
  else
    local d
    d=$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n1 || true)
    [[ -n $d ]] || die "no PostgreSQL server found under /usr/lib/postgresql; run '$0 install'"
    echo "$d"
  fi
}

do_install() {
  if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    with_policy_rc_d apt_install postgresql
  fi
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || die "PostgreSQL install did not provide initdb"
}

# postmaster_pid -> pid of the running postmaster of our data dir (fails when none is alive)
postmaster_pid() {
  local pid
  [[ -f $PGDATA_DIR/postmaster.pid ]] || return 1
  pid=$(head -n1 "$PGDATA_DIR/postmaster.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  # After a machine restart the recorded pid may belong to an unrelated process: check it is a postgres.
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == postgres ]] || return 1
  echo "$pid"
}

is_running() {
  postmaster_pid >/dev/null && "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2
}

init_cluster() {
  mkdir -p "$STATE_DIR"
  if [[ ! -d $PG_DIR ]]; then
    mkdir -p "$PG_DIR"
    chmod 755 "$PG_DIR" "$(dirname "$PG_DIR")" 2>/dev/null || true
  fi
  ((EUID == 0)) && chown postgres:postgres "$PG_DIR"
  mkdir -p "$SOCKET_DIR"
  ((EUID == 0)) && chown postgres:postgres "$SOCKET_DIR"
  as_pg test -w "$PG_DIR" -a -x "$PG_DIR" ||
    die "the postgres user cannot write $PG_DIR (set OUTBOX_PG_DIR to a location it can reach)"

  if [[ ! -s $PGDATA_DIR/PG_VERSION ]]; then
    local bin tmp="$PG_DIR/data.initdb"
    bin=$(pg_bin)
    log "initdb $PGDATA_DIR"
    rm -rf "$tmp"
    as_pg "$bin/initdb" -D "$tmp" -U postgres -E UTF8 --locale=C.UTF-8 \
      --auth-local=trust --auth-host=scram-sha-256 >"$OUTBOX_LOGS/$NAME-initdb.log" 2>&1 ||
      { tail -n 20 "$OUTBOX_LOGS/$NAME-initdb.log" >&2; die "initdb failed"; }
    rm -rf "$PGDATA_DIR"
    mv "$tmp" "$PGDATA_DIR"
    echo "include_if_exists = 'outbox.conf'" >>"$PGDATA_DIR/postgresql.conf"
  fi

  write_conf >/dev/null
  return 0
}

# install_server_cert -> copies the local CA's server certificate and key (hack/components/tls.sh) where the
# server user can read them: PostgreSQL refuses a key that others can read.
install_server_cert() {
  local tls_dir="$OUTBOX_STATE/tls" dest="$PG_DIR/tls"
  "$HACK_DIR/components/tls.sh" start
  mkdir -p "$dest"
  local cert
  # The broken clusters also get the valid certificate, which their tests switch to.
  for cert in server $CERT; do
    install -m 644 "$tls_dir/$cert.crt" "$dest/$cert.crt"
    install -m 600 "$tls_dir/$cert.key" "$dest/$cert.key"
  done
  install -m 644 "$tls_dir/ca.crt" "$dest/ca.crt"
  if ((EUID == 0)); then chown -R postgres:postgres "$dest"; fi
}

# write_conf -> our settings, rewritten on every start so edits here take effect (the ssl ones on a reload,
# the rest after a restart); prints "changed" when the file is new or different
write_conf() {
  install_server_cert
  local conf="$PGDATA_DIR/outbox.conf"
  cat >"$conf.new" <<EOF
# Managed by hack/components/postgres.sh; rewritten on every start.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$SOCKET_DIR'
max_connections = 300
shared_buffers = 256MB
fsync = on
logging_collector = off
# TLS on the same port (plain connections still work): sslmode=verify-full with the local CA
# for host 127.0.0.1 or localhost.
ssl = on
ssl_cert_file = '$PG_DIR/tls/$CERT.crt'
ssl_key_file = '$PG_DIR/tls/$CERT.key'
ssl_ca_file = '$PG_DIR/tls/ca.crt'
EOF
  if [[ $INSTANCE != main ]]; then
    # A throwaway cluster for a few test databases (later settings win).
    cat >>"$conf.new" <<EOF
# Presents $CERT.crt: for the TLS failure tests only.
max_connections = 40
shared_buffers = 16MB
fsync = off
EOF
  fi
  if cmp -s "$conf.new" "$conf"; then
    rm -f "$conf.new"
  else
    mv "$conf.new" "$conf"
    echo changed
  fi
  if ((EUID == 0)); then chown postgres:postgres "$conf"; fi
  return 0
}

psql_admin() {
  "$(pg_bin)/psql" -h "$SOCKET_DIR" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAtX "$@"
}

ensure_role_and_db() {
  psql_admin -c "DO \$\$BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox') THEN
      CREATE ROLE outbox LOGIN SUPERUSER PASSWORD 'outbox';
    END IF; END\$\$;" >/dev/null
  if [[ $(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = 'outbox'") != 1 ]]; then
    psql_admin -c "CREATE DATABASE outbox OWNER outbox" >/dev/null
  fi
}

do_start() {
  do_install
  mkdir -p "$STATE_DIR"
  if is_running; then
    postmaster_pid >"$PIDFILE"
    # The ssl settings take effect on a reload: a running server gains TLS without a restart.
    if [[ $(write_conf) == changed ]]; then
      log "postgres settings changed; reloading"
      psql_admin -c "SELECT pg_reload_conf()" >/dev/null
    fi
    ensure_role_and_db
    log "postgres already running on 127.0.0.1:$PG_PORT"
    return 0
  fi
  if postmaster_pid >/dev/null; then
    # Alive but not accepting connections yet (starting or shutting down): give it a moment.
    if wait_for postgres 30 "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
      postmaster_pid >"$PIDFILE"
      ensure_role_and_db
      return 0
    fi
    die "a postgres for $PGDATA_DIR is alive but not ready; see $LOG"
  fi
  port_open "$PG_PORT" && die "port $PG_PORT is already in use by another process"

  init_cluster
  # Leftovers of an unclean stop or a machine restart: the postmaster is not running, so these are stale.
  rm -f "$PGDATA_DIR/postmaster.pid" "$SOCKET_DIR/.s.PGSQL.$PG_PORT" "$SOCKET_DIR/.s.PGSQL.$PG_PORT.lock" "$PIDFILE"

  local bin
  bin=$(pg_bin)
  log "starting postgres on 127.0.0.1:$PG_PORT (data $PGDATA_DIR)"
  if ((EUID == 0)); then
    setsid nohup runuser -u postgres -- "$bin/postgres" -D "$PGDATA_DIR" >"$LOG" 2>&1 </dev/null &
  else
    setsid nohup "$bin/postgres" -D "$PGDATA_DIR" >"$LOG" 2>&1 </dev/null &
  fi
  echo $! >"$PIDFILE"
  if ! wait_for postgres 90 is_running; then
    tail -n 30 "$LOG" >&2
    do_stop
    die "postgres failed to start; log: $LOG"
  fi
  postmaster_pid >"$PIDFILE"
  ensure_role_and_db
  log "postgres ready: postgres://outbox:outbox@127.0.0.1:$PG_PORT/outbox"
}

do_stop() {
  if postmaster_pid >/dev/null; then
    log "stopping postgres"
    as_pg "$(pg_bin)/pg_ctl" stop -D "$PGDATA_DIR" -m fast -w -t 60 >/dev/null 2>&1 || true
  fi
  # Only signal the recorded pid if it still is ours (after a restart the number may have been reused).
  if [[ -f $PIDFILE && $(cat "/proc/$(cat "$PIDFILE")/comm" 2>/dev/null) =~ ^(postgres|runuser)$ ]]; then
    stop_pidfile postgres "$PIDFILE"
  fi
  rm -f "$PIDFILE"
}

do_status() {
  if is_running; then echo "$NAME running $PG_PORT"; else echo "$NAME stopped $PG_PORT"; fi
}

do_env() {
  if [[ $INSTANCE != main ]]; then
    echo "export PG_${INSTANCE^^}_CERT_URL=postgres://outbox:outbox@127.0.0.1:$PG_PORT/outbox"
    return 0
  fi
  echo "export DATABASE_URL=postgres://outbox:outbox@127.0.0.1:$PG_PORT/outbox"
  # The same server over TLS, verifying the certificate chain and the host name.
  echo "export DATABASE_TLS_URL='postgres://outbox:outbox@127.0.0.1:$PG_PORT/outbox?sslmode=verify-full&sslrootcert=$OUTBOX_STATE/tls/ca.crt'"
}

# all ACTION -> ACTION on the main cluster, then on the broken-certificate ones (unless PG_TLS_BROKEN=0)
all() {
  "do_$1"
  if [[ $INSTANCE == main && $PG_TLS_BROKEN == 1 ]]; then
    local i
    for i in expired wronghost; do PG_INSTANCE=$i "$0" "$1"; done
  fi
}

case "${1:-}" in
  install) do_install ;;
  start) all start ;;
  stop) all stop ;;
  status) all status ;;
  env) all env ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
