#!/usr/bin/env bash
# Static checks of what ships besides the binary: the Helm chart (helm lint --strict, chart unit
# tests with helm-unittest, alert rules with promtool) and the Dockerfile (hadolint).
# The chart's install into the real API server is tested by tests/integration/chart/.
source "$(dirname "$0")/lib/common.sh"
cd "$REPO_ROOT"

"$HACK_DIR/components/chart-tools.sh" install
eval "$("$HACK_DIR/components/chart-tools.sh" env)"
eval "$("$HACK_DIR/components/kubernetes.sh" env)"
chart=charts/inventory-outbox
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

step() { log "chart-check: $*"; }

step "helm lint --strict"
"$HELM" lint --strict "$chart" --kube-version 1.37.0

step "helm-unittest"
"$HELM_UNITTEST" --color=false "$chart"

step "promtool check rules (the PrometheusRule's groups, as rendered)"
sed 's/OLDEST_PENDING_AGE_SECONDS/300/g' "$chart/files/alerts.yaml" >"$work/alerts.yaml"
"$PROMTOOL" check rules "$work/alerts.yaml"
step "promtool test rules (each alert fires on its condition and not otherwise)"
cp "$chart/tests/alerts.promtool.yaml" "$work/"
(cd "$work" && "$PROMTOOL" test rules alerts.promtool.yaml)

step "hadolint Dockerfile"
"$HADOLINT" Dockerfile
log "chart-check: all passed"
