//! PostgreSQL over TLS: `outbox.tls` on top of the URL, verify-full against the local CA.

use std::time::Duration;

use inventory_outbox::store::{PostgresTls, SchemaName, Store};
use serde_json::json;
use sqlx::Connection;

use super::{RelayProcess, relay_document, scratch_dir, test_database_url, tls_file};
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
    assert!(
        error.to_lowercase().contains("unknownissuer") || error.contains("UnknownIssuer"),
        "{error}"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_relay_whose_postgres_ca_is_untrusted_exits_with_one_clear_error() {
    let db = TestDatabase::create("tls_pg_relay").await;
    let dir = scratch_dir("tls-pg-relay");
    let broker = json!({"kafka": {"bootstrapServers": "127.0.0.1:19098", "deadLetterTopic": unique_name("unused")}});
    let routing = json!({"strategy": "single", "destination": "unused"});
    let outbox_tls = json!({"caFile": tls_file("other-ca.crt")});
    let doc = relay_document("pg-untrusted", broker, routing, outbox_tls, &dir);
    let relay = RelayProcess::start(&doc, &test_database_url(&db), &dir, "pg-untrusted");
    let logs = relay.wait_exit(Duration::from_secs(60)).await;
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("connect to PostgreSQL at"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line naming the endpoint:\n{logs}");
    assert!(errors[0].contains(&format!("127.0.0.1:15432/{}", db.name)), "{logs}");
    assert!(errors[0].contains("UnknownIssuer"), "{logs}");
    assert!(
        !logs.contains("outbox:outbox@"),
        "the URL's credentials never show:\n{logs}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}
