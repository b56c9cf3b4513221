//! The reconcile shell for `EventPublisher`: a span, then the named steps — validate (pure),
//! build (pure), apply (server-side apply under one field manager, orphans removed),
//! dereference (the Deployment, the relay Pods' status endpoints over their Pod IP, the
//! provision report), status (pure), then the status write and Events on transitions only.
//! Every round recomputes from the current state; nothing is edge-triggered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Predicate, PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::build::{BuildContext, BuildError, Children, build, child_name, cleanup_job, cleanup_job_name};
use super::conditions::{self, types};
use super::status::{Observations, ProvisionOutcome, compute};
use super::validate::{HTTP_PORT, InvalidSpec, ValidatedPublisher, validate};
use crate::crd::event_publisher::DeletionPolicy;
use crate::crd::{EventPublisher, EventPublisherStatus};
use crate::relay::status::{PATH as STATUS_PATH, RelayStatus};

/// The one field manager of every object and status this operator writes.
pub const FIELD_MANAGER: &str = "inventory-outbox-operator";
/// Finalizer that runs `deletionPolicy` before an EventPublisher goes.
pub const FINALIZER: &str = "outbox.inventory.io/cleanup";
/// Set to `"true"` on an EventPublisher to let its deletion go without (more) cleanup: the
/// documented way out when the broker is gone for good.
pub const SKIP_CLEANUP_ANNOTATION: &str = "outbox.inventory.io/skip-cleanup";

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct Settings {
    pub build: BuildContext,
    /// How often a publisher is reconciled without a change, so the status stays fresh.
    pub requeue_after: Duration,
    /// Relay Pods asked at once.
    pub status_concurrency: usize,
    /// Timeout of one status request.
    pub status_timeout: Duration,
    /// Name this instance reports in Events.
    pub instance: Option<String>,
    /// How long the cleanup Job may run before deletion gives up and leaves the rest behind.
    pub cleanup_deadline: Duration,
    /// Reconciles in flight at once. Unbounded, a burst of new publishers floods the API
    /// server with server-side applies until it answers 504 and everything retries.
    pub concurrency: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            build: BuildContext {
                image: super::build::default_image(),
            },
            requeue_after: Duration::from_secs(15),
            status_concurrency: 16,
            status_timeout: Duration::from_secs(2),
            instance: None,
            cleanup_deadline: Duration::from_secs(300),
            concurrency: 16,
        }
    }
}

/// A status write as the API server stored it.
#[derive(Clone, Debug)]
struct Written {
    resource_version: Option<String>,
    status: EventPublisherStatus,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: kube::Client,
    pub settings: Settings,
    pub metrics: Arc<super::metrics::OperatorMetrics>,
    http: reqwest::Client,
    recorder: Recorder,
    /// Per publisher (namespace, name): the resourceVersion its last status write by this
    /// controller produced, and that status. A cached object at that version needs no read
    /// to know its stored status, and an unchanged status need not be written again.
    written: Mutex<HashMap<(String, String), Written>>,
    /// The PodDisruptionBudgets this operator manages (metadata only): an unwanted one is
    /// deleted only when it exists, instead of a DELETE answered 404 on every reconcile.
    pdbs: Option<Store<PartialObjectMeta<PodDisruptionBudget>>>,
    /// Namespaces being deleted: their publishers write nothing until their own deletion.
    terminating: super::shell::TerminatingNamespaces,
}

impl Context {
    pub fn new(
        client: kube::Client,
        settings: Settings,
        metrics: Arc<super::metrics::OperatorMetrics>,
    ) -> Result<Self, Error> {
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
        Ok(Self {
            client,
            settings,
            metrics,
            http,
            recorder,
            written: Mutex::default(),
            pdbs: None,
            terminating: Default::default(),
        })
    }

