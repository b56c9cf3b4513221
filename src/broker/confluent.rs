//! Confluent wire format for Kafka record values: magic byte 0, the 4-byte big-endian schema
//! id, then the JSON payload, so a stock Confluent `JSONDeserializer` (Java, Python, Go, .NET)
//! reads the payload after fetching the schema from the registry API (`schema::api`). The
//! CloudEvents attributes stay in the `ce_` headers of binary mode.
//!
//! The id is the registry's id for exactly the event's type and version: the id of version
//! `event.version` of subject `event.eventType` (RecordNameStrategy). Under the
//! TopicNameStrategy that document is also registered under `{topic}-value`, as a Confluent
//! serializer with `auto.register.schemas` would; ids are global per document, so the id on
//! the wire is the same either way. Ids are cached per (subject, type, version) after the first
//! lookup: a version's document never changes.

use std::collections::HashMap;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use super::{CloudEventsMode, Message, SendError};
use crate::schema::registry::{RegistryError, SchemaRegistry, VersionSelector};

/// The first byte of a framed value.
pub const MAGIC_BYTE: u8 = 0;
/// Magic byte plus schema id.
pub const HEADER_LEN: usize = 5;

/// How Kafka record values are laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireFormat {
    /// `cloudEvents` (the value as `kafka.mode` says) or `confluent` (magic byte 0, the 4-byte
    /// schema id, the JSON payload; CloudEvents attributes as `ce_` headers, so `kafka.mode`
    /// must be `binary`).
    #[serde(default)]
    pub format: ValueFormat,
    /// Subject the schema id is registered under with `confluent`: `recordName` (the event
    /// type, i.e. the schema's `title`) or `topicName` (`{topic}-value`).
    #[serde(default)]
    pub subject_name_strategy: SubjectNameStrategy,
}

/// The layout of a record value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ValueFormat {
    /// CloudEvents binary or structured mode, as `kafka.mode` says.
    #[default]
    CloudEvents,
    /// Confluent framing around the JSON payload.
    Confluent,
}

/// Confluent's subject naming strategies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SubjectNameStrategy {
    /// The subject is the record name: the event type (the JSON Schema's `title`).
    #[default]
    RecordName,
    /// The subject is `{topic}-value`.
    TopicName,
}

impl SubjectNameStrategy {
    /// The subject of an event type's schema on `topic`.
    pub fn subject(self, topic: &str, event_type: &str) -> String {
        match self {
            Self::RecordName => event_type.to_owned(),
            Self::TopicName => format!("{topic}-value"),
        }
    }
}

impl WireFormat {
    /// Whether values are framed.
    pub fn is_confluent(&self) -> bool {
        self.format == ValueFormat::Confluent
    }
}

/// Why a framed value cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnframeError {
    #[error("value of {0} bytes is shorter than the 5-byte Confluent header")]
    TooShort(usize),
    #[error("value starts with byte {0}, not the Confluent magic byte 0")]
    BadMagic(u8),
}

/// Frames a JSON payload with its schema id.
pub fn frame(schema_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(HEADER_LEN + payload.len());
    framed.push(MAGIC_BYTE);
    framed.extend_from_slice(&schema_id.to_be_bytes());
    framed.extend_from_slice(payload);
    framed
}

/// Splits a framed value into its schema id and payload.
pub fn unframe(value: &[u8]) -> Result<(u32, &[u8]), UnframeError> {
    if value.len() < HEADER_LEN {
        return Err(UnframeError::TooShort(value.len()));
    }
    if value[0] != MAGIC_BYTE {
        return Err(UnframeError::BadMagic(value[0]));
    }
    let id = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
    Ok((id, &value[HEADER_LEN..]))
}

/// A Kafka configuration the framing refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FramingConfigError {
    #[error("kafka.wireFormat.format confluent keeps the CloudEvents attributes in headers: kafka.mode must be binary")]
    StructuredMode,
}

/// Schema ids of events, looked up in the registry and cached.
pub struct ConfluentFraming {
    registry: SchemaRegistry,
    strategy: SubjectNameStrategy,
    ids: RwLock<HashMap<(String, String, u32), u32>>,
}

impl std::fmt::Debug for ConfluentFraming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfluentFraming")
            .field("strategy", &self.strategy)
            .finish_non_exhaustive()
    }
}

