#!/usr/bin/env bash
# One line per service, then where the environment file, logs and kubeconfig are.
source "$(dirname "$0")/lib/common.sh"
for c in tls postgres kafka rabbitmq moto kubernetes process-node; do
  "$HACK_DIR/components/$c.sh" status || true
done
echo "environment file: $OUTBOX_ENV_FILE"
echo "logs:             $OUTBOX_LOGS"
echo "kubeconfig:       $OUTBOX_STATE/kubernetes/admin.kubeconfig"
echo "cache:            $OUTBOX_CACHE"
