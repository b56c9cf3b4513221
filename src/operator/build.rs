//! Build: the children of one publisher as plain objects, from the validated publisher only
//! (no cluster calls), so every detail is unit-tested: the relay's ConfigMap, its Deployment
//! (a `provision` init container, then the relay), a Service, and a PodDisruptionBudget when
//! more than one relay runs.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use super::validate::{CONFIG_DIR, CONFIG_FILE, HTTP_PORT, SecretFile, ValidatedPublisher};

/// Annotation on the Pod template carrying the hash of the relay configuration: a spec
/// change changes it and so rolls the Pods.
pub const CONFIG_HASH_ANNOTATION: &str = "outbox.inventory.io/config-hash";
/// Label naming the publisher on every child.
pub const PUBLISHER_LABEL: &str = "outbox.inventory.io/publisher";
/// The non-root user and group of every container (the image's `nonroot`).
pub const RUN_AS: i64 = 65532;

/// A child that could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("render the relay configuration of {publisher}: {reason}")]
    RenderConfig { publisher: String, reason: String },
    #[error("build {kind} {name}: {reason}")]
    Object {
        kind: &'static str,
        name: String,
        reason: String,
    },
}

/// Everything the operator applies for one publisher.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    /// Only when more than one relay runs.
    pub pdb: Option<PodDisruptionBudget>,
}

/// Names and image the build needs besides the publisher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildContext {
    /// `ghcr.io/inventory-outbox/inventory-outbox:<version>` or the `--relay-image` override.
    pub image: String,
}

/// The default relay image: this crate's own version.
pub fn default_image() -> String {
    format!(
        "ghcr.io/inventory-outbox/inventory-outbox:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Label the chart's NetworkPolicy selects the operator's status polls by.
pub const PART_OF_LABEL: &str = "app.kubernetes.io/part-of";

/// Name of every child of `publisher`.
pub fn child_name(publisher: &str) -> String {
    format!("{publisher}-relay")
}

/// Labels selecting the relay Pods of `publisher`.
pub fn selector_labels(publisher: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "inventory-outbox".to_owned()),
        ("app.kubernetes.io/component".to_owned(), "relay".to_owned()),
        (PUBLISHER_LABEL.to_owned(), publisher.to_owned()),
    ])
}

/// The labels of everything this operator creates: what it is (`component`, `relay` or
/// `replay`), whose (`instance`), and who manages it. Not all in a selector (a Deployment's
/// selector cannot change); `part-of` lets the chart's NetworkPolicy admit the operator's
/// status polls to such Pods.
pub(crate) fn common_labels(component: &str, instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "inventory-outbox".to_owned()),
        ("app.kubernetes.io/component".to_owned(), component.to_owned()),
        ("app.kubernetes.io/instance".to_owned(), instance.to_owned()),
        (PART_OF_LABEL.to_owned(), "inventory-outbox".to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "inventory-outbox-operator".to_owned(),
        ),
    ])
}

fn labels(publisher: &str) -> BTreeMap<String, String> {
    let mut labels = common_labels("relay", publisher);
    labels.extend(selector_labels(publisher));
    labels
}

