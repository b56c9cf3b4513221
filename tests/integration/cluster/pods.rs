//! Single Pods: ConfigMap and Secret as files and env (and updates reaching the files), a
//! ServiceAccount's RBAC from inside the Pod, runAsNonRoot, readOnlyRootFilesystem, and an
//! image that maps to nothing.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, LogParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::support::cluster::{self, create, wait_for};
use crate::support::kube::{admin_client, create_namespace};

/// Waits for the Pod to end and returns its phase and the container's termination message.
async fn finished(client: &kube::Client, ns: &str, name: &str) -> (String, String) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_for(
        client,
        ns,
        Duration::from_secs(90),
        &format!("Pod {name} finished"),
        async || {
            let p = pods.get(name).await.ok()?;
            let phase = p.status.as_ref()?.phase.clone()?;
            if phase != "Succeeded" && phase != "Failed" {
                return None;
            }
            let msg = cluster::container_status(&p, "main")?
                .state
                .as_ref()?
                .terminated
                .as_ref()?
                .message
                .clone()
                .unwrap_or_default();
            Some((phase, msg))
        },
    )
    .await
}

fn shell_pod(name: &str, image: &str, script: &str, extra: Value) -> Value {
    let mut doc = json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
            "containers": [{"name": "main", "image": image, "command": ["/bin/sh", "-c", script]}],
        },
    });
    if let (Some(c), Some(e)) = (
        doc["spec"]["containers"][0].as_object_mut(),
        extra.get("container").and_then(Value::as_object),
    ) {
        c.extend(e.clone());
    }
    if let (Some(s), Some(e)) = (
        doc["spec"].as_object_mut(),
        extra.get("spec").and_then(Value::as_object),
    ) {
        s.extend(e.clone());
    }
    doc
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_sees_config_map_and_secret_as_files_and_env() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cluster-config").await;
    let image = cluster::register_shell_image();
    create::<ConfigMap>(
        &client,
        &ns,
        json!({"metadata": {"name": "settings"}, "data": {"greeting": "hello", "mode": "fast"}}),
    )
    .await;
    create::<Secret>(
        &client,
        &ns,
        json!({"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}}),
    )
    .await;
    let script = r#"printf '%s|%s|%s|%s|%s|%s|%s' "$GREETING" "$(cat /cfg/greeting)" "$TOKEN" "$(cat /sec/nested/token)" "$CFG_mode" "$(stat -L -c %a /sec/nested/token)" "$(id -u)" >/dev/termination-log"#;
    create::<Pod>(&client, &ns, shell_pod("reader", &image, script, json!({
        "container": {
            "env": [
                {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "ABSENT", "valueFrom": {"configMapKeyRef": {"name": "no-such-map", "key": "x", "optional": true}}},
            ],
            "envFrom": [{"prefix": "CFG_", "configMapRef": {"name": "settings"}}],
            "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}, {"name": "sec", "mountPath": "/sec"}],
        },
        "spec": {"volumes": [
            {"name": "cfg", "configMap": {"name": "settings"}},
            {"name": "sec", "secret": {"secretName": "creds", "defaultMode": 0o440, "items": [{"key": "token", "path": "nested/token"}]}},
        ]},
    })))
    .await;
    let (phase, msg) = finished(&client, &ns, "reader").await;
    assert_eq!(
        (phase.as_str(), msg.as_str()),
        ("Succeeded", "hello|hello|s3cret|s3cret|fast|440|65532"),
        "{}",
        cluster::describe(&client, &ns).await
    );

    // a changed ConfigMap reaches the mounted file of a running Pod
    create::<Pod>(
        &client,
        &ns,
        shell_pod(
            "watcher",
            &image,
            "while :; do echo \"greeting=$(cat /cfg/greeting)\"; sleep 1; done",
            json!({
                "container": {"volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]},
                "spec": {"volumes": [{"name": "cfg", "configMap": {"name": "settings"}}]},
            }),
        ),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let logs = async |want: &str| {
        let l = pods
            .logs(
                "watcher",
                &LogParams {
                    tail_lines: Some(3),
                    ..Default::default()
                },
            )
            .await
            .ok()?;
        l.contains(want).then_some(())
    };
    wait_for(
        &client,
        &ns,
        Duration::from_secs(60),
        "watcher logs the first greeting",
        async || logs("greeting=hello").await,
    )
    .await;
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .patch(
            "settings",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"greeting": "bonjour"}})),
        )
        .await
        .expect("patch configmap");
    wait_for(
        &client,
        &ns,
        Duration::from_secs(60),
        "the updated greeting in the mounted file",
        async || logs("greeting=bonjour").await,
    )
    .await;
    cluster::delete_namespace(&client, &ns).await;
}