    fn written(&self, namespace: &str, name: &str) -> Option<Written> {
        self.written
            .lock()
            .ok()?
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    fn forget(&self, namespace: &str, name: &str) {
        if let Ok(mut written) = self.written.lock() {
            written.remove(&(namespace.to_owned(), name.to_owned()));
        }
        self.metrics.forget_publisher(namespace, name);
    }

    /// Whether the PodDisruptionBudget `name` may exist: unknown (so `true`) until the
    /// metadata watch has listed them once.
    async fn pdb_may_exist(&self, namespace: &str, name: &str) -> bool {
        let Some(store) = &self.pdbs else { return true };
        if tokio::time::timeout(Duration::from_secs(2), store.wait_until_ready())
            .await
            .is_err()
        {
            return true;
        }
        store.get(&ObjectRef::new(name).within(namespace)).is_some()
    }
}

/// A failed reconcile; the variant names the action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the object cannot be read as an EventPublisher: {0}")]
    InvalidObject(String),
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] InvalidSpec),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("apply {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("delete {kind} {name}: {source}")]
    Delete {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("list the relay Pods of {name}: {source}")]
    ListPods {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("write the status of {name}: {source}")]
    WriteStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("create the HTTP client for status polls: {0}")]
    HttpClient(String),
    #[error("cleanup Job {job} is still running")]
    CleanupPending { job: String },
    #[error("read cleanup Job {job}: {source}")]
    ReadJob {
        job: String,
        #[source]
        source: kube::Error,
    },
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// Stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidObject(_) => "invalid_object",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Build(_) => "build",
            Error::Apply { .. } => "apply",
            Error::Delete { .. } => "delete",
            Error::ListPods { .. } => "list_pods",
            Error::WriteStatus { .. } => "write_status",
            Error::HttpClient(_) => "http_client",
            Error::CleanupPending { .. } => "cleanup_pending",
            Error::ReadJob { .. } => "read_job",
            Error::Finalizer(_) => "finalizer",
        }
    }

    /// Whether the API server refused a child because the namespace is being deleted (see
    /// [`super::shell::refused_for_terminating_namespace`]). Not a failure.
    fn namespace_terminating(&self) -> bool {
        matches!(self, Error::Apply { source, .. } if super::shell::refused_for_terminating_namespace(source))
    }

    /// Whether retrying without a change to the object can help.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Error::InvalidObject(_) | Error::InvalidSpec(_) | Error::Build(_))
    }
}

/// An invalid object waits for its next change; anything else is retried soon.
pub fn error_policy(obj: Arc<DeserializeGuard<EventPublisher>>, error: &Error, ctx: Arc<Context>) -> Action {
    let retry_in = if let Error::CleanupPending { job } = error {
        tracing::debug!(job, "waiting for the cleanup Job");
        Duration::from_secs(3)
    } else if error.namespace_terminating() {
        tracing::debug!(error = %error, "namespace is being deleted; waiting for the publisher's own deletion");
        ctx.terminating.refused(&obj.namespace().unwrap_or_default());
        super::shell::TERMINATING_RECHECK
    } else {
        ctx.metrics
            .failed(super::metrics::EVENT_PUBLISHER, error.metric_label());
        if !error.is_transient() {
            tracing::warn!(error = %error, kind = error.metric_label(), "object needs a change before it can be reconciled");
            return Action::await_change();
        }
        tracing::warn!(error = %error, kind = error.metric_label(), "reconcile failed; retrying");
        Duration::from_secs(5)
    };
    ctx.metrics.requeued(
        super::metrics::EVENT_PUBLISHER,
        &obj.namespace().unwrap_or_default(),
        &obj.name_any(),
        retry_in,
    );
    Action::requeue(retry_in)
}

/// One reconcile of one EventPublisher.
pub async fn reconcile(obj: Arc<DeserializeGuard<EventPublisher>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(super::metrics::EVENT_PUBLISHER);
    ctx.metrics.dequeued(
        super::metrics::EVENT_PUBLISHER,
        &obj.namespace().unwrap_or_default(),
        &obj.name_any(),
    );
    let requeue = ctx.settings.requeue_after;
    let ctx = &ctx;
    super::shell::finalized(
        &obj,
        &ctx.client,
        FINALIZER,
        move |p| async move {
            let namespace = p.namespace().unwrap_or_default();
            if ctx
                .terminating
                .holds(&namespace, p.metadata.creation_timestamp.as_ref())
            {
                tracing::debug!("namespace is being deleted; waiting for the publisher's own deletion");
                return Ok(Action::requeue(super::shell::TERMINATING_RECHECK));
            }
            reconcile_publisher(&p, ctx).await?;
            ctx.metrics
                .requeued(super::metrics::EVENT_PUBLISHER, &namespace, &p.name_any(), requeue);
            Ok(Action::requeue(requeue))
        },
        move |p| async move {
            let released = cleanup(&p, ctx).await?;
            ctx.forget(&p.namespace().unwrap_or_default(), &p.name_any());
            Ok(released)
        },
    )
    .await
}

