//! Deployments: a 2-replica relay becomes Available through the real controllers, rolls on a
//! template change, replaces a deleted Pod; a crashing container goes into CrashLoopBackOff.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

use crate::support::cluster::{self, create, pods, wait_for};
use crate::support::kube::{admin_client, create_namespace};
use crate::support::postgres::TestDatabase;
use crate::support::{database_url, kafka_bootstrap, unique_name};

/// The relay's config; the node agent gives each Pod its own loopback address, and the relay's
/// `http.listen` is a fixed address, so the container substitutes its Pod IP at start.
fn relay_config(topic: &str) -> String {
    json!({
        "publisher": "cluster-relay",
        "outbox": {"databaseUrlEnv": "DATABASE_URL", "migrate": true},
        "broker": {"kafka": {"bootstrapServers": kafka_bootstrap(), "deadLetterTopic": format!("{topic}-dlq")}},
        "routing": {"strategy": "single", "destination": topic},
        "workers": {"heartbeatIntervalMs": 500, "leaseDurationMs": 3000},
        "http": {"listen": "@POD_IP@:8080"},
    })
    .to_string()
}

fn ready_pods(list: &[Pod]) -> Vec<&Pod> {
    list.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .collect()
}

fn names(list: &[&Pod]) -> BTreeSet<String> {
    list.iter().filter_map(|p| p.metadata.name.clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_deployment_becomes_available_rolls_and_replaces_pods() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cluster-deploy").await;
    let db = TestDatabase::create("cluster_deploy").await;
    let url = format!(
        "{}/{}",
        database_url().rsplit_once('/').expect("database url").0,
        db.name
    );
    let image = cluster::register_test_image();
    let topic = unique_name("cluster-relay");

    create::<ConfigMap>(
        &client,
        &ns,
        json!({"metadata": {"name": "relay"}, "data": {"relay.yaml": relay_config(&topic)}}),
    )
    .await;
    create::<Secret>(
        &client,
        &ns,
        json!({"metadata": {"name": "db"}, "stringData": {"url": url}}),
    )
    .await;
    let deployment = json!({
        "metadata": {"name": "relay"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "relay"}},
            // one replica per Node (required anti-affinity): a rollout replaces, it cannot surge
            "strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"app": "relay"}},
                "spec": {
                    "terminationGracePeriodSeconds": 10,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532},
                    "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                        {"labelSelector": {"matchLabels": {"app": "relay"}}, "topologyKey": "kubernetes.io/hostname"}]}},
                    "containers": [{
                        "name": "relay",
                        "image": image,
                        "command": ["/bin/sh", "-c",
                            "sed \"s/@POD_IP@/$POD_IP/\" /etc/relay/relay.yaml >/run/relay/relay.yaml && exec inventory-outbox relay --config /run/relay/relay.yaml"],
                        "env": [
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "db", "key": "url"}}},
                            {"name": "LOG_FORMAT", "value": "text"},
                        ],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1, "failureThreshold": 3},
                        "livenessProbe": {"httpGet": {"path": "/livez", "port": "http"}, "initialDelaySeconds": 10, "periodSeconds": 5, "failureThreshold": 6},
                        "volumeMounts": [
                            {"name": "config", "mountPath": "/etc/relay"},
                            {"name": "run", "mountPath": "/run/relay"},
                        ],
                    }],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "relay"}},
                        {"name": "run", "emptyDir": {}},
                    ],
                },
            },
        },
    });
    create::<Deployment>(&client, &ns, deployment).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);

    let available = async |want_gen: Option<i64>| {
        let d = deployments.get("relay").await.ok()?;
        let s = d.status?;
        let available = s
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_.as_deref() == Some("Available") && c.status.as_deref() == Some("True"));
        let current = want_gen.is_none_or(|g| s.observed_generation >= Some(g));
        (available
            && current
            && s.ready_replicas == Some(2)
            && s.available_replicas == Some(2)
            && s.updated_replicas == Some(2)
            && s.replicas == Some(2))
        .then_some(())
    };
    wait_for(
        &client,
        &ns,
        Duration::from_secs(120),
        "Deployment relay Available with readyReplicas 2",
        async || available(None).await,
    )
    .await;

    let first = pods(&client, &ns, "app=relay").await;
    let first_ready = ready_pods(&first);
    assert_eq!(first_ready.len(), 2, "{}", cluster::describe(&client, &ns).await);
    let nodes: BTreeSet<_> = first_ready
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    assert_eq!(nodes.len(), 2, "anti-affinity puts one replica on each Node: {nodes:?}");
    // each replica answers on its own Pod IP
    let http = reqwest::Client::new();
    for p in &first_ready {
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("pod ip");
        let resp = http
            .get(format!("http://{ip}:8080/readyz"))
            .send()
            .await
            .expect("GET /readyz on the Pod IP");
        assert!(resp.status().is_success(), "readyz of {ip}: {}", resp.status());
    }
    let first_names = names(&first_ready);

    // a template change rolls both Pods
    let patched = deployments
        .patch(
            "relay",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"metadata": {"annotations": {"rollout": "2"}}}}})),
        )
        .await
        .expect("patch template");
    let generation = patched.metadata.generation;
    let rolled = wait_for(
        &client,
        &ns,
        Duration::from_secs(180),
        "rollout of both Pods",
        async || {
            available(generation).await?;
            let list = pods(&client, &ns, "app=relay").await;
            let ready = names(&ready_pods(&list));
            (list.len() == 2 && ready.len() == 2 && ready.is_disjoint(&first_names)).then_some(ready)
        },
    )
    .await;

    // a deleted Pod is replaced
    let victim = rolled.iter().next().expect("a pod").clone();
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete(&victim, &DeleteParams::default())
        .await
        .expect("delete pod");
    wait_for(
        &client,
        &ns,
        Duration::from_secs(120),
        "replacement of the deleted Pod",
        async || {
            available(generation).await?;
            let list = pods(&client, &ns, "app=relay").await;
            let ready = names(&ready_pods(&list));
            (list.len() == 2 && ready.len() == 2 && !ready.contains(&victim)).then_some(())
        },
    )
    .await;

    cluster::delete_namespace(&client, &ns).await;
    // the relays hold connections to the database: wait for their Pods to go first
    wait_for(&client, &ns, Duration::from_secs(60), "relay Pods gone", async || {
        pods(&client, &ns, "app=relay").await.is_empty().then_some(())
    })
    .await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crashing_container_restarts_into_crash_loop_back_off() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cluster-crash").await;
    let image = cluster::register_shell_image();
    create::<Deployment>(&client, &ns, json!({
        "metadata": {"name": "crasher"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "crasher"}},
            "template": {
                "metadata": {"labels": {"app": "crasher"}},
                "spec": {"containers": [{"name": "main", "image": image, "command": ["/bin/sh", "-c", "echo crashing; exit 3"]}]},
            },
        },
    }))
    .await;
    wait_for(
        &client,
        &ns,
        Duration::from_secs(90),
        "restarts and CrashLoopBackOff",
        async || {
            let list = pods(&client, &ns, "app=crasher").await;
            let p = list.first()?;
            let cs = cluster::container_status(p, "main")?;
            let waiting = cs.state.as_ref()?.waiting.as_ref()?.reason.as_deref()? == "CrashLoopBackOff";
            let last_exit = cs.last_state.as_ref()?.terminated.as_ref()?.exit_code;
            (waiting && cs.restart_count >= 1 && last_exit == 3).then_some(())
        },
    )
    .await;
    cluster::delete_namespace(&client, &ns).await;
}
