//! Prometheus metrics of one relay worker, all prefixed `outbox_relay_` and labelled with the
//! publisher name; served as OpenMetrics text on `/metrics`.

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Upper bounds (seconds) for commit-to-acknowledgement latency: 1 ms to 30 s.
const COMMIT_TO_ACK_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds for claimed batch sizes: 1 to 5000 events.
const BATCH_SIZE_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

/// Labels of the per-event counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    /// The event type, e.g. `StockLevelChanged`.
    event_type: String,
    /// The broker destination (topic, exchange or SNS topic).
    destination: String,
}

/// Labels of the failure counter: the event labels plus whether the failure is retriable.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    /// The event type.
    event_type: String,
    /// The broker destination.
    destination: String,
    /// `retriable` or `permanent`.
    kind: &'static str,
}

/// Label of the per-destination circuit gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabel {
    /// The broker destination.
    destination: String,
}

/// Labels of the circuit transitions counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    /// The broker destination.
    destination: String,
    /// The state entered: `open`, `half_open` or `closed`.
    to: &'static str,
}

/// Label of the failed-events gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    /// `retrying` or `dead_lettered`.
    status: &'static str,
}

/// The relay's metrics. Every recording method takes `&self` and only touches atomics (plus
/// a read lock on the label family), so the hot loop may call them freely.
#[derive(Debug)]
pub struct DeliveryMetrics {
    /// Holds every metric below, prefixed `outbox_relay` and labelled with the publisher.
    registry: Registry,
    /// `events_published_total`.
    published: Family<EventLabels, Counter>,
    /// `events_failed_total`.
    failed: Family<FailureLabels, Counter>,
    /// `events_retried_total`.
    retried: Family<EventLabels, Counter>,
    /// `events_dead_lettered_total`.
    dead_lettered: Family<EventLabels, Counter>,
    /// `commit_to_ack_seconds`.
    commit_to_ack: Histogram,
    /// `batch_size`.
    batch_size: Histogram,
    /// `pending_events`.
    pending_events: Gauge,
    /// `oldest_pending_age_seconds`.
    oldest_pending_age: Gauge<f64, AtomicU64>,
    /// `circuit_state`.
    circuit_state: Family<DestinationLabel, Gauge>,
    /// `circuit_transitions_total`: the gauge alone misses a half-open phase that closes
    /// between two scrapes, and a circuit that flaps.
    circuit_transitions: Family<TransitionLabels, Counter>,
    /// `failed_events`.
    failed_events: Family<StatusLabel, Gauge>,
    /// `aggregate_order_broken_total`.
    aggregate_order_broken: Counter,
    /// `batches_followed_total`.
    batches_followed: Counter,
}

impl DeliveryMetrics {
    /// Creates the metrics of the relay of `publisher` (a constant `publisher` label).
    pub fn new(publisher: &str) -> Self {
        let labels = [(Cow::Borrowed("publisher"), Cow::Owned(publisher.to_owned()))];
        let mut registry = Registry::with_prefix_and_labels("outbox_relay", labels.into_iter());
        let metrics = Self {
            published: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            commit_to_ack: Histogram::new(COMMIT_TO_ACK_BUCKETS),
            batch_size: Histogram::new(BATCH_SIZE_BUCKETS),
            pending_events: Gauge::default(),
            oldest_pending_age: Gauge::default(),
            circuit_state: Family::default(),
            circuit_transitions: Family::default(),
            failed_events: Family::default(),
            aggregate_order_broken: Counter::default(),
            batches_followed: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events_published",
            "Events acknowledged by the broker",
            metrics.published.clone(),
        );
        registry.register(
            "events_failed",
            "Failed publish attempts, by kind (retriable or permanent)",
            metrics.failed.clone(),
        );
        registry.register(
            "events_retried",
            "Events scheduled for another attempt",
            metrics.retried.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "Events given up on after the retry policy",
            metrics.dead_lettered.clone(),
        );
        registry.register_with_unit(
            "commit_to_ack",
            "Time from the event's commit to the broker's acknowledgement",
            Unit::Seconds,
            metrics.commit_to_ack.clone(),
        );
        registry.register("batch_size", "Events per claimed batch", metrics.batch_size.clone());
        registry.register(
            "pending_events",
            "Committed events not yet published",
            metrics.pending_events.clone(),
        );
        registry.register_with_unit(
            "oldest_pending_age",
            "Age of the oldest unpublished event",
            Unit::Seconds,
            metrics.oldest_pending_age.clone(),
        );
        registry.register(
            "circuit_state",
            "Circuit breaker state per destination (0 closed, 1 half-open, 2 open)",
            metrics.circuit_state.clone(),
        );
        registry.register(
            "circuit_transitions",
            "Circuit breaker state changes per destination, by the state entered",
            metrics.circuit_transitions.clone(),
        );
        registry.register(
            "failed_events",
            "Failed events of this publisher, by status",
            metrics.failed_events.clone(),
        );
        registry.register(
            "aggregate_order_broken",
            "Events the broker acknowledged after an earlier event of their aggregate failed in the same call and still waits (should stay 0)",
            metrics.aggregate_order_broken.clone(),
        );
        registry.register(
            "batches_followed",
            "Batches handed to the broker while the previous batch's acknowledgements were outstanding",
            metrics.batches_followed.clone(),
        );
        Self { registry, ..metrics }
    }

