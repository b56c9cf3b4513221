//! Retry policy of ordered delivery: exponential backoff with jitter between failed send attempts, and
//! the decision whether a failed message is retried or dead-lettered.
//!
//! Attempt numbers start at 1: after failed attempt `n` the policy either names the delay before
//! attempt `n + 1` or, once `n` reaches `maxAttempts`, gives up so the message is dead-lettered.
//! A [`SendError::Message`] error is dead-lettered at once, whatever the attempt number; a
//! [`SendError::Destination`] error, or a failed probe of a half-open circuit, never counts an
//! attempt (see [`RetryPolicy::decide_after`]), so an outage cannot dead-letter events.

use std::cell::Cell;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::broker::SendError;

/// Exponential backoff for failed sends to a broker, with random jitter; after `maxAttempts`
/// failed attempts the message is dead-lettered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Delay in milliseconds after the first failed attempt, before jitter. Default 500.
    pub initial_interval_ms: u64,
    /// Factor by which the delay grows after each further failed attempt; at least 1.0.
    /// Default 2.0.
    #[schemars(range(min = 1.0))]
    pub multiplier: f64,
    /// Upper bound in milliseconds of the delay before jitter; at least initialIntervalMs.
    /// Default 60000.
    pub max_interval_ms: u64,
    /// Number of send attempts (the first one included) before the message is dead-lettered;
    /// at least 1. Default 10.
    #[schemars(range(min = 1))]
    pub max_attempts: u32,
    /// Random spread of each delay, between 0 and 1: the delay is multiplied by a random factor
    /// in [1 - jitter, 1 + jitter], so it never exceeds maxIntervalMs * (1 + jitter). 0 disables
    /// jitter. Default 0.2.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_interval_ms: 500,
            multiplier: 2.0,
            max_interval_ms: 60_000,
            max_attempts: 10,
            jitter: 0.2,
        }
    }
}

/// Why a [`RetryPolicy`] is invalid; each message names the offending field.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RetryPolicyError {
    /// `multiplier` is below 1.0 (or not a number).
    #[error("retry.multiplier must be at least 1.0 (got {0})")]
    Multiplier(f64),
    /// `jitter` is outside [0, 1] (or not a number).
    #[error("retry.jitter must be between 0 and 1 (got {0})")]
    Jitter(f64),
    /// `maxIntervalMs` is below `initialIntervalMs`.
    #[error("retry.maxIntervalMs must be at least initialIntervalMs (got {max_interval_ms} < {initial_interval_ms})")]
    MaxInterval {
        /// The configured `initialIntervalMs`.
        initial_interval_ms: u64,
        /// The configured `maxIntervalMs`.
        max_interval_ms: u64,
    },
    /// `maxAttempts` is 0.
    #[error("retry.maxAttempts must be at least 1 (got {0})")]
    MaxAttempts(u32),
}

/// What to do with a message after a failed send attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Give up: send the message to the dead-letter destination with this reason.
    DeadLetter {
        /// Human-readable reason, stored with the dead letter (`x-dead-letter-reason`).
        reason: String,
    },
}

impl RetryPolicy {
    /// Checks the bounds documented on each field; the error names the first offending field.
    pub fn validate(&self) -> Result<(), RetryPolicyError> {
        if self.multiplier.is_nan() || self.multiplier < 1.0 {
            return Err(RetryPolicyError::Multiplier(self.multiplier));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(RetryPolicyError::Jitter(self.jitter));
        }
        if self.max_interval_ms < self.initial_interval_ms {
            return Err(RetryPolicyError::MaxInterval {
                initial_interval_ms: self.initial_interval_ms,
                max_interval_ms: self.max_interval_ms,
            });
        }
        if self.max_attempts == 0 {
            return Err(RetryPolicyError::MaxAttempts(self.max_attempts));
        }
        Ok(())
    }

    /// The delay after failed attempt `attempt` (1-based) before the next one, with a fresh
    /// random jitter; `None` when `attempt` reaches `maxAttempts` and the message should be
    /// dead-lettered.
    pub fn next_delay(&self, attempt: u32) -> Option<Duration> {
        self.next_delay_with(attempt, random_unit())
    }

