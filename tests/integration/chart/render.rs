//! Every manifest the chart renders, with every optional object on, passes the API server's
//! own validation (`kubectl apply --dry-run=server`), cluster-wide and namespaced.

use super::{NamespaceGuard, all_optional_objects, chart_dir, helm, install_monitoring_crds, kubectl, run_ok};
use crate::support::{kube::admin_client, kube::create_namespace};

fn render(release: &str, ns: &str, extra: &[String]) -> String {
    let mut template = helm();
    template
        .args(["template", release])
        .arg(chart_dir())
        .args(["-n", ns, "--include-crds", "--set", "replicaCount=2"])
        .args(["--kube-version", &server_version()]);
    for set in all_optional_objects().iter().chain(extra) {
        template.args(["--set", set]);
    }
    run_ok(template, None, "helm template")
}

/// The API server's version: `helm template` renders offline and would assume an old one.
fn server_version() -> String {
    let mut version = kubectl();
    version.args(["version", "-o", "json"]);
    let out = run_ok(version, None, "kubectl version");
    let doc: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl version output {out}: {e}"));
    doc["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_else(|| panic!("no serverVersion.gitVersion in {out}"))
        .trim_start_matches('v')
        .to_owned()
}

fn kinds(manifest: &str) -> Vec<String> {
    let mut kinds: Vec<String> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .map(|k| k.trim().to_owned())
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

#[tokio::test]
async fn every_rendered_manifest_passes_server_side_dry_run() {
    install_monitoring_crds();
    let client = admin_client().await;
    let ns = create_namespace(&client, "chart-render").await;
    let _ns_guard = NamespaceGuard(ns.clone());
    let watched = format!("watchNamespaces[0]={ns}");
    for (variant, extra) in [("cluster-wide", vec![]), ("namespaced", vec![watched])] {
        let manifest = render("render", &ns, &extra);
        let found = kinds(&manifest);
        let expected: &[&str] = if variant == "cluster-wide" {
            &["ClusterRole", "ClusterRoleBinding"]
        } else {
            &["Role", "RoleBinding"]
        };
        for kind in expected.iter().chain(&[
            "ConfigMap",
            "CustomResourceDefinition",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]) {
            assert!(
                found.iter().any(|k| k == kind),
                "{variant}: no {kind} rendered; kinds: {found:?}"
            );
        }
        let mut apply = kubectl();
        apply.args(["apply", "--dry-run=server", "-n", &ns, "-f", "-"]);
        let out = run_ok(
            apply,
            Some(manifest.as_bytes()),
            &format!("{variant}: kubectl apply --dry-run=server"),
        );
        let applied = out.lines().filter(|l| l.contains("(server dry run)")).count();
        let documents = manifest.matches("\nkind: ").count() + usize::from(manifest.starts_with("kind: "));
        assert_eq!(
            applied, documents,
            "{variant}: each rendered object is checked by the server:\n{out}"
        );
    }
}