    /// The label set of the per-event counters.
    fn event_labels(event_type: &str, destination: &str) -> EventLabels {
        EventLabels {
            event_type: event_type.to_owned(),
            destination: destination.to_owned(),
        }
    }

    /// Counts `count` events of `event_type` acknowledged by `destination`.
    pub fn published(&self, event_type: &str, destination: &str, count: u64) {
        self.published
            .get_or_create(&Self::event_labels(event_type, destination))
            .inc_by(count);
    }

    /// Counts one failed attempt, retriable or permanent.
    pub fn failed(&self, event_type: &str, destination: &str, retriable: bool) {
        let labels = FailureLabels {
            event_type: event_type.to_owned(),
            destination: destination.to_owned(),
            kind: if retriable { "retriable" } else { "permanent" },
        };
        self.failed.get_or_create(&labels).inc();
    }

    /// Counts one event scheduled for another attempt.
    pub fn retried(&self, event_type: &str, destination: &str) {
        self.retried
            .get_or_create(&Self::event_labels(event_type, destination))
            .inc();
    }

    /// Counts one event acknowledged out of its aggregate's order.
    pub fn aggregate_order_broken(&self) {
        self.aggregate_order_broken.inc();
    }

    /// Counts one batch handed over behind the one still being acknowledged.
    pub fn batch_followed(&self) {
        self.batches_followed.inc();
    }

    /// Counts one dead-lettered event.
    pub fn dead_lettered(&self, event_type: &str, destination: &str) {
        self.dead_lettered
            .get_or_create(&Self::event_labels(event_type, destination))
            .inc();
    }

    /// Records the time from an event's commit to its broker acknowledgement.
    pub fn observe_commit_to_ack(&self, seconds: f64) {
        self.commit_to_ack.observe(seconds);
    }

    /// Records the size of one claimed batch.
    pub fn observe_batch(&self, size: usize) {
        // usize -> f64 loses precision only far beyond any batch size.
        self.batch_size.observe(size as f64);
    }

    /// Sets the backlog: unpublished events and the age of the oldest one.
    pub fn set_backlog(&self, pending_events: i64, oldest_pending_age_seconds: f64) {
        self.pending_events.set(pending_events);
        self.oldest_pending_age.set(oldest_pending_age_seconds);
    }

    /// Sets the circuit state of `destination` (0 closed, 1 half-open, 2 open).
    pub fn set_circuit_state(&self, destination: &str, state_gauge: i64) {
        self.circuit_state
            .get_or_create(&DestinationLabel {
                destination: destination.to_owned(),
            })
            .set(state_gauge);
    }

