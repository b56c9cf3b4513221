//! Two `inventory-outbox operator` processes (out of cluster, kubeconfig) share one Lease:
//! only the holder reconciles (its identity is the only one on the Events), kill -9 of the
//! holder hands over within the lease time, and SIGTERM stops the survivor cleanly, releasing
//! the Lease.

use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::process::{Child, Command};

use inventory_outbox::crd::EventPublisher;

use super::{install_crds, reporters_of};
use crate::support::kube::{admin_client, create_namespace};
use crate::support::{kafka_bootstrap, kubeconfig_path, unique_name};

const BIN: &str = env!("CARGO_BIN_EXE_inventory-outbox");
const LEASE_SECONDS: u64 = 6;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Operator {
    identity: String,
    port: u16,
    child: Child,
    log: std::path::PathBuf,
}

impl Operator {
    /// Whether `id` (a Lease holder or Event reporter) is this process: its name plus the
    /// run id the process appends.
    fn is(&self, id: &str) -> bool {
        id.strip_prefix(&self.identity)
            .is_some_and(|rest| rest.starts_with('_'))
    }
}

fn start(ns: &str, identity: &str, dir: &std::path::Path) -> Operator {
    let port = free_port();
    let log = dir.join(format!("{identity}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(BIN)
        .args([
            "operator",
            "--leader-election",
            "--watch-namespaces",
            ns,
            "--lease-namespace",
            ns,
            "--requeue-seconds",
            "2",
        ])
        .args(["--lease-duration-seconds", &LEASE_SECONDS.to_string()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("POD_NAME", identity)
        .env("KUBECONFIG", kubeconfig_path())
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::from(file.try_clone().expect("log file")))
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .expect("start operator");
    Operator {
        identity: identity.to_owned(),
        port,
        child,
        log,
    }
}

fn logs(ops: &[&Operator]) -> String {
    ops.iter()
        .map(|o| {
            format!(
                "--- {} ---\n{}",
                o.identity,
                std::fs::read_to_string(&o.log).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("inventory-outbox-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

async fn leader_gauge(port: u16) -> Option<String> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("outbox_operator_leader "))
        .map(str::to_owned)
}

/// Creates a publisher, waits for its status, pauses it and waits for the "Paused" Event (a
/// transition, so only the reconciler that saw it writes one); returns the identities that
/// reported Events about it.
async fn reconciled_by(client: &kube::Client, ns: &str, name: &str, ops: &[&Operator]) -> Vec<String> {
    let api: Api<EventPublisher> = Api::namespaced(client.clone(), ns);
    let p: EventPublisher = serde_json::from_value(json!({
        "apiVersion": "outbox.inventory.io/v1alpha1", "kind": "EventPublisher", "metadata": {"name": name},
        "spec": {
            "outbox": {"databaseUrlSecretRef": {"name": "db", "key": "url"}},
            "broker": {"kafka": {"bootstrapServers": kafka_bootstrap()}},
            "routing": {"strategy": "single", "destination": format!("{name}.events")}
        }
    }))
    .expect("publisher");
    api.create(&PostParams::default(), &p).await.expect("create publisher");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let mut paused = false;
    loop {
        let written = api.get(name).await.ok().and_then(|p| p.status).is_some();
        if written && !paused {
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"paused": true}})),
            )
            .await
            .expect("pause publisher");
            paused = true;
        }
        let reported = reporters_of(client, ns, name).await;
        if reported.iter().any(|(reason, _)| reason == "Paused") {
            return reported.into_iter().map(|(_, instance)| instance).collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} not reconciled and paused within 45 s (status {written}, paused {paused}, events {reported:?})\n{}",
            logs(ops)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_reconciles_and_a_killed_holder_is_replaced_within_the_lease_time() {
    inventory_outbox::tls::install_crypto_provider();
    let client = admin_client().await;
    install_crds(&client).await;
    let ns = create_namespace(&client, "op-leader").await;
    let dir = std::env::temp_dir().join(unique_name("op-leader"));
    std::fs::create_dir_all(&dir).expect("log dir");
    let mut a = start(&ns, "operator-a", &dir);
    let mut b = start(&ns, "operator-b", &dir);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(h) = holder(&leases).await {
            break h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no lease holder within 30 s\n{}",
            logs(&[&a, &b])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (leader, standby) = if a.is(&first) {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    // The Lease names the holder a moment before its process flips the gauge, and on a loaded
    // machine the first holder can still lose a renewal: wait until the gauges agree with the
    // Lease (holder 1, the other 0).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let holder_now = holder(&leases).await;
        let (lead, stand) = (leader_gauge(leader.port).await, leader_gauge(standby.port).await);
        if holder_now.as_deref().is_some_and(|h| leader.is(h))
            && lead.as_deref() == Some("outbox_operator_leader 1")
            && stand.as_deref() == Some("outbox_operator_leader 0")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gauges never agreed with the Lease within 20 s: holder {holder_now:?}, {} says {lead:?}, {} says {stand:?}\n{}",
            leader.identity,
            standby.identity,
            logs(&[leader, standby])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reporters = reconciled_by(&client, &ns, "first", &[leader, standby]).await;
    assert!(
        reporters.iter().all(|r| leader.is(r)),
        "only the holder reports: {reporters:?}"
    );

    // kill -9 the holder: the standby takes the lease within the lease time.
    let killed = Instant::now();
    leader.child.start_kill().expect("kill -9 the leader");
    let _ = leader.child.wait().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(LEASE_SECONDS + 10);
    loop {
        if holder(&leases).await.is_some_and(|h| standby.is(&h)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "standby did not take over within {}s\n{}",
            LEASE_SECONDS + 10,
            logs(&[leader, standby])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let takeover = killed.elapsed();
    println!("takeover after kill -9: {takeover:?} (lease {LEASE_SECONDS}s)");
    assert!(
        takeover <= Duration::from_secs(LEASE_SECONDS + 3),
        "takeover took {takeover:?}"
    );
    let reporters = reconciled_by(&client, &ns, "second", &[leader, standby]).await;
    assert!(
        reporters.iter().all(|r| standby.is(r)),
        "the new holder reports: {reporters:?}"
    );

    // SIGTERM: the survivor stops cleanly and releases the lease.
    let pid = standby.child.id().expect("pid");
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .expect("kill -TERM");
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(15), standby.child.wait())
        .await
        .unwrap_or_else(|_| panic!("operator did not stop on SIGTERM\n{}", logs(&[standby])))
        .expect("wait");
    assert!(exit.success(), "clean exit on SIGTERM: {exit}\n{}", logs(&[standby]));
    assert_eq!(holder(&leases).await, None, "the lease is released on a clean stop");
    let _ = std::fs::remove_dir_all(&dir);
}
