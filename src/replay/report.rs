//! What a replay Pod tells the operator: the same JSON document on its status endpoint while
//! it runs and in its termination message when it ends (the operator holds no database
//! credentials, so this is all it learns).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crd::replay_job::PartitionOffsets;

/// Where the replay process is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReportPhase {
    /// Counting or sending.
    #[default]
    Running,
    /// Went through the whole range (some events may have failed: see `failed`).
    Completed,
    /// Stopped by SIGTERM at a checkpoint; a new Pod resumes after it.
    Stopped,
    /// Could not go on (database, broker, or a refused rewind).
    Failed,
}

/// Progress and final counts of one replay.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayReport {
    pub phase: ReportPhase,
    /// Selected events in the range (fixed when the first run counts them).
    pub matched: i64,
    /// Events sent and acknowledged. A restarted run starts from the checkpoint's count, so a
    /// batch re-sent after a kill counts once (the duplicates are on the broker, not here).
    pub replayed: i64,
    /// Events given up after the retry policy, and later events of their aggregates.
    pub failed: i64,
    /// Every selected event at or below this position was handled.
    pub checkpoint: i64,
    /// The settled end the replay reads up to.
    pub end_position: Option<i64>,
    /// Pods that worked on this replay, this one included (2 or more after a resume).
    pub runs: i32,
    /// The checkpoint this run resumed after (absent on the first run). Events a killed run
    /// sent above it are sent again: at-least-once, as the relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<i64>,
    /// Counted only, nothing sent.
    pub dry_run: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    /// A consumer-group rewind's offsets per partition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offsets: Vec<PartitionOffsets>,
    /// Why the replay failed or was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// A stable reason for the operator's condition (e.g. `GroupHasActiveMembers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ReplayReport {
    /// `handled / matched` as a whole percentage (100% for an empty range).
    pub fn progress(&self) -> String {
        if self.matched <= 0 {
            return if self.phase == ReportPhase::Completed {
                "100%".into()
            } else {
                "0%".into()
            };
        }
        let handled = (self.replayed + self.failed).min(self.matched);
        format!("{}%", handled * 100 / self.matched)
    }

    /// The document as kubelet keeps it: termination messages are cut at 4 KiB, so the
    /// per-partition offsets go first when it is too long.
    pub fn termination_message(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        if text.len() <= 4096 {
            return text;
        }
        let mut short = self.clone();
        short.offsets.truncate(20);
        short.message = short.message.map(|m| m.chars().take(512).collect());
        serde_json::to_string(&short).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_a_percentage_of_the_matched_events() {
        let mut r = ReplayReport {
            matched: 200,
            replayed: 49,
            failed: 1,
            ..Default::default()
        };
        assert_eq!(r.progress(), "25%");
        r.matched = 0;
        assert_eq!(r.progress(), "0%");
        r.phase = ReportPhase::Completed;
        assert_eq!(r.progress(), "100%");
    }

    #[test]
    fn a_long_report_still_fits_a_termination_message() {
        let r = ReplayReport {
            offsets: (0..500)
                .map(|p| PartitionOffsets {
                    topic: "inventory.events.with.a.long.name".into(),
                    partition: p,
                    before: Some(1),
                    after: 0,
                })
                .collect(),
            ..Default::default()
        };
        let text = r.termination_message();
        assert!(text.len() <= 4096, "{}", text.len());
        let back: ReplayReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back.offsets.len(), 20);
    }
}
