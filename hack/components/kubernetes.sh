#!/usr/bin/env bash
# Local Kubernetes control plane for development and tests: etcd + kube-apiserver +
# kube-controller-manager (every default controller) + kube-scheduler, built from the Go
# module proxy. The node agent that runs Pods is hack/components/process-node.sh.
#
#   kubernetes.sh install   build etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm (cached)
#   kubernetes.sh start     generate PKI once, start etcd/apiserver/controller-manager/scheduler, wait for readiness
#   kubernetes.sh stop      stop the four processes
#   kubernetes.sh status    one line per process, plus the kubeconfig path
#   kubernetes.sh env       export lines for KUBECONFIG, KUBECTL, HELM, KUBE_BIN_DIR
#
# Everything listens on 127.0.0.1 only.
source "$(dirname "$0")/../lib/common.sh"

: "${KCM_PORT:=16257}"
: "${SCHEDULER_PORT:=16259}"
: "${KUBE_START_TIMEOUT:=120}"
: "${ETCD_EXTRA_ARGS:=}"

K8S_CACHE="$OUTBOX_CACHE/kubernetes/$KUBERNETES_VERSION"
KUBE_BIN_DIR="$K8S_CACHE/bin"
ETCD_CACHE="$OUTBOX_CACHE/etcd/$ETCD_VERSION"
ETCD_BIN="$ETCD_CACHE/bin/etcd"
HELM_CACHE="$OUTBOX_CACHE/helm/$HELM_VERSION"
HELM_BIN="$HELM_CACHE/bin/helm"
KUBE_APISERVER_BIN="$KUBE_BIN_DIR/kube-apiserver"
KCM_BIN="$KUBE_BIN_DIR/kube-controller-manager"
SCHEDULER_BIN="$KUBE_BIN_DIR/kube-scheduler"
KUBECTL_BIN="$KUBE_BIN_DIR/kubectl"

K8S_STATE="$OUTBOX_STATE/kubernetes"
PKI="$K8S_STATE/pki"
ETCD_DATA="$K8S_STATE/etcd"
ADMIN_KUBECONFIG="$K8S_STATE/admin.kubeconfig"
KCM_KUBECONFIG="$K8S_STATE/controller-manager.kubeconfig"
SCHEDULER_KUBECONFIG="$K8S_STATE/scheduler.kubeconfig"
ETCD_PID="$K8S_STATE/etcd.pid"
APISERVER_PID="$K8S_STATE/kube-apiserver.pid"
KCM_PID="$K8S_STATE/kube-controller-manager.pid"
SCHEDULER_PID="$K8S_STATE/kube-scheduler.pid"

# ---------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------

# run_step STEP LOGFILE CMD... -> runs CMD with output appended to LOGFILE; on failure names the step
run_step() {
  local step=$1 logfile=$2; shift 2
  printf '\n### %s: %s\n' "$(date +%H:%M:%S)" "$*" >>"$logfile"
  if ! "$@" >>"$logfile" 2>&1; then
    tail -n 25 "$logfile" >&2 || true
    die "install step '$step' failed; full log: $logfile"
  fi
}

require_go() {
  command -v go >/dev/null 2>&1 || die "go is not installed (needed to build the Kubernetes components)"
}

install_etcd() {
  if [[ -x $ETCD_BIN ]]; then log "etcd $ETCD_VERSION: cached ($ETCD_BIN)"; return 0; fi
  require_go
  local src="$ETCD_CACHE/src" logfile="$OUTBOX_LOGS/build-etcd.log" tmp
  : >"$logfile"
  log "building etcd $ETCD_VERSION (log: $logfile)"
  mkdir -p "$src" "$ETCD_CACHE/bin"
  cat >"$src/go.mod" <<EOF
module outbox.local/etcd

go 1.26.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
  rm -f "$src/go.sum"
  cat >"$src/main.go" <<'EOF'
// Command etcd is the upstream etcd server, built from go.etcd.io/etcd/server/v3/etcdmain.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  tmp="$ETCD_CACHE/bin/.etcd.tmp"
  (cd "$src" && run_step "etcd: resolve modules (go mod tidy)" "$logfile" go mod tidy)
  (cd "$src" && CGO_ENABLED=0 run_step "etcd: go build" "$logfile" \
    go build -trimpath -ldflags "-s -w" -o "$tmp" .)
  mv -f "$tmp" "$ETCD_BIN"
  log "etcd $ETCD_VERSION built: $ETCD_BIN"
}

