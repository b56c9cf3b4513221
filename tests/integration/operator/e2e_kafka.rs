//! Issue 9's Kafka acceptance, end to end: the operator runs as a Pod from the chart (in-cluster
//! config, the chart's Roles and nothing else), an EventPublisher gets its topics with the asked
//! partitions, its ConfigMap and Deployment, relay Pods that run the provision step and then
//! publish what PostgreSQL commits, and a status that matches the database.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::json;
use uuid::Uuid;

use inventory_outbox::crd::EventPublisher;
use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::store::{SchemaName, Store};

use super::in_cluster::{InClusterOperator, eventually, is_ready};
use super::install_crds;
use crate::event_core::stock_changed;
use crate::support::cluster::{create, delete_namespace, pods};
use crate::support::kube::{admin_client, create_namespace, impersonating_client};
use crate::support::postgres::TestDatabase;
use crate::support::{database_url, kafka_bootstrap, kubeconfig_path, unique_name};

const EVENTS: i64 = 40;

fn topic_partitions(topics: &[&str]) -> BTreeMap<String, usize> {
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .expect("Kafka admin client");
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map(|m| {
            m.topics()
                .iter()
                .filter(|t| topics.contains(&t.name()) && t.error().is_none())
                .map(|t| (t.name().to_owned(), t.partitions().len()))
                .collect()
        });
    metadata.unwrap_or_default()
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

fn condition(p: &EventPublisher, t: &str) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_publisher_under_the_in_cluster_operator_provisions_publishes_and_reports_matching_status() {
    let admin = admin_client().await;
    install_crds(&admin).await;
    let tenant = create_namespace(&admin, "op-kafka").await;
    let operator = InClusterOperator::deploy(&admin, std::slice::from_ref(&tenant), 1).await;

    // The operator's identity cannot read Secrets, in the tenant namespace or anywhere.
    let as_operator = impersonating_client(&operator.user()).await;
    for (what, result) in [
        (
            "get a Secret in the watched namespace",
            Api::<Secret>::namespaced(as_operator.clone(), &tenant)
                .get_opt("orders-db")
                .await
                .map(|_| ()),
        ),
        (
            "list Secrets in its own namespace",
            Api::<Secret>::namespaced(as_operator.clone(), &operator.namespace)
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
            other => panic!("{what} as {} must be forbidden (403), got {other:?}", operator.user()),
        }
    }

    let db = TestDatabase::create("op_e2e_kafka").await;
    let (server, _) = database_url().rsplit_once('/').map(|(s, d)| (s.to_owned(), d.to_owned())).expect("DATABASE_URL has a database");
    let _: Secret = create(
        &admin,
        &tenant,
        json!({"metadata": {"name": "orders-db"}, "stringData": {"url": format!("{server}/{}", db.name)}}),
    )
    .await;
    let topic = unique_name("op-e2e");
    let dlq = format!("{topic}.dlq");
    let publishers: Api<EventPublisher> = Api::namespaced(admin.clone(), &tenant);
    let publisher: EventPublisher = serde_json::from_value(json!({
        "apiVersion": "outbox.inventory.io/v1alpha1",
        "kind": "EventPublisher",
        "metadata": {"name": "orders"},
        "spec": {
            "outbox": {"databaseUrlSecretRef": {"name": "orders-db", "key": "url"}},
            "broker": {"kafka": {"bootstrapServers": kafka_bootstrap()}},
            "routing": {"strategy": "single", "destination": topic},
            "topology": {"kafka": {"partitions": 3}},
            "deadLetter": {"destination": dlq},
            "replicas": 2
        }
    }))
    .expect("EventPublisher");
    publishers
        .create(&PostParams::default(), &publisher)
        .await
        .expect("create EventPublisher");

    // Children, then relay Pods past their provision step, then topics.
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), &tenant);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &tenant);
    eventually(&admin, &operator, &tenant, Duration::from_secs(60), "ConfigMap and Deployment applied", async || {
        let cm = config_maps.get_opt("orders-relay").await.map_err(|e| e.to_string())?;
        let d = deployments.get_opt("orders-relay").await.map_err(|e| e.to_string())?;
        match (cm, d) {
            (Some(_), Some(_)) => Ok(()),
            (cm, d) => Err(format!("ConfigMap {}, Deployment {}", cm.is_some(), d.is_some())),
        }
    })
    .await;
    eventually(&admin, &operator, &tenant, Duration::from_secs(180), "2 relay Pods Ready", async || {
        let relays = pods(&admin, &tenant, "outbox.inventory.io/publisher=orders").await;
        let ready = relays.iter().filter(|p| is_ready(p)).count();
        let labelled = relays.iter().all(|p| {
            p.metadata.labels.as_ref().and_then(|l| l.get("app.kubernetes.io/part-of")).map(String::as_str) == Some("inventory-outbox")
        });
        if ready == 2 && labelled { Ok(()) } else { Err(format!("{ready} of {} Ready, part-of label on all: {labelled}", relays.len())) }
    })
    .await;
    eventually(&admin, &operator, &tenant, Duration::from_secs(30), "topics with 3 partitions", async || {
        let seen = topic_partitions(&[&topic, &dlq]);
        if seen.get(&topic) == Some(&3) && seen.get(&dlq) == Some(&3) { Ok(()) } else { Err(format!("{seen:?}")) }
    })
    .await;

    // Events committed in PostgreSQL arrive on Kafka.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique_name("op-e2e"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let store = Store::from_pool(db.pool.clone(), SchemaName::default());
    let events = InventoryEventPublisher::setup(store, PublisherConfig::default())
        .await
        .expect("publisher on the schema the provision step migrated");
    let mut sent = BTreeSet::new();
    for i in 1..=EVENTS {
        let mut tx = db.pool.begin().await.expect("begin");
        let stored = events
            .publish_event(&mut tx, stock_changed(Uuid::now_v7(), i))
            .await
            .expect("publish");
        tx.commit().await.expect("commit");
        sent.insert(stored.event_id.to_string());
    }
    let mut received = BTreeSet::new();
    let collect = async {
        while !sent.is_subset(&received) {
            let m = consumer.recv().await.expect("consume");
            if let Some(id) = event_id(&m) {
                received.insert(id);
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(90), collect).await.is_err() {
        panic!(
            "{} of {EVENTS} events on {topic} within 90 s\n{}\n{}",
            sent.intersection(&received).count(),
            operator.describe(&admin).await,
            crate::support::cluster::describe(&admin, &tenant).await
        );
    }

    // The status matches the database, and kubectl shows it.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.events")
        .fetch_one(&db.pool)
        .await
        .expect("count events");
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.failed_events")
        .fetch_one(&db.pool)
        .await
        .expect("count failed events");
    assert_eq!((stored, failed), (EVENTS, 0));
    let status = eventually(&admin, &operator, &tenant, Duration::from_secs(60), "status Ready with the database's counts", async || {
        let p = publishers.get("orders").await.map_err(|e| e.to_string())?;
        let s = p.status.clone().unwrap_or_default();
        let ok = condition(&p, "Ready").as_deref() == Some("True")
            && condition(&p, "BrokerReady").as_deref() == Some("True")
            && s.observed_generation == p.metadata.generation
            && s.published_total == Some(stored)
            && s.pending_events == Some(0)
            && s.failed_event_count == Some(failed)
            && s.dead_lettered_count == Some(0)
            && s.ready_workers == 2
            && s.desired_workers == 2
            && s.circuit_state.as_deref() == Some("Closed");
        if ok { Ok(s) } else { Err(format!("{s:?}")) }
    })
    .await;
    assert!(status.last_published_time.is_some(), "{status:?}");
    let provisioned: BTreeSet<String> = status.provisioned_resources.iter().map(|r| r.name.clone()).collect();
    assert!(
        provisioned.contains(&topic) && provisioned.contains(&dlq),
        "the provision step's report reached the status: {status:?}"
    );
    let out = tokio::process::Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
        .arg("--kubeconfig")
        .arg(kubeconfig_path())
        .args(["-n", &tenant, "get", "eventpublishers"])
        .output()
        .await
        .expect("run kubectl");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows.first().cloned().unwrap_or_default(),
        vec!["NAME", "READY", "BROKER", "CIRCUIT", "WORKERS", "PENDING", "FAILED", "AGE"],
        "{table}"
    );
    assert_eq!(
        rows.get(1).map(|r| r[..7].to_vec()).unwrap_or_default(),
        vec!["orders", "True", "kafka", "Closed", "2/2", "0", "0"],
        "{table}"
    );

    // The chart's alerts query these series.
    let metrics = operator.metrics(&admin).await;
    for line in [
        format!(r#"outbox_operator_publisher_workers{{namespace="{tenant}",publisher="orders",state="ready"}} 2"#),
        format!(r#"outbox_operator_publisher_workers{{namespace="{tenant}",publisher="orders",state="desired"}} 2"#),
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line} in:\n{metrics}");
    }
    assert!(
        metrics.lines().any(|l| l.starts_with(r#"outbox_operator_reconciliations_total{kind="EventPublisher"}"#)),
        "{metrics}"
    );

    // Retain (the default): the publisher goes, its topics stay.
    publishers.delete("orders", &DeleteParams::default()).await.expect("delete");
    eventually(&admin, &operator, &tenant, Duration::from_secs(60), "publisher released", async || {
        match publishers.get_opt("orders").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(p) => Err(format!("finalizers {:?}", p.metadata.finalizers)),
        }
    })
    .await;
    let left = topic_partitions(&[&topic, &dlq]);
    assert_eq!(left.len(), 2, "Retain keeps the topics: {left:?}");

    drop(consumer);
    delete_namespace(&admin, &tenant).await;
    operator.remove(&admin).await;
    db.drop().await;
}
