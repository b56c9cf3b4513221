//! Consumer-group rewind: a group that consumed everything is rewound to a time (a dry run
//! only reports the offsets), a fresh consumer in the group then receives exactly the events
//! produced from that time on; a group with an active member is refused.

use std::collections::HashSet;
use std::time::Duration;

use inventory_outbox::replay::report::ReportPhase;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{ClientConfig, TopicPartitionList};
use serde_json::json;
use uuid::Uuid;

use super::*;
use crate::event_core::{publisher, stock_changed};
use crate::relay::start_relay;
use crate::support::{kafka_bootstrap, unique_name};

pub fn group_member(group: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("group consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// Consumes until `ids` all arrived, then commits and leaves the group.
pub async fn consume_all_and_leave(group: &str, topic: &str, ids: &HashSet<Uuid>) {
    let member = group_member(group, topic);
    let received = collect(&member, Duration::from_secs(60), Duration::ZERO, |r| {
        ids.iter().all(|id| r.iter().any(|x| x.event.event_id == *id))
    })
    .await;
    assert!(
        ids.iter().all(|id| received.iter().any(|x| x.event.event_id == *id)),
        "group {group} did not consume everything"
    );
    member.commit_consumer_state(CommitMode::Sync).expect("commit");
    member.unsubscribe();
    drop(member);
}

/// Waits until the broker lists no member of `group` (a closed consumer leaves at once, but
/// the coordinator may take a moment to show it).
pub async fn wait_empty(group: &str) {
    let client: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .expect("client");
    let mut members = usize::MAX;
    for _ in 0..100 {
        let list = client
            .fetch_group_list(Some(group), Duration::from_secs(5))
            .expect("group list");
        members = list.groups().iter().map(|g| g.members().len()).sum();
        if members == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("group {group} still has {members} member(s)");
}

pub async fn committed(group: &str, topic: &str) -> Vec<(i32, i64)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed");
    committed
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rewound_group_receives_exactly_the_events_from_that_time_and_an_active_group_is_refused() {
    let (db, publisher) = publisher("replay_rewind").await;
    let topic = unique_name("replay-rewind");
    let doc = kafka_config("replay-rewind", &topic, json!({}));
    let config: inventory_outbox::relay::config::RelayConfig = serde_json::from_value(doc.clone()).expect("config");
    let relay = start_relay(&db, config, "g1").await;
    let group = unique_name("billing");
    let items: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();

    let mut early = HashSet::new();
    for i in &items {
        early.insert(publish_one(&publisher, &db, stock_changed(*i, 1)).await.event_id);
    }
    consume_all_and_leave(&group, &topic, &early).await;
    // Kafka timestamps are the relay's produce times: everything before `from` is out.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let from = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut late = HashSet::new();
    for i in &items {
        late.insert(publish_one(&publisher, &db, stock_changed(*i, 2)).await.event_id);
        late.insert(publish_one(&publisher, &db, stock_changed(*i, 3)).await.event_id);
    }
    consume_all_and_leave(&group, &topic, &late).await;
    wait_empty(&group).await;
    let before = committed(&group, &topic).await;

    let files = ReplayFiles::new(&db, &doc);
    let spec = |dry: bool| {
        json!({"publisherRef": {"name": "replay-rewind"}, "from": {"time": from},
                                  "consumerGroupRewind": {"group": group}, "dryRun": dry})
    };
    let mut dry = files.spawn(&spec(true), "rewind-dry", "team-a/rewind-dry", free_port(), "dry");
    let (status, report) = files.finish(&mut dry, Duration::from_secs(60), "dry").await;
    assert!(status.success(), "{}", files.logs("dry"));
    assert_eq!(report.offsets.len(), 3, "one entry per partition: {report:?}");
    assert_eq!(committed(&group, &topic).await, before, "a dry run moves nothing");
    let rewound_to: i64 = report.offsets.iter().map(|o| o.before.unwrap_or(0) - o.after).sum();
    assert_eq!(
        rewound_to,
        late.len() as i64,
        "the dry run would rewind exactly the late events: {report:?}"
    );

    let mut real = files.spawn(&spec(false), "rewind", "team-a/rewind", free_port(), "rewind");
    let (status, report) = files.finish(&mut real, Duration::from_secs(60), "rewind").await;
    assert!(status.success(), "{}", files.logs("rewind"));
    assert_eq!(report.phase, ReportPhase::Completed);
    assert!(
        report.offsets.iter().all(|o| o.before.is_some() || o.after == 0),
        "before offsets reported for every partition the group had read: {report:?}"
    );

    // A fresh consumer in the group gets exactly the late events.
    let member = group_member(&group, &topic);
    let received = collect(&member, Duration::from_secs(60), Duration::from_secs(3), |r| {
        r.len() >= late.len()
    })
    .await;
    let got: Vec<Uuid> = received.iter().map(|r| r.event.event_id).collect();
    assert_eq!(got.len(), late.len(), "nothing before `from`, nothing twice: {got:?}");
    assert_eq!(got.iter().copied().collect::<HashSet<_>>(), late);

    // While that member is in the group, a rewind is refused.
    let mut refused = files.spawn(
        &spec(false),
        "rewind-active",
        "team-a/rewind-active",
        free_port(),
        "refused",
    );
    let (status, report) = files.finish(&mut refused, Duration::from_secs(60), "refused").await;
    assert!(!status.success(), "a rewind of an active group must fail");
    assert_eq!(report.phase, ReportPhase::Failed);
    assert_eq!(report.reason.as_deref(), Some("GroupHasActiveMembers"), "{report:?}");
    assert!(report.message.unwrap_or_default().contains("active member"));
    drop(member);
    relay.stop().await;
    db.drop().await;
}
