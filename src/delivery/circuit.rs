//! Circuit breaker for one broker destination: stops send attempts to a destination that keeps
//! failing, then lets a few probe sends through to find out whether it recovered.
//!
//! The relay keeps one [`CircuitBreaker`] per destination. Before a send it calls
//! [`CircuitBreaker::try_acquire`]; after an [`Permit::Allowed`] or [`Permit::Probe`] send it
//! reports the outcome once with [`CircuitBreaker::record_success`] or
//! [`CircuitBreaker::record_failure`]. Only [`SendError::Transient`](crate::broker::SendError)
//! failures are recorded: a permanent error (a poison message the broker refuses) says nothing
//! about the destination's health and must not open the circuit, so the relay dead-letters it and
//! records neither outcome.
//!
//! The breaker is synchronous and every method takes the current [`Instant`] explicitly, so the
//! caller owns the clock (tests use synthetic instants). State changes are queued and handed out
//! once by [`CircuitBreaker::take_transitions`], for logs, metrics and the state column.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Number of buckets the sliding failure-rate window is divided into.
const WINDOW_BUCKETS: u32 = 10;

/// Transitions kept for [`CircuitBreaker::take_transitions`]; older ones are dropped when the
/// caller never drains them.
const MAX_PENDING_TRANSITIONS: usize = 64;

/// When a destination's circuit opens (sends stop) and how it is probed before closing again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Consecutive retriable failures that open the circuit; at least 1. Default 5.
    #[schemars(range(min = 1))]
    pub failure_threshold: u32,
    /// Share of failed sends within windowMs (greater than 0, at most 1) that opens the circuit,
    /// once at least minimumCalls sends were made in the window. Default 0.5.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub failure_rate_threshold: f64,
    /// Sends needed within windowMs before failureRateThreshold applies; at least 1. Default 20.
    #[schemars(range(min = 1))]
    pub minimum_calls: u32,
    /// Length in milliseconds of the sliding window for failureRateThreshold, tracked in 10
    /// buckets (an outcome leaves the window between 90% and 100% of windowMs after it was
    /// recorded); at least 1. Default 30000.
    #[schemars(range(min = 1))]
    pub window_ms: u64,
    /// How long in milliseconds an open circuit rejects every send before probe sends are
    /// allowed (half-open); at least 1. Default 10000.
    #[schemars(range(min = 1))]
    pub open_duration_ms: u64,
    /// Probe sends allowed while half-open; all of them must succeed to close the circuit, any
    /// failure opens it again for openDurationMs; at least 1. Default 1.
    #[schemars(range(min = 1))]
    pub half_open_probes: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_rate_threshold: 0.5,
            minimum_calls: 20,
            window_ms: 30_000,
            open_duration_ms: 10_000,
            half_open_probes: 1,
        }
    }
}

/// Why a [`CircuitBreakerConfig`] is invalid; each message names the offending field.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CircuitBreakerConfigError {
    /// `failureThreshold` is 0.
    #[error("circuitBreaker.failureThreshold must be at least 1")]
    FailureThreshold,
    /// `failureRateThreshold` is not in (0, 1].
    #[error("circuitBreaker.failureRateThreshold must be greater than 0 and at most 1 (got {0})")]
    FailureRateThreshold(f64),
    /// `minimumCalls` is 0.
    #[error("circuitBreaker.minimumCalls must be at least 1")]
    MinimumCalls,
    /// `windowMs` is 0.
    #[error("circuitBreaker.windowMs must be at least 1")]
    Window,
    /// `openDurationMs` is 0.
    #[error("circuitBreaker.openDurationMs must be at least 1")]
    OpenDuration,
    /// `halfOpenProbes` is 0.
    #[error("circuitBreaker.halfOpenProbes must be at least 1")]
    HalfOpenProbes,
}

