//! The library API domain services use: the seven operations of the specification's
//! `IInventoryEventPublisher`.
//!
//! - `publish_event` / `publish_events` validate, enrich and append events on the caller's own
//!   connection, so they commit if and only if the caller's transaction commits.
//! - `register_event_handler` adds in-process handlers; [`InventoryEventPublisher::run_handlers`]
//!   delivers stored events to them at least once, recording and retrying failures.
//! - `replay_events`, `get_publisher_status`, `get_failed_events`, `retry_failed_event`
//!   (and `resolve_failed_event`) read and steer the store.

mod handlers;
mod replay;
mod status;

pub use handlers::{EventHandler, HandlerError};
pub use replay::{ReplayOptions, ReplayResult};
pub use status::{PublisherStatus, WorkerStatus};

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::Utc;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::event::validate::{self, Limits, ValidationError};
use crate::event::{DomainEvent, EventType, NewEvent};
use crate::schema::compatibility::CompatibilityMode;
use crate::schema::registry::{RegistryError, SchemaRegistry};
use crate::store::failed::{FailedEvent, FailedEventQuery, FailedEvents, FailedStatus};
use crate::store::{Store, StoreError, events};

/// Errors of the library API. Validation errors name the offending event and field.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("event {index} ({event_type}): {source}")]
    Invalid {
        index: usize,
        event_type: String,
        #[source]
        source: ValidationError,
    },
    #[error("a batch must not contain eventId {0} twice")]
    DuplicateEventId(Uuid),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Delivery(#[from] crate::delivery::EngineError),
    #[error("no failed event {event_id} for consumer {consumer:?} in a state that allows this")]
    FailedEventNotFound { consumer: String, event_id: Uuid },
}

/// Settings of the library publisher.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// `metadata.source` given to events that carry none.
    pub source: String,
    pub limits: Limits,
    /// Consumer name of the in-process handler dispatcher (its cursors and failed events).
    pub handler_consumer: String,
    /// Backoff for failed handler deliveries (the delivery engine's policy, as the relay's).
    pub handler_retry: crate::delivery::retry::RetryPolicy,
    /// How long a handler dispatcher's shard lease lasts without renewal. Replicas of the
    /// service split the shards under these leases, so each event is handled by one of them;
    /// a dead replica's shards move to the others after this.
    pub handler_lease: std::time::Duration,
    /// How often a handler dispatcher renews its leases.
    pub handler_heartbeat: std::time::Duration,
    /// How an idle handler dispatcher learns of new events: woken by the writers' NOTIFY (the
    /// default), or polling every 10 ms, with which writers skip the NOTIFY while every
    /// running worker on the schema polls (see [`WakeUp`](crate::delivery::WakeUp)).
    pub handler_wake_up: crate::delivery::WakeUp,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            source: "inventory-service".to_owned(),
            limits: Limits::default(),
            handler_consumer: "handlers".to_owned(),
            handler_retry: crate::delivery::retry::RetryPolicy::default(),
            handler_lease: std::time::Duration::from_secs(6),
            handler_heartbeat: std::time::Duration::from_secs(1),
            handler_wake_up: crate::delivery::WakeUp::Notify,
        }
    }
}

/// Result of a manual retry of a failed event.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryResult {
    pub event_id: Uuid,
    pub consumer: String,
    pub previous_status: FailedStatus,
    pub previous_attempts: i32,
    /// The event is due for delivery now.
    pub scheduled: bool,
}

/// Registered in-process handlers by event type.
type HandlerMap = Arc<RwLock<HashMap<String, Vec<Arc<dyn EventHandler>>>>>;

/// The inventory event publisher (library side).
#[derive(Clone)]
pub struct InventoryEventPublisher {
    store: Store,
    registry: SchemaRegistry,
    failed: FailedEvents,
    config: PublisherConfig,
    handlers: HandlerMap,
}

