//! The relay's JSON status endpoint, `GET /api/v1/status`: what the operator copies into the
//! EventPublisher status. The operator holds no database credentials, so it asks the relay
//! Pods (over their Pod IP) instead of reading the outbox itself. No secrets and no event
//! payloads are served, so the endpoint needs no token.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::delivery::health::HealthState;
use crate::delivery::metrics::DeliveryMetrics;
use crate::store::Store;
use crate::store::status::publisher_figures;

/// Path of the endpoint.
pub const PATH: &str = "/api/v1/status";

/// The document `GET /api/v1/status` returns. Figures about the outbox are the publisher's
/// (every worker reads the same database); `circuits` and `ready` are this worker's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayStatus {
    /// Publisher name.
    pub publisher: String,
    /// The worker answering.
    pub worker_id: String,
    /// Whether this worker passes its readiness check, and why not.
    pub ready: bool,
    /// Readiness failures of this worker, one line each.
    #[serde(default)]
    pub not_ready_reasons: Vec<String>,
    /// Circuit of each destination this worker has sent to.
    #[serde(default)]
    pub circuits: Vec<CircuitReport>,
    /// Worst circuit over every live worker: `closed`, `half_open` or `open`.
    pub circuit_state: String,
    /// Committed events not yet published.
    pub pending_events: i64,
    /// Age of the oldest of them, in seconds.
    pub oldest_pending_age_seconds: Option<i64>,
    /// Failed events retrying.
    pub retrying_count: i64,
    /// Events held behind a failed event of their aggregate.
    pub held_count: i64,
    /// Dead-lettered events not yet redelivered or resolved.
    pub dead_lettered_count: i64,
    /// Retrying plus dead-lettered events.
    pub failed_event_count: i64,
    /// Events delivered to the broker over the publisher's life, counted from the store (it
    /// survives rollouts and restarts, unlike the workers' own counters).
    pub published_total: i64,
    /// Failed send attempts, summed over the live workers.
    pub failed_total: i64,
    /// Events dead-lettered, summed over the live workers.
    pub dead_lettered_total: i64,
    /// Latest broker acknowledgement over the live workers.
    pub last_published_time: Option<DateTime<Utc>>,
    /// Workers with a recent heartbeat.
    pub live_workers: i64,
}

/// One destination's circuit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitReport {
    /// Topic, routing key or queue.
    pub destination: String,
    /// `closed`, `half_open` or `open`.
    pub state: String,
}

/// What the endpoint reads.
#[derive(Clone)]
pub struct StatusState {
    pub store: Store,
    pub publisher: String,
    pub worker_id: String,
    pub health: Arc<HealthState>,
    pub metrics: Arc<DeliveryMetrics>,
    /// Heartbeats older than this do not count (the lease duration: such a worker has lost
    /// its shards).
    pub alive_within: Duration,
}

/// The router serving [`PATH`]; merged into the relay's HTTP server.
pub fn router(state: StatusState) -> Router {
    Router::new().route(PATH, get(status)).with_state(state)
}

async fn status(State(state): State<StatusState>) -> Response {
    match report(&state).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "status figures failed");
            let body = serde_json::json!({"status": 503, "title": "status figures failed", "detail": e.to_string()});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

async fn report(state: &StatusState) -> Result<RelayStatus, crate::store::StoreError> {
    let figures = publisher_figures(&state.store, &state.publisher, state.alive_within).await?;
    let (ready, not_ready_reasons) = match state.health.ready() {
        Ok(()) => (true, Vec::new()),
        Err(crate::delivery::health::NotReady(reasons)) => (false, reasons),
    };
    let circuits = circuits_from_metrics(&state.metrics.encode());
    let worst_of =
        |states: &mut dyn Iterator<Item = &str>| states.max_by_key(|s| circuit_rank(s)).unwrap_or("closed").to_owned();
    let circuit_state = worst_of(
        &mut figures
            .workers
            .iter()
            .map(|w| w.circuit_state.as_str())
            .chain(circuits.iter().map(|c| c.state.as_str())),
    );
    let now = Utc::now();
    Ok(RelayStatus {
        publisher: state.publisher.clone(),
        worker_id: state.worker_id.clone(),
        ready,
        not_ready_reasons,
        circuits,
        circuit_state,
        pending_events: figures.pending_events,
        oldest_pending_age_seconds: figures.oldest_pending_at.map(|t| (now - t).num_seconds().max(0)),
        retrying_count: figures.retrying,
        held_count: figures.held,
        dead_lettered_count: figures.dead_lettered,
        failed_event_count: figures.retrying + figures.dead_lettered,
        published_total: figures.published,
        failed_total: figures.workers.iter().map(|w| w.failed_total).sum(),
        dead_lettered_total: figures.workers.iter().map(|w| w.dead_lettered_total).sum(),
        last_published_time: figures.last_published_at,
        live_workers: i64::try_from(figures.workers.len()).unwrap_or(i64::MAX),
    })
}

/// 0 closed, 1 half-open, 2 open (the order of "worse").
pub fn circuit_rank(state: &str) -> u8 {
    match state {
        "open" => 2,
        "half_open" => 1,
        _ => 0,
    }
}

/// This worker's per-destination circuits, read back from its own `circuit_state` gauge: the
/// relay loop already records every transition there, so the status needs no second copy.
fn circuits_from_metrics(text: &str) -> Vec<CircuitReport> {
    let mut out: Vec<CircuitReport> = text
        .lines()
        .filter(|l| l.starts_with("outbox_relay_circuit_state{"))
        .filter_map(|line| {
            let start = line.find("destination=\"")? + "destination=\"".len();
            let end = start + line[start..].find('"')?;
            let value = line.rsplit(' ').next()?;
            let state = match value {
                "2" => "open",
                "1" => "half_open",
                _ => "closed",
            };
            Some(CircuitReport {
                destination: line[start..end].to_owned(),
                state: state.to_owned(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.destination.cmp(&b.destination));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuits_are_read_back_from_the_gauge() {
        let metrics = DeliveryMetrics::new("orders");
        metrics.set_circuit_state("inventory.stock", 2);
        metrics.set_circuit_state("inventory.items", 0);
        metrics.set_circuit_state("inventory.bins", 1);
        let circuits = circuits_from_metrics(&metrics.encode());
        let pairs: Vec<(&str, &str)> = circuits
            .iter()
            .map(|c| (c.destination.as_str(), c.state.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("inventory.bins", "half_open"),
                ("inventory.items", "closed"),
                ("inventory.stock", "open")
            ]
        );
    }
}
