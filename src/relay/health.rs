//! Liveness and readiness of a relay worker, updated by the relay loop and read by `/livez`
//! and `/readyz`.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use chrono::Utc;

/// Shared health flags (cheap atomics: the hot loop writes them every round).
#[derive(Debug)]
pub struct HealthState {
    broker_reachable: AtomicBool,
    /// Why the last broker health check failed (endpoint and cause), for `/readyz`.
    broker_error: std::sync::Mutex<Option<String>>,
    last_loop_at_ms: AtomicI64,
    failed_events: AtomicI64,
    /// Readiness fails when failed (retrying + dead-lettered) events exceed this.
    failed_threshold: i64,
    /// The loop counts as alive when it ran within this long.
    loop_stall_after: Duration,
}

/// Why a worker is not ready; each reason is one line of the `/readyz` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReady(pub Vec<String>);

impl HealthState {
    pub fn new(failed_threshold: i64, loop_stall_after: Duration) -> Self {
        Self {
            broker_reachable: AtomicBool::new(false),
            broker_error: std::sync::Mutex::new(None),
            last_loop_at_ms: AtomicI64::new(0),
            failed_events: AtomicI64::new(0),
            failed_threshold,
            loop_stall_after,
        }
    }

    pub fn set_broker_reachable(&self, reachable: bool) {
        self.broker_reachable.store(reachable, Ordering::Relaxed);
    }

    /// Records a broker health check: reachable, or why not (shown by `/readyz`).
    pub fn set_broker_health(&self, result: Result<(), String>) {
        self.set_broker_reachable(result.is_ok());
        *self
            .broker_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = result.err();
    }

    /// Called by the claim loop once per round.
    pub fn loop_ran(&self) {
        self.last_loop_at_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    pub fn set_failed_events(&self, count: i64) {
        self.failed_events.store(count, Ordering::Relaxed);
    }

    /// Alive while the claim loop keeps running.
    pub fn live(&self) -> bool {
        let last = self.last_loop_at_ms.load(Ordering::Relaxed);
        let stall = i64::try_from(self.loop_stall_after.as_millis()).unwrap_or(i64::MAX);
        last > 0 && Utc::now().timestamp_millis() - last <= stall
    }

    /// Ready when alive, the broker answers and failed events are under the threshold.
    pub fn ready(&self) -> Result<(), NotReady> {
        let mut reasons = Vec::new();
        if !self.live() {
            reasons.push("claim loop has not run recently".to_owned());
        }
        if !self.broker_reachable.load(Ordering::Relaxed) {
            let why = self
                .broker_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            reasons.push(match why {
                Some(why) => format!("broker is not reachable: {why}"),
                None => "broker is not reachable".to_owned(),
            });
        }
        let failed = self.failed_events.load(Ordering::Relaxed);
        if failed > self.failed_threshold {
            reasons.push(format!(
                "{failed} failed events exceed the threshold of {}",
                self.failed_threshold
            ));
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(NotReady(reasons))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_every_reason() {
        let health = HealthState::new(10, Duration::from_secs(5));
        let NotReady(reasons) = health.ready().unwrap_err();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        health.loop_ran();
        health.set_broker_reachable(true);
        health.ready().unwrap();
        health.set_failed_events(11);
        assert_eq!(
            health.ready().unwrap_err().0,
            vec!["11 failed events exceed the threshold of 10".to_owned()]
        );
    }
}
