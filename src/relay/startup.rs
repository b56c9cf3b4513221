//! The relay's first step: connect to PostgreSQL, retrying for as long as it takes, while the
//! probes already answer (`/livez` 200, `/readyz` 503 with the reason), so a database that is
//! down or refuses the relay (untrusted CA, expired certificate, host name mismatch, wrong
//! password) leaves the Pod running and unready with one clear message instead of
//! crash-looping.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::store::Store;

use super::config::RelayConfig;

/// How long the probe server may take to finish its answers once the store is connected.
const HANDOVER_GRACE: Duration = Duration::from_secs(2);

/// Why the relay is not ready yet, shown by `/readyz`.
type Reason = Arc<Mutex<String>>;

/// Connects the relay's store, serving the probes on a duplicate of `listener` meanwhile (the
/// relay's own server takes over the same socket afterwards, so no probe finds the port
/// closed). `None` when `shutdown` turned true first.
pub async fn connect_store(
    config: &RelayConfig,
    url: &str,
    listener: &TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Option<Store>> {
    let reason: Reason = Arc::new(Mutex::new("starting: connecting to PostgreSQL".to_owned()));
    let probes = Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(reason.clone());
    let (stop_probes, mut probes_stopped) = watch::channel(false);
    let server = tokio::spawn(
        axum::serve(duplicate(listener)?, probes)
            .with_graceful_shutdown(async move {
                let _ = probes_stopped.wait_for(|stop| *stop).await;
            })
            .into_future(),
    );
    let connect = Store::connect_retrying(
        url,
        config.outbox.tls.as_ref(),
        config.schema_name(),
        config.outbox.max_connections,
        |error| {
            *reason.lock().unwrap_or_else(PoisonError::into_inner) = format!("database is not reachable: {error}");
        },
    );
    let store = tokio::select! {
        store = connect => Some(store?),
        _ = shutdown.wait_for(|stop| *stop) => None,
    };
    let _ = stop_probes.send(true);
    let abort = server.abort_handle();
    if tokio::time::timeout(HANDOVER_GRACE, server).await.is_err() {
        abort.abort();
    }
    Ok(store)
}

async fn readyz(State(reason): State<Reason>) -> (StatusCode, String) {
    let reason = reason.lock().unwrap_or_else(PoisonError::into_inner).clone();
    (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
}

/// A second handle on the same listening socket: connections waiting in its backlog go to
/// whichever handle accepts next.
fn duplicate(listener: &TcpListener) -> anyhow::Result<TcpListener> {
    use std::os::fd::AsFd;
    let std_listener = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
    std_listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(std_listener)?)
}