impl std::fmt::Debug for InventoryEventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InventoryEventPublisher")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl InventoryEventPublisher {
    /// Applies migrations, registers the built-in schemas and returns a ready publisher.
    pub async fn setup(store: Store, config: PublisherConfig) -> Result<Self, PublishError> {
        store.migrate().await?;
        let registry = SchemaRegistry::new(store.clone());
        registry.register_builtin(CompatibilityMode::Backward).await?;
        Ok(Self::new(store, registry, config))
    }

    /// A publisher over an already migrated store.
    pub fn new(store: Store, registry: SchemaRegistry, config: PublisherConfig) -> Self {
        let failed = FailedEvents::new(store.clone());
        Self {
            store,
            registry,
            failed,
            config,
            handlers: Arc::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn registry(&self) -> &SchemaRegistry {
        &self.registry
    }

    /// Validates, enriches and appends one event inside the caller's transaction.
    pub async fn publish_event(&self, conn: &mut PgConnection, event: NewEvent) -> Result<DomainEvent, PublishError> {
        let mut stored = self.publish_events(conn, vec![event]).await?;
        Ok(stored.remove(0))
    }

    /// Validates and enriches every event first, then appends them with one statement: the
    /// batch is written whole or not at all, and only if the caller's transaction commits.
    pub async fn publish_events(
        &self,
        conn: &mut PgConnection,
        drafts: Vec<NewEvent>,
    ) -> Result<Vec<DomainEvent>, PublishError> {
        let events = self.prepare(drafts).await?;
        events::append(conn, self.store.schema(), &events).await?;
        Ok(events)
    }

    /// Validation and enrichment of a batch, with no I/O but schema lookups.
    pub async fn prepare(&self, drafts: Vec<NewEvent>) -> Result<Vec<DomainEvent>, PublishError> {
        let now = Utc::now();
        let mut seen = std::collections::HashSet::with_capacity(drafts.len());
        let mut events = Vec::with_capacity(drafts.len());
        for (index, draft) in drafts.into_iter().enumerate() {
            let event = validate::enrich(draft, &self.config.source, now);
            let invalid = |source| PublishError::Invalid {
                index,
                event_type: event.event_type.clone(),
                source,
            };
            validate::check_envelope(&event, &self.config.limits, now).map_err(invalid)?;
            let validator = match self.registry.validator(&event.event_type, event.version).await {
                Ok(v) => v,
                Err(RegistryError::UnknownVersion { subject, version }) => {
                    return Err(invalid(ValidationError::UnknownVersion {
                        event_type: subject,
                        version,
                    }));
                }
                Err(e) => return Err(e.into()),
            };
            validate::check_payload(&event, &validator).map_err(invalid)?;
            if !seen.insert(event.event_id) {
                return Err(PublishError::DuplicateEventId(event.event_id));
            }
            events.push(event);
        }
        Ok(events)
    }

    /// Registers an in-process handler for one event type. Handlers run in
    /// [`InventoryEventPublisher::run_handlers`], after the event is durably stored.
    pub fn register_event_handler(&self, event_type: EventType, handler: Arc<dyn EventHandler>) {
        if let Ok(mut handlers) = self.handlers.write() {
            handlers
                .entry(event_type.as_str().to_owned())
                .or_default()
                .push(handler);
        }
    }

    /// Lists failed events (all consumers unless the query names one).
    pub async fn get_failed_events(&self, query: &FailedEventQuery) -> Result<Vec<FailedEvent>, PublishError> {
        Ok(self.failed.list(query).await?)
    }

    /// Schedules an immediate new attempt of a failed or dead-lettered event.
    pub async fn retry_failed_event(&self, consumer: &str, event_id: Uuid) -> Result<RetryResult, PublishError> {
        let previous =
            self.failed
                .retry_now(consumer, event_id)
                .await?
                .ok_or_else(|| PublishError::FailedEventNotFound {
                    consumer: consumer.to_owned(),
                    event_id,
                })?;
        Ok(RetryResult {
            event_id,
            consumer: consumer.to_owned(),
            previous_status: previous.status,
            previous_attempts: previous.attempts,
            scheduled: true,
        })
    }

    /// Discards a failed event with a reason; it will not be delivered to that consumer.
    pub async fn resolve_failed_event(
        &self,
        consumer: &str,
        event_id: Uuid,
        reason: &str,
    ) -> Result<FailedEvent, PublishError> {
        self.failed
            .resolve(consumer, event_id, reason)
            .await?
            .ok_or_else(|| PublishError::FailedEventNotFound {
                consumer: consumer.to_owned(),
                event_id,
            })
    }
}
