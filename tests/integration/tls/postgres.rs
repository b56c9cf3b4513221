//! PostgreSQL over TLS: `outbox.tls` on top of the URL, verify-full against the local CA, and
//! every way the connection can be refused (untrusted CA, wrong password, expired certificate,
//! host name mismatch) keeping the relay up and unready until someone fixes it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use inventory_outbox::publisher::{InventoryEventPublisher, PublisherConfig};
use inventory_outbox::store::{PostgresTls, SchemaName, Store};
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::PgPoolOptions;

use super::{
    RelayProcess, assert_secret_absent, env_or, exposed_state, relay_document, scratch_dir, test_database_url,
    tls_file, write,
};
use crate::relay::assert_delivered;
use crate::support::postgres::TestDatabase;
use crate::support::unique_name;

/// Every session on `db` but the checking one is encrypted (the relay's and the test pool's).
pub async fn assert_only_tls_sessions(db: &TestDatabase) {
    let url = format!("{}?sslmode=disable", test_database_url(db));
    let mut check = sqlx::PgConnection::connect(&url).await.expect("plain check connection");
    let plain: Vec<(i32, Option<String>)> = sqlx::query_as(
        "SELECT a.pid, a.application_name FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
          WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND NOT s.ssl",
    )
    .fetch_all(&mut check)
    .await
    .expect("read pg_stat_ssl");
    assert!(plain.is_empty(), "unencrypted sessions on {}: {plain:?}", db.name);
    let _ = check.close().await;
}

/// A plaintext Kafka (the TLS node's own listener) as the relay's broker: these tests are
/// about the database side.
fn plain_kafka(topic: &str) -> Value {
    json!({"kafka": {
        "bootstrapServers": super::kafka::tls_node_plaintext(), "deadLetterTopic": format!("{topic}-dlq"),
        "partitions": 3, "mode": "structured",
    }})
}

fn single(topic: &str) -> Value {
    json!({"strategy": "single", "destination": topic})
}

/// The relay's error lines about connecting to PostgreSQL.
fn connect_errors(logs: &str) -> Vec<&str> {
    logs.lines()
        .filter(|l| l.contains("connect to PostgreSQL at") && l.contains("ERROR"))
        .collect()
}

#[tokio::test]
async fn the_store_connects_over_verify_full_with_a_ca_file_on_top_of_a_plain_url() {
    let db = TestDatabase::create("tls_pg_store").await;
    let tls = PostgresTls {
        ca_file: Some(tls_file("ca.crt")),
        ..PostgresTls::default()
    };
    let store = Store::connect_with_tls(&test_database_url(&db), Some(&tls), SchemaName::default(), 2)
        .await
        .expect("verify-full connect");
    let (ssl, version): (bool, Option<String>) =
        sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(store.pool())
            .await
            .expect("pg_stat_ssl");
    assert!(ssl, "the store's session is encrypted ({version:?})");

    // The URL alone can carry the same settings (libpq parameters), as a Secret's URL may.
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        test_database_url(&db),
        tls_file("ca.crt").display()
    );
    let by_url = Store::connect(&url, SchemaName::default(), 2)
        .await
        .expect("URL parameters");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(by_url.pool())
        .await
        .expect("pg_stat_ssl");
    assert!(ssl);
    store.pool().close().await;
    by_url.pool().close().await;
    db.drop().await;
}

