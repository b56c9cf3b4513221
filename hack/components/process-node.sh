#!/usr/bin/env bash
# The local cluster's node agent (hack/process-node): registers two Nodes and runs their Pods'
# containers as local processes. Needs the control plane of kubernetes.sh.
#
#   process-node.sh install   go build into $OUTBOX_CACHE/process-node/<key of the sources>/ (cached)
#   process-node.sh start     write the default image mapping, start the agent, wait for Ready Nodes
#   process-node.sh stop      stop the agent (it stops its Pods' processes first)
#   process-node.sh status    the agent process, the Nodes and the Pods on them
#   process-node.sh env       export lines for PROCESS_NODE_IMAGES and PROCESS_NODE_WORK_DIR
#
# The kubelet APIs listen on 127.0.0.1 only; Pod IPs are 127.0.0.2, 127.0.0.3, ...
source "$(dirname "$0")/../lib/common.sh"

: "${PROCESS_NODE_NAMES:=process-node-1,process-node-2}"
: "${PROCESS_NODE_PORT:=16250}"
: "${PROCESS_NODE_WORK_DIR:=/var/lib/inventory-outbox/process-node}"
# the binary the project's image name maps to (the Makefile's default target dir)
: "${CARGO_TARGET_DIR:=${XDG_CACHE_HOME:-$HOME/.cache}/inventory-outbox/target}"

SRC="$HACK_DIR/process-node"
PN_STATE="$OUTBOX_STATE/process-node"
IMAGES="$PN_STATE/images.json"
PN_PID="$PN_STATE/process-node.pid"
LOGFILE="$OUTBOX_LOGS/process-node.log"
KUBECONFIG_FILE="$OUTBOX_STATE/kubernetes/admin.kubeconfig"
KUBECTL_BIN="$OUTBOX_CACHE/kubernetes/$KUBERNETES_VERSION/bin/kubectl"
DEFAULT_IMAGE="ghcr.io/inventory-outbox/inventory-outbox"

