//! CloudEvents 1.0 mapping of the envelope, in binary mode (context attributes as message
//! headers, the payload as the body) and structured mode (one JSON document).
//!
//! | CloudEvents | envelope |
//! | --- | --- |
//! | `id` | `eventId` |
//! | `source` | `metadata.source` (`inventory-outbox` when absent) |
//! | `type` | `eventType` |
//! | `subject` | `aggregateId` |
//! | `time` | `timestamp` (RFC 3339, UTC) |
//! | `dataschema` | `urn:inventory-outbox:schema:{eventType}:{version}` |
//! | `datacontenttype` | `application/json` |
//! | extension `partitionkey` | `aggregateId` |
//! | extensions `aggregatetype`, `eventversion` | `aggregateType`, `version` |
//! | extensions `correlationid`, `causationid`, `userid` | the seed's metadata |
//! | extension `traceparent` | W3C trace context (distributed tracing extension) |
//! | extension `replayjob` | the ReplayJob re-sending the event (absent on live traffic) |

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

use super::{DomainEvent, EventMetadata};

pub const SPEC_VERSION: &str = "1.0";
pub const CONTENT_TYPE: &str = "application/json";
/// Content type of a structured-mode CloudEvent (the JSON event format).
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
const DEFAULT_SOURCE: &str = "inventory-outbox";
const SCHEMA_URN: &str = "urn:inventory-outbox:schema:";

/// Header prefix of the Kafka protocol binding (`ce_id`, …).
pub const KAFKA_PREFIX: &str = "ce_";
/// Application-property prefix of the AMQP protocol binding (`cloudEvents:id`, …).
pub const AMQP_PREFIX: &str = "cloudEvents:";

/// Why a message could not be read back as an event.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CloudEventError {
    #[error("CloudEvent lacks required attribute {0:?}")]
    Missing(&'static str),
    #[error("CloudEvent attribute {attribute:?} is invalid: {reason}")]
    Invalid { attribute: &'static str, reason: String },
    #[error("CloudEvent data is not JSON: {0}")]
    Data(String),
}

/// Context attributes and extensions of an event, without its data, in a stable order.
pub fn attributes(event: &DomainEvent) -> Vec<(&'static str, String)> {
    let m = &event.metadata;
    let mut attrs = vec![
        ("specversion", SPEC_VERSION.to_owned()),
        ("id", event.event_id.to_string()),
        ("source", m.source.clone().unwrap_or_else(|| DEFAULT_SOURCE.to_owned())),
        ("type", event.event_type.clone()),
        ("subject", event.aggregate_id.clone()),
        ("time", event.timestamp.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        ("datacontenttype", CONTENT_TYPE.to_owned()),
        (
            "dataschema",
            format!("{SCHEMA_URN}{}:{}", event.event_type, event.version),
        ),
        ("partitionkey", event.aggregate_id.clone()),
        ("aggregatetype", event.aggregate_type.clone()),
        ("eventversion", event.version.to_string()),
    ];
    let optional = [
        ("correlationid", &m.correlation_id),
        ("causationid", &m.causation_id),
        ("userid", &m.user_id),
        ("traceparent", &m.traceparent),
        ("replayjob", &m.replay_job),
    ];
    attrs.extend(optional.into_iter().filter_map(|(k, v)| v.clone().map(|v| (k, v))));
    attrs
}

/// Structured mode: one JSON document with the attributes and `data`.
pub fn to_structured(event: &DomainEvent) -> Value {
    let mut doc: Map<String, Value> = attributes(event)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v)))
        .collect();
    doc.insert("data".to_owned(), event.payload.clone());
    Value::Object(doc)
}

/// Binary mode headers with a binding's prefix; `datacontenttype` becomes `content-type`
/// as the Kafka and AMQP bindings require. The body is the JSON payload.
pub fn binary_headers(event: &DomainEvent, prefix: &str) -> Vec<(String, String)> {
    attributes(event)
        .into_iter()
        .map(|(k, v)| {
            if k == "datacontenttype" {
                ("content-type".to_owned(), v)
            } else {
                (format!("{prefix}{k}"), v)
            }
        })
        .collect()
}

