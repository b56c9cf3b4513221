//! Operator scale benchmark: creates N paused EventPublishers (no relay Pods start) in a fresh
//! namespace, runs the real `inventory-outbox operator` binary against the local API server,
//! and reports the time until every publisher is reconciled (status written for its current
//! generation, ConfigMap, Deployment and Service created) and the operator's peak RSS; also the
//! operator's reconciles and CPU time, the API server's requests by verb and resource over the
//! run (the whole server's: other clients' included), and the load average.
//! `source ~/.local/state/inventory-outbox/env.sh && cargo build --release && cargo run --release --example operator_scale -- 1000 [concurrency]`

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use inventory_outbox::crd::EventPublisher;

fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The process's user + system CPU time, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let fields: Vec<&str> = text.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `apiserver_request_total` summed by (verb, resource) for the resources the operator touches.
async fn api_requests() -> std::collections::BTreeMap<(String, String), f64> {
    let mut out = std::collections::BTreeMap::new();
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let Ok(raw) = tokio::process::Command::new(kubectl)
        .args(["get", "--raw", "/metrics"])
        .output()
        .await
    else {
        return out;
    };
    let text = String::from_utf8_lossy(&raw.stdout);
    let label = |line: &str, name: &str| {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        Some(line[start..start + line[start..].find('"')?].to_owned())
    };
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let (Some(verb), Some(resource), Some(value)) = (
            label(line, "verb"),
            label(line, "resource"),
            line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        let watched = [
            "eventpublishers",
            "configmaps",
            "deployments",
            "services",
            "poddisruptionbudgets",
            "pods",
            "events",
        ];
        if watched.contains(&resource.as_str()) {
            *out.entry((verb, resource)).or_insert(0.0) += value;
        }
    }
    out
}

