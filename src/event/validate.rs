//! Validation and enrichment of events before they reach the store. Every rule names the
//! field it checks; nothing is written when any event of a batch fails.

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::{DomainEvent, EventType, NewEvent};

/// Limits applied to every event.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Largest serialized payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Longest id or type name (eventType, aggregateId, aggregateType, metadata ids), in bytes.
    pub max_id_bytes: usize,
    /// How far in the future an event's timestamp may lie (clock skew allowance).
    pub max_future_skew: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 256 * 1024,
            max_id_bytes: 256,
            max_future_skew: Duration::minutes(5),
        }
    }
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes long; the limit is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} contains control characters")]
    ControlCharacters { field: &'static str },
    #[error("eventType {0:?} is not a known event type")]
    UnknownEventType(String),
    #[error("aggregateType for {event_type} must be {expected:?}, got {actual:?}")]
    WrongAggregateType {
        event_type: String,
        expected: &'static str,
        actual: String,
    },
    #[error("version {version} of {event_type} is not registered in the schema registry")]
    UnknownVersion { event_type: String, version: u32 },
    #[error("version must be at least 1")]
    ZeroVersion,
    #[error("timestamp {timestamp} is more than {max_skew_seconds}s in the future")]
    FutureTimestamp {
        timestamp: DateTime<Utc>,
        max_skew_seconds: i64,
    },
    #[error("payload is {len} bytes; the limit is {max}")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("payload must be a JSON object")]
    PayloadNotObject,
    #[error("payload does not match schema {event_type} v{version}: {details}")]
    SchemaMismatch {
        event_type: String,
        version: u32,
        details: String,
    },
}

/// Fills what a producer may leave out: eventId (UUIDv7), timestamp, source and correlationId.
pub fn enrich(draft: NewEvent, default_source: &str, now: DateTime<Utc>) -> DomainEvent {
    let event_id = draft.event_id.unwrap_or_else(Uuid::now_v7);
    let mut metadata = draft.metadata;
    if metadata.source.is_none() && !default_source.is_empty() {
        metadata.source = Some(default_source.to_owned());
    }
    if metadata.correlation_id.is_none() {
        // A new causal chain starts here: correlate by the event's own id.
        metadata.correlation_id = Some(event_id.to_string());
    }
    DomainEvent {
        event_id,
        event_type: draft.event_type,
        aggregate_id: draft.aggregate_id,
        aggregate_type: draft.aggregate_type,
        timestamp: draft.timestamp.unwrap_or(now),
        version: draft.version,
        metadata,
        payload: draft.payload,
    }
}

fn check_id(field: &'static str, value: &str, limits: &Limits) -> Result<(), ValidationError> {
    if value.trim().is_empty() {
        return Err(ValidationError::Empty { field });
    }
    check_optional_id(field, value, limits)
}

fn check_optional_id(field: &'static str, value: &str, limits: &Limits) -> Result<(), ValidationError> {
    if value.len() > limits.max_id_bytes {
        return Err(ValidationError::TooLong {
            field,
            len: value.len(),
            max: limits.max_id_bytes,
        });
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError::ControlCharacters { field });
    }
    Ok(())
}

/// Structural checks that need no schema: ids, type, aggregate, version, time and size.
pub fn check_envelope(event: &DomainEvent, limits: &Limits, now: DateTime<Utc>) -> Result<(), ValidationError> {
    check_id("eventType", &event.event_type, limits)?;
    check_id("aggregateType", &event.aggregate_type, limits)?;
    check_id("aggregateId", &event.aggregate_id, limits)?;
    let metadata = [
        ("metadata.correlationId", &event.metadata.correlation_id),
        ("metadata.causationId", &event.metadata.causation_id),
        ("metadata.userId", &event.metadata.user_id),
        ("metadata.source", &event.metadata.source),
        ("metadata.traceparent", &event.metadata.traceparent),
    ];
    for (field, value) in metadata {
        if let Some(value) = value {
            check_optional_id(field, value, limits)?;
        }
    }
    let event_type: EventType = event
        .event_type
        .parse()
        .map_err(|_| ValidationError::UnknownEventType(event.event_type.clone()))?;
    if event.aggregate_type != event_type.aggregate_type() {
        return Err(ValidationError::WrongAggregateType {
            event_type: event.event_type.clone(),
            expected: event_type.aggregate_type(),
            actual: event.aggregate_type.clone(),
        });
    }
    if event.version == 0 {
        return Err(ValidationError::ZeroVersion);
    }
    if event.timestamp > now + limits.max_future_skew {
        return Err(ValidationError::FutureTimestamp {
            timestamp: event.timestamp,
            max_skew_seconds: limits.max_future_skew.num_seconds(),
        });
    }
    if !event.payload.is_object() {
        return Err(ValidationError::PayloadNotObject);
    }
    let len = event.payload.to_string().len();
    if len > limits.max_payload_bytes {
        return Err(ValidationError::PayloadTooLarge {
            len,
            max: limits.max_payload_bytes,
        });
    }
    Ok(())
}

