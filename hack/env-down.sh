#!/usr/bin/env bash
# Stops every service of the local stack; data and caches stay for the next `env-up`.
source "$(dirname "$0")/lib/common.sh"
for c in process-node kubernetes moto rabbitmq kafka postgres; do
  "$HACK_DIR/components/$c.sh" stop || log "stopping $c failed"
done