impl super::shell::ShellError for Error {
    fn invalid_object(reason: String) -> Self {
        Error::InvalidObject(reason)
    }

    fn finalizer(reason: String) -> Self {
        Error::Finalizer(reason)
    }
}

/// Applies `deletionPolicy`. Returning `Ok` releases the finalizer; `CleanupPending` keeps it
/// while the cleanup Job runs.
async fn cleanup(publisher: &EventPublisher, ctx: &Context) -> Result<Action, Error> {
    let resources = publisher
        .status
        .as_ref()
        .map(|s| s.provisioned_resources.clone())
        .unwrap_or_default();
    let listed = resources
        .iter()
        .map(|r| format!("{} {}", r.kind, r.name))
        .collect::<Vec<_>>()
        .join(", ");
    let skip = publisher
        .annotations()
        .get(SKIP_CLEANUP_ANNOTATION)
        .is_some_and(|v| v == "true");
    if publisher.spec.deletion_policy == DeletionPolicy::Retain || resources.is_empty() {
        if !resources.is_empty() {
            event(
                ctx,
                publisher,
                EventType::Normal,
                "ResourcesRetained",
                format!("deletionPolicy Retain: left in place: {listed}"),
            )
            .await;
        }
        return Ok(Action::await_change());
    }
    if skip {
        event(
            ctx,
            publisher,
            EventType::Warning,
            "CleanupSkipped",
            format!("{SKIP_CLEANUP_ANNOTATION} is set; left behind: {listed}"),
        )
        .await;
        return Ok(Action::await_change());
    }
    let validated = match validate(publisher) {
        Ok(v) => v,
        Err(invalid) => {
            event(
                ctx,
                publisher,
                EventType::Warning,
                "CleanupFailed",
                format!("cannot build the cleanup Job ({invalid}); left behind: {listed}"),
            )
            .await;
            return Ok(Action::await_change());
        }
    };
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &validated.namespace);
    let name = cleanup_job_name(&validated.name);
    let job = match jobs.get_opt(&name).await.map_err(|source| Error::ReadJob {
        job: name.clone(),
        source,
    })? {
        Some(job) => job,
        None => {
            let deadline = i64::try_from(ctx.settings.cleanup_deadline.as_secs()).unwrap_or(300);
            let job = cleanup_job(&validated, &ctx.settings.build, &resources, deadline)?;
            ssa(&jobs, "Job", &name, &job).await?;
            write_deleting(
                publisher,
                ctx,
                conditions::reasons::CLEANUP_RUNNING,
                format!("deletionPolicy Delete: cleanup Job {name} is removing {listed}"),
            )
            .await;
            event(
                ctx,
                publisher,
                EventType::Normal,
                "CleanupStarted",
                format!("deletionPolicy Delete: removing {listed}"),
            )
            .await;
            return Err(Error::CleanupPending { job: name });
        }
    };
    let status = job.status.unwrap_or_default();
    if status.succeeded.unwrap_or_default() > 0 {
        event(
            ctx,
            publisher,
            EventType::Normal,
            "CleanupSucceeded",
            format!("removed {listed}"),
        )
        .await;
        return Ok(Action::await_change());
    }
    let failed = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Failed" && c.status == "True");
    if let Some(failed) = failed {
        let why = failed.message.unwrap_or_else(|| failed.reason.unwrap_or_default());
        // Written just before the finalizer lets go: watchers see what stays on the broker.
        write_deleting(
            publisher,
            ctx,
            conditions::reasons::CLEANUP_FAILED,
            format!("cleanup Job {name} failed ({why}); left behind: {listed}"),
        )
        .await;
        event(
            ctx,
            publisher,
            EventType::Warning,
            "CleanupFailed",
            format!("cleanup Job {name} failed ({why}); deletion goes on and leaves behind: {listed}"),
        )
        .await;
        return Ok(Action::await_change());
    }
    Err(Error::CleanupPending { job: name })
}

