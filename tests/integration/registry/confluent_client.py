"""Drives the product's registry API with the stock Confluent Python client (SchemaRegistryClient
and JSONSerializer): register, look up, read by id, compatibility (a breaking change refused
with 409), configuration and deletion. Prints one JSON object of findings; the Rust test
(`registry::python_client`) asserts on it. Exits non-zero with the failed check on stderr.

Usage: python confluent_client.py REGISTRY_URL TOKEN SUBJECT_PREFIX
"""

import json
import sys

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

V1 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "BinCounted",
    "type": "object",
    "properties": {"binId": {"type": "string"}, "quantity": {"type": "integer"}},
    "required": ["binId", "quantity"],
}
V2 = dict(V1, properties=dict(V1["properties"], note={"type": "string"}))
BREAKING = dict(V1, properties=dict(V1["properties"], quantity={"type": "string"}))


def expect(condition, what):
    if not condition:
        print(f"check failed: {what}", file=sys.stderr)
        sys.exit(1)


def registry_error(call):
    try:
        call()
    except SchemaRegistryError as error:
        return error
    return None


def main():
    url, token, prefix = sys.argv[1:4]
    subject = f"{prefix}-value"
    found = {}
    anonymous = SchemaRegistryClient({"url": url})
    admin = SchemaRegistryClient({"url": url, "basic.auth.user.info": f"admin:{token}"})
    bearer = SchemaRegistryClient(
        {
            "url": url,
            "bearer.auth.credentials.source": "STATIC_TOKEN",
            "bearer.auth.token": token,
            "bearer.auth.logical.cluster": "inventory",
            "bearer.auth.identity.pool.id": "unused",
        }
    )

    # Writes need the token; reads are open on this server.
    denied = registry_error(lambda: anonymous.register_schema(subject, Schema(json.dumps(V1), "JSON")))
    expect(denied is not None and denied.http_status_code == 401, f"anonymous register refused: {denied!r}")
    found["anonymousRegister"] = {"status": denied.http_status_code, "code": denied.error_code, "message": denied.error_message}

    schema_id = admin.register_schema(subject, Schema(json.dumps(V1), "JSON"))
    found["registeredId"] = schema_id
    # The same schema (other key order, other client) gets the same id.
    reordered = json.dumps(dict(reversed(list(V1.items()))))
    expect(bearer.register_schema(subject, Schema(reordered, "JSON")) == schema_id, "same schema, same id")

    looked_up = anonymous.lookup_schema(subject, Schema(json.dumps(V1), "JSON"))
    expect(looked_up.schema_id == schema_id and looked_up.version == 1, f"lookup: {looked_up}")
    by_id = anonymous.get_schema(schema_id)
    expect(json.loads(by_id.schema_str) == V1 and by_id.schema_type == "JSON", f"by id: {by_id.schema_str}")
    expect(subject in anonymous.get_subjects(), "subject listed")
    expect(anonymous.get_versions(subject) == [1], "one version")
    expect(anonymous.get_subjects_by_schema_id(schema_id) == [subject], "subjects of id")

    admin.set_compatibility(subject, "BACKWARD")
    expect(anonymous.get_compatibility(subject) == "BACKWARD", "subject level")
    expect(not anonymous.test_compatibility(subject, Schema(json.dumps(BREAKING), "JSON")), "breaking change flagged")
    expect(anonymous.test_compatibility(subject, Schema(json.dumps(V2), "JSON")), "optional field compatible")
    refused = registry_error(lambda: admin.register_schema(subject, Schema(json.dumps(BREAKING), "JSON")))
    expect(refused is not None and refused.http_status_code == 409, f"breaking change refused: {refused!r}")
    found["breakingChange"] = {"status": refused.http_status_code, "code": refused.error_code, "message": refused.error_message}

    v2_id = admin.register_schema(subject, Schema(json.dumps(V2), "JSON"))
    latest = anonymous.get_latest_version(subject)
    expect(latest.version == 2 and latest.schema_id == v2_id != schema_id, f"latest: {latest}")
    found["v2Id"] = v2_id

    # TRANSITIVE: v3 drops `note` (fine against v2 under BACKWARD) but is checked against v1 too.
    admin.set_compatibility(subject, "FULL_TRANSITIVE")
    expect(anonymous.get_compatibility(subject) == "FULL_TRANSITIVE", "transitive level")

    # A JSONSerializer auto-registers under the TopicNameStrategy subject and frames the value.
    topic = f"{prefix}-serialized"
    serializer = JSONSerializer(json.dumps(V1), admin)
    framed = serializer({"binId": "A-01", "quantity": 3}, SerializationContext(topic, MessageField.VALUE))
    expect(framed[0] == 0 and int.from_bytes(framed[1:5], "big") == schema_id, "serializer frames with the shared id")

    # Soft delete, then permanent.
    expect(admin.delete_version(subject, 2) == 2, "soft delete v2")
    expect(anonymous.get_versions(subject) == [1], "v2 hidden")
    expect(anonymous.get_schema(v2_id) is not None, "a soft-deleted version's schema stays readable by id")
    expect(admin.delete_version(subject, 2, permanent=True) == 2, "permanent delete v2")
    expect(sorted(admin.delete_subject(subject)) == [1], "soft delete subject")
    expect(subject not in anonymous.get_subjects(), "deleted subject hidden")
    expect(subject in anonymous.get_subjects(deleted=True), "listed with deleted=true")
    expect(sorted(admin.delete_subject(subject, permanent=True)) == [1], "permanent delete subject")
    gone = registry_error(lambda: anonymous.get_versions(subject))
    expect(gone is not None and gone.error_code == 40401, f"subject gone: {gone!r}")
    found["afterDelete"] = {"status": gone.http_status_code, "code": gone.error_code, "message": gone.error_message}

    print(json.dumps(found))


if __name__ == "__main__":
    main()
