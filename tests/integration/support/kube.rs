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

/// Creates a namespace with a unique name and returns that name.
pub async fn create_namespace(client: &kube::Client, prefix: &str) -> String {
    use k8s_openapi::api::core::v1::Namespace;
    let name = super::unique_name(prefix);
    let api: kube::Api<Namespace> = kube::Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("namespace");
    api.create(&Default::default(), &ns).await.expect("create namespace");
    name
}
