//! The reconcile shell for `ReplayJob`: a span, the finalizer (cancel on deletion), then
//! validate (pure) → build (pure) → create the Job once (server-side apply, one field manager)
//! → observe the Job and its Pods → status (pure) → status write and Events on phase changes.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::build::{CONTAINER, REPLAY_LABEL, STATUS_PORT, job_name, replay_job};
use super::status::{JobState, Observations, compute, phase_event};
use super::validate::validate;
use crate::crd::EventPublisher;
use crate::crd::replay_job::{ReplayJob, ReplayJobStatus, ReplayPhase};
use crate::operator::build::BuildError;
use crate::operator::reconcile::{FIELD_MANAGER, Settings};
use crate::replay::report::ReplayReport;
use crate::replay::status::STATUS_PATH;

/// Finalizer that cancels a running replay before its ReplayJob goes.
pub const FINALIZER: &str = "outbox.inventory.io/replay-cancel";
/// How often a running replay's progress is mirrored.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Shared by every reconcile.
pub struct Context {
    pub client: kube::Client,
    pub settings: Settings,
    http: reqwest::Client,
    recorder: Recorder,
}

/// A failed reconcile; the variant names the action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the object cannot be read as a ReplayJob: {0}")]
    InvalidObject(String),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("read EventPublisher {name}: {source}")]
    ReadPublisher {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("read Job {name}: {source}")]
    ReadJob {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("create Job {name}: {source}")]
    CreateJob {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("delete Job {name}: {source}")]
    DeleteJob {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("list the Pods of Job {name}: {source}")]
    ListPods {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("write the status of ReplayJob {name}: {source}")]
    WriteStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("create the HTTP client for status polls: {0}")]
    HttpClient(String),
    #[error("cancelling: Job {name} is still being deleted")]
    CancelPending { name: String },
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// Stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidObject(_) => "invalid_object",
            Error::Build(_) => "build",
            Error::ReadPublisher { .. } => "read_publisher",
            Error::ReadJob { .. } => "read_job",
            Error::CreateJob { .. } => "create_job",
            Error::DeleteJob { .. } => "delete_job",
            Error::ListPods { .. } => "list_pods",
            Error::WriteStatus { .. } => "write_status",
            Error::HttpClient(_) => "http_client",
            Error::CancelPending { .. } => "cancel_pending",
            Error::Finalizer(_) => "finalizer",
        }
    }

    /// Whether the Job's create was refused because the namespace is being deleted (see
    /// [`crate::operator::shell::refused_for_terminating_namespace`]): the ReplayJob's own
    /// deletion follows, so this is a wait, not a failure.
    fn namespace_terminating(&self) -> bool {
        matches!(self, Error::CreateJob { source, .. } if crate::operator::shell::refused_for_terminating_namespace(source))
    }
}

