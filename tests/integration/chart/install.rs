//! `helm install` gives a Ready operator Pod under the chart's ServiceAccount that reconciles,
//! `helm upgrade` rolls it, `helm uninstall` leaves nothing but the CRDs.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;

use super::{all_optional_objects, chart_dir, helm, install_monitoring_crds, kubectl, run, run_ok, test_image};
use crate::support::cluster::{pods, wait_for};
use crate::support::kube::{admin_client, create_namespace};
use crate::support::{kafka_bootstrap, unique_name};
use inventory_outbox::crd::EventPublisher;

/// Every kind the chart can create in its namespace (plus what a Deployment makes), and every
/// cluster-scoped one. The test checks that the installed manifest holds no other kind.
const NAMESPACED_KINDS: &[&str] = &[
    "deployments.apps",
    "replicasets.apps",
    "pods",
    "serviceaccounts",
    "services",
    "configmaps",
    "roles.rbac.authorization.k8s.io",
    "rolebindings.rbac.authorization.k8s.io",
    "networkpolicies.networking.k8s.io",
    "poddisruptionbudgets.policy",
    "servicemonitors.monitoring.coreos.com",
    "prometheusrules.monitoring.coreos.com",
];
const CLUSTER_KINDS: &[&str] = &[
    "clusterroles.rbac.authorization.k8s.io",
    "clusterrolebindings.rbac.authorization.k8s.io",
];
/// The manifest's kinds, as `kind` fields, that the lists above cover.
const COVERED_KINDS: &[&str] = &[
    "Deployment",
    "ServiceAccount",
    "Service",
    "ConfigMap",
    "Role",
    "RoleBinding",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "ServiceMonitor",
    "PrometheusRule",
    "ClusterRole",
    "ClusterRoleBinding",
];

fn helm_values(release_ns: &str, repo: &str, tag: &str, extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        format!("image.repository={repo}"),
        format!("image.tag={tag}"),
        // Watch only the test's namespace: a cluster-wide second operator would reconcile other
        // tests' publishers.
        format!("watchNamespaces[0]={release_ns}"),
        "leaderElection.leaseDurationSeconds=6".to_owned(),
    ];
    sets.extend(all_optional_objects());
    sets.extend(extra.iter().map(|s| (*s).to_owned()));
    sets
}

