//! Issue 10's acceptance through the in-cluster operator: ReplayJob custom resources next to a
//! live relay Pod of the same EventPublisher — a filtered time window, a consumer-group rewind
//! (and its refusal while the group is active), and a redrive of dead letters.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use kube::api::{Api, PostParams};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::{Value, json};
use uuid::Uuid;

use inventory_outbox::crd::replay_job::{ReplayJob, ReplayJobStatus, ReplayPhase};

use super::e2e::E2e;
use crate::event_core::stock_changed;
use crate::replay::consumer_group::{committed, consume_all_and_leave, group_member, wait_empty};
use crate::replay::kafka::{recorded_bounds, write_mixed};
use crate::replay::{collect, consumer, publish_one};
use crate::support::{kafka_bootstrap, unique_name};

/// A Kafka publisher routing everything to `topic` (3 partitions), dead letters to `.dlq`.
fn kafka_spec(topic: &str, extra: Value) -> Value {
    let mut spec = json!({
        "broker": {"kafka": {"bootstrapServers": kafka_bootstrap()}},
        "routing": {"strategy": "single", "destination": topic},
        "topology": {"kafka": {"partitions": 3}},
        "deadLetter": {"destination": format!("{topic}.dlq")},
        "replicas": 1
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    spec
}

async fn create_replay(e2e: &E2e, name: &str, spec: Value) {
    let replay: ReplayJob = serde_json::from_value(json!({
        "apiVersion": "outbox.inventory.io/v1alpha1",
        "kind": "ReplayJob",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("ReplayJob document");
    Api::<ReplayJob>::namespaced(e2e.admin.clone(), &e2e.tenant)
        .create(&PostParams::default(), &replay)
        .await
        .unwrap_or_else(|e| panic!("create ReplayJob {name}: {e}"));
}

/// Waits until ReplayJob `name` reaches `phase`; returns its status.
async fn replay_reaches(e2e: &E2e, name: &str, phase: ReplayPhase, within: Duration) -> ReplayJobStatus {
    let api: Api<ReplayJob> = Api::namespaced(e2e.admin.clone(), &e2e.tenant);
    e2e.eventually(within, &format!("ReplayJob {name} {phase:?}"), async || {
        let status = api
            .get(name)
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        if status.phase == Some(phase) {
            Ok(status)
        } else {
            Err(format!("status {status:?}"))
        }
    })
    .await
}

fn condition<'a>(status: &'a ReplayJobStatus, type_: &str) -> Option<(&'a str, &'a str)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_job_replays_exactly_a_filtered_time_window_in_aggregate_order_while_the_relay_keeps_publishing() {
    let e2e = E2e::start("op-replay-window", 1).await;
    let topic = unique_name("op-replay-window");
    e2e.create_publisher("orders", kafka_spec(&topic, json!({}))).await;
    e2e.relays_ready("orders", 1).await;
    let publisher = e2e.outbox_publisher().await;
    let items: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    let before = write_mixed(&publisher, &e2e.db, &items, 1, 2).await;
    let window = write_mixed(&publisher, &e2e.db, &items, 3, 6).await;
    let after = write_mixed(&publisher, &e2e.db, &items, 9, 2).await;
    let ids: Vec<Uuid> = window.iter().map(|e| e.event_id).collect();
    let (from, to) = recorded_bounds(&e2e.db, &ids).await;
    let expected: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT event_id, aggregate_id FROM outbox.events WHERE recorded_at BETWEEN $1 AND $2 \
         AND event_type = 'StockLevelChanged' ORDER BY position",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&e2e.db.pool)
    .await
    .expect("expected set");
    assert_eq!(
        expected.len(),
        36,
        "6 items x 6 rounds of StockLevelChanged in the window"
    );

    create_replay(
        &e2e,
        "window",
        json!({
            "publisherRef": {"name": "orders"},
            "from": {"time": from}, "to": {"time": to},
            "filter": {"eventTypes": ["StockLevelChanged"]},
            "rateLimit": 20
        }),
    )
    .await;
    // Live traffic while the replay Pod starts and runs (about 2 s at 20 events/s).
    let live = write_mixed(&publisher, &e2e.db, &items, 11, 3).await;
    let status = replay_reaches(&e2e, "window", ReplayPhase::Succeeded, Duration::from_secs(180)).await;
    let n = expected.len() as i64;
    assert_eq!(
        (status.matched, status.replayed, status.failed),
        (Some(n), Some(n), Some(0)),
        "{status:?}"
    );

    let job = format!("{}/window", e2e.tenant);
    let live_total = before.len() + window.len() + after.len() + live.len();
    let received = collect(
        &consumer(&topic),
        Duration::from_secs(90),
        Duration::from_secs(2),
        |r| {
            r.iter().filter(|x| x.replay_job.is_some()).count() >= expected.len()
                && r.iter().filter(|x| x.replay_job.is_none()).count() >= live_total
        },
    )
    .await;
    let replayed: Vec<_> = received
        .iter()
        .filter(|r| r.replay_job.as_deref() == Some(job.as_str()))
        .map(|r| &r.event)
        .collect();
    let expected_ids: HashSet<Uuid> = expected.iter().map(|(id, _)| *id).collect();
    assert_eq!(replayed.len(), expected.len(), "no duplicates, nothing extra");
    assert_eq!(
        replayed.iter().map(|e| e.event_id).collect::<HashSet<_>>(),
        expected_ids,
        "the replay sent exactly the SQL query's events"
    );
    let mut expected_order: HashMap<String, Vec<Uuid>> = HashMap::new();
    for (id, aggregate) in &expected {
        expected_order.entry(aggregate.clone()).or_default().push(*id);
    }
    let mut arrival_order: HashMap<String, Vec<Uuid>> = HashMap::new();
    for e in &replayed {
        arrival_order
            .entry(e.aggregate_id.clone())
            .or_default()
            .push(e.event_id);
    }
    assert_eq!(
        arrival_order, expected_order,
        "each aggregate's events in position order"
    );
    let live_ids: HashSet<Uuid> = received
        .iter()
        .filter(|r| r.replay_job.is_none())
        .map(|r| r.event.event_id)
        .collect();
    assert!(
        live.iter().all(|e| live_ids.contains(&e.event_id)),
        "the live relay kept publishing during the replay ({} of {} live events seen)",
        live.iter().filter(|e| live_ids.contains(&e.event_id)).count(),
        live.len()
    );
    e2e.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_job_rewinds_a_consumer_group_to_a_time_and_is_refused_while_the_group_is_active() {
    let e2e = E2e::start("op-replay-rewind", 1).await;
    let topic = unique_name("op-replay-rewind");
    e2e.create_publisher("orders", kafka_spec(&topic, json!({}))).await;
    e2e.relays_ready("orders", 1).await;
    let publisher = e2e.outbox_publisher().await;
    let group = unique_name("billing");
    let items: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let mut early = HashSet::new();
    for i in &items {
        early.insert(publish_one(&publisher, &e2e.db, stock_changed(*i, 1)).await.event_id);
    }
    consume_all_and_leave(&group, &topic, &early).await;
    // Kafka timestamps are the relay's produce times: everything before `from` stays behind.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let from = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut late = HashSet::new();
    for i in &items {
        late.insert(publish_one(&publisher, &e2e.db, stock_changed(*i, 2)).await.event_id);
        late.insert(publish_one(&publisher, &e2e.db, stock_changed(*i, 3)).await.event_id);
    }
    consume_all_and_leave(&group, &topic, &late).await;
    wait_empty(&group).await;
    let before = committed(&group, &topic).await;

    let spec =
        json!({"publisherRef": {"name": "orders"}, "from": {"time": from}, "consumerGroupRewind": {"group": group}});
    create_replay(&e2e, "rewind", spec.clone()).await;
    let status = replay_reaches(&e2e, "rewind", ReplayPhase::Succeeded, Duration::from_secs(180)).await;
    assert_eq!(status.offsets.len(), 3, "before and after per partition: {status:?}");
    let rewound: i64 = status.offsets.iter().map(|o| o.before.unwrap_or(0) - o.after).sum();
    assert_eq!(
        rewound,
        late.len() as i64,
        "rewound by exactly the late events (committed before: {before:?}): {status:?}"
    );

    // A fresh consumer in the group gets exactly the events from `from` on.
    let member = group_member(&group, &topic);
    let received = collect(&member, Duration::from_secs(60), Duration::from_secs(3), |r| {
        r.len() >= late.len()
    })
    .await;
    let got: Vec<Uuid> = received.iter().map(|r| r.event.event_id).collect();
    assert_eq!(got.len(), late.len(), "nothing before `from`, nothing twice: {got:?}");
    assert_eq!(got.iter().copied().collect::<HashSet<_>>(), late);

    // While that member is in the group, a rewind is refused, and the condition says why.
    create_replay(&e2e, "rewind-active", spec).await;
    let refused = replay_reaches(&e2e, "rewind-active", ReplayPhase::Failed, Duration::from_secs(180)).await;
    assert_eq!(
        condition(&refused, "Complete"),
        Some(("False", "GroupHasActiveMembers")),
        "{refused:?}"
    );
    let message = refused
        .conditions
        .iter()
        .find(|c| c.type_ == "Complete")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("active member"), "{message}");
    drop(member);
    e2e.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_replay_job_redrives_once_the_destination_is_fixed_and_the_dead_lettered_count_drops() {
    let e2e = E2e::start("op-replay-redrive", 1).await;
    let topic = unique_name("op-replay-redrive");
    // The destination exists before the publisher and refuses records over 1 KiB; the spec
    // names no config entries, so provisioning leaves that setting alone.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let limited = NewTopic::new(&topic, 3, TopicReplication::Fixed(1)).set("max.message.bytes", "1024");
    let created = admin.create_topics(&[limited], &options).await.expect("create topic");
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    e2e.create_publisher(
        "orders",
        kafka_spec(
            &topic,
            json!({"retry": {"initialIntervalMs": 200, "maxIntervalMs": 1000, "maxAttempts": 2}}),
        ),
    )
    .await;
    e2e.relays_ready("orders", 1).await;
    let publisher = e2e.outbox_publisher().await;
    let noise: String = (0..128).map(|_| Uuid::new_v4().simple().to_string()).collect();
    let mut big = Vec::new();
    for _ in 0..3 {
        let mut draft = stock_changed(Uuid::now_v7(), 1);
        draft.payload["note"] = json!(noise);
        big.push(publish_one(&publisher, &e2e.db, draft).await);
    }
    let big_ids: Vec<Uuid> = big.iter().map(|e| e.event_id).collect();
    let rows = async |status: &str| -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox.failed_events WHERE status = $1 AND event_id = ANY($2)")
            .bind(status)
            .bind(&big_ids)
            .fetch_one(&e2e.db.pool)
            .await
            .expect("count failed-event rows")
    };
    e2e.eventually(
        Duration::from_secs(90),
        "three dead letters in the database and the status",
        async || {
            let dead = rows("dead_lettered").await;
            let p = e2e.publishers.get("orders").await.map_err(|e| e.to_string())?;
            let shown = p.status.and_then(|s| s.dead_lettered_count);
            if dead == 3 && shown == Some(3) {
                Ok(())
            } else {
                Err(format!("{dead} dead-lettered rows, deadLetteredCount {shown:?}"))
            }
        },
    )
    .await;

    let fix = AlterConfig::new(ResourceSpecifier::Topic(&topic)).set("max.message.bytes", "1048576");
    let altered = admin.alter_configs(&[fix], &options).await.expect("alter topic config");
    assert!(altered.iter().all(|r| r.is_ok()), "{altered:?}");
    create_replay(
        &e2e,
        "redrive",
        json!({"publisherRef": {"name": "orders"}, "source": "deadLetters"}),
    )
    .await;
    let status = replay_reaches(&e2e, "redrive", ReplayPhase::Succeeded, Duration::from_secs(180)).await;
    assert_eq!(
        (status.matched, status.replayed, status.failed),
        (Some(3), Some(3), Some(0)),
        "{status:?}"
    );
    assert_eq!(rows("dead_lettered").await, 0, "no dead letters left");
    assert_eq!(rows("delivered").await, 3, "the redriven rows are delivered");

    let job = format!("{}/redrive", e2e.tenant);
    let received = collect(
        &consumer(&topic),
        Duration::from_secs(60),
        Duration::from_secs(1),
        |r| r.iter().filter(|x| x.replay_job.is_some()).count() >= 3,
    )
    .await;
    let redriven: HashSet<Uuid> = received
        .iter()
        .filter(|r| r.replay_job.as_deref() == Some(job.as_str()))
        .map(|r| r.event.event_id)
        .collect();
    assert_eq!(redriven, big_ids.iter().copied().collect::<HashSet<_>>());
    e2e.eventually(
        Duration::from_secs(60),
        "the EventPublisher's deadLetteredCount drops to 0",
        async || {
            let p = e2e.publishers.get("orders").await.map_err(|e| e.to_string())?;
            match p.status.and_then(|s| s.dead_lettered_count) {
                Some(0) => Ok(()),
                other => Err(format!("deadLetteredCount {other:?}")),
            }
        },
    )
    .await;
    e2e.finish().await;
}