impl CircuitBreakerConfig {
    /// Checks the bounds documented on each field; the error names the first offending field.
    pub fn validate(&self) -> Result<(), CircuitBreakerConfigError> {
        if self.failure_threshold == 0 {
            return Err(CircuitBreakerConfigError::FailureThreshold);
        }
        let rate = self.failure_rate_threshold;
        if rate.is_nan() || rate <= 0.0 || rate > 1.0 {
            return Err(CircuitBreakerConfigError::FailureRateThreshold(
                self.failure_rate_threshold,
            ));
        }
        if self.minimum_calls == 0 {
            return Err(CircuitBreakerConfigError::MinimumCalls);
        }
        if self.window_ms == 0 {
            return Err(CircuitBreakerConfigError::Window);
        }
        if self.open_duration_ms == 0 {
            return Err(CircuitBreakerConfigError::OpenDuration);
        }
        if self.half_open_probes == 0 {
            return Err(CircuitBreakerConfigError::HalfOpenProbes);
        }
        Ok(())
    }

    fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    fn bucket_width(&self) -> Duration {
        Duration::from_millis((self.window_ms / u64::from(WINDOW_BUCKETS)).max(1))
    }

    fn open_duration(&self) -> Duration {
        Duration::from_millis(self.open_duration_ms)
    }
}

/// The state of a circuit as seen from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    /// Sends flow normally.
    Closed,
    /// Sends are rejected until `until`.
    Open {
        /// When probe sends become allowed.
        until: Instant,
    },
    /// A limited number of probe sends decide whether the circuit closes or opens again.
    HalfOpen,
}

impl CircuitState {
    /// `closed`, `open` or `half_open`: the values of the database state column (which has a
    /// CHECK constraint on exactly these) and of the metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open { .. } => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(&self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open { .. } => 2,
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a send may be attempted now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    /// The circuit is closed: send, then record the outcome.
    Allowed,
    /// The circuit is half-open and this send is one of its probes: send, then record the
    /// outcome, which decides whether the circuit closes or opens again.
    Probe,
    /// Do not send now; ask again after `retry_in`. While open this is the rest of the open
    /// duration; while half-open with every probe in flight it is a short poll interval (a tenth
    /// of openDurationMs), since the probes may close the circuit at any moment.
    Rejected {
        /// How long to wait before calling [`CircuitBreaker::try_acquire`] again.
        retry_in: Duration,
    },
}

/// One change of state, handed out once by [`CircuitBreaker::take_transitions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: CircuitState,
    /// The state after.
    pub to: CircuitState,
    /// When it took effect: the instant passed to the call that caused it, or for open →
    /// half-open the end of the open duration (noticed at the next call after it).
    pub at: Instant,
}

/// Internal state; unlike [`CircuitState`] it keeps the half-open probe bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        /// Probes handed out whose outcome was not recorded yet.
        in_flight: u32,
        /// Probes that succeeded.
        succeeded: u32,
        /// When the last probe was handed out (to free the slots of probes never reported).
        last_probe_at: Option<Instant>,
    },
}

/// Outcomes recorded during one slice of the sliding window.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    start: Instant,
    calls: u64,
    failures: u64,
}

/// A circuit breaker for one destination; see the module documentation for the protocol.
///
/// Closed: the circuit opens on `failureThreshold` consecutive failures, or when the sliding
/// window holds at least `minimumCalls` outcomes of which at least `failureRateThreshold` failed
/// (checked when a failure is recorded). Open: every send is rejected for `openDurationMs`, then
/// the circuit is half-open. Half-open: up to `halfOpenProbes` probe sends; when all of them
/// succeed the circuit closes with fresh counters, any failure opens it again. A probe whose
/// outcome is not recorded within `openDurationMs` counts as lost and frees its slot.
///
/// Outcomes recorded while open (sends that started before the circuit opened) are ignored, as
/// is a success in half-open when no probe is in flight.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    config: CircuitBreakerConfig,
    phase: Phase,
    consecutive_failures: u32,
    window: VecDeque<Bucket>,
    transitions: Vec<Transition>,
}

impl CircuitBreaker {
    /// A closed circuit. `config` should have passed [`CircuitBreakerConfig::validate`]; zero
    /// thresholds or probe counts are treated as 1.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        Self {
            config,
            phase: Phase::Closed,
            consecutive_failures: 0,
            window: VecDeque::new(),
            transitions: Vec::new(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.config
    }

