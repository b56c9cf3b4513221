#!/usr/bin/env python3
"""Reads inventory events that the relay published in the Confluent wire format, with the
stock Confluent Python client: `JSONDeserializer` fetches each message's writer schema from
the product's registry API by the id in the message and validates the payload against it.
The CloudEvents attributes (id, type, subject, ...) come from the `ce_` headers.

Install the client (cached per version):   hack/confluent-python.sh install
Run:
    "$(hack/confluent-python.sh python)" examples/registry_consumer.py \
        --registry-url http://127.0.0.1:8081 --bootstrap-servers 127.0.0.1:19092 \
        --topic inventory-events --max-messages 10

Prints one JSON line per event; with --summary only a final JSON summary.
Set REGISTRY_TOKEN when the registry protects reads (sent as the HTTP Basic password).
"""

import argparse
import json
import os
import sys
import time

from confluent_kafka import Consumer, KafkaException
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry-url", required=True)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group-id", default="registry-consumer-example")
    parser.add_argument("--max-messages", type=int, default=10)
    parser.add_argument("--timeout-seconds", type=float, default=60.0)
    parser.add_argument("--summary", action="store_true", help="print only a summary")
    args = parser.parse_args()

    registry_conf = {"url": args.registry_url}
    token = os.environ.get("REGISTRY_TOKEN")
    if token:
        registry_conf["basic.auth.user.info"] = f"consumer:{token}"
    registry = SchemaRegistryClient(registry_conf)
    # No reader schema: the writer schema comes from the registry by the id in each message.
    deserialize = JSONDeserializer(None, schema_registry_client=registry)

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            "group.id": args.group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([args.topic])
    events, schema_ids, failures = [], set(), []
    deadline = time.monotonic() + args.timeout_seconds
    try:
        while len(events) < args.max_messages and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None:
                continue
            if message.error():
                raise KafkaException(message.error())
            headers = {k: (v.decode() if v is not None else None) for k, v in (message.headers() or [])}
            value = message.value() or b""
            try:
                payload = deserialize(value, SerializationContext(message.topic(), MessageField.VALUE, message.headers()))
            except Exception as error:  # report every bad payload, keep reading
                failures.append({"offset": message.offset(), "error": str(error)})
                continue
            schema_id = int.from_bytes(value[1:5], "big")
            schema_ids.add(schema_id)
            event = {
                "id": headers.get("ce_id"),
                "type": headers.get("ce_type"),
                "subject": headers.get("ce_subject"),
                "eventVersion": headers.get("ce_eventversion"),
                "schemaId": schema_id,
                "payload": payload,
            }
            events.append(event)
            if not args.summary:
                print(json.dumps(event), flush=True)
    finally:
        consumer.close()

    if args.summary:
        print(
            json.dumps(
                {
                    "consumed": len(events),
                    "eventIds": [e["id"] for e in events],
                    "types": sorted({e["type"] for e in events if e["type"]}),
                    "schemaIds": sorted(schema_ids),
                    "failures": failures,
                }
            )
        )
    if failures:
        print(f"{len(failures)} payload(s) failed to deserialize", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
