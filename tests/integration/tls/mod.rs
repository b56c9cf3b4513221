//! Production connectivity against the local stack's TLS listeners (`hack/components/tls.sh`
//! and the Kafka, RabbitMQ, PostgreSQL and moto TLS instances): the relay binary publishes over
//! Kafka SASL_SSL and mTLS, RabbitMQ amqps and SNS/SQS over HTTPS while reading PostgreSQL over
//! verify-full, and each broken setting (wrong password, untrusted CA, host name mismatch,
//! expired certificate) gives one clear error naming the endpoint and the cause, keeps the
//! relay unready without crashing, never shows the secret, and loses nothing once fixed.

mod kafka;
mod postgres;
mod rabbitmq;
mod sns_sqs;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use inventory_outbox::event::DomainEvent;
use inventory_outbox::publisher::InventoryEventPublisher;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::support::postgres::TestDatabase;
use crate::support::{database_url, unique_name};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn state_dir() -> PathBuf {
    std::env::var("OUTBOX_STATE").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".local/state/inventory-outbox")
    })
}

/// The local CA's directory (`hack/components/tls.sh`).
pub fn tls_dir() -> PathBuf {
    std::env::var("OUTBOX_TLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| state_dir().join("tls"))
}

/// A file of the local CA's directory, which must exist (`make env-up` makes it).
pub fn tls_file(name: &str) -> PathBuf {
    let path = tls_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `make env-up` (hack/components/tls.sh makes it)",
        path.display()
    );
    path
}

/// The test database's URL without any TLS parameter: `outbox.tls` adds them.
pub fn test_database_url(db: &TestDatabase) -> String {
    match database_url().rsplit_once('/') {
        Some((base, _)) => format!("{base}/{}", db.name),
        None => panic!("DATABASE_URL has no database part"),
    }
}

/// `outbox.tls` for the local PostgreSQL: verify-full against the local CA.
pub fn postgres_verify_full() -> Value {
    json!({"mode": "verifyFull", "caFile": tls_file("ca.crt")})
}

