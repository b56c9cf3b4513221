//! The table of compatibility cases: every mode and rule, as (history, candidate, expected
//! outcome) rows. Shared by the checker's unit tests (`schema::compatibility`) and the
//! integration test proving the REST API decides like the Rust API; each includer provides
//! `CompatibilityMode` in the parent module.

#![allow(dead_code)]

use serde_json::{Value, json};

use super::CompatibilityMode;
use super::CompatibilityMode::{Backward, BackwardTransitive, Forward, ForwardTransitive, Full, FullTransitive};

/// What a case expects from `check`.
pub enum Expect {
    /// No incompatibilities.
    Compatible,
    /// At least one incompatibility whose message contains `contains`, found against
    /// `against` when given.
    Incompatible {
        /// A substring of the expected message.
        contains: &'static str,
        /// The version the incompatibility must be found against, if checked.
        against: Option<u32>,
    },
}

/// Expects no incompatibilities.
pub fn compatible() -> Expect {
    Expect::Compatible
}

/// Expects an incompatibility whose message contains `contains`.
pub fn breaks(contains: &'static str) -> Expect {
    Expect::Incompatible {
        contains,
        against: None,
    }
}

/// Expects an incompatibility whose message contains `contains`, found against `version`.
pub fn breaks_against(contains: &'static str, version: u32) -> Expect {
    Expect::Incompatible {
        contains,
        against: Some(version),
    }
}

/// One table row: history versions are numbered 1, 2, ... oldest first.
pub struct Case {
    /// Names the case in failure output.
    pub name: &'static str,
    /// The subject's mode.
    pub mode: CompatibilityMode,
    /// Registered schemas, oldest first.
    pub history: Vec<Value>,
    /// The schema being registered.
    pub candidate: Value,
    /// The expected outcome.
    pub expect: Expect,
}

/// A `StockLevelChanged`-like payload schema, as schemars would emit it.
pub fn base() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "StockLevelChanged",
        "type": "object",
        "properties": {
            "inventoryItemId": { "type": "string", "format": "uuid" },
            "quantity": { "type": "integer", "format": "int64" },
            "description": { "type": ["string", "null"] }
        },
        "required": ["inventoryItemId", "quantity"]
    })
}

/// `schema` with property `name` set to `property` (and required when `is_required`).
pub fn with(mut schema: Value, name: &str, property: Value, is_required: bool) -> Value {
    schema["properties"][name] = property;
    let required = schema["required"].as_array_mut().expect("required array");
    required.retain(|n| n != name);
    if is_required {
        required.push(json!(name));
    }
    schema
}

/// `schema` without property `name`.
pub fn without(mut schema: Value, name: &str) -> Value {
    schema["properties"].as_object_mut().expect("properties").remove(name);
    schema["required"]
        .as_array_mut()
        .expect("required array")
        .retain(|n| n != name);
    schema
}

/// `schema` with `keyword` set to `value` at the root.
pub fn set(mut schema: Value, keyword: &str, value: Value) -> Value {
    schema[keyword] = value;
    schema
}

/// A schema with a `changeReason` enum in `$defs` and a nullable `$ref`'d `address`.
pub fn with_defs(reasons: &[&str], address_required: &[&str], address_nullable: bool) -> Value {
    let address = if address_nullable {
        json!({ "anyOf": [{ "$ref": "#/$defs/Address" }, { "type": "null" }] })
    } else {
        json!({ "$ref": "#/$defs/Address" })
    };
    let mut schema = with(
        with(
            base(),
            "changeReason",
            json!({ "$ref": "#/$defs/StockChangeReason" }),
            true,
        ),
        "address",
        address,
        !address_nullable,
    );
    schema["$defs"] = json!({
        "StockChangeReason": { "type": "string", "enum": reasons },
        "Address": {
            "type": "object",
            "properties": {
                "street": { "type": "string" },
                "city": { "type": "string" },
                "postalCode": { "type": "string" }
            },
            "required": address_required
        }
    });
    schema
}

/// `base()` plus an array property `changedFields` with the given `items` and extra keywords.
pub fn with_array(items: Value, extra: Value) -> Value {
    let mut array = json!({ "type": "array", "items": items });
    if let (Some(array), Some(extra)) = (array.as_object_mut(), extra.as_object()) {
        array.extend(extra.clone());
    }
    with(base(), "changedFields", array, true)
}

/// Versions for the transitivity cases: `a` is an optional string in v1, gone in v2, and
/// back as an optional integer in v3.
pub fn transitive_versions() -> (Value, Value, Value) {
    let v1 = with(base(), "a", json!({ "type": "string" }), false);
    let v2 = base();
    let v3 = with(base(), "a", json!({ "type": "integer" }), false);
    (v1, v2, v3)
}