/// Sets the Deleting condition, keeping the rest of the status; a failed write is only logged
/// (the Event says the same, and deletion must not wait on it).
async fn write_deleting(publisher: &EventPublisher, ctx: &Context, reason: &'static str, message: String) {
    let mut status = previous_status(publisher, ctx).await;
    let deleting = conditions::settle(
        &status.conditions,
        vec![conditions::Observed::new(types::DELETING, true, reason, message)],
        publisher.metadata.generation,
        now(),
    );
    status.conditions.retain(|c| c.type_ != types::DELETING);
    status.conditions.extend(deleting);
    if let Err(error) = write_status(publisher, &status, ctx).await {
        tracing::warn!(%error, "write the Deleting condition");
    }
}

async fn event(ctx: &Context, publisher: &EventPublisher, type_: EventType, reason: &str, note: String) {
    let e = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Delete".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&e, &publisher.object_ref(&())).await {
        tracing::warn!(%error, "publish Event");
    }
}

async fn reconcile_publisher(publisher: &EventPublisher, ctx: &Context) -> Result<(), Error> {
    let validated = match validate(publisher) {
        Ok(v) => v,
        Err(invalid) => {
            write_invalid_status(publisher, ctx, &invalid).await?;
            return Err(invalid.into());
        }
    };
    let children = build(&validated, &ctx.settings.build)?;
    let previous = previous_status(publisher, ctx).await;
    // Once per generation: the spec is what the warning is about.
    if !validated.insecure_tls.is_empty() && previous.observed_generation != publisher.metadata.generation {
        event(
            ctx,
            publisher,
            EventType::Warning,
            "InsecureTls",
            format!(
                "{} set: the server's certificate is not verified, so anyone on the network path can impersonate it",
                validated.insecure_tls.join(", ")
            ),
        )
        .await;
    }
    let deployment = apply(&validated, &children, ctx).await?;
    let observations = dereference(&validated, &deployment, ctx).await?;
    let status = compute(&validated, &observations, &previous, now());
    publish_transitions(publisher, &previous.conditions, &status, ctx).await;
    ctx.metrics.set_workers(
        &validated.namespace,
        &validated.name,
        i64::from(status.ready_workers),
        i64::from(status.desired_workers),
    );
    write_status(publisher, &status, ctx).await
}

fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
}

async fn ssa<K>(api: &Api<K>, kind: &'static str, name: &str, object: &K) -> Result<K, Error>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object))
        .await
        .map_err(|source| Error::Apply {
            kind,
            name: name.to_owned(),
            source,
        })
}

/// Applies every child and removes the ones no longer wanted; returns the Deployment as the API
/// server reports it.
async fn apply(p: &ValidatedPublisher, children: &Children, ctx: &Context) -> Result<Deployment, Error> {
    let ns = &p.namespace;
    let name = child_name(&p.name);
    let client = ctx.client.clone();
    // The ConfigMap goes before the Deployment, so a Pod of a new template never starts on
    // the old config; the Service depends on neither and goes at the same time (one round
    // trip fewer per reconcile, which is what a burst of new publishers waits on).
    let config_then_deployment = async {
        ssa(
            &Api::<ConfigMap>::namespaced(client.clone(), ns),
            "ConfigMap",
            &name,
            &children.config_map,
        )
        .await?;
        ssa(
            &Api::<Deployment>::namespaced(client.clone(), ns),
            "Deployment",
            &name,
            &children.deployment,
        )
        .await
    };
    let services = Api::<Service>::namespaced(client.clone(), ns);
    let service = ssa(&services, "Service", &name, &children.service);
    let (deployment, _) = futures::try_join!(config_then_deployment, service)?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client, ns);
    match &children.pdb {
        Some(pdb) => {
            ssa(&pdbs, "PodDisruptionBudget", &name, pdb).await?;
        }
        None if !ctx.pdb_may_exist(ns, &name).await => {}
        None => match pdbs.delete(&name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(pdb = name, "PodDisruptionBudget no longer wanted; removed"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::Delete {
                    kind: "PodDisruptionBudget",
                    name,
                    source,
                });
            }
        },
    }
    Ok(deployment)
}

