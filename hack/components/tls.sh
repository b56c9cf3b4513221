#!/usr/bin/env bash
# The local certificate authority and the certificates the TLS listeners of the local stack
# present (PostgreSQL, the Kafka TLS node, the RabbitMQ TLS node), plus the deliberately broken
# ones the failure tests need. Made once with openssl and reused on every start; `renew` makes
# them again.
#
# Files in $OUTBOX_STATE/tls (all PEM unless the name says otherwise):
#   ca.crt                 the local CA every client trusts
#   server.crt/.key        localhost, 127.0.0.1 (valid 2 years)
#   server.p12             the same key and chain as PKCS#12 for Java (password in keystore.password)
#   expired.crt/.key/.p12  localhost, 127.0.0.1, signed by the CA, expired a year ago
#   wronghost.crt/.key/.p12 valid, signed by the CA, but only for wrong-host.invalid
#   client.crt/.key        client certificate (CN relay) for mTLS, signed by the CA
#   other-ca.crt           a second CA that signed nothing here ("untrusted CA" tests)
#
# Usage: tls.sh install|start|stop|status|env|renew
source "$(dirname "$0")/../lib/common.sh"

TLS_DIR="$OUTBOX_STATE/tls"
DAYS=730

# The keystore password only protects files on this machine; Kafka's PKCS#12 loader needs one.
keystore_password() { cat "$TLS_DIR/keystore.password"; }

complete() {
  local f
  for f in ca.crt server.crt server.key server.p12 expired.crt expired.p12 wronghost.crt wronghost.p12 \
    client.crt client.key other-ca.crt keystore.password; do
    [[ -s $TLS_DIR/$f ]] || return 1
  done
  # A CA or server certificate that ran out since it was made is made again.
  openssl x509 -checkend 86400 -noout -in "$TLS_DIR/ca.crt" >/dev/null &&
    openssl x509 -checkend 86400 -noout -in "$TLS_DIR/server.crt" >/dev/null
}

# sign NAME SUBJECT SAN START END EXTKEYUSAGE -> NAME.key + NAME.crt signed by the local CA
sign() {
  local name=$1 subject=$2 san=$3 start=$4 end=$5 eku=$6 work="$TLS_DIR/ca-work"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS_DIR/$name.key" 2>/dev/null
  openssl req -new -key "$TLS_DIR/$name.key" -subj "$subject" -out "$work/$name.csr"
  cat >"$work/$name.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = $eku
${san:+subjectAltName = $san}
EOF
  # `openssl ca` is the only openssl 3.0 command that takes an explicit start date (for the expired one).
  openssl ca -batch -config "$work/ca.cnf" -notext -startdate "$start" -enddate "$end" \
    -extfile "$work/$name.ext" -in "$work/$name.csr" -out "$TLS_DIR/$name.crt" 2>>"$OUTBOX_LOGS/tls.log"
}

# p12 NAME -> NAME.p12 (key, certificate and CA) for Java keystores
p12() {
  openssl pkcs12 -export -name server -in "$TLS_DIR/$1.crt" -inkey "$TLS_DIR/$1.key" -certfile "$TLS_DIR/ca.crt" \
    -passout "file:$TLS_DIR/keystore.password" -out "$TLS_DIR/$1.p12"
}

make_all() {
  log "making the local CA and certificates in $TLS_DIR"
  rm -rf "$TLS_DIR.new"
  mkdir -p "$TLS_DIR.new/ca-work/db"
  chmod 700 "$TLS_DIR.new"
  local final=$TLS_DIR
  TLS_DIR="$TLS_DIR.new"
  local work="$TLS_DIR/ca-work"
  : >"$work/db/index.txt"
  cat >"$work/ca.cnf" <<EOF
[ ca ]
default_ca = local
[ local ]
dir = $work/db
database = $work/db/index.txt
new_certs_dir = $work/db
serial = $work/db/serial
default_md = sha256
policy = anything
unique_subject = no
copy_extensions = none
[ anything ]
commonName = supplied
[ req ]
distinguished_name = dn
[ dn ]
EOF
  openssl rand -hex 16 >"$work/db/serial"
  head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$TLS_DIR/keystore.password"
  for ca in ca other-ca; do
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS_DIR/$ca.key" 2>/dev/null
    openssl req -x509 -new -key "$TLS_DIR/$ca.key" -days $((DAYS + 365)) -sha256 \
      -subj "/O=inventory-outbox local/CN=inventory-outbox $ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -out "$TLS_DIR/$ca.crt"
  done
  # `openssl ca` signs with the CA named in its config.
  sed -i "s|^dir = .*|&\ncertificate = $TLS_DIR/ca.crt\nprivate_key = $TLS_DIR/ca.key|" "$work/ca.cnf"
  local now past_start past_end start end
  now=$(date -u +%s)
  past_start=$(date -u -d "@$((now - 2 * 365 * 86400))" +%y%m%d%H%M%SZ)
  past_end=$(date -u -d "@$((now - 365 * 86400))" +%y%m%d%H%M%SZ)
  start=$(date -u -d "@$((now - 3600))" +%y%m%d%H%M%SZ)
  end=$(date -u -d "@$((now + DAYS * 86400))" +%y%m%d%H%M%SZ)
  local local_san="DNS:localhost, IP:127.0.0.1"
  sign server "/CN=localhost" "$local_san" "$start" "$end" serverAuth
  sign expired "/CN=localhost" "$local_san" "$past_start" "$past_end" serverAuth
  sign wronghost "/CN=wrong-host.invalid" "DNS:wrong-host.invalid" "$start" "$end" serverAuth
  sign client "/CN=relay" "" "$start" "$end" clientAuth
  for n in server expired wronghost; do p12 "$n"; done
  # Readable by the server processes that run as other users (postgres copies its own).
  chmod 644 "$TLS_DIR"/*.crt "$TLS_DIR"/*.p12
  chmod 600 "$TLS_DIR"/*.key
  rm -rf "$final"
  mv "$TLS_DIR" "$final"
  TLS_DIR=$final
}

do_start() {
  command -v openssl >/dev/null || apt_install openssl
  complete && return 0
  make_all
}

do_status() {
  if complete; then echo "tls ready $TLS_DIR"; else echo "tls missing $TLS_DIR"; fi
}

do_env() {
  echo "export OUTBOX_TLS_DIR=$TLS_DIR"
  echo "export OUTBOX_TLS_CA_FILE=$TLS_DIR/ca.crt"
}

case "${1:-}" in
  install) command -v openssl >/dev/null || apt_install openssl ;;
  start) do_start ;;
  stop) ;; # nothing runs
  status) do_status ;;
  env) do_env ;;
  renew) make_all ;;
  password) keystore_password ;;
  *) echo "usage: $0 install|start|stop|status|env|renew" >&2; exit 2 ;;
esac
