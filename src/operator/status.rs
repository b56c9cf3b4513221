//! Status (pure): the EventPublisher status from what the relay Pods answered on
//! `/api/v1/status`, the Deployment's replica counts and the provision step's report. When no
//! relay answers, the figures are cleared and the conditions say so: stale numbers would look
//! healthy.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::conditions::{Observed, reasons, settle, types};
use super::validate::ValidatedPublisher;
use crate::crd::EventPublisherStatus;
use crate::crd::event_publisher::{DestinationCircuit, ProvisionedResource};
use crate::relay::status::{RelayStatus, circuit_rank};

/// What the provision init container last reported (its termination message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProvisionOutcome {
    /// Topology in place; how many resources it created and corrected.
    Provisioned {
        created: Vec<ProvisionedResource>,
        corrected: usize,
    },
    /// The step failed; `reason` is the step's stable label, `message` says what to change.
    Failed { reason: String, message: String },
}

/// What dereferencing the cluster found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observations {
    /// Answers of the relay Pods that answered.
    pub reports: Vec<RelayStatus>,
    /// Relay Pods asked that did not answer, with why.
    pub unanswered: Vec<String>,
    pub ready_replicas: i32,
    pub provision: Option<ProvisionOutcome>,
    /// What any relay Pod's provision step reported created: with several replicas the
    /// first creates and the others find everything in place, so the latest report alone
    /// would lose the record of what `deletionPolicy: Delete` must remove.
    pub created: Vec<ProvisionedResource>,
}

fn circuit_word(state: &str) -> &'static str {
    match state {
        "open" => "Open",
        "half_open" => "HalfOpen",
        _ => "Closed",
    }
}

