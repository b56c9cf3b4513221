//! The EventPublisher controller, run in this process against the real API server (and its
//! Deployment and garbage-collector controllers): children applied with owner references,
//! status written with conditions, a spec change rolling the Pod template, `paused`, the
//! printer columns, and cleanup by owner references on deletion.
//!
//! Relay Pods do not need to run here: without an answer the status must say so.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use inventory_outbox::crd::EventPublisher;
use inventory_outbox::operator::build::CONFIG_HASH_ANNOTATION;
use inventory_outbox::operator::reconcile::{Settings, run};

use super::install_crds;
use crate::support::kafka_bootstrap;
use crate::support::kube::{admin_client, create_namespace};

/// Polls `f` until it returns Some, or fails after `within` with `what` and the last state.
async fn until<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(state) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{what} within {within:?}; last state: {state}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn condition(p: &EventPublisher, t: &str) -> Option<(String, String, String)> {
    p.status.as_ref()?.conditions.iter().find(|c| c.type_ == t).map(|c| {
        (
            c.status.clone(),
            c.reason.clone(),
            serde_json::to_string(&c.last_transition_time).unwrap_or_default(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_applies_owned_children_writes_status_rolls_on_change_and_pauses() {
    let client = admin_client().await;
    install_crds(&client).await;
    let ns = create_namespace(&client, "op-reconcile").await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = Settings {
        requeue_after: Duration::from_secs(2),
        ..Settings::default()
    };
    let controller = tokio::spawn(run(client.clone(), Some(ns.clone()), settings, async move {
        let _ = stopped.await;
    }));

    let publishers: Api<EventPublisher> = Api::namespaced(client.clone(), &ns);
    let publisher: EventPublisher = serde_json::from_value(json!({
        "apiVersion": "outbox.inventory.io/v1alpha1",
        "kind": "EventPublisher",
        "metadata": {"name": "orders"},
        "spec": {
            "outbox": {"databaseUrlSecretRef": {"name": "orders-db", "key": "url"}},
            "broker": {"kafka": {"bootstrapServers": kafka_bootstrap()}},
            "routing": {"strategy": "single", "destination": "inventory.orders"},
            "replicas": 2
        }
    }))
    .expect("EventPublisher");
    publishers
        .create(&PostParams::default(), &publisher)
        .await
        .expect("create EventPublisher");

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let deployment = until(Duration::from_secs(30), "Deployment orders-relay applied", || async {
        deployments.get("orders-relay").await.map_err(|e| e.to_string())
    })
    .await;
    let owner = &deployment.metadata.owner_references.as_ref().expect("owner references")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("EventPublisher", "orders", Some(true))
    );
    // Children are applied one after another: wait for each rather than expecting all at once.
    let cm = until(Duration::from_secs(30), "ConfigMap orders-relay applied", || async {
        config_maps.get("orders-relay").await.map_err(|e| e.to_string())
    })
    .await;
    assert!(cm.data.unwrap_or_default().contains_key("relay.yaml"));
    until(Duration::from_secs(30), "Service orders-relay applied", || async {
        services.get("orders-relay").await.map_err(|e| e.to_string())
    })
    .await;
    until(
        Duration::from_secs(30),
        "PDB orders-relay (2 replicas) applied",
        || async { pdbs.get("orders-relay").await.map_err(|e| e.to_string()) },
    )
    .await;
    let managers: Vec<String> = deployment
        .metadata
        .managed_fields
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.contains(&"inventory-outbox-operator".to_owned()),
        "{managers:?}"
    );
    let hash_of = |d: &Deployment| {
        d.spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(CONFIG_HASH_ANNOTATION).cloned())
    };
    let first_hash = hash_of(&deployment).expect("config hash annotation");

    let status = until(Duration::from_secs(30), "status written for generation 1", || async {
        let p = publishers.get("orders").await.map_err(|e| e.to_string())?;
        match &p.status {
            Some(s) if s.observed_generation == Some(1) && !s.conditions.is_empty() => Ok(p),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let s = status.status.clone().expect("status");
    assert_eq!(s.broker.as_deref(), Some("kafka"));
    assert_eq!(s.desired_workers, 2);
    let (ready, _, ready_since) = condition(&status, "Ready").expect("Ready condition");
    assert_eq!(
        ready, "False",
        "no relay can be ready without its database Secret: {s:?}"
    );
    assert_eq!(s.pending_events, None, "no figures without an answering relay: {s:?}");
    for t in [
        "OutboxReady",
        "BrokerReady",
        "CircuitClosed",
        "WorkersAvailable",
        "TopologyProvisioned",
        "Paused",
    ] {
        assert!(
            condition(&status, t).is_some(),
            "condition {t} missing: {:?}",
            s.conditions
        );
    }

    // The dashboard: kubectl shows the printer columns.
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let kubeconfig = crate::support::kubeconfig_path();
    let out = tokio::process::Command::new(&kubectl)
        .args([
            "--kubeconfig",
            &kubeconfig.to_string_lossy(),
            "-n",
            &ns,
            "get",
            "eventpublishers",
        ])
        .output()
        .await
        .expect("run kubectl");
    let table = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        header,
        vec![
            "NAME", "READY", "BROKER", "CIRCUIT", "WORKERS", "PENDING", "FAILED", "AGE"
        ],
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("kafka"), "{table}");

    // A later reconcile with the same outcome keeps Ready's transition time.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = publishers.get("orders").await.expect("read");
    assert_eq!(
        condition(&later, "Ready").expect("Ready").2,
        ready_since,
        "lastTransitionTime moved without a change"
    );

    // A batch size change rolls the Pod template.
    let patch = PatchParams::default();
    publishers
        .patch(
            "orders",
            &patch,
            &Patch::Merge(json!({"spec": {"outbox": {"batchSize": 100}}})),
        )
        .await
        .expect("change batch size");
    until(
        Duration::from_secs(30),
        "config hash changed after the batch size change",
        || async {
            let d = deployments.get("orders-relay").await.map_err(|e| e.to_string())?;
            match hash_of(&d) {
                Some(h) if h != first_hash => Ok(()),
                other => Err(format!("hash {other:?}")),
            }
        },
    )
    .await;

    // Paused: no relays, no PDB, and the status says so.
    publishers
        .patch("orders", &patch, &Patch::Merge(json!({"spec": {"paused": true}})))
        .await
        .expect("pause");
    until(
        Duration::from_secs(30),
        "paused: Deployment at 0 replicas, PDB removed, Paused True",
        || async {
            let d = deployments.get("orders-relay").await.map_err(|e| e.to_string())?;
            let replicas = d.spec.replicas;
            let pdb_gone = matches!(pdbs.get("orders-relay").await, Err(kube::Error::Api(s)) if s.code == 404);
            let p = publishers.get("orders").await.map_err(|e| e.to_string())?;
            let paused = condition(&p, "Paused").map(|c| c.0);
            let ready_reason = condition(&p, "Ready").map(|c| c.1);
            if replicas == Some(0)
                && pdb_gone
                && paused.as_deref() == Some("True")
                && ready_reason.as_deref() == Some("Paused")
            {
                Ok(())
            } else {
                Err(format!(
                    "replicas {replicas:?}, pdb gone {pdb_gone}, Paused {paused:?}, Ready reason {ready_reason:?}"
                ))
            }
        },
    )
    .await;

    // Deleting the publisher removes its children through their owner references.
    publishers
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete");
    until(Duration::from_secs(60), "children garbage-collected", || async {
        match config_maps.get("orders-relay").await {
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            other => Err(format!("{:?}", other.map(|c| c.metadata.name))),
        }
    })
    .await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
}

fn kafka_publisher(name: &str, policy: &str) -> EventPublisher {
    serde_json::from_value(json!({
        "apiVersion": "outbox.inventory.io/v1alpha1",
        "kind": "EventPublisher",
        "metadata": {"name": name},
        "spec": {
            "outbox": {"databaseUrlSecretRef": {"name": "orders-db", "key": "url"}},
            "broker": {"kafka": {"bootstrapServers": kafka_bootstrap()}},
            "routing": {"strategy": "single", "destination": format!("{name}.events")},
            "deletionPolicy": policy,
            "paused": true
        }
    }))
    .expect("EventPublisher")
}

/// Pretends a provision run reported `topic` as created (no relay Pod runs in this test).
async fn record_provisioned(api: &Api<EventPublisher>, name: &str, topic: &str) {
    until(
        Duration::from_secs(30),
        "finalizer added and status written",
        || async {
            let p = api.get(name).await.map_err(|e| e.to_string())?;
            let has_finalizer = p
                .metadata
                .finalizers
                .unwrap_or_default()
                .iter()
                .any(|f| f == "outbox.inventory.io/cleanup");
            if has_finalizer && p.status.is_some() {
                Ok(())
            } else {
                Err(format!("finalizer {has_finalizer}, status {:?}", p.status))
            }
        },
    )
    .await;
    let patch = json!({"status": {"provisionedResources": [{"kind": "kafkaTopic", "name": topic}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("record provisioned resources");
}

async fn events_of(client: &kube::Client, ns: &str, name: &str) -> Vec<(String, String)> {
    super::events_about(client, ns, name)
        .await
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_policy_retain_releases_at_once_and_delete_runs_a_bounded_cleanup_job() {
    let client = admin_client().await;
    install_crds(&client).await;
    let ns = create_namespace(&client, "op-finalizer").await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = Settings {
        requeue_after: Duration::from_secs(2),
        // The cleanup Pod cannot reach a broker here: deletion must still end, in bounded time.
        cleanup_deadline: Duration::from_secs(15),
        ..Settings::default()
    };
    let controller = tokio::spawn(run(client.clone(), Some(ns.clone()), settings, async move {
        let _ = stopped.await;
    }));
    let api: Api<EventPublisher> = Api::namespaced(client.clone(), &ns);

    // Retain: the finalizer lets go at once and says what stays.
    api.create(&PostParams::default(), &kafka_publisher("keep", "Retain"))
        .await
        .expect("create keep");
    record_provisioned(&api, "keep", "keep.events").await;
    api.delete("keep", &DeleteParams::default()).await.expect("delete keep");
    until(Duration::from_secs(30), "Retain publisher gone", || async {
        match api.get_opt("keep").await {
            Ok(None) => Ok(()),
            other => Err(format!("{:?}", other.map(|p| p.map(|p| p.metadata.finalizers)))),
        }
    })
    .await;
    let retained = events_of(&client, &ns, "keep").await;
    assert!(
        retained
            .iter()
            .any(|(r, n)| r == "ResourcesRetained" && n.contains("keep.events")),
        "{retained:?}"
    );

    // Delete: a cleanup Job with the created resources; when it cannot finish, deletion still
    // ends after the Job's deadline, with an Event naming what was left behind.
    api.create(&PostParams::default(), &kafka_publisher("drop", "Delete"))
        .await
        .expect("create drop");
    record_provisioned(&api, "drop", "drop.events").await;
    api.delete("drop", &DeleteParams::default()).await.expect("delete drop");
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), &ns);
    let job = until(Duration::from_secs(30), "cleanup Job created", || async {
        jobs.get_opt("drop-cleanup")
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no Job yet".to_owned())
    })
    .await;
    let container = &job
        .spec
        .as_ref()
        .expect("job spec")
        .template
        .spec
        .as_ref()
        .expect("pod spec")
        .containers[0];
    let env = serde_json::to_string(&container.env).expect("env json");
    assert!(
        env.contains("drop.events"),
        "the Job removes exactly the created topic: {env}"
    );
    assert_eq!(job.spec.as_ref().and_then(|s| s.active_deadline_seconds), Some(15));
    until(
        Duration::from_secs(120),
        "Delete publisher gone after the bounded cleanup",
        || async {
            match api.get_opt("drop").await {
                Ok(None) => Ok(()),
                other => Err(format!(
                    "still there: {:?}; events {:?}",
                    other.map(|p| p.map(|p| p.metadata.finalizers)),
                    events_of(&client, &ns, "drop").await
                )),
            }
        },
    )
    .await;
    let dropped = events_of(&client, &ns, "drop").await;
    assert!(dropped.iter().any(|(r, _)| r == "CleanupStarted"), "{dropped:?}");
    assert!(
        dropped.iter().any(
            |(r, n)| (r == "CleanupFailed" && n.contains("leaves behind: kafkaTopic drop.events"))
                || r == "CleanupSucceeded"
        ),
        "{dropped:?}"
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_depth_gauge_counts_publishers_waiting_for_a_reconcile_and_drains_to_zero() {
    let client = admin_client().await;
    install_crds(&client).await;
    let ns = create_namespace(&client, "op-queue").await;
    let api: Api<EventPublisher> = Api::namespaced(client.clone(), &ns);
    let names: Vec<String> = (0..6).map(|i| format!("queued-{i}")).collect();
    for name in &names {
        api.create(&PostParams::default(), &kafka_publisher(name, "Retain"))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
    }
    // One reconcile at a time: the controller's first listing triggers all six at once.
    let metrics = std::sync::Arc::new(inventory_outbox::operator::metrics::OperatorMetrics::new());
    let settings = Settings {
        concurrency: 1,
        requeue_after: Duration::from_secs(300),
        ..Settings::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(inventory_outbox::operator::reconcile::run_with_metrics(
        client.clone(),
        Some(ns.to_string()),
        settings,
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let kind = inventory_outbox::operator::metrics::EVENT_PUBLISHER;
    let mut deepest = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while deepest < 4 && tokio::time::Instant::now() < deadline {
        deepest = deepest.max(metrics.queue_depth(kind));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        deepest >= 4,
        "at most {deepest} publishers seen waiting behind one reconcile"
    );
    until(
        Duration::from_secs(90),
        "every publisher reconciled and the queue empty",
        || async {
            let list = api.list(&Default::default()).await.map_err(|e| e.to_string())?;
            let done = list
                .items
                .iter()
                .filter(|p| {
                    p.status
                        .as_ref()
                        .is_some_and(|s| s.observed_generation == p.metadata.generation)
                })
                .count();
            let depth = metrics.queue_depth(kind);
            let idle_line = format!("outbox_operator_reconciles_in_flight{{kind=\"{kind}\"}} 0");
            let idle = metrics.encode().lines().any(|l| l == idle_line);
            if done == names.len() && depth == 0 && idle {
                Ok(())
            } else {
                Err(format!("{done} reconciled, queue depth {depth}, in flight idle {idle}"))
            }
        },
    )
    .await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
}
