#!/usr/bin/env bash
# The demo, end to end on the local cluster: the chart installs the operator (a Pod), the Kafka
# example declares a publisher, the inventory example writes stock changes, events arrive on
# Kafka with their CloudEvents headers; then Kafka stops (the circuit opens, pending grows),
# comes back (the circuit closes, nothing lost), and a ReplayJob replays history.
#
#   make demo                  run it; everything is removed at the end
#   DEMO_KEEP=1 make demo      leave it running for a look around (make demo-clean removes it)
#   make demo-clean            remove what the demo created
#
# Kafka here is a dedicated demo node (127.0.0.1:$DEMO_KAFKA_PORT, its own state directory),
# not the shared one on 19092 that tests use: stopping it disturbs nothing else.
# The operator watches only the demo namespace, so on a machine where tests run it never
# reconciles their publishers.
source "$(dirname "$0")/lib/common.sh"
set -E # the ERR trap below also fires inside functions
cd "$REPO_ROOT"

: "${DEMO_KAFKA_PORT:=39092}"
: "${DEMO_KAFKA_CONTROLLER_PORT:=39093}"
: "${DEMO_NAMESPACE:=outbox-demo}"
: "${DEMO_OPERATOR_NAMESPACE:=outbox-system}"
: "${DEMO_RELEASE:=inventory-outbox}"
DEMO_STATE="$OUTBOX_STATE/demo"
DEMO_LOGS="$DEMO_STATE/logs"
DEMO_KAFKA_STATE="$DEMO_STATE/kafka"
DEMO_IMAGE_REPO=ghcr.io/inventory-outbox/inventory-outbox
DEMO_IMAGE_TAG=demo
TOPIC=inventory-events
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$OUTBOX_CACHE/target}"
BIN="$CARGO_TARGET_DIR/debug"

current_step="start"
current_log=""
# step NAME LOG: announces a step; a failure from here on names it and its log.
step() {
  current_step=$1 current_log=${2:-}
  log "demo: $current_step${current_log:+ (log: $current_log)}"
}
on_error() {
  local code=$?
  log "ERROR: demo step '$current_step' failed (exit $code)${current_log:+; log: $current_log}"
  if [[ -n $current_log && -f $current_log ]]; then tail -n 25 "$current_log" >&2; fi
  log "the demo's state is left in place for a look; 'make demo-clean' removes it"
  exit "$code"
}
trap on_error ERR

# Runs a command with its output in the step's log.
quiet() { "$@" >>"$current_log" 2>&1; }

kafka_node() {
  OUTBOX_STATE="$DEMO_KAFKA_STATE" KAFKA_PORT=$DEMO_KAFKA_PORT KAFKA_CONTROLLER_PORT=$DEMO_KAFKA_CONTROLLER_PORT \
    KAFKA_TLS_NODE=0 "$HACK_DIR/components/kafka.sh" "$@"
}

clean() {
  log "demo-clean: removing the demo"
  # shellcheck disable=SC1090
  [[ -f $OUTBOX_ENV_FILE ]] && source "$OUTBOX_ENV_FILE"
  if [[ -n ${KUBECTL:-} ]]; then
    # The custom resources go first, while the operator still runs to release their finalizers
    # (the publisher's deletionPolicy is Retain: nothing to remove on the broker). If it cannot
    # within the deadline (an operator that is not running, for instance), say so and let go by
    # hand, as the README describes, so the namespace does not stay Terminating forever.
    if ! "$KUBECTL" delete eventpublishers,replayjobs --all -n "$DEMO_NAMESPACE" --ignore-not-found --wait=true --timeout=120s >&2; then
      log "demo-clean: the operator did not release the demo's custom resources in 120 s; removing their finalizers"
      "$KUBECTL" get eventpublishers,replayjobs -n "$DEMO_NAMESPACE" -o name 2>/dev/null | while read -r obj; do
        "$KUBECTL" patch -n "$DEMO_NAMESPACE" "$obj" --type=merge -p '{"metadata":{"finalizers":null}}' >&2 || true
      done
    fi
    "$KUBECTL" delete namespace "$DEMO_NAMESPACE" --ignore-not-found --wait=true --timeout=120s >&2 || true
    "$HELM" uninstall "$DEMO_RELEASE" -n "$DEMO_OPERATOR_NAMESPACE" --ignore-not-found --wait >&2 || true
    "$KUBECTL" delete namespace "$DEMO_OPERATOR_NAMESPACE" --ignore-not-found --wait=true --timeout=120s >&2 || true
  fi
  [[ -f $DEMO_STATE/operator.pid ]] && { kill "$(cat "$DEMO_STATE/operator.pid")" 2>/dev/null || true; rm -f "$DEMO_STATE/operator.pid"; }
  if [[ -d $DEMO_KAFKA_STATE ]]; then kafka_node stop || true; fi
  rm -rf "$DEMO_STATE"
  log "demo-clean: done (the CRDs stay, as after helm uninstall)"
}
if [[ ${1:-} == clean ]]; then clean; exit 0; fi