/// Checks the payload against the compiled schema of its (type, version).
pub fn check_payload(event: &DomainEvent, validator: &jsonschema::Validator) -> Result<(), ValidationError> {
    let details: Vec<String> = validator
        .iter_errors(&event.payload)
        .take(5)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("{at}: {e}")
            }
        })
        .collect();
    if details.is_empty() {
        Ok(())
    } else {
        Err(ValidationError::SchemaMismatch {
            event_type: event.event_type.clone(),
            version: event.version,
            details: details.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::inventory::{StockChangeReason, StockLevelChanged};

    fn stock_event() -> DomainEvent {
        let payload = StockLevelChanged {
            inventory_item_id: Uuid::now_v7(),
            warehouse_id: Uuid::now_v7(),
            previous_quantity: 5,
            new_quantity: 8,
            change_amount: 3,
            change_reason: StockChangeReason::Receipt,
            transaction_id: Uuid::now_v7(),
        };
        enrich(NewEvent::from_payload(&payload).unwrap(), "tests", Utc::now())
    }

    fn schema_validator() -> jsonschema::Validator {
        jsonschema::draft202012::new(&EventType::StockLevelChanged.json_schema()).unwrap()
    }

    fn refused(event: &DomainEvent) -> String {
        check_envelope(event, &Limits::default(), Utc::now())
            .and_then(|()| check_payload(event, &schema_validator()))
            .expect_err("event must be refused")
            .to_string()
    }

    #[test]
    fn enrichment_fills_identity_time_source_and_correlation() {
        let e = stock_event();
        assert_eq!(e.event_id.get_version_num(), 7);
        assert_eq!(e.metadata.source.as_deref(), Some("tests"));
        assert_eq!(e.metadata.correlation_id, Some(e.event_id.to_string()));
        assert!(Utc::now() - e.timestamp < Duration::seconds(5));
        assert_eq!(e.aggregate_type, "InventoryItem");
    }

    #[test]
    fn a_valid_event_passes() {
        let e = stock_event();
        check_envelope(&e, &Limits::default(), Utc::now()).unwrap();
        check_payload(&e, &schema_validator()).unwrap();
    }

    type Case = (&'static str, Box<dyn Fn(&mut DomainEvent)>, &'static str);

    #[test]
    fn every_rule_names_what_is_wrong() {
        let cases: Vec<Case> = vec![
            (
                "unknown type",
                Box::new(|e| e.event_type = "StockTeleported".into()),
                "eventType \"StockTeleported\" is not a known event type",
            ),
            (
                "empty aggregate id",
                Box::new(|e| e.aggregate_id = " ".into()),
                "aggregateId is empty",
            ),
            (
                "empty type",
                Box::new(|e| e.event_type = String::new()),
                "eventType is empty",
            ),
            (
                "oversized aggregate id",
                Box::new(|e| e.aggregate_id = "x".repeat(300)),
                "aggregateId is 300 bytes long; the limit is 256",
            ),
            (
                "control characters",
                Box::new(|e| e.aggregate_id = "a\nb".into()),
                "aggregateId contains control characters",
            ),
            (
                "oversized correlation id",
                Box::new(|e| e.metadata.correlation_id = Some("c".repeat(257))),
                "metadata.correlationId is 257 bytes long",
            ),
            (
                "wrong aggregate",
                Box::new(|e| e.aggregate_type = "Warehouse".into()),
                "aggregateType for StockLevelChanged must be \"InventoryItem\"",
            ),
            (
                "zero version",
                Box::new(|e| e.version = 0),
                "version must be at least 1",
            ),
            (
                "future timestamp",
                Box::new(|e| e.timestamp = Utc::now() + Duration::hours(1)),
                "in the future",
            ),
            (
                "payload not object",
                Box::new(|e| e.payload = serde_json::json!([1, 2])),
                "payload must be a JSON object",
            ),
            (
                "payload too large",
                Box::new(|e| e.payload["changeReason"] = "x".repeat(300_000).into()),
                "payload is 3",
            ),
            (
                "missing field",
                Box::new(|e| {
                    e.payload.as_object_mut().unwrap().remove("newQuantity");
                }),
                "\"newQuantity\" is a required property",
            ),
            (
                "wrong field type",
                Box::new(|e| e.payload["newQuantity"] = "eight".into()),
                "/newQuantity",
            ),
            (
                "bad enum value",
                Box::new(|e| e.payload["changeReason"] = "THEFT".into()),
                "/changeReason",
            ),
        ];
        for (name, mutate, expected) in cases {
            let mut e = stock_event();
            mutate(&mut e);
            let message = refused(&e);
            assert!(
                message.contains(expected),
                "{name}: {message:?} should contain {expected:?}"
            );
        }
    }
}