fn kubectl_path() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| {
        let cache = std::env::var("HOME").map(|h| format!("{h}/.cache")).expect("HOME");
        format!("{cache}/inventory-outbox/kubernetes/v1.37.2/bin/kubectl")
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn service_account_lists_what_its_role_allows_and_nothing_else() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cluster-rbac").await;
    let image = "local.test/kubectl:v1";
    cluster::register_image(image, &kubectl_path());
    create::<ServiceAccount>(&client, &ns, json!({"metadata": {"name": "reader"}})).await;
    create::<Role>(
        &client,
        &ns,
        json!({"metadata": {"name": "configmap-reader"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]}),
    )
    .await;
    create::<RoleBinding>(
        &client,
        &ns,
        json!({"metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]}),
    )
    .await;
    create::<ConfigMap>(
        &client,
        &ns,
        json!({"metadata": {"name": "visible"}, "data": {"a": "b"}}),
    )
    .await;
    // kubectl without a kubeconfig uses the in-cluster config: the mounted token and CA and
    // KUBERNETES_SERVICE_HOST/PORT
    let kubectl_pod = |name: &str, args: Value| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "serviceAccountName": "reader",
                "securityContext": {"runAsUser": 65532, "runAsGroup": 65532},
                "containers": [{"name": "main", "image": image, "args": args,
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "env": [{"name": "HOME", "value": "/home/kubectl"}],
                    "volumeMounts": [{"name": "home", "mountPath": "/home/kubectl"}]}],
                "volumes": [{"name": "home", "emptyDir": {}}],
            },
        })
    };
    create::<Pod>(
        &client,
        &ns,
        kubectl_pod("allowed", json!(["get", "configmaps", "-o", "name"])),
    )
    .await;
    create::<Pod>(
        &client,
        &ns,
        kubectl_pod("refused", json!(["get", "secrets", "-o", "name"])),
    )
    .await;
    let (phase, _) = finished(&client, &ns, "allowed").await;
    assert_eq!(phase, "Succeeded", "{}", cluster::describe(&client, &ns).await);
    let out = Api::<Pod>::namespaced(client.clone(), &ns)
        .logs("allowed", &LogParams::default())
        .await
        .expect("logs of allowed");
    assert!(
        out.contains("configmap/visible"),
        "the Role allows listing configmaps: {out}"
    );
    let (phase, msg) = finished(&client, &ns, "refused").await;
    assert_eq!(phase, "Failed", "{}", cluster::describe(&client, &ns).await);
    let who = format!("system:serviceaccount:{ns}:reader");
    assert!(
        msg.contains("Forbidden") && msg.contains(&who) && msg.contains("secrets"),
        "403 for secrets as {who}: {msg}"
    );
    cluster::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn run_as_non_root_refuses_an_image_running_as_root() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cluster-nonroot").await;
    let image = cluster::register_shell_image();
    create::<Pod>(
        &client,
        &ns,
        json!({
            "metadata": {"name": "rootish"},
            "spec": {"securityContext": {"runAsNonRoot": true},
                     "containers": [{"name": "main", "image": image, "command": ["/bin/sh", "-c", "sleep 60"]}]},
        }),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let msg = wait_for(
        &client,
        &ns,
        Duration::from_secs(60),
        "runAsNonRoot refusal",
        async || {
            let p = pods.get("rootish").await.ok()?;
            let w = cluster::container_status(&p, "main")?.state.as_ref()?.waiting.clone()?;
            (w.reason.as_deref() == Some("CreateContainerConfigError")).then(|| w.message.unwrap_or_default())
        },
    )
    .await;
    assert!(
        msg.contains("container has runAsNonRoot and image will run as root"),
        "{msg}"
    );
    let p = pods.get("rootish").await.expect("pod");
    assert!(cluster::container_pid(&p, "main").is_none(), "no process was started");
    cluster::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_root_filesystem_allows_writes_to_volumes_only() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cluster-readonly").await;
    let image = cluster::register_shell_image();
    let script = "echo data >/scratch/file && if touch /process-node-readonly-check 2>/dev/null; then echo root-writable >/dev/termination-log; exit 1; fi; printf 'root-read-only,volume=%s' \"$(cat /scratch/file)\" >/dev/termination-log";
    create::<Pod>(
        &client,
        &ns,
        shell_pod(
            "ro",
            &image,
            script,
            json!({
                "container": {"securityContext": {"readOnlyRootFilesystem": true},
                              "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
                "spec": {"volumes": [{"name": "scratch", "emptyDir": {}}]},
            }),
        ),
    )
    .await;
    let (phase, msg) = finished(&client, &ns, "ro").await;
    assert_eq!(
        (phase.as_str(), msg.as_str()),
        ("Succeeded", "root-read-only,volume=data"),
        "{}",
        cluster::describe(&client, &ns).await
    );
    cluster::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn image_without_mapping_waits_in_err_image_pull() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cluster-noimage").await;
    let image = "registry.invalid/nothing-maps-here:1.0";
    create::<Pod>(
        &client,
        &ns,
        json!({"metadata": {"name": "orphan"},
        "spec": {"containers": [{"name": "main", "image": image}]}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let msg = wait_for(&client, &ns, Duration::from_secs(60), "ErrImagePull", async || {
        let p = pods.get("orphan").await.ok()?;
        let w = cluster::container_status(&p, "main")?.state.as_ref()?.waiting.clone()?;
        (w.reason.as_deref() == Some("ErrImagePull")).then(|| w.message.unwrap_or_default())
    })
    .await;
    assert!(msg.contains(image), "the message names the image: {msg}");
    cluster::delete_namespace(&client, &ns).await;
}
