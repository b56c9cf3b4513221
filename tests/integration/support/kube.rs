//! Kubernetes clients for the local kube-apiserver: the admin, and any impersonated identity.

use kube::config::{KubeConfigOptions, Kubeconfig};

async fn config() -> kube::Config {
    inventory_outbox::tls::install_crypto_provider();
    let path = super::kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("read kubeconfig {}: {e} (is `make env-up` done?)", path.display()));
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable")
}

/// A client with cluster-admin rights (the kubeconfig written by `make env-up`).
pub async fn admin_client() -> kube::Client {
    kube::Client::try_from(config().await).expect("admin client")
}

/// A client that impersonates `user` (e.g. `system:serviceaccount:ns:name`) through the admin.
pub async fn impersonating_client(user: &str) -> kube::Client {
    let mut config = config().await;
    config.auth_info.impersonate = Some(user.to_owned());
    kube::Client::try_from(config).expect("impersonating client")
}

/// A namespace made for one test, deleted when the test ends however it ends (Pods left
/// running by finished tests would otherwise load the 2-core machine for the rest of the run).
/// `OUTBOX_KEEP_TEST_NAMESPACES=1` keeps them for a look around. Derefs to its name.
#[derive(Debug)]
pub struct TestNamespace(String);

impl std::ops::Deref for TestNamespace {
    type Target = String;
    fn deref(&self) -> &String {
        &self.0
    }
}

impl std::fmt::Display for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for TestNamespace {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("OUTBOX_KEEP_TEST_NAMESPACES").is_some() {
            return;
        }
        // Drop cannot await: kubectl deletes without waiting, and a detached shell releases the
        // product's finalizers until the namespace is gone. The test's operator usually goes
        // away with its namespace, so nobody else would release them and the namespace would
        // stay Terminating for good, piling up on the shared cluster. A release before the
        // namespace controller reaches an object is not enough: an operator still running
        // re-adds its finalizer, so the shell repeats until the namespace is gone (2 min at
        // most). Deletion semantics are tested explicitly elsewhere; here the objects are let
        // go, as an operator's user would.
        let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned());
        // The outer shell exits at once (and is waited for); the loop runs on in the background.
        const RELEASE: &str = r#"k() { "$KUBECTL_BIN" --kubeconfig "$KUBECONFIG_PATH" --request-timeout=10s "$@"; }
k delete namespace "$NS" --wait=false --ignore-not-found >/dev/null 2>&1
(for _ in $(seq 120); do
  k get namespace "$NS" >/dev/null 2>&1 || exit 0
  for o in $(k get eventpublishers,replayjobs -n "$NS" -o name 2>/dev/null); do
    k patch -n "$NS" "$o" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1
  done
  sleep 1
done) &"#;
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(RELEASE)
            .env("KUBECTL_BIN", kubectl)
            .env("KUBECONFIG_PATH", super::kubeconfig_path())
            .env("NS", &self.0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Creates a namespace with a unique name, deleted when the returned value is dropped.
pub async fn create_namespace(client: &kube::Client, prefix: &str) -> TestNamespace {
    use k8s_openapi::api::core::v1::Namespace;
    let name = super::unique_name(prefix);
    let api: kube::Api<Namespace> = kube::Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("namespace");
    api.create(&Default::default(), &ns).await.expect("create namespace");
    TestNamespace(name)
}
