//! What every end-to-end test of issue 9 shares: CRDs, a tenant namespace with a database
//! Secret, the operator as a Pod from the chart (watching only that namespace), a throw-away
//! database, and waits that print the operator's and the tenant's state on timeout.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use uuid::Uuid;

use inventory_outbox::crd::{EventPublisher, EventPublisherStatus};
use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::store::{SchemaName, Store};

use super::in_cluster::{InClusterOperator, eventually, is_ready};
use super::install_crds;
use crate::event_core::stock_changed;
use crate::support::cluster::{create, delete_namespace, describe, pods};
use crate::support::kube::{admin_client, create_namespace};
use crate::support::postgres::TestDatabase;
use crate::support::{database_url, kubeconfig_path};

/// Name of the database Secret every test's publisher references.
pub const DB_SECRET: &str = "orders-db";

pub struct E2e {
    pub admin: kube::Client,
    pub operator: InClusterOperator,
    pub tenant: crate::support::kube::TestNamespace,
    pub db: TestDatabase,
    pub publishers: Api<EventPublisher>,
}

pub fn condition(p: &EventPublisher, t: &str) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.clone())
}

impl E2e {
    /// Everything up to (not including) the EventPublisher.
    pub async fn start(prefix: &str, operator_replicas: u32) -> Self {
        Self::start_with(prefix, operator_replicas, &[]).await
    }

    /// [`Self::start`] with extra chart values (`name=value`).
    pub async fn start_with(prefix: &str, operator_replicas: u32, values: &[String]) -> Self {
        let admin = admin_client().await;
        install_crds(&admin).await;
        let tenant = create_namespace(&admin, prefix).await;
        let operator =
            InClusterOperator::deploy(&admin, std::slice::from_ref(&tenant), operator_replicas, values).await;
        let db = TestDatabase::create(&prefix.replace('-', "_")).await;
        let (server, _) = database_url()
            .rsplit_once('/')
            .map(|(s, d)| (s.to_owned(), d.to_owned()))
            .expect("DATABASE_URL has a database part");
        let e2e = Self {
            publishers: Api::namespaced(admin.clone(), &tenant),
            admin,
            operator,
            tenant,
            db,
        };
        e2e.secret(DB_SECRET, json!({"url": format!("{server}/{}", e2e.db.name)}))
            .await;
        e2e
    }

    pub async fn secret(&self, name: &str, data: Value) {
        let _: Secret = create(
            &self.admin,
            &self.tenant,
            json!({"metadata": {"name": name}, "stringData": data}),
        )
        .await;
    }

