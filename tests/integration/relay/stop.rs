//! A relay process stopped with SIGTERM closes its RabbitMQ connection with an AMQP close, so
//! the broker frees it at once and logs no "client unexpectedly closed TCP connection".

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tokio::time::{Instant, sleep};

use crate::broker::rabbitmq::{broker_log, connection_listed, logged_close};
use crate::support::postgres::TestDatabase;
use crate::support::{amqp_url, database_url, unique_name};

/// The `connection` field of the relay's "connected to RabbitMQ" log line.
fn connection_name_in(log: &str) -> Option<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "connected to RabbitMQ")
        .and_then(|l| l["connection"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn a_relay_stopped_with_sigterm_closes_its_rabbitmq_connection_cleanly() {
    let db = TestDatabase::create("relay_stop").await;
    let (base, _) = database_url()
        .rsplit_once('/')
        .map(|(b, d)| (b.to_owned(), d.to_owned()))
        .expect("DATABASE_URL has a database part");
    let exchange = unique_name("relay-stop");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = std::env::temp_dir();
    let config = dir.join(format!("{exchange}.yaml"));
    let doc = json!({
        "publisher": "relay-stop",
        "outbox": {"migrate": true, "batchSize": 100},
        "broker": {"rabbitmq": {"urlEnv": "AMQP_URL", "exchange": exchange}},
        "routing": {"strategy": "single", "destination": "inventory.stock"},
        "http": {"listen": format!("127.0.0.1:{port}")},
    });
    std::fs::write(&config, doc.to_string()).expect("write config");
    let log_path = dir.join(format!("{exchange}.log"));
    let out = std::fs::File::create(&log_path).expect("create log file");
    let err = out.try_clone().expect("log file handle");
    let mut child = Command::new(env!("CARGO_BIN_EXE_inventory-outbox"))
        .args(["--log-format", "json", "relay", "--config"])
        .arg(&config)
        .args(["--worker-id", "relay-stop-1"])
        .env("DATABASE_URL", format!("{base}/{}", db.name))
        .env("AMQP_URL", amqp_url())
        .env_remove("RELAY_CONFIG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn the relay binary");
    let relay_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(30);
    let name = loop {
        if let Some(name) = connection_name_in(&relay_log()) {
            break name;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the relay exited early ({status}):\n{}", relay_log());
        }
        assert!(
            Instant::now() < deadline,
            "the relay never connected to RabbitMQ:\n{}",
            relay_log()
        );
        sleep(Duration::from_millis(100)).await;
    };
    while !connection_listed(&name).await {
        assert!(
            Instant::now() < deadline,
            "connection {name} never listed by the management API"
        );
        sleep(Duration::from_millis(200)).await;
    }

    let pid = child.id().to_string();
    let signalled = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(signalled.success(), "SIGTERM to the relay failed");
    let stop_deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the relay") {
            break status;
        }
        if Instant::now() >= stop_deadline {
            let _ = child.kill();
            panic!("the relay did not exit within 15 s of SIGTERM:\n{}", relay_log());
        }
        sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "the relay exited with {status}:\n{}", relay_log());

    let clean = loop {
        match logged_close(&broker_log(), &name) {
            Some(clean) => break clean,
            None if Instant::now() < stop_deadline => sleep(Duration::from_millis(200)).await,
            None => panic!("the broker logged no close of {name} after the relay exited"),
        }
    };
    let log = broker_log();
    let context: Vec<&str> = log.lines().filter(|l| l.contains(&name)).map(str::trim).collect();
    assert!(clean, "the broker saw {name} end without an AMQP close: {context:#?}");
    assert!(
        !connection_listed(&name).await,
        "{name} still listed after the relay exited"
    );

    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&log_path);
    db.drop().await;
}