/// Reads what the relay Pods say: their status endpoints (bounded concurrency) and the
/// provision step's termination message.
async fn dereference(p: &ValidatedPublisher, deployment: &Deployment, ctx: &Context) -> Result<Observations, Error> {
    let status = deployment.status.as_ref();
    let ready_replicas = status.and_then(|s| s.ready_replicas).unwrap_or_default();
    let wanted = deployment.spec.replicas.unwrap_or(1);
    if wanted == 0 && status.and_then(|s| s.replicas).unwrap_or_default() == 0 {
        // Scaled to zero with no Pod left (paused): there is nobody to ask.
        return Ok(Observations::default());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &p.namespace);
    let selector = format!("{}={}", super::build::PUBLISHER_LABEL, p.name);
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::ListPods {
            name: p.name.clone(),
            source,
        })?;
    let outcomes: Vec<(i64, ProvisionOutcome)> = list.items.iter().filter_map(provision_outcome).collect();
    let created = outcomes
        .iter()
        .flat_map(|(_, outcome)| match outcome {
            ProvisionOutcome::Provisioned { created, .. } => created.clone(),
            ProvisionOutcome::Failed { .. } => Vec::new(),
        })
        .collect();
    let provision = outcomes
        .into_iter()
        .max_by_key(|(at, _)| *at)
        .map(|(_, outcome)| outcome);
    // Only Pods past their init step can answer; owned values keep the stream 'static.
    let running: Vec<(String, Option<String>)> = list
        .items
        .iter()
        .filter(|pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .map(|pod| (pod.name_any(), pod.status.as_ref().and_then(|s| s.pod_ip.clone())))
        .collect();
    let http = ctx.http.clone();
    let answers: Vec<Result<RelayStatus, String>> = futures::stream::iter(running)
        .map(move |(name, ip)| poll(http.clone(), name, ip))
        .buffer_unordered(ctx.settings.status_concurrency.max(1))
        .collect()
        .await;
    let mut seen = Observations {
        ready_replicas,
        provision,
        created,
        ..Observations::default()
    };
    for answer in answers {
        match answer {
            Ok(report) => seen.reports.push(report),
            Err(why) => seen.unanswered.push(why),
        }
    }
    Ok(seen)
}

async fn poll(http: reqwest::Client, name: String, ip: Option<String>) -> Result<RelayStatus, String> {
    let ip = ip.ok_or_else(|| format!("{name}: no Pod IP yet"))?;
    let url = format!("http://{}/{}", socket(&ip), STATUS_PATH.trim_start_matches('/'));
    let response = http.get(&url).send().await.map_err(|e| format!("{name} ({ip}): {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{name} ({ip}): HTTP {}", response.status()));
    }
    response
        .json::<RelayStatus>()
        .await
        .map_err(|e| format!("{name} ({ip}): unreadable status: {e}"))
}

fn socket(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{HTTP_PORT}")
    } else {
        format!("{ip}:{HTTP_PORT}")
    }
}