ep_field() { "$KUBECTL" get eventpublisher inventory-kafka -n "$DEMO_NAMESPACE" -o "jsonpath={$1}" 2>/dev/null; }
# Checks for wait_until (evaluated on every poll).
publisher_is() { [[ $(ep_field "$1") == "$2" ]]; }
circuit_tripped() { [[ $(ep_field .status.circuitState) =~ ^(Open|HalfOpen)$ ]]; }
pending_grows() { local n; n=$(ep_field .status.pendingEvents); [[ -n $n && $n -gt 0 ]]; }
# Failed events are compared with the count before the outage: the outbox (and a dead letter
# an earlier, interrupted run left in it) outlives the demo.
drained() { [[ $(ep_field .status.circuitState)/$(ep_field .status.pendingEvents)/$(ep_field .status.failedEventCount) == "Closed/0/$failed_before" ]]; }
replay_phase() { "$KUBECTL" get replayjob replay-stock-changes -n "$DEMO_NAMESPACE" -o 'jsonpath={.status.phase}' 2>/dev/null; }
replay_started() { [[ -n $(replay_phase) ]]; }
replay_succeeded() { [[ $(replay_phase) == Succeeded ]]; }
show_publishers() { "$KUBECTL" get eventpublishers -n "$DEMO_NAMESPACE"; }
# wait_until WHAT SECONDS CMD...: polls CMD every 2 s, printing the publisher while it waits.
wait_until() {
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      log "$what: not within ${timeout}s"
      show_publishers >&2 || true
      return 1
    fi
    sleep 2
  done
}
# Events the inventory example reports writing (its last line: "item …: N events in the outbox").
written=0
run_inventory() {
  local out
  out=$("$BIN/examples/inventory_service" 2>>"$current_log")
  printf '%s\n' "$out" | sed 's/^/  inventory: /'
  local n
  n=$(printf '%s\n' "$out" | sed -n 's/.*: \([0-9][0-9]*\) events in the outbox$/\1/p')
  [[ -n $n ]] || { log "the inventory example did not report its event count"; return 1; }
  written=$((written + n))
}

# A previous run's Kafka node (DEMO_KEEP=1) would hold the port.
if [[ -d $DEMO_KAFKA_STATE ]]; then kafka_node stop 2>/dev/null || true; fi
[[ -f $DEMO_STATE/operator.pid ]] && { kill "$(cat "$DEMO_STATE/operator.pid")" 2>/dev/null || true; }
rm -rf "$DEMO_STATE"
mkdir -p "$DEMO_LOGS"

step "bring up the local stack (make env-up)" "$DEMO_LOGS/env-up.log"
quiet "$HACK_DIR/env-up.sh"
# shellcheck disable=SC1090
source "$OUTBOX_ENV_FILE"

