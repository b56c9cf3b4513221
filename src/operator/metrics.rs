//! Operator metrics, one registry prefixed `outbox_operator`: reconciliations and errors by
//! object kind, reconcile durations, the reconcile queue, leadership, and each publisher's relay
//! workers. The names are the ones the chart's alerts and dashboard query
//! (charts/inventory-outbox/files/).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The object kind a reconciliation was for (`EventPublisher`, `ReplayJob`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// A failed reconciliation: the object kind and the error's stable label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
    error: &'static str,
}

/// One publisher's relay workers, `state` being `ready` or `desired`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    namespace: String,
    publisher: String,
    state: &'static str,
}

/// The kind label of EventPublisher reconciliations.
pub const EVENT_PUBLISHER: &str = "EventPublisher";

/// Every operator metric.
#[derive(Debug)]
pub struct OperatorMetrics {
    registry: Registry,
    reconciliations: Family<KindLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<KindLabel, Histogram, fn() -> Histogram>,
    leader: Gauge,
    workers: Family<WorkerLabels, Gauge>,
    queue_depth: Family<KindLabel, Gauge>,
    in_flight: Family<KindLabel, Gauge>,
    /// When each object's next reconcile is due: now for a watch trigger, later for a requeue.
    /// The queue depth is read from it at scrape time (how many are due and not started), as
    /// the controller's own scheduler does not expose its length.
    schedule: Mutex<HashMap<ObjectKey, Instant>>,
}

/// An object a reconcile is scheduled for: kind, namespace, name.
type ObjectKey = (&'static str, String, String);

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
}

impl OperatorMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outbox_operator");
        let metrics = Self {
            reconciliations: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            leader: Gauge::default(),
            workers: Family::default(),
            queue_depth: Family::default(),
            in_flight: Family::default(),
            schedule: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reconciliations",
            "Reconciliations started, by object kind",
            metrics.reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations by object kind and error",
            metrics.errors.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time of one reconciliation, by object kind",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the lease",
            metrics.leader.clone(),
        );
        registry.register(
            "publisher_workers",
            "Relay workers of each EventPublisher: state ready or desired",
            metrics.workers.clone(),
        );
        registry.register(
            "reconcile_queue_depth",
            "Objects whose reconcile is due (triggered by a change or a requeue) and not yet started, by kind",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "reconciles_in_flight",
            "Reconciliations running now, by object kind",
            metrics.in_flight.clone(),
        );
        Self { registry, ..metrics }
    }

    /// Counts a reconciliation of `kind` and records its duration when the guard drops.
    pub fn reconcile_started(&self, kind: &'static str) -> DurationGuard {
        self.reconciliations.get_or_create(&KindLabel { kind }).inc();
        let in_flight = self.in_flight.get_or_create(&KindLabel { kind }).clone();
        in_flight.inc();
        DurationGuard {
            histogram: self.duration.get_or_create(&KindLabel { kind }).clone(),
            in_flight,
            started: Instant::now(),
        }
    }

    /// A watch event asked for a reconcile of this object.
    pub fn triggered(&self, kind: &'static str, namespace: &str, name: &str) {
        self.schedule_at(kind, namespace, name, Instant::now());
    }

    /// A reconcile of this object ended asking to run again after `after`.
    pub fn requeued(&self, kind: &'static str, namespace: &str, name: &str, after: Duration) {
        self.schedule_at(kind, namespace, name, Instant::now() + after);
    }

    /// A reconcile of this object started: it leaves the queue.
    pub fn dequeued(&self, kind: &'static str, namespace: &str, name: &str) {
        if let Ok(mut schedule) = self.schedule.lock() {
            schedule.remove(&(kind, namespace.to_owned(), name.to_owned()));
        }
    }

    fn schedule_at(&self, kind: &'static str, namespace: &str, name: &str, at: Instant) {
        if let Ok(mut schedule) = self.schedule.lock() {
            // The earliest wins, as in the controller's scheduler: a change during a requeue
            // wait runs the reconcile now.
            let due = schedule
                .entry((kind, namespace.to_owned(), name.to_owned()))
                .or_insert(at);
            *due = (*due).min(at);
        }
    }

    /// Objects of `kind` due now and not started.
    pub fn queue_depth(&self, kind: &'static str) -> i64 {
        let now = Instant::now();
        self.schedule.lock().map_or(0, |schedule| {
            let due = schedule
                .iter()
                .filter(|((k, _, _), at)| *k == kind && **at <= now)
                .count();
            i64::try_from(due).unwrap_or(i64::MAX)
        })
    }

    pub fn failed(&self, kind: &'static str, error: &'static str) {
        self.errors.get_or_create(&ErrorLabels { kind, error }).inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Records the ready and desired relay workers of one publisher.
    pub fn set_workers(&self, namespace: &str, publisher: &str, ready: i64, desired: i64) {
        for (state, value) in [("ready", ready), ("desired", desired)] {
            self.workers
                .get_or_create(&WorkerLabels {
                    namespace: namespace.to_owned(),
                    publisher: publisher.to_owned(),
                    state,
                })
                .set(value);
        }
    }

    /// Drops a deleted publisher's series, so alerts do not fire on what is gone.
    pub fn forget_publisher(&self, namespace: &str, publisher: &str) {
        self.dequeued(EVENT_PUBLISHER, namespace, publisher);
        for state in ["ready", "desired"] {
            self.workers.remove(&WorkerLabels {
                namespace: namespace.to_owned(),
                publisher: publisher.to_owned(),
                state,
            });
        }
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        // Only the EventPublisher controller feeds the schedule so far.
        self.queue_depth
            .get_or_create(&KindLabel { kind: EVENT_PUBLISHER })
            .set(self.queue_depth(EVENT_PUBLISHER));
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(%error, "encode operator metrics");
        }
        out
    }
}

