//! Validate: the ReplayJob and the EventPublisher it names, into the typed value the build
//! step needs. Pure; a missing publisher is a refusal the status reports (and waits out), not
//! an error that crash-loops the controller.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};

use crate::broker::BrokerConfig;
use crate::crd::EventPublisher;
use crate::crd::replay_job::{ReplayJob, ReplayJobSpec};
use crate::operator::validate::{ValidatedPublisher, validate as validate_publisher};
use crate::replay::plan::ReplayPlan;

/// Longest ReplayJob name: the Job is `<name>-replay` and Job names stay within 63.
pub const MAX_NAME: usize = 56;

/// Everything the build needs, derived once.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedReplay {
    pub name: String,
    pub namespace: String,
    /// The checkpoint key: a new ReplayJob of the same name starts afresh.
    pub uid: String,
    pub owner: OwnerReference,
    /// Passed to the Job as JSON; the replay process parses it into its own plan.
    pub spec: ReplayJobSpec,
    /// The publisher, without its admin token (a replay serves no admin API).
    pub publisher: ValidatedPublisher,
}

/// Why no Job can be created (yet).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("EventPublisher {0} does not exist in this namespace; the replay waits for it")]
    PublisherMissing(String),
    #[error("EventPublisher {name} cannot be used: {reason}")]
    PublisherInvalid { name: String, reason: String },
    #[error("consumerGroupRewind needs a Kafka publisher; {publisher} uses {broker}")]
    RewindNeedsKafka { publisher: String, broker: &'static str },
    #[error("{0}")]
    Spec(String),
    #[error("ReplayJob name {0} is longer than {MAX_NAME} characters")]
    NameTooLong(String),
    #[error("the ReplayJob has no {0} yet")]
    Metadata(&'static str),
}

impl Refusal {
    /// A missing publisher can appear later; everything else needs a new ReplayJob (the spec is
    /// immutable).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Refusal::PublisherMissing(_) | Refusal::Metadata(_))
    }
}

/// Checks the ReplayJob against its publisher (`None` when the publisher does not exist).
pub fn validate(job: &ReplayJob, publisher: Option<&EventPublisher>) -> Result<ValidatedReplay, Refusal> {
    let name = job.metadata.name.clone().ok_or(Refusal::Metadata("name"))?;
    let namespace = job.namespace().ok_or(Refusal::Metadata("namespace"))?;
    let uid = job.metadata.uid.clone().ok_or(Refusal::Metadata("uid"))?;
    if name.len() > MAX_NAME {
        return Err(Refusal::NameTooLong(name));
    }
    let owner = job.controller_owner_ref(&()).ok_or(Refusal::Metadata("uid"))?;
    let wanted = &job.spec.publisher_ref.name;
    let publisher = publisher.ok_or_else(|| Refusal::PublisherMissing(wanted.clone()))?;
    let mut validated = validate_publisher(publisher).map_err(|e| Refusal::PublisherInvalid {
        name: wanted.clone(),
        reason: e.to_string(),
    })?;
    validated.admin_token = None;
    ReplayPlan::from_spec(&job.spec, &validated.relay.publisher).map_err(|e| Refusal::Spec(e.to_string()))?;
    if job.spec.consumer_group_rewind.is_some() && !matches!(validated.relay.broker, BrokerConfig::Kafka(_)) {
        return Err(Refusal::RewindNeedsKafka {
            publisher: wanted.clone(),
            broker: validated.broker_kind,
        });
    }
    Ok(ValidatedReplay {
        name,
        namespace,
        uid,
        owner,
        spec: job.spec.clone(),
        publisher: validated,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::operator::validate::tests::kafka_publisher;

    pub(crate) fn replay_job(spec: serde_json::Value) -> ReplayJob {
        let mut job: ReplayJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "outbox.inventory.io/v1alpha1",
            "kind": "ReplayJob",
            "metadata": {"name": "nightly", "namespace": "shop", "uid": "a1b2c3"},
            "spec": spec,
        }))
        .expect("replay job");
        job.metadata.generation = Some(1);
        job
    }

    #[test]
    fn a_valid_replay_carries_the_publisher_without_its_admin_token() {
        let publisher = kafka_publisher();
        let job = replay_job(serde_json::json!({"publisherRef": {"name": "orders"}}));
        let v = validate(&job, Some(&publisher)).expect("valid");
        assert_eq!(v.uid, "a1b2c3");
        assert_eq!(v.publisher.name, "orders");
        assert!(v.publisher.admin_token.is_none());
        assert_eq!(v.owner.kind, "ReplayJob");
    }

    #[test]
    fn the_example_replay_jobs_are_valid_against_a_kafka_publisher() {
        let examples = [
            include_str!("../../../examples/replayjobs/time-window.yaml"),
            include_str!("../../../examples/replayjobs/one-aggregate.yaml"),
            include_str!("../../../examples/replayjobs/dry-run.yaml"),
            include_str!("../../../examples/replayjobs/dead-letter-redrive.yaml"),
            include_str!("../../../examples/replayjobs/override-dry-run.yaml"),
            include_str!("../../../examples/replayjobs/rewind.yaml"),
        ];
        for text in examples {
            let mut job: ReplayJob = serde_saphyr::from_str(text).expect("example parses as a ReplayJob");
            job.metadata.namespace = Some("shop".into());
            job.metadata.uid = Some("e".into());
            validate(&job, Some(&kafka_publisher())).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    #[test]
    fn a_missing_publisher_waits_and_a_bad_range_is_final() {
        let job = replay_job(serde_json::json!({"publisherRef": {"name": "orders"}}));
        let missing = validate(&job, None).unwrap_err();
        assert_eq!(missing, Refusal::PublisherMissing("orders".into()));
        assert!(!missing.is_permanent());
        let bad = replay_job(serde_json::json!({"publisherRef": {"name": "orders"},
            "from": {"position": 10}, "to": {"position": 2}}));
        let refused = validate(&bad, Some(&kafka_publisher())).unwrap_err();
        assert!(refused.is_permanent());
        assert!(refused.to_string().contains("from.position"), "{refused}");
    }
}
