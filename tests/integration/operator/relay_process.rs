//! The binary's `provision` and `relay` subcommands as the operator runs them in a Pod: the
//! database URL comes from a mounted-Secret file, provision reports what it created in its
//! termination-message file, the relay serves `/api/v1/status` with figures that match the
//! database, and a changed Secret file stops the relay so its container restarts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::relay::status::RelayStatus;
use inventory_outbox::store::{SchemaName, Store};
use serde_json::json;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::event_core::stock_changed;
use crate::support::postgres::TestDatabase;
use crate::support::{database_url, kafka_bootstrap, unique_name};

const BIN: &str = env!("CARGO_BIN_EXE_inventory-outbox");

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name("relay-process"));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn command(dir: &Path, args: &[&str], log: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        // The URL must come from the secret file, not from the test's environment.
        .env_remove("DATABASE_URL")
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::from(
            std::fs::File::create(dir.join(format!("{log}.out"))).expect("log file"),
        ))
        .stderr(Stdio::from(
            std::fs::File::create(dir.join(format!("{log}.err"))).expect("log file"),
        ))
        .kill_on_drop(true);
    cmd
}

fn logs(dir: &Path, log: &str) -> String {
    let read = |ext: &str| std::fs::read_to_string(dir.join(format!("{log}.{ext}"))).unwrap_or_default();
    format!(
        "--- {log} stdout ---\n{}\n--- {log} stderr ---\n{}",
        read("out"),
        read("err")
    )
}

async fn wait_exit(child: &mut Child, within: Duration, what: &str, dir: &Path, log: &str) -> std::process::ExitStatus {
    match tokio::time::timeout(within, child.wait()).await {
        Ok(status) => status.expect("wait for child"),
        Err(_) => panic!("{what} did not exit within {within:?}\n{}", logs(dir, log)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_then_relay_from_secret_files_serves_status_matching_the_database_and_restarts_on_rotation() {
    let db = TestDatabase::create("relay_process").await;
    let base = database_url();
    let (server, _) = base.rsplit_once('/').expect("DATABASE_URL has a database part");
    let url = format!("{server}/{}", db.name);
    let dir = scratch_dir();
    let secret = dir.join("database-url");
    std::fs::write(&secret, format!("{url}\n")).expect("write secret file");
    let topic = unique_name("relay-process");
    let port = free_port();
    let config = json!({
        "publisher": "relay-process",
        "outbox": {"databaseUrlEnv": "DATABASE_URL", "migrate": false},
        "broker": {"kafka": {"bootstrapServers": kafka_bootstrap(), "deadLetterTopic": format!("{topic}.dlq"), "partitions": 2}},
        "routing": {"strategy": "single", "destination": topic},
        "workers": {"heartbeatIntervalMs": 300, "leaseDurationMs": 3000},
        "http": {"listen": format!("127.0.0.1:{port}")},
    });
    let config_path = dir.join("relay.json");
    std::fs::write(&config_path, config.to_string()).expect("write config");
    let secret_arg = format!("DATABASE_URL={}", secret.display());
    let report_path = dir.join("termination-log");

    // provision: migrates the empty database and creates the topics, reporting them.
    let mut provision = command(
        &dir,
        &[
            "provision",
            "--config",
            &config_path.to_string_lossy(),
            "--secret-env",
            &secret_arg,
            "--report-file",
            &report_path.to_string_lossy(),
        ],
        "provision",
    )
    .spawn()
    .expect("start provision");
    let status = wait_exit(&mut provision, Duration::from_secs(60), "provision", &dir, "provision").await;
    assert!(
        status.success(),
        "provision failed: {status}\n{}",
        logs(&dir, "provision")
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).expect("report file")).expect("report JSON");
    assert_eq!(report["outcome"], "provisioned", "{report}");
    let created: Vec<&str> = report["report"]["created"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        created.contains(&topic.as_str()) && created.contains(&format!("{topic}.dlq").as_str()),
        "{report}"
    );

    // Events committed before the relay starts.
    let store = Store::from_pool(db.pool.clone(), SchemaName::default());
    let publisher = InventoryEventPublisher::setup(store, PublisherConfig::default())
        .await
        .expect("publisher on the provisioned schema");
    for i in 1..=20 {
        let mut tx = db.pool.begin().await.expect("begin");
        publisher
            .publish_event(&mut tx, stock_changed(Uuid::now_v7(), i))
            .await
            .expect("publish");
        tx.commit().await.expect("commit");
    }

    let mut relay = command(
        &dir,
        &[
            "relay",
            "--config",
            &config_path.to_string_lossy(),
            "--secret-env",
            &secret_arg,
            "--secret-check-interval-ms",
            "200",
            "--worker-id",
            "relay-process-0",
        ],
        "relay",
    )
    .spawn()
    .expect("start relay");

    inventory_outbox::tls::install_crypto_provider();
    let http = reqwest::Client::new();
    let status_url = format!("http://127.0.0.1:{port}/api/v1/status");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let answer = match http.get(&status_url).send().await {
            Ok(r) if r.status().is_success() => r.json::<RelayStatus>().await.ok(),
            _ => None,
        };
        if let Some(s) = &answer
            && s.pending_events == 0
            && s.published_total >= 20
            && s.live_workers == 1
            // publishedTotal comes from the store at once, the last publish time with the
            // relay's next heartbeat.
            && s.last_published_time.is_some()
        {
            break answer.expect("status");
        }
        if let Ok(Some(exit)) = relay.try_wait() {
            panic!("relay exited early: {exit}\n{}", logs(&dir, "relay"));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay status did not show 20 published events within 60 s; last answer: {answer:?}\n{}",
            logs(&dir, "relay")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.events")
        .fetch_one(&db.pool)
        .await
        .expect("count events");
    assert_eq!(stored, 20);
    assert_eq!(status.published_total, stored, "{status:?}");
    assert_eq!(status.failed_event_count, 0, "{status:?}");
    assert_eq!(status.dead_lettered_count, 0, "{status:?}");
    assert_eq!(status.circuit_state, "closed", "{status:?}");
    assert_eq!(status.worker_id, "relay-process-0", "{status:?}");
    assert!(status.last_published_time.is_some(), "{status:?}");
    assert!(
        status
            .circuits
            .iter()
            .all(|c| c.destination == topic && c.state == "closed"),
        "{status:?}"
    );
    let body = http
        .get(&status_url)
        .send()
        .await
        .expect("status")
        .text()
        .await
        .expect("body");
    assert!(
        !body.contains("postgres://"),
        "the status never carries the database URL: {body}"
    );

    // Rotate the Secret: same database, new content. The relay stops by itself.
    std::fs::write(&secret, format!("{url}?application_name=rotated\n")).expect("rotate secret file");
    let exit = wait_exit(
        &mut relay,
        Duration::from_secs(20),
        "relay after the secret rotation",
        &dir,
        "relay",
    )
    .await;
    assert!(
        exit.success(),
        "relay stops cleanly on a rotation: {exit}\n{}",
        logs(&dir, "relay")
    );
    assert!(
        logs(&dir, "relay").contains("a mounted secret changed"),
        "the relay says why it stopped\n{}",
        logs(&dir, "relay")
    );
    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}