fn helm_cmd(verb: &str, release: &str, ns: &str, sets: &[String]) -> std::process::Command {
    let mut cmd = helm();
    cmd.args([verb, release]).arg(chart_dir()).args(["-n", ns]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn env_value(pod: &Pod, name: &str) -> Option<String> {
    pod.spec
        .as_ref()?
        .containers
        .first()?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

/// Exit status 2 is clap's usage error: the binary refuses the arguments the chart's Deployment
/// passes. Runs the same arguments here (with a cleared environment, so nothing can connect
/// anywhere) to show the binary's own message.
fn refused_args(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    let code = status
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| status.state.as_ref().and_then(|s| s.terminated.as_ref()))?
        .exit_code;
    if code != 2 {
        return None;
    }
    let container = pod.spec.as_ref()?.containers.first()?;
    let args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|a| {
            a.replace("$(POD_IP)", "127.0.0.1")
                .replace("$(POD_NAMESPACE)", "default")
                .replace("$(POD_NAME)", "chart-args-check")
        })
        .collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inventory-outbox"))
        .args(&args)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    Some(format!(
        "the operator binary refuses the chart's Deployment args ({}): {args:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Uninstalls the release and deletes the namespace however the test ends, so a failed run
/// leaves no crash-looping operator behind.
struct Cleanup {
    release: String,
    ns: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut uninstall = helm();
        uninstall.args(["uninstall", &self.release, "-n", &self.ns, "--ignore-not-found"]);
        let _ = run(uninstall, None);
        let mut delete = kubectl();
        delete.args(["delete", "namespace", &self.ns, "--wait=false", "--ignore-not-found"]);
        let _ = run(delete, None);
    }
}

/// What is left of the release: `kind/name` of every object of the listed kinds carrying the
/// release's instance label, and of every object of the installed manifest still found.
fn leftovers(ns: &str, release: &str, manifest: &str) -> Vec<String> {
    let selector = format!("app.kubernetes.io/instance={release}");
    let mut found = Vec::new();
    let mut listed = kubectl();
    listed.args([
        "get",
        &NAMESPACED_KINDS.join(","),
        "-n",
        ns,
        "-l",
        &selector,
        "-o",
        "name",
    ]);
    found.extend(run_ok(listed, None, "list namespaced kinds").lines().map(str::to_owned));
    let mut cluster = kubectl();
    cluster.args(["get", &CLUSTER_KINDS.join(","), "-l", &selector, "-o", "name"]);
    found.extend(
        run_ok(cluster, None, "list cluster-scoped kinds")
            .lines()
            .map(str::to_owned),
    );
    let mut by_name = kubectl();
    by_name.args(["get", "--ignore-not-found", "-n", ns, "-o", "name", "-f", "-"]);
    found.extend(
        run_ok(by_name, Some(manifest.as_bytes()), "get the manifest's objects")
            .lines()
            .map(str::to_owned),
    );
    found.sort();
    found.dedup();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_runs_the_operator_under_its_service_account_upgrade_rolls_it_uninstall_leaves_only_crds() {
    install_monitoring_crds();
    let client = admin_client().await;
    let ns = create_namespace(&client, "chart-install").await;
    let (repo, tag) = test_image();
    let release = unique_name("io");
    let fullname = format!("{release}-inventory-outbox");
    let selector = format!("app.kubernetes.io/instance={release},app.kubernetes.io/component=operator");

    // Install: one Ready operator Pod, under the chart's ServiceAccount.
    let sets = helm_values(&ns, &repo, &tag, &[]);
    run_ok(helm_cmd("install", &release, &ns, &sets), None, "helm install");
    let _cleanup = Cleanup {
        release: release.clone(),
        ns: ns.clone(),
    };
    let first = wait_for(
        &client,
        &ns,
        Duration::from_secs(120),
        "operator Pod Ready after helm install",
        async || {
            let all = pods(&client, &ns, &selector).await;
            if let Some(refused) = all.iter().find_map(refused_args) {
                return Some(Err(refused));
            }
            let ready: Vec<Pod> = all.into_iter().filter(is_ready).collect();
            (ready.len() == 1).then(|| ready.into_iter().next().map(Ok)).flatten()
        },
    )
    .await
    .unwrap_or_else(|refused| panic!("{refused}"));
    let first_name = first.metadata.name.clone().unwrap_or_default();
    let spec = first.spec.clone().unwrap_or_default();
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some(fullname.as_str()),
        "the Pod runs as the chart's ServiceAccount"
    );
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some(format!("{repo}:{tag}").as_str())
    );

    // It talks to the API server with that ServiceAccount's token: it holds the Lease the
    // chart's Role allows, and reconciles a publisher in the watched namespace.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease_name = format!("{fullname}-leader");
    wait_for(
        &client,
        &ns,
        Duration::from_secs(60),
        "the operator Pod holds the leader Lease",
        async || {
            let holder = leases.get(&lease_name).await.ok()?.spec?.holder_identity?;
            // The operator's lease identity is `<Pod name>_<run id>` (a restarted container
            // must not inherit its dead process's lease).
            holder.strip_prefix(first_name.as_str())?.starts_with('_').then_some(())
        },
    )
    .await;
    let publishers: Api<EventPublisher> = Api::namespaced(client.clone(), &ns);
    let publisher: EventPublisher = serde_json::from_value(json!({
        "apiVersion": "outbox.inventory.io/v1alpha1", "kind": "EventPublisher", "metadata": {"name": "paused"},
        "spec": {
            "outbox": {"databaseUrlSecretRef": {"name": "db", "key": "url"}},
            "broker": {"kafka": {"bootstrapServers": kafka_bootstrap()}},
            "routing": {"strategy": "single", "destination": "chart.events"},
            "paused": true
        }
    }))
    .expect("publisher document");
    publishers
        .create(&PostParams::default(), &publisher)
        .await
        .expect("create publisher");
    wait_for(
        &client,
        &ns,
        Duration::from_secs(60),
        "the in-cluster operator writes the publisher's status",
        async || publishers.get("paused").await.ok()?.status.map(|_| ()),
    )
    .await;
    // Its finalizer would hold the namespace after the operator is gone.
    publishers
        .delete("paused", &Default::default())
        .await
        .expect("delete publisher");
    wait_for(
        &client,
        &ns,
        Duration::from_secs(60),
        "the operator releases the deleted publisher",
        async || publishers.get_opt("paused").await.ok()?.is_none().then_some(()),
    )
    .await;

    // Upgrade with changed values: the Deployment rolls to Pods carrying them (2 replicas, so the
    // PodDisruptionBudget appears too).
    let sets = helm_values(&ns, &repo, &tag, &["logLevel=debug", "replicaCount=2"]);
    run_ok(helm_cmd("upgrade", &release, &ns, &sets), None, "helm upgrade");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_for(
        &client,
        &ns,
        Duration::from_secs(180),
        "helm upgrade rolls the operator to 2 Ready Pods with RUST_LOG=debug",
        async || {
            let d = deployments.get(&fullname).await.ok()?;
            let status = d.status?;
            let rolled = status.observed_generation? >= d.metadata.generation?
                && status.updated_replicas == Some(2)
                && status.ready_replicas == Some(2)
                && status.replicas == Some(2);
            let all = pods(&client, &ns, &selector).await;
            let ready: Vec<&Pod> = all.iter().filter(|p| is_ready(p)).collect();
            let new = ready.len() == 2
                && ready
                    .iter()
                    .all(|p| env_value(p, "RUST_LOG").as_deref() == Some("debug"))
                && all
                    .iter()
                    .all(|p| p.metadata.name.as_deref() != Some(first_name.as_str()));
            (rolled && new).then_some(())
        },
    )
    .await;

    // Uninstall: every object of the release goes; the CRDs stay.
    let mut get_manifest = helm();
    get_manifest.args(["get", "manifest", &release, "-n", &ns]);
    let manifest = run_ok(get_manifest, None, "helm get manifest");
    let kinds: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .map(str::trim)
        .collect();
    let uncovered: Vec<&&str> = kinds.iter().filter(|k| !COVERED_KINDS.contains(k)).collect();
    assert!(
        uncovered.is_empty(),
        "the chart creates kinds the uninstall check does not list: {uncovered:?}"
    );
    for kind in [
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "ConfigMap",
        "Role",
    ] {
        assert!(
            kinds.contains(&kind),
            "the release has a {kind} (every optional object is on): {kinds:?}"
        );
    }
    let before = leftovers(&ns, &release, &manifest);
    assert!(
        before.len() > kinds.len(),
        "the listing finds the release's objects before uninstall: {before:?}"
    );
    let mut uninstall = helm();
    uninstall.args(["uninstall", &release, "-n", &ns, "--wait", "--timeout=120s"]);
    run_ok(uninstall, None, "helm uninstall");
    wait_for(
        &client,
        &ns,
        Duration::from_secs(120),
        "nothing of the release is left after helm uninstall",
        async || {
            let left = leftovers(&ns, &release, &manifest);
            if left.is_empty() {
                Some(())
            } else {
                eprintln!("still present: {left:?}");
                None
            }
        },
    )
    .await;
    let mut crds = kubectl();
    crds.args([
        "get",
        "crd",
        "eventpublishers.outbox.inventory.io",
        "replayjobs.outbox.inventory.io",
        "-o",
        "name",
    ]);
    let crds = run_ok(crds, None, "the CRDs after uninstall");
    assert_eq!(crds.lines().count(), 2, "the CRDs stay after helm uninstall: {crds}");
    // The operator's own Lease is not the chart's: report it rather than fail on it.
    let mut lease = kubectl();
    lease.args([
        "get",
        "lease",
        &lease_name,
        "-n",
        &ns,
        "--ignore-not-found",
        "-o",
        "name",
    ]);
    let lease = run(lease, None);
    eprintln!(
        "leader Lease after uninstall (created by the operator, not the chart): {:?}",
        String::from_utf8_lossy(&lease.stdout).trim()
    );
}