/// The table: every mode, every rule.
pub fn cases() -> Vec<Case> {
    let (t1, t2, t3) = transitive_versions();
    let optional_warehouse = with(base(), "warehouseId", json!({ "type": "string" }), false);
    let required_warehouse = with(base(), "warehouseId", json!({ "type": "string" }), true);
    let quantity_string = with(base(), "quantity", json!({ "type": "string" }), true);
    let quantity_number = with(base(), "quantity", json!({ "type": "number" }), true);
    let quantity_optional = with(base(), "quantity", json!({ "type": "integer" }), false);
    let reasons = ["RECEIPT", "SALE", "ADJUSTMENT"];
    let more_reasons = ["RECEIPT", "SALE", "ADJUSTMENT", "RETURN"];
    let closed = set(base(), "additionalProperties", json!(false));
    vec![
        // NONE and empty history.
        Case {
            name: "none_allows_a_type_change",
            mode: CompatibilityMode::None,
            history: vec![base()],
            candidate: quantity_string.clone(),
            expect: compatible(),
        },
        Case {
            name: "empty_history_is_always_compatible",
            mode: FullTransitive,
            history: vec![],
            candidate: quantity_string.clone(),
            expect: compatible(),
        },
        // Adding an optional field: compatible in every mode.
        Case {
            name: "add_optional_field_backward",
            mode: Backward,
            history: vec![base()],
            candidate: optional_warehouse.clone(),
            expect: compatible(),
        },
        Case {
            name: "add_optional_field_forward",
            mode: Forward,
            history: vec![base()],
            candidate: optional_warehouse.clone(),
            expect: compatible(),
        },
        Case {
            name: "add_optional_field_full_transitive",
            mode: FullTransitive,
            history: vec![base(), base()],
            candidate: optional_warehouse.clone(),
            expect: compatible(),
        },
        // Adding a required field: breaks BACKWARD and FULL, not FORWARD.
        Case {
            name: "add_required_field_breaks_backward",
            mode: Backward,
            history: vec![base()],
            candidate: required_warehouse.clone(),
            expect: breaks("field `warehouseId` is required by the reader"),
        },
        Case {
            name: "add_required_field_is_forward_compatible",
            mode: Forward,
            history: vec![base()],
            candidate: required_warehouse.clone(),
            expect: compatible(),
        },
        Case {
            name: "add_required_field_breaks_full",
            mode: Full,
            history: vec![base()],
            candidate: required_warehouse,
            expect: breaks("field `warehouseId` is required by the reader"),
        },
        // Removing a required field: breaks FORWARD and FULL, not BACKWARD.
        Case {
            name: "remove_required_field_is_backward_compatible",
            mode: Backward,
            history: vec![base()],
            candidate: without(base(), "quantity"),
            expect: compatible(),
        },
        Case {
            name: "remove_required_field_breaks_forward",
            mode: Forward,
            history: vec![base()],
            candidate: without(base(), "quantity"),
            expect: breaks("field `quantity` is required by the reader"),
        },
        Case {
            name: "remove_required_field_breaks_full",
            mode: Full,
            history: vec![base()],
            candidate: without(base(), "quantity"),
            expect: breaks("field `quantity` is required by the reader"),
        },
        // Removing an optional field: compatible both ways.
        Case {
            name: "remove_optional_field_full",
            mode: Full,
            history: vec![base()],
            candidate: without(base(), "description"),
            expect: compatible(),
        },
        // Type changes break both ways.
        Case {
            name: "type_change_breaks_backward",
            mode: Backward,
            history: vec![base()],
            candidate: quantity_string.clone(),
            expect: breaks("field `quantity` changed type from integer to string"),
        },
        Case {
            name: "type_change_breaks_forward",
            mode: Forward,
            history: vec![base()],
            candidate: quantity_string,
            expect: breaks("field `quantity` changed type from string to integer"),
        },
        // Required -> optional: backward compatible, not forward.
        Case {
            name: "required_to_optional_is_backward_compatible",
            mode: Backward,
            history: vec![base()],
            candidate: quantity_optional.clone(),
            expect: compatible(),
        },
        Case {
            name: "required_to_optional_breaks_forward",
            mode: Forward,
            history: vec![base()],
            candidate: quantity_optional,
            expect: breaks("field `quantity` is required by the reader but may be missing"),
        },
        // Integer -> number widening.
        Case {
            name: "integer_to_number_is_backward_compatible",
            mode: Backward,
            history: vec![base()],
            candidate: quantity_number.clone(),
            expect: compatible(),
        },
        Case {
            name: "integer_to_number_breaks_forward",
            mode: Forward,
            history: vec![base()],
            candidate: quantity_number,
            expect: breaks("field `quantity` changed type from number to integer"),
        },
        Case {
            name: "nullable_integer_to_nullable_number_is_backward_compatible",
            mode: Backward,
            history: vec![with(
                base(),
                "threshold",
                json!({ "type": ["integer", "null"], "format": "uint32", "minimum": 0 }),
                false,
            )],
            candidate: with(
                base(),
                "threshold",
                json!({ "type": ["number", "null"], "format": "double" }),
                false,
            ),
            expect: compatible(),
        },
        // Nested objects.
        Case {
            name: "nested_field_type_change_breaks_backward",
            mode: Backward,
            history: vec![with(
                base(),
                "location",
                json!({ "type": "object", "properties": { "bin": { "type": "string" } } }),
                true,
            )],
            candidate: with(
                base(),
                "location",
                json!({ "type": "object", "properties": { "bin": { "type": "integer" } } }),
                true,
            ),
            expect: breaks("field `location.bin` changed type from string to integer"),
        },
        // $ref'd definitions, enums and anyOf-with-null.
        Case {
            name: "enum_value_added_is_backward_compatible",
            mode: Backward,
            history: vec![with_defs(&reasons, &["street", "city"], true)],
            candidate: with_defs(&more_reasons, &["street", "city"], true),
            expect: compatible(),
        },
        Case {
            name: "enum_value_added_breaks_forward",
            mode: Forward,
            history: vec![with_defs(&reasons, &["street", "city"], true)],
            candidate: with_defs(&more_reasons, &["street", "city"], true),
            expect: breaks("field `changeReason` does not accept the value \"RETURN\""),
        },
        Case {
            name: "enum_value_removed_breaks_backward",
            mode: BackwardTransitive,
            history: vec![with_defs(&more_reasons, &["street", "city"], true)],
            candidate: with_defs(&reasons, &["street", "city"], true),
            expect: breaks_against("field `changeReason` does not accept the value \"RETURN\"", 1),
        },
        Case {
            name: "required_field_added_inside_nullable_ref_breaks_backward",
            mode: Backward,
            history: vec![with_defs(&reasons, &["street", "city"], true)],
            candidate: with_defs(&reasons, &["street", "city", "postalCode"], true),
            expect: breaks("field `address.postalCode` is required by the reader"),
        },
        Case {
            name: "required_field_added_inside_nullable_ref_is_forward_compatible",
            mode: Forward,
            history: vec![with_defs(&reasons, &["street", "city"], true)],
            candidate: with_defs(&reasons, &["street", "city", "postalCode"], true),
            expect: compatible(),
        },
        Case {
            name: "anyof_null_to_plain_ref_breaks_backward",
            mode: Backward,
            history: vec![with_defs(&reasons, &["street"], true)],
            candidate: with_defs(&reasons, &["street"], false),
            expect: breaks("field `address` may be null in the writer's data"),
        },
        Case {
            name: "plain_ref_to_anyof_null_is_backward_compatible",
            mode: Backward,
            history: vec![with_defs(&reasons, &["street"], false)],
            candidate: with_defs(&reasons, &["street"], true),
            expect: compatible(),
        },
        // Nullable via a type array.
        Case {
            name: "type_array_drops_null_breaks_backward",
            mode: Backward,
            history: vec![base()],
            candidate: with(base(), "description", json!({ "type": "string" }), false),
            expect: breaks("field `description` may be null in the writer's data"),
        },
        Case {
            name: "type_array_adds_null_breaks_forward_only",
            mode: Forward,
            history: vec![with(base(), "description", json!({ "type": "string" }), false)],
            candidate: base(),
            expect: breaks("field `description` may be null"),
        },
        // Arrays.
        Case {
            name: "array_item_type_change_breaks_full",
            mode: Full,
            history: vec![with_array(json!({ "type": "string" }), json!({}))],
            candidate: with_array(json!({ "type": "integer" }), json!({})),
            expect: breaks("field `changedFields[]` changed type"),
        },
        Case {
            name: "array_min_items_narrowed_breaks_backward",
            mode: Backward,
            history: vec![with_array(json!({ "type": "string" }), json!({}))],
            candidate: with_array(json!({ "type": "string" }), json!({ "minItems": 1 })),
            expect: breaks("field `changedFields` has a narrower minItems"),
        },
        Case {
            name: "array_max_items_widened_is_backward_compatible",
            mode: Backward,
            history: vec![with_array(json!({ "type": "string" }), json!({ "maxItems": 5 }))],
            candidate: with_array(json!({ "type": "string" }), json!({ "maxItems": 10 })),
            expect: compatible(),
        },
        // additionalProperties: false.
        Case {
            name: "closed_reader_rejects_new_field_forward",
            mode: ForwardTransitive,
            history: vec![closed.clone()],
            candidate: set(optional_warehouse.clone(), "additionalProperties", json!(false)),
            expect: breaks_against(
                "field `warehouseId` is written by the writer but the reader does not allow \
                 additional properties",
                1,
            ),
        },
        Case {
            name: "open_reader_ignores_unknown_field_forward",
            mode: Forward,
            history: vec![base()],
            candidate: set(optional_warehouse, "additionalProperties", json!(false)),
            expect: compatible(),
        },
        Case {
            name: "closed_reader_rejects_open_map_writer",
            mode: Backward,
            history: vec![set(base(), "additionalProperties", json!(true))],
            candidate: closed,
            expect: breaks("the payload may carry additional properties"),
        },
        // Numeric bounds and string formats.
        Case {
            name: "signed_to_unsigned_narrows_minimum_backward",
            mode: Backward,
            history: vec![base()],
            candidate: with(
                base(),
                "quantity",
                json!({ "type": "integer", "format": "uint64", "minimum": 0 }),
                true,
            ),
            expect: breaks("field `quantity` has a narrower minimum"),
        },
        Case {
            name: "format_added_breaks_backward",
            mode: Backward,
            history: vec![with(base(), "sku", json!({ "type": "string" }), true)],
            candidate: with(base(), "sku", json!({ "type": "string", "format": "uuid" }), true),
            expect: breaks("field `sku` requires format `uuid`"),
        },
        Case {
            name: "format_removed_is_backward_compatible",
            mode: Backward,
            history: vec![base()],
            candidate: with(base(), "inventoryItemId", json!({ "type": "string" }), true),
            expect: compatible(),
        },
        // Transitivity: v1 a: string?, v2 no a, v3 a: integer?.
        Case {
            name: "backward_checks_only_the_latest_version",
            mode: Backward,
            history: vec![t1.clone(), t2.clone()],
            candidate: t3.clone(),
            expect: compatible(),
        },
        Case {
            name: "backward_transitive_catches_the_oldest_version",
            mode: BackwardTransitive,
            history: vec![t1.clone(), t2.clone()],
            candidate: t3.clone(),
            expect: breaks_against("field `a` changed type from string to integer", 1),
        },
        Case {
            name: "forward_checks_only_the_latest_version",
            mode: Forward,
            history: vec![t1.clone(), t2.clone()],
            candidate: t3.clone(),
            expect: compatible(),
        },
        Case {
            name: "forward_transitive_catches_the_oldest_version",
            mode: ForwardTransitive,
            history: vec![t1.clone(), t2.clone()],
            candidate: t3.clone(),
            expect: breaks_against("field `a` changed type from integer to string", 1),
        },
        Case {
            name: "full_transitive_catches_the_oldest_version",
            mode: FullTransitive,
            history: vec![t1, t2],
            candidate: t3,
            expect: breaks_against("field `a` changed type", 1),
        },
        // Unions, const, annotations, hand-written definitions, broken references.
        Case {
            name: "oneof_branch_added_breaks_forward",
            mode: Forward,
            history: vec![with(
                base(),
                "source",
                json!({ "oneOf": [{ "type": "string" }, { "type": "integer" }] }),
                true,
            )],
            candidate: with(
                base(),
                "source",
                json!({ "oneOf": [
                    { "type": "string" },
                    { "type": "integer" },
                    { "type": "boolean" }
                ] }),
                true,
            ),
            expect: breaks("field `source` changed type from boolean to integer or string"),
        },
        Case {
            name: "const_writer_read_by_enum_reader",
            mode: Backward,
            history: vec![with(base(), "kind", json!({ "const": "STOCK" }), true)],
            candidate: with(
                base(),
                "kind",
                json!({ "type": "string", "enum": ["STOCK", "TRANSFER"] }),
                true,
            ),
            expect: compatible(),
        },
        Case {
            name: "annotations_are_ignored",
            mode: Full,
            history: vec![base()],
            candidate: set(
                set(set(base(), "title", json!("Renamed")), "description", json!("docs")),
                "examples",
                json!([{ "quantity": 1 }]),
            ),
            expect: compatible(),
        },
        Case {
            name: "draft07_definitions_are_resolved",
            mode: Backward,
            history: vec![json!({
                "type": "object",
                "properties": { "unit": { "$ref": "#/definitions/Unit" } },
                "required": ["unit"],
                "definitions": { "Unit": { "type": "string" } }
            })],
            candidate: json!({
                "type": "object",
                "properties": { "unit": { "$ref": "#/definitions/Unit" } },
                "required": ["unit"],
                "definitions": { "Unit": { "type": "integer" } }
            }),
            expect: breaks("field `unit` changed type from string to integer"),
        },
        Case {
            name: "unresolvable_ref_is_reported",
            mode: Backward,
            history: vec![base()],
            candidate: with(base(), "quantity", json!({ "$ref": "#/$defs/Missing" }), true),
            expect: breaks("field `quantity` has an unusable reader schema: cannot resolve"),
        },
    ]
}
