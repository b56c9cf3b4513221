#!/usr/bin/env bash
# Brings the whole local stack up (installing what is missing) and writes the environment
# file that tests and the demo source. Idempotent: running services are left alone.
source "$(dirname "$0")/lib/common.sh"
# The services outlive the checkout that starts them (CI clones are deleted afterwards): start
# them from the state directory, so none keeps a deleted working directory.
mkdir -p "$OUTBOX_STATE"
cd "$OUTBOX_STATE"

components=(${OUTBOX_COMPONENTS:-tls postgres kafka rabbitmq moto kubernetes process-node})

run_step() {
  local component=$1 action=$2 started=$SECONDS
  if ! "$HACK_DIR/components/$component.sh" "$action"; then
    log "step '$component $action' failed; logs are in $OUTBOX_LOGS (see $component*.log)"
    exit 1
  fi
  log "$component $action: done in $((SECONDS - started))s"
}

# What cargo needs to build the product: librdkafka is built with cmake against the system
# OpenSSL (rdkafka's `ssl` feature). Present on the project's machines; a no-op then.
apt_install cmake pkg-config libssl-dev

# Installs first (CPU-heavy builds), then starts, so a failure shows up before anything runs.
for c in "${components[@]}"; do run_step "$c" install; done
for c in "${components[@]}"; do run_step "$c" start; done

{
  echo "# Written by hack/env-up.sh; source it to talk to the local stack."
  echo "export OUTBOX_STATE=$OUTBOX_STATE"
  for c in "${components[@]}"; do "$HACK_DIR/components/$c.sh" env; done
} >"$OUTBOX_ENV_FILE.tmp"
mv "$OUTBOX_ENV_FILE.tmp" "$OUTBOX_ENV_FILE"
log "stack is up; environment: $OUTBOX_ENV_FILE"