    /// Counts a state change of `destination`'s circuit into `to` (`open`, `half_open`,
    /// `closed`).
    pub fn record_circuit_transition(&self, destination: &str, to: &'static str) {
        self.circuit_transitions
            .get_or_create(&TransitionLabels {
                destination: destination.to_owned(),
                to,
            })
            .inc();
    }

    /// Sets the number of retrying and dead-lettered events.
    pub fn set_failed_events(&self, retrying: i64, dead_lettered: i64) {
        self.failed_events
            .get_or_create(&StatusLabel { status: "retrying" })
            .set(retrying);
        self.failed_events
            .get_or_create(&StatusLabel {
                status: "dead_lettered",
            })
            .set(dead_lettered);
    }

    /// Encodes every metric in the OpenMetrics text format (ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; a metric that fails to encode leaves a partial body.
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(%error, "encode relay metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recorded_metric_appears_in_the_openmetrics_text() {
        let metrics = DeliveryMetrics::new("orders");
        metrics.published("StockLevelChanged", "inventory.stock", 3);
        metrics.failed("StockLevelChanged", "inventory.stock", true);
        metrics.failed("StockLevelChanged", "inventory.stock", false);
        metrics.retried("StockLevelChanged", "inventory.stock");
        metrics.dead_lettered("StockLevelChanged", "inventory.stock");
        metrics.observe_commit_to_ack(0.02);
        metrics.observe_batch(100);
        metrics.set_backlog(42, 1.5);
        metrics.set_circuit_state("inventory.stock", 2);
        metrics.record_circuit_transition("inventory.stock", "open");
        metrics.record_circuit_transition("inventory.stock", "half_open");
        metrics.record_circuit_transition("inventory.stock", "open");
        metrics.set_failed_events(4, 7);
        let text = metrics.encode();
        let labels = r#"publisher="orders",event_type="StockLevelChanged",destination="inventory.stock""#;
        for line in [
            format!("outbox_relay_events_published_total{{{labels}}} 3"),
            r#"outbox_relay_events_failed_total{publisher="orders",event_type="StockLevelChanged",destination="inventory.stock",kind="retriable"} 1"#.to_owned(),
            r#"outbox_relay_events_failed_total{publisher="orders",event_type="StockLevelChanged",destination="inventory.stock",kind="permanent"} 1"#.to_owned(),
            format!("outbox_relay_events_retried_total{{{labels}}} 1"),
            format!("outbox_relay_events_dead_lettered_total{{{labels}}} 1"),
            r#"outbox_relay_commit_to_ack_seconds_bucket{publisher="orders",le="0.025"} 1"#.to_owned(),
            r#"outbox_relay_commit_to_ack_seconds_bucket{publisher="orders",le="0.01"} 0"#.to_owned(),
            r#"outbox_relay_commit_to_ack_seconds_count{publisher="orders"} 1"#.to_owned(),
            r#"outbox_relay_batch_size_bucket{publisher="orders",le="100.0"} 1"#.to_owned(),
            r#"outbox_relay_batch_size_bucket{publisher="orders",le="5000.0"} 1"#.to_owned(),
            r#"outbox_relay_batch_size_sum{publisher="orders"} 100.0"#.to_owned(),
            r#"outbox_relay_pending_events{publisher="orders"} 42"#.to_owned(),
            r#"outbox_relay_oldest_pending_age_seconds{publisher="orders"} 1.5"#.to_owned(),
            r#"outbox_relay_circuit_state{publisher="orders",destination="inventory.stock"} 2"#.to_owned(),
            r#"outbox_relay_circuit_transitions_total{publisher="orders",destination="inventory.stock",to="open"} 2"#.to_owned(),
            r#"outbox_relay_circuit_transitions_total{publisher="orders",destination="inventory.stock",to="half_open"} 1"#.to_owned(),
            r#"outbox_relay_failed_events{publisher="orders",status="retrying"} 4"#.to_owned(),
            r#"outbox_relay_failed_events{publisher="orders",status="dead_lettered"} 7"#.to_owned(),
            "# TYPE outbox_relay_commit_to_ack_seconds histogram".to_owned(),
            "# UNIT outbox_relay_commit_to_ack_seconds seconds".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