/// The provision init container's last report in `pod`, with when it finished.
fn provision_outcome(pod: &Pod) -> Option<(i64, ProvisionOutcome)> {
    let status = pod
        .status
        .as_ref()?
        .init_container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == "provision")?;
    let terminated = status
        .state
        .as_ref()
        .and_then(|s| s.terminated.clone())
        .or_else(|| status.last_state.as_ref().and_then(|s| s.terminated.clone()))?;
    let at = terminated.finished_at.as_ref().map_or(0, |t| t.0.as_second());
    let document: serde_json::Value = serde_json::from_str(terminated.message.as_deref()?).ok()?;
    let outcome = match document["outcome"].as_str()? {
        "provisioned" => {
            let created = document["report"]["created"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|r| {
                            Some(crate::crd::event_publisher::ProvisionedResource {
                                kind: r["kind"].as_str()?.to_owned(),
                                name: r["name"].as_str()?.to_owned(),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            ProvisionOutcome::Provisioned {
                created,
                corrected: document["report"]["corrected"].as_array().map_or(0, Vec::len),
            }
        }
        _ => ProvisionOutcome::Failed {
            reason: document["reason"].as_str().unwrap_or("ProvisionFailed").to_owned(),
            message: document["message"]
                .as_str()
                .unwrap_or("the provision step failed")
                .to_owned(),
        },
    };
    Some((at, outcome))
}

/// The status to settle conditions against. A requeue or a child's event can start a
/// reconcile before the controller's own last write reaches the watch cache, and settling
/// against that stale copy would move `lastTransitionTime` without a change; so the stored
/// status is read, unless the cached object is the very version this controller's last
/// write produced (the usual case: nothing else writes the object between reconciles).
async fn previous_status(publisher: &EventPublisher, ctx: &Context) -> EventPublisherStatus {
    let cached = || publisher.status.clone().unwrap_or_default();
    let (Some(name), Some(namespace)) = (publisher.metadata.name.as_deref(), publisher.namespace()) else {
        return cached();
    };
    let Some(written) = ctx.written(&namespace, name) else {
        // Nothing written by this controller yet: the cache was listed after any earlier
        // writer (a former leader) stopped.
        return cached();
    };
    if written.resource_version.is_some() && written.resource_version == publisher.metadata.resource_version {
        return cached();
    }
    let api: Api<EventPublisher> = Api::namespaced(ctx.client.clone(), &namespace);
    match api.get_status(name).await {
        Ok(stored) => stored.status.unwrap_or_default(),
        Err(error) => {
            tracing::debug!(%error, "reading the stored status failed; settling against the last write");
            written.status
        }
    }
}

/// Writes `status` unless the object is unchanged since this controller last wrote exactly
/// that status.
async fn write_status(publisher: &EventPublisher, status: &EventPublisherStatus, ctx: &Context) -> Result<(), Error> {
    let (Some(name), Some(namespace)) = (publisher.metadata.name.as_deref(), publisher.namespace()) else {
        return Ok(());
    };
    let namespace = namespace.as_str();
    if let Some(written) = ctx.written(namespace, name)
        && written.resource_version.is_some()
        && written.resource_version == publisher.metadata.resource_version
        && &written.status == status
    {
        return Ok(());
    }
    let api: Api<EventPublisher> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = serde_json::json!({
        "apiVersion": format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
        "kind": "EventPublisher",
        "status": status,
    });
    let stored = api
        .patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::WriteStatus {
            name: name.to_owned(),
            source,
        })?;
    if let Ok(mut written) = ctx.written.lock() {
        written.insert(
            (namespace.to_owned(), name.to_owned()),
            Written {
                resource_version: stored.metadata.resource_version,
                status: status.clone(),
            },
        );
    }
    Ok(())
}

async fn write_invalid_status(publisher: &EventPublisher, ctx: &Context, invalid: &InvalidSpec) -> Result<(), Error> {
    let previous = previous_status(publisher, ctx).await.conditions;
    let status = EventPublisherStatus {
        observed_generation: publisher.metadata.generation,
        conditions: conditions::settle(
            &previous,
            vec![conditions::Observed::new(
                types::READY,
                false,
                conditions::reasons::INVALID_SPEC,
                invalid.to_string(),
            )],
            publisher.metadata.generation,
            now(),
        ),
        ..EventPublisherStatus::default()
    };
    write_status(publisher, &status, ctx).await
}

/// One Event per condition that changed, for the conditions people act on.
async fn publish_transitions(
    publisher: &EventPublisher,
    previous: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    status: &EventPublisherStatus,
    ctx: &Context,
) {
    let reference = publisher.object_ref(&());
    for changed in conditions::transitions(previous, &status.conditions) {
        if changed.type_ == types::PAUSED {
            let before = previous
                .iter()
                .find(|c| c.type_ == types::PAUSED)
                .map(|c| c.status.as_str());
            let Some(reason) = pause_event_reason(before, &changed.status) else {
                continue;
            };
            let event = Event {
                type_: EventType::Normal,
                reason: reason.into(),
                note: Some(changed.message.chars().take(1000).collect()),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, "publish Event");
            }
            continue;
        }
        if changed.type_ == types::DEAD_LETTERING {
            // Only the start is news; the count in the status tells the rest.
            if changed.status == "True" {
                let event = Event {
                    type_: EventType::Warning,
                    reason: "DeadLetteringStarted".into(),
                    note: Some(changed.message.chars().take(1000).collect()),
                    action: "Reconcile".into(),
                    secondary: None,
                };
                if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                    tracing::warn!(error = %e, "publish Event");
                }
            }
            continue;
        }
        let worth_telling = matches!(
            changed.type_.as_str(),
            types::CIRCUIT_CLOSED | types::BROKER_READY | types::TOPOLOGY_PROVISIONED | types::READY
        );
        // A first Unknown is not news; it only says nobody has answered yet. A pause is told
        // once, by the Paused condition above, not also as a Ready warning.
        if !worth_telling || changed.status == "Unknown" || changed.reason == conditions::reasons::PAUSED {
            continue;
        }
        let event = Event {
            type_: if changed.status == "True" {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: format!(
                "{}{}",
                changed.type_,
                if changed.status == "True" { "" } else { "False" }
            ),
            note: Some(changed.message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, "publish Event");
        }
    }
}

/// The Event for a change of the Paused condition from `before` (absent on the first status)
/// to `now`. Pausing running relays is news (they stop), and so is resuming after a pause; a
/// publisher created paused or running has changed nothing yet, and an Event for each would be
/// one write in eight when many publishers are created at once.
fn pause_event_reason(before: Option<&str>, now: &str) -> Option<&'static str> {
    match (before, now) {
        (Some("False"), "True") => Some("Paused"),
        (Some("True"), "False") => Some("Resumed"),
        _ => None,
    }
}

