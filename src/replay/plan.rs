//! The replay's typed plan, parsed once from the ReplayJob spec the operator passes to the Job
//! (pure; the engine never reads the raw spec).

use crate::broker::routing::Routing;
use crate::crd::replay_job::{ReplayJobSpec, ReplaySource};
use crate::event::DomainEvent;
use crate::store::replay::ReplaySelection;

/// What one replay does.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// Re-send the selected events through the broker adapter.
    Publish(PublishPlan),
    /// Move a Kafka consumer group's committed offsets back to `from` instead.
    RewindGroup {
        group: String,
        from: chrono::DateTime<chrono::Utc>,
    },
}

/// A re-publishing replay.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishPlan {
    pub selection: ReplaySelection,
    /// One destination for every event instead of the publisher's routing.
    pub target: Option<String>,
    /// Most events sent per second.
    pub rate_limit: Option<u32>,
    pub dry_run: bool,
}

/// A whole plan: the mode plus the dry-run flag shared by both.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayPlan {
    pub mode: Mode,
    pub dry_run: bool,
}

/// A spec the API server's rules should have refused; checked again because the Job can be
/// started by hand with any JSON.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("replay spec is not valid JSON: {0}")]
    Parse(String),
    #[error("replay range is empty: {0}")]
    Range(&'static str),
    #[error("rateLimit must be between 1 and 1000000 events per second (got {0})")]
    RateLimit(i64),
    #[error("consumerGroupRewind needs from.time")]
    RewindWithoutTime,
    #[error("consumerGroupRewind cannot be combined with source deadLetters, target or rateLimit")]
    RewindCombined,
}

impl ReplayPlan {
    /// Parses the spec JSON passed as `--spec`.
    pub fn parse(json: &str, publisher: &str) -> Result<Self, PlanError> {
        let spec: ReplayJobSpec = serde_json::from_str(json).map_err(|e| PlanError::Parse(e.to_string()))?;
        Self::from_spec(&spec, publisher)
    }

    /// Validates the spec into a plan; `publisher` names the consumer whose dead letters a
    /// redrive re-sends.
    pub fn from_spec(spec: &ReplayJobSpec, publisher: &str) -> Result<Self, PlanError> {
        let from = spec.from.as_ref();
        let to = spec.to.as_ref();
        let (from_time, from_position) = (from.and_then(|b| b.time), from.and_then(|b| b.position));
        let (to_time, to_position) = (to.and_then(|b| b.time), to.and_then(|b| b.position));
        if let (Some(f), Some(t)) = (from_time, to_time)
            && f > t
        {
            return Err(PlanError::Range("from.time is after to.time"));
        }
        if let (Some(f), Some(t)) = (from_position, to_position)
            && f > t
        {
            return Err(PlanError::Range("from.position is greater than to.position"));
        }
        if let Some(group) = &spec.consumer_group_rewind {
            let from = from_time.ok_or(PlanError::RewindWithoutTime)?;
            if spec.source != ReplaySource::EventStore || spec.target.is_some() || spec.rate_limit.is_some() {
                return Err(PlanError::RewindCombined);
            }
            return Ok(Self {
                mode: Mode::RewindGroup {
                    group: group.group.clone(),
                    from,
                },
                dry_run: spec.dry_run,
            });
        }
        let rate_limit = match spec.rate_limit {
            None => None,
            Some(r) if (1..=1_000_000).contains(&r) => u32::try_from(r).ok(),
            Some(r) => return Err(PlanError::RateLimit(r)),
        };
        let filter = spec.filter.clone().unwrap_or_default();
        let selection = ReplaySelection {
            from_position,
            to_position,
            from_time,
            to_time,
            event_types: filter.event_types,
            aggregate_types: filter.aggregate_types,
            aggregate_ids: filter.aggregate_ids,
            dead_lettered_by: (spec.source == ReplaySource::DeadLetters).then(|| publisher.to_owned()),
        };
        Ok(Self {
            mode: Mode::Publish(PublishPlan {
                selection,
                target: spec.target.as_ref().map(|t| t.destination.clone()),
                rate_limit,
                dry_run: spec.dry_run,
            }),
            dry_run: spec.dry_run,
        })
    }
}

