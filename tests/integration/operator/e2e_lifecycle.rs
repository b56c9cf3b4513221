//! Issue 9's change acceptance under the in-cluster operator (shared Kafka): a batch-size change
//! and a replica change roll the Deployment; rotating the database password in PostgreSQL and in
//! the referenced Secret restarts the relays with it and they keep publishing; `paused: true`
//! stops the relays and resuming loses nothing. Through all of it `publishedTotal` never goes
//! down and ends equal to the events in the database.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use rdkafka::consumer::StreamConsumer;
use serde_json::json;

use inventory_outbox::operator::build::CONFIG_HASH_ANNOTATION;

use super::e2e::{E2e, condition};
use super::e2e_kafka::{consume_all, consumer};
use crate::support::cluster::{container_status, pods};
use crate::support::{database_url, kafka_bootstrap, unique_name};

fn template_hash(d: &Deployment) -> Option<String> {
    d.spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(CONFIG_HASH_ANNOTATION).cloned())
}

/// Waits until the Deployment rolled out generation-current with `replicas` ready and, when
/// given, a config hash other than `old_hash`; returns the new hash.
async fn rolled(e2e: &E2e, replicas: i32, old_hash: Option<&str>) -> String {
    let deployments: Api<Deployment> = Api::namespaced(e2e.admin.clone(), &e2e.tenant);
    e2e.eventually(
        Duration::from_secs(180),
        &format!("Deployment rolled out with {replicas} ready"),
        async || {
            let d = deployments.get("orders-relay").await.map_err(|e| e.to_string())?;
            let hash = template_hash(&d);
            let s = d.status.clone().unwrap_or_default();
            let done = s.observed_generation == d.metadata.generation
                && d.spec.replicas == Some(replicas)
                && s.updated_replicas == Some(replicas)
                && s.ready_replicas == Some(replicas)
                && s.replicas == Some(replicas)
                && hash.as_deref() != old_hash;
            match (done, hash) {
                (true, Some(h)) => Ok(h),
                (_, hash) => Err(format!(
                    "hash {hash:?} (old {old_hash:?}), spec replicas {:?}, status {s:?}",
                    d.spec.replicas
                )),
            }
        },
    )
    .await
}

