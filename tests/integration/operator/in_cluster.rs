//! The operator as a Pod on the node agent, deployed from the Helm chart's own rendering
//! (`helm template` + `kubectl apply`): the chart's Deployment args and env, its
//! ServiceAccount, and its Roles made from `files/operator-rules.yaml` in each watched
//! namespace plus the leader-election Role. Watching only the test's namespaces keeps it away
//! from every other test's EventPublishers.

use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::io::AsyncWriteExt;

use crate::support::cluster::{describe, register_test_image};
use crate::support::kube::create_namespace;
use crate::support::kubeconfig_path;

/// The chart's release in its own namespace.
pub struct InClusterOperator {
    /// Namespace of the operator Pods, its ServiceAccount and Lease.
    pub namespace: crate::support::kube::TestNamespace,
    pub release: String,
    /// The chart's full name: ServiceAccount, Deployment, Lease prefix.
    pub fullname: String,
}

fn tool(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

fn chart_dir() -> String {
    format!("{}/charts/inventory-outbox", env!("CARGO_MANIFEST_DIR"))
}

impl InClusterOperator {
    /// Renders the chart for `watched` with this test binary's image, applies it, and waits
    /// until `replicas` operator Pods are Ready.
    /// `values` are extra `--set` arguments (`name=value`).
    pub async fn deploy(admin: &kube::Client, watched: &[String], replicas: u32, values: &[String]) -> Self {
        let namespace = create_namespace(admin, "op-sys").await;
        let release = "outbox".to_owned();
        let fullname = format!("{release}-inventory-outbox");
        let image = register_test_image();
        let (repository, tag) = image.rsplit_once(':').expect("test image has a tag");
        // helm template assumes an old cluster unless told the real one's version.
        let version = admin.apiserver_version().await.expect("API server version");
        let kube_version = format!("{}.{}.0", version.major, version.minor.trim_end_matches('+'));
        let rendered = tokio::process::Command::new(tool("HELM", "helm"))
            .args(["template", &release, &chart_dir(), "--namespace", &namespace])
            .args(["--kube-version", &kube_version])
            .args(["--set", &format!("image.repository={repository}")])
            .args(["--set", &format!("image.tag={tag}")])
            .args(["--set", &format!("replicaCount={replicas}")])
            .args(["--set", &format!("watchNamespaces={{{}}}", watched.join(","))])
            .args(values.iter().flat_map(|v| ["--set", v.as_str()]))
            .output()
            .await
            .expect("run helm template");
        assert!(
            rendered.status.success(),
            "helm template failed:\n{}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let mut apply = tokio::process::Command::new(tool("KUBECTL", "kubectl"))
            .arg("--kubeconfig")
            .arg(kubeconfig_path())
            // Every rendered object names its namespace (the release's, or a watched one's Role).
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl apply");
        let mut stdin = apply.stdin.take().expect("kubectl stdin");
        stdin.write_all(&rendered.stdout).await.expect("write manifests");
        drop(stdin);
        let applied = apply.wait_with_output().await.expect("kubectl apply");
        assert!(
            applied.status.success(),
            "kubectl apply of the rendered chart failed:\n{}\n{}",
            String::from_utf8_lossy(&applied.stdout),
            String::from_utf8_lossy(&applied.stderr)
        );
        let operator = Self {
            namespace,
            release,
            fullname,
        };
        operator.wait_ready(admin, replicas as usize).await;
        operator
    }

    /// Label selector of the operator Pods.
    pub fn selector(&self) -> String {
        format!(
            "app.kubernetes.io/component=operator,app.kubernetes.io/instance={}",
            self.release
        )
    }

    /// The ServiceAccount user the Pods run as.
    pub fn user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.fullname)
    }

    /// Name of the leader-election Lease.
    pub fn lease(&self) -> String {
        format!("{}-leader", self.fullname)
    }

    pub async fn pods(&self, admin: &kube::Client) -> Vec<Pod> {
        Api::<Pod>::namespaced(admin.clone(), &self.namespace)
            .list(&ListParams::default().labels(&self.selector()))
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    /// Waits until `count` operator Pods report Ready.
    pub async fn wait_ready(&self, admin: &kube::Client, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = self.pods(admin).await.iter().filter(|p| is_ready(p)).count();
            if ready >= count {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{ready} of {count} operator Pods Ready within 120 s\n{}",
                    describe(admin, &self.namespace).await
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The operator's `/metrics` text from one of its Pods, over its Pod IP.
    pub async fn metrics(&self, admin: &kube::Client) -> String {
        let mut out = String::new();
        for pod in self.pods(admin).await {
            let Some(ip) = pod.status.and_then(|s| s.pod_ip) else {
                continue;
            };
            if let Ok(r) = reqwest::get(format!("http://{ip}:8080/metrics")).await
                && let Ok(text) = r.text().await
            {
                out.push_str(&text);
            }
        }
        out
    }

    /// The operator Pods' state and logs, for failure messages.
    pub async fn describe(&self, admin: &kube::Client) -> String {
        format!(
            "--- operator namespace {} ---\n{}",
            self.namespace,
            describe(admin, &self.namespace).await
        )
    }

    /// Removes the release (its namespace; the Roles go with the watched namespaces).
    pub async fn remove(self, admin: &kube::Client) {
        crate::support::cluster::delete_namespace(admin, &self.namespace).await;
    }
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Polls `check` until it yields a value; on timeout panics with `what`, the last state it
/// gave, and the state of the operator's and the tenant's namespaces.
pub async fn eventually<T>(
    admin: &kube::Client,
    operator: &InClusterOperator,
    tenant: &str,
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let state = match check().await {
            Ok(v) => return v,
            Err(state) => state,
        };
        if Instant::now() > deadline {
            panic!(
                "{what}: not within {timeout:?}; last state: {state}\n{}\n--- tenant namespace {tenant} ---\n{}",
                operator.describe(admin).await,
                describe(admin, tenant).await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
