//! The local cluster's Pods: image mapping for the node agent (hack/process-node), object
//! creation, and waits that print the namespace's Pods when they time out.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams, PostParams};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The project's image repository; env-up maps it (any tag) to cargo's debug binary.
pub const PROJECT_IMAGE: &str = "ghcr.io/inventory-outbox/inventory-outbox";

/// Serialises this process's read-modify-write of the mapping file.
static IMAGES_LOCK: Mutex<()> = Mutex::new(());

/// `$OUTBOX_STATE/process-node/images.json`, the node agent's image mapping.
pub fn images_file() -> PathBuf {
    super::state_dir().join("process-node/images.json")
}

/// Adds `image` -> `executable` to the mapping, keeping every other entry (temp file + rename,
/// so the agent never reads a half-written file).
pub fn register_image(image: &str, executable: &str) {
    let _guard = IMAGES_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = images_file();
    let mut doc: Value = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    if !doc.get("images").is_some_and(Value::is_object) {
        doc["images"] = serde_json::json!({});
    }
    doc["images"][image] = Value::String(executable.to_owned());
    let dir = path.parent().expect("images.json has a parent directory");
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let tmp = dir.join(format!(
        "images.json.{}.{}.tmp",
        std::process::id(),
        super::unique_name("w")
    ));
    let body = serde_json::to_vec_pretty(&doc).expect("mapping serialises");
    std::fs::write(&tmp, body).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("rename onto {}: {e}", path.display()));
}

/// Maps an image tag unique to this test binary onto the `inventory-outbox` binary of this very
/// build and returns the image, so a Pod runs the code under test and not another build's.
pub fn register_test_image() -> String {
    let own = std::env::current_exe().expect("test binary path");
    let mut h = DefaultHasher::new();
    own.hash(&mut h);
    let image = format!("{PROJECT_IMAGE}:test-{:016x}", h.finish());
    register_image(&image, env!("CARGO_BIN_EXE_inventory-outbox"));
    image
}

/// Maps `test-shell:<tag>` onto the host's /bin/sh (shell, coreutils and sed come from the
/// host: a container's filesystem is the host's).
pub fn register_shell_image() -> String {
    let image = "local.test/shell:v1".to_owned();
    register_image(&image, "/bin/sh");
    image
}

/// Creates a namespaced object from a JSON document.
pub async fn create<K>(client: &kube::Client, ns: &str, doc: Value) -> K
where
    K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("object document {doc}: {e}"));
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("create {} in {ns}: {e}", K::kind(&())))
}

/// Polls `check` every 500 ms until it yields a value; on timeout panics with `what` and the
/// namespace's Pods, Deployments and Jobs (status and log tails).
pub async fn wait_for<T>(
    client: &kube::Client,
    ns: &str,
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within {timeout:?}\n{}", describe(client, ns).await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The namespace's workload state, for failure messages.
pub async fn describe(client: &kube::Client, ns: &str) -> String {
    let mut out = String::new();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    match pods.list(&ListParams::default()).await {
        Ok(list) => {
            for p in list {
                let name = p.metadata.name.clone().unwrap_or_default();
                let status = serde_json::to_string(&p.status).unwrap_or_default();
                out.push_str(&format!(
                    "pod {name} on {:?}: {status}\n",
                    p.spec.as_ref().and_then(|s| s.node_name.clone())
                ));
                for c in p.spec.map(|s| s.containers).unwrap_or_default() {
                    let lp = LogParams {
                        container: Some(c.name.clone()),
                        tail_lines: Some(15),
                        ..Default::default()
                    };
                    match tokio::time::timeout(Duration::from_secs(5), pods.logs(&name, &lp)).await {
                        Ok(Ok(l)) => out.push_str(&format!("  log of {}:\n{}\n", c.name, l)),
                        Ok(Err(e)) => out.push_str(&format!("  no log of {}: {e}\n", c.name)),
                        Err(_) => out.push_str(&format!("  log of {} not served within 5s\n", c.name)),
                    }
                }
            }
        }
        Err(e) => out.push_str(&format!("cannot list pods: {e}\n")),
    }
    if let Ok(list) = Api::<Deployment>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
    {
        for d in list {
            out.push_str(&format!(
                "deployment {:?}: {}\n",
                d.metadata.name,
                serde_json::to_string(&d.status).unwrap_or_default()
            ));
        }
    }
    if let Ok(list) = Api::<Job>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
    {
        for j in list {
            out.push_str(&format!(
                "job {:?}: {}\n",
                j.metadata.name,
                serde_json::to_string(&j.status).unwrap_or_default()
            ));
        }
    }
    out
}

/// The Pods matching `selector`.
pub async fn pods(client: &kube::Client, ns: &str, selector: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// The process id the node agent reports as the container's id (`process://<pid>`).
pub fn container_pid(pod: &Pod, container: &str) -> Option<i32> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == container)?
        .container_id
        .as_deref()?
        .strip_prefix("process://")?
        .parse()
        .ok()
}

/// The container's status, if reported.
pub fn container_status<'a>(pod: &'a Pod, container: &str) -> Option<&'a k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == container)
}

/// Deletes the namespace (its Pods' processes end with it).
pub async fn delete_namespace(client: &kube::Client, ns: &str) {
    use k8s_openapi::api::core::v1::Namespace;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(ns, &Default::default())
        .await;
}
