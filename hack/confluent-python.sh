#!/usr/bin/env bash
# The Confluent Python client (`confluent-kafka` from PyPI, with its schema-registry and JSON
# Schema extras) in a venv cached per version in $OUTBOX_CACHE/confluent-kafka/$VERSION/venv.
# The registry tests and examples/registry_consumer.py run with it; the tests call
# `confluent-python.sh install` themselves, so a fresh machine needs no manual step.
#
# Usage: confluent-python.sh install|python
#   install  installs (idempotent) and prints the venv's python path on stdout
#   python   prints the venv's python path (installing first when needed)
source "$(dirname "$0")/lib/common.sh"

: "${CONFLUENT_KAFKA_VERSION:=2.16.1}"
CLIENT_HOME="$OUTBOX_CACHE/confluent-kafka/$CONFLUENT_KAFKA_VERSION"
VENV="$CLIENT_HOME/venv"
INSTALL_LOG="$OUTBOX_LOGS/confluent-kafka-install.log"

installed() {
  [[ -f $CLIENT_HOME/.complete ]] &&
    "$VENV/bin/python" - >/dev/null 2>&1 <<PY
import importlib.metadata as m
assert m.version("confluent-kafka") == "$CONFLUENT_KAFKA_VERSION"
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
PY
}

do_install() {
  # The marker is written last, so an interrupted install is redone; the import check also
  # catches a venv whose base interpreter went away.
  installed && return 0
  local python
  python=$(command -v python3) || die "python3 not found"
  "$python" -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
  # Several test processes may ask at once: one installs, the others wait for it.
  mkdir -p "$CLIENT_HOME"
  exec 9>"$CLIENT_HOME/.lock"
  flock 9
  installed && return 0
  log "installing confluent-kafka[schemaregistry,json]==$CONFLUENT_KAFKA_VERSION into $VENV"
  rm -rf "$VENV" "$CLIENT_HOME/.complete"
  {
    "$python" -m venv "$VENV" &&
      "$VENV/bin/pip" install -q --disable-pip-version-check \
        "confluent-kafka[schemaregistry,json]==$CONFLUENT_KAFKA_VERSION"
  } >"$INSTALL_LOG" 2>&1 ||
    { tail -n 20 "$INSTALL_LOG" >&2; die "confluent-kafka install failed; see $INSTALL_LOG"; }
  touch "$CLIENT_HOME/.complete"
}

case "${1:-}" in
  install | python) do_install && echo "$VENV/bin/python" ;;
  *) echo "usage: $0 install|python" >&2; exit 2 ;;
esac