install_helm() {
  if [[ -x $HELM_BIN ]]; then log "helm $HELM_VERSION: cached ($HELM_BIN)"; return 0; fi
  require_go
  local logfile="$OUTBOX_LOGS/build-helm.log" tmpbin="$HELM_CACHE/.gobin"
  : >"$logfile"
  log "building helm $HELM_VERSION (log: $logfile)"
  rm -rf "$tmpbin"; mkdir -p "$tmpbin" "$HELM_CACHE/bin"
  CGO_ENABLED=0 GOBIN="$tmpbin" run_step "helm: go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION" "$logfile" \
    go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv -f "$tmpbin/helm" "$HELM_BIN"
  rm -rf "$tmpbin"
  log "helm $HELM_VERSION built: $HELM_BIN"
}

install_kubernetes() {
  if [[ -x $KUBE_APISERVER_BIN && -x $KCM_BIN && -x $SCHEDULER_BIN && -x $KUBECTL_BIN ]]; then
    log "kubernetes $KUBERNETES_VERSION: cached ($KUBE_BIN_DIR)"; return 0
  fi
  require_go
  local src="$K8S_CACHE/src" logfile="$OUTBOX_LOGS/build-kubernetes.log" tmpbin="$K8S_CACHE/.bin.tmp"
  local ver=${KUBERNETES_VERSION#v} major minor rest staging gomod
  IFS=. read -r major minor rest <<<"$ver"
  [[ -n $major && -n $minor && -n $rest ]] || die "cannot parse KUBERNETES_VERSION=$KUBERNETES_VERSION"
  staging="v0.$minor.$rest" # k8s.io/kubernetes v1.X.Y <-> staging modules v0.X.Y
  : >"$logfile"
  log "building kube-apiserver, kube-controller-manager, kubectl $KUBERNETES_VERSION (staging $staging); this takes a long time (log: $logfile)"
  mkdir -p "$src" "$KUBE_BIN_DIR"

  # k8s.io/kubernetes' own go.mod replaces every staging module with ./staging/src/...; a
  # consumer must replace each of them with the published vX.Y version instead.
  run_step "kubernetes: download k8s.io/kubernetes $KUBERNETES_VERSION go.mod" "$logfile" \
    go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION"
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  [[ -f $gomod ]] || die "install step 'kubernetes: locate go.mod of k8s.io/kubernetes' failed; see $logfile"
  local required staged
  required=$(sed -n '/^require (/,/^)/p' "$gomod" | awk '$1 ~ /^k8s\.io\// {print $1}' | sort -u)
  staged=$(sed -n '/^replace (/,/^)/p' "$gomod" | awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' | sort -u)
  {
    echo "module outbox.local/kubernetes"
    echo
    echo "go 1.26.0"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    echo "replace ("
    # only modules k8s.io/kubernetes actually requires (sample-* are not published)
    comm -12 <(echo "$required") <(echo "$staged") | while read -r m; do
      [[ -n $m ]] && printf '\t%s => %s %s\n' "$m" "$m" "$staging"
    done
    echo ")"
  } >"$src/go.mod"
  rm -f "$src/go.sum"
  cp "$src/go.mod" "$logfile.go.mod"

  local pkgs=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
  (cd "$src" && run_step "kubernetes: resolve modules (go get)" "$logfile" \
    go get "${pkgs[@]/%/@$KUBERNETES_VERSION}")

  local ldflags="-s -w"
  local p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  rm -rf "$tmpbin"; mkdir -p "$tmpbin"
  (cd "$src" && CGO_ENABLED=0 run_step "kubernetes: go build ${pkgs[*]}" "$logfile" \
    go build -mod=mod -trimpath -ldflags "$ldflags" -o "$tmpbin/" "${pkgs[@]}")
  for p in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    [[ -x $tmpbin/$p ]] || die "install step 'kubernetes: go build' produced no $p; see $logfile"
  done
  # kubectl last: its presence marks a complete install
  mv -f "$tmpbin/kube-apiserver" "$KUBE_APISERVER_BIN"
  mv -f "$tmpbin/kube-controller-manager" "$KCM_BIN"
  mv -f "$tmpbin/kube-scheduler" "$SCHEDULER_BIN"
  mv -f "$tmpbin/kubectl" "$KUBECTL_BIN"
  rm -rf "$tmpbin"
  log "kubernetes $KUBERNETES_VERSION built: $KUBE_BIN_DIR"
}

cmd_install() {
  local t0=$SECONDS
  install_etcd
  install_helm
  install_kubernetes
  log "install done in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------------------------------------
# PKI and kubeconfigs
# ---------------------------------------------------------------------------------------------

PKI_FILES=(ca.crt ca.key apiserver.crt apiserver.key admin.crt admin.key
  controller-manager.crt controller-manager.key sa.key sa.pub)

pki_complete() {
  local f
  for f in "${PKI_FILES[@]}"; do [[ -s $PKI/$f ]] || return 1; done
}

# sign_cert DIR NAME SUBJECT EXTFILE -> DIR/NAME.{key,crt} signed by DIR/ca
sign_cert() {
  local dir=$1 name=$2 subj=$3 ext=$4
  openssl genrsa -out "$dir/$name.key" 2048 &&
    openssl req -new -key "$dir/$name.key" -subj "$subj" -out "$dir/$name.csr" &&
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
      -set_serial "0x$(openssl rand -hex 15)" -days 3650 -sha256 -extfile "$ext" -out "$dir/$name.crt" &&
    rm -f "$dir/$name.csr"
}

generate_pki() {
  pki_complete && return 0
  command -v openssl >/dev/null 2>&1 || apt_install openssl
  log "generating PKI in $PKI"
  local tmp="$K8S_STATE/.pki.tmp" logfile="$OUTBOX_LOGS/kubernetes-pki.log"
  rm -rf "$tmp"; mkdir -p "$tmp"
  cat >"$tmp/ca.ext" <<'EOF'
basicConstraints = critical, CA:TRUE
keyUsage = critical, digitalSignature, keyEncipherment, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
  cat >"$tmp/server.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1, IP:10.96.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local
EOF
  cat >"$tmp/client.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
EOF
  # (errexit is off inside an 'if' condition, hence the && chain)
  if ! {
    openssl genrsa -out "$tmp/ca.key" 2048 &&
      openssl req -new -key "$tmp/ca.key" -subj "/CN=inventory-outbox-ca" -out "$tmp/ca.csr" &&
      openssl x509 -req -in "$tmp/ca.csr" -signkey "$tmp/ca.key" -days 3650 -sha256 \
        -extfile "$tmp/ca.ext" -out "$tmp/ca.crt" &&
      rm -f "$tmp/ca.csr" &&
      sign_cert "$tmp" apiserver "/CN=kube-apiserver" "$tmp/server.ext" &&
      sign_cert "$tmp" admin "/O=system:masters/CN=admin" "$tmp/client.ext" &&
      sign_cert "$tmp" controller-manager "/CN=system:kube-controller-manager" "$tmp/client.ext" &&
      openssl genrsa -out "$tmp/sa.key" 2048 &&
      openssl rsa -in "$tmp/sa.key" -pubout -out "$tmp/sa.pub"
  } >"$logfile" 2>&1; then
    tail -n 20 "$logfile" >&2
    die "PKI generation failed; see $logfile"
  fi
  rm -f "$tmp"/*.ext
  chmod 600 "$tmp"/*.key
  rm -rf "$PKI"; mv "$tmp" "$PKI"
  # kubeconfigs embed the old certificates: regenerate them
  rm -f "$ADMIN_KUBECONFIG" "$KCM_KUBECONFIG" "$SCHEDULER_KUBECONFIG" "$PKI/scheduler.crt" "$PKI/scheduler.key"
}

# ensure_client_cert NAME SUBJECT -> PKI/NAME.{crt,key} signed by the existing CA (added to
# an existing PKI without regenerating the CA, which would invalidate every other client)
ensure_client_cert() {
  local name=$1 subj=$2 logfile="$OUTBOX_LOGS/kubernetes-pki.log"
  [[ -s $PKI/$name.crt && -s $PKI/$name.key ]] && return 0
  local ext="$PKI/.client.ext"
  printf '%s\n' 'basicConstraints = critical, CA:FALSE' \
    'keyUsage = critical, digitalSignature, keyEncipherment' \
    'extendedKeyUsage = clientAuth' 'authorityKeyIdentifier = keyid' >"$ext"
  sign_cert "$PKI" "$name" "$subj" "$ext" >>"$logfile" 2>&1 || die "signing the $name client certificate failed; see $logfile"
  rm -f "$ext"
  chmod 600 "$PKI/$name.key"
}

# write_kubeconfig FILE USER CERT KEY
write_kubeconfig() {
  local file=$1 user=$2 cert=$3 key=$4 tmp="$1.tmp"
  cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: inventory-outbox
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$cert")
    client-key-data: $(base64 -w0 <"$key")
contexts:
- name: inventory-outbox
  context:
    cluster: inventory-outbox
    user: $user
    namespace: default
current-context: inventory-outbox
EOF
  chmod 600 "$tmp"
  mv -f "$tmp" "$file"
}

write_kubeconfigs() {
  # rewritten every start (cheap) so a changed APISERVER_PORT is picked up
  write_kubeconfig "$ADMIN_KUBECONFIG" admin "$PKI/admin.crt" "$PKI/admin.key"
  write_kubeconfig "$KCM_KUBECONFIG" system:kube-controller-manager \
    "$PKI/controller-manager.crt" "$PKI/controller-manager.key"
  write_kubeconfig "$SCHEDULER_KUBECONFIG" system:kube-scheduler \
    "$PKI/scheduler.crt" "$PKI/scheduler.key"
}

# args_changed NAME ARGS... -> 0 when the recorded command line of NAME differs from ARGS
# (a running process is then restarted so a changed flag takes effect); records ARGS
args_changed() {
  local name=$1; shift
  local file="$K8S_STATE/$name.args" want
  want=$(printf '%s\n' "$@")
  if [[ -f $file && $(cat "$file") == "$want" ]]; then return 1; fi
  printf '%s' "$want" >"$file"
  return 0
}

# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------

# running PIDFILE BINARY -> 0 when the pid file names a live process running BINARY
# (guards against pids reused by an unrelated process after a machine restart)
running() {
  local pidfile=$1 bin=$2 pid exe
  pid_alive "$pidfile" || return 1
  pid=$(cat "$pidfile")
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [[ ${exe% (deleted)} == "$bin" ]]
}

# clean_stale NAME PIDFILE BINARY -> removes a pid file whose process is gone
clean_stale() {
  local name=$1 pidfile=$2 bin=$3
  if [[ -f $pidfile ]] && ! running "$pidfile" "$bin"; then
    log "removing stale pid file for $name ($(cat "$pidfile" 2>/dev/null))"
    rm -f "$pidfile"
  fi
}

# launch NAME PIDFILE LOGFILE CMD... -> starts CMD detached (own session), records its pid
launch() {
  local name=$1 pidfile=$2 logfile=$3; shift 3
  rm -f "$pidfile"
  printf '\n===== %s starting %s =====\n' "$(date '+%F %T')" "$name" >>"$logfile"
  # bash writes its own pid, then execs the binary in place, so the pid file names the binary
  # shellcheck disable=SC2016
  setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" >>"$logfile" 2>&1 </dev/null &
  local _
  for _ in $(seq 1 50); do [[ -s $pidfile ]] && break; sleep 0.1; done
  [[ -s $pidfile ]] || die "$name did not start (no pid file); see $logfile"
  await_exec "$pidfile" "$1"
  log "started $name (pid $(cat "$pidfile"), log $logfile)"
}

# fail_with_log NAME LOGFILE MESSAGE
fail_with_log() {
  log "---- last lines of $2 ----"
  tail -n 40 "$2" >&2 || true
  die "$1: $3 (full log: $2)"
}

etcd_healthy() {
  local resp
  resp=$({ exec 3<>"/dev/tcp/127.0.0.1/$ETCD_PORT" &&
    printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 &&
    timeout 5 cat <&3; } 2>/dev/null) || return 1
  [[ $resp == *'"health":"true"'* ]]
}

apiserver_ready() {
  [[ -f $ADMIN_KUBECONFIG ]] || return 1
  [[ $("$KUBECTL_BIN" --kubeconfig "$ADMIN_KUBECONFIG" get --raw /readyz --request-timeout=5s 2>/dev/null) == ok ]]
}

kctl() { "$KUBECTL_BIN" --kubeconfig "$ADMIN_KUBECONFIG" --request-timeout=10s "$@"; }

start_etcd_once() {
  local logfile="$OUTBOX_LOGS/etcd.log"
  # shellcheck disable=SC2086
  launch etcd "$ETCD_PID" "$logfile" "$ETCD_BIN" \
    --name outbox \
    --data-dir "$ETCD_DATA" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "outbox=http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster-state new \
    --initial-cluster-token inventory-outbox \
    --auto-compaction-mode periodic --auto-compaction-retention 1h \
    --quota-backend-bytes 2147483648 \
    $ETCD_EXTRA_ARGS
  local deadline=$((SECONDS + 30))
  until etcd_healthy; do
    running "$ETCD_PID" "$ETCD_BIN" || return 1
    ((SECONDS < deadline)) || return 1
    sleep 0.3
  done
  echo "$ETCD_VERSION" >"$K8S_STATE/etcd-data.version"
}

start_etcd() {
  if running "$ETCD_PID" "$ETCD_BIN"; then
    etcd_healthy && return 0
    wait_for etcd 20 etcd_healthy && return 0
    fail_with_log etcd "$OUTBOX_LOGS/etcd.log" "running but not healthy"
  fi
  port_open "$ETCD_PORT" && die "127.0.0.1:$ETCD_PORT is already in use by another process (not our etcd)"
  port_open "$ETCD_PEER_PORT" && die "127.0.0.1:$ETCD_PEER_PORT is already in use by another process (not our etcd)"
  mkdir -p "$K8S_STATE"
  if start_etcd_once; then return 0; fi
  # A data dir left by another etcd version, a crash or a half-finished first start: keep one
  # copy aside and start from an empty data dir (the cluster state is disposable dev data).
  if [[ -d $ETCD_DATA ]]; then
    stop_pidfile etcd "$ETCD_PID"
    log "etcd did not start with the existing data dir; moving it to $ETCD_DATA.stale and starting fresh"
    rm -rf "$ETCD_DATA.stale"
    mv "$ETCD_DATA" "$ETCD_DATA.stale"
    start_etcd_once && return 0
  fi
  stop_pidfile etcd "$ETCD_PID"
  fail_with_log etcd "$OUTBOX_LOGS/etcd.log" "did not become healthy on 127.0.0.1:$ETCD_PORT"
}

start_apiserver() {
  local logfile="$OUTBOX_LOGS/kube-apiserver.log"
  if ! running "$APISERVER_PID" "$KUBE_APISERVER_BIN"; then
    port_open "$APISERVER_PORT" && die "127.0.0.1:$APISERVER_PORT is already in use by another process (not our kube-apiserver)"
    launch kube-apiserver "$APISERVER_PID" "$logfile" "$KUBE_APISERVER_BIN" \
      --bind-address=127.0.0.1 \
      --advertise-address=127.0.0.1 \
      --secure-port="$APISERVER_PORT" \
      --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
      --authorization-mode=RBAC \
      --client-ca-file="$PKI/ca.crt" \
      --tls-cert-file="$PKI/apiserver.crt" \
      --tls-private-key-file="$PKI/apiserver.key" \
      --service-account-issuer=https://kubernetes.default.svc \
      --service-account-key-file="$PKI/sa.pub" \
      --service-account-signing-key-file="$PKI/sa.key" \
      --api-audiences=https://kubernetes.default.svc \
      --service-cluster-ip-range=10.96.0.0/16 \
      --allow-privileged=true \
      --endpoint-reconciler-type=none \
      --profiling=false \
      --v=1
  fi
  local deadline=$((SECONDS + KUBE_START_TIMEOUT))
  until apiserver_ready; do
    running "$APISERVER_PID" "$KUBE_APISERVER_BIN" || fail_with_log kube-apiserver "$logfile" "process exited"
    ((SECONDS < deadline)) || fail_with_log kube-apiserver "$logfile" "/readyz not ok within ${KUBE_START_TIMEOUT}s"
    sleep 0.5
  done
  until kctl get namespace default >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail_with_log kube-apiserver "$logfile" "namespace 'default' not present within ${KUBE_START_TIMEOUT}s"
    sleep 0.5
  done
}

start_controller_manager() {
  local logfile="$OUTBOX_LOGS/kube-controller-manager.log"
  # --use-service-account-credentials=true: each controller runs as its own kube-system
  # ServiceAccount and so gets the bootstrap system:controller:* RBAC roles; the
  # system:kube-controller-manager user alone may not delete arbitrary objects (GC, namespace
  # deletion) nor create kube-root-ca.crt ConfigMaps.
  # --authentication-skip-lookup: the apiserver has no front-proxy (requestheader) CA.
  # --controllers='*': every controller enabled by default (deployment, replicaset, job,
  # cronjob, statefulset, daemonset, disruption, endpointslice, garbagecollector, namespace,
  # serviceaccount(-token), ttl-after-finished, podgc, nodelifecycle, ...); none of them needs
  # a cloud provider. nodeipam stays idle (no --allocate-node-cidrs): the node agent assigns
  # Pod IPs. The cluster CA also signs CSRs.
  local args=(
    --kubeconfig="$KCM_KUBECONFIG"
    --authentication-kubeconfig="$KCM_KUBECONFIG"
    --authorization-kubeconfig="$KCM_KUBECONFIG"
    --authentication-skip-lookup=true
    --bind-address=127.0.0.1
    --secure-port="$KCM_PORT"
    --cert-dir="$K8S_STATE/controller-manager"
    "--controllers=*"
    --cluster-signing-cert-file="$PKI/ca.crt"
    --cluster-signing-key-file="$PKI/ca.key"
    --service-account-private-key-file="$PKI/sa.key"
    --root-ca-file="$PKI/ca.crt"
    --use-service-account-credentials=true
    --leader-elect=false
    --profiling=false
    --v=1
  )
  if args_changed kube-controller-manager "$KCM_BIN" "${args[@]}" && running "$KCM_PID" "$KCM_BIN"; then
    log "kube-controller-manager flags changed: restarting it"
    stop_pidfile kube-controller-manager "$KCM_PID"
  fi
  if ! running "$KCM_PID" "$KCM_BIN"; then
    local _w
    for _w in $(seq 1 20); do port_open "$KCM_PORT" || break; sleep 0.5; done
    port_open "$KCM_PORT" && die "127.0.0.1:$KCM_PORT is already in use by another process (not our kube-controller-manager)"
    mkdir -p "$K8S_STATE/controller-manager"
    launch kube-controller-manager "$KCM_PID" "$logfile" "$KCM_BIN" "${args[@]}"
  fi
  # the serviceaccount controller creating 'default' in namespace default proves it works
  local deadline=$((SECONDS + 60))
  until kctl get serviceaccount default -n default >/dev/null 2>&1; do
    running "$KCM_PID" "$KCM_BIN" || fail_with_log kube-controller-manager "$logfile" "process exited"
    ((SECONDS < deadline)) || fail_with_log kube-controller-manager "$logfile" "ServiceAccount default/default not created within 60s"
    sleep 0.5
  done
}

scheduler_healthy() {
  curl -ksf --max-time 3 "https://127.0.0.1:$SCHEDULER_PORT/healthz" >/dev/null 2>&1
}

start_scheduler() {
  local logfile="$OUTBOX_LOGS/kube-scheduler.log"
  local args=(
    --kubeconfig="$SCHEDULER_KUBECONFIG"
    --authentication-kubeconfig="$SCHEDULER_KUBECONFIG"
    --authorization-kubeconfig="$SCHEDULER_KUBECONFIG"
    --authentication-skip-lookup=true
    --bind-address=127.0.0.1
    --secure-port="$SCHEDULER_PORT"
    --leader-elect=false
    --profiling=false
    --v=1
  )
  if args_changed kube-scheduler "$SCHEDULER_BIN" "${args[@]}" && running "$SCHEDULER_PID" "$SCHEDULER_BIN"; then
    log "kube-scheduler flags changed: restarting it"
    stop_pidfile kube-scheduler "$SCHEDULER_PID"
  fi
  if ! running "$SCHEDULER_PID" "$SCHEDULER_BIN"; then
    port_open "$SCHEDULER_PORT" && die "127.0.0.1:$SCHEDULER_PORT is already in use by another process (not our kube-scheduler)"
    launch kube-scheduler "$SCHEDULER_PID" "$logfile" "$SCHEDULER_BIN" "${args[@]}"
  fi
  local deadline=$((SECONDS + 60))
  until scheduler_healthy; do
    running "$SCHEDULER_PID" "$SCHEDULER_BIN" || fail_with_log kube-scheduler "$logfile" "process exited"
    ((SECONDS < deadline)) || fail_with_log kube-scheduler "$logfile" "/healthz not ok within 60s"
    sleep 0.5
  done
}

cmd_start() {
  local t0=$SECONDS b
  for b in "$ETCD_BIN" "$KUBE_APISERVER_BIN" "$KCM_BIN" "$SCHEDULER_BIN" "$KUBECTL_BIN"; do
    [[ -x $b ]] || die "$b is missing; run '$0 install' first"
  done
  mkdir -p "$K8S_STATE"
  clean_stale etcd "$ETCD_PID" "$ETCD_BIN"
  clean_stale kube-apiserver "$APISERVER_PID" "$KUBE_APISERVER_BIN"
  clean_stale kube-controller-manager "$KCM_PID" "$KCM_BIN"
  clean_stale kube-scheduler "$SCHEDULER_PID" "$SCHEDULER_BIN"

  local before; before=$(cat "$PKI/ca.crt" 2>/dev/null || true)
  generate_pki
  if [[ -n $before && $before != "$(cat "$PKI/ca.crt")" ]] || [[ -z $before ]]; then
    # new certificates: processes still running with the old ones must restart
    stop_pidfile kube-controller-manager "$KCM_PID"
    stop_pidfile kube-apiserver "$APISERVER_PID"
  fi
  ensure_client_cert scheduler "/CN=system:kube-scheduler"
  write_kubeconfigs
  # each start_* leaves a healthy process with unchanged flags alone: a warm start is quick
  start_etcd
  start_apiserver
  start_controller_manager
  start_scheduler
  release_orphaned_finalizers
  log "kubernetes ready in $((SECONDS - t0))s: KUBECONFIG=$ADMIN_KUBECONFIG"
}

# Namespaces an earlier run (a killed test process, an interrupted demo) left Terminating with
# the product's objects in them: their operator is gone, so nobody releases its finalizers and
# the namespace controller retries them for good, loading the API server for every later run
# (1,800 such EventPublishers kept it at 1.2 cores while idle). No operator runs before the
# stack is up, so the objects are let go here, as an operator's user would.
release_orphaned_finalizers() {
  local ns object released=0
  for ns in $(kctl get namespaces -o jsonpath='{range .items[?(@.status.phase=="Terminating")]}{.metadata.name}{" "}{end}' 2>/dev/null); do
    for object in $(kctl get eventpublishers,replayjobs -n "$ns" -o name 2>/dev/null); do
      kctl patch -n "$ns" "$object" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 &&
        released=$((released + 1))
    done
  done
  ((released == 0)) || log "released the finalizers of $released objects left in Terminating namespaces"
}

cmd_stop() {
  # never signal a pid that was reused by an unrelated process (e.g. after a machine restart)
  clean_stale kube-scheduler "$SCHEDULER_PID" "$SCHEDULER_BIN"
  clean_stale kube-controller-manager "$KCM_PID" "$KCM_BIN"
  clean_stale kube-apiserver "$APISERVER_PID" "$KUBE_APISERVER_BIN"
  clean_stale etcd "$ETCD_PID" "$ETCD_BIN"
  stop_pidfile kube-scheduler "$SCHEDULER_PID"
  stop_pidfile kube-controller-manager "$KCM_PID"
  stop_pidfile kube-apiserver "$APISERVER_PID"
  stop_pidfile etcd "$ETCD_PID"
}

cmd_status() {
  local name pidfile bin port
  while read -r name pidfile bin port; do
    if running "$pidfile" "$bin"; then
      printf '%-24s running  pid %-8s 127.0.0.1:%s\n' "$name" "$(cat "$pidfile")" "$port"
    else
      printf '%-24s stopped  %-12s 127.0.0.1:%s\n' "$name" "" "$port"
    fi
  done <<EOF
etcd $ETCD_PID $ETCD_BIN $ETCD_PORT
kube-apiserver $APISERVER_PID $KUBE_APISERVER_BIN $APISERVER_PORT
kube-controller-manager $KCM_PID $KCM_BIN $KCM_PORT
kube-scheduler $SCHEDULER_PID $SCHEDULER_BIN $SCHEDULER_PORT
EOF
  printf '%-24s %s\n' kubeconfig "$ADMIN_KUBECONFIG"
}

cmd_env() {
  printf 'export KUBECONFIG=%q\n' "$ADMIN_KUBECONFIG"
  printf 'export KUBECTL=%q\n' "$KUBECTL_BIN"
  printf 'export HELM=%q\n' "$HELM_BIN"
  printf 'export KUBE_BIN_DIR=%q\n' "$KUBE_BIN_DIR"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