    /// The state at `now`; an open circuit whose open duration elapsed reports half-open.
    pub fn state(&self, now: Instant) -> CircuitState {
        match self.phase {
            Phase::Closed => CircuitState::Closed,
            Phase::Open { until } if now < until => CircuitState::Open { until },
            Phase::Open { .. } | Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Asks whether a send may start at `now`. Every [`Permit::Allowed`] and [`Permit::Probe`]
    /// must be followed by exactly one `record_success` or `record_failure` (or none for a
    /// permanent error; an unreported probe frees its slot after `openDurationMs`).
    pub fn try_acquire(&mut self, now: Instant) -> Permit {
        self.advance(now);
        let probes = self.config.half_open_probes.max(1);
        let open_duration = self.config.open_duration();
        match &mut self.phase {
            Phase::Closed => Permit::Allowed,
            Phase::Open { until } => Permit::Rejected {
                retry_in: until.saturating_duration_since(now),
            },
            Phase::HalfOpen {
                in_flight,
                succeeded,
                last_probe_at,
            } => {
                let lost = last_probe_at.is_some_and(|at| now.saturating_duration_since(at) >= open_duration);
                if *in_flight > 0 && lost {
                    *in_flight = 0;
                }
                if in_flight.saturating_add(*succeeded) < probes {
                    *in_flight += 1;
                    *last_probe_at = Some(now);
                    Permit::Probe
                } else {
                    Permit::Rejected {
                        retry_in: (open_duration / 10).max(Duration::from_millis(1)),
                    }
                }
            }
        }
    }

    /// Records a successful send. Closed: resets the consecutive-failure count. Half-open: counts
    /// a probe; when all `halfOpenProbes` succeeded the circuit closes with fresh counters.
    pub fn record_success(&mut self, now: Instant) {
        self.advance(now);
        let probes = self.config.half_open_probes.max(1);
        let all_probes_succeeded = match &mut self.phase {
            Phase::Closed => {
                self.consecutive_failures = 0;
                self.push_outcome(now, false);
                false
            }
            Phase::Open { .. } => false,
            Phase::HalfOpen {
                in_flight, succeeded, ..
            } => {
                if *in_flight == 0 {
                    return;
                }
                *in_flight -= 1;
                *succeeded += 1;
                *succeeded >= probes
            }
        };
        if all_probes_succeeded {
            self.close(now);
        }
    }

    /// Records a retriable send failure. Never call it for a permanent error: a poison message
    /// must not open the circuit. Closed: may open the circuit (consecutive failures or failure
    /// rate). Half-open: opens the circuit again for `openDurationMs`.
    pub fn record_failure(&mut self, now: Instant) {
        self.advance(now);
        match self.phase {
            Phase::Closed => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.push_outcome(now, true);
                if self.consecutive_failures >= self.config.failure_threshold.max(1) || self.rate_exceeded() {
                    self.open(now);
                }
            }
            Phase::Open { .. } => {}
            Phase::HalfOpen { .. } => self.open(now),
        }
    }

    /// Hands out the state changes since the last call, oldest first, each exactly once. The
    /// relay drains this after `try_acquire` / `record_*` to log, count and persist them. At
    /// most 64 are kept; older ones are dropped when nobody drains them.
    pub fn take_transitions(&mut self) -> Vec<Transition> {
        std::mem::take(&mut self.transitions)
    }

    /// Turns an open circuit whose open duration elapsed into a half-open one.
    fn advance(&mut self, now: Instant) {
        if let Phase::Open { until } = self.phase
            && now >= until
        {
            self.phase = Phase::HalfOpen {
                in_flight: 0,
                succeeded: 0,
                last_probe_at: None,
            };
            self.push_transition(CircuitState::Open { until }, CircuitState::HalfOpen, until);
        }
    }

    fn open(&mut self, now: Instant) {
        let from = self.state(now);
        let duration = self.config.open_duration();
        // `Instant + Duration` panics on overflow; an absurd open duration is capped instead.
        let until = now
            .checked_add(duration)
            .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
            .unwrap_or(now);
        self.phase = Phase::Open { until };
        self.reset_counters();
        self.push_transition(from, CircuitState::Open { until }, now);
    }

    fn close(&mut self, now: Instant) {
        let from = self.state(now);
        self.phase = Phase::Closed;
        self.reset_counters();
        self.push_transition(from, CircuitState::Closed, now);
    }

    fn reset_counters(&mut self) {
        self.consecutive_failures = 0;
        self.window.clear();
    }

    fn push_transition(&mut self, from: CircuitState, to: CircuitState, at: Instant) {
        if self.transitions.len() >= MAX_PENDING_TRANSITIONS {
            self.transitions.remove(0);
        }
        self.transitions.push(Transition { from, to, at });
    }

    /// Adds one outcome to the sliding window, dropping buckets that left it.
    fn push_outcome(&mut self, now: Instant, failed: bool) {
        let window = self.config.window();
        while self
            .window
            .front()
            .is_some_and(|bucket| now.saturating_duration_since(bucket.start) >= window)
        {
            self.window.pop_front();
        }
        let width = self.config.bucket_width();
        let needs_bucket = self
            .window
            .back()
            .is_none_or(|bucket| now.saturating_duration_since(bucket.start) >= width);
        if needs_bucket {
            self.window.push_back(Bucket {
                start: now,
                calls: 0,
                failures: 0,
            });
        }
        if let Some(bucket) = self.window.back_mut() {
            bucket.calls += 1;
            bucket.failures += u64::from(failed);
        }
    }

    /// Whether the window holds enough outcomes and enough of them failed.
    fn rate_exceeded(&self) -> bool {
        let (calls, failures) = self
            .window
            .iter()
            .fold((0u64, 0u64), |(c, f), bucket| (c + bucket.calls, f + bucket.failures));
        calls >= u64::from(self.config.minimum_calls.max(1))
            && failures as f64 >= self.config.failure_rate_threshold * calls as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// A breaker that only opens on consecutive failures (the rate needs a huge minimum).
    fn consecutive_only() -> CircuitBreaker {
        CircuitBreaker::new(CircuitBreakerConfig {
            minimum_calls: u32::MAX,
            ..CircuitBreakerConfig::default()
        })
    }

    /// A breaker that only opens on the failure rate.
    fn rate_only(minimum_calls: u32) -> CircuitBreaker {
        CircuitBreaker::new(CircuitBreakerConfig {
            failure_threshold: u32::MAX,
            minimum_calls,
            ..CircuitBreakerConfig::default()
        })
    }

    /// Opens `breaker` at `at` through consecutive failures.
    fn open_at(breaker: &mut CircuitBreaker, at: Instant) {
        for _ in 0..breaker.config().failure_threshold {
            assert_eq!(breaker.try_acquire(at), Permit::Allowed);
            breaker.record_failure(at);
        }
        assert!(matches!(breaker.state(at), CircuitState::Open { .. }));
        breaker.take_transitions();
    }

    fn changes(breaker: &mut CircuitBreaker) -> Vec<(&'static str, &'static str)> {
        breaker
            .take_transitions()
            .into_iter()
            .map(|t| (t.from.as_str(), t.to.as_str()))
            .collect()
    }

    #[test]
    fn opens_after_consecutive_failures() {
        let base = Instant::now();
        let mut breaker = consecutive_only();
        for i in 0..4 {
            let now = base + secs(f64::from(i));
            assert_eq!(breaker.try_acquire(now), Permit::Allowed);
            breaker.record_failure(now);
            assert_eq!(breaker.state(now), CircuitState::Closed);
        }
        assert!(breaker.take_transitions().is_empty());
        let now = base + secs(4.0);
        breaker.record_failure(now);
        let until = now + secs(10.0);
        assert_eq!(breaker.state(now), CircuitState::Open { until });
        assert_eq!(
            breaker.take_transitions(),
            vec![Transition {
                from: CircuitState::Closed,
                to: CircuitState::Open { until },
                at: now
            }]
        );
        assert!(breaker.take_transitions().is_empty());
    }

    #[test]
    fn success_in_closed_resets_consecutive_count() {
        let base = Instant::now();
        let mut breaker = consecutive_only();
        for _ in 0..4 {
            breaker.record_failure(base);
        }
        breaker.record_success(base);
        for _ in 0..4 {
            breaker.record_failure(base);
        }
        assert_eq!(breaker.state(base), CircuitState::Closed);
        breaker.record_failure(base);
        assert!(matches!(breaker.state(base), CircuitState::Open { .. }));
    }

    #[test]
    fn opens_on_failure_rate_only_from_minimum_calls() {
        let base = Instant::now();
        let mut breaker = rate_only(20);
        // 19 calls, 10 of them failed: above the rate but below minimumCalls.
        for i in 0..19 {
            if i % 2 == 0 {
                breaker.record_failure(base);
            } else {
                breaker.record_success(base);
            }
        }
        assert_eq!(breaker.state(base), CircuitState::Closed);
        // 20th call fails: 11 of 20.
        breaker.record_failure(base);
        assert!(matches!(breaker.state(base), CircuitState::Open { .. }));
        assert_eq!(changes(&mut breaker), vec![("closed", "open")]);
    }

    #[test]
    fn failure_rate_below_threshold_stays_closed() {
        let base = Instant::now();
        let mut breaker = rate_only(20);
        for i in 0..40 {
            // 2 failures in every 5 calls: 40%.
            if i % 5 < 2 {
                breaker.record_failure(base);
            } else {
                breaker.record_success(base);
            }
        }
        assert_eq!(breaker.state(base), CircuitState::Closed);
    }

    #[test]
    fn old_failures_slide_out_of_the_window() {
        let base = Instant::now();
        let mut breaker = rate_only(10);
        for _ in 0..6 {
            breaker.record_failure(base);
        }
        assert_eq!(breaker.state(base), CircuitState::Closed);
        // 31 s later the first six are gone: 4 successes and 2 failures are only 6 calls.
        let later = base + secs(31.0);
        for _ in 0..4 {
            breaker.record_success(later);
        }
        breaker.record_failure(later);
        breaker.record_failure(later);
        assert_eq!(breaker.state(later), CircuitState::Closed);
        // Still in the window 20 s on; 4 more failures make 6 of 10.
        let much_later = later + secs(20.0);
        for _ in 0..3 {
            breaker.record_failure(much_later);
        }
        assert_eq!(breaker.state(much_later), CircuitState::Closed);
        breaker.record_failure(much_later);
        assert!(matches!(breaker.state(much_later), CircuitState::Open { .. }));
    }

    #[test]
    fn outcomes_within_the_window_still_count() {
        let base = Instant::now();
        let mut breaker = rate_only(10);
        for _ in 0..6 {
            breaker.record_failure(base);
        }
        let later = base + secs(25.0);
        for _ in 0..3 {
            breaker.record_success(later);
        }
        assert_eq!(breaker.state(later), CircuitState::Closed);
        breaker.record_failure(later);
        assert!(matches!(breaker.state(later), CircuitState::Open { .. }));
    }

    #[test]
    fn open_rejects_everything_with_the_remaining_time() {
        let base = Instant::now();
        let mut breaker = consecutive_only();
        open_at(&mut breaker, base);
        let until = base + secs(10.0);
        assert_eq!(breaker.try_acquire(base), Permit::Rejected { retry_in: secs(10.0) });
        assert_eq!(
            breaker.try_acquire(base + secs(3.0)),
            Permit::Rejected { retry_in: secs(7.0) }
        );
        let almost = until - Duration::from_millis(1);
        assert_eq!(
            breaker.try_acquire(almost),
            Permit::Rejected {
                retry_in: Duration::from_millis(1)
            }
        );
        assert_eq!(breaker.state(almost), CircuitState::Open { until });
        // Late outcomes of sends that started before the circuit opened change nothing.
        breaker.record_success(almost);
        breaker.record_failure(almost);
        assert_eq!(breaker.state(almost), CircuitState::Open { until });
        assert!(breaker.take_transitions().is_empty());
    }

    #[test]
    fn half_open_allows_one_probe_and_success_closes() {
        let base = Instant::now();
        let mut breaker = consecutive_only();
        open_at(&mut breaker, base);
        let until = base + secs(10.0);
        assert_eq!(breaker.state(until), CircuitState::HalfOpen);
        assert_eq!(breaker.try_acquire(until), Permit::Probe);
        let rejected = breaker.try_acquire(until + secs(0.1));
        assert_eq!(rejected, Permit::Rejected { retry_in: secs(1.0) });
        assert_eq!(
            breaker.take_transitions(),
            vec![Transition {
                from: CircuitState::Open { until },
                to: CircuitState::HalfOpen,
                at: until
            }]
        );

        let closed_at = until + secs(0.5);
        breaker.record_success(closed_at);
        assert_eq!(breaker.state(closed_at), CircuitState::Closed);
        assert_eq!(breaker.try_acquire(closed_at), Permit::Allowed);
        assert_eq!(changes(&mut breaker), vec![("half_open", "closed")]);
        // Counters were reset: four more failures do not open it.
        for _ in 0..4 {
            breaker.record_failure(closed_at);
        }
        assert_eq!(breaker.state(closed_at), CircuitState::Closed);
    }

    #[test]
    fn probe_failure_reopens() {
        let base = Instant::now();
        let mut breaker = consecutive_only();
        open_at(&mut breaker, base);
        let probe_at = base + secs(12.0);
        assert_eq!(breaker.try_acquire(probe_at), Permit::Probe);
        let failed_at = probe_at + secs(0.5);
        breaker.record_failure(failed_at);
        let until = failed_at + secs(10.0);
        assert_eq!(breaker.state(failed_at), CircuitState::Open { until });
        assert_eq!(
            breaker.try_acquire(failed_at),
            Permit::Rejected { retry_in: secs(10.0) }
        );
        assert_eq!(
            changes(&mut breaker),
            vec![("open", "half_open"), ("half_open", "open")]
        );
    }

    #[test]
    fn several_probes_must_all_succeed() {
        let base = Instant::now();
        let mut breaker = CircuitBreaker::new(CircuitBreakerConfig {
            half_open_probes: 3,
            minimum_calls: u32::MAX,
            ..CircuitBreakerConfig::default()
        });
        open_at(&mut breaker, base);
        let t = base + secs(10.0);
        assert_eq!(breaker.try_acquire(t), Permit::Probe);
        assert_eq!(breaker.try_acquire(t), Permit::Probe);
        assert_eq!(breaker.try_acquire(t), Permit::Probe);
        assert!(matches!(breaker.try_acquire(t), Permit::Rejected { .. }));
        breaker.record_success(t);
        breaker.record_success(t);
        assert_eq!(breaker.state(t), CircuitState::HalfOpen);
        // Two succeeded, one in flight: still no further probe.
        assert!(matches!(breaker.try_acquire(t), Permit::Rejected { .. }));
        breaker.record_success(t);
        assert_eq!(breaker.state(t), CircuitState::Closed);

        // Any failure among the probes reopens.
        open_at(&mut breaker, t);
        let t2 = t + secs(10.0);
        assert_eq!(breaker.try_acquire(t2), Permit::Probe);
        assert_eq!(breaker.try_acquire(t2), Permit::Probe);
        breaker.record_success(t2);
        breaker.record_failure(t2);
        assert!(matches!(breaker.state(t2), CircuitState::Open { .. }));
    }

    #[test]
    fn unreported_probe_frees_its_slot_after_open_duration() {
        let base = Instant::now();
        let mut breaker = consecutive_only();
        open_at(&mut breaker, base);
        let t = base + secs(10.0);
        assert_eq!(breaker.try_acquire(t), Permit::Probe);
        assert!(matches!(breaker.try_acquire(t + secs(9.9)), Permit::Rejected { .. }));
        assert_eq!(breaker.try_acquire(t + secs(10.0)), Permit::Probe);
        // A success without any probe in flight is ignored.
        let mut fresh = consecutive_only();
        open_at(&mut fresh, base);
        fresh.record_success(t);
        assert_eq!(fresh.state(t), CircuitState::HalfOpen);
    }

    #[test]
    fn each_transition_is_reported_exactly_once() {
        let base = Instant::now();
        let mut breaker = consecutive_only();
        for _ in 0..5 {
            breaker.record_failure(base);
        }
        // Polling the state or asking again while open adds nothing.
        for i in 0..3 {
            breaker.state(base + secs(f64::from(i)));
            breaker.try_acquire(base + secs(f64::from(i)));
        }
        let t1 = base + secs(10.0);
        assert_eq!(breaker.try_acquire(t1), Permit::Probe);
        breaker.try_acquire(t1);
        breaker.record_failure(t1);
        let t2 = t1 + secs(10.0);
        assert_eq!(breaker.try_acquire(t2), Permit::Probe);
        breaker.record_success(t2);
        breaker.record_success(t2);
        assert_eq!(
            changes(&mut breaker),
            vec![
                ("closed", "open"),
                ("open", "half_open"),
                ("half_open", "open"),
                ("open", "half_open"),
                ("half_open", "closed"),
            ]
        );
        assert!(breaker.take_transitions().is_empty());
    }

    #[test]
    fn undrained_transitions_are_bounded() {
        let base = Instant::now();
        let mut breaker = CircuitBreaker::new(CircuitBreakerConfig {
            failure_threshold: 1,
            ..CircuitBreakerConfig::default()
        });
        let mut now = base;
        for _ in 0..100 {
            breaker.record_failure(now);
            now += secs(10.0);
        }
        let kept = breaker.take_transitions();
        assert_eq!(kept.len(), MAX_PENDING_TRANSITIONS);
        assert_eq!(kept.last().map(|t| t.to.as_str()), Some("open"));
    }

    #[test]
    fn state_names_and_gauge_values() {
        let until = Instant::now();
        assert_eq!(CircuitState::Closed.as_str(), "closed");
        assert_eq!(CircuitState::Open { until }.as_str(), "open");
        assert_eq!(CircuitState::HalfOpen.as_str(), "half_open");
        assert_eq!(CircuitState::Closed.as_gauge(), 0);
        assert_eq!(CircuitState::HalfOpen.as_gauge(), 1);
        assert_eq!(CircuitState::Open { until }.as_gauge(), 2);
        assert_eq!(CircuitState::HalfOpen.to_string(), "half_open");
    }

    #[test]
    fn validation_names_the_field() {
        let base = CircuitBreakerConfig::default();
        assert_eq!(base.validate(), Ok(()));
        let cases = [
            (
                CircuitBreakerConfig {
                    failure_threshold: 0,
                    ..base.clone()
                },
                "circuitBreaker.failureThreshold must be at least 1",
            ),
            (
                CircuitBreakerConfig {
                    failure_rate_threshold: 0.0,
                    ..base.clone()
                },
                "circuitBreaker.failureRateThreshold must be greater than 0 and at most 1",
            ),
            (
                CircuitBreakerConfig {
                    failure_rate_threshold: 1.1,
                    ..base.clone()
                },
                "circuitBreaker.failureRateThreshold must be greater than 0 and at most 1",
            ),
            (
                CircuitBreakerConfig {
                    failure_rate_threshold: f64::NAN,
                    ..base.clone()
                },
                "circuitBreaker.failureRateThreshold must be greater than 0 and at most 1",
            ),
            (
                CircuitBreakerConfig {
                    minimum_calls: 0,
                    ..base.clone()
                },
                "circuitBreaker.minimumCalls must be at least 1",
            ),
            (
                CircuitBreakerConfig {
                    window_ms: 0,
                    ..base.clone()
                },
                "circuitBreaker.windowMs must be at least 1",
            ),
            (
                CircuitBreakerConfig {
                    open_duration_ms: 0,
                    ..base.clone()
                },
                "circuitBreaker.openDurationMs must be at least 1",
            ),
            (
                CircuitBreakerConfig {
                    half_open_probes: 0,
                    ..base.clone()
                },
                "circuitBreaker.halfOpenProbes must be at least 1",
            ),
        ];
        for (config, expected) in cases {
            let message = config.validate().expect_err(expected).to_string();
            assert!(
                message.starts_with(expected),
                "{message:?} should start with {expected:?}"
            );
        }
    }

    #[test]
    fn serde_uses_camel_case_and_defaults_missing_fields() {
        let config: CircuitBreakerConfig = serde_json::from_str(r#"{"halfOpenProbes": 2, "windowMs": 1000}"#).unwrap();
        assert_eq!(
            config,
            CircuitBreakerConfig {
                half_open_probes: 2,
                window_ms: 1000,
                ..CircuitBreakerConfig::default()
            }
        );
        let json = serde_json::to_value(CircuitBreakerConfig::default()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "failureThreshold": 5,
                "failureRateThreshold": 0.5,
                "minimumCalls": 20,
                "windowMs": 30000,
                "openDurationMs": 10000,
                "halfOpenProbes": 1
            })
        );
        let schema = serde_json::to_value(schemars::schema_for!(CircuitBreakerConfig)).unwrap();
        for (field, _) in json.as_object().unwrap() {
            assert!(
                schema["properties"][field]["description"].is_string(),
                "{field} lacks a description"
            );
        }
    }
}
