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
    /// Watch only these namespaces (one controller each); all when empty.
    pub namespaces: Vec<String>,
    /// Reconcile only while holding the Lease; at once (single replica) when absent.
    pub leader_election: Option<LeaderElection>,
    /// Listen address of `/metrics`, `/livez`, `/readyz`.
    pub listen: SocketAddr,
}

/// Where and how replicas compete for the Lease.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Where the Lease lives (the operator's own namespace).
    pub lease_namespace: String,
    pub lease_name: String,
    /// Unique per replica (the Pod name).
    pub identity: String,
    /// A holder that stops renewing loses the lease after this long.
    pub lease_duration: Duration,
    /// The holder renews this long before expiry.
    pub lease_grace: Duration,
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

/// Runs the EventPublisher controller(s) until `stop` resolves: one per watched namespace
/// (each with its own watches, as Roles allow), or one for the whole cluster.
async fn controllers(
    client: kube::Client,
    settings: ProcessSettings,
    metrics: Arc<OperatorMetrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use futures::FutureExt;
    let stop = stop.shared();
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let runs = scopes.into_iter().map(|scope| {
        let stop = stop.clone();
        let (client, controller, metrics) = (client.clone(), settings.controller.clone(), metrics.clone());
        async move {
            // Both kinds' controllers of a scope stop together (lease lost or shutdown).
            let (publishers, replays) = futures::future::join(
                reconcile::run_with_metrics(client.clone(), scope.clone(), controller.clone(), metrics, stop.clone()),
                super::replayjob::run(client, scope.clone(), controller, stop),
            )
            .await;
            if let Err(error) = publishers {
                tracing::error!(%error, namespace = ?scope, "EventPublisher controller ended");
            }
            if let Err(error) = replays {
                tracing::error!(%error, namespace = ?scope, "ReplayJob controller ended");
            }
        }
    });
    futures::future::join_all(runs).await;
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
    tracing::info!(listen = %settings.listen, "serving /metrics, /livez, /readyz");

    let Some(election) = settings.leader_election.clone() else {
        // A single replica: reconcile at once.
        probes.started.store(true, Ordering::Relaxed);
        metrics.set_leader(true);
        controllers(client, settings, metrics, shutdown).await;
        server.abort();
        return Ok(());
    };
    let result = run_elected(client, &settings, &election, metrics, &probes, shutdown).await;
    server.abort();
    result
}

/// The field manager of one contender's Lease writes. It must differ per identity: taking a
/// free Lease is a server-side apply without force, and only a field owned by another manager
/// makes the second of two simultaneous takers fail with a conflict. With one shared manager
/// both applies succeeded, and the earlier taker reconciled as a second leader until its next
/// renewal (seen in CI: Events from two operator processes right after a kill -9 takeover).
fn lease_field_manager(identity: &str) -> String {
    // The API server refuses field managers longer than 128 bytes.
    let mut manager = format!("{FIELD_MANAGER}-lease-{identity}");
    if manager.len() > 128 {
        let mut end = 128;
        while !manager.is_char_boundary(end) {
            end -= 1;
        }
        manager.truncate(end);
    }
    manager
}

/// Competes for the Lease; runs the controllers while holding it.
async fn run_elected(
    client: kube::Client,
    settings: &ProcessSettings,
    election: &LeaderElection,
    metrics: Arc<OperatorMetrics>,
    probes: &Probes,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ProcessError> {
    let lease_error = |reason: String| ProcessError::Lease {
        namespace: election.lease_namespace.clone(),
        name: election.lease_name.clone(),
        reason,
    };
    let manager = LeaseManagerBuilder::new(client.clone(), &election.lease_name)
        .with_namespace(&election.lease_namespace)
        .with_identity(&election.identity)
        .with_duration(election.lease_duration.as_secs().max(2))
        .with_grace(election.lease_grace.as_secs().max(1))
        .with_field_manager(lease_field_manager(&election.identity))
        .build()
        .await
        .map_err(|e| lease_error(e.to_string()))?;
    let (mut leader, lease_task) = manager.watch().await;
    probes.started.store(true, Ordering::Relaxed);
    tracing::info!(identity = %election.identity, lease = %election.lease_name, "waiting for the lease");

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
        tracing::info!(identity = %election.identity, "lease acquired; reconciling");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut lost = leader.clone();
        let stop_when = async move {
            tokio::select! {
                _ = lost.wait_for(|l| !*l) => {}
                _ = stopped => {}
            }
        };
        let mut controller = tokio::spawn(controllers(
            client.clone(),
            settings.clone(),
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
        tracing::warn!(identity = %election.identity, "lease lost; controller stopped until it is won back");
    };
    // Dropping the receiver makes the lease task release the lease, so a standby takes over at
    // once instead of after the lease duration.
    drop(leader);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => tracing::info!("lease released"),
        other => tracing::warn!(outcome = ?other.map(|r| r.map(|r| r.map(|_| ()))), "lease release"),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::lease_field_manager;

    #[test]
    fn every_lease_contender_writes_under_its_own_field_manager_within_the_api_limit() {
        let a = lease_field_manager("outbox-inventory-outbox-6ff578849c-8q4t4_fca0b067");
        let b = lease_field_manager("outbox-inventory-outbox-6ff578849c-d4vrb_cbdfefc0");
        assert_ne!(a, b);
        assert!(a.ends_with("8q4t4_fca0b067"), "{a}");
        let long = lease_field_manager(&"x".repeat(300));
        assert_eq!(long.len(), 128);
    }
}