/// A relay configuration document for the binary: `broker` is the value of `broker:`, the
/// outbox is read over `outbox_tls`, and everything else is fast for tests.
pub fn relay_document(publisher: &str, broker: Value, routing: Value, outbox_tls: Value, dir: &Path) -> Value {
    let token = dir.join("admin-token");
    std::fs::write(&token, "tls-test-admin-token-0123456789\n").expect("admin token file");
    json!({
        "publisher": publisher,
        "outbox": {"databaseUrlEnv": "DATABASE_URL", "migrate": false, "batchSize": 200, "tls": outbox_tls},
        "broker": broker,
        "routing": routing,
        "retry": {"initialIntervalMs": 200, "maxIntervalMs": 2000, "maxAttempts": 1000, "jitter": 0.1},
        "circuitBreaker": {"failureThreshold": 5, "openDurationMs": 2000},
        "workers": {"heartbeatIntervalMs": 500, "leaseDurationMs": 2000},
        "http": {"listen": format!("127.0.0.1:{}", free_port()), "adminTokenFile": token},
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A scratch directory for one test's config, secret files and logs.
pub fn scratch_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name(prefix));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Writes a one-value secret file (with the trailing newline `kubectl create secret` leaves).
pub fn secret_file(dir: &Path, name: &str, value: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).expect("secret file");
    path
}

/// `inventory-outbox relay` as a child process, its output in a log file.
pub struct RelayProcess {
    child: Child,
    pub base: String,
    pub log: PathBuf,
    http: reqwest::Client,
}

impl RelayProcess {
    /// Starts the relay binary with `document` (written next to the logs in `dir`).
    pub fn start(document: &Value, db_url: &str, dir: &Path, name: &str) -> Self {
        inventory_outbox::tls::install_crypto_provider();
        let config = dir.join(format!("{name}.json"));
        std::fs::write(&config, serde_json::to_vec_pretty(document).expect("json")).expect("config file");
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_inventory-outbox"))
            .args(["--log-format", "json", "relay", "--worker-id", name, "--config"])
            .arg(&config)
            .env("DATABASE_URL", db_url)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn inventory-outbox relay");
        let listen = document["http"]["listen"].as_str().expect("listen").to_owned();
        Self {
            child,
            base: format!("http://{listen}"),
            log,
            http: reqwest::Client::new(),
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the logs when the process has exited.
    fn assert_running(&mut self, while_doing: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "the relay exited ({status}) while {while_doing}; its log:\n{}",
                self.logs()
            );
        }
    }

    /// The `/readyz` status and body, or None while the server is not up.
    pub async fn readyz(&self) -> Option<(u16, String)> {
        let response = self.http.get(format!("{}/readyz", self.base)).send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.unwrap_or_default()))
    }

    /// Whether `/livez` answers 200.
    pub async fn livez_ok(&self) -> bool {
        match self.http.get(format!("{}/livez", self.base)).send().await {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        }
    }

    pub async fn get_text(&self, path: &str) -> String {
        match self.http.get(format!("{}{path}", self.base)).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => format!("GET {path} failed: {e}"),
        }
    }

    /// The admin API's failed-events listing (authenticated).
    pub async fn failed_events(&self) -> String {
        match self
            .http
            .get(format!("{}/api/v1/failed-events", self.base))
            .bearer_auth("tls-test-admin-token-0123456789")
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => format!("GET failed-events failed: {e}"),
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.assert_running("waiting for readiness");
            let answer = self.readyz().await;
            if matches!(answer, Some((200, _))) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay was not ready within {timeout:?}; /readyz: {answer:?}; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `/readyz` answers 503 with a body for which `explains` holds, and returns
    /// that body. The process must stay up all along.
    pub async fn wait_unready_because(&mut self, timeout: Duration, explains: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.assert_running("waiting for the unready reason");
            let answer = self.readyz().await;
            if let Some((503, body)) = &answer
                && explains(body)
            {
                return body.clone();
            }
            assert!(
                !matches!(answer, Some((200, _))),
                "the relay became ready with a broken setting; log:\n{}",
                self.logs()
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "no explaining unready reason within {timeout:?}; last /readyz: {answer:?}; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stays up (and unready) for `period`: no crash loop.
    pub async fn stays_up_unready(&mut self, period: Duration) {
        let until = tokio::time::Instant::now() + period;
        while tokio::time::Instant::now() < until {
            self.assert_running("it should stay up, unready");
            if let Some((200, _)) = self.readyz().await {
                panic!("the relay became ready with a broken setting; log:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn kill(mut self) -> String {
        let _ = self.child.kill().await;
        self.logs()
    }
}

/// Asserts `secret` appears in none of `places` (name, text).
pub fn assert_secret_absent(secret: &str, places: &[(&str, &str)]) {
    for (name, text) in places {
        assert!(!text.contains(secret), "the secret appears in {name}:\n{text}");
    }
}

/// Everything the relay exposes about itself: logs, metrics, readiness, failed events, and
/// its rows in PostgreSQL (heartbeats, cursors, failed events) as text.
pub async fn exposed_state(relay: &RelayProcess, db: &TestDatabase) -> Vec<(&'static str, String)> {
    let rows = |table: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!(
                "SELECT coalesce(json_agg(t)::text, '') FROM outbox.{table} t"
            )))
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| format!("read {table}: {e}"))
        }
    };
    vec![
        ("logs", relay.logs()),
        ("/metrics", relay.get_text("/metrics").await),
        ("/readyz", relay.get_text("/readyz").await),
        ("failed events API", relay.failed_events().await),
        ("worker_heartbeats", rows("worker_heartbeats").await),
        ("failed_events", rows("failed_events").await),
        ("relay_cursors", rows("relay_cursors").await),
    ]
}

/// Commits `count` events over `aggregates` aggregates (few writers: these tests are about
/// connections, the steady-state tests cover volume).
pub async fn write(publisher: &InventoryEventPublisher, db: &TestDatabase, count: usize) -> Vec<DomainEvent> {
    crate::relay::write_events(publisher, db, 4, count / 4, 20).await
}

#[test]
fn the_tls_example_configs_are_valid_relay_configs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/relay");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/relay") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.contains("tls") && name.ends_with(".yaml") {
            if let Err(e) = inventory_outbox::relay::config::RelayConfig::load(&path) {
                panic!("{name}: {e}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "the three TLS examples");
}