/// Computes the status to write.
pub fn compute(
    p: &ValidatedPublisher,
    seen: &Observations,
    previous: &EventPublisherStatus,
    now: Time,
) -> EventPublisherStatus {
    // Created resources accumulate: a later rollout finds them existing and reports none.
    let mut provisioned_resources = previous.provisioned_resources.clone();
    if let Some(ProvisionOutcome::Provisioned { created, .. }) = &seen.provision {
        provisioned_resources.extend(created.iter().cloned());
    }
    provisioned_resources.extend(seen.created.iter().cloned());
    provisioned_resources.sort();
    provisioned_resources.dedup();
    let previous_status = previous;
    let previous = previous.conditions.as_slice();
    let desired = p.replicas;
    let mut observed = Vec::new();
    let latest = seen.reports.iter().max_by_key(|r| r.published_total);
    let worst = seen
        .reports
        .iter()
        .map(|r| r.circuit_state.as_str())
        .max_by_key(|s| circuit_rank(s));
    let mut circuits: Vec<DestinationCircuit> = seen
        .reports
        .iter()
        .flat_map(|r| r.circuits.iter())
        .filter(|c| c.state != "closed")
        .map(|c| DestinationCircuit {
            destination: c.destination.clone(),
            state: circuit_word(&c.state).to_owned(),
        })
        .collect();
    circuits.sort_by(|a, b| (&a.destination, &a.state).cmp(&(&b.destination, &b.state)));
    circuits.dedup();

    let provision = match &seen.provision {
        Some(ProvisionOutcome::Provisioned { created, corrected }) => Observed::new(
            types::TOPOLOGY_PROVISIONED,
            true,
            reasons::PROVISIONED,
            format!(
                "broker topology in place ({} created, {corrected} corrected by the last rollout)",
                created.len()
            ),
        ),
        Some(ProvisionOutcome::Failed { reason: _, message }) => Observed::new(
            types::TOPOLOGY_PROVISIONED,
            false,
            reasons::PROVISION_FAILED,
            message.clone(),
        ),
        None => Observed::unknown(
            types::TOPOLOGY_PROVISIONED,
            reasons::NO_RELAY_ANSWERED,
            "no provision step has reported yet",
        ),
    };

    let workers = if p.paused {
        Observed::new(
            types::WORKERS_AVAILABLE,
            false,
            reasons::PAUSED,
            "paused: no relay runs",
        )
    } else if seen.ready_replicas >= desired {
        Observed::new(
            types::WORKERS_AVAILABLE,
            true,
            reasons::AS_EXPECTED,
            format!("{}/{desired} relays ready", seen.ready_replicas),
        )
    } else {
        Observed::new(
            types::WORKERS_AVAILABLE,
            false,
            reasons::WORKERS_UNAVAILABLE,
            format!("{}/{desired} relays ready", seen.ready_replicas),
        )
    };

    let no_answer = if p.paused {
        "paused: relays are stopped, events wait in the outbox".to_owned()
    } else if seen.unanswered.is_empty() {
        "no relay Pod is running to report".to_owned()
    } else {
        format!("no relay answered its status endpoint: {}", seen.unanswered.join("; "))
    };
    let (outbox, broker, circuit) = match latest {
        None => (
            Observed::unknown(types::OUTBOX_READY, reasons::NO_RELAY_ANSWERED, no_answer.clone()),
            Observed::unknown(types::BROKER_READY, reasons::NO_RELAY_ANSWERED, no_answer.clone()),
            Observed::unknown(types::CIRCUIT_CLOSED, reasons::NO_RELAY_ANSWERED, no_answer.clone()),
        ),
        Some(r) => {
            let unreachable: Vec<&str> = seen
                .reports
                .iter()
                .filter(|r| r.not_ready_reasons.iter().any(|m| m.contains("broker")))
                .map(|r| r.worker_id.as_str())
                .collect();
            let worst = worst.unwrap_or("closed");
            let open: Vec<String> = circuits
                .iter()
                .map(|c| format!("{} {}", c.destination, c.state))
                .collect();
            let broker = if !unreachable.is_empty() {
                Observed::new(
                    types::BROKER_READY,
                    false,
                    reasons::BROKER_UNREACHABLE,
                    format!("the broker does not answer relays {}", unreachable.join(", ")),
                )
            } else if worst == "open" {
                Observed::new(
                    types::BROKER_READY,
                    false,
                    reasons::CIRCUIT_OPEN,
                    format!("sends are failing: circuits {}", open.join(", ")),
                )
            } else {
                Observed::new(
                    types::BROKER_READY,
                    true,
                    reasons::AS_EXPECTED,
                    "the broker acknowledges sends",
                )
            };
            let circuit = match worst {
                "open" => Observed::new(
                    types::CIRCUIT_CLOSED,
                    false,
                    reasons::CIRCUIT_OPEN,
                    format!("circuit open: {}", open.join(", ")),
                ),
                "half_open" => Observed::new(
                    types::CIRCUIT_CLOSED,
                    false,
                    reasons::CIRCUIT_HALF_OPEN,
                    format!("probing: {}", open.join(", ")),
                ),
                _ => Observed::new(
                    types::CIRCUIT_CLOSED,
                    true,
                    reasons::AS_EXPECTED,
                    "every circuit is closed",
                ),
            };
            let outbox = Observed::new(
                types::OUTBOX_READY,
                true,
                reasons::AS_EXPECTED,
                format!("{} pending, {} dead-lettered", r.pending_events, r.dead_lettered_count),
            );
            (outbox, broker, circuit)
        }
    };

    // Growth between two looks, not the count: a backlog of old dead letters is the
    // deadLetteredCount's business, this says whether events are being dead-lettered now.
    let dead_lettering = match (
        latest.map(|r| r.dead_lettered_count),
        previous_status.dead_lettered_count,
    ) {
        (None, _) => Observed::unknown(types::DEAD_LETTERING, reasons::NO_RELAY_ANSWERED, no_answer.clone()),
        (Some(now), Some(before)) if now > before => Observed::new(
            types::DEAD_LETTERING,
            true,
            reasons::DEAD_LETTERS_GROWING,
            format!(
                "{} events dead-lettered since the last look ({now} dead-lettered now)",
                now - before
            ),
        ),
        (Some(0), _) => Observed::new(
            types::DEAD_LETTERING,
            false,
            reasons::NO_NEW_DEAD_LETTERS,
            "no event is dead-lettered",
        ),
        (Some(now), Some(_)) => Observed::new(
            types::DEAD_LETTERING,
            false,
            reasons::NO_NEW_DEAD_LETTERS,
            format!("{now} dead-lettered, none since the last look"),
        ),
        // No earlier figure to compare with (a relay answered again after a gap).
        (Some(now), None) => Observed::unknown(
            types::DEAD_LETTERING,
            reasons::NO_NEW_DEAD_LETTERS,
            format!("{now} dead-lettered; whether more are coming shows at the next look"),
        ),
    };

    let parts = [&outbox, &broker, &circuit, &workers, &provision];
    let ready = if p.paused {
        Observed::new(
            types::READY,
            false,
            reasons::PAUSED,
            "paused: relays are stopped; nothing is lost",
        )
    } else if let Some(failing) = parts.iter().find(|o| !o.is_true()) {
        Observed::new(
            types::READY,
            false,
            failing.reason,
            format!("{}: {}", failing.type_, failing.message),
        )
    } else {
        Observed::new(types::READY, true, reasons::AS_EXPECTED, "events flow to the broker")
    };
    let paused = if p.paused {
        Observed::new(types::PAUSED, true, reasons::PAUSED, "spec.paused is true")
    } else {
        Observed::new(types::PAUSED, false, reasons::RUNNING, "relays run")
    };
    observed.extend([
        ready,
        outbox,
        broker,
        circuit,
        workers,
        provision,
        paused,
        dead_lettering,
    ]);

    EventPublisherStatus {
        observed_generation: p.generation,
        conditions: settle(previous, observed, p.generation, now),
        broker: Some(p.broker_kind.to_owned()),
        circuit_state: Some(
            match worst {
                Some(w) => circuit_word(w),
                None => "Unknown",
            }
            .to_owned(),
        ),
        circuits,
        failed_event_count: latest.map(|r| r.failed_event_count),
        dead_lettered_count: latest.map(|r| r.dead_lettered_count),
        pending_events: latest.map(|r| r.pending_events),
        oldest_pending_age_seconds: latest.and_then(|r| r.oldest_pending_age_seconds),
        published_total: latest.map(|r| r.published_total),
        last_published_time: latest
            .and_then(|r| r.last_published_time)
            .and_then(|t| k8s_openapi::jiff::Timestamp::from_millisecond(t.timestamp_millis()).ok())
            .map(Time),
        ready_workers: seen.ready_replicas,
        desired_workers: desired,
        workers: Some(format!("{}/{desired}", seen.ready_replicas)),
        provisioned_resources,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::conditions;
    use crate::operator::validate::{tests::kafka_publisher, validate};
    use crate::relay::status::CircuitReport;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn now(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).expect("time"))
    }

    fn report(worker: &str, circuit: &str) -> RelayStatus {
        RelayStatus {
            publisher: "orders".into(),
            worker_id: worker.into(),
            ready: circuit == "closed",
            not_ready_reasons: Vec::new(),
            circuits: vec![CircuitReport {
                destination: "inventory.events".into(),
                state: circuit.into(),
            }],
            circuit_state: circuit.into(),
            pending_events: 7,
            oldest_pending_age_seconds: Some(3),
            retrying_count: 2,
            held_count: 1,
            dead_lettered_count: 4,
            failed_event_count: 6,
            published_total: 1000,
            failed_total: 9,
            dead_lettered_total: 4,
            last_published_time: Some(chrono::Utc::now()),
            live_workers: 2,
        }
    }

    fn condition<'a>(s: &'a EventPublisherStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).expect("condition present")
    }

    #[test]
    fn healthy_relays_make_it_ready_with_the_database_figures() {
        let p = validate(&kafka_publisher()).expect("valid");
        let seen = Observations {
            reports: vec![report("a", "closed"), report("b", "closed")],
            unanswered: vec![],
            ready_replicas: 2,
            provision: Some(ProvisionOutcome::Provisioned {
                created: vec![ProvisionedResource {
                    kind: "kafkaTopic".into(),
                    name: "inventory.events".into(),
                }],
                corrected: 0,
            }),
            created: vec![],
        };
        let s = compute(&p, &seen, &EventPublisherStatus::default(), now(10));
        assert_eq!(condition(&s, types::READY).status, "True", "{:?}", s.conditions);
        assert_eq!(s.failed_event_count, Some(6));
        assert_eq!(s.dead_lettered_count, Some(4));
        assert_eq!(s.pending_events, Some(7));
        assert_eq!(s.workers.as_deref(), Some("2/2"));
        assert_eq!(s.circuit_state.as_deref(), Some("Closed"));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.provisioned_resources.len(), 1);
        // The next rollout creates nothing new; what was created stays recorded.
        let next = Observations {
            provision: Some(ProvisionOutcome::Provisioned {
                created: vec![],
                corrected: 0,
            }),
            ..seen
        };
        assert_eq!(compute(&p, &next, &s, now(20)).provisioned_resources.len(), 1);
    }

    #[test]
    fn resources_created_by_any_replica_are_recorded_when_the_latest_created_none() {
        let p = validate(&kafka_publisher()).expect("valid");
        let topic = ProvisionedResource {
            kind: "kafkaTopic".into(),
            name: "inventory.events".into(),
        };
        let seen = Observations {
            reports: vec![report("a", "closed"), report("b", "closed")],
            ready_replicas: 2,
            // The second replica's step ran last and found the topic in place.
            provision: Some(ProvisionOutcome::Provisioned {
                created: vec![],
                corrected: 0,
            }),
            created: vec![topic.clone()],
            ..Observations::default()
        };
        let s = compute(&p, &seen, &EventPublisherStatus::default(), now(10));
        assert_eq!(s.provisioned_resources, vec![topic]);
    }

    #[test]
    fn an_open_circuit_makes_broker_not_ready_and_names_the_destination() {
        let p = validate(&kafka_publisher()).expect("valid");
        let seen = Observations {
            reports: vec![report("a", "open"), report("b", "closed")],
            ready_replicas: 2,
            provision: Some(ProvisionOutcome::Provisioned {
                created: vec![],
                corrected: 0,
            }),
            ..Observations::default()
        };
        let s = compute(&p, &seen, &EventPublisherStatus::default(), now(10));
        let broker = condition(&s, types::BROKER_READY);
        assert_eq!(
            (broker.status.as_str(), broker.reason.as_str()),
            ("False", "CircuitOpen")
        );
        assert!(broker.message.contains("inventory.events Open"), "{}", broker.message);
        assert_eq!(s.circuit_state.as_deref(), Some("Open"));
        assert_eq!(condition(&s, types::READY).status, "False");
    }

    #[test]
    fn without_answers_the_figures_are_cleared_and_the_conditions_say_why() {
        let p = validate(&kafka_publisher()).expect("valid");
        let seen = Observations {
            unanswered: vec!["orders-relay-1 (10.0.0.7): connection refused".into()],
            ..Observations::default()
        };
        let s = compute(&p, &seen, &EventPublisherStatus::default(), now(10));
        assert_eq!(s.pending_events, None);
        assert_eq!(s.failed_event_count, None);
        assert_eq!(s.circuit_state.as_deref(), Some("Unknown"));
        let outbox = condition(&s, types::OUTBOX_READY);
        assert_eq!(outbox.status, "Unknown");
        assert!(outbox.message.contains("connection refused"), "{}", outbox.message);
        assert_eq!(condition(&s, types::READY).status, "False");
    }

    #[test]
    fn dead_lettering_is_true_only_while_the_count_grows() {
        let p = validate(&kafka_publisher()).expect("valid");
        let with_dead = |n: i64| Observations {
            reports: vec![RelayStatus {
                dead_lettered_count: n,
                ..report("a", "closed")
            }],
            ready_replicas: 2,
            ..Observations::default()
        };
        let state = |s: &EventPublisherStatus| condition(s, types::DEAD_LETTERING).status.clone();
        let first = compute(&p, &with_dead(0), &EventPublisherStatus::default(), now(10));
        assert_eq!(state(&first), "False");
        let growing = compute(&p, &with_dead(3), &first, now(20));
        assert_eq!(state(&growing), "True");
        assert!(
            conditions::transitions(&first.conditions, &growing.conditions)
                .iter()
                .any(|c| c.type_ == types::DEAD_LETTERING),
            "the start is a transition"
        );
        let still = compute(&p, &with_dead(5), &growing, now(30));
        assert_eq!(state(&still), "True");
        assert!(
            !conditions::transitions(&growing.conditions, &still.conditions)
                .iter()
                .any(|c| c.type_ == types::DEAD_LETTERING),
            "growing on is no new transition"
        );
        assert_eq!(
            condition(&still, types::DEAD_LETTERING).last_transition_time,
            condition(&growing, types::DEAD_LETTERING).last_transition_time
        );
        let flat = compute(&p, &with_dead(5), &still, now(40));
        assert_eq!(state(&flat), "False");
        // A redrive lowers the count: not growth.
        assert_eq!(state(&compute(&p, &with_dead(1), &flat, now(50))), "False");
        // Nobody answering says Unknown, and an answer after the gap has nothing to compare.
        let gap = compute(&p, &Observations::default(), &flat, now(60));
        assert_eq!(state(&gap), "Unknown");
        assert_eq!(state(&compute(&p, &with_dead(5), &gap, now(70))), "Unknown");
    }

    #[test]
    fn a_refused_partition_decrease_shows_in_the_topology_condition_and_paused_says_paused() {
        let mut raw = kafka_publisher();
        let p = validate(&raw).expect("valid");
        let seen = Observations {
            reports: vec![report("a", "closed")],
            ready_replicas: 2,
            provision: Some(ProvisionOutcome::Failed {
                reason: "PartitionDecreaseRefused".into(),
                message: "Kafka topic t has 12 partitions and the spec asks for 6".into(),
            }),
            ..Observations::default()
        };
        let s = compute(&p, &seen, &EventPublisherStatus::default(), now(10));
        let topology = condition(&s, types::TOPOLOGY_PROVISIONED);
        assert_eq!(topology.status, "False");
        assert!(topology.message.contains("12 partitions"), "{}", topology.message);
        assert!(condition(&s, types::READY).message.contains("TopologyProvisioned"));

        raw.spec.paused = true;
        let paused = validate(&raw).expect("valid");
        let s = compute(
            &paused,
            &Observations::default(),
            &EventPublisherStatus::default(),
            now(10),
        );
        assert_eq!(condition(&s, types::PAUSED).status, "True");
        assert_eq!(condition(&s, types::READY).reason, "Paused");
        assert_eq!(s.workers.as_deref(), Some("0/0"));
    }
}
