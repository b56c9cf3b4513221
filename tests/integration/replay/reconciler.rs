//! The ReplayJob controller (in this process) against the real API server, Job controller,
//! garbage collector and node agent: the replay runs as a real Pod of a real Job, with the
//! publisher's Secret mounted and its relay ConfigMap (rendered by the operator's own build).

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use uuid::Uuid;

use inventory_outbox::crd::EventPublisher;
use inventory_outbox::crd::replay_job::{ReplayJob, ReplayPhase};
use inventory_outbox::operator::build::{BuildContext, build};
use inventory_outbox::operator::reconcile::Settings;
use inventory_outbox::operator::replayjob;

use super::*;
use crate::event_core::{publisher, stock_changed};
use crate::operator::install_crds;
use crate::support::cluster::{self, container_pid, create, wait_for};
use crate::support::kube::{admin_client, create_namespace};
use crate::support::{database_url, kafka_bootstrap, unique_name};

/// A namespace with a migrated outbox holding `events` StockLevelChanged events, the
/// EventPublisher `orders` (Kafka, routing to `topic`), its database Secret and the relay
/// ConfigMap the operator would render for it.
struct Fixture {
    client: kube::Client,
    ns: crate::support::kube::TestNamespace,
    db: crate::support::postgres::TestDatabase,
    topic: String,
    written: Vec<inventory_outbox::event::DomainEvent>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Fixture {
    async fn new(prefix: &str, events: usize) -> Self {
        let client = admin_client().await;
        install_crds(&client).await;
        let ns = create_namespace(&client, prefix).await;
        let (db, publisher) = publisher(&prefix.replace('-', "_")).await;
        let items: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
        let mut written = Vec::new();
        for sequence in 1..=(events / items.len()) as i64 {
            let mut tx = db.pool.begin().await.expect("begin");
            let drafts = items.iter().map(|i| stock_changed(*i, sequence)).collect();
            written.extend(publisher.publish_events(&mut tx, drafts).await.expect("publish"));
            tx.commit().await.expect("commit");
        }
        let topic = unique_name("replay-e2e");
        let (server, _) = database_url()
            .rsplit_once('/')
            .map(|(s, d)| (s.to_owned(), d.to_owned()))
            .expect("url");
        create::<Secret>(
            &client,
            &ns,
            json!({"metadata": {"name": "orders-db"}, "stringData": {"url": format!("{server}/{}", db.name)}}),
        )
        .await;
        let publishers: Api<EventPublisher> = Api::namespaced(client.clone(), &ns);
        let ep: EventPublisher = serde_json::from_value(json!({
            "apiVersion": "outbox.inventory.io/v1alpha1",
            "kind": "EventPublisher",
            "metadata": {"name": "orders", "namespace": ns},
            "spec": {
                "outbox": {"databaseUrlSecretRef": {"name": "orders-db", "key": "url"}},
                "broker": {"kafka": {"bootstrapServers": kafka_bootstrap()}},
                "routing": {"strategy": "single", "destination": topic},
                "paused": true
            }
        }))
        .expect("EventPublisher");
        Self {
            client,
            ns,
            db,
            topic,
            written,
            stop: None,
        }
        .with_publisher(publishers, ep)
        .await
    }

    async fn with_publisher(self, publishers: Api<EventPublisher>, ep: EventPublisher) -> Self {
        let created = publishers
            .create(&PostParams::default(), &ep)
            .await
            .expect("create EventPublisher");
        // The relay ConfigMap exactly as the EventPublisher controller renders it.
        let validated = inventory_outbox::operator::validate::validate(&created).expect("valid publisher");
        let children = build(&validated, &BuildContext { image: String::new() }).expect("build");
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &children.config_map)
            .await
            .expect("create relay ConfigMap");
        self
    }

    fn start_controller(&mut self) {
        let image = cluster::register_test_image();
        let mut settings = Settings {
            requeue_after: Duration::from_secs(2),
            ..Settings::default()
        };
        settings.build.image = image;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(stop);
        tokio::spawn(replayjob::run(
            self.client.clone(),
            Some(self.ns.clone()),
            settings,
            async move {
                let _ = stopped.await;
            },
        ));
    }