/// An unreadable object waits for a change; a pending cancel is checked again soon; anything
/// else backs off.
pub fn error_policy(_obj: Arc<DeserializeGuard<ReplayJob>>, error: &Error, _ctx: Arc<Context>) -> Action {
    match error {
        Error::CancelPending { .. } => Action::requeue(Duration::from_secs(1)),
        error if error.namespace_terminating() => {
            tracing::debug!(error = %error, "namespace is being deleted; waiting for the ReplayJob's own deletion");
            Action::requeue(crate::operator::shell::TERMINATING_RECHECK)
        }
        Error::InvalidObject(_) | Error::Build(_) => {
            tracing::warn!(error = %error, kind = error.metric_label(), "ReplayJob needs a change");
            Action::await_change()
        }
        _ => {
            tracing::warn!(error = %error, kind = error.metric_label(), "ReplayJob reconcile failed; retrying");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

/// One reconcile of one ReplayJob.
pub async fn reconcile(obj: Arc<DeserializeGuard<ReplayJob>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ctx = &ctx;
    crate::operator::shell::finalized(
        &obj,
        &ctx.client,
        FINALIZER,
        move |j| async move { apply(&j, ctx).await },
        move |j| async move { cancel(&j, ctx).await },
    )
    .await
}

impl crate::operator::shell::ShellError for Error {
    fn invalid_object(reason: String) -> Self {
        Error::InvalidObject(reason)
    }

    fn finalizer(reason: String) -> Self {
        Error::Finalizer(reason)
    }
}

fn is_terminal(phase: Option<ReplayPhase>) -> bool {
    matches!(
        phase,
        Some(ReplayPhase::Succeeded | ReplayPhase::Failed | ReplayPhase::Cancelled)
    )
}

async fn apply(replay: &ReplayJob, ctx: &Context) -> Result<Action, Error> {
    let previous = replay.status.clone().unwrap_or_default();
    if is_terminal(previous.phase) {
        return Ok(Action::await_change());
    }
    let namespace = replay.namespace().unwrap_or_default();
    let name = replay.name_any();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let job_name = job_name(&name);
    let mut existing = jobs.get_opt(&job_name).await.map_err(|source| Error::ReadJob {
        name: job_name.clone(),
        source,
    })?;
    let mut refusal = None;
    if existing.is_none() {
        let publishers: Api<EventPublisher> = Api::namespaced(ctx.client.clone(), &namespace);
        let wanted = &replay.spec.publisher_ref.name;
        let publisher = publishers
            .get_opt(wanted)
            .await
            .map_err(|source| Error::ReadPublisher {
                name: wanted.clone(),
                source,
            })?;
        match validate(replay, publisher.as_ref()) {
            Ok(validated) => {
                let job = replay_job(&validated, &ctx.settings.build)?;
                let created = jobs
                    .patch(
                        &job_name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&job),
                    )
                    .await
                    .map_err(|source| Error::CreateJob {
                        name: job_name.clone(),
                        source,
                    })?;
                tracing::info!(job = job_name, "replay Job created");
                existing = Some(created);
            }
            Err(r) => refusal = Some(r),
        }
    }
    let seen = observe(existing.as_ref(), refusal, false, &namespace, &job_name, ctx).await?;
    let waits_for_publisher = seen.refusal.as_ref().is_some_and(|r| !r.is_permanent());
    let status = compute(&seen, &previous, replay.metadata.generation, now());
    finish_round(replay, &previous, &status, ctx).await?;
    Ok(if is_terminal(status.phase) {
        Action::await_change()
    } else if waits_for_publisher {
        Action::requeue(ctx.settings.requeue_after)
    } else {
        Action::requeue(PROGRESS_EVERY)
    })
}

/// Deletion: a Job still running is deleted in the foreground (its Pod first) and the status
/// says Cancelled until the Job is gone; a finished one is left to garbage collection.
async fn cancel(replay: &ReplayJob, ctx: &Context) -> Result<Action, Error> {
    let previous = replay.status.clone().unwrap_or_default();
    let namespace = replay.namespace().unwrap_or_default();
    let job_name = job_name(&replay.name_any());
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = jobs.get_opt(&job_name).await.map_err(|source| Error::ReadJob {
        name: job_name.clone(),
        source,
    })?;
    let unfinished = existing
        .as_ref()
        .is_some_and(|j| matches!(job_state(j), JobState::Active { .. }));
    if is_terminal(previous.phase) && previous.phase != Some(ReplayPhase::Cancelled) && !unfinished {
        return Ok(Action::await_change());
    }
    let Some(job) = existing else {
        return Ok(Action::await_change());
    };
    if !unfinished && job.metadata.deletion_timestamp.is_none() {
        return Ok(Action::await_change());
    }
    if job.metadata.deletion_timestamp.is_none() {
        let foreground = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Foreground),
            ..DeleteParams::default()
        };
        match jobs.delete(&job_name, &foreground).await {
            Ok(_) => tracing::info!(
                job = job_name,
                "ReplayJob deleted while running; Job deleted in the foreground"
            ),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Action::await_change()),
            Err(source) => {
                return Err(Error::DeleteJob { name: job_name, source });
            }
        }
    }
    let seen = observe(Some(&job), None, true, &namespace, &job_name, ctx).await?;
    let status = compute(&seen, &previous, replay.metadata.generation, now());
    finish_round(replay, &previous, &status, ctx).await?;
    Err(Error::CancelPending { name: job_name })
}

fn job_state(job: &Job) -> JobState {
    let status = job.status.clone().unwrap_or_default();
    let condition = |t: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t && c.status == "True")
            .cloned()
    };
    if condition("Complete").is_some() {
        JobState::Succeeded {
            start_time: status.start_time.clone(),
            completion_time: status.completion_time.clone(),
        }
    } else if let Some(failed) = condition("Failed") {
        JobState::Failed {
            start_time: status.start_time.clone(),
            message: failed
                .message
                .or(failed.reason)
                .unwrap_or_else(|| "the Job failed".into()),
        }
    } else {
        JobState::Active {
            start_time: status.start_time.clone(),
        }
    }
}