    /// [`next_delay`](Self::next_delay) with the jitter drawn from `sample`, a uniform value in
    /// [0, 1] (clamped): 0 gives the shortest delay, 1 the longest. For deterministic callers.
    pub fn next_delay_with(&self, attempt: u32, sample: f64) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let jitter = clamp_unit(self.jitter);
        let factor = 1.0 - jitter + 2.0 * jitter * clamp_unit(sample);
        Some(millis_to_duration(self.capped_millis(attempt) * factor))
    }

    /// The delay after failed attempt `attempt` (1-based, 0 counts as 1) without jitter:
    /// `initialIntervalMs * multiplier^(attempt - 1)`, capped at `maxIntervalMs`. Ignores
    /// `maxAttempts`.
    pub fn delay_without_jitter(&self, attempt: u32) -> Duration {
        millis_to_duration(self.capped_millis(attempt))
    }

    /// Decides what follows failed attempt `attempt` (1-based) that ended with `error`:
    /// a permanent error is dead-lettered at once; a retriable one is retried after
    /// [`next_delay`](Self::next_delay) until `maxAttempts` attempts were made.
    pub fn decide(&self, attempt: u32, error: &SendError) -> RetryDecision {
        match error {
            SendError::Message(message) => RetryDecision::DeadLetter {
                reason: format!("permanent error: {message}"),
            },
            SendError::Transient(message) | SendError::Destination(message) => match self.next_delay(attempt) {
                Some(delay) => RetryDecision::RetryAfter(delay),
                None => RetryDecision::DeadLetter {
                    reason: format!("gave up after {attempt} attempts: {message}"),
                },
            },
        }
    }

    /// Decides what follows a failed send of an event that had made `attempts_before`
    /// counted attempts. `counted` is false when the destination, not the event, was at fault
    /// (its circuit was half-open and this was a probe): then, like for a
    /// [`SendError::Destination`] error, the event is retried after the initial interval and
    /// never dead-lettered for it. Returns the decision and whether the
    /// attempt counts.
    pub fn decide_after(&self, attempts_before: u32, error: &SendError, counted: bool) -> (RetryDecision, bool) {
        match error {
            SendError::Message(_) => (self.decide(attempts_before + 1, error), true),
            SendError::Transient(_) if counted => (self.decide(attempts_before + 1, error), true),
            // The destination's circuit is the backoff for destination trouble (no sends while
            // open), so the event itself only waits the initial interval.
            SendError::Transient(_) | SendError::Destination(_) => {
                let delay = self
                    .next_delay_with(0, random_unit())
                    .unwrap_or_else(|| self.delay_without_jitter(1));
                (RetryDecision::RetryAfter(delay), false)
            }
        }
    }

    /// The un-jittered delay in milliseconds, capped at `maxIntervalMs`, never NaN or negative.
    fn capped_millis(&self, attempt: u32) -> f64 {
        // Large exponents overflow to infinity, which the cap turns into `maxIntervalMs`.
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let max = self.max_interval_ms as f64;
        let millis = self.initial_interval_ms as f64 * self.multiplier.powi(exponent);
        if millis.is_nan() { max } else { millis.clamp(0.0, max) }
    }
}

/// Clamps to [0, 1], mapping NaN to 0.
fn clamp_unit(value: f64) -> f64 {
    if value.is_nan() { 0.0 } else { value.clamp(0.0, 1.0) }
}

/// Converts non-negative milliseconds to a duration, rounded to the nanosecond (saturating).
fn millis_to_duration(millis: f64) -> Duration {
    // `as` saturates: NaN becomes 0, values beyond u64::MAX nanoseconds become u64::MAX.
    Duration::from_nanos((millis * 1_000_000.0).round() as u64)
}

/// A uniform sample in [0, 1) from a per-thread xorshift64* generator. `rand` is only a
/// dev-dependency, and jitter needs no cryptographic quality: the generator is seeded from the
/// standard library's randomly keyed hasher (`RandomState`), the clock and the thread id.
fn random_unit() -> f64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        let bits = x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        // 53 random bits scaled into [0, 1).
        bits as f64 * (1.0 / (1u64 << 53) as f64)
    })
}

