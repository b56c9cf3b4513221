//! `inventory-outbox registry` as a process: migrates, registers the built-in schemas, serves
//! the API on the given loopback address, and takes its admin token from a file.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::process::Command;

use crate::support::database_url;
use crate::support::postgres::TestDatabase;

#[tokio::test]
async fn the_registry_subcommand_migrates_and_serves_the_api_with_a_token_file() {
    inventory_outbox::tls::install_crypto_provider();
    let db = TestDatabase::create("registry_cmd").await;
    let url = match database_url().rsplit_once('/') {
        Some((base, _)) => format!("{base}/{}", db.name),
        None => panic!("DATABASE_URL has no database part"),
    };
    let dir = std::env::temp_dir().join(crate::support::unique_name("registry-cmd"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "subcommand-admin-token\n").expect("token file");
    // A free loopback port: bind, note it, release it for the child.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_inventory-outbox"))
        .args(["--log-format", "text", "registry", "--migrate", "--listen", &listen])
        .arg("--admin-token-file")
        .arg(&token_file)
        .env("DATABASE_URL", &url)
        // A few log lines: kept in the pipe and shown if the process dies early.
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn inventory-outbox registry");

    let http = reqwest::Client::new();
    let base = format!("http://{listen}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let subjects: Vec<Value> = loop {
        if let Ok(response) = http.get(format!("{base}/subjects")).send().await
            && let Ok(list) = response.json::<Vec<Value>>().await
            && list.len() == 15
        {
            break list;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let output = child.wait_with_output().await.expect("output");
            panic!(
                "the registry process exited early ({status}):\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the registry did not list the 15 built-in subjects within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(subjects.contains(&Value::from("AllocationCreated")), "{subjects:?}");

    let put = |token: Option<&str>| {
        let request = http
            .put(format!("{base}/config"))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(r#"{"compatibility": "FULL"}"#);
        match token {
            Some(token) => request.basic_auth("ops", Some(token)),
            None => request,
        }
        .send()
    };
    let refused = put(None).await.expect("put without token");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let accepted = put(Some("subcommand-admin-token")).await.expect("put with token");
    assert_eq!(accepted.status(), StatusCode::OK);
    let level: Value = http
        .get(format!("{base}/config"))
        .send()
        .await
        .expect("get config")
        .json()
        .await
        .expect("config JSON");
    assert_eq!(level["compatibilityLevel"], "FULL");

    child.kill().await.expect("stop the registry process");
    let _ = std::fs::remove_dir_all(&dir);
    db.drop().await;
}
