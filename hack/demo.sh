#!/usr/bin/env bash
# The demo: the local stack, a relay worker publishing the outbox to Kafka, and an inventory
# service writing stock changes; events are printed as they arrive on the Kafka topic.
source "$(dirname "$0")/lib/common.sh"
cd "$REPO_ROOT"

"$HACK_DIR/env-up.sh"
# shellcheck disable=SC1090
source "$OUTBOX_ENV_FILE"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$OUTBOX_CACHE/target}"
cargo build --quiet --bin inventory-outbox --example inventory_service --example watch_topic
BIN="$CARGO_TARGET_DIR/debug"

token_file="$OUTBOX_STATE/demo-admin-token"
[[ -f $token_file ]] || head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$token_file"
config="$OUTBOX_STATE/demo-relay.yaml"
sed "s#^http:#http:\n  adminTokenFile: $token_file#" examples/relay/kafka.yaml >"$config"

log "starting the relay (log: $OUTBOX_LOGS/demo-relay.log)"
"$BIN/inventory-outbox" relay --config "$config" --worker-id demo >"$OUTBOX_LOGS/demo-relay.log" 2>&1 &
relay_pid=$!
trap 'kill $relay_pid 2>/dev/null; wait $relay_pid 2>/dev/null' EXIT
wait_for relay 30 curl -sf http://127.0.0.1:18080/readyz

log "watching topic inventory-events; writing stock changes"
"$BIN/examples/watch_topic" inventory-events 12 &
watch_pid=$!
sleep 2
"$BIN/examples/inventory_service"
"$BIN/examples/inventory_service"
wait $watch_pid
log "relay health: $(curl -s http://127.0.0.1:18080/readyz)"
curl -s http://127.0.0.1:18080/metrics | grep -E '^outbox_relay_events_published_total' || true
log "failed events (admin API): $("$BIN/inventory-outbox" admin --url http://127.0.0.1:18080 --token-file "$token_file" list 2>&1 | tail -n 3)"
