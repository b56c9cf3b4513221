//! Broker adapters behind one trait. Each adapter owns its configuration, its encoding of the
//! envelope (CloudEvents binary or structured mode, see `event::cloudevents`) and a small
//! classification of its errors into retriable and permanent; retries, timeouts and the
//! circuit breaker are one shared layer in the relay, not repeated per broker.
//!
//! A message counts as published only when `send_batch` returns `Ok` for it, which each
//! adapter returns only after the broker's acknowledgement (Kafka acks=all delivery report,
//! RabbitMQ publisher confirm, SNS/SQS successful batch entry). A NACK, a timeout or an
//! error is never "published".

pub mod confluent;
pub mod kafka;
pub mod rabbitmq;
pub mod routing;
pub mod sns_sqs;
pub mod topology;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::DomainEvent;

/// A boxed future, so the trait stays object safe (`Arc<dyn Broker>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One event on its way to a destination.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Global position in the event store (for logs and metrics).
    pub position: i64,
    /// Topic, routing key or SNS topic / SQS queue name, from the publisher's routing.
    pub destination: String,
    pub event: Arc<DomainEvent>,
}

/// Why a send failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying: broker unreachable, timeout, NACK, throttling, leader change.
    #[error("retriable: {0}")]
    Retriable(String),
    /// Will fail the same way again (message too large, destination refuses it): dead-letter now.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl SendError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, SendError::Retriable(_))
    }

    pub fn message(&self) -> &str {
        match self {
            SendError::Retriable(m) | SendError::Permanent(m) => m,
        }
    }
}

/// How the envelope is put on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CloudEventsMode {
    /// Attributes as headers, the JSON payload as the body.
    #[default]
    Binary,
    /// One JSON document holding attributes and data.
    Structured,
}

/// A message broker the relay publishes to.
pub trait Broker: Send + Sync {
    /// Short name for logs and metrics (`kafka`, `rabbitmq`, `sns`, `sqs`).
    fn kind(&self) -> &'static str;

    /// Sends a batch and waits for every acknowledgement. Returns one result per message, in
    /// input order. Messages of one aggregate within a batch must reach the broker in order.
    fn send_batch<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Vec<Result<(), SendError>>>;

    /// Sends a message that exhausted its retries to the dead-letter destination, with the
    /// reason attached (header / attribute `x-dead-letter-reason`).
    fn send_dead_letter<'a>(&'a self, message: &'a Message, reason: &'a str) -> BoxFuture<'a, Result<(), SendError>>;

    /// Creates the given destinations and the dead-letter destination when missing (idempotent).
    fn ensure_destinations<'a>(&'a self, destinations: &'a [String]) -> BoxFuture<'a, Result<(), SendError>>;

    /// A cheap round trip proving the broker is reachable, for readiness.
    fn check_health(&self) -> BoxFuture<'_, Result<(), SendError>>;
}
