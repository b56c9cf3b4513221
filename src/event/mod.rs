//! The event model: the `DomainEvent` envelope, the fifteen typed inventory payloads and
//! their JSON Schemas.

pub mod cloudevents;
pub mod envelope;
pub mod inventory;
pub mod schemas;
pub mod validate;

pub use envelope::{DomainEvent, EventMetadata, NewEvent};
pub use inventory::{EventType, InventoryEventPayload};