/// Records the reconciliation's duration on drop, whichever way it ended.
pub struct DurationGuard {
    histogram: Histogram,
    in_flight: Gauge,
    started: Instant,
}

impl Drop for DurationGuard {
    fn drop(&mut self) {
        self.in_flight.dec();
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_the_chart_queries_are_exported() {
        let m = OperatorMetrics::new();
        drop(m.reconcile_started(EVENT_PUBLISHER));
        m.failed(EVENT_PUBLISHER, "apply");
        m.set_leader(true);
        m.set_workers("shop", "orders", 1, 2);
        let text = m.encode();
        for line in [
            r#"outbox_operator_reconciliations_total{kind="EventPublisher"} 1"#,
            r#"outbox_operator_reconcile_errors_total{kind="EventPublisher",error="apply"} 1"#,
            r#"outbox_operator_reconcile_duration_seconds_count{kind="EventPublisher"} 1"#,
            "outbox_operator_leader 1",
            r#"outbox_operator_publisher_workers{namespace="shop",publisher="orders",state="ready"} 1"#,
            r#"outbox_operator_publisher_workers{namespace="shop",publisher="orders",state="desired"} 2"#,
            r#"outbox_operator_reconcile_queue_depth{kind="EventPublisher"} 0"#,
            r#"outbox_operator_reconciles_in_flight{kind="EventPublisher"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        m.forget_publisher("shop", "orders");
        assert!(!m.encode().contains("publisher_workers{"), "{}", m.encode());
    }

    #[test]
    fn the_queue_counts_objects_due_and_not_started_once_each() {
        let m = OperatorMetrics::new();
        let depth = |m: &OperatorMetrics| m.queue_depth(EVENT_PUBLISHER);
        m.triggered(EVENT_PUBLISHER, "shop", "a");
        m.triggered(EVENT_PUBLISHER, "shop", "a");
        m.triggered(EVENT_PUBLISHER, "shop", "b");
        m.triggered("ReplayJob", "shop", "a");
        assert_eq!(depth(&m), 2, "a trigger twice is one pending reconcile");
        m.dequeued(EVENT_PUBLISHER, "shop", "a");
        assert_eq!(depth(&m), 1);
        // A requeue is not due yet; a change during its wait makes it due now.
        m.requeued(EVENT_PUBLISHER, "shop", "a", Duration::from_secs(60));
        assert_eq!(depth(&m), 1);
        m.triggered(EVENT_PUBLISHER, "shop", "a");
        assert_eq!(depth(&m), 2);
        m.requeued(EVENT_PUBLISHER, "shop", "c", Duration::ZERO);
        assert_eq!(depth(&m), 3, "a requeue that came due waits in the queue");
        let guard = m.reconcile_started(EVENT_PUBLISHER);
        assert!(
            m.encode()
                .contains(r#"outbox_operator_reconciles_in_flight{kind="EventPublisher"} 1"#)
        );
        assert!(
            m.encode()
                .contains(r#"outbox_operator_reconcile_queue_depth{kind="EventPublisher"} 3"#)
        );
        drop(guard);
        m.forget_publisher("shop", "a");
        assert_eq!(depth(&m), 2);
    }
}
