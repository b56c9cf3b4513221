//! The replay Pod's status endpoint (`GET /api/v1/status`, the report as JSON), which the
//! operator polls over the Pod IP while the Job runs. It serves counts only, no event data.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use super::report::ReplayReport;

/// Path the operator polls.
pub const STATUS_PATH: &str = "/api/v1/status";

/// The status routes over the shared progress.
pub fn router(progress: Arc<Mutex<ReplayReport>>) -> Router {
    Router::new()
        .route(STATUS_PATH, get(status))
        .route("/livez", get(|| async { "ok" }))
        .with_state(progress)
}

async fn status(State(progress): State<Arc<Mutex<ReplayReport>>>) -> axum::Json<ReplayReport> {
    axum::Json(progress.lock().map(|r| r.clone()).unwrap_or_default())
}