impl PublishPlan {
    /// Where one event goes: the override, or the publisher's own routing.
    pub fn destination(&self, routing: &Routing, event: &DomainEvent) -> String {
        self.target.clone().unwrap_or_else(|| routing.destination(event))
    }

    /// Events per batch (and so per checkpoint): rate-limited replays checkpoint at least
    /// every two seconds, so SIGTERM never waits long for the batch in flight.
    pub fn batch_size(&self, configured: usize) -> i64 {
        let configured = i64::try_from(configured.clamp(1, 10_000)).unwrap_or(1000);
        match self.rate_limit {
            Some(rate) => configured.min((i64::from(rate) * 2).max(1)),
            None => configured,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(spec: serde_json::Value) -> Result<ReplayPlan, PlanError> {
        ReplayPlan::parse(&spec.to_string(), "orders")
    }

    #[test]
    fn a_time_window_with_filters_becomes_an_inclusive_selection() {
        let p = plan(json!({
            "publisherRef": {"name": "orders"},
            "from": {"time": "2026-01-01T00:00:00Z"},
            "to": {"position": 900},
            "filter": {"eventTypes": ["Stockout"], "aggregateIds": ["i-1"]},
            "target": {"destination": "replayed"},
            "rateLimit": 50
        }))
        .unwrap();
        let Mode::Publish(p) = p.mode else {
            panic!("publish mode")
        };
        assert_eq!(p.selection.from_time.unwrap().to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert_eq!(p.selection.to_position, Some(900));
        assert_eq!(p.selection.event_types, ["Stockout"]);
        assert_eq!(p.selection.dead_lettered_by, None);
        assert_eq!(p.target.as_deref(), Some("replayed"));
        assert_eq!(p.rate_limit, Some(50));
        assert_eq!(
            p.batch_size(1000),
            100,
            "two seconds of a rate-limited replay per checkpoint"
        );
    }

    #[test]
    fn dead_letter_source_selects_the_publishers_dead_letters() {
        let p = plan(json!({"publisherRef": {"name": "orders"}, "source": "deadLetters"})).unwrap();
        let Mode::Publish(p) = p.mode else {
            panic!("publish mode")
        };
        assert_eq!(p.selection.dead_lettered_by.as_deref(), Some("orders"));
    }

    #[test]
    fn rewind_needs_a_time_and_publishes_nothing() {
        let p = plan(
            json!({"publisherRef": {"name": "o"}, "from": {"time": "2026-01-01T00:00:00Z"},
            "consumerGroupRewind": {"group": "billing"}, "dryRun": true}),
        )
        .unwrap();
        assert!(matches!(p.mode, Mode::RewindGroup { ref group, .. } if group == "billing"));
        assert!(p.dry_run);
        assert_eq!(
            plan(json!({"publisherRef": {"name": "o"}, "consumerGroupRewind": {"group": "g"}})).unwrap_err(),
            PlanError::RewindWithoutTime
        );
        assert_eq!(
            plan(
                json!({"publisherRef": {"name": "o"}, "from": {"time": "2026-01-01T00:00:00Z"},
                "rateLimit": 5, "consumerGroupRewind": {"group": "g"}})
            )
            .unwrap_err(),
            PlanError::RewindCombined
        );
    }

    #[test]
    fn inverted_ranges_and_bad_rates_are_refused() {
        assert!(matches!(
            plan(json!({"publisherRef": {"name": "o"}, "from": {"position": 9}, "to": {"position": 3}})),
            Err(PlanError::Range(_))
        ));
        assert_eq!(
            plan(json!({"publisherRef": {"name": "o"}, "rateLimit": 0})).unwrap_err(),
            PlanError::RateLimit(0)
        );
        assert!(matches!(plan(json!({"from": {}})), Err(PlanError::Parse(_))));
    }
}
