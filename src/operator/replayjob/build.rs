//! Build: the batch/v1 Job that runs `inventory-outbox replay` for one ReplayJob. Pure. The
//! Pod mounts the publisher's Secrets by reference and its relay ConfigMap, runs non-root on
//! a read-only root, serves its progress on the Pod IP and writes its final report as the
//! termination message.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;

use super::validate::ValidatedReplay;
use crate::operator::build::{
    BuildContext, BuildError, child_name, common_labels, container_security, from_json, pod_security, secret_env_files,
    secret_volumes,
};
use crate::operator::validate::{CONFIG_DIR, CONFIG_FILE};

/// Port of the replay Pod's status endpoint.
pub const STATUS_PORT: u16 = 8080;
/// Label naming the ReplayJob on its Job and Pods.
pub const REPLAY_LABEL: &str = "outbox.inventory.io/replayjob";
/// Pods the Job may start: a killed or failed Pod is replaced and resumes at the checkpoint.
pub const BACKOFF_LIMIT: i32 = 4;
/// Where kubelet reads the report from.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// The replay container's name.
pub const CONTAINER: &str = "replay";

/// Name of the Job of ReplayJob `name`.
pub fn job_name(name: &str) -> String {
    format!("{name}-replay")
}

/// Labels of the Job and its Pods.
pub fn labels(v: &ValidatedReplay) -> BTreeMap<String, String> {
    let mut labels = common_labels("replay", &v.name);
    labels.insert(REPLAY_LABEL.to_owned(), v.name.clone());
    labels
}

/// The Job of one replay.
pub fn replay_job(v: &ValidatedReplay, ctx: &BuildContext) -> Result<Job, BuildError> {
    let name = job_name(&v.name);
    let p = &v.publisher;
    let (mut volumes, mut mounts) = secret_volumes(p);
    volumes.push(json!({"name": "config", "configMap": {"name": child_name(&p.name)}}));
    mounts.push(json!({"name": "config", "mountPath": CONFIG_DIR, "readOnly": true}));
    let secret_env = secret_env_files(p);
    let spec = serde_json::to_string(&v.spec).map_err(|e| BuildError::Object {
        kind: "Job",
        name: name.clone(),
        reason: e.to_string(),
    })?;
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(v.namespace.clone()),
        labels: Some(labels(v)),
        owner_references: Some(vec![v.owner.clone()]),
        ..ObjectMeta::default()
    };
    from_json(
        "Job",
        &name,
        json!({
            "metadata": meta,
            "spec": {
                "backoffLimit": BACKOFF_LIMIT,
                "template": {
                    "metadata": {"labels": labels(v)},
                    "spec": {
                        // A new Pod per failure: it resumes after the last checkpoint.
                        "restartPolicy": "Never",
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        "terminationGracePeriodSeconds": 30,
                        "securityContext": pod_security(),
                        "containers": [{
                            "name": CONTAINER,
                            "image": ctx.image,
                            "args": ["replay"],
                            "env": [
                                {"name": "LOG_FORMAT", "value": "json"},
                                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                                {"name": "REPLAY_LISTEN", "value": format!("$(POD_IP):{STATUS_PORT}")},
                                {"name": "RELAY_CONFIG", "value": format!("{CONFIG_DIR}/{CONFIG_FILE}")},
                                {"name": "SECRET_ENV_FILES", "value": secret_env},
                                {"name": "REPLAY_SPEC", "value": spec},
                                {"name": "REPLAY_ID", "value": v.uid},
                                {"name": "REPLAY_JOB", "value": format!("{}/{}", v.namespace, v.name)},
                                {"name": "REPLAY_REPORT_FILE", "value": TERMINATION_LOG},
                            ],
                            "ports": [{"name": "status", "containerPort": STATUS_PORT, "protocol": "TCP"}],
                            "volumeMounts": mounts,
                            "securityContext": container_security(),
                            "terminationMessagePath": TERMINATION_LOG,
                            "terminationMessagePolicy": "File",
                        }],
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
    use crate::operator::build::{RUN_AS, default_image};
    use crate::operator::replayjob::validate::{tests::replay_job as job_of, validate};
    use crate::operator::validate::tests::kafka_publisher;

    #[test]
    fn the_job_runs_the_replay_locked_down_with_the_publishers_secrets_by_reference() {
        let job = job_of(json!({"publisherRef": {"name": "orders"}, "dryRun": true}));
        let v = validate(&job, Some(&kafka_publisher())).expect("valid");
        let built = replay_job(&v, &BuildContext { image: default_image() }).expect("job");
        let j = serde_json::to_value(&built).expect("json");
        assert_eq!(j["metadata"]["name"], "nightly-replay");
        assert_eq!(j["metadata"]["ownerReferences"][0]["kind"], "ReplayJob");
        assert_eq!(j["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(j["spec"]["backoffLimit"], BACKOFF_LIMIT);
        let pod = &j["spec"]["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Never");
        assert_eq!(pod["automountServiceAccountToken"], false);
        let c = &pod["containers"][0];
        assert_eq!(c["args"][0], "replay");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["runAsUser"], RUN_AS);
        assert_eq!(c["terminationMessagePath"], TERMINATION_LOG);
        let env = c["env"].to_string();
        assert!(env.contains("REPLAY_ID") && env.contains("a1b2c3"), "{env}");
        assert!(env.contains(r#"\"dryRun\":true"#), "{env}");
        assert!(
            !env.contains("secretKeyRef"),
            "Secrets are mounted, never env values: {env}"
        );
        let volumes = pod["volumes"].to_string();
        assert!(volumes.contains("orders-relay"), "the relay ConfigMap: {volumes}");
        assert!(volumes.contains("secretName"), "{volumes}");
        assert!(!volumes.contains("admin"), "no admin token: {volumes}");
    }
}