step "build the binary and the examples" "$DEMO_LOGS/build.log"
quiet cargo build --locked --bin inventory-outbox --example inventory_service --example watch_topic
# The node agent runs the image's containers as local processes: map the demo's image tag
# onto the binary just built.
python3 - "$OUTBOX_STATE/process-node/images.json" "$DEMO_IMAGE_REPO:$DEMO_IMAGE_TAG" "$BIN/inventory-outbox" <<'PY'
import json, os, sys
path, image, exe = sys.argv[1:4]
try:
    with open(path) as f:
        doc = json.load(f)
except (FileNotFoundError, json.JSONDecodeError):
    doc = {}
doc.setdefault("images", {})[image] = exe
tmp = f"{path}.{os.getpid()}.tmp"
with open(tmp, "w") as f:
    json.dump(doc, f, indent=2, sort_keys=True)
os.replace(tmp, path)
PY

step "start the demo's own Kafka node on 127.0.0.1:$DEMO_KAFKA_PORT" "$DEMO_KAFKA_STATE/logs/kafka.log"
kafka_node start 2>>"$DEMO_LOGS/kafka-node.log"
DEMO_BOOTSTRAP="127.0.0.1:$DEMO_KAFKA_PORT"

if [[ ${DEMO_OPERATOR:-chart} == process ]]; then
  # A debugging switch, not the demo: the operator as a local process instead of the chart's Pod.
  step "run the operator as a local process (DEMO_OPERATOR=process)" "$DEMO_LOGS/operator.log"
  "$KUBECTL" create namespace "$DEMO_NAMESPACE" --dry-run=client -o yaml | quiet "$KUBECTL" apply -f -
  RELAY_IMAGE="$DEMO_IMAGE_REPO:$DEMO_IMAGE_TAG" POD_NAME=demo-operator \
    setsid "$BIN/inventory-outbox" operator --namespace "$DEMO_NAMESPACE" --lease-namespace "$DEMO_NAMESPACE" \
    --listen 127.0.0.1:18090 --requeue-seconds 3 >"$current_log" 2>&1 </dev/null &
  echo $! >"$DEMO_STATE/operator.pid"
  wait_until "operator ready" 60 curl -sf http://127.0.0.1:18090/readyz -o /dev/null
else
  step "helm install the chart (the operator runs as a Pod in $DEMO_OPERATOR_NAMESPACE)" "$DEMO_LOGS/helm.log"
  # The chart puts the operator's Role into the watched namespace, so it must exist first.
  "$KUBECTL" create namespace "$DEMO_NAMESPACE" --dry-run=client -o yaml | quiet "$KUBECTL" apply -f -
  quiet "$HELM" upgrade --install "$DEMO_RELEASE" charts/inventory-outbox \
    -n "$DEMO_OPERATOR_NAMESPACE" --create-namespace \
    --set image.repository="$DEMO_IMAGE_REPO" --set image.tag="$DEMO_IMAGE_TAG" \
    --set "watchNamespaces[0]=$DEMO_NAMESPACE"
  if ! quiet "$KUBECTL" rollout status "deployment/$DEMO_RELEASE" -n "$DEMO_OPERATOR_NAMESPACE" --timeout=120s; then
    {
      "$KUBECTL" get pods -n "$DEMO_OPERATOR_NAMESPACE" -o wide
      "$KUBECTL" get pods -n "$DEMO_OPERATOR_NAMESPACE" \
        -o 'jsonpath={range .items[*]}{.metadata.name}: {.status.containerStatuses[0].lastState.terminated}{"\n"}{end}'
      # The binary's own words for the args the chart passes (the node agent may not serve logs).
      args=$("$KUBECTL" get deployment "$DEMO_RELEASE" -n "$DEMO_OPERATOR_NAMESPACE" \
        -o 'jsonpath={range .spec.template.spec.containers[0].args[*]}{@}{"\n"}{end}' | sed 's/\$(POD_IP)/127.0.0.1/')
      mapfile -t argv <<<"$args"
      echo "the same args run here (no cluster config, so nothing connects):"
      env -i timeout 3 "$BIN/inventory-outbox" "${argv[@]}" 2>&1 | head -n 5
    } >>"$current_log" 2>&1 || true
    false
  fi
  "$KUBECTL" get pods -n "$DEMO_OPERATOR_NAMESPACE"
