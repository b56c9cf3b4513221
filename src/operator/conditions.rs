//! Status conditions: the types and reasons as constants, and a builder that keeps
//! `lastTransitionTime` when a condition's status did not change, so the time says when the
//! state began rather than when the operator last looked.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types.
pub mod types {
    pub const READY: &str = "Ready";
    pub const BROKER_READY: &str = "BrokerReady";
    pub const OUTBOX_READY: &str = "OutboxReady";
    pub const CIRCUIT_CLOSED: &str = "CircuitClosed";
    pub const WORKERS_AVAILABLE: &str = "WorkersAvailable";
    pub const TOPOLOGY_PROVISIONED: &str = "TopologyProvisioned";
    pub const PAUSED: &str = "Paused";
    pub const DELETING: &str = "Deleting";
    /// True while the dead-lettered count grows; False is the healthy state.
    pub const DEAD_LETTERING: &str = "DeadLettering";
}

/// Condition reasons (CamelCase, stable: alerts and scripts match on them).
pub mod reasons {
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const NO_RELAY_ANSWERED: &str = "NoRelayAnswered";
    pub const CIRCUIT_OPEN: &str = "CircuitOpen";
    pub const CIRCUIT_HALF_OPEN: &str = "CircuitHalfOpen";
    pub const BROKER_UNREACHABLE: &str = "BrokerUnreachable";
    pub const DEAD_LETTERS_PRESENT: &str = "DeadLettersPresent";
    pub const DEAD_LETTERS_GROWING: &str = "DeadLettersGrowing";
    pub const NO_NEW_DEAD_LETTERS: &str = "NoNewDeadLetters";
    pub const WORKERS_UNAVAILABLE: &str = "WorkersUnavailable";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const PAUSED: &str = "Paused";
    pub const RUNNING: &str = "Running";
    pub const PROVISIONED: &str = "Provisioned";
    pub const PROVISION_FAILED: &str = "ProvisionFailed";
    pub const CLEANUP_RUNNING: &str = "CleanupRunning";
    pub const CLEANUP_FAILED: &str = "CleanupFailed";
}

/// One condition as this reconcile computed it, before transition times are settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub type_: &'static str,
    /// `None` is `Unknown`: nothing answered that could say.
    pub status: Option<bool>,
    pub reason: &'static str,
    pub message: String,
}

impl Observed {
    pub fn new(type_: &'static str, status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: Some(status),
            reason,
            message: message.into(),
        }
    }

    /// A condition nothing could confirm or deny.
    pub fn unknown(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: None,
            reason,
            message: message.into(),
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == Some(true)
    }
}

/// The conditions to write: `observed` in order, each keeping the previous
/// `lastTransitionTime` of its type when the status is unchanged, and taking `now` otherwise.
pub fn settle(previous: &[Condition], observed: Vec<Observed>, generation: Option<i64>, now: Time) -> Vec<Condition> {
    observed
        .into_iter()
        .map(|o| {
            let status = match o.status {
                Some(true) => "True",
                Some(false) => "False",
                None => "Unknown",
            }
            .to_owned();
            let since = previous
                .iter()
                .find(|c| c.type_ == o.type_ && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: o.type_.to_owned(),
                status,
                reason: o.reason.to_owned(),
                message: o.message,
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// Types whose status changed between `previous` and `next` (including new ones): the
/// transitions that deserve a Kubernetes Event.
pub fn transitions<'a>(previous: &[Condition], next: &'a [Condition]) -> Vec<&'a Condition> {
    next.iter()
        .filter(|n| {
            previous
                .iter()
                .find(|p| p.type_ == n.type_)
                .is_none_or(|p| p.status != n.status)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).expect("valid time"))
    }

    #[test]
    fn transition_time_moves_only_when_the_status_does() {
        let first = settle(
            &[],
            vec![Observed::new(
                types::READY,
                false,
                reasons::NO_RELAY_ANSWERED,
                "no relay answered",
            )],
            Some(1),
            at(100),
        );
        assert_eq!(first[0].last_transition_time, at(100));
        // Same status, new message: the time stays.
        let same = settle(
            &first,
            vec![Observed::new(
                types::READY,
                false,
                reasons::WORKERS_UNAVAILABLE,
                "0/2 ready",
            )],
            Some(2),
            at(200),
        );
        assert_eq!(same[0].last_transition_time, at(100));
        assert_eq!(same[0].reason, "WorkersUnavailable");
        assert_eq!(same[0].observed_generation, Some(2));
        assert!(transitions(&first, &same).is_empty());
        // Flipped: the time moves and it is a transition.
        let flipped = settle(
            &same,
            vec![Observed::new(types::READY, true, reasons::AS_EXPECTED, "")],
            Some(2),
            at(300),
        );
        assert_eq!(flipped[0].last_transition_time, at(300));
        assert_eq!(transitions(&same, &flipped).len(), 1);
    }
}
