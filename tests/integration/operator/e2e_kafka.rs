//! Issue 9's Kafka acceptance, end to end: the operator runs as a Pod from the chart (in-cluster
//! config, the chart's Roles and nothing else), an EventPublisher gets its topics with the asked
//! partitions, its ConfigMap and Deployment, relay Pods that run the provision step and then
//! publish what PostgreSQL commits, and a status that matches the database.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::json;

use super::e2e::{DB_SECRET, E2e};
use crate::support::kube::impersonating_client;
use crate::support::{kafka_bootstrap, unique_name};

const EVENTS: i64 = 40;

/// Partitions of each of `topics` that exists.
pub fn topic_partitions(bootstrap: &str, topics: &[&str]) -> BTreeMap<String, usize> {
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("Kafka admin client");
    admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map(|m| {
            m.topics()
                .iter()
                .filter(|t| topics.contains(&t.name()) && t.error().is_none())
                .map(|t| (t.name().to_owned(), t.partitions().len()))
                .collect()
        })
        .unwrap_or_default()
}

/// The event id of a Kafka record in either CloudEvents mode.
fn event_id(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<String> {
    if let Some(headers) = m.headers() {
        for h in headers.iter() {
            if h.key == "ce_id" {
                return h.value.map(|v| String::from_utf8_lossy(v).into_owned());
            }
        }
    }
    let doc: serde_json::Value = serde_json::from_slice(m.payload()?).ok()?;
    doc["id"].as_str().map(str::to_owned)
}

/// A consumer of `topic` from its beginning.
pub fn consumer(bootstrap: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("op-e2e"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// Reads `consumer` until every id of `sent` arrived (ids seen are added to `received`).
pub async fn consume_all(
    e2e: &E2e,
    consumer: &StreamConsumer,
    sent: &BTreeSet<String>,
    received: &mut BTreeSet<String>,
    within: Duration,
) {
    let collect = async {
        while !sent.is_subset(received) {
            // A broker outage surfaces as transient consume errors; the deadline still holds.
            let Ok(m) = consumer.recv().await else { continue };
            if let Some(id) = event_id(&m) {
                received.insert(id);
            }
        }
    };
    if tokio::time::timeout(within, collect).await.is_err() {
        panic!(
            "{} of {} events consumed within {within:?}\n{}",
            sent.intersection(received).count(),
            sent.len(),
            e2e.state().await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_publisher_under_the_in_cluster_operator_provisions_publishes_and_reports_matching_status() {
    let e2e = E2e::start("op-kafka", 1).await;

    // The operator's identity cannot read Secrets, in the watched namespace or anywhere.
    let user = e2e.operator.user();
    let as_operator = impersonating_client(&user).await;
    for (what, result) in [
        (
            "get a Secret in the watched namespace",
            Api::<Secret>::namespaced(as_operator.clone(), &e2e.tenant)
                .get_opt(DB_SECRET)
                .await
                .map(|_| ()),
        ),
        (
            "list Secrets in its own namespace",
            Api::<Secret>::namespaced(as_operator.clone(), &e2e.operator.namespace)
                .list(&Default::default())
                .await
                .map(|_| ()),
        ),
        (
            "list Secrets cluster-wide",
            Api::<Secret>::all(as_operator.clone())
                .list(&Default::default())
                .await
                .map(|_| ()),
        ),
    ] {
        match result {
            Err(kube::Error::Api(s)) if s.code == 403 => {}
            other => panic!("{what} as {user} must be forbidden (403), got {other:?}"),
        }
    }

    let topic = unique_name("op-e2e");
    let dlq = format!("{topic}.dlq");
    e2e.create_publisher(
        "orders",
        json!({
            "broker": {"kafka": {"bootstrapServers": kafka_bootstrap()}},
            "routing": {"strategy": "single", "destination": topic},
            "topology": {"kafka": {"partitions": 3}},
            "deadLetter": {"destination": dlq},
            "replicas": 2
        }),
    )
    .await;

    // Children, then relay Pods past their provision step, then topics.
    let config_maps: Api<ConfigMap> = Api::namespaced(e2e.admin.clone(), &e2e.tenant);
    let deployments: Api<Deployment> = Api::namespaced(e2e.admin.clone(), &e2e.tenant);
    e2e.eventually(
        Duration::from_secs(60),
        "ConfigMap and Deployment applied",
        async || {
            let cm = config_maps.get_opt("orders-relay").await.map_err(|e| e.to_string())?;
            let d = deployments.get_opt("orders-relay").await.map_err(|e| e.to_string())?;
            match (cm, d) {
                (Some(_), Some(_)) => Ok(()),
                (cm, d) => Err(format!("ConfigMap {}, Deployment {}", cm.is_some(), d.is_some())),
            }
        },
    )
    .await;
    e2e.relays_ready("orders", 2).await;
    e2e.eventually(Duration::from_secs(30), "topics with 3 partitions", async || {
        let seen = topic_partitions(&kafka_bootstrap(), &[&topic, &dlq]);
        if seen.get(&topic) == Some(&3) && seen.get(&dlq) == Some(&3) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;

    // Events committed in PostgreSQL arrive on Kafka.
    let consumer = consumer(&kafka_bootstrap(), &topic);
    let sent = e2e.commit_events(EVENTS).await;
    let mut received = BTreeSet::new();
    consume_all(&e2e, &consumer, &sent, &mut received, Duration::from_secs(90)).await;

    // The status matches the database, and kubectl shows it.
    assert_eq!(e2e.database_counts().await, (EVENTS, 0, 0));
    let status = e2e.ready_matching_database("orders", 2).await;
    assert!(status.last_published_time.is_some(), "{status:?}");
    let provisioned: BTreeSet<String> = status.provisioned_resources.iter().map(|r| r.name.clone()).collect();
    assert!(
        provisioned.contains(&topic) && provisioned.contains(&dlq),
        "the provision step's report reached the status: {status:?}"
    );
    e2e.assert_row("orders", ["True", "kafka", "Closed", "2/2", "0", "0"])
        .await;

    // The chart's alerts query these series.
    let metrics = e2e.operator.metrics(&e2e.admin).await;
    let tenant = &e2e.tenant;
    for line in [
        format!(r#"outbox_operator_publisher_workers{{namespace="{tenant}",publisher="orders",state="ready"}} 2"#),
        format!(r#"outbox_operator_publisher_workers{{namespace="{tenant}",publisher="orders",state="desired"}} 2"#),
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line} in:\n{metrics}");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(r#"outbox_operator_reconciliations_total{kind="EventPublisher"}"#)),
        "{metrics}"
    );

    // Retain (the default): the publisher goes, its topics stay.
    e2e.delete_publisher("orders", Duration::from_secs(60)).await;
    let left = topic_partitions(&kafka_bootstrap(), &[&topic, &dlq]);
    assert_eq!(left.len(), 2, "Retain keeps the topics: {left:?}");
    drop(consumer);
    e2e.finish().await;
}
