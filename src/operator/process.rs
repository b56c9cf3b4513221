//! The `operator` process: leader election through a `coordination.k8s.io` Lease (only the
//! holder runs the controller, so only it writes status), `/metrics`, `/livez` and `/readyz`,
//! and a graceful stop on SIGTERM. Losing the lease stops the controller until it is won back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kube_lease_manager::LeaseManagerBuilder;

use super::metrics::OperatorMetrics;
use super::reconcile::{self, FIELD_MANAGER, Settings};

/// How the process runs.
#[derive(Clone, Debug)]
pub struct ProcessSettings {
    pub controller: Settings,
    /// Watch one namespace only; all when absent.
    pub namespace: Option<String>,
    /// Where the Lease lives (the operator's own namespace).
    pub lease_namespace: String,
    pub lease_name: String,
    /// Unique per replica (the Pod name).
    pub identity: String,
    /// A holder that stops renewing loses the lease after this long.
    pub lease_duration: Duration,
    /// The holder renews this long before expiry.
    pub lease_grace: Duration,
    /// Listen address of `/metrics`, `/livez`, `/readyz`.
    pub listen: SocketAddr,
}

/// The process could not start or keep running; the variant names the action.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("set up leader election on Lease {namespace}/{name}: {reason}")]
    Lease {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("leader election stopped: {0}")]
    LeaseLost(String),
}

#[derive(Clone)]
struct Probes {
    metrics: Arc<OperatorMetrics>,
    started: Arc<AtomicBool>,
}

async fn livez() -> &'static str {
    "ok"
}

async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    // Ready once leader election runs: a standby replica is ready too (it takes over).
    if p.started.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "leader election not started")
    }
}

async fn metrics_text(State(p): State<Probes>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        p.metrics.encode(),
    )
}

/// Runs until `shutdown` resolves.
pub async fn run(
    client: kube::Client,
    settings: ProcessSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ProcessError> {
    let metrics = Arc::new(OperatorMetrics::new());
    let probes = Probes {
        metrics: metrics.clone(),
        started: Arc::new(AtomicBool::new(false)),
    };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| ProcessError::Listen {
            addr: settings.listen,
            source,
        })?;
    let router = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(probes.clone());
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let lease_error = |reason: String| ProcessError::Lease {
        namespace: settings.lease_namespace.clone(),
        name: settings.lease_name.clone(),
        reason,
    };
    let manager = LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
        .with_namespace(&settings.lease_namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.lease_duration.as_secs().max(2))
        .with_grace(settings.lease_grace.as_secs().max(1))
        .with_field_manager(format!("{FIELD_MANAGER}-lease"))
        .build()
        .await
        .map_err(|e| lease_error(e.to_string()))?;
    let (mut leader, lease_task) = manager.watch().await;
    probes.started.store(true, Ordering::Relaxed);
    tracing::info!(identity = %settings.identity, lease = %settings.lease_name, "waiting for the lease");

    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            won = leader.wait_for(|l| *l) => {
                if won.is_err() {
                    break Err(ProcessError::LeaseLost("the lease task ended".into()));
                }
            }
        }
        metrics.set_leader(true);
        tracing::info!(identity = %settings.identity, "lease acquired; reconciling");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut lost = leader.clone();
        let stop_when = async move {
            tokio::select! {
                _ = lost.wait_for(|l| !*l) => {}
                _ = stopped => {}
            }
        };
        let mut controller = tokio::spawn(reconcile::run_with_metrics(
            client.clone(),
            settings.namespace.clone(),
            settings.controller.clone(),
            metrics.clone(),
            stop_when,
        ));
        let stopping = tokio::select! {
            _ = &mut shutdown => true,
            _ = &mut controller => false,
        };
        metrics.set_leader(false);
        if stopping {
            let _ = stop.send(());
            let _ = controller.await;
            break Ok(());
        }
        tracing::warn!(identity = %settings.identity, "lease lost; controller stopped until it is won back");
    };
    // Dropping the receiver makes the lease task release the lease, so a standby takes over at
    // once instead of after the lease duration.
    drop(leader);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => tracing::info!("lease released"),
        other => tracing::warn!(outcome = ?other.map(|r| r.map(|r| r.map(|_| ()))), "lease release"),
    }
    server.abort();
    result
}