/// The owning publisher of `child` (this operator sets one controller reference).
fn owner_of<K: Resource>(child: &K) -> Option<(String, String)> {
    let owner = child
        .meta()
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.kind == "EventPublisher" && o.controller == Some(true))?;
    Some((child.meta().namespace.clone()?, owner.name.clone()))
}

/// The deleted children of a child watch, as owner triggers.
fn deletions<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    metrics: Arc<super::metrics::OperatorMetrics>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
{
    events.filter_map(move |event| {
        let trigger = match event {
            Ok(watcher::Event::Delete(child)) => {
                if let Some((ns, name)) = owner_of(&child) {
                    metrics.triggered(super::metrics::EVENT_PUBLISHER, &ns, &name);
                }
                Some(Ok(child))
            }
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        };
        futures::future::ready(trigger)
    })
}

/// Deployments whose ready replica count changed since this watch last saw them, and deleted
/// ones, as owner triggers. The first sight of a Deployment only records its count.
fn readiness_changes(
    events: impl futures::Stream<Item = Result<watcher::Event<Deployment>, watcher::Error>> + Send + 'static,
    metrics: Arc<super::metrics::OperatorMetrics>,
) -> impl futures::Stream<Item = Result<Deployment, watcher::Error>> + Send + 'static {
    let mut ready: HashMap<(String, String), i32> = HashMap::new();
    events.filter_map(move |event| {
        let changed = match event {
            Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) => {
                let key = (d.namespace().unwrap_or_default(), d.name_any());
                let now = d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or_default();
                let before = ready.insert(key, now);
                (before.is_some_and(|b| b != now)).then_some(Ok(d))
            }
            Ok(watcher::Event::Delete(d)) => {
                ready.remove(&(d.namespace().unwrap_or_default(), d.name_any()));
                Some(Ok(d))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        };
        if let Some(Ok(d)) = &changed
            && let Some((ns, name)) = owner_of(d)
        {
            metrics.triggered(super::metrics::EVENT_PUBLISHER, &ns, &name);
        }
        futures::future::ready(changed)
    })
}

/// Runs the EventPublisher controller until `shutdown` resolves. `namespace` limits it to one
/// namespace (the Roles-per-namespace mode); all namespaces otherwise.
pub async fn run(
    client: kube::Client,
    namespace: Option<String>,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    run_with_metrics(client, namespace, settings, Arc::default(), shutdown).await
}

