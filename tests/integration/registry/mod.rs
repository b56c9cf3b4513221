//! The schema registry's Confluent-compatible REST API against the real PostgreSQL and Kafka:
//! REST and Rust decide compatibility alike over the shared case table, bad requests get
//! Confluent's error codes, the relay puts the registry's ids on the wire, and the stock
//! Confluent Python client (installed by `hack/confluent-python.sh`) talks to the API and
//! deserializes the relay's events.

mod errors;
mod python_client;
mod subcommand;
mod table;
mod wire_format;

#[path = "../../../src/schema/compatibility_cases.rs"]
mod cases;

use std::net::SocketAddr;
use std::sync::Arc;

use inventory_outbox::schema::api::{RegistryApiState, router, serve};
use inventory_outbox::schema::registry::SchemaRegistry;
use inventory_outbox::store::{SchemaName, Store};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

// The case table names the mode type through its parent module.
use inventory_outbox::schema::compatibility::CompatibilityMode;

use crate::support::postgres::TestDatabase;

/// The admin token of test servers.
pub const TOKEN: &str = "registry-test-admin-token";

/// A registry API server running in this process on a free loopback port.
pub struct RunningRegistry {
    pub url: String,
    pub registry: SchemaRegistry,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningRegistry {
    /// Serves the registry of `db` (already migrated).
    pub async fn start(db: &TestDatabase, protect_reads: bool) -> Self {
        inventory_outbox::tls::install_crypto_provider();
        let registry = SchemaRegistry::new(Store::from_pool(db.pool.clone(), SchemaName::default()));
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind registry listener");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let app = router(RegistryApiState {
            registry: registry.clone(),
            token: Arc::from(TOKEN),
            protect_reads,
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app, async move {
            let _ = stopped.await;
        }));
        Self {
            url,
            registry,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task,
        }
    }

    /// Sends a request (`token` as bearer when given) and returns status, content type and
    /// JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> (StatusCode, String, Value) {
        let mut request = self.http.request(method.clone(), format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(body.to_string());
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.expect("response body");
        let json =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path} answered non-JSON {text:?}: {e}"));
        (status, content_type, json)
    }

    /// A register / lookup / compatibility request body for `schema`.
    pub fn schema_body(schema: &Value) -> Value {
        serde_json::json!({"schemaType": "JSON", "schema": schema.to_string()})
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task
            .await
            .expect("registry task")
            .expect("registry served cleanly");
    }
}