#[tokio::test]
async fn an_untrusted_ca_fails_the_store_connect_naming_the_endpoint_and_the_cause() {
    let db = TestDatabase::create("tls_pg_untrusted").await;
    let tls = PostgresTls {
        ca_file: Some(tls_file("other-ca.crt")),
        ..PostgresTls::default()
    };
    // The URL asks for no verification at all; outbox.tls wins.
    let url = format!("{}?sslmode=disable", test_database_url(&db));
    let error = Store::connect_with_tls(&url, Some(&tls), SchemaName::default(), 2)
        .await
        .expect_err("a server certificate from another CA is refused")
        .to_string();
    assert!(error.contains(&format!("127.0.0.1:15432/{}", db.name)), "{error}");
    assert!(error.contains("verify-full"), "{error}");
    assert!(error.contains("unknown issuer"), "{error}");
    assert!(error.contains("other-ca.crt"), "names the CA file it trusted: {error}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untrusted_postgres_ca_keeps_the_relay_unready_until_the_ca_file_is_fixed_and_loses_nothing() {
    let (db, publisher) = crate::event_core::publisher("tls_pg_relay_ca").await;
    let dir = scratch_dir("tls-pg-relay-ca");
    let topic = unique_name("tls-pg-ca");
    // The mounted CA file holds the wrong CA at first; fixing the Secret rewrites it in place.
    let ca_file = dir.join("postgres-ca.crt");
    std::fs::copy(tls_file("other-ca.crt"), &ca_file).expect("copy the CA file");
    let outbox_tls = json!({"caFile": ca_file});
    let doc = relay_document("pg-untrusted", plain_kafka(&topic), single(&topic), outbox_tls, &dir);
    let mut relay = RelayProcess::start(&doc, &test_database_url(&db), &dir, "pg-untrusted");
    let sent = write(&publisher, &db, 100).await;
    let endpoint = format!("127.0.0.1:15432/{}", db.name);
    let reason = relay
        .wait_unready_because(Duration::from_secs(60), |body| {
            body.contains(&endpoint) && body.contains("unknown issuer")
        })
        .await;
    eprintln!("untrusted CA: /readyz says: {reason:?}");
    relay.stays_up_unready(Duration::from_secs(3)).await;
    assert!(relay.livez_ok().await, "alive while it waits for the database");
    let logs = relay.logs();
    assert_eq!(
        connect_errors(&logs).len(),
        1,
        "one error line, not one per retry:\n{logs}"
    );
    assert!(
        !logs.contains("outbox:outbox@"),
        "the URL's credentials never show:\n{logs}"
    );

    std::fs::copy(tls_file("ca.crt"), &ca_file).expect("fix the CA file");
    relay.wait_ready(Duration::from_secs(60)).await;
    assert_only_tls_sessions(&db).await;
    let received = super::kafka::consume(&topic, sent.len()).await;
    assert_delivered(&sent, &received, true);
    relay.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}

/// The known wrong password the secret grep looks for.
const WRONG_PASSWORD: &str = "wrong-Pg-pa55word-91d2e7";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_postgres_password_keeps_the_relay_unready_naming_the_endpoint_and_shows_no_secret() {
    let (db, publisher) = crate::event_core::publisher("tls_pg_password").await;
    let dir = scratch_dir("tls-pg-password");
    let topic = unique_name("tls-pg-password");
    let right = test_database_url(&db);
    let wrong = right.replacen("outbox:outbox@", &format!("outbox:{WRONG_PASSWORD}@"), 1);
    assert_ne!(wrong, right, "DATABASE_URL carries the password to replace: {right}");
    let doc = relay_document(
        "pg-password",
        plain_kafka(&topic),
        single(&topic),
        super::postgres_verify_full(),
        &dir,
    );
    let mut relay = RelayProcess::start(&doc, &wrong, &dir, "pg-password-broken");
    let sent = write(&publisher, &db, 100).await;
    let endpoint = format!("127.0.0.1:15432/{}", db.name);
    let reason = relay
        .wait_unready_because(Duration::from_secs(60), |body| {
            body.contains(&endpoint) && body.contains("password authentication failed")
        })
        .await;
    eprintln!("wrong password: /readyz says: {reason:?}");
    relay.stays_up_unready(Duration::from_secs(3)).await;
    let state = exposed_state(&relay, &db).await;
    let mut places: Vec<(&str, &str)> = state.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let livez = relay.get_text("/livez").await;
    places.push(("/livez", &livez));
    assert_secret_absent(WRONG_PASSWORD, &places);
    let logs = relay.kill().await;
    assert_eq!(
        connect_errors(&logs).len(),
        1,
        "one error line, not one per retry:\n{logs}"
    );

    // The Secret is fixed: the relay restarts (secret_watch) with the right URL.
    let mut relay = RelayProcess::start(&doc, &right, &dir, "pg-password-fixed");
    relay.wait_ready(Duration::from_secs(60)).await;
    let received = super::kafka::consume(&topic, sent.len()).await;
    assert_delivered(&sent, &received, true);
    relay.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}

/// One of the dedicated PostgreSQL clusters whose certificate is broken
/// (`hack/components/postgres.sh`: `expired`, `wronghost`), owned by one test: it switches the
/// server to the valid certificate (the operator's fix) and back.
struct BrokenServer {
    /// Admin URL (the cluster's `outbox` database, unencrypted).
    admin_url: String,
    /// `127.0.0.1:port`.
    address: String,
    /// The directory with the cluster's certificates (`server.crt` is the valid one).
    cert_dir: PathBuf,
}

impl BrokenServer {
    async fn open(url_env: &str, port: u16) -> Self {
        let base = env_or(url_env, &format!("postgres://outbox:outbox@127.0.0.1:{port}/outbox"));
        let admin_url = format!("{base}?sslmode=disable");
        let address = base
            .split('@')
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("host:port in the URL")
            .to_owned();
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!("connect to {admin_url}: {e} (run `make env-up`: hack/components/postgres.sh starts it)")
        });
        let server = Self {
            admin_url,
            address,
            cert_dir: PathBuf::new(),
        };
        // A run that died half-way may have left the valid certificate in place.
        server.present(&mut admin, None).await;
        let cert: String = sqlx::query_scalar("SHOW ssl_cert_file")
            .fetch_one(&mut admin)
            .await
            .expect("ssl_cert_file");
        let _ = admin.close().await;
        Self {
            cert_dir: Path::new(&cert).parent().expect("certificate directory").to_owned(),
            ..server
        }
    }

    /// The cluster's own (broken) certificate when `valid` is None, else `valid` (a directory
    /// holding server.crt and server.key), then a reload.
    async fn present(&self, admin: &mut sqlx::PgConnection, valid: Option<&Path>) {
        let statements = match valid {
            None => vec![
                "ALTER SYSTEM RESET ssl_cert_file".to_owned(),
                "ALTER SYSTEM RESET ssl_key_file".to_owned(),
            ],
            Some(dir) => {
                let dir = dir.display().to_string();
                assert!(!dir.contains('\''), "{dir}");
                vec![
                    format!("ALTER SYSTEM SET ssl_cert_file = '{dir}/server.crt'"),
                    format!("ALTER SYSTEM SET ssl_key_file = '{dir}/server.key'"),
                ]
            }
        };
        for statement in statements.into_iter().chain(["SELECT pg_reload_conf()".to_owned()]) {
            sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
                .execute(&mut *admin)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
    }

    async fn admin(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.admin_url)
            .await
            .expect("admin connection")
    }

    /// A verify-full connect against the local CA, as the relay makes it.
    async fn verify_full(&self, database: &str) -> Result<(), String> {
        let url = format!("postgres://outbox:outbox@{}/{database}", self.address);
        let tls = PostgresTls {
            ca_file: Some(tls_file("ca.crt")),
            ..PostgresTls::default()
        };
        match Store::connect_with_tls(&url, Some(&tls), SchemaName::default(), 1).await {
            Ok(store) => {
                store.pool().close().await;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Waits until a verify-full connect succeeds (`true`) or fails (`false`): a reload takes
    /// effect for new connections shortly after `pg_reload_conf()`.
    async fn wait_verify_full(&self, database: &str, succeeds: bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let outcome = self.verify_full(database).await;
            if outcome.is_ok() == succeeds {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "verify-full to {} still {outcome:?} after the reload",
                self.address
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A fresh database on this cluster with the outbox set up, and its publisher.
    async fn database(&self, prefix: &str) -> (TestDatabase, InventoryEventPublisher) {
        let name = unique_name(prefix).replace('-', "_");
        let mut admin = self.admin().await;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create database");
        let _ = admin.close().await;
        let url = format!("postgres://outbox:outbox@{}/{name}?sslmode=disable", self.address);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("pool");
        let publisher = InventoryEventPublisher::setup(
            Store::from_pool(pool.clone(), SchemaName::default()),
            PublisherConfig::default(),
        )
        .await
        .expect("set up publisher");
        (TestDatabase { name, pool }, publisher)
    }

    /// Puts the broken certificate back and drops `db` (not `TestDatabase::drop`: that one
    /// talks to the main cluster).
    async fn finish(&self, db: TestDatabase) {
        db.pool.close().await;
        let mut admin = self.admin().await;
        self.present(&mut admin, None).await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            db.name
        )))
        .execute(&mut admin)
        .await
        .expect("drop database");
        let _ = admin.close().await;
    }
}

/// The relay reads a cluster whose certificate is broken: it stays up and unready with one
/// error naming the endpoint and `cause`, and once the server presents a valid certificate it
/// connects on its own (no restart) and delivers every event written meanwhile.
async fn broken_server_then_renewed(name: &str, url_env: &str, port: u16, cause: &str) {
    let server = BrokenServer::open(url_env, port).await;
    let (db, publisher) = server.database(&format!("tls_pg_{name}")).await;
    server.wait_verify_full(&db.name, false).await;
    let dir = scratch_dir(&format!("tls-pg-{name}"));
    let topic = unique_name(&format!("tls-pg-{name}"));
    let url = format!("postgres://outbox:outbox@{}/{}", server.address, db.name);
    let doc = relay_document(
        &format!("pg-{name}"),
        plain_kafka(&topic),
        single(&topic),
        super::postgres_verify_full(),
        &dir,
    );
    let mut relay = RelayProcess::start(&doc, &url, &dir, &format!("pg-{name}"));
    let sent = write(&publisher, &db, 100).await;
    let endpoint = format!("{}/{}", server.address, db.name);
    let reason = relay
        .wait_unready_because(Duration::from_secs(60), |body| {
            body.contains(&endpoint) && body.contains(cause)
        })
        .await;
    eprintln!("{name}: /readyz says: {reason:?}");
    assert!(reason.lines().count() <= 2, "{reason}");
    relay.stays_up_unready(Duration::from_secs(3)).await;
    assert!(relay.livez_ok().await, "alive while it waits for the database");
    let logs = relay.logs();
    assert_eq!(
        connect_errors(&logs).len(),
        1,
        "one error line, not one per retry:\n{logs}"
    );
    assert!(
        connect_errors(&logs)[0].contains(&endpoint) && connect_errors(&logs)[0].contains(cause),
        "{logs}"
    );

    let mut admin = server.admin().await;
    let cert_dir = server.cert_dir.clone();
    server.present(&mut admin, Some(&cert_dir)).await;
    let _ = admin.close().await;
    server.wait_verify_full(&db.name, true).await;
    relay.wait_ready(Duration::from_secs(60)).await;
    let received = super::kafka::consume(&topic, sent.len()).await;
    assert_delivered(&sent, &received, true);
    relay.kill().await;
    server.finish(db).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_postgres_certificate_keeps_the_relay_unready_until_the_server_renews_it_and_loses_nothing() {
    broken_server_then_renewed(
        "expired",
        "PG_EXPIRED_CERT_URL",
        15433,
        "the server's certificate has expired",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_host_name_mismatch_keeps_the_relay_unready_until_the_server_certificate_names_it_and_loses_nothing()
{
    broken_server_then_renewed("wronghost", "PG_WRONGHOST_CERT_URL", 15434, "host name mismatch").await;
}

/// `inventory-outbox provision` with `outbox_tls` on the test database; its exit status and
/// output.
async fn provision(db: &TestDatabase, outbox_tls: Value, dir: &Path, name: &str) -> (bool, String) {
    let topic = unique_name("tls-pg-provision");
    let doc = relay_document(name, plain_kafka(&topic), single(&topic), outbox_tls, dir);
    let config = dir.join(format!("{name}.json"));
    std::fs::write(&config, serde_json::to_vec_pretty(&doc).expect("json")).expect("config file");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_inventory-outbox"))
        .args(["--log-format", "json", "provision", "--config"])
        .arg(&config)
        .arg("--report-file")
        .arg(dir.join(format!("{name}.report")))
        .env("DATABASE_URL", test_database_url(db))
        .env("RUST_LOG", "info")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("provision finishes within 60 s")
        .expect("run provision");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provision_step_connects_with_outbox_tls_and_refuses_an_untrusted_server() {
    let db = TestDatabase::create("tls_pg_provision").await;
    let dir = scratch_dir("tls-pg-provision");
    // The URL says nothing about TLS (libpq `prefer`: encrypted, never verified); outbox.tls
    // must still be applied.
    let (ok, output) = provision(&db, json!({"caFile": tls_file("other-ca.crt")}), &dir, "untrusted").await;
    assert!(!ok, "provision accepted a server its CA file does not trust:\n{output}");
    assert!(
        output.contains(&format!("127.0.0.1:15432/{}", db.name)) && output.contains("unknown issuer"),
        "{output}"
    );
    let (ok, output) = provision(&db, super::postgres_verify_full(), &dir, "trusted").await;
    assert!(ok, "provision over verify-full failed:\n{output}");
    let events: Option<String> = sqlx::query_scalar("SELECT to_regclass('outbox.events')::text")
        .fetch_one(&db.pool)
        .await
        .expect("to_regclass");
    assert!(events.is_some(), "provision migrated the outbox");
    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}