pub(crate) fn metadata(p: &ValidatedPublisher) -> ObjectMeta {
    ObjectMeta {
        name: Some(child_name(&p.name)),
        namespace: Some(p.namespace.clone()),
        labels: Some(labels(&p.name)),
        owner_references: Some(vec![p.owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// 64-bit FNV-1a: stable across Rust releases (std's hasher is not), so an operator upgrade
/// does not roll every relay.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Builds every child.
pub fn build(p: &ValidatedPublisher, ctx: &BuildContext) -> Result<Children, BuildError> {
    let document = serde_saphyr::to_string(&p.relay).map_err(|e| BuildError::RenderConfig {
        publisher: p.name.clone(),
        reason: e.to_string(),
    })?;
    let config_map = ConfigMap {
        metadata: metadata(p),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_owned(), document.clone())])),
        ..ConfigMap::default()
    };
    // Secret names are part of the hash: pointing at another Secret rolls the Pods too.
    let mut hashed = document;
    for f in p.secret_files.iter().chain(&p.tls_files) {
        hashed.push_str(&format!("\n{}={}/{}", f.env, f.secret, f.key));
    }
    let hash = format!("{:016x}", fnv1a(hashed.as_bytes()));
    let deployment = deployment(p, ctx, &hash)?;
    let service = from_json(
        "Service",
        &child_name(&p.name),
        json!({
            "metadata": metadata(p),
            "spec": {
                "selector": selector_labels(&p.name),
                "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}],
            }
        }),
    )?;
    let pdb = if p.replicas > 1 {
        Some(from_json(
            "PodDisruptionBudget",
            &child_name(&p.name),
            json!({
                "metadata": metadata(p),
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(&p.name)}}
            }),
        )?)
    } else {
        None
    };
    Ok(Children {
        config_map,
        deployment,
        service,
        pdb,
    })
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    name: &str,
    value: Value,
) -> Result<T, BuildError> {
    serde_json::from_value(value).map_err(|e| BuildError::Object {
        kind,
        name: name.to_owned(),
        reason: e.to_string(),
    })
}

/// Secret volumes: one per (role, Secret), holding only the referenced keys.
pub(crate) fn secret_volumes(p: &ValidatedPublisher) -> (Vec<Value>, Vec<Value>) {
    let mut by_role: BTreeMap<(&str, &str), Vec<&SecretFile>> = BTreeMap::new();
    for f in p.secret_files.iter().chain(p.admin_token.iter()).chain(&p.tls_files) {
        by_role.entry((f.role, f.secret.as_str())).or_default().push(f);
    }
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for ((role, secret), files) in by_role {
        let volume = format!("secret-{role}");
        volumes.push(json!({
            "name": volume,
            "secret": {
                "secretName": secret,
                "defaultMode": 0o440,
                "items": files.iter().map(|f| json!({"key": f.key, "path": f.key})).collect::<Vec<_>>(),
            }
        }));
        mounts.push(json!({"name": volume, "mountPath": files[0].mount_dir(), "readOnly": true}));
    }
    (volumes, mounts)
}

