//! Jobs: success reaches Complete (with the termination message), exit 1 reaches Failed after
//! backoffLimit, and deleting a Job ends its processes.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams};
use serde_json::{Value, json};

use crate::support::cluster::{self, create, pods, wait_for};
use crate::support::kube::{admin_client, create_namespace};

fn job(name: &str, image: &str, script: &str, backoff_limit: i32) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"labels": {"job": name}},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 5,
                    "securityContext": {"runAsUser": 65532, "runAsGroup": 65532},
                    "containers": [{"name": "main", "image": image, "command": ["/bin/sh", "-c", script]}],
                },
            },
        },
    })
}

async fn condition(client: &kube::Client, ns: &str, name: &str, type_: &str) -> Option<String> {
    let j = Api::<Job>::namespaced(client.clone(), ns).get(name).await.ok()?;
    let c = j
        .status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == type_ && c.status == "True")?;
    Some(c.reason.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn succeeding_job_completes_with_its_termination_message() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cluster-job-ok").await;
    let image = cluster::register_shell_image();
    create::<Job>(
        &client,
        &ns,
        job("ok", &image, "printf result-42 >/dev/termination-log", 2),
    )
    .await;
    wait_for(&client, &ns, Duration::from_secs(90), "Job ok Complete", async || {
        condition(&client, &ns, "ok", "Complete").await
    })
    .await;
    let list = pods(&client, &ns, "job=ok").await;
    let cs = list
        .first()
        .and_then(|p| cluster::container_status(p, "main"))
        .expect("container status");
    let terminated = cs
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("terminated");
    assert_eq!(terminated.exit_code, 0);
    assert_eq!(terminated.message.as_deref(), Some("result-42"));
    cluster::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_job_fails_after_backoff_limit() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cluster-job-fail").await;
    let image = cluster::register_shell_image();
    create::<Job>(&client, &ns, job("fail", &image, "echo failing; exit 1", 1)).await;
    let reason = wait_for(&client, &ns, Duration::from_secs(150), "Job fail Failed", async || {
        condition(&client, &ns, "fail", "Failed").await
    })
    .await;
    assert_eq!(reason, "BackoffLimitExceeded");
    let list = pods(&client, &ns, "job=fail").await;
    let failed: Vec<_> = list
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed"))
        .filter(|p| {
            cluster::container_status(p, "main")
                .and_then(|c| c.state.as_ref()?.terminated.as_ref())
                .is_some_and(|t| t.exit_code == 1)
        })
        .collect();
    assert_eq!(
        failed.len(),
        2,
        "first try plus backoffLimit 1 retry:\n{}",
        cluster::describe(&client, &ns).await
    );
    cluster::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_job_ends_its_processes() {
    let client = admin_client().await;
    let ns = create_namespace(&client, "cluster-job-delete").await;
    let image = cluster::register_shell_image();
    create::<Job>(&client, &ns, job("sleeper", &image, "exec sleep 600", 0)).await;
    let pid = wait_for(
        &client,
        &ns,
        Duration::from_secs(60),
        "Job sleeper running",
        async || {
            let list = pods(&client, &ns, "job=sleeper").await;
            let p = list.first()?;
            let cs = cluster::container_status(p, "main")?;
            cs.state.as_ref()?.running.as_ref()?;
            cluster::container_pid(p, "main")
        },
    )
    .await;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the container's process exists");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("sleep"),
        "pid {pid} is the container's sleep"
    );

    let dp = DeleteParams {
        propagation_policy: Some(kube::api::PropagationPolicy::Background),
        ..Default::default()
    };
    Api::<Job>::namespaced(client.clone(), &ns)
        .delete("sleeper", &dp)
        .await
        .expect("delete job");
    wait_for(
        &client,
        &ns,
        Duration::from_secs(60),
        "the Job's process ended and its Pod gone",
        async || {
            let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
                && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == cmdline);
            (!alive && pods(&client, &ns, "job=sleeper").await.is_empty()).then_some(())
        },
    )
    .await;
    cluster::delete_namespace(&client, &ns).await;
}