/// A counter's value from the operator's `/metrics`.
async fn operator_metric(port: u16, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn count<K>(api: &Api<K>) -> anyhow::Result<usize>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    // Served from the API server's watch cache: cheap, and at most a moment behind.
    Ok(api.list_metadata(&ListParams::default().match_any()).await?.items.len())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    inventory_outbox::tls::install_crypto_provider();
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    // Optional: the operator's `--concurrency` (its default otherwise).
    let concurrency: Option<u16> = std::env::args().nth(2).and_then(|a| a.parse().ok());
    let client = kube::Client::try_default().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in inventory_outbox::crd::definitions() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply("operator-scale").force(),
            &Patch::Apply(&crd),
        )
        .await?;
    }
    let ns = format!("scale-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;

    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|examples| examples.parent())
        .map(|debug| debug.join("inventory-outbox"))
        .ok_or_else(|| anyhow::anyhow!("cannot locate the inventory-outbox binary next to {}", exe.display()))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut operator = tokio::process::Command::new(&bin)
        .args(["operator", "--watch-namespaces", &ns, "--requeue-seconds", "300"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(concurrency.map(|c| format!("--concurrency={c}")))
        .env("LOG_FORMAT", "json")
        // OPERATOR_LOG overrides the operator's log filter (e.g. to follow a slow release).
        .env(
            "RUST_LOG",
            std::env::var("OPERATOR_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .kill_on_drop(true)
        .spawn()?;
    let pid = operator
        .id()
        .ok_or_else(|| anyhow::anyhow!("operator exited at once"))?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let api: Api<EventPublisher> = Api::namespaced(client.clone(), &ns);
    let load_before = load_average();
    let requests_before = api_requests().await;
    let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
    let started = Instant::now();
    let created: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let p: EventPublisher = serde_json::from_value(json!({
                    "apiVersion": "outbox.inventory.io/v1alpha1", "kind": "EventPublisher",
                    "metadata": {"name": format!("publisher-{i:04}")},
                    "spec": {
                        "outbox": {"databaseUrlSecretRef": {"name": "outbox-db", "key": "url"}},
                        "broker": {"kafka": {"bootstrapServers": "127.0.0.1:19092"}},
                        "routing": {"strategy": "single", "destination": format!("inventory.p{i:04}")},
                        "paused": true
                    }
                }))?;
                api.create(&PostParams::default(), &p).await?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let failures = created.iter().filter(|r| r.is_err()).count();
    let created_in = started.elapsed();
    let (cms, deps, svcs): (Api<ConfigMap>, Api<Deployment>, Api<Service>) = (
        Api::namespaced(client.clone(), &ns),
        Api::namespaced(client.clone(), &ns),
        Api::namespaced(client.clone(), &ns),
    );
    // Progress comes from one watch on the EventPublishers, and the children are counted (from
    // the API server's watch cache, metadata only) once every publisher has its status: an
    // earlier version listed all N publishers and their three kinds of children from etcd every
    // 500 ms, and those lists competed with the operator for the API server being measured.
    let mut peak_rss = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut settled: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    let mut watch = std::pin::pin!(
        watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects()
    );
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let reconciled_in = loop {
        tokio::select! {
            seen = watch.next() => {
                let p = seen.ok_or_else(|| anyhow::anyhow!("the EventPublisher watch ended"))??;
                let current = p
                    .status
                    .as_ref()
                    .is_some_and(|s| s.observed_generation == p.metadata.generation && s.workers.is_some());
                settled.insert(p.name_any(), current);
            }
            _ = tick.tick() => {
                peak_rss = peak_rss.max(proc_kib(pid, "VmRSS:").unwrap_or(0));
                let done = settled.values().filter(|d| **d).count();
                if done == n && count(&cms).await? >= n && count(&deps).await? >= n && count(&svcs).await? >= n {
                    break started.elapsed();
                }
                if Instant::now() > deadline {
                    anyhow::bail!("only {done}/{n} reconciled after 600 s");
                }
            }
        }
    };
    let hwm = proc_kib(pid, "VmHWM:").unwrap_or(0);
    let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
    let requests_after = api_requests().await;
    let reconciles = operator_metric(port, "outbox_operator_reconciliations_total{kind=\"EventPublisher\"}").await;
    println!(
        "load average before {load_before}, after {}; operator CPU {cpu:.1} s; reconciles {reconciles:?} ({:.2} per publisher)",
        load_average(),
        reconciles.unwrap_or(0.0) / n as f64
    );
    println!("API server requests during the run (whole server), by verb and resource:");
    for (key, after) in &requests_after {
        let delta = after - requests_before.get(key).copied().unwrap_or(0.0);
        if delta >= 1.0 {
            println!(
                "  {:>8} {:<22} {delta:>8.0} ({:.2} per publisher)",
                key.0,
                key.1,
                delta / n as f64
            );
        }
    }
    println!(
        "{n} EventPublishers ({failures} create failures): created in {:.1} s, all reconciled in {:.1} s; \
         operator RSS peak {:.1} MiB (VmHWM {:.1} MiB)",
        created_in.as_secs_f64(),
        reconciled_in.as_secs_f64(),
        peak_rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    // Deleting the namespace needs the operator to release the finalizers (Retain: at once).
    let deleting = Instant::now();
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while count(&api).await.unwrap_or(0) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let held = count(&api).await.unwrap_or(0);
    if held == 0 {
        println!(
            "finalizers of all {n} released {:.1} s after the namespace deletion",
            deleting.elapsed().as_secs_f64()
        );
    } else {
        // Let the rest go: once this operator stops nobody would, and a namespace stuck in
        // Terminating with them keeps the API server busy for every later run.
        println!(
            "{held} of {n} finalizers still held {:.1} s after the namespace deletion; releasing them",
            deleting.elapsed().as_secs_f64()
        );
        let release = Patch::Merge(json!({"metadata": {"finalizers": null}}));
        for publisher in api.list_metadata(&ListParams::default().match_any()).await?.items {
            // One the operator released meanwhile is gone (404): go on with the rest.
            match api
                .patch_metadata(&publisher.name_any(), &PatchParams::default(), &release)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(15), operator.wait()).await;
    Ok(())
}
