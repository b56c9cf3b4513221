//! The operator against the real kube-apiserver: the CRDs' validation, and (with the node
//! agent) the reconciler end to end.

mod crd_validation;
mod e2e;
mod e2e_brokers;
mod e2e_kafka;
mod e2e_leader;
mod e2e_lifecycle;
mod e2e_outage;
mod e2e_replay;
mod in_cluster;
mod leader;
mod rbac;
mod reconcile;
mod relay_process;
mod topology;

use std::time::Duration;

use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};

/// The operator's RBAC rules, the one source the chart's ClusterRole / Roles render.
pub const OPERATOR_RULES: &str = include_str!("../../../charts/inventory-outbox/files/operator-rules.yaml");

/// The chart's rules file as policy rules.
pub fn operator_rules() -> Vec<PolicyRule> {
    serde_saphyr::from_str(OPERATOR_RULES).expect("charts/inventory-outbox/files/operator-rules.yaml parses as rules")
}

/// Applies both CRDs (server-side apply, so concurrent tests agree) and waits until the API
/// server serves them.
pub async fn install_crds(client: &kube::Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("inventory-outbox-tests").force();
    for crd in inventory_outbox::crd::definitions() {
        let name = crd.metadata.name.clone().expect("CRD has a name");
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let current = api.get(&name).await.expect("read CRD");
            let conditions = current.status.and_then(|s| s.conditions).unwrap_or_default();
            if conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "CRD {name} not established within 30 s; conditions: {conditions:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The Events of namespace `ns` about the object called `name`.
pub async fn events_about(client: &kube::Client, ns: &str, name: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    api.list(&Default::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
                .collect()
        })
        .unwrap_or_default()
}

/// (reason, reporting instance) of each Event about `name` that names its reporter.
pub async fn reporters_of(client: &kube::Client, ns: &str, name: &str) -> Vec<(String, String)> {
    events_about(client, ns, name)
        .await
        .into_iter()
        .filter_map(|e| Some((e.reason.unwrap_or_default(), e.reporting_instance?)))
        .collect()
}
