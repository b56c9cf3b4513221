//! The relay's admin HTTP API against the real PostgreSQL, driven through the real
//! `AdminClient` (and raw HTTP for requests the client would never send).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use inventory_outbox::admin::api::{AdminState, ApiError, FailedEventStatus, router, serve};
use inventory_outbox::admin::client::{AdminClient, AdminClientError, FailedEventRecord, ListFailedParams};
use inventory_outbox::delivery::health::HealthState;
use inventory_outbox::delivery::metrics::DeliveryMetrics;
use inventory_outbox::store::SchemaName;
use inventory_outbox::store::events::{EventRange, StoredEvent, read_range};
use inventory_outbox::store::failed::FailedEvents;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::event_core::{publisher, stock_changed};
use crate::support::postgres::TestDatabase;

const CONSUMER: &str = "orders-relay";
const TOKEN: &str = "test-admin-token-0123456789";

/// A running admin server over a database holding failed events of `CONSUMER`.
struct AdminServer {
    /// The test's own database, dropped by `stop`.
    db: TestDatabase,
    /// `http://127.0.0.1:<port>`.
    base: String,
    /// The real client, with the right token.
    client: AdminClient,
    /// A plain HTTP client for requests `AdminClient` would never send.
    http: reqwest::Client,
    /// The server's health flags, for the probe test to flip.
    health: Arc<HealthState>,
    /// Stored events in position order; `dead` of them are dead-lettered, the rest retrying.
    events: Vec<StoredEvent>,
    /// Ends the server.
    shutdown: oneshot::Sender<()>,
    /// The server task.
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl AdminServer {
    /// Publishes `dead + retrying` events (one aggregate each) and fails them for `CONSUMER`:
    /// every third one retrying until `retrying` are, the others dead-lettered. Another
    /// consumer gets failed rows too, which the API must never show.
    async fn start(prefix: &str, dead: usize, retrying: usize) -> Self {
        let (db, publisher) = publisher(prefix).await;
        let total = dead + retrying;
        let mut tx = db.pool.begin().await.expect("begin");
        publisher
            .publish_events(
                &mut tx,
                (0..total)
                    .map(|i| stock_changed(Uuid::now_v7(), i as i64 + 1))
                    .collect(),
            )
            .await
            .expect("publish events");
        tx.commit().await.expect("commit");
        let mut conn = db.pool.acquire().await.expect("connection");
        let events = read_range(&mut conn, &SchemaName::default(), &EventRange::default(), 10_000)
            .await
            .expect("read events");
        drop(conn);
        assert_eq!(events.len(), total);

        let failed = FailedEvents::new(publisher.store().clone());
        let later = Utc::now() + chrono::Duration::hours(1);
        let mut retrying_left = retrying;
        for (i, event) in events.iter().enumerate() {
            let remaining = total - i;
            let retry = retrying_left > 0 && (i % 3 == 2 || remaining <= retrying_left);
            if retry {
                retrying_left -= 1;
            }
            failed
                .record_attempt(CONSUMER, event, "boom", retry.then_some(later))
                .await
                .expect("record failed attempt");
            failed
                .record_attempt("other-relay", event, "elsewhere", None)
                .await
                .expect("record other consumer's failure");
        }

        let health = Arc::new(HealthState::new(Duration::from_secs(30), Duration::from_secs(60)));
        let state = AdminState {
            failed,
            consumer: CONSUMER.to_owned(),
            token: Arc::from(TOKEN),
            health: health.clone(),
            metrics: Arc::new(DeliveryMetrics::new(CONSUMER)),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("local address"));
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router(state), async {
            let _ = stop.await;
        }));
        inventory_outbox::tls::install_crypto_provider();
        Self {
            client: AdminClient::new(&base, TOKEN.to_owned()).expect("admin client"),
            http: reqwest::Client::new(),
            base,
            db,
            health,
            events,
            shutdown,
            server,
        }
    }

    /// The absolute URL of `path`.
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A raw authenticated GET of the failed-events list with `query`, answering (status, body).
    async fn raw_list(&self, query: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(&format!("/api/v1/failed-events?{query}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    /// A raw authenticated POST with a JSON body text, answering (status, body).
    async fn raw_post(&self, path: &str, body: &str) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    /// The failed event of `event`, as listed by the API.
    async fn listed(&self, event: &StoredEvent) -> FailedEventRecord {
        let page = self
            .client
            .list_failed(&ListFailedParams {
                aggregate_id: Some(event.event.aggregate_id.clone()),
                ..Default::default()
            })
            .await
            .expect("list one aggregate");
        assert_eq!(page.items.len(), 1, "{page:?}");
        page.items.into_iter().next().expect("one item")
    }

    /// Stops the server (waiting for it to drain) and drops the database.
    async fn stop(self) {
        let _ = self.shutdown.send(());
        self.server.await.expect("server task").expect("server ran");
        self.db.drop().await;
    }
}

/// Asserts `err` is an API error with `status` whose message contains `contains`.
fn assert_api_error(err: AdminClientError, status: u16, contains: &str) {
    match err {
        AdminClientError::Api {
            status: got, message, ..
        } => {
            assert_eq!(got, status, "{message}");
            assert!(message.contains(contains), "{message:?} should contain {contains:?}");
        }
        other => panic!("expected an API error {status}, got {other:?}"),
    }
}

#[tokio::test]
async fn listing_pages_through_every_failed_event_with_a_cursor() {
    let server = AdminServer::start("admin_pages", 18, 9).await;
    let mut params = ListFailedParams {
        limit: Some(10),
        ..Default::default()
    };
    let mut page_sizes = Vec::new();
    let mut items = Vec::new();
    loop {
        let page = server.client.list_failed(&params).await.expect("list page");
        page_sizes.push(page.items.len());
        items.extend(page.items);
        match page.next_cursor {
            Some(cursor) => params.cursor = Some(cursor),
            None => break,
        }
    }
    assert_eq!(page_sizes, vec![10, 10, 7]);
    assert!(
        items.iter().all(|f| f.consumer == CONSUMER),
        "another consumer's rows never show"
    );
    let unique: HashSet<Uuid> = items.iter().map(|f| f.event_id).collect();
    assert_eq!(unique.len(), 27, "no duplicates across pages");
    let positions: Vec<i64> = items.iter().map(|f| f.position).collect();
    assert_eq!(
        positions,
        server.events.iter().map(|e| e.position).collect::<Vec<_>>(),
        "every row, in position order"
    );
    let statuses = |status| items.iter().filter(|f| f.status == status).count();
    assert_eq!(
        (
            statuses(FailedEventStatus::DeadLettered),
            statuses(FailedEventStatus::Retrying)
        ),
        (18, 9)
    );

    // The client's own cursor-following gives the same rows.
    let all = server
        .client
        .list_all_failed(&ListFailedParams {
            limit: Some(10),
            ..Default::default()
        })
        .await
        .expect("list all pages");
    assert_eq!(all, items);
    server.stop().await;
}

#[tokio::test]
async fn listing_filters_by_status_event_type_aggregate_and_time() {
    let server = AdminServer::start("admin_filters", 6, 3).await;
    let list = |params: ListFailedParams| {
        let client = server.client.clone();
        async move { client.list_all_failed(&params).await.expect("list") }
    };
    let dead = list(ListFailedParams {
        statuses: vec![FailedEventStatus::DeadLettered],
        ..Default::default()
    })
    .await;
    assert_eq!(dead.len(), 6);
    assert!(dead.iter().all(|f| f.status == FailedEventStatus::DeadLettered));
    let retrying = list(ListFailedParams {
        statuses: vec![FailedEventStatus::Retrying],
        ..Default::default()
    })
    .await;
    assert_eq!(retrying.len(), 3);
    assert!(retrying.iter().all(|f| f.next_retry_at.is_some()));
    let both = list(ListFailedParams {
        statuses: vec![FailedEventStatus::Retrying, FailedEventStatus::DeadLettered],
        ..Default::default()
    })
    .await;
    assert_eq!(both.len(), 9);

    let event = &server.events[4];
    let one = list(ListFailedParams {
        aggregate_id: Some(event.event.aggregate_id.clone()),
        event_type: Some("StockLevelChanged".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(
        one.iter().map(|f| f.event_id).collect::<Vec<_>>(),
        vec![event.event.event_id]
    );
    assert_eq!(one[0].last_error.as_deref(), Some("boom"));
    let none = list(ListFailedParams {
        event_type: Some("InventoryReserved".into()),
        ..Default::default()
    })
    .await;
    assert!(none.is_empty());

    let now = Utc::now();
    let recent = list(ListFailedParams {
        failed_after: Some(now - chrono::Duration::hours(1)),
        failed_before: Some(now + chrono::Duration::hours(1)),
        ..Default::default()
    })
    .await;
    assert_eq!(recent.len(), 9);
    let future = list(ListFailedParams {
        failed_after: Some(now + chrono::Duration::hours(1)),
        ..Default::default()
    })
    .await;
    assert!(future.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn retrying_one_dead_lettered_event_makes_it_due_again() {
    let server = AdminServer::start("admin_retry", 2, 0).await;
    let event = &server.events[0];
    let result = server.client.retry(event.event.event_id).await.expect("retry");
    assert_eq!(result.event_id, event.event.event_id);
    assert_eq!(result.previous_status, FailedEventStatus::DeadLettered);
    assert_eq!(result.previous_attempts, 1);
    assert!(result.scheduled);

    let listed = server.listed(event).await;
    assert_eq!(listed.status, FailedEventStatus::Retrying);
    assert_eq!(listed.attempts, 0);
    assert!(listed.next_retry_at.is_some_and(|t| t <= Utc::now()), "{listed:?}");
    // The other event is untouched.
    assert_eq!(
        server.listed(&server.events[1]).await.status,
        FailedEventStatus::DeadLettered
    );
    server.stop().await;
}

#[tokio::test]
async fn retrying_many_reports_unknown_ids_as_not_found() {
    let server = AdminServer::start("admin_retry_many", 3, 0).await;
    let unknown = Uuid::now_v7();
    let ids = [
        server.events[0].event.event_id,
        unknown,
        server.events[2].event.event_id,
    ];
    let result = server.client.retry_many(&ids).await.expect("retry many");
    let retried: Vec<Uuid> = result.retried.iter().map(|r| r.event_id).collect();
    assert_eq!(retried, vec![ids[0], ids[2]]);
    assert_eq!(result.not_found, vec![unknown]);
    assert_eq!(
        server.listed(&server.events[0]).await.status,
        FailedEventStatus::Retrying
    );
    assert_eq!(
        server.listed(&server.events[1]).await.status,
        FailedEventStatus::DeadLettered
    );
    assert_eq!(
        server.listed(&server.events[2]).await.status,
        FailedEventStatus::Retrying
    );

    // Bodies the client would never send.
    let too_many: Vec<String> = (0..501).map(|_| Uuid::now_v7().to_string()).collect();
    for (body, contains) in [
        (json!({"eventIds": []}), "eventIds must list between 1 and 500 ids"),
        (
            json!({"eventIds": too_many}),
            "eventIds must list between 1 and 500 ids (got 501)",
        ),
        (json!({"eventIds": [ids[0], ids[0]]}), "more than once"),
        (json!({"eventIds": ["nope"]}), "eventIds[0] must be a UUID"),
        (json!({"eventIds": [ids[0]], "force": true}), "unknown field `force`"),
        (json!({"ids": [ids[0]]}), "unknown field `ids`"),
    ] {
        let (status, error) = server.raw_post("/api/v1/failed-events/retry", &body.to_string()).await;
        assert_eq!(status, 400, "{body}: {error}");
        let message = error["error"].as_str().unwrap_or_default();
        assert!(message.contains(contains), "{message:?} should contain {contains:?}");
    }
    let (status, error) = server.raw_post("/api/v1/failed-events/retry", "{not json").await;
    assert_eq!(status, 400, "{error}");
    server.stop().await;
}

#[tokio::test]
async fn resolving_with_a_reason_lists_the_event_as_resolved_with_that_reason() {
    let server = AdminServer::start("admin_resolve", 1, 1).await;
    let event = &server.events[1];
    let before = server
        .client
        .resolve(event.event.event_id, "duplicate of order 42")
        .await
        .expect("resolve");
    assert_eq!(before.event_id, event.event.event_id);
    assert_eq!(
        before.status,
        FailedEventStatus::Retrying,
        "the answer is the row before"
    );

    let resolved = server
        .client
        .list_all_failed(&ListFailedParams {
            statuses: vec![FailedEventStatus::Resolved],
            ..Default::default()
        })
        .await
        .expect("list resolved");
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0].event_id, event.event.event_id);
    assert_eq!(resolved[0].resolution.as_deref(), Some("duplicate of order 42"));
    assert_eq!(resolved[0].next_retry_at, None);

    // A resolved event can be neither resolved nor retried again.
    let err = server.client.resolve(event.event.event_id, "again").await.unwrap_err();
    assert_api_error(err, 404, "no failed event");
    let err = server.client.retry(event.event.event_id).await.unwrap_err();
    assert_api_error(
        err,
        404,
        &format!("no failed event {} in a retryable state", event.event.event_id),
    );
    server.stop().await;
}

#[tokio::test]
async fn resolving_without_a_reason_is_a_bad_request() {
    let server = AdminServer::start("admin_reason", 1, 0).await;
    let path = format!("/api/v1/failed-events/{}/resolve", server.events[0].event.event_id);
    for (body, field, contains) in [
        ("{}", Some("reason"), "missing field `reason`"),
        ("", None, "invalid request body"),
        (r#"{"reason": "   "}"#, Some("reason"), "reason must not be empty"),
        (
            r#"{"reason": "ok", "force": true}"#,
            Some("force"),
            "unknown field `force`",
        ),
    ] {
        let (status, error) = server.raw_post(&path, body).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["field"].as_str(), field, "{body}: {error}");
        let message = error["error"].as_str().unwrap_or_default();
        assert!(message.contains(contains), "{message:?} should contain {contains:?}");
    }
    let long = "x".repeat(1001);
    let err = server
        .client
        .resolve(server.events[0].event.event_id, &long)
        .await
        .unwrap_err();
    assert_api_error(err, 400, "reason must be at most 1000 characters");
    assert_eq!(
        server.listed(&server.events[0]).await.status,
        FailedEventStatus::DeadLettered
    );
    server.stop().await;
}

#[tokio::test]
async fn requests_without_or_with_a_wrong_token_are_unauthorized() {
    let server = AdminServer::start("admin_auth", 1, 0).await;
    let url = server.url("/api/v1/failed-events");
    for authorization in [
        None,
        Some("Basic dXNlcjpwYXNz"),
        Some("Bearer"),
        Some("Bearer wrong-token"),
    ] {
        let mut request = server.http.get(&url);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.expect("send");
        assert_eq!(response.status().as_u16(), 401, "{authorization:?}");
        assert_eq!(
            response.headers().get("www-authenticate").and_then(|v| v.to_str().ok()),
            Some("Bearer")
        );
        let body: ApiError = response.json().await.expect("JSON error body");
        assert!(!body.error.is_empty());
        assert!(
            !body.error.contains("wrong-token"),
            "the token is never echoed: {body:?}"
        );
    }

    let wrong = AdminClient::new(&server.base, format!("{TOKEN}x")).expect("client");
    let err = wrong.list_failed(&ListFailedParams::default()).await.unwrap_err();
    assert_api_error(err, 401, "invalid bearer token");
    let err = wrong.retry(server.events[0].event.event_id).await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert_eq!(
        server.listed(&server.events[0]).await.status,
        FailedEventStatus::DeadLettered
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_list_filters_are_rejected_naming_the_parameter() {
    let server = AdminServer::start("admin_bad_filters", 1, 0).await;
    let long = "a".repeat(257);
    for (query, field, contains) in [
        (
            "status=bogus",
            "status",
            "unknown status `bogus`; allowed: retrying, held, dead_lettered",
        ),
        ("status=dead_lettered,bogus", "status", "unknown status `bogus`"),
        ("limit=0", "limit", "limit must be between 1 and 500"),
        ("limit=10000", "limit", "limit must be between 1 and 500"),
        ("limit=ten", "limit", "limit must be between 1 and 500"),
        (
            "failedAfter=yesterday",
            "failedAfter",
            "failedAfter must be an RFC 3339 timestamp",
        ),
        (
            "failedBefore=2025-13-01",
            "failedBefore",
            "failedBefore must be an RFC 3339 timestamp",
        ),
        (
            "failedAfter=2025-02-01T00:00:00Z&failedBefore=2025-01-01T00:00:00Z",
            "failedAfter",
            "failedAfter must be earlier than failedBefore",
        ),
        ("cursor=not-a-cursor", "cursor", "cursor is malformed"),
        ("foo=1", "foo", "unknown query parameter `foo`"),
        ("limit=5&limit=6", "limit", "`limit` is given more than once"),
        (
            &format!("aggregateId={long}"),
            "aggregateId",
            "aggregateId must be at most 256 bytes",
        ),
    ] {
        let (status, error) = server.raw_list(query).await;
        assert_eq!(status, 400, "{query}: {error}");
        assert_eq!(error["field"].as_str(), Some(field), "{query}: {error}");
        let message = error["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(contains),
            "{query}: {message:?} should contain {contains:?}"
        );
    }
    // The client surfaces the same message.
    let err = server
        .client
        .list_failed(&ListFailedParams {
            limit: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_api_error(err, 400, "limit must be between 1 and 500");
    server.stop().await;
}

#[tokio::test]
async fn unknown_event_ids_get_404_and_malformed_ones_400() {
    let server = AdminServer::start("admin_ids", 1, 0).await;
    let unknown = Uuid::now_v7();
    let err = server.client.retry(unknown).await.unwrap_err();
    assert_api_error(err, 404, &format!("no failed event {unknown} in a retryable state"));
    let err = server.client.resolve(unknown, "gone").await.unwrap_err();
    assert_api_error(err, 404, &format!("no failed event {unknown}"));

    for path in [
        "/api/v1/failed-events/123/retry",
        "/api/v1/failed-events/not-a-uuid/resolve",
    ] {
        let (status, error) = server.raw_post(path, r#"{"reason": "x"}"#).await;
        assert_eq!(status, 400, "{path}: {error}");
        assert_eq!(error["error"], "eventId must be a UUID");
        assert_eq!(error["field"], "eventId");
    }
    let (status, error) = server.raw_post("/api/v1/nothing-here", "{}").await;
    assert_eq!(status, 404, "{error}");
    server.stop().await;
}

#[tokio::test]
async fn probes_metrics_and_the_openapi_document_answer_without_a_token() {
    let server = AdminServer::start("admin_probes", 1, 0).await;
    let get = |path: &str| server.http.get(server.url(path)).send();

    // A fresh HealthState: the loop never ran and the broker is unknown.
    let livez = get("/livez").await.expect("livez");
    assert_eq!(livez.status().as_u16(), 503);
    let readyz = get("/readyz").await.expect("readyz");
    assert_eq!(readyz.status().as_u16(), 503);
    let reasons = readyz.text().await.expect("readyz body");
    assert_eq!(
        reasons.lines().collect::<Vec<_>>(),
        vec![
            "claim loop has not run recently",
            "database is not reachable",
            "broker is not reachable"
        ]
    );

    server.health.loop_ran();
    server.health.set_broker_reachable(true);
    server.health.set_database_reachable(true);
    for path in ["/livez", "/readyz"] {
        let response = get(path).await.expect("probe");
        assert_eq!(response.status().as_u16(), 200, "{path}");
        assert_eq!(response.text().await.expect("body").trim(), "ok");
    }
    // Readiness is "can do its job": a database outage takes the worker out of the Service.
    server.health.set_database_reachable(false);
    let readyz = get("/readyz").await.expect("readyz");
    assert_eq!(readyz.status().as_u16(), 503);
    assert_eq!(readyz.text().await.expect("body").trim(), "database is not reachable");
    server.health.set_database_reachable(true);

    let metrics = get("/metrics").await.expect("metrics");
    assert_eq!(metrics.status().as_u16(), 200);
    assert_eq!(
        metrics.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = metrics.text().await.expect("metrics body");
    assert!(
        text.contains(r#"outbox_relay_pending_events{publisher="orders-relay"} 0"#),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");

    let openapi = get("/api/v1/openapi.json").await.expect("openapi");
    assert_eq!(openapi.status().as_u16(), 200);
    let document: Value = openapi.json().await.expect("openapi JSON");
    assert_eq!(document["openapi"], "3.1.0");
    assert!(document["paths"]["/api/v1/failed-events/{eventId}/retry"]["post"].is_object());
    assert!(document["components"]["schemas"]["ApiError"].is_object());
    server.stop().await;
}