    fn replays(&self) -> Api<ReplayJob> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn create_replay(&self, name: &str, spec: serde_json::Value) {
        let job: ReplayJob = serde_json::from_value(json!({
            "apiVersion": "outbox.inventory.io/v1alpha1", "kind": "ReplayJob",
            "metadata": {"name": name}, "spec": spec
        }))
        .expect("ReplayJob");
        self.replays()
            .create(&PostParams::default(), &job)
            .await
            .expect("create ReplayJob");
    }

    /// Waits until `check` accepts the ReplayJob's status.
    async fn wait_status(
        &self,
        name: &str,
        within: Duration,
        what: &str,
        check: impl Fn(&inventory_outbox::crd::ReplayJobStatus) -> bool,
    ) -> inventory_outbox::crd::ReplayJobStatus {
        let replays = self.replays();
        wait_for(&self.client, &self.ns, within, what, async || {
            let r = replays.get_opt(name).await.ok()??;
            r.status.filter(|s| check(s))
        })
        .await
    }

    async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        cluster::delete_namespace(&self.client, &self.ns).await;
        self.db.drop().await;
    }
}

fn condition(s: &inventory_outbox::crd::ReplayJobStatus, t: &str) -> Option<(String, String, String)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_job_waits_for_its_publisher_runs_as_a_job_pod_survives_kill_9_and_reports_its_counts() {
    let client = admin_client().await;
    install_crds(&client).await;
    // First: a ReplayJob whose publisher does not exist is Pending with a condition, no Job.
    let mut lonely = Fixture {
        client: client.clone(),
        ns: create_namespace(&client, "replay-lonely").await,
        db: crate::support::postgres::TestDatabase::create("replay_lonely").await,
        topic: String::new(),
        written: Vec::new(),
        stop: None,
    };
    lonely.start_controller();
    lonely
        .create_replay("orphan", json!({"publisherRef": {"name": "nobody"}}))
        .await;
    let s = lonely
        .wait_status("orphan", Duration::from_secs(30), "PublisherFound False", |s| {
            condition(s, "PublisherFound").is_some_and(|c| c.0 == "False")
        })
        .await;
    assert_eq!(s.phase, Some(ReplayPhase::Pending));
    let (_, reason, message) = condition(&s, "PublisherFound").expect("condition");
    assert_eq!(reason, "PublisherNotFound");
    assert!(message.contains("nobody"), "{message}");
    let jobs: Api<Job> = Api::namespaced(client.clone(), &lonely.ns);
    assert!(
        jobs.list(&ListParams::default()).await.expect("jobs").items.is_empty(),
        "no Job without a publisher"
    );
    lonely.finish().await;

    // Then the real thing: 300 events at 40/s, so the Pod runs long enough to be killed.
    let mut f = Fixture::new("replay-e2e", 300).await;
    f.start_controller();
    f.create_replay(
        "nightly",
        json!({"publisherRef": {"name": "orders"}, "rateLimit": 40, "target": {"destination": f.topic}}),
    )
    .await;
    let running = f
        .wait_status("nightly", Duration::from_secs(60), "Running with a checkpoint", |s| {
            s.phase == Some(ReplayPhase::Running) && s.checkpoint.unwrap_or(0) > 0
        })
        .await;
    assert_eq!(running.matched, Some(300), "{running:?}");
    assert!(running.start_time.is_some());
    let job = jobs_of(&f).await;
    let owner = &job.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("ReplayJob", "nightly"));

    // kill -9 the replay process: the Job controller starts a new Pod, which resumes.
    let pods = cluster::pods(&f.client, &f.ns, "outbox.inventory.io/replayjob=nightly").await;
    let pid = pods
        .iter()
        .find_map(|p| container_pid(p, "replay"))
        .expect("replay container pid");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let done = f
        .wait_status("nightly", Duration::from_secs(120), "Succeeded", |s| {
            matches!(s.phase, Some(ReplayPhase::Succeeded | ReplayPhase::Failed))
        })
        .await;
    assert_eq!(done.phase, Some(ReplayPhase::Succeeded), "{done:?}");
    assert_eq!((done.matched, done.failed), (Some(300), Some(0)), "{done:?}");
    assert!(done.replayed.unwrap_or(0) >= 300, "{done:?}");
    assert_eq!(done.progress.as_deref(), Some("100%"));
    assert!(done.completion_time.is_some());
    let pods = cluster::pods(&f.client, &f.ns, "outbox.inventory.io/replayjob=nightly").await;
    assert!(pods.len() >= 2, "a second Pod resumed: {} Pod(s)", pods.len());

    let received = collect(
        &consumer(&f.topic),
        Duration::from_secs(60),
        Duration::from_secs(2),
        |r| r.iter().map(|x| x.event.event_id).collect::<HashSet<_>>().len() >= f.written.len(),
    )
    .await;
    let unique: HashSet<Uuid> = received.iter().map(|r| r.event.event_id).collect();
    assert_eq!(unique.len(), f.written.len(), "every event arrived");
    let duplicates = received.len() - unique.len();
    println!("replay Pod killed with kill -9 and resumed: {duplicates} duplicate(s) of 300");
    assert!(
        duplicates <= 80,
        "at most the batch in flight (2 s at 40/s) is re-sent: {duplicates}"
    );
    assert!(
        received
            .iter()
            .all(|r| r.replay_job.as_deref() == Some(&format!("{}/nightly", f.ns)))
    );
    let events: Vec<String> = Api::<k8s_openapi::api::events::v1::Event>::namespaced(f.client.clone(), &f.ns)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        events.contains(&"ReplayStarted".to_owned()) && events.contains(&"ReplaySucceeded".to_owned()),
        "{events:?}"
    );
    f.finish().await;
}