/// [`run`], recording into `metrics`.
pub async fn run_with_metrics(
    client: kube::Client,
    namespace: Option<String>,
    settings: Settings,
    metrics: Arc<super::metrics::OperatorMetrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    fn api<K>(client: &kube::Client, namespace: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    use super::metrics::EVENT_PUBLISHER;
    let concurrency = settings.concurrency;
    let mut ctx = Context::new(client.clone(), settings, metrics.clone())?;
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=inventory-outbox-operator");

    // The publishers' cache without managed fields (the controller never reads them), and
    // reconciles only for changes to what the reconcile acts on: spec (generation, which
    // deletion bumps too), finalizers, labels and annotations. Status writes, the
    // controller's own included, trigger nothing; the periodic requeue keeps status fresh.
    let (reader, writer) = reflector::store();
    let queued = metrics.clone();
    let publishers = watcher(
        api::<DeserializeGuard<EventPublisher>>(&client, &namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|p| p.managed_fields_mut().clear())
    .reflect(writer)
    .applied_objects()
    .predicate_filter(
        predicates::generation
            .combine(predicates::finalizers)
            .combine(predicates::labels)
            .combine(predicates::annotations),
        PredicateConfig::default(),
    )
    .inspect(move |p| {
        if let Ok(p) = p {
            queued.triggered(EVENT_PUBLISHER, &p.namespace().unwrap_or_default(), &p.name_any());
        }
    });

    // Children, metadata only and not cached (the PDBs' names excepted): a deleted child
    // wakes its owner at once, and a Deployment whose ready replicas changed does (through a
    // full watch: the count is in its status). The creation and updates this controller
    // makes itself wake nobody, and edits by others are put right by the periodic requeue.
    let (pdb_reader, pdb_writer) = reflector::store();
    ctx.pdbs = Some(pdb_reader);
    let ctx = Arc::new(ctx);
    let pdbs = watcher(
        api::<PartialObjectMeta<PodDisruptionBudget>>(&client, &namespace),
        owned.clone(),
    )
    .default_backoff()
    .modify(|p| p.managed_fields_mut().clear())
    .reflect(pdb_writer);
    let deployments = watcher(api::<Deployment>(&client, &namespace), owned.clone()).default_backoff();
    Controller::for_stream(publishers, reader)
        .owns_stream(deletions(
            watcher(api::<PartialObjectMeta<ConfigMap>>(&client, &namespace), owned.clone()).default_backoff(),
            metrics.clone(),
        ))
        .owns_stream(deletions(
            watcher(api::<PartialObjectMeta<Service>>(&client, &namespace), owned).default_backoff(),
            metrics.clone(),
        ))
        .owns_stream(deletions(pdbs, metrics.clone()))
        .owns_stream(readiness_changes(deployments, metrics))
        .with_config(kube::runtime::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(name = %object.name, namespace = ?object.namespace, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile round failed"),
            }
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(status: serde_json::Value) -> Error {
        Error::Apply {
            kind: "ConfigMap",
            name: "orders-relay".to_owned(),
            source: kube::Error::Api(Box::new(serde_json::from_value(status).unwrap())),
        }
    }

    #[test]
    fn a_refusal_in_a_terminating_namespace_is_told_apart_from_other_refusals() {
        let terminating = refused(serde_json::json!({
            "status": "Failure", "code": 403, "reason": "Forbidden",
            "message": "configmaps \"orders-relay\" is forbidden: unable to create new content in namespace shop because it is being terminated",
            "details": {"name": "orders-relay", "kind": "configmaps",
                        "causes": [{"reason": "NamespaceTerminating", "message": "namespace shop is being terminated", "field": "metadata.namespace"}]}
        }));
        assert!(terminating.namespace_terminating());
        let rbac = refused(serde_json::json!({
            "status": "Failure", "code": 403, "reason": "Forbidden",
            "message": "configmaps is forbidden: User \"system:serviceaccount:x:y\" cannot patch resource \"configmaps\""
        }));
        assert!(!rbac.namespace_terminating());
        assert!(!Error::Finalizer("x".to_owned()).namespace_terminating());
    }

    #[test]
    fn only_a_pause_of_running_relays_and_a_resume_after_a_pause_are_events() {
        assert_eq!(pause_event_reason(Some("False"), "True"), Some("Paused"));
        assert_eq!(pause_event_reason(Some("True"), "False"), Some("Resumed"));
        // The first status of a publisher created paused, or created running.
        assert_eq!(pause_event_reason(None, "True"), None);
        assert_eq!(pause_event_reason(None, "False"), None);
        assert_eq!(pause_event_reason(Some("True"), "True"), None);
    }
}
