//! Status: the ReplayJob's phase, counts and conditions from what the cluster shows (the Job's
//! state, the running Pod's status endpoint, a finished Pod's termination message). Pure;
//! recomputed from scratch each round, terminal phases stick.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::validate::Refusal;
use crate::crd::replay_job::{ReplayJobStatus, ReplayPhase};
use crate::operator::conditions::{Observed, settle};
use crate::replay::report::{ReplayReport, ReportPhase};

/// Condition types of a ReplayJob.
pub mod types {
    pub const PUBLISHER_FOUND: &str = "PublisherFound";
    pub const RUNNING: &str = "Running";
    pub const COMPLETE: &str = "Complete";
}

/// Condition reasons of a ReplayJob.
pub mod reasons {
    pub const FOUND: &str = "Found";
    pub const PUBLISHER_NOT_FOUND: &str = "PublisherNotFound";
    pub const PUBLISHER_INVALID: &str = "PublisherInvalid";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const JOB_PENDING: &str = "JobPending";
    pub const REPLAYING: &str = "Replaying";
    pub const NOT_RUNNING: &str = "NotRunning";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const EVENTS_FAILED: &str = "EventsFailed";
    pub const JOB_FAILED: &str = "JobFailed";
    pub const GROUP_HAS_ACTIVE_MEMBERS: &str = "GroupHasActiveMembers";
    pub const CANCELLED: &str = "Cancelled";
    pub const IN_PROGRESS: &str = "InProgress";
}

/// The Job as the API server reports it.
#[derive(Clone, Debug, PartialEq)]
pub enum JobState {
    /// Not created (the ReplayJob was refused, or is being created).
    Absent,
    /// Created, not finished.
    Active { start_time: Option<Time> },
    Succeeded {
        start_time: Option<Time>,
        completion_time: Option<Time>,
    },
    /// Gave up (backoffLimit reached), with the Job controller's message.
    Failed { start_time: Option<Time>, message: String },
}

/// What this round saw.
#[derive(Clone, Debug, PartialEq)]
pub struct Observations {
    pub refusal: Option<Refusal>,
    pub job: JobState,
    /// The running Pod's answer.
    pub live: Option<ReplayReport>,
    /// The newest termination message of a finished Pod.
    pub finished: Option<ReplayReport>,
    /// The ReplayJob is being deleted before its Job finished.
    pub cancelling: bool,
}

fn is_terminal(phase: Option<ReplayPhase>) -> bool {
    matches!(
        phase,
        Some(ReplayPhase::Succeeded | ReplayPhase::Failed | ReplayPhase::Cancelled)
    )
}