/// Every `publishedTotal` the status showed, read every 200 ms until dropped: a rollout must
/// never make it go down (the relays' own counters start at zero in every new Pod).
struct PublishedTotals {
    seen: std::sync::Arc<std::sync::Mutex<Vec<i64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PublishedTotals {
    fn watch(e2e: &E2e, publisher: &str) -> Self {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (api, name, record) = (e2e.publishers.clone(), publisher.to_owned(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                if let Ok(p) = api.get(&name).await
                    && let Some(total) = p.status.and_then(|s| s.published_total)
                    && let Ok(mut seen) = record.lock()
                    && seen.last() != Some(&total)
                {
                    seen.push(total);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self { seen, task }
    }

    /// Panics unless every value seen so far is at least the one before it.
    fn assert_never_decreased(&self, during: &str) {
        let seen = self.seen.lock().expect("samples").clone();
        assert!(
            seen.windows(2).all(|w| w[0] <= w[1]),
            "publishedTotal went down {during}: {seen:?}"
        );
    }
}

impl Drop for PublishedTotals {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn nothing_arrives(consumer: &StreamConsumer, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        loop {
            if consumer.recv().await.is_ok() {
                return;
            }
        }
    })
    .await
    .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_roll_the_relays_a_rotated_password_keeps_them_publishing_and_pause_loses_nothing() {
    let e2e = E2e::start("op-life", 1).await;
    // A login of this test's own, so its password can be rotated.
    let role = unique_name("op_life").replace('-', "_");
    let admin_db = &e2e.db.pool;
    for sql in [
        format!("CREATE ROLE {role} LOGIN PASSWORD 'first-password'"),
        format!("ALTER DATABASE {} OWNER TO {role}", e2e.db.name),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(admin_db)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let base = database_url();
    let host = base
        .rsplit_once('@')
        .map(|(_, h)| h.to_owned())
        .expect("DATABASE_URL has user info");
    let host = host
        .rsplit_once('/')
        .map(|(h, _)| h.to_owned())
        .expect("DATABASE_URL has a database part");
    let url_with = |password: &str| format!("postgres://{role}:{password}@{host}/{}", e2e.db.name);
    e2e.secret("orders-login", json!({"url": url_with("first-password")}))
        .await;

    let topic = unique_name("op-life");
    e2e.create_publisher(
        "orders",
        json!({
            "outbox": {"databaseUrlSecretRef": {"name": "orders-login", "key": "url"}},
            "broker": {"kafka": {"bootstrapServers": kafka_bootstrap()}},
            "routing": {"strategy": "single", "destination": topic},
            "topology": {"kafka": {"partitions": 2}},
            "deadLetter": {"destination": format!("{topic}.dlq")},
            "replicas": 1
        }),
    )
    .await;
    e2e.relays_ready("orders", 1).await;
    let first_hash = rolled(&e2e, 1, None).await;
    let consumer = consumer(&kafka_bootstrap(), &topic);
    let totals = PublishedTotals::watch(&e2e, "orders");
    let mut sent = e2e.commit_events(10).await;
    let mut received = BTreeSet::new();
    consume_all(&e2e, &consumer, &sent, &mut received, Duration::from_secs(60)).await;
    e2e.ready_matching_database("orders", 1).await;

    // A batch-size change rolls the Pods; a replica change scales them.
    let merge = |doc: serde_json::Value| Patch::Merge(doc);
    e2e.publishers
        .patch(
            "orders",
            &PatchParams::default(),
            &merge(json!({"spec": {"outbox": {"batchSize": 50}}})),
        )
        .await
        .expect("change batch size");
    let second_hash = rolled(&e2e, 1, Some(&first_hash)).await;
    // The relay that published the first 10 is gone; the new one has published nothing yet.
    e2e.ready_matching_database("orders", 1).await;
    totals.assert_never_decreased("over the batch-size rollout");
    e2e.publishers
        .patch(
            "orders",
            &PatchParams::default(),
            &merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .expect("scale to 2");
    rolled(&e2e, 2, None).await;
    sent.extend(e2e.commit_events(10).await);
    consume_all(&e2e, &consumer, &sent, &mut received, Duration::from_secs(90)).await;
    e2e.ready_matching_database("orders", 2).await;
    totals.assert_never_decreased("over the scale-up");

    // Rotate: PostgreSQL first, then the Secret. The relays restart on the changed file.
    let restarts = |list: &[k8s_openapi::api::core::v1::Pod]| -> i32 {
        list.iter()
            .filter_map(|p| container_status(p, "relay").map(|c| c.restart_count))
            .sum()
    };
    let before = restarts(&pods(&e2e.admin, &e2e.tenant, "outbox.inventory.io/publisher=orders").await);
    let sql = format!("ALTER ROLE {role} PASSWORD 'second-password'");
    sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
        .execute(admin_db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let secrets: Api<Secret> = Api::namespaced(e2e.admin.clone(), &e2e.tenant);
    secrets
        .patch(
            "orders-login",
            &PatchParams::default(),
            &merge(json!({"stringData": {"url": url_with("second-password")}})),
        )
        .await
        .expect("rotate the Secret");
    e2e.eventually(
        Duration::from_secs(90),
        "both relays restarted on the rotated Secret",
        async || {
            let list = pods(&e2e.admin, &e2e.tenant, "outbox.inventory.io/publisher=orders").await;
            let now = restarts(&list);
            let ready = list.iter().filter(|p| super::in_cluster::is_ready(p)).count();
            if now >= before + 2 && ready == 2 {
                Ok(())
            } else {
                Err(format!("relay restarts {now} (before {before}), {ready} Ready"))
            }
        },
    )
    .await;
    sent.extend(e2e.commit_events(10).await);
    consume_all(&e2e, &consumer, &sent, &mut received, Duration::from_secs(90)).await;
    e2e.ready_matching_database("orders", 2).await;
    totals.assert_never_decreased("over the relays' restarts");

    // Paused: no relays; committed events wait. Resumed: all of them arrive.
    e2e.publishers
        .patch(
            "orders",
            &PatchParams::default(),
            &merge(json!({"spec": {"paused": true}})),
        )
        .await
        .expect("pause");
    e2e.eventually(
        Duration::from_secs(90),
        "paused: no relay Pods, Paused True",
        async || {
            let list = pods(&e2e.admin, &e2e.tenant, "outbox.inventory.io/publisher=orders").await;
            let p = e2e.publishers.get("orders").await.map_err(|e| e.to_string())?;
            if list.is_empty() && condition(&p, "Paused").as_deref() == Some("True") {
                Ok(())
            } else {
                Err(format!("{} relay Pods, status {:?}", list.len(), p.status))
            }
        },
    )
    .await;
    let waiting = e2e.commit_events(10).await;
    assert!(
        nothing_arrives(&consumer, Duration::from_secs(5)).await,
        "a paused publisher delivers nothing"
    );
    e2e.publishers
        .patch(
            "orders",
            &PatchParams::default(),
            &merge(json!({"spec": {"paused": false}})),
        )
        .await
        .expect("resume");
    sent.extend(waiting);
    consume_all(&e2e, &consumer, &sent, &mut received, Duration::from_secs(120)).await;
    let status = e2e.ready_matching_database("orders", 2).await;
    assert_eq!(e2e.database_counts().await.0, 40, "{status:?}");
    assert_eq!(status.published_total, Some(40), "{status:?}");
    totals.assert_never_decreased("over pause and resume");
    drop(totals);
    assert_ne!(first_hash, second_hash);

    drop(consumer);
    e2e.delete_publisher("orders", Duration::from_secs(60)).await;
    let admin_url = database_url();
    e2e.finish().await;
    // The database is gone; its owner can go too.
    if let Ok(pool) = sqlx::PgPool::connect(&admin_url).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
            .execute(&pool)
            .await;
    }
}