# the build is keyed by its sources and the Go version, so an edit rebuilds and nothing else does
build_key() {
  { go version; cat "$SRC/go.mod" "$SRC/go.sum" "$SRC"/*.go; } | sha256sum | cut -c1-16
}

bin_path() { echo "$OUTBOX_CACHE/process-node/$(build_key)/process-node"; }

cmd_install() {
  command -v go >/dev/null 2>&1 || die "go is not installed (needed to build the node agent)"
  local bin logfile="$OUTBOX_LOGS/build-process-node.log"
  bin=$(bin_path)
  if [[ -x $bin ]]; then log "process-node: cached ($bin)"; return 0; fi
  mkdir -p "$(dirname "$bin")"
  log "building process-node (log: $logfile)"
  if ! (cd "$SRC" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$bin.tmp" .) >"$logfile" 2>&1; then
    tail -n 25 "$logfile" >&2
    die "install step 'process-node: go build' failed; full log: $logfile"
  fi
  mv -f "$bin.tmp" "$bin"
  log "process-node built: $bin"
}

# running -> 0 when the pid file names a live process-node of any build
running() {
  pid_alive "$PN_PID" || return 1
  local exe; exe=$(readlink "/proc/$(cat "$PN_PID")/exe" 2>/dev/null) || return 1
  [[ $(basename "${exe% (deleted)}") == process-node ]]
}

# write_default_image -> the project's image (any tag) maps to cargo's debug binary; other
# entries (tests register their own) are kept; written to a temp file and renamed
write_default_image() {
  mkdir -p "$PN_STATE"
  python3 - "$IMAGES" "$DEFAULT_IMAGE" "$CARGO_TARGET_DIR/debug/inventory-outbox" <<'PY'
import json, os, sys
path, image, exe = sys.argv[1:4]
try:
    with open(path) as f:
        doc = json.load(f)
except (FileNotFoundError, json.JSONDecodeError):
    doc = {}
images = doc.get("images") if isinstance(doc.get("images"), dict) else {}
images[image] = exe
doc["images"] = images
tmp = f"{path}.{os.getpid()}.tmp"
with open(tmp, "w") as f:
    json.dump(doc, f, indent=2, sort_keys=True)
    f.write("\n")
os.replace(tmp, path)
PY
}

kctl() { "$KUBECTL_BIN" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=10s "$@"; }

nodes_ready() {
  local n
  for n in ${PROCESS_NODE_NAMES//,/ }; do
    [[ $(kctl get node "$n" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]] || return 1
  done
}

cmd_start() {
  local bin t0=$SECONDS
  bin=$(bin_path)
  [[ -x $bin ]] || die "$bin is missing; run '$0 install' first"
  [[ -f $KUBECONFIG_FILE ]] || die "no kubeconfig at $KUBECONFIG_FILE; start kubernetes first"
  write_default_image
  if running; then
    local cur; cur=$(readlink "/proc/$(cat "$PN_PID")/exe")
    if [[ ${cur% (deleted)} != "$bin" ]]; then
      log "process-node build changed: restarting it (its Pods' processes restart)"
      stop_pidfile process-node "$PN_PID"
    fi
  fi
  if ! running; then
    rm -f "$PN_PID"
    mkdir -p "$PN_STATE" "$OUTBOX_LOGS"
    printf '\n===== %s starting process-node =====\n' "$(date '+%F %T')" >>"$LOGFILE"
    # shellcheck disable=SC2016
    setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$PN_PID" "$bin" \
      --kubeconfig "$KUBECONFIG_FILE" \
      --nodes "$PROCESS_NODE_NAMES" \
      --kubelet-port "$PROCESS_NODE_PORT" \
      --state-dir "$PN_STATE" \
      --work-dir "$PROCESS_NODE_WORK_DIR" \
      >>"$LOGFILE" 2>&1 </dev/null &
    local _
    for _ in $(seq 1 50); do [[ -s $PN_PID ]] && break; sleep 0.1; done
    [[ -s $PN_PID ]] || die "process-node did not start (no pid file); see $LOGFILE"
    await_exec "$PN_PID" "$bin"
    log "started process-node (pid $(cat "$PN_PID"), log $LOGFILE)"
  fi
  local deadline=$((SECONDS + 60))
  until nodes_ready; do
    if ! running; then tail -n 30 "$LOGFILE" >&2; die "process-node exited; see $LOGFILE"; fi
    if ((SECONDS >= deadline)); then tail -n 30 "$LOGFILE" >&2; die "Nodes $PROCESS_NODE_NAMES not Ready within 60s; see $LOGFILE"; fi
    sleep 0.5
  done
  log "process-node ready in $((SECONDS - t0))s: Nodes $PROCESS_NODE_NAMES"
}

cmd_stop() {
  if [[ -f $PN_PID ]] && ! running; then rm -f "$PN_PID"; fi
  stop_pidfile process-node "$PN_PID"
}

cmd_status() {
  if running; then
    printf '%-24s running  pid %-8s 127.0.0.1:%s (kubelet API)\n' process-node "$(cat "$PN_PID")" "$PROCESS_NODE_PORT"
  else
    printf '%-24s stopped\n' process-node
  fi
  [[ -f $KUBECONFIG_FILE && -x $KUBECTL_BIN ]] || return 0
  kctl get nodes -o wide 2>/dev/null || true
  local n
  for n in ${PROCESS_NODE_NAMES//,/ }; do
    echo "pods on $n:"
    kctl get pods -A -o wide --field-selector "spec.nodeName=$n" 2>/dev/null | sed 's/^/  /' || true
  done
  echo "image mapping:    $IMAGES"
  echo "pod directories:  $PROCESS_NODE_WORK_DIR/pods/<pod uid>/<container>/<restart>.log"
}

cmd_env() {
  printf 'export PROCESS_NODE_IMAGES=%q\n' "$IMAGES"
  printf 'export PROCESS_NODE_WORK_DIR=%q\n' "$PROCESS_NODE_WORK_DIR"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