/// Reads the Job's Pods: the running one's status endpoint, and the newest termination report.
async fn observe(
    job: Option<&Job>,
    refusal: Option<super::validate::Refusal>,
    cancelling: bool,
    namespace: &str,
    job_name: &str,
    ctx: &Context,
) -> Result<Observations, Error> {
    let Some(job) = job else {
        return Ok(Observations {
            refusal,
            job: JobState::Absent,
            live: None,
            finished: None,
            cancelling,
        });
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let replay_name = job
        .labels()
        .get(REPLAY_LABEL)
        .cloned()
        .unwrap_or_else(|| job_name.trim_end_matches("-replay").to_owned());
    let list = pods
        .list(&ListParams::default().labels(&format!("{REPLAY_LABEL}={replay_name}")))
        .await
        .map_err(|source| Error::ListPods {
            name: job_name.to_owned(),
            source,
        })?;
    let mut finished: Option<(i64, ReplayReport)> = None;
    let mut live = None;
    for pod in &list.items {
        let status = pod.status.clone().unwrap_or_default();
        let container = status.container_statuses.iter().flatten().find(|c| c.name == CONTAINER);
        let terminated = container.and_then(|c| c.state.as_ref().and_then(|s| s.terminated.clone()));
        if let Some(t) = terminated {
            let at = t.finished_at.as_ref().map_or(0, |t| t.0.as_second());
            if let Some(report) = t
                .message
                .as_deref()
                .and_then(|m| serde_json::from_str::<ReplayReport>(m).ok())
                && finished.as_ref().is_none_or(|(seen, _)| at >= *seen)
            {
                finished = Some((at, report));
            }
            continue;
        }
        if status.phase.as_deref() == Some("Running")
            && let Some(ip) = status.pod_ip.as_deref()
        {
            match poll(&ctx.http, ip).await {
                Ok(report) => live = Some(report),
                Err(why) => tracing::debug!(pod = pod.name_any(), why, "replay Pod did not answer"),
            }
        }
    }
    Ok(Observations {
        refusal,
        job: job_state(job),
        live,
        finished: finished.map(|(_, r)| r),
        cancelling,
    })
}

async fn poll(http: &reqwest::Client, ip: &str) -> Result<ReplayReport, String> {
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    let url = format!("http://{host}:{STATUS_PORT}{STATUS_PATH}");
    let response = http.get(&url).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    response.json().await.map_err(|e| e.to_string())
}

async fn finish_round(
    replay: &ReplayJob,
    previous: &ReplayJobStatus,
    status: &ReplayJobStatus,
    ctx: &Context,
) -> Result<(), Error> {
    if status != previous {
        let api: Api<ReplayJob> = Api::namespaced(ctx.client.clone(), &replay.namespace().unwrap_or_default());
        let patch = serde_json::json!({
            "apiVersion": format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
            "kind": "ReplayJob",
            "status": status,
        });
        api.patch_status(
            &replay.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::WriteStatus {
            name: replay.name_any(),
            source,
        })?;
    }
    if let Some((reason, note, warning)) = phase_event(previous.phase, status) {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Replay".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &replay.object_ref(&())).await {
            tracing::warn!(error = %e, "publish Event");
        }
    }
    Ok(())
}

fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
}

/// Runs the ReplayJob controller until `shutdown` resolves; `namespace` limits it to one.
pub async fn run(
    client: kube::Client,
    namespace: Option<String>,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    crate::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(settings.status_timeout)
        .build()
        .map_err(|e| Error::HttpClient(e.to_string()))?;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: settings.instance.clone(),
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings,
        http,
        recorder,
    });
    let (replays, jobs): (Api<DeserializeGuard<ReplayJob>>, Api<Job>) = match &namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let owned = watcher::Config::default().labels("app.kubernetes.io/component=replay");
    Controller::new(replays, watcher::Config::default())
        .owns(jobs, owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "ReplayJob reconcile round failed");
            }
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create_refused(status: serde_json::Value) -> Error {
        Error::CreateJob {
            name: "orders-replay".to_owned(),
            source: kube::Error::Api(Box::new(serde_json::from_value(status).unwrap())),
        }
    }

    #[test]
    fn a_job_refused_in_a_terminating_namespace_is_a_wait_and_other_refusals_are_failures() {
        let terminating = create_refused(serde_json::json!({
            "status": "Failure", "code": 403, "reason": "Forbidden",
            "message": "jobs.batch \"orders-replay\" is forbidden: unable to create new content in namespace shop because it is being terminated",
            "details": {"name": "orders-replay", "group": "batch", "kind": "jobs",
                        "causes": [{"reason": "NamespaceTerminating", "message": "namespace shop is being terminated", "field": "metadata.namespace"}]}
        }));
        assert!(terminating.namespace_terminating());
        let quota = create_refused(serde_json::json!({
            "status": "Failure", "code": 403, "reason": "Forbidden",
            "message": "jobs.batch \"orders-replay\" is forbidden: exceeded quota: compute"
        }));
        assert!(!quota.namespace_terminating());
        assert!(!Error::CancelPending { name: "x".to_owned() }.namespace_terminating());
    }
}
