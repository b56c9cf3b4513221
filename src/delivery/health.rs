//! Liveness and readiness of a relay worker, updated by the relay loop and its background task
//! and read by `/livez` and `/readyz`.
//!
//! Readiness means "this worker can do its job now": the database answers, the broker answers
//! and the loop runs. Failed-event counts are not part of it (they are metrics and status): a
//! worker with many dead letters can still publish, and its admin API, on the same port, must
//! stay in the Service exactly then. Liveness only asks whether the loop makes progress; a
//! broker call in flight counts as progress until its own timeout, so a broker outage (which
//! readiness reports) never gets the Pod restarted.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use chrono::Utc;

/// Shared health flags (cheap atomics: the hot loop writes them every round).
#[derive(Debug)]
pub struct HealthState {
    broker_reachable: AtomicBool,
    /// Why the last broker health check failed (endpoint and cause), for `/readyz`.
    broker_error: std::sync::Mutex<Option<String>>,
    database_reachable: AtomicBool,
    last_loop_at_ms: AtomicI64,
    /// When the broker call in flight started (0: none in flight).
    send_started_at_ms: AtomicI64,
    /// The loop counts as alive when it ran within this long.
    loop_stall_after: Duration,
    /// The longest a single broker call may take (its adapter's timeout, with margin).
    send_budget: Duration,
}

/// Why a worker is not ready; each reason is one line of the `/readyz` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReady(pub Vec<String>);

impl HealthState {
    /// `loop_stall_after`: the longest expected gap between rounds outside broker calls;
    /// `send_budget`: the longest one broker call may take.
    pub fn new(loop_stall_after: Duration, send_budget: Duration) -> Self {
        Self {
            broker_reachable: AtomicBool::new(false),
            broker_error: std::sync::Mutex::new(None),
            database_reachable: AtomicBool::new(false),
            last_loop_at_ms: AtomicI64::new(0),
            send_started_at_ms: AtomicI64::new(0),
            loop_stall_after,
            send_budget,
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

    pub fn broker_reachable(&self) -> bool {
        self.broker_reachable.load(Ordering::Relaxed)
    }

    pub fn set_database_reachable(&self, reachable: bool) {
        self.database_reachable.store(reachable, Ordering::Relaxed);
    }

    /// Called by the claim loop once per round, and after every broker call.
    pub fn loop_ran(&self) {
        self.last_loop_at_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Called before a broker call; [`HealthState::send_finished`] after it.
    pub fn send_started(&self) {
        self.send_started_at_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    pub fn send_finished(&self) {
        self.send_started_at_ms.store(0, Ordering::Relaxed);
        self.loop_ran();
    }

    /// Alive while the claim loop keeps running: it ran within the stall limit, or a broker
    /// call it started is still within its budget.
    pub fn live(&self) -> bool {
        let now = Utc::now().timestamp_millis();
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let last = self.last_loop_at_ms.load(Ordering::Relaxed);
        let sending = self.send_started_at_ms.load(Ordering::Relaxed);
        let loop_recent = last > 0 && now - last <= millis(self.loop_stall_after);
        let send_in_budget =
            sending > 0 && now - sending <= millis(self.send_budget).saturating_add(millis(self.loop_stall_after));
        loop_recent || send_in_budget
    }

    /// Ready when alive and both the database and the broker answer.
    pub fn ready(&self) -> Result<(), NotReady> {
        let mut reasons = Vec::new();
        if !self.live() {
            reasons.push("claim loop has not run recently".to_owned());
        }
        if !self.database_reachable.load(Ordering::Relaxed) {
            reasons.push("database is not reachable".to_owned());
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
    fn readiness_names_every_reason_and_ignores_failed_events() {
        let health = HealthState::new(Duration::from_secs(5), Duration::from_secs(30));
        let NotReady(reasons) = health.ready().unwrap_err();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        health.loop_ran();
        health.set_broker_reachable(true);
        health.set_database_reachable(true);
        health.ready().unwrap();
        health.set_database_reachable(false);
        assert_eq!(
            health.ready().unwrap_err().0,
            vec!["database is not reachable".to_owned()]
        );
    }

    #[test]
    fn a_long_broker_call_keeps_the_worker_alive() {
        let health = HealthState::new(Duration::from_millis(0), Duration::from_secs(60));
        assert!(!health.live());
        health.send_started();
        assert!(health.live(), "a call within its budget is progress");
    }
}