/// The status to write.
pub fn compute(seen: &Observations, previous: &ReplayJobStatus, generation: Option<i64>, now: Time) -> ReplayJobStatus {
    if is_terminal(previous.phase) {
        return previous.clone();
    }
    let report = seen.live.as_ref().or(seen.finished.as_ref());
    let mut status = ReplayJobStatus {
        observed_generation: generation,
        matched: report.map(|r| r.matched).or(previous.matched),
        replayed: report.map(|r| r.replayed).or(previous.replayed),
        failed: report.map(|r| r.failed).or(previous.failed),
        progress: report.map(ReplayReport::progress).or_else(|| previous.progress.clone()),
        checkpoint: report.map(|r| r.checkpoint).or(previous.checkpoint),
        offsets: report
            .map(|r| r.offsets.clone())
            .unwrap_or_else(|| previous.offsets.clone()),
        start_time: previous.start_time.clone(),
        completion_time: None,
        ..ReplayJobStatus::default()
    };
    let found = match &seen.refusal {
        Some(Refusal::PublisherMissing(_)) => Observed::new(
            types::PUBLISHER_FOUND,
            false,
            reasons::PUBLISHER_NOT_FOUND,
            seen.refusal.as_ref().map(ToString::to_string).unwrap_or_default(),
        ),
        Some(r @ Refusal::PublisherInvalid { .. }) => {
            Observed::new(types::PUBLISHER_FOUND, false, reasons::PUBLISHER_INVALID, r.to_string())
        }
        _ => Observed::new(types::PUBLISHER_FOUND, true, reasons::FOUND, ""),
    };
    let (phase, running, complete) = if seen.cancelling {
        (
            ReplayPhase::Cancelled,
            Observed::new(
                types::RUNNING,
                false,
                reasons::CANCELLED,
                "the ReplayJob is being deleted",
            ),
            Observed::new(
                types::COMPLETE,
                false,
                reasons::CANCELLED,
                "cancelled: the Job and its Pod are being deleted",
            ),
        )
    } else if let Some(refusal) = &seen.refusal {
        let reason = match refusal {
            Refusal::PublisherMissing(_) => reasons::PUBLISHER_NOT_FOUND,
            Refusal::PublisherInvalid { .. } => reasons::PUBLISHER_INVALID,
            _ => reasons::INVALID_SPEC,
        };
        let phase = if refusal.is_permanent() {
            ReplayPhase::Failed
        } else {
            ReplayPhase::Pending
        };
        (
            phase,
            Observed::new(types::RUNNING, false, reason, refusal.to_string()),
            Observed::new(types::COMPLETE, false, reason, refusal.to_string()),
        )
    } else {
        match &seen.job {
            JobState::Absent => (
                ReplayPhase::Pending,
                Observed::new(types::RUNNING, false, reasons::JOB_PENDING, "creating the Job"),
                Observed::new(types::COMPLETE, false, reasons::IN_PROGRESS, ""),
            ),
            JobState::Active { start_time } => {
                status.start_time = start_time.clone().or(status.start_time);
                if seen.live.is_some() {
                    (
                        ReplayPhase::Running,
                        Observed::new(types::RUNNING, true, reasons::REPLAYING, "the replay Pod answers"),
                        Observed::new(types::COMPLETE, false, reasons::IN_PROGRESS, ""),
                    )
                } else {
                    // Between Pods (a killed Pod is being replaced) the phase stays Running.
                    let phase = if previous.phase == Some(ReplayPhase::Running) {
                        ReplayPhase::Running
                    } else {
                        ReplayPhase::Pending
                    };
                    (
                        phase,
                        Observed::new(types::RUNNING, false, reasons::NOT_RUNNING, "no replay Pod answers yet"),
                        Observed::new(types::COMPLETE, false, reasons::IN_PROGRESS, ""),
                    )
                }
            }
            JobState::Succeeded {
                start_time,
                completion_time,
            } => {
                status.start_time = start_time.clone().or(status.start_time);
                status.completion_time = completion_time.clone().or_else(|| Some(now.clone()));
                let failed = seen.finished.as_ref().map_or(0, |r| r.failed);
                if failed > 0 {
                    (
                        ReplayPhase::Failed,
                        Observed::new(types::RUNNING, false, reasons::NOT_RUNNING, "the replay ended"),
                        Observed::new(
                            types::COMPLETE,
                            false,
                            reasons::EVENTS_FAILED,
                            format!("{failed} event(s) could not be sent after the publisher's retry policy"),
                        ),
                    )
                } else {
                    (
                        ReplayPhase::Succeeded,
                        Observed::new(types::RUNNING, false, reasons::NOT_RUNNING, "the replay ended"),
                        Observed::new(
                            types::COMPLETE,
                            true,
                            reasons::SUCCEEDED,
                            "every matched event was handled",
                        ),
                    )
                }
            }
            JobState::Failed { start_time, message } => {
                status.start_time = start_time.clone().or(status.start_time);
                status.completion_time = Some(now.clone());
                let (reason, why) = match seen.finished.as_ref() {
                    Some(r) if r.phase == ReportPhase::Failed => (
                        if r.reason.as_deref() == Some(reasons::GROUP_HAS_ACTIVE_MEMBERS) {
                            reasons::GROUP_HAS_ACTIVE_MEMBERS
                        } else {
                            reasons::JOB_FAILED
                        },
                        r.message.clone().unwrap_or_else(|| message.clone()),
                    ),
                    _ => (reasons::JOB_FAILED, message.clone()),
                };
                (
                    ReplayPhase::Failed,
                    Observed::new(types::RUNNING, false, reasons::NOT_RUNNING, "the Job gave up"),
                    Observed::new(types::COMPLETE, false, reason, why),
                )
            }
        }
    };
    if phase == ReplayPhase::Cancelled || (phase == ReplayPhase::Failed && status.completion_time.is_none()) {
        status.completion_time = Some(now.clone());
    }
    status.phase = Some(phase);
    status.conditions = settle(&previous.conditions, vec![found, running, complete], generation, now);
    status
}

