//! Issue 9's leader-election acceptance with two operator Pods from the chart: only the Lease
//! holder reconciles (Events name it alone, its leader gauge is 1 and the standby's 0), and after
//! kill -9 of the holder's process another process holds the Lease within the lease time and
//! reconciles. The killed container restarts at once (as under a kubelet) with a new run id, so
//! the new holder is the standby or the restarted process, never the dead one.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::e2e::E2e;
use super::reporters_of;
use crate::support::cluster::container_pid;
use crate::support::kafka_bootstrap;

/// The chart's default lease duration.
const LEASE_SECONDS: u64 = 15;

async fn holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

/// Creates a publisher, waits for its status, pauses it and returns the identities on its
/// Events once the "Paused" Event (a transition, written only by the reconciler that saw it)
/// is there. Its Secret does not exist, so no relay starts in the moment before the pause.
async fn reconciled_by(e2e: &E2e, name: &str) -> Vec<String> {
    e2e.create_publisher(
        name,
        json!({
            "outbox": {"databaseUrlSecretRef": {"name": "no-such-secret", "key": "url"}},
            "broker": {"kafka": {"bootstrapServers": kafka_bootstrap()}},
            "routing": {"strategy": "single", "destination": format!("{name}.events")}
        }),
    )
    .await;
    let mut paused = false;
    e2e.eventually(
        Duration::from_secs(60),
        &format!("{name} reconciled and paused"),
        async || {
            let written = e2e
                .publishers
                .get(name)
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| s.observed_generation == Some(1));
            if written && !paused {
                e2e.publishers
                    .patch(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"paused": true}})),
                    )
                    .await
                    .map_err(|e| format!("pause {name}: {e}"))?;
                paused = true;
            }
            let reported = reporters_of(&e2e.admin, &e2e.tenant, name).await;
            if reported.iter().any(|(reason, _)| reason == "Paused") {
                Ok(reported.into_iter().map(|(_, instance)| instance).collect())
            } else {
                Err(format!(
                    "status written {written}, paused {paused}, Events {reported:?}"
                ))
            }
        },
    )
    .await
}

/// `outbox_operator_leader` of each operator Pod, by Pod name.
async fn leader_gauges(e2e: &E2e) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for pod in e2e.operator.pods(&e2e.admin).await {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ip = pod.status.and_then(|s| s.pod_ip).unwrap_or_default();
        let gauge = match reqwest::get(format!("http://{ip}:8080/metrics")).await {
            Ok(r) => r.text().await.ok().and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("outbox_operator_leader "))
                    .map(str::to_owned)
            }),
            Err(_) => None,
        };
        out.push((name, gauge));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_operator_pods_only_the_holder_reconciles_and_kill_9_hands_over_within_the_lease_time() {
    let e2e = E2e::start("op-leader", 2).await;
    let leases: Api<Lease> = Api::namespaced(e2e.admin.clone(), &e2e.operator.namespace);
    let lease = e2e.operator.lease();
    let first = e2e
        .eventually(Duration::from_secs(60), "a Lease holder", async || {
            holder(&leases, &lease).await.ok_or_else(|| "no holder".to_owned())
        })
        .await;
    let (pod_of_holder, _) = first.rsplit_once('_').expect("identity is <pod>_<run id>");
    let pod_of_holder = pod_of_holder.to_owned();
    let gauges = e2e
        .eventually(
            Duration::from_secs(30),
            "leader gauges 1 on the holder, 0 on the standby",
            async || {
                let g = leader_gauges(&e2e).await;
                let ok = g.len() == 2
                    && g.iter().all(|(pod, gauge)| {
                        let want = if *pod == pod_of_holder {
                            "outbox_operator_leader 1"
                        } else {
                            "outbox_operator_leader 0"
                        };
                        gauge.as_deref() == Some(want)
                    });
                if ok {
                    Ok(g)
                } else {
                    Err(format!("{g:?} (holder {first})"))
                }
            },
        )
        .await;
    let reporters = reconciled_by(&e2e, "first").await;
    assert!(
        reporters.iter().all(|r| *r == first),
        "only the holder {first} reconciles: {reporters:?} (gauges {gauges:?})"
    );

    // kill -9 the holder's process.
    let holder_pod = e2e
        .operator
        .pods(&e2e.admin)
        .await
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(pod_of_holder.as_str()))
        .expect("holder Pod");
    let pid = container_pid(&holder_pod, "operator").expect("holder's process id");
    let killed = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -9 {pid}");
    let next = e2e
        .eventually(
            Duration::from_secs(LEASE_SECONDS + 15),
            "another process holds the Lease",
            async || match holder(&leases, &lease).await {
                Some(h) if h != first => Ok(h),
                other => Err(format!("holder {other:?}")),
            },
        )
        .await;
    let takeover = killed.elapsed();
    println!("takeover after kill -9: {takeover:?} by {next} (lease {LEASE_SECONDS} s)");
    assert!(
        takeover <= Duration::from_secs(LEASE_SECONDS + 5),
        "takeover took {takeover:?} (lease {LEASE_SECONDS} s)\n{}",
        e2e.state().await
    );
    let reporters = reconciled_by(&e2e, "second").await;
    assert!(
        reporters.iter().all(|r| *r == next),
        "only the new holder {next} reconciles: {reporters:?}"
    );
    e2e.finish().await;
}
