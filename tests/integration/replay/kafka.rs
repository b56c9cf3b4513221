//! The `replay` subcommand against Kafka next to a live relay: a filtered time window, a topic
//! override and a dry run, kill -9 then resume from the checkpoint, and dead-letter redrive.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use inventory_outbox::event::DomainEvent;
use inventory_outbox::relay::config::RelayConfig;
use inventory_outbox::replay::report::ReportPhase;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;
use uuid::Uuid;

use super::*;
use crate::event_core::{publisher, stock_changed};
use crate::relay::start_relay;
use crate::support::{kafka_bootstrap, unique_name};

/// Writes `rounds` StockLevelChanged events per item (sequence numbers `first..`) with a
/// Stockout after every second one; returns them in commit order.
pub async fn write_mixed(
    publisher: &inventory_outbox::publisher::InventoryEventPublisher,
    db: &crate::support::postgres::TestDatabase,
    items: &[Uuid],
    first: i64,
    rounds: i64,
) -> Vec<DomainEvent> {
    let mut written = Vec::new();
    for sequence in first..first + rounds {
        for item in items {
            written.push(publish_one(publisher, db, stock_changed(*item, sequence)).await);
            if sequence % 2 == 0 {
                written.push(publish_one(publisher, db, stockout(*item)).await);
            }
        }
    }
    written
}

pub async fn recorded_bounds(
    db: &crate::support::postgres::TestDatabase,
    ids: &[Uuid],
) -> (DateTime<Utc>, DateTime<Utc>) {
    sqlx::query_as("SELECT min(recorded_at), max(recorded_at) FROM outbox.events WHERE event_id = ANY($1)")
        .bind(ids)
        .fetch_one(&db.pool)
        .await
        .expect("window bounds")
}

fn topic_exists(topic: &str) -> bool {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .expect("metadata client");
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    metadata.topics().iter().any(|t| t.name() == topic)
}