/// The Pod security context of every Pod this operator creates: non-root, the runtime's
/// default seccomp profile, mounted volumes readable by the container's group.
pub(crate) fn pod_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// `SECRET_ENV_FILES`: each variable the relay config names, with the mounted file to read
/// it from.
pub(crate) fn secret_env_files(p: &ValidatedPublisher) -> String {
    p.secret_files
        .iter()
        .map(|f| format!("{}={}", f.env, f.path()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The container security context of every container this operator creates: also no
/// privilege escalation, a read-only root and no capabilities.
pub(crate) fn container_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "privileged": false,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

fn deployment(p: &ValidatedPublisher, ctx: &BuildContext, hash: &str) -> Result<Deployment, BuildError> {
    let (mut volumes, secret_mounts) = secret_volumes(p);
    volumes.push(json!({"name": "config", "configMap": {"name": child_name(&p.name)}}));
    volumes.push(json!({"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}));
    let mut mounts = secret_mounts;
    mounts.push(json!({"name": "config", "mountPath": CONFIG_DIR, "readOnly": true}));
    mounts.push(json!({"name": "tmp", "mountPath": "/tmp"}));
    let config_path = format!("{CONFIG_DIR}/{CONFIG_FILE}");
    // Secrets as files: the container reads each into the variable the config names.
    let secret_env = secret_env_files(p);
    let common_env = vec![
        json!({"name": "LOG_FORMAT", "value": "json"}),
        json!({"name": "RELAY_CONFIG", "value": config_path}),
        json!({"name": "SECRET_ENV_FILES", "value": secret_env}),
    ];
    let mut provision_env = common_env.clone();
    provision_env.push(json!({"name": "PROVISION_DESTINATIONS", "value": p.extra_destinations.join(",")}));
    provision_env.push(json!({"name": "PROVISION_REPORT_FILE", "value": "/dev/termination-log"}));
    let mut relay_env = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        json!({"name": "RELAY_HTTP_LISTEN", "value": format!("$(POD_IP):{HTTP_PORT}")}),
    ];
    relay_env.extend(common_env);
    let compatibility = serde_json::to_value(p.compatibility)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "BACKWARD".into());
    let probe = |path: &str, period: i32| json!({"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 2, "failureThreshold": 3});
    let mut relay = json!({
        "name": "relay",
        "image": ctx.image,
        "args": ["relay"],
        "env": relay_env,
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "livenessProbe": probe("/livez", 10),
        "readinessProbe": probe("/readyz", 5),
        "startupProbe": {"httpGet": {"path": "/livez", "port": "http"}, "periodSeconds": 2, "failureThreshold": 30},
        "volumeMounts": mounts,
        "securityContext": container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if let Some(resources) = &p.resources {
        relay["resources"] = serde_json::to_value(resources).map_err(|e| BuildError::Object {
            kind: "Deployment",
            name: child_name(&p.name),
            reason: e.to_string(),
        })?;
    }
    let provision = json!({
        "name": "provision",
        "image": ctx.image,
        "args": ["provision", "--compatibility", compatibility],
        "env": provision_env,
        "volumeMounts": relay["volumeMounts"].clone(),
        "securityContext": container_security(),
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    });
    from_json(
        "Deployment",
        &child_name(&p.name),
        json!({
            "metadata": metadata(p),
            "spec": {
                "replicas": p.replicas,
                "selector": {"matchLabels": selector_labels(&p.name)},
                // Replace one relay at a time: leases hand shards over within leaseDurationMs.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {
                    "metadata": {
                        "labels": labels(&p.name),
                        "annotations": {CONFIG_HASH_ANNOTATION: hash},
                    },
                    "spec": {
                        // Relays need no Kubernetes API access.
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        "terminationGracePeriodSeconds": 30,
                        "securityContext": pod_security(),
                        "initContainers": [provision],
                        "containers": [relay],
                        "volumes": volumes,
                    }
                }
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::validate::tests::kafka_publisher;
    use crate::operator::validate::validate;

    fn ctx() -> BuildContext {
        BuildContext { image: default_image() }
    }

    fn built(p: &crate::crd::EventPublisher) -> Children {
        build(&validate(p).expect("valid"), &ctx()).expect("builds")
    }

    fn json_of<T: serde::Serialize>(t: &T) -> Value {
        serde_json::to_value(t).expect("serialize")
    }

    #[test]
    fn the_config_map_holds_the_relays_own_document_and_no_secret_values() {
        let children = built(&kafka_publisher());
        let data = children.config_map.data.expect("data");
        let document = data.get(CONFIG_FILE).expect("relay.yaml");
        let parsed = crate::relay::config::RelayConfig::parse(document, std::path::Path::new("relay.yaml"));
        let parsed = parsed.expect("the relay accepts the rendered document");
        assert_eq!(parsed.publisher, "orders");
        assert!(
            !document.contains("orders-db"),
            "no Secret names or values in the document: {document}"
        );
    }

    #[test]
    fn the_deployment_runs_provision_then_a_locked_down_relay_with_secrets_as_files() {
        let children = built(&kafka_publisher());
        let d = json_of(&children.deployment);
        let spec = &d["spec"]["template"]["spec"];
        assert_eq!(d["spec"]["replicas"], 2);
        assert_eq!(spec["securityContext"]["runAsUser"], RUN_AS);
        assert_eq!(spec["automountServiceAccountToken"], false);
        let init = &spec["initContainers"][0];
        assert_eq!(init["name"], "provision");
        assert_eq!(init["args"][0], "provision");
        let relay = &spec["containers"][0];
        assert_eq!(relay["image"], default_image());
        for c in [init, relay] {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{c}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{c}");
            assert_eq!(sc["runAsNonRoot"], true, "{c}");
            assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{c}");
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{c}");
            // Secrets never appear as env values or secretKeyRefs: only as mounted files.
            let env = c["env"].to_string();
            assert!(!env.contains("secretKeyRef") && !env.contains("orders-db"), "{env}");
            assert!(
                env.contains("DATABASE_URL=/var/run/secrets/inventory-outbox/database/url"),
                "{env}"
            );
        }
        assert_eq!(relay["livenessProbe"]["httpGet"]["path"], "/livez");
        assert_eq!(relay["readinessProbe"]["httpGet"]["path"], "/readyz");
        let env = relay["env"].as_array().expect("env");
        let pod_ip = env.iter().find(|e| e["name"] == "POD_IP").expect("POD_IP");
        assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
        let listen = env.iter().find(|e| e["name"] == "RELAY_HTTP_LISTEN").expect("listen");
        assert_eq!(listen["value"], "$(POD_IP):8080");
        let volume = spec["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "secret-database"))
            .expect("database secret volume");
        assert_eq!(volume["secret"]["secretName"], "orders-db");
        assert_eq!(volume["secret"]["items"][0]["key"], "url");
    }

    #[test]
    fn a_spec_change_changes_the_config_hash_and_a_status_only_change_does_not() {
        let base = kafka_publisher();
        let hash = |c: &Children| {
            json_of(&c.deployment)["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION].clone()
        };
        let before = hash(&built(&base));
        assert_eq!(before, hash(&built(&base)), "stable for the same spec");
        let mut batch = base.clone();
        batch.spec.outbox.batch_size = 500;
        assert_ne!(before, hash(&built(&batch)), "a batch size change rolls the Pods");
        let mut other_secret = base.clone();
        other_secret.spec.outbox.database_url_secret_ref.name = "orders-db-v2".into();
        assert_ne!(before, hash(&built(&other_secret)), "another Secret rolls the Pods");
        let mut replicas = base;
        replicas.spec.replicas = 3;
        assert_eq!(before, hash(&built(&replicas)), "scaling is not a config change");
    }

    #[test]
    fn pdb_only_with_more_than_one_relay_and_paused_scales_to_zero() {
        let mut p = kafka_publisher();
        let children = built(&p);
        let pdb = json_of(&children.pdb.expect("pdb with 2 replicas"));
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        p.spec.replicas = 1;
        assert!(built(&p).pdb.is_none());
        p.spec.replicas = 2;
        p.spec.paused = true;
        let paused = built(&p);
        assert!(paused.pdb.is_none(), "no PDB while nothing runs");
        assert_eq!(json_of(&paused.deployment)["spec"]["replicas"], 0);
    }

    #[test]
    fn every_child_is_owned_by_the_publisher_and_labelled() {
        let c = built(&kafka_publisher());
        let metas = [
            &c.config_map.metadata,
            &c.deployment.metadata,
            &c.service.metadata,
            &c.pdb.as_ref().expect("pdb").metadata,
        ];
        for m in metas {
            let owner = &m.owner_references.as_ref().expect("owner")[0];
            assert_eq!(owner.kind, "EventPublisher");
            assert_eq!(owner.name, "orders");
            assert_eq!(
                m.labels
                    .as_ref()
                    .and_then(|l| l.get(PUBLISHER_LABEL))
                    .map(String::as_str),
                Some("orders")
            );
            assert_eq!(m.namespace.as_deref(), Some("shop"));
        }
        // The chart's NetworkPolicy admits the operator's status polls by this label.
        let pod_labels = c
            .deployment
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone());
        assert_eq!(
            pod_labels
                .as_ref()
                .and_then(|l| l.get(PART_OF_LABEL))
                .map(String::as_str),
            Some("inventory-outbox"),
            "{pod_labels:?}"
        );
    }
}

/// Name of the cleanup Job of `publisher`.
pub fn cleanup_job_name(publisher: &str) -> String {
    format!("{publisher}-cleanup")
}

/// The Job that removes the broker resources this publisher created (`deletionPolicy:
/// Delete`). It mounts the publisher's Secrets like the relay; retries are bounded by
/// `backoffLimit` and `activeDeadlineSeconds`, so an unreachable broker ends the deletion in
/// bounded time instead of holding it forever.
pub fn cleanup_job(
    p: &ValidatedPublisher,
    ctx: &BuildContext,
    resources: &[crate::crd::event_publisher::ProvisionedResource],
    deadline_seconds: i64,
) -> Result<k8s_openapi::api::batch::v1::Job, BuildError> {
    let name = cleanup_job_name(&p.name);
    let (mut volumes, mut mounts) = secret_volumes(p);
    volumes.push(json!({"name": "config", "configMap": {"name": child_name(&p.name)}}));
    mounts.push(json!({"name": "config", "mountPath": CONFIG_DIR, "readOnly": true}));
    let secret_env = secret_env_files(p);
    let list = serde_json::to_string(resources).map_err(|e| BuildError::Object {
        kind: "Job",
        name: name.clone(),
        reason: e.to_string(),
    })?;
    let mut meta = metadata(p);
    meta.name = Some(name.clone());
    from_json(
        "Job",
        &name,
        json!({
            "metadata": meta,
            "spec": {
                "backoffLimit": 3,
                "activeDeadlineSeconds": deadline_seconds,
                "ttlSecondsAfterFinished": 600,
                "template": {
                    "metadata": {"labels": labels(&p.name)},
                    "spec": {
                        "restartPolicy": "Never",
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        "securityContext": pod_security(),
                        "containers": [{
                            "name": "cleanup",
                            "image": ctx.image,
                            "args": ["cleanup"],
                            "env": [
                                {"name": "LOG_FORMAT", "value": "json"},
                                {"name": "RELAY_CONFIG", "value": format!("{CONFIG_DIR}/{CONFIG_FILE}")},
                                {"name": "SECRET_ENV_FILES", "value": secret_env},
                                {"name": "CLEANUP_RESOURCES", "value": list},
                                {"name": "CLEANUP_REPORT_FILE", "value": "/dev/termination-log"},
                            ],
                            "volumeMounts": mounts,
                            "securityContext": container_security(),
                            "terminationMessagePath": "/dev/termination-log",
                        }],
                        "volumes": volumes,
                    }
                }
            }
        }),
    )
}

#[cfg(test)]
mod cleanup_tests {
    use super::*;
    use crate::crd::event_publisher::ProvisionedResource;
    use crate::operator::validate::{tests::kafka_publisher, validate};

    #[test]
    fn the_cleanup_job_lists_only_created_resources_and_is_bounded() {
        let p = validate(&kafka_publisher()).expect("valid");
        let created = vec![ProvisionedResource {
            kind: "kafkaTopic".into(),
            name: "inventory.events".into(),
        }];
        let job = cleanup_job(&p, &BuildContext { image: default_image() }, &created, 120).expect("job");
        let j = serde_json::to_value(&job).expect("json");
        assert_eq!(j["spec"]["backoffLimit"], 3);
        assert_eq!(j["spec"]["activeDeadlineSeconds"], 120);
        let c = &j["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["args"][0], "cleanup");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        let env = c["env"].to_string();
        assert!(
            env.contains(r#"[{\"kind\":\"kafkaTopic\",\"name\":\"inventory.events\"}]"#),
            "{env}"
        );
        assert!(!env.contains("secretKeyRef"), "{env}");
        assert_eq!(j["metadata"]["ownerReferences"][0]["kind"], "EventPublisher");
    }
}
