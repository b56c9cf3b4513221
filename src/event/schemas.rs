//! The committed JSON Schema files (`schemas/{EventType}/v{version}.json`): generated from the
//! payload types by `inventory-outbox schemas --out schemas`, checked for drift by a test, and
//! the contract for producers that write events in other languages.

use crate::event::EventType;

/// Relative path of one schema file.
pub fn schema_path(event_type: EventType, version: u32) -> String {
    format!("{event_type}/v{version}.json")
}

/// Every schema file as (relative path, pretty JSON with a trailing newline).
pub fn schema_files() -> Vec<(String, String)> {
    EventType::ALL
        .into_iter()
        .map(|t| {
            let mut schema = t.json_schema();
            if let Some(obj) = schema.as_object_mut() {
                obj.insert(
                    "$id".to_owned(),
                    format!("urn:inventory-outbox:schema:{t}:{}", t.current_version()).into(),
                );
            }
            let text = serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n";
            (schema_path(t, t.current_version()), text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_schema_files_match_the_payload_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        for (path, generated) in schema_files() {
            let committed = std::fs::read_to_string(dir.join(&path))
                .unwrap_or_else(|e| panic!("schemas/{path}: {e}; run `inventory-outbox schemas --out schemas`"));
            assert_eq!(
                committed, generated,
                "schemas/{path} drifted; run `inventory-outbox schemas --out schemas`"
            );
        }
    }

    #[test]
    fn every_event_type_has_a_schema_naming_its_required_fields() {
        let files = schema_files();
        assert_eq!(files.len(), 15);
        let stock = EventType::StockLevelChanged.json_schema();
        let required: Vec<&str> = stock["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for field in [
            "inventoryItemId",
            "warehouseId",
            "previousQuantity",
            "newQuantity",
            "changeAmount",
            "changeReason",
            "transactionId",
        ] {
            assert!(required.contains(&field), "{field} missing from {required:?}");
        }
    }
}