    /// Creates EventPublisher `name` with `spec` (the database Secret filled in when absent).
    pub async fn create_publisher(&self, name: &str, mut spec: Value) {
        if spec.get("outbox").is_none() {
            spec["outbox"] = json!({"databaseUrlSecretRef": {"name": DB_SECRET, "key": "url"}});
        }
        let publisher: EventPublisher = serde_json::from_value(json!({
            "apiVersion": "outbox.inventory.io/v1alpha1",
            "kind": "EventPublisher",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("EventPublisher document");
        self.publishers
            .create(&PostParams::default(), &publisher)
            .await
            .unwrap_or_else(|e| panic!("create EventPublisher {name}: {e}"));
    }

    /// Waits on `check` with this test's operator and tenant state printed on timeout.
    pub async fn eventually<T>(
        &self,
        timeout: Duration,
        what: &str,
        check: impl AsyncFnMut() -> Result<T, String>,
    ) -> T {
        eventually(&self.admin, &self.operator, &self.tenant, timeout, what, check).await
    }

    /// Both namespaces' state, for failure messages.
    pub async fn state(&self) -> String {
        let publishers = match self.publishers.list(&Default::default()).await {
            Ok(list) => list
                .items
                .iter()
                .map(|p| format!("{:?}: {:?}", p.metadata.name, p.status))
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("list EventPublishers: {e}"),
        };
        // Where delivery stands in the store: which side (relay or consumer) stalled.
        let cursors: String = sqlx::query_scalar(
            "SELECT coalesce(string_agg(format('%s: %s events at or below its cursors, %s above', consumer, \
                 below, above), '; '), 'no cursors') FROM ( \
               SELECT c.consumer, count(*) FILTER (WHERE e.position <= c.position) AS below, \
                      count(*) FILTER (WHERE e.position > c.position) AS above \
               FROM outbox.relay_cursors c JOIN outbox.events e ON e.shard = c.shard GROUP BY c.consumer) t",
        )
        .fetch_one(&self.db.pool)
        .await
        .unwrap_or_else(|e| format!("read cursors: {e}"));
        let (stored, failed, dead) = self.database_counts().await;
        format!(
            "{}\n--- tenant namespace {} ---\n{}\n--- publishers ---\n{publishers}\n--- database ---\n\
             {stored} stored, {failed} failed, {dead} dead-lettered; {cursors}",
            self.operator.describe(&self.admin).await,
            self.tenant,
            describe(&self.admin, &self.tenant).await
        )
    }

    /// Waits until `count` relay Pods of `publisher` are Ready, each labelled for the
    /// chart's NetworkPolicy.
    pub async fn relays_ready(&self, publisher: &str, count: usize) {
        let selector = format!("outbox.inventory.io/publisher={publisher}");
        self.eventually(
            Duration::from_secs(180),
            &format!("{count} relay Pods of {publisher} Ready"),
            async || {
                let relays = pods(&self.admin, &self.tenant, &selector).await;
                let ready = relays.iter().filter(|p| is_ready(p)).count();
                let labelled = relays.iter().all(|p| {
                    p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("app.kubernetes.io/part-of"))
                        .map(String::as_str)
                        == Some("inventory-outbox")
                });
                if ready == count && labelled {
                    Ok(())
                } else {
                    Err(format!(
                        "{ready} of {} Ready, part-of label on all: {labelled}",
                        relays.len()
                    ))
                }
            },
        )
        .await;
    }

    /// The library's publisher on the outbox the provision step migrated.
    pub async fn outbox_publisher(&self) -> InventoryEventPublisher {
        let store = Store::from_pool(self.db.pool.clone(), SchemaName::default());
        InventoryEventPublisher::setup(store, PublisherConfig::default())
            .await
            .expect("publisher on the schema the provision step migrated")
    }

    /// Commits `count` events (one transaction each) into the outbox the provision step
    /// migrated; returns their ids.
    pub async fn commit_events(&self, count: i64) -> BTreeSet<String> {
        let events = self.outbox_publisher().await;
        let mut sent = BTreeSet::new();
        for i in 1..=count {
            let mut tx = self.db.pool.begin().await.expect("begin");
            let stored = events
                .publish_event(&mut tx, stock_changed(Uuid::now_v7(), i))
                .await
                .expect("publish");
            tx.commit().await.expect("commit");
            sent.insert(stored.event_id.to_string());
        }
        sent
    }

    /// (events stored, failed-event rows, dead-lettered rows) in the database.
    pub async fn database_counts(&self) -> (i64, i64, i64) {
        let count = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&self.db.pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        };
        (
            count("SELECT count(*) FROM outbox.events").await,
            count("SELECT count(*) FROM outbox.failed_events WHERE status IN ('retrying', 'dead_lettered')").await,
            count("SELECT count(*) FROM outbox.failed_events WHERE status = 'dead_lettered'").await,
        )
    }

    /// Waits until `publisher` is Ready with figures equal to the database's (`publishedTotal`
    /// the events stored: these tests fail none) and `workers` relays ready; returns that
    /// status.
    pub async fn ready_matching_database(&self, publisher: &str, workers: i32) -> EventPublisherStatus {
        self.eventually(
            Duration::from_secs(90),
            &format!("{publisher} Ready with the database's counts"),
            async || {
                let (stored, failed, dead) = self.database_counts().await;
                let p = self.publishers.get(publisher).await.map_err(|e| e.to_string())?;
                let s = p.status.clone().unwrap_or_default();
                let ok = condition(&p, "Ready").as_deref() == Some("True")
                    && condition(&p, "BrokerReady").as_deref() == Some("True")
                    && s.observed_generation == p.metadata.generation
                    && s.published_total == Some(stored)
                    // publishedTotal comes from the store at once, lastPublishedTime from the
                    // relays' heartbeats a moment later: wait for both to agree.
                    && (stored == 0 || s.last_published_time.is_some())
                    && s.pending_events == Some(0)
                    && s.failed_event_count == Some(failed)
                    && s.dead_lettered_count == Some(dead)
                    && s.ready_workers == workers
                    && s.desired_workers == workers
                    && s.circuit_state.as_deref() == Some("Closed");
                if ok {
                    Ok(s)
                } else {
                    Err(format!(
                        "database: {stored} stored, {failed} failed, {dead} dead-lettered; status {s:?}"
                    ))
                }
            },
        )
        .await
    }

    /// `kubectl get eventpublishers` as rows of words.
    pub async fn kubectl_table(&self) -> (Vec<Vec<String>>, String) {
        let out = tokio::process::Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
            .arg("--kubeconfig")
            .arg(kubeconfig_path())
            .args(["-n", &self.tenant, "get", "eventpublishers"])
            .output()
            .await
            .expect("run kubectl");
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        let rows = table
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect();
        (rows, format!("{table}{}", String::from_utf8_lossy(&out.stderr)))
    }

    /// Checks the printer columns and `publisher`'s row (Age left out).
    pub async fn assert_row(&self, publisher: &str, expected: [&str; 6]) {
        let (rows, table) = self.kubectl_table().await;
        assert_eq!(
            rows.first().cloned().unwrap_or_default(),
            [
                "NAME", "READY", "BROKER", "CIRCUIT", "WORKERS", "PENDING", "FAILED", "AGE"
            ],
            "{table}"
        );
        let row = rows.iter().find(|r| r.first().map(String::as_str) == Some(publisher));
        assert_eq!(row.map(|r| r[1..7].to_vec()).unwrap_or_default(), expected, "{table}");
    }

    /// Deletes `publisher` and waits until the finalizer let it go.
    pub async fn delete_publisher(&self, publisher: &str, within: Duration) {
        self.publishers
            .delete(publisher, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("delete {publisher}: {e}"));
        self.eventually(within, &format!("{publisher} released"), async || {
            match self.publishers.get_opt(publisher).await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(p) => Err(format!("finalizers {:?}, status {:?}", p.metadata.finalizers, p.status)),
            }
        })
        .await;
    }

    /// Removes the tenant namespace, the operator and the database.
    pub async fn finish(self) {
        delete_namespace(&self.admin, &self.tenant).await;
        self.operator.remove(&self.admin).await;
        self.db.drop().await;
    }
}