/// Reads a structured-mode document back into the envelope.
pub fn from_structured(doc: &Value) -> Result<DomainEvent, CloudEventError> {
    let attr = |name: &'static str| doc.get(name).and_then(Value::as_str).map(str::to_owned);
    let data = doc.get("data").cloned().ok_or(CloudEventError::Missing("data"))?;
    from_parts(attr, data)
}

/// Reads binary-mode headers and body back into the envelope.
pub fn from_binary(headers: &[(String, String)], body: &[u8], prefix: &str) -> Result<DomainEvent, CloudEventError> {
    let attr = |name: &'static str| {
        let key = format!("{prefix}{name}");
        headers.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
    };
    let data = serde_json::from_slice(body).map_err(|e| CloudEventError::Data(e.to_string()))?;
    from_parts(attr, data)
}

fn from_parts(attr: impl Fn(&'static str) -> Option<String>, data: Value) -> Result<DomainEvent, CloudEventError> {
    let required = |name: &'static str| attr(name).ok_or(CloudEventError::Missing(name));
    let invalid = |attribute: &'static str| move |e: String| CloudEventError::Invalid { attribute, reason: e };
    let spec = required("specversion")?;
    if spec != SPEC_VERSION {
        return Err(invalid("specversion")(format!("expected {SPEC_VERSION}, got {spec}")));
    }
    let event_id = required("id")?
        .parse()
        .map_err(|e: uuid::Error| invalid("id")(e.to_string()))?;
    let timestamp: DateTime<Utc> = DateTime::parse_from_rfc3339(&required("time")?)
        .map_err(|e| invalid("time")(e.to_string()))?
        .with_timezone(&Utc);
    let version = required("eventversion")?
        .parse()
        .map_err(|e: std::num::ParseIntError| invalid("eventversion")(e.to_string()))?;
    Ok(DomainEvent {
        event_id,
        event_type: required("type")?,
        aggregate_id: required("subject")?,
        aggregate_type: required("aggregatetype")?,
        timestamp,
        version,
        metadata: EventMetadata {
            correlation_id: attr("correlationid"),
            causation_id: attr("causationid"),
            user_id: attr("userid"),
            source: attr("source").filter(|s| s != DEFAULT_SOURCE),
            traceparent: attr("traceparent"),
            replay_job: attr("replayjob"),
        },
        payload: data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;
    use crate::event::validate::enrich;

    fn event() -> DomainEvent {
        let draft = NewEvent::raw(
            "StockLevelChanged",
            "InventoryItem",
            "item-7",
            1,
            serde_json::json!({"newQuantity": 3}),
        )
        .with_user_id("u-1")
        .with_causation_id("cmd-9");
        let mut e = enrich(draft, "warehouse-svc", Utc::now());
        e.metadata.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        e
    }

    #[test]
    fn structured_mode_round_trips_and_carries_the_partition_key() {
        let e = event();
        let doc = to_structured(&e);
        assert_eq!(doc["specversion"], "1.0");
        assert_eq!(doc["id"], e.event_id.to_string());
        assert_eq!(doc["type"], "StockLevelChanged");
        assert_eq!(doc["partitionkey"], "item-7");
        assert_eq!(doc["dataschema"], "urn:inventory-outbox:schema:StockLevelChanged:1");
        assert_eq!(doc["data"]["newQuantity"], 3);
        assert_eq!(from_structured(&doc).unwrap(), e);
    }

    #[test]
    fn binary_mode_round_trips_with_each_binding_prefix() {
        let e = event();
        for prefix in [KAFKA_PREFIX, AMQP_PREFIX] {
            let headers = binary_headers(&e, prefix);
            assert!(headers.contains(&("content-type".to_owned(), CONTENT_TYPE.to_owned())));
            assert!(headers.contains(&(format!("{prefix}correlationid"), e.event_id.to_string())));
            let body = serde_json::to_vec(&e.payload).unwrap();
            assert_eq!(from_binary(&headers, &body, prefix).unwrap(), e);
        }
    }

    #[test]
    fn reading_back_names_the_missing_or_bad_attribute() {
        let mut doc = to_structured(&event());
        doc.as_object_mut().unwrap().remove("subject");
        assert_eq!(from_structured(&doc).unwrap_err(), CloudEventError::Missing("subject"));
        let mut doc = to_structured(&event());
        doc["time"] = "yesterday".into();
        assert!(
            from_structured(&doc)
                .unwrap_err()
                .to_string()
                .contains("\"time\" is invalid")
        );
    }
}