async fn jobs_of(f: &Fixture) -> Job {
    Api::<Job>::namespaced(f.client.clone(), &f.ns)
        .get("nightly-replay")
        .await
        .expect("the replay Job")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_running_replay_job_ends_its_pod_and_job_and_says_cancelled() {
    let mut f = Fixture::new("replay-cancel", 200).await;
    f.start_controller();
    // A dry run through the whole chain: counts, sends nothing, Succeeded.
    f.create_replay(
        "count",
        json!({"publisherRef": {"name": "orders"}, "dryRun": true, "target": {"destination": f.topic},
               "filter": {"aggregateIds": [f.written[0].aggregate_id]}}),
    )
    .await;
    let counted = f
        .wait_status("count", Duration::from_secs(60), "dry run finished", |s| {
            matches!(s.phase, Some(ReplayPhase::Succeeded | ReplayPhase::Failed))
        })
        .await;
    assert_eq!(counted.phase, Some(ReplayPhase::Succeeded), "{counted:?}");
    assert_eq!((counted.matched, counted.replayed), (Some(20), Some(0)), "{counted:?}");
    f.create_replay(
        "slow",
        json!({"publisherRef": {"name": "orders"}, "rateLimit": 5, "dryRun": false,
                                    "target": {"destination": f.topic}}),
    )
    .await;
    f.wait_status("slow", Duration::from_secs(60), "Running", |s| {
        s.phase == Some(ReplayPhase::Running)
    })
    .await;
    f.replays()
        .delete("slow", &DeleteParams::default())
        .await
        .expect("delete ReplayJob");
    let cancelled = f
        .wait_status("slow", Duration::from_secs(30), "Cancelled", |s| {
            s.phase == Some(ReplayPhase::Cancelled)
        })
        .await;
    assert!(cancelled.completion_time.is_some());
    let replays = f.replays();
    let jobs: Api<Job> = Api::namespaced(f.client.clone(), &f.ns);
    let (client, ns) = (f.client.clone(), f.ns.clone());
    wait_for(
        &client,
        &ns,
        Duration::from_secs(60),
        "ReplayJob, Job and Pod gone",
        async || {
            let pods = cluster::pods(&client, &ns, "outbox.inventory.io/replayjob=slow").await;
            let job = jobs.get_opt("slow-replay").await.ok()?;
            let replay = replays.get_opt("slow").await.ok()?;
            (pods.is_empty() && job.is_none() && replay.is_none()).then_some(())
        },
    )
    .await;
    f.finish().await;
}
