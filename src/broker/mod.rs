//! Broker adapters behind one trait, in one shape: built from a configuration
//! ([`AdapterConfig`]), starting from one encode step ([`encode::Encoded`]: the envelope in
//! CloudEvents binary or structured mode) that each maps to its wire form, and classifying its
//! errors into the three classes of [`SendError`]; retries, timeouts and the circuit breaker are
//! one shared layer in the delivery engine, not repeated per broker.
//!
//! A message counts as published only when `send_batch` returns `Ok` for it, which each
//! adapter returns only after the broker's acknowledgement (Kafka acks=all delivery report,
//! RabbitMQ publisher confirm, SNS/SQS successful batch entry). A NACK, a timeout or an
//! error is never "published".

pub mod config;
pub mod confluent;
pub mod encode;
pub mod kafka;
pub mod rabbitmq;
pub mod routing;
pub mod sns_sqs;
pub mod topology;

pub use config::BrokerConfig;

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

/// Why a send failed: the one error taxonomy of every adapter. The relay acts on the class,
/// never on adapter-specific detail: a [`Message`](SendError::Message) error dead-letters that
/// event; a [`Destination`](SendError::Destination) error trips the destination's circuit and
/// retries without counting an attempt against the event (the event did nothing wrong); a
/// [`Transient`](SendError::Transient) error is retried with backoff.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying: broker unreachable, timeout, NACK, throttling, leader change.
    #[error("transient: {0}")]
    Transient(String),
    /// The destination refuses every message for now (unknown topic or exchange, authorization
    /// failure): retry once it recovers; never dead-letter for this.
    #[error("destination: {0}")]
    Destination(String),
    /// This message will fail the same way again (too large, cannot be encoded, fails its
    /// schema): dead-letter it now.
    #[error("message: {0}")]
    Message(String),
}

impl SendError {
    /// True for errors that say something about the destination's health (they feed its
    /// circuit); a message-level error does not.
    pub fn is_retriable(&self) -> bool {
        !matches!(self, SendError::Message(_))
    }

    /// True when the destination, not the event, is at fault.
    pub fn is_destination(&self) -> bool {
        matches!(self, SendError::Destination(_))
    }

    pub fn message(&self) -> &str {
        match self {
            SendError::Transient(m) | SendError::Destination(m) | SendError::Message(m) => m,
        }
    }

    /// Stable label for metrics and logs.
    pub fn class(&self) -> &'static str {
        match self {
            SendError::Transient(_) => "transient",
            SendError::Destination(_) => "destination",
            SendError::Message(_) => "message",
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

/// A batch handed to the broker whose acknowledgements are still to come.
pub struct HandedOver {
    /// Positions (in the call's input) of messages that never reached the broker: they could
    /// not be encoded or queued, and their results are already errors. The relay sends no
    /// later batch behind them before their aggregate's failure is recorded.
    pub refused: Vec<usize>,
    /// One result per message, in input order, once every acknowledgement is in.
    pub acks: BoxFuture<'static, Vec<Result<(), SendError>>>,
}

/// How every adapter is built from its configuration, one shape for the three (as a sink is
/// built from its config): validate the configuration, resolve the credentials it points at
/// (environment variables or mounted files, never inline), create the clients. No adapter
/// connects here; an unreachable broker shows in [`Broker::check_health`] and in sends, so a
/// relay starts (and reports itself unready) during a broker outage.
pub trait AdapterConfig: Send + Sync {
    type Adapter: Broker + 'static;
    /// Names the field or credential at fault.
    type Error: std::error::Error + Send + Sync + 'static;

    fn build(&self) -> BoxFuture<'_, Result<Self::Adapter, Self::Error>>;
}

/// Builds the adapter `config` describes, behind the trait object the engine takes.
pub async fn build_adapter<C: AdapterConfig>(config: &C) -> Result<Arc<dyn Broker>, C::Error> {
    Ok(Arc::new(config.build().await?))
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

    /// Whether one `send_batch` call may carry several events of one aggregate to one
    /// destination. An adapter says yes only when the broker writes one key's messages in call
    /// order and the adapter hands none of them over once an earlier one failed in the same
    /// call (it returns an error for those instead). The relay then sends a whole batch in
    /// one call; otherwise it sends per-aggregate waves, one broker round trip each, so that a
    /// failure is known before the aggregate's next event goes out.
    fn keeps_aggregate_order(&self) -> bool {
        false
    }

    /// Whether a batch handed over with [`Broker::hand_over`] is written before every batch
    /// handed over after it, per key, while its acknowledgements are still outstanding (Kafka:
    /// one idempotent producer queues each partition in order). The relay then hands the next
    /// batch over before the current one is acknowledged, which keeps the broker busy while it
    /// records outcomes and moves the cursor.
    fn orders_across_calls(&self) -> bool {
        false
    }

    /// Hands a batch over and returns once it is queued, with the acknowledgements still to
    /// come (see [`HandedOver`]). Only meaningful with [`Broker::orders_across_calls`]; the
    /// default sends the whole batch, acknowledgements included, before returning.
    fn hand_over<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, HandedOver> {
        Box::pin(async move {
            let results = self.send_batch(messages).await;
            let refused = results
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.is_err().then_some(i))
                .collect();
            HandedOver {
                refused,
                acks: Box::pin(std::future::ready(results)),
            }
        })
    }

    /// A cheap round trip proving the broker is reachable, for readiness.
    fn check_health(&self) -> BoxFuture<'_, Result<(), SendError>>;

    /// The longest one `send_batch` call may take before its own timeouts end it; liveness
    /// allows a call this long (a broker outage is a readiness matter, not a reason to restart).
    fn send_budget(&self) -> std::time::Duration {
        std::time::Duration::from_secs(60)
    }
}
