//! The committed RBAC (`deploy/rbac/clusterrole.yaml`) is enough for the controller and gives
//! no access to Secrets: the controller runs here as a ServiceAccount bound to exactly those
//! rules (through impersonation) against the real API server.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use inventory_outbox::crd::EventPublisher;
use inventory_outbox::operator::reconcile::{Settings, run};

use super::install_crds;
use crate::support::kafka_bootstrap;
use crate::support::kube::{admin_client, create_namespace, impersonating_client};

const ROLE: &str = include_str!("../../../deploy/rbac/clusterrole.yaml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_runs_with_only_the_committed_rbac_and_cannot_read_secrets() {
    let admin = admin_client().await;
    install_crds(&admin).await;
    let ns = create_namespace(&admin, "op-rbac").await;

    let role: ClusterRole = serde_saphyr::from_str(ROLE).expect("clusterrole.yaml parses");
    let role_name = format!("inventory-outbox-operator-{ns}");
    let mut role = role;
    role.metadata.name = Some(role_name.clone());
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    roles
        .patch(
            &role_name,
            &PatchParams::apply("inventory-outbox-tests").force(),
            &Patch::Apply(&role),
        )
        .await
        .expect("apply ClusterRole");
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": role_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns}]
    }))
    .expect("binding");
    bindings
        .patch(
            &role_name,
            &PatchParams::apply("inventory-outbox-tests").force(),
            &Patch::Apply(&binding),
        )
        .await
        .expect("apply ClusterRoleBinding");

    let operator = impersonating_client(&format!("system:serviceaccount:{ns}:operator")).await;
    // Secrets are out of reach, in its namespace and cluster-wide.
    for (what, result) in [
        (
            "list Secrets in the namespace",
            Api::<Secret>::namespaced(operator.clone(), &ns)
                .list(&Default::default())
                .await
                .map(|_| ()),
        ),
        (
            "list Secrets cluster-wide",
            Api::<Secret>::all(operator.clone())
                .list(&Default::default())
                .await
                .map(|_| ()),
        ),
        (
            "get a Secret",
            Api::<Secret>::namespaced(operator.clone(), &ns)
                .get("orders-db")
                .await
                .map(|_| ()),
        ),
    ] {
        match result {
            Err(kube::Error::Api(s)) if s.code == 403 => {}
            other => panic!("{what} must be forbidden (403), got {other:?}"),
        }
    }

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = Settings {
        requeue_after: Duration::from_secs(2),
        cleanup_deadline: Duration::from_secs(10),
        ..Settings::default()
    };
    let controller = tokio::spawn(run(operator.clone(), Some(ns.clone()), settings, async move {
        let _ = stopped.await;
    }));
    let publishers: Api<EventPublisher> = Api::namespaced(admin.clone(), &ns);
    let publisher: EventPublisher = serde_json::from_value(json!({
        "apiVersion": "outbox.inventory.io/v1alpha1",
        "kind": "EventPublisher",
        "metadata": {"name": "orders"},
        "spec": {
            "outbox": {"databaseUrlSecretRef": {"name": "orders-db", "key": "url"}},
            "broker": {"kafka": {"bootstrapServers": kafka_bootstrap()}},
            "routing": {"strategy": "single", "destination": "inventory.orders"},
            "replicas": 2,
            "deletionPolicy": "Delete"
        }
    }))
    .expect("EventPublisher");
    publishers
        .create(&PostParams::default(), &publisher)
        .await
        .expect("create");

    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let deployment = deployments.get_opt("orders-relay").await.expect("read Deployment");
        let p = publishers.get("orders").await.expect("read publisher");
        let status_written = p.status.as_ref().is_some_and(|s| s.observed_generation == Some(1));
        let finalizer = p
            .metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"outbox.inventory.io/cleanup".to_owned());
        if deployment.is_some() && status_written && finalizer {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "under the committed RBAC: Deployment {}, status written {status_written}, finalizer {finalizer}; status {:?}",
            deployment.is_some(),
            p.status
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Deletion with Delete but nothing provisioned releases at once, under the same rules.
    publishers
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while publishers.get_opt("orders").await.expect("read").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publisher not released within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
    let _ = bindings.delete(&role_name, &DeleteParams::default()).await;
    let _ = roles.delete(&role_name, &DeleteParams::default()).await;
}