/// A non-zero seed for [`random_unit`].
fn seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    std::thread::current().id().hash(&mut hasher);
    hasher.finish() | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_jitter() -> RetryPolicy {
        RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        }
    }

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    #[test]
    fn default_is_valid_and_matches_documentation() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.validate(), Ok(()));
        assert_eq!(policy.initial_interval_ms, 500);
        assert_eq!(policy.multiplier, 2.0);
        assert_eq!(policy.max_interval_ms, 60_000);
        assert_eq!(policy.max_attempts, 10);
        assert_eq!(policy.jitter, 0.2);
    }

    #[test]
    fn backoff_sequence_without_jitter_is_exponential_and_capped() {
        let policy = no_jitter();
        let delays: Vec<_> = (1..=10).map(|a| policy.delay_without_jitter(a)).collect();
        assert_eq!(
            delays,
            ms(&[500, 1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000, 60_000])
        );
        let next: Vec<_> = (1..10).map(|a| policy.next_delay(a)).collect();
        assert_eq!(next, delays[..9].iter().copied().map(Some).collect::<Vec<_>>());
        assert_eq!(policy.delay_without_jitter(0), Duration::from_millis(500));
        assert_eq!(policy.delay_without_jitter(u32::MAX), Duration::from_millis(60_000));
    }

    #[test]
    fn fractional_multiplier_and_small_cap() {
        let policy = RetryPolicy {
            initial_interval_ms: 100,
            multiplier: 1.5,
            max_interval_ms: 300,
            max_attempts: 6,
            jitter: 0.0,
        };
        let delays: Vec<_> = (1..=6).map(|a| policy.next_delay(a)).collect();
        let expected: Vec<_> = ms(&[100, 150, 225, 300, 300])
            .into_iter()
            .map(Some)
            .chain([None])
            .collect();
        assert_eq!(delays, expected);
    }

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        let policy = RetryPolicy::default();
        for attempt in 1..policy.max_attempts {
            let base = policy.delay_without_jitter(attempt).as_secs_f64();
            let samples: Vec<_> = (0..500).filter_map(|_| policy.next_delay(attempt)).collect();
            assert_eq!(samples.len(), 500);
            for delay in &samples {
                let secs = delay.as_secs_f64();
                assert!(
                    secs >= base * 0.8 - 1e-9 && secs <= base * 1.2 + 1e-9,
                    "{delay:?} vs {base}"
                );
                assert!(secs <= 60.0 * 1.2 + 1e-9);
            }
            assert!(samples.iter().any(|d| *d != samples[0]), "jitter never varied");
        }
    }

    #[test]
    fn jitter_extremes_from_explicit_samples() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.next_delay_with(1, 0.0), Some(Duration::from_millis(400)));
        assert_eq!(policy.next_delay_with(1, 0.5), Some(Duration::from_millis(500)));
        assert_eq!(policy.next_delay_with(1, 1.0), Some(Duration::from_millis(600)));
        assert_eq!(policy.next_delay_with(9, 1.0), Some(Duration::from_millis(72_000)));
        assert_eq!(policy.next_delay_with(9, f64::NAN), Some(Duration::from_millis(48_000)));
        assert_eq!(policy.next_delay_with(10, 0.5), None);
    }

    #[test]
    fn exhaustion_after_max_attempts() {
        let policy = RetryPolicy {
            max_attempts: 3,
            ..no_jitter()
        };
        assert_eq!(policy.next_delay(1), Some(Duration::from_millis(500)));
        assert_eq!(policy.next_delay(2), Some(Duration::from_millis(1000)));
        assert_eq!(policy.next_delay(3), None);
        assert_eq!(policy.next_delay(4), None);

        let error = SendError::Transient("broker down".into());
        assert_eq!(
            policy.decide(2, &error),
            RetryDecision::RetryAfter(Duration::from_millis(1000))
        );
        assert_eq!(
            policy.decide(3, &error),
            RetryDecision::DeadLetter {
                reason: "gave up after 3 attempts: broker down".into()
            }
        );

        let single = RetryPolicy {
            max_attempts: 1,
            ..no_jitter()
        };
        assert_eq!(single.next_delay(1), None);
    }

    #[test]
    fn destination_errors_and_probes_never_count_an_attempt() {
        let policy = RetryPolicy {
            max_attempts: 2,
            ..no_jitter()
        };
        let destination = SendError::Destination("unknown topic".into());
        let transient = SendError::Transient("broker down".into());
        for attempts in [0, 1, 5, 100] {
            let (decision, counted) = policy.decide_after(attempts, &destination, true);
            assert!(matches!(decision, RetryDecision::RetryAfter(_)), "{decision:?}");
            assert!(!counted);
            let (decision, counted) = policy.decide_after(attempts, &transient, false);
            assert!(matches!(decision, RetryDecision::RetryAfter(_)), "{decision:?}");
            assert!(!counted);
        }
        let (decision, counted) = policy.decide_after(1, &transient, true);
        assert!(matches!(decision, RetryDecision::DeadLetter { .. }), "{decision:?}");
        assert!(counted);
    }

    #[test]
    fn permanent_error_dead_letters_immediately() {
        let policy = RetryPolicy::default();
        let error = SendError::Message("message too large".into());
        assert_eq!(
            policy.decide(1, &error),
            RetryDecision::DeadLetter {
                reason: "permanent error: message too large".into()
            }
        );
    }

    #[test]
    fn validation_names_the_field() {
        let base = RetryPolicy::default();
        let cases = [
            (
                RetryPolicy {
                    multiplier: 0.5,
                    ..base.clone()
                },
                "retry.multiplier must be at least 1.0",
            ),
            (
                RetryPolicy {
                    multiplier: f64::NAN,
                    ..base.clone()
                },
                "retry.multiplier must be at least 1.0",
            ),
            (
                RetryPolicy {
                    jitter: 1.5,
                    ..base.clone()
                },
                "retry.jitter must be between 0 and 1",
            ),
            (
                RetryPolicy {
                    jitter: -0.1,
                    ..base.clone()
                },
                "retry.jitter must be between 0 and 1",
            ),
            (
                RetryPolicy {
                    initial_interval_ms: 1000,
                    max_interval_ms: 999,
                    ..base.clone()
                },
                "retry.maxIntervalMs must be at least initialIntervalMs",
            ),
            (
                RetryPolicy {
                    max_attempts: 0,
                    ..base.clone()
                },
                "retry.maxAttempts must be at least 1",
            ),
        ];
        for (policy, expected) in cases {
            let message = policy.validate().expect_err(expected).to_string();
            assert!(
                message.starts_with(expected),
                "{message:?} should start with {expected:?}"
            );
        }
        let edge = RetryPolicy {
            multiplier: 1.0,
            jitter: 1.0,
            initial_interval_ms: 0,
            max_interval_ms: 0,
            max_attempts: 1,
        };
        assert_eq!(edge.validate(), Ok(()));
    }

    #[test]
    fn serde_uses_camel_case_and_defaults_missing_fields() {
        let policy: RetryPolicy = serde_json::from_str(r#"{"maxAttempts": 3, "initialIntervalMs": 100}"#).unwrap();
        assert_eq!(
            policy,
            RetryPolicy {
                max_attempts: 3,
                initial_interval_ms: 100,
                ..RetryPolicy::default()
            }
        );
        let json = serde_json::to_value(RetryPolicy::default()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "initialIntervalMs": 500,
                "multiplier": 2.0,
                "maxIntervalMs": 60000,
                "maxAttempts": 10,
                "jitter": 0.2
            })
        );
        let schema = serde_json::to_value(schemars::schema_for!(RetryPolicy)).unwrap();
        let properties = &schema["properties"];
        for field in [
            "initialIntervalMs",
            "multiplier",
            "maxIntervalMs",
            "maxAttempts",
            "jitter",
        ] {
            assert!(
                properties[field]["description"].is_string(),
                "{field} lacks a description"
            );
        }
        assert_eq!(properties["jitter"]["maximum"], 1.0);
    }
}
