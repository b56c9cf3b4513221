//! The Kubernetes examples under `examples/` against the local cluster, so none can rot: every
//! manifest passes the API server's validation (OpenAPI and CEL, server-side dry run), and the
//! Kafka EventPublisher, reconciled by the controller with relay Pods on the node agent,
//! becomes Ready.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::api::Api;

use crate::chart::{NamespaceGuard, kubectl, repo_root, run, run_ok};
use crate::operator::install_crds;
use crate::support::cluster::{register_test_image, wait_for};
use crate::support::kube::{admin_client, create_namespace};
use crate::support::unique_name;
use inventory_outbox::crd::EventPublisher;
use inventory_outbox::operator::reconcile::{Settings, run as run_controller};

/// The example folders and the kinds each file must hold.
const FOLDERS: &[(&str, &[&str])] = &[
    ("kafka", &["Secret", "EventPublisher"]),
    ("rabbitmq", &["Secret", "EventPublisher"]),
    ("sns-sqs", &["Secret", "EventPublisher"]),
    ("replayjobs", &["ReplayJob"]),
];

fn manifests(folder: &str) -> Vec<PathBuf> {
    let dir = repo_root().join("examples").join(folder);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(repo_root()).unwrap_or(path).display().to_string()
}

#[tokio::test]
async fn every_example_manifest_passes_server_side_validation() {
    let client = admin_client().await;
    install_crds(&client).await;
    let ns = create_namespace(&client, "examples").await;
    let _ns_guard = NamespaceGuard(ns.clone());
    let mut failures = Vec::new();
    let mut replay_jobs = 0;
    for (folder, kinds) in FOLDERS {
        let files = manifests(folder);
        assert!(!files.is_empty(), "examples/{folder} holds manifests");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
            for kind in *kinds {
                if !text.lines().any(|l| l == format!("kind: {kind}")) {
                    failures.push(format!("{}: no {kind}", relative(&file)));
                }
            }
            let mut apply = kubectl();
            apply.args(["apply", "--dry-run=server", "-n", &ns, "-f"]).arg(&file);
            let out = run(apply, None);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let documents = text.lines().filter(|l| l.starts_with("kind: ")).count();
            let accepted = stdout.lines().filter(|l| l.ends_with("(server dry run)")).count();
            if !out.status.success() || accepted != documents {
                failures.push(format!(
                    "{}: {accepted} of {documents} objects accepted\n{stdout}{}",
                    relative(&file),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            replay_jobs += text.lines().filter(|l| *l == "kind: ReplayJob").count();
        }
    }
    assert!(failures.is_empty(), "examples refused:\n{}", failures.join("\n"));
    assert!(
        replay_jobs >= 4,
        "time window, one aggregate, dry run and redrive: {replay_jobs} ReplayJobs"
    );
}

/// The CEL rules and bounds hold for the examples' own shapes too: a broken copy of each
/// publisher example is refused, so the dry run above is not passing everything.
#[tokio::test]
async fn a_broken_copy_of_an_example_is_refused_with_the_rule_message() {
    let client = admin_client().await;
    install_crds(&client).await;
    let ns = create_namespace(&client, "examples-bad").await;
    let _ns_guard = NamespaceGuard(ns.clone());
    let cases = [
        (
            "kafka/publisher.yaml",
            "bootstrapServers: 127.0.0.1:19092",
            "bootstrapServers: not a host list",
            "bootstrapServers",
        ),
        (
            "rabbitmq/publisher.yaml",
            "exchange: inventory",
            "exchange: amq.inventory",
            "exchange",
        ),
        (
            "sns-sqs/publisher.yaml",
            "destination: inventory-dlq.fifo",
            "destination: inventory-dlq",
            ".fifo",
        ),
        (
            "replayjobs/dry-run.yaml",
            "to: {position: 100000}",
            "to: {position: 0}",
            "from.position must not be greater than to.position",
        ),
    ];
    let mut wrong = Vec::new();
    for (file, from, to, expected) in cases {
        let path = repo_root().join("examples").join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        assert!(text.contains(from), "examples/{file} contains {from:?}");
        let broken = text.replace(from, to);
        let mut apply = kubectl();
        apply.args(["apply", "--dry-run=server", "-n", &ns, "-f", "-"]);
        let out = run(apply, Some(broken.as_bytes()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains(expected) {
            wrong.push(format!(
                "examples/{file} with {to:?}: exit {}, stderr {stderr}",
                out.status
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The Kafka example as written, except for names private to this test (schema, topics), so
/// its relay shares nothing with the demo or other tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_example_becomes_ready_with_its_relay_running() {
    let client = admin_client().await;
    install_crds(&client).await;
    let ns = create_namespace(&client, "examples-kafka").await;
    let _ns_guard = NamespaceGuard(ns.clone());
    let image = register_test_image();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut settings = Settings {
        requeue_after: Duration::from_secs(2),
        ..Settings::default()
    };
    settings.build.image = image;
    let controller = tokio::spawn(run_controller(client.clone(), Some(ns.clone()), settings, async move {
        let _ = stopped.await;
    }));

    let schema = unique_name("ex").replace('-', "_");
    let topic = unique_name("examples.events");
    let path = repo_root().join("examples/kafka/publisher.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let ours = text
        .replace("schema: outbox", &format!("schema: {schema}"))
        .replace("inventory-events-dlq", &format!("{topic}.dlq"))
        .replace("inventory-events", &topic)
        .replace(
            "bootstrapServers: 127.0.0.1:19092",
            &format!("bootstrapServers: {}", crate::support::kafka_bootstrap()),
        );
    let mut apply = kubectl();
    apply.args(["apply", "-n", &ns, "-f", "-"]);
    run_ok(apply, Some(ours.as_bytes()), "apply the Kafka example");

    let publishers: Api<EventPublisher> = Api::namespaced(client.clone(), &ns);
    let ready = wait_for(
        &client,
        &ns,
        Duration::from_secs(180),
        "the Kafka example's EventPublisher Ready",
        async || {
            let p = publishers.get("inventory-kafka").await.ok()?;
            let status = p.status.clone()?;
            let ready = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if !ready {
                eprintln!("status: {}", serde_json::to_string(&status).unwrap_or_default());
            }
            ready.then_some(status)
        },
    )
    .await;
    assert_eq!(ready.circuit_state.as_deref(), Some("Closed"), "{ready:?}");
    assert_eq!(ready.broker.as_deref(), Some("kafka"));
    assert_eq!((ready.ready_workers, ready.desired_workers), (1, 1), "{ready:?}");
    eprintln!("Ready: {}", serde_json::to_string(&ready).unwrap_or_default());

    let _ = publishers.delete("inventory-kafka", &Default::default()).await;
    wait_for(
        &client,
        &ns,
        Duration::from_secs(60),
        "the Kafka example deleted (Retain releases at once)",
        async || {
            publishers
                .get_opt("inventory-kafka")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    let _ = stop.send(());
    let _ = controller.await;
}