impl ConfluentFraming {
    /// Framing for a Kafka adapter in `mode` with `wire_format`, reading ids from `registry`.
    pub fn new(
        mode: CloudEventsMode,
        wire_format: WireFormat,
        registry: SchemaRegistry,
    ) -> Result<Self, FramingConfigError> {
        if mode != CloudEventsMode::Binary {
            return Err(FramingConfigError::StructuredMode);
        }
        Ok(Self {
            registry,
            strategy: wire_format.subject_name_strategy,
            ids: RwLock::default(),
        })
    }

    /// The schema id of every message, in input order.
    pub async fn schema_ids(&self, messages: &[Message]) -> Vec<Result<u32, SendError>> {
        let mut out = Vec::with_capacity(messages.len());
        for message in messages {
            out.push(self.schema_id(message).await);
        }
        out
    }

    async fn schema_id(&self, message: &Message) -> Result<u32, SendError> {
        let event = &message.event;
        let subject = self.strategy.subject(&message.destination, &event.event_type);
        let key = (subject, event.event_type.clone(), event.version);
        if let Some(id) = self.ids.read().ok().and_then(|ids| ids.get(&key).copied()) {
            return Ok(id);
        }
        let id = self.look_up(&key.0, &event.event_type, event.version).await?;
        if let Ok(mut ids) = self.ids.write() {
            ids.insert(key, id);
        }
        Ok(id)
    }

    async fn look_up(&self, subject: &str, event_type: &str, version: u32) -> Result<u32, SendError> {
        let missing = || {
            // Retriable: registering the version (e.g. `inventory-outbox migrate`) fixes it.
            SendError::Transient(format!(
                "no schema for subject {event_type:?} version {version} in the registry, so the Confluent \
                 wire format has no schema id for this event"
            ))
        };
        let store_failed = |e: RegistryError| SendError::Transient(format!("schema id lookup failed: {e}"));
        match self.strategy {
            SubjectNameStrategy::RecordName => self
                .registry
                .schema_id(event_type, version)
                .await
                .map_err(store_failed)?
                .ok_or_else(missing),
            SubjectNameStrategy::TopicName => {
                let source = match self
                    .registry
                    .version(event_type, VersionSelector::Number(version), true)
                    .await
                {
                    Ok(source) => source,
                    Err(RegistryError::SubjectNotFound { .. } | RegistryError::UnknownVersion { .. }) => {
                        return Err(missing());
                    }
                    Err(e) => return Err(store_failed(e)),
                };
                match self.registry.register_version(subject, &source.schema, None).await {
                    Ok(registered) => Ok(registered.id),
                    Err(e @ (RegistryError::Incompatible { .. } | RegistryError::InvalidSchema { .. })) => {
                        Err(SendError::Message(format!(
                            "cannot register the schema of {event_type} version {version} under subject {subject:?} \
                             (TopicNameStrategy): {e}; use subjectNameStrategy recordName for topics carrying several \
                             event types"
                        )))
                    }
                    Err(e) => Err(store_failed(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_magic_byte_and_big_endian_id() {
        let framed = frame(0x0102_0304, br#"{"a":1}"#);
        assert_eq!(&framed[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(unframe(&framed), Ok((0x0102_0304, &br#"{"a":1}"#[..])));
        assert_eq!(unframe(&[0, 0, 1]), Err(UnframeError::TooShort(3)));
        assert_eq!(unframe(b"{\"a\":1}"), Err(UnframeError::BadMagic(b'{')));
    }

    #[test]
    fn subjects_follow_the_strategy() {
        assert_eq!(
            SubjectNameStrategy::RecordName.subject("inventory", "StockLevelChanged"),
            "StockLevelChanged"
        );
        assert_eq!(
            SubjectNameStrategy::TopicName.subject("inventory", "StockLevelChanged"),
            "inventory-value"
        );
    }

    #[test]
    fn the_wire_format_document_defaults_to_cloud_events() {
        let default: WireFormat = serde_json::from_value(serde_json::json!({})).expect("empty");
        assert!(!default.is_confluent());
        let confluent: WireFormat = serde_json::from_value(serde_json::json!({
            "format": "confluent", "subjectNameStrategy": "topicName"
        }))
        .expect("confluent");
        assert!(confluent.is_confluent());
        assert_eq!(confluent.subject_name_strategy, SubjectNameStrategy::TopicName);
        assert!(serde_json::from_value::<WireFormat>(serde_json::json!({"format": "avro"})).is_err());
    }
}