/// The Event a phase change deserves: (reason, note, is a warning).
pub fn phase_event(previous: Option<ReplayPhase>, next: &ReplayJobStatus) -> Option<(&'static str, String, bool)> {
    let phase = next.phase?;
    if previous == Some(phase) {
        return None;
    }
    let counts = format!(
        "matched {}, replayed {}, failed {}",
        next.matched.unwrap_or(0),
        next.replayed.unwrap_or(0),
        next.failed.unwrap_or(0)
    );
    let complete = next.conditions.iter().find(|c| c.type_ == types::COMPLETE);
    let why = complete.map(|c| c.message.clone()).unwrap_or_default();
    match phase {
        ReplayPhase::Pending => None,
        ReplayPhase::Running => Some(("ReplayStarted", "the replay Pod is running".into(), false)),
        ReplayPhase::Succeeded => Some(("ReplaySucceeded", counts, false)),
        ReplayPhase::Failed => Some(("ReplayFailed", format!("{why} ({counts})"), true)),
        ReplayPhase::Cancelled => Some(("ReplayCancelled", format!("deleted while running ({counts})"), true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).expect("time"))
    }

    fn seen(job: JobState) -> Observations {
        Observations {
            refusal: None,
            job,
            live: None,
            finished: None,
            cancelling: false,
        }
    }

    fn complete(s: &ReplayJobStatus) -> (String, String) {
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == types::COMPLETE)
            .expect("Complete");
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn a_missing_publisher_is_pending_with_a_condition_saying_so() {
        let mut o = seen(JobState::Absent);
        o.refusal = Some(Refusal::PublisherMissing("orders".into()));
        let s = compute(&o, &ReplayJobStatus::default(), Some(1), at(10));
        assert_eq!(s.phase, Some(ReplayPhase::Pending));
        let found = s.conditions.iter().find(|c| c.type_ == types::PUBLISHER_FOUND).unwrap();
        assert_eq!(
            (found.status.as_str(), found.reason.as_str()),
            ("False", "PublisherNotFound")
        );
        assert!(found.message.contains("orders"));
    }

    #[test]
    fn progress_is_mirrored_while_running_and_the_final_report_decides_the_end() {
        let mut o = seen(JobState::Active {
            start_time: Some(at(5)),
        });
        o.live = Some(ReplayReport {
            matched: 200,
            replayed: 50,
            checkpoint: 77,
            ..Default::default()
        });
        let running = compute(&o, &ReplayJobStatus::default(), Some(1), at(10));
        assert_eq!(running.phase, Some(ReplayPhase::Running));
        assert_eq!(running.progress.as_deref(), Some("25%"));
        assert_eq!(running.checkpoint, Some(77));
        assert_eq!(running.start_time, Some(at(5)));
        assert_eq!(phase_event(None, &running).map(|e| e.0), Some("ReplayStarted"));

        // The Pod was killed: between Pods the phase stays Running with the last counts.
        let between = compute(
            &seen(JobState::Active {
                start_time: Some(at(5)),
            }),
            &running,
            Some(1),
            at(12),
        );
        assert_eq!(between.phase, Some(ReplayPhase::Running));
        assert_eq!(between.replayed, Some(50));
        assert_eq!(phase_event(running.phase, &between), None);

        let mut done = seen(JobState::Succeeded {
            start_time: Some(at(5)),
            completion_time: Some(at(20)),
        });
        done.finished = Some(ReplayReport {
            phase: ReportPhase::Completed,
            matched: 200,
            replayed: 200,
            ..Default::default()
        });
        let succeeded = compute(&done, &between, Some(1), at(21));
        assert_eq!(succeeded.phase, Some(ReplayPhase::Succeeded));
        assert_eq!(succeeded.progress.as_deref(), Some("100%"));
        assert_eq!(succeeded.completion_time, Some(at(20)));
        assert_eq!(complete(&succeeded), ("True".into(), "Succeeded".into()));
        // Terminal phases stick.
        assert_eq!(compute(&seen(JobState::Absent), &succeeded, Some(1), at(30)), succeeded);
    }

    #[test]
    fn failed_events_a_refused_rewind_and_a_deletion_are_reported() {
        let mut done = seen(JobState::Succeeded {
            start_time: None,
            completion_time: None,
        });
        done.finished = Some(ReplayReport {
            phase: ReportPhase::Completed,
            matched: 3,
            replayed: 2,
            failed: 1,
            ..Default::default()
        });
        let s = compute(&done, &ReplayJobStatus::default(), Some(1), at(1));
        assert_eq!(s.phase, Some(ReplayPhase::Failed));
        assert_eq!(complete(&s).1, "EventsFailed");

        let mut refused = seen(JobState::Failed {
            start_time: None,
            message: "BackoffLimitExceeded".into(),
        });
        refused.finished = Some(ReplayReport {
            phase: ReportPhase::Failed,
            reason: Some("GroupHasActiveMembers".into()),
            message: Some("consumer group g has 1 active member(s)".into()),
            ..Default::default()
        });
        let s = compute(&refused, &ReplayJobStatus::default(), Some(1), at(1));
        assert_eq!(complete(&s).1, "GroupHasActiveMembers");

        let mut cancel = seen(JobState::Active { start_time: None });
        cancel.cancelling = true;
        let s = compute(&cancel, &ReplayJobStatus::default(), Some(1), at(1));
        assert_eq!(s.phase, Some(ReplayPhase::Cancelled));
        assert!(s.completion_time.is_some());
        assert_eq!(
            phase_event(Some(ReplayPhase::Running), &s).map(|e| e.0),
            Some("ReplayCancelled")
        );
    }
}
