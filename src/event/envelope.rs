//! The `DomainEvent` envelope of the specification: identity, aggregate, time, schema version,
//! tracing metadata and an event-specific JSON payload. Serialized as camelCase JSON.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::inventory::InventoryEventPayload;

/// Who caused an event and how it relates to others. Every field is optional on input;
/// enrichment fills `correlation_id` and `source` when they are absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventMetadata {
    /// Traces related operations across services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Id of the event or command that caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// User who initiated the action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Source system that emitted the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// W3C trace context (`traceparent`), carried to the broker as a message header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The ReplayJob (`namespace/name`) re-sending this event; never stored, only carried to
    /// the broker (CloudEvents extension `replayjob`) so consumers can tell a replay from live
    /// traffic.
    #[serde(skip)]
    #[schemars(skip)]
    pub replay_job: Option<String>,
}

impl EventMetadata {
    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One domain event, exactly the envelope of the specification.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainEvent {
    /// Unique id of this event instance (UUIDv7 when generated here).
    pub event_id: Uuid,
    /// Type name, e.g. `StockLevelChanged`.
    pub event_type: String,
    /// Id of the aggregate that emitted the event; the ordering and partitioning key.
    pub aggregate_id: String,
    /// Type of the aggregate, e.g. `InventoryItem`.
    pub aggregate_type: String,
    /// When the event occurred (UTC).
    pub timestamp: DateTime<Utc>,
    /// Version of the event's payload schema.
    pub version: u32,
    /// Tracing and provenance metadata.
    #[serde(default, skip_serializing_if = "EventMetadata::is_empty")]
    pub metadata: EventMetadata,
    /// Event-specific data, validated against the schema of (`event_type`, `version`).
    pub payload: serde_json::Value,
}

/// A builder-style draft: what a domain service hands to the publisher. Missing identity and
/// time are filled in by enrichment, so callers usually give only the payload.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub event_id: Option<Uuid>,
    pub event_type: String,
    pub aggregate_id: String,
    pub aggregate_type: String,
    pub timestamp: Option<DateTime<Utc>>,
    pub version: u32,
    pub metadata: EventMetadata,
    pub payload: serde_json::Value,
}

impl NewEvent {
    /// A draft from one of the typed inventory payloads; type, aggregate and version come from it.
    pub fn from_payload<P: InventoryEventPayload>(payload: &P) -> Result<Self, serde_json::Error> {
        Ok(Self {
            event_id: None,
            event_type: P::EVENT_TYPE.as_str().to_owned(),
            aggregate_id: payload.aggregate_id(),
            aggregate_type: P::EVENT_TYPE.aggregate_type().to_owned(),
            timestamp: None,
            version: P::VERSION,
            metadata: EventMetadata::default(),
            payload: serde_json::to_value(payload)?,
        })
    }

    /// A draft from raw parts, for event types known only at run time.
    pub fn raw(
        event_type: impl Into<String>,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        version: u32,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            event_id: None,
            event_type: event_type.into(),
            aggregate_id: aggregate_id.into(),
            aggregate_type: aggregate_type.into(),
            timestamp: None,
            version,
            metadata: EventMetadata::default(),
            payload,
        }
    }

    pub fn with_event_id(mut self, id: Uuid) -> Self {
        self.event_id = Some(id);
        self
    }

    pub fn with_timestamp(mut self, at: DateTime<Utc>) -> Self {
        self.timestamp = Some(at);
        self
    }

    pub fn with_metadata(mut self, metadata: EventMetadata) -> Self {
        self.metadata = metadata;
        self
    }

    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.metadata.correlation_id = Some(id.into());
        self
    }

    pub fn with_causation_id(mut self, id: impl Into<String>) -> Self {
        self.metadata.causation_id = Some(id.into());
        self
    }

    pub fn with_user_id(mut self, id: impl Into<String>) -> Self {
        self.metadata.user_id = Some(id.into());
        self
    }
}
