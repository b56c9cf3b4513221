//! `helm install` with values that break values.schema.json fails, names the value, and leaves
//! no release behind.

use super::{NamespaceGuard, chart_dir, helm, run};
use crate::support::{kube::admin_client, kube::create_namespace, unique_name};

/// `(--set argument, text the error must contain)`: the path of the value and what is wrong.
const BAD_VALUES: &[(&str, &[&str])] = &[
    ("replicaCount=3", &["/replicaCount", "3"]),
    ("image.tag=bad tag", &["/image/tag", "bad tag"]),
    ("image.pullPolicy=Sometimes", &["/image/pullPolicy", "IfNotPresent"]),
    ("httpPort=80", &["/httpPort", "80"]),
    ("logFormat=xml", &["/logFormat", "json"]),
    (
        "leaderElection.leaseDurationSeconds=1",
        &["/leaderElection/leaseDurationSeconds", "1"],
    ),
    ("watchNamespaces[0]=Bad_NS", &["/watchNamespaces/0", "Bad_NS"]),
    (
        "metrics.serviceMonitor.interval=soon",
        &["/metrics/serviceMonitor/interval", "soon"],
    ),
    ("resources.limits.memory=lots", &["/resources/limits/memory"]),
    ("replicaCont=2", &["replicaCont", "not allowed"]),
];

#[tokio::test]
async fn helm_install_refuses_values_the_schema_forbids_naming_the_value() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "chart-values").await;
    let _ns_guard = NamespaceGuard(ns.clone());
    let mut wrong = Vec::new();
    for (set, expected) in BAD_VALUES {
        let release = unique_name("bad");
        let mut install = helm();
        install
            .args(["install", &release])
            .arg(chart_dir())
            .args(["-n", &ns, "--set", set]);
        let out = run(install, None);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            wrong.push(format!("--set {set}: helm install succeeded"));
            continue;
        }
        if let Some(missing) = expected.iter().find(|e| !stderr.contains(*e)) {
            wrong.push(format!("--set {set}: error does not mention {missing:?}:\n{stderr}"));
        }
        let mut status = helm();
        status.args(["status", &release, "-n", &ns]);
        if run(status, None).status.success() {
            wrong.push(format!(
                "--set {set}: a release {release} exists after the refused install"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} bad values not refused as expected:\n{}",
        wrong.len(),
        BAD_VALUES.len(),
        wrong.join("\n")
    );
}