fn relay_config_of(doc: &serde_json::Value) -> RelayConfig {
    let config: RelayConfig = serde_json::from_value(doc.clone()).expect("relay config");
    config.validate().expect("valid relay config");
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_time_window_with_an_event_type_filter_replays_exactly_the_matching_events_in_aggregate_order_while_the_relay_keeps_publishing()
 {
    let (db, publisher) = publisher("replay_window").await;
    let topic = unique_name("replay-window");
    let doc = kafka_config("replay-window", &topic, json!({}));
    let relay = start_relay(&db, relay_config_of(&doc), "w1").await;
    let items: Vec<Uuid> = (0..8).map(|_| Uuid::now_v7()).collect();

    let before = write_mixed(&publisher, &db, &items, 1, 3).await;
    let window = write_mixed(&publisher, &db, &items, 4, 8).await;
    let after = write_mixed(&publisher, &db, &items, 12, 2).await;
    let ids: Vec<Uuid> = window.iter().map(|e| e.event_id).collect();
    let (from, to) = recorded_bounds(&db, &ids).await;
    let expected: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT event_id, aggregate_id FROM outbox.events WHERE recorded_at BETWEEN $1 AND $2 \
         AND event_type = 'StockLevelChanged' ORDER BY position",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&db.pool)
    .await
    .expect("expected set");
    assert_eq!(
        expected.len(),
        64,
        "8 items x 8 rounds of StockLevelChanged in the window"
    );

    let files = ReplayFiles::new(&db, &doc);
    let job = "team-a/window";
    let spec = json!({
        "publisherRef": {"name": "replay-window"},
        "from": {"time": from}, "to": {"time": to},
        "filter": {"eventTypes": ["StockLevelChanged"]},
        "rateLimit": 40,
    });
    let port = free_port();
    let mut child = files.spawn(&spec, &Uuid::new_v4().to_string(), job, port, "window");
    // Live traffic while the replay runs (about 1.6 s at 40 events/s).
    let live = write_mixed(&publisher, &db, &items, 14, 3).await;
    let running = status_of(port).await;
    let (status, report) = files.finish(&mut child, Duration::from_secs(60), "window").await;
    assert!(status.success(), "replay failed: {report:?}\n{}", files.logs("window"));

    let consumer = consumer(&topic);
    let live_total = before.len() + window.len() + after.len() + live.len();
    let received = collect(&consumer, Duration::from_secs(60), Duration::from_secs(2), |r| {
        r.iter().filter(|x| x.replay_job.is_some()).count() >= expected.len()
            && r.iter().filter(|x| x.replay_job.is_none()).count() >= live_total
    })
    .await;
    let replayed: Vec<&DomainEvent> = received
        .iter()
        .filter(|r| r.replay_job.as_deref() == Some(job))
        .map(|r| &r.event)
        .collect();
    let live_ids: HashSet<Uuid> = received
        .iter()
        .filter(|r| r.replay_job.is_none())
        .map(|r| r.event.event_id)
        .collect();
    let expected_ids: HashSet<Uuid> = expected.iter().map(|(id, _)| *id).collect();
    let replayed_ids: HashSet<Uuid> = replayed.iter().map(|e| e.event_id).collect();
    assert_eq!(replayed.len(), expected.len(), "no duplicates, nothing extra");
    assert_eq!(
        replayed_ids, expected_ids,
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
    assert!(
        live.iter().all(|e| live_ids.contains(&e.event_id)),
        "the live relay kept publishing during the replay ({} of {} live events seen)",
        live.iter().filter(|e| live_ids.contains(&e.event_id)).count(),
        live.len()
    );
    assert_eq!(report.phase, ReportPhase::Completed);
    assert_eq!(
        (report.matched, report.replayed, report.failed),
        (64, 64, 0),
        "{report:?}"
    );
    if let Some(running) = running.filter(|r| r.matched > 0) {
        assert_eq!(
            running.matched, 64,
            "the status endpoint served the count while running: {running:?}"
        );
    }
    relay.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_sends_nothing_and_a_topic_override_sends_the_replay_elsewhere() {
    let (db, publisher) = publisher("replay_override").await;
    let topic = unique_name("replay-live");
    let doc = kafka_config("replay-override", &topic, json!({}));
    let items: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let written = write_mixed(&publisher, &db, &items, 1, 5).await;
    let files = ReplayFiles::new(&db, &doc);

    let dry_target = unique_name("replay-dry");
    let dry = json!({"publisherRef": {"name": "replay-override"}, "dryRun": true,
                     "target": {"destination": dry_target}, "filter": {"eventTypes": ["Stockout"]}});
    let mut child = files.spawn(&dry, &Uuid::new_v4().to_string(), "team-a/dry", free_port(), "dry");
    let (status, report) = files.finish(&mut child, Duration::from_secs(60), "dry").await;
    assert!(status.success(), "{}", files.logs("dry"));
    let stockouts = written.iter().filter(|e| e.event_type == "Stockout").count() as i64;
    assert_eq!((report.matched, report.replayed), (stockouts, 0), "{report:?}");
    assert!(report.dry_run);
    assert!(!topic_exists(&dry_target), "a dry run creates and sends nothing");

    let target = unique_name("replay-override");
    let spec = json!({"publisherRef": {"name": "replay-override"}, "target": {"destination": target}});
    let mut child = files.spawn(
        &spec,
        &Uuid::new_v4().to_string(),
        "team-a/override",
        free_port(),
        "override",
    );
    let (status, report) = files.finish(&mut child, Duration::from_secs(60), "override").await;
    assert!(status.success(), "{}", files.logs("override"));
    assert_eq!(report.replayed, written.len() as i64, "{report:?}");
    let received = collect(
        &consumer(&target),
        Duration::from_secs(30),
        Duration::from_secs(1),
        |r| r.len() >= written.len(),
    )
    .await;
    let got: HashSet<Uuid> = received.iter().map(|r| r.event.event_id).collect();
    let sent: HashSet<Uuid> = written.iter().map(|e| e.event_id).collect();
    assert_eq!(got, sent, "every event on the override topic");
    assert!(
        received
            .iter()
            .all(|r| r.replay_job.as_deref() == Some("team-a/override"))
    );
    assert!(!topic_exists(&topic), "nothing went to the publisher's own topic");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_midway_resumes_after_its_checkpoint_and_duplicates_at_most_the_batch_in_flight() {
    let (db, publisher) = publisher("replay_resume").await;
    let topic = unique_name("replay-resume");
    let doc = kafka_config("replay-resume", &topic, json!({}));
    let items: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    let mut written = Vec::new();
    for sequence in 1..=30 {
        let mut tx = db.pool.begin().await.expect("begin");
        let drafts = items.iter().map(|i| stock_changed(*i, sequence)).collect();
        written.extend(publisher.publish_events(&mut tx, drafts).await.expect("publish"));
        tx.commit().await.expect("commit");
    }
    let files = ReplayFiles::new(&db, &doc);
    let replay_id = Uuid::new_v4().to_string();
    // 600 events at 200/s: batches (and checkpoints) of 200 events every second.
    let spec = json!({"publisherRef": {"name": "replay-resume"}, "rateLimit": 200, "target": {"destination": topic}});
    let port = free_port();
    let mut first = files.spawn(&spec, &replay_id, "team-a/resume", port, "first");
    // Kill once a checkpoint is written and more events were acknowledged after it: those are
    // the ones the next run sends again. Every selected event has a position 1..=600, so the
    // events handled up to checkpoint c are exactly c.
    let mut sent_after_checkpoint = 0;
    wait_until(
        Duration::from_secs(30),
        "a checkpoint with events acknowledged after it",
        async || match status_of(port).await {
            Some(r) if r.checkpoint > 0 && r.replayed > r.checkpoint => {
                sent_after_checkpoint = r.replayed - r.checkpoint;
                true
            }
            _ => false,
        },
        || files.logs("first"),
    )
    .await;
    // kill -9: no chance to write anything more.
    first.start_kill().expect("kill -9");
    let _ = first.wait().await;
    let (checkpoint_after_kill, state, _) = checkpoint(&db, &replay_id).await.expect("checkpoint row");
    assert_eq!(state, "running");

    let mut second = files.spawn(&spec, &replay_id, "team-a/resume", free_port(), "second");
    let (status, report) = files.finish(&mut second, Duration::from_secs(60), "second").await;
    assert!(status.success(), "{}", files.logs("second"));
    assert_eq!(report.runs, 2, "{report:?}");
    assert_eq!(report.resumed_from, Some(checkpoint_after_kill), "{report:?}");

    let received = collect(
        &consumer(&topic),
        Duration::from_secs(60),
        Duration::from_secs(2),
        |r| r.iter().map(|x| x.event.event_id).collect::<HashSet<_>>().len() >= written.len(),
    )
    .await;
    let unique: HashSet<Uuid> = received.iter().map(|r| r.event.event_id).collect();
    assert_eq!(unique.len(), written.len(), "every event arrived at least once");
    let duplicates = received.len() - unique.len();
    // Only events above the checkpoint the second run resumed from can be sent twice.
    let positions: HashMap<Uuid, i64> =
        sqlx::query_as::<_, (Uuid, i64)>("SELECT event_id, position FROM outbox.events")
            .fetch_all(&db.pool)
            .await
            .expect("positions")
            .into_iter()
            .collect();
    let mut seen = HashSet::new();
    for r in &received {
        if !seen.insert(r.event.event_id) {
            assert!(
                positions[&r.event.event_id] > checkpoint_after_kill,
                "event at position {} was re-sent though the checkpoint {checkpoint_after_kill} covered it",
                positions[&r.event.event_id]
            );
        }
    }
    println!(
        "kill -9 at checkpoint {checkpoint_after_kill} with {sent_after_checkpoint} acknowledged after it: \
         {duplicates} duplicate(s) of {} events",
        written.len()
    );
    assert!(
        duplicates as i64 >= sent_after_checkpoint,
        "what was acknowledged after the checkpoint is sent again"
    );
    assert!(
        duplicates <= 200,
        "at most one batch in flight is re-sent, got {duplicates}"
    );
    // Order per aggregate among first arrivals.
    let firsts: Vec<&DomainEvent> = {
        let mut seen = HashSet::new();
        received
            .iter()
            .filter(|r| seen.insert(r.event.event_id))
            .map(|r| &r.event)
            .collect()
    };
    for (aggregate, sequence) in sequences(&firsts) {
        let mut sorted = sequence.clone();
        sorted.sort();
        assert_eq!(sequence, sorted, "aggregate {aggregate} out of order");
    }
    assert_eq!(report.matched, written.len() as i64);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redriving_dead_letters_after_the_destination_is_fixed_delivers_them_and_marks_their_rows_delivered() {
    const PUBLISHER: &str = "replay-redrive";
    let (db, publisher) = publisher("replay_redrive").await;
    let topic = unique_name("replay-redrive");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    // A destination that refuses records over 1 KiB.
    let limited = NewTopic::new(&topic, 2, TopicReplication::Fixed(1)).set("max.message.bytes", "1024");
    let created = admin.create_topics(&[limited], &options).await.expect("create topic");
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    let doc = kafka_config(PUBLISHER, &topic, json!({}));
    let relay = start_relay(&db, relay_config_of(&doc), "r1").await;

    let noise: String = (0..128).map(|_| Uuid::new_v4().simple().to_string()).collect();
    let mut big = Vec::new();
    for _ in 0..3 {
        let mut draft = stock_changed(Uuid::now_v7(), 1);
        draft.payload["note"] = json!(noise);
        big.push(publish_one(&publisher, &db, draft).await);
    }
    let big_ids: Vec<Uuid> = big.iter().map(|e| e.event_id).collect();
    let dead_count = async || -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM outbox.failed_events WHERE consumer = $1 AND status = 'dead_lettered' AND event_id = ANY($2)",
        )
        .bind(PUBLISHER)
        .bind(&big_ids)
        .fetch_one(&db.pool)
        .await
        .expect("count dead letters")
    };
    wait_until(
        Duration::from_secs(30),
        "three dead letters",
        async || dead_count().await == 3,
        String::new,
    )
    .await;
    // Live traffic after the failures (a broker refuses a whole record batch, so a small
    // event sent with the big ones could be dead-lettered with them).
    let small = publish_one(&publisher, &db, stock_changed(Uuid::now_v7(), 1)).await;
    let all_dead: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.failed_events WHERE status = 'dead_lettered'")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(all_dead, 3, "only the oversized events were dead-lettered");

    // Fix the destination, then redrive.
    let fix = AlterConfig::new(ResourceSpecifier::Topic(&topic)).set("max.message.bytes", "1048576");
    let altered = admin.alter_configs(&[fix], &options).await.expect("alter topic config");
    assert!(altered.iter().all(|r| r.is_ok()), "{altered:?}");
    let files = ReplayFiles::new(&db, &doc);
    let spec = json!({"publisherRef": {"name": PUBLISHER}, "source": "deadLetters"});
    let mut child = files.spawn(
        &spec,
        &Uuid::new_v4().to_string(),
        "team-a/redrive",
        free_port(),
        "redrive",
    );
    let (status, report) = files.finish(&mut child, Duration::from_secs(60), "redrive").await;
    assert!(status.success(), "{}", files.logs("redrive"));
    assert_eq!(
        (report.matched, report.replayed, report.failed),
        (3, 3, 0),
        "{report:?}"
    );
    assert_eq!(dead_count().await, 0, "no dead letters left");
    let delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox.failed_events WHERE consumer = $1 AND status = 'delivered' AND event_id = ANY($2)",
    )
    .bind(PUBLISHER)
    .bind(&big_ids)
    .fetch_one(&db.pool)
    .await
    .expect("count delivered");
    assert_eq!(delivered, 3, "the redriven rows are delivered");

    let received = collect(
        &consumer(&topic),
        Duration::from_secs(30),
        Duration::from_secs(1),
        |r| r.iter().filter(|x| x.replay_job.is_some()).count() >= 3,
    )
    .await;
    let redriven: HashSet<Uuid> = received
        .iter()
        .filter(|r| r.replay_job.as_deref() == Some("team-a/redrive"))
        .map(|r| r.event.event_id)
        .collect();
    assert_eq!(redriven, big_ids.iter().copied().collect::<HashSet<_>>());
    assert!(
        received
            .iter()
            .any(|r| r.event.event_id == small.event_id && r.replay_job.is_none()),
        "the small event went out live; only dead letters were redriven"
    );
    relay.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replays_of_one_publisher_run_at_once_and_leave_the_relays_cursors_alone() {
    let (db, publisher) = publisher("replay_two").await;
    let topic = unique_name("replay-two-live");
    let doc = kafka_config("replay-two", &topic, json!({}));
    let relay = start_relay(&db, relay_config_of(&doc), "t1").await;
    let items: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let written = write_mixed(&publisher, &db, &items, 1, 6).await;
    let cursors = async || -> Vec<(i16, i64)> {
        sqlx::query_as("SELECT shard, position FROM outbox.relay_cursors WHERE consumer = 'replay-two' ORDER BY shard")
            .fetch_all(&db.pool)
            .await
            .expect("cursors")
    };
    let last = written.len() as i64;
    wait_until(
        Duration::from_secs(30),
        "the relay caught up",
        async || cursors().await.iter().map(|c| c.1).max() == Some(last),
        String::new,
    )
    .await;
    relay.stop().await;
    let before = cursors().await;

    let files = ReplayFiles::new(&db, &doc);
    let (a, b) = (unique_name("replay-two-a"), unique_name("replay-two-b"));
    let spec = |t: &str| json!({"publisherRef": {"name": "replay-two"}, "rateLimit": 50, "target": {"destination": t}});
    let mut first = files.spawn(&spec(&a), &Uuid::new_v4().to_string(), "team-a/a", free_port(), "a");
    let mut second = files.spawn(&spec(&b), &Uuid::new_v4().to_string(), "team-a/b", free_port(), "b");
    let (status_a, _) = files.finish(&mut first, Duration::from_secs(60), "a").await;
    let (status_b, report_b) = files.finish(&mut second, Duration::from_secs(60), "b").await;
    assert!(
        status_a.success() && status_b.success(),
        "{}\n{}",
        files.logs("a"),
        files.logs("b")
    );
    assert_eq!(report_b.replayed, last, "{report_b:?}");
    for target in [&a, &b] {
        let received = collect(
            &consumer(target),
            Duration::from_secs(30),
            Duration::from_millis(500),
            |r| r.len() >= written.len(),
        )
        .await;
        let got: HashSet<Uuid> = received.iter().map(|r| r.event.event_id).collect();
        assert_eq!(got.len(), written.len(), "every event on {target}");
    }
    assert_eq!(
        cursors().await,
        before,
        "the replays neither read nor moved the relay's cursors"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_replay_at_a_checkpoint_and_the_next_run_finishes_it() {
    let (db, publisher) = publisher("replay_sigterm").await;
    let topic = unique_name("replay-sigterm");
    let doc = kafka_config("replay-sigterm", &topic, json!({}));
    let items: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    let written = write_mixed(&publisher, &db, &items, 1, 20).await;
    let files = ReplayFiles::new(&db, &doc);
    let replay_id = Uuid::new_v4().to_string();
    let spec = json!({"publisherRef": {"name": "replay-sigterm"}, "rateLimit": 50, "target": {"destination": topic}});
    let port = free_port();
    let mut first = files.spawn(&spec, &replay_id, "team-a/sigterm", port, "first");
    wait_until(
        Duration::from_secs(30),
        "a first checkpoint",
        async || status_of(port).await.is_some_and(|r| r.checkpoint > 0),
        || files.logs("first"),
    )
    .await;
    let pid = first.id().expect("child pid");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(term.success());
    let (status, report) = files.finish(&mut first, Duration::from_secs(10), "first").await;
    assert!(
        !status.success(),
        "a stop before the end is not a success (the Job must resume)"
    );
    assert_eq!(report.phase, ReportPhase::Stopped, "{report:?}");
    let (position, state, _) = checkpoint(&db, &replay_id).await.expect("checkpoint");
    assert_eq!(
        (position, state.as_str()),
        (report.checkpoint, "running"),
        "stopped exactly at its checkpoint"
    );
    assert!(position < written.len() as i64, "stopped before the end");

    let mut second = files.spawn(&spec, &replay_id, "team-a/sigterm", free_port(), "second");
    let (status, report) = files.finish(&mut second, Duration::from_secs(60), "second").await;
    assert!(status.success(), "{}", files.logs("second"));
    assert_eq!(
        (report.phase, report.resumed_from),
        (ReportPhase::Completed, Some(position)),
        "{report:?}"
    );
    assert_eq!(report.replayed, written.len() as i64, "{report:?}");
    db.drop().await;
}