fi

step "apply examples/kafka/publisher.yaml (pointed at the demo Kafka) and wait for Ready" "$DEMO_LOGS/publisher.log"
sed "s/127\.0\.0\.1:19092/$DEMO_BOOTSTRAP/" examples/kafka/publisher.yaml | quiet "$KUBECTL" apply -n "$DEMO_NAMESPACE" -f -
wait_until "EventPublisher Ready" 180 publisher_is '.status.conditions[?(@.type=="Ready")].status' True
show_publishers

step "write stock changes with the inventory example; events arriving on Kafka:" "$DEMO_LOGS/inventory.log"
run_inventory
KAFKA_BOOTSTRAP_SERVERS=$DEMO_BOOTSTRAP WATCH_FROM=earliest timeout 90 "$BIN/examples/watch_topic" "$TOPIC" "$written" 2>>"$current_log"
step "delivery health (the status comes from the relay Pods)"
wait_until "pending back to 0" 60 publisher_is .status.pendingEvents 0
show_publishers
published_before=$(ep_field .status.publishedTotal)
failed_before=$(ep_field .status.failedEventCount)

step "stop Kafka: the circuit opens and pending events grow" "$DEMO_LOGS/outage.log"
kafka_node stop 2>>"$current_log"
run_inventory
# The circuit alternates between Open (sending nothing for openDurationMs) and HalfOpen (one
# probe); either one means the relays stopped sending to the broker that is down.
wait_until "circuit Open (or HalfOpen: probing the broker)" 120 circuit_tripped
log "circuit $(ep_field .status.circuitState): $(ep_field '.status.conditions[?(@.type=="BrokerReady")].message')"
show_publishers
run_inventory
wait_until "pending events growing" 60 pending_grows
show_publishers

step "start Kafka again: the circuit closes and the backlog drains" "$DEMO_LOGS/outage.log"
kafka_node start 2>>"$current_log"
wait_until "circuit Closed, nothing pending, no more failed events than before the outage" 180 drained
show_publishers
published_after=$(ep_field .status.publishedTotal)
step "nothing lost: every event written arrived on Kafka" "$DEMO_LOGS/watch-all.log"
KAFKA_BOOTSTRAP_SERVERS=$DEMO_BOOTSTRAP WATCH_FROM=earliest timeout 90 "$BIN/examples/watch_topic" "$TOPIC" "$written" \
  >"$DEMO_LOGS/watch-all.txt" 2>>"$current_log"
# watch_topic fails (and so this step) unless all $written events are on the topic.
log "all $written events written during the demo are on the topic (read from its start; publishedTotal $published_before before the outage, $published_after after)"

step "create a ReplayJob (examples/replayjobs/time-window.yaml)" "$DEMO_LOGS/replay.log"
quiet "$KUBECTL" apply -n "$DEMO_NAMESPACE" -f examples/replayjobs/time-window.yaml
wait_until "ReplayJob status" 60 replay_started
wait_until "ReplayJob Succeeded" 180 replay_succeeded
log "replayed: $("$KUBECTL" get replayjob replay-stock-changes -n "$DEMO_NAMESPACE" -o 'jsonpath={.status.replayed} of {.status.matched} matched, progress {.status.progress}')"
"$KUBECTL" get replayjobs -n "$DEMO_NAMESPACE"

step "the end state"
"$KUBECTL" get eventpublishers,replayjobs,pods -n "$DEMO_NAMESPACE"
[[ ${DEMO_OPERATOR:-chart} == process ]] || "$KUBECTL" get pods -n "$DEMO_OPERATOR_NAMESPACE"

if [[ ${DEMO_KEEP:-} == 1 ]]; then
  log "demo: left running (DEMO_KEEP=1): kubectl get eventpublishers -n $DEMO_NAMESPACE; 'make demo-clean' removes it"
  log "demo: KUBECONFIG=$KUBECONFIG; the demo Kafka is $DEMO_BOOTSTRAP"
else
  trap - ERR
  clean
fi
log "demo: done"
