//! Operator metrics, one registry prefixed `outbox_operator`: reconciles, failures by error
//! kind, reconcile durations, leadership.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The `kind` label of failures (the error's stable metric label).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Every operator metric.
#[derive(Debug)]
pub struct OperatorMetrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<KindLabel, Counter>,
    duration: Histogram,
    leader: Gauge,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl OperatorMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outbox_operator");
        let metrics = Self {
            reconciles: Counter::default(),
            failures: Family::default(),
            duration: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            leader: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reconciles",
            "EventPublisher reconciles started",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Failed reconciles by error kind",
            metrics.failures.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time of one reconcile",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the lease",
            metrics.leader.clone(),
        );
        Self { registry, ..metrics }
    }

    /// Counts a reconcile and records its duration when the guard drops.
    pub fn reconcile_started(&self) -> DurationGuard<'_> {
        self.reconciles.inc();
        DurationGuard {
            histogram: &self.duration,
            started: Instant::now(),
        }
    }

    pub fn failed(&self, kind: &'static str) {
        self.failures.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(%error, "encode operator metrics");
        }
        out
    }
}

/// Records the reconcile's duration on drop, whichever way it ended.
pub struct DurationGuard<'a> {
    histogram: &'a Histogram,
    started: Instant,
}

impl Drop for DurationGuard<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_failures_and_leadership_are_exported() {
        let m = OperatorMetrics::new();
        drop(m.reconcile_started());
        m.failed("apply");
        m.set_leader(true);
        let text = m.encode();
        for line in [
            "outbox_operator_reconciles_total 1",
            r#"outbox_operator_reconcile_failures_total{kind="apply"} 1"#,
            "outbox_operator_reconcile_duration_seconds_count 1",
            "outbox_operator_leader 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
