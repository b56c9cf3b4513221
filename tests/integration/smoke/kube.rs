//! The real kube-apiserver: core objects, CRDs with their objects, and RBAC denial.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};

use crate::support::kube::{admin_client, create_namespace, impersonating_client};

#[tokio::test]
async fn admin_creates_and_reads_back_a_config_map() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "smoke-cm").await;
    let api: Api<ConfigMap> = Api::namespaced(client, &ns);
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "greeting"},
        "data": {"hello": "world"}
    }))
    .unwrap();
    api.create(&PostParams::default(), &cm)
        .await
        .expect("create config map");

    let read = api.get("greeting").await.expect("read config map");
    assert_eq!(read.data.unwrap().get("hello").map(String::as_str), Some("world"));
}

#[tokio::test]
async fn a_crd_is_established_and_accepts_objects() {
    let client = admin_client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "widgets.smoke.inventory-outbox.dev"},
        "spec": {
            "group": "smoke.inventory-outbox.dev",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "properties": {"size": {"type": "integer", "minimum": 1}},
                        "required": ["size"]
                    }}
                }}
            }]
        }
    }))
    .unwrap();
    match crds.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => panic!("create CRD: {e}"),
    }
    let established = async {
        loop {
            let crd = crds.get("widgets.smoke.inventory-outbox.dev").await.expect("get CRD");
            let ready = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), established)
        .await
        .expect("CRD established within 30 s");

    let ns = create_namespace(&client, "smoke-crd").await;
    let gvk = GroupVersionKind::gvk("smoke.inventory-outbox.dev", "v1", "Widget");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(client, &ns, &resource);
    let widget = DynamicObject::new("w1", &resource).data(serde_json::json!({"spec": {"size": 3}}));
    widgets
        .create(&PostParams::default(), &widget)
        .await
        .expect("create widget");
    let read = widgets.get("w1").await.expect("read widget");
    assert_eq!(read.data["spec"]["size"], 3);

    // The schema is enforced by the real API server.
    let invalid = DynamicObject::new("w2", &resource).data(serde_json::json!({"spec": {"size": 0}}));
    match widgets.create(&PostParams::default(), &invalid).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains("spec.size"), "{}", status.message);
        }
        other => panic!("invalid widget must be rejected, got {other:?}"),
    }
}

#[tokio::test]
async fn a_service_account_without_bindings_is_forbidden() {
    let admin = admin_client().await;
    let ns = create_namespace(&admin, "smoke-rbac").await;
    let user = format!("system:serviceaccount:{ns}:nobody");
    let client = impersonating_client(&user).await;
    let api: Api<ConfigMap> = Api::namespaced(client, &ns);
    match api.list(&Default::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(status.message.contains(&user), "{}", status.message);
        }
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
}
