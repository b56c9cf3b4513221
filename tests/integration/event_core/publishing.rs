//! Publishing inside the caller's transaction, validation before the store, handlers and replay.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use inventory_outbox::delivery::retry::RetryPolicy;
use inventory_outbox::event::{EventType, NewEvent};
use inventory_outbox::publisher::{
    HandlerError, InventoryEventPublisher, PublishError, PublisherConfig, ReplayOptions,
};
use inventory_outbox::store::events::EventRange;
use inventory_outbox::store::failed::{FailedEvent, FailedEventQuery, FailedStatus};
use tokio::sync::{Mutex, Notify, watch};
use uuid::Uuid;

use super::{publisher, publisher_with, stock_changed};

async fn event_count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox.events")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_rolled_back_transaction_leaves_no_event() {
    let (db, publisher) = publisher("rollback").await;
    let mut tx = db.pool.begin().await.unwrap();
    publisher
        .publish_event(&mut tx, stock_changed(Uuid::now_v7(), 1))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(event_count(&db.pool).await, 0);

    let mut tx = db.pool.begin().await.unwrap();
    let stored = publisher
        .publish_event(&mut tx, stock_changed(Uuid::now_v7(), 1))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(event_count(&db.pool).await, 1);
    let id: Uuid = sqlx::query_scalar("SELECT event_id FROM outbox.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(id, stored.event_id);
    db.drop().await;
}

#[tokio::test]
async fn an_invalid_event_rejects_its_whole_batch_and_names_the_problem() {
    let (db, publisher) = publisher("badbatch").await;
    let mut bad = stock_changed(Uuid::now_v7(), 2);
    bad.payload.as_object_mut().unwrap().remove("warehouseId");
    let batch = vec![stock_changed(Uuid::now_v7(), 1), bad, stock_changed(Uuid::now_v7(), 3)];
    let mut tx = db.pool.begin().await.unwrap();
    let err = publisher.publish_events(&mut tx, batch).await.unwrap_err();
    tx.commit().await.unwrap();
    let message = err.to_string();
    assert!(matches!(err, PublishError::Invalid { index: 1, .. }), "{message}");
    assert!(message.contains("event 1 (StockLevelChanged)"), "{message}");
    assert!(message.contains("\"warehouseId\" is a required property"), "{message}");
    assert_eq!(event_count(&db.pool).await, 0, "nothing of the batch was written");

    // An unregistered schema version is refused too.
    let mut v9 = stock_changed(Uuid::now_v7(), 1);
    v9.version = 9;
    let mut tx = db.pool.begin().await.unwrap();
    let err = publisher.publish_event(&mut tx, v9).await.unwrap_err().to_string();
    assert!(
        err.contains("version 9 of StockLevelChanged is not registered"),
        "{err}"
    );
    tx.rollback().await.unwrap();
    db.drop().await;
}

#[tokio::test]
async fn a_failed_statement_aborts_the_whole_batch() {
    let (db, publisher) = publisher("dupbatch").await;
    let existing = Uuid::now_v7();
    let mut tx = db.pool.begin().await.unwrap();
    publisher
        .publish_event(&mut tx, stock_changed(Uuid::now_v7(), 1).with_event_id(existing))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // The second event reuses a stored eventId: the database refuses the insert, and the
    // batch's other events are not written either.
    let batch = vec![
        stock_changed(Uuid::now_v7(), 1),
        stock_changed(Uuid::now_v7(), 1).with_event_id(existing),
    ];
    let mut tx = db.pool.begin().await.unwrap();
    let err = publisher.publish_events(&mut tx, batch).await.unwrap_err().to_string();
    assert!(err.contains("insert events"), "{err}");
    drop(tx);
    assert_eq!(event_count(&db.pool).await, 1);
    db.drop().await;
}

/// The dispatcher's failed events, in position order.
async fn handler_failures(publisher: &InventoryEventPublisher) -> Vec<FailedEvent> {
    publisher
        .get_failed_events(&FailedEventQuery {
            consumer: Some("handlers".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Waits until the dispatcher's failed events satisfy `ready`; a timeout prints them.
async fn wait_for_failures(
    publisher: &InventoryEventPublisher,
    what: &str,
    ready: impl Fn(&[FailedEvent]) -> bool,
) -> Vec<FailedEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let failed = handler_failures(publisher).await;
        if ready(&failed) {
            return failed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; failed events: {failed:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the publisher's handler dispatcher until the returned sender says stop.
fn dispatch(
    publisher: &InventoryEventPublisher,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<Result<(), PublishError>>) {
    let (stop, mut stopped) = watch::channel(false);
    let publisher = publisher.clone();
    let task = tokio::spawn(async move {
        publisher
            .run_handlers(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
    });
    (stop, task)
}

#[tokio::test]
async fn handlers_get_events_at_least_once_with_failures_retried_in_aggregate_order() {
    let config = PublisherConfig {
        handler_retry: RetryPolicy {
            initial_interval_ms: 50,
            max_interval_ms: 50,
            jitter: 0.0,
            ..RetryPolicy::default()
        },
        ..PublisherConfig::default()
    };
    let (db, publisher) = publisher_with("handlers", config).await;
    let seen = Arc::new(Mutex::new(Vec::<i64>::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    // The first event fails twice; its third attempt waits until the test has looked.
    let release = Arc::new(Notify::new());
    {
        let (seen, calls, release) = (seen.clone(), calls.clone(), release.clone());
        publisher.register_event_handler(
            EventType::StockLevelChanged,
            Arc::new(move |event: inventory_outbox::event::DomainEvent| {
                let (seen, calls, release) = (seen.clone(), calls.clone(), release.clone());
                async move {
                    let sequence = event.payload["newQuantity"].as_i64().unwrap_or_default();
                    if sequence == 1 {
                        match calls.fetch_add(1, Ordering::SeqCst) {
                            0 | 1 => return Err(HandlerError("downstream unavailable".into())),
                            _ => release.notified().await,
                        }
                    }
                    seen.lock().await.push(sequence);
                    Ok(())
                }
            }),
        );
    }
    let item = Uuid::now_v7();
    let mut tx = db.pool.begin().await.unwrap();
    publisher
        .publish_events(&mut tx, (1..=3).map(|s| stock_changed(item, s)).collect())
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let (stop, dispatcher) = dispatch(&publisher);
    // Event 1 failed twice; 2 and 3 wait behind it instead of overtaking it.
    let failed = wait_for_failures(&publisher, "event 1 to fail twice with 2 and 3 held", |f| {
        f.iter().map(|f| (f.status, f.attempts)).collect::<Vec<_>>()
            == [
                (FailedStatus::Retrying, 2),
                (FailedStatus::Held, 0),
                (FailedStatus::Held, 0),
            ]
    })
    .await;
    assert_eq!(failed[0].last_error.as_deref(), Some("downstream unavailable"));
    assert!(seen.lock().await.is_empty(), "{:?}", seen.lock().await);

    release.notify_one();
    wait_for_failures(&publisher, "every failed event to be delivered", |f| {
        f.iter().all(|f| f.status == FailedStatus::Delivered)
    })
    .await;
    assert_eq!(*seen.lock().await, vec![1, 2, 3]);
    assert_eq!(calls.load(Ordering::SeqCst), 3, "event 1 was handled three times");
    let status = publisher.get_publisher_status("handlers").await.unwrap();
    assert_eq!(
        (status.pending_events, status.retrying_events, status.held_events),
        (0, 0, 0)
    );
    stop.send(true).unwrap();
    dispatcher.await.unwrap().unwrap();
    db.drop().await;
}

#[tokio::test]
async fn dead_lettered_events_can_be_retried_and_resolved() {
    // One attempt each while the dispatcher runs: the next would be an hour away.
    let config = PublisherConfig {
        handler_retry: RetryPolicy {
            initial_interval_ms: 3_600_000,
            max_interval_ms: 3_600_000,
            ..RetryPolicy::default()
        },
        ..PublisherConfig::default()
    };
    let (db, publisher) = publisher_with("deadletter", config).await;
    publisher.register_event_handler(
        EventType::StockLevelChanged,
        Arc::new(|_event| async { Err(HandlerError("always fails".into())) }),
    );
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let mut tx = db.pool.begin().await.unwrap();
    let events = publisher
        .publish_events(&mut tx, vec![stock_changed(a, 1), stock_changed(b, 1)])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let (stop, dispatcher) = dispatch(&publisher);
    wait_for_failures(&publisher, "both events to fail once", |f| {
        f.len() == 2 && f.iter().all(|f| f.status == FailedStatus::Retrying && f.attempts == 1)
    })
    .await;
    stop.send(true).unwrap();
    dispatcher.await.unwrap().unwrap();
    sqlx::query("UPDATE outbox.failed_events SET status = 'dead_lettered', next_retry_at = NULL")
        .execute(&db.pool)
        .await
        .unwrap();

    let retried = publisher
        .retry_failed_event("handlers", events[0].event_id)
        .await
        .unwrap();
    assert_eq!(retried.previous_status, FailedStatus::DeadLettered);
    assert_eq!(retried.previous_attempts, 1);
    let resolved = publisher
        .resolve_failed_event("handlers", events[1].event_id, "duplicate order")
        .await
        .unwrap();
    assert_eq!(resolved.status, FailedStatus::DeadLettered);
    let rows = publisher
        .get_failed_events(&FailedEventQuery {
            consumer: Some("handlers".into()),
            statuses: vec![FailedStatus::Resolved],
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].resolution.as_deref(), Some("duplicate order"));

    let err = publisher
        .retry_failed_event("handlers", Uuid::now_v7())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no failed event"), "{err}");
    db.drop().await;
}

#[tokio::test]
async fn replay_delivers_the_selected_range_and_resumes_from_its_checkpoint() {
    let (db, publisher) = publisher("replay").await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        publisher.register_event_handler(
            EventType::StockLevelChanged,
            Arc::new(move |event: inventory_outbox::event::DomainEvent| {
                let seen = seen.clone();
                async move {
                    seen.lock().await.push(event.aggregate_id);
                    Ok(())
                }
            }),
        );
    }
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let mut tx = db.pool.begin().await.unwrap();
    let mut drafts: Vec<NewEvent> = (1..=5).map(|s| stock_changed(a, s)).collect();
    drafts.extend((1..=3).map(|s| stock_changed(b, s)));
    publisher.publish_events(&mut tx, drafts).await.unwrap();
    tx.commit().await.unwrap();

    let only_a = EventRange {
        aggregate_ids: vec![a.to_string()],
        ..Default::default()
    };
    let dry = publisher
        .replay_events(&ReplayOptions {
            replay_id: "dry".into(),
            range: only_a.clone(),
            dry_run: true,
            batch_size: 2,
        })
        .await
        .unwrap();
    assert_eq!((dry.matched, dry.replayed), (5, 0));
    assert!(seen.lock().await.is_empty(), "a dry run delivers nothing");

    let options = ReplayOptions {
        replay_id: "r1".into(),
        range: only_a,
        dry_run: false,
        batch_size: 2,
    };
    let result = publisher.replay_events(&options).await.unwrap();
    assert_eq!((result.matched, result.replayed, result.failed), (5, 5, 0));
    assert_eq!(*seen.lock().await, vec![a.to_string(); 5]);
    // Running the same replay id again resumes after its checkpoint: nothing new to deliver.
    let again = publisher.replay_events(&options).await.unwrap();
    assert_eq!(again.replayed, 5);
    assert_eq!(seen.lock().await.len(), 5);
    db.drop().await;
}

#[tokio::test]
async fn a_replayed_event_that_keeps_failing_is_retried_then_given_up_and_its_aggregate_stops() {
    let config = PublisherConfig {
        handler_retry: RetryPolicy {
            initial_interval_ms: 5,
            max_interval_ms: 20,
            max_attempts: 3,
            jitter: 0.0,
            ..RetryPolicy::default()
        },
        ..PublisherConfig::default()
    };
    let (db, publisher) = publisher_with("replaygiveup", config).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    // Every call in order, as (aggregate, sequence); a's second event always fails.
    let calls = Arc::new(Mutex::new(Vec::<(String, i64)>::new()));
    {
        let calls = calls.clone();
        let failing = a.to_string();
        publisher.register_event_handler(
            EventType::StockLevelChanged,
            Arc::new(move |event: inventory_outbox::event::DomainEvent| {
                let (calls, failing) = (calls.clone(), failing.clone());
                async move {
                    let sequence = event.payload["newQuantity"].as_i64().unwrap_or_default();
                    calls.lock().await.push((event.aggregate_id.clone(), sequence));
                    if event.aggregate_id == failing && sequence == 2 {
                        return Err(HandlerError("downstream refuses this one".into()));
                    }
                    Ok(())
                }
            }),
        );
    }
    let mut tx = db.pool.begin().await.unwrap();
    let mut drafts: Vec<NewEvent> = (1..=4).map(|s| stock_changed(a, s)).collect();
    drafts.extend((1..=3).map(|s| stock_changed(b, s)));
    publisher.publish_events(&mut tx, drafts).await.unwrap();
    tx.commit().await.unwrap();

    let result = publisher
        .replay_events(&ReplayOptions {
            replay_id: "give-up".into(),
            range: EventRange::default(),
            dry_run: false,
            batch_size: 3,
        })
        .await
        .unwrap();
    let calls = calls.lock().await.clone();
    assert_eq!(
        (result.matched, result.replayed, result.failed),
        (7, 4, 3),
        "a1 and b1..b3 replayed; a2 given up, a3 and a4 skipped behind it; calls: {calls:?}"
    );
    let of_a: Vec<i64> = calls
        .iter()
        .filter(|(id, _)| *id == a.to_string())
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(
        of_a,
        vec![1, 2, 2, 2],
        "a2 tried maxAttempts times, nothing of a after it"
    );
    let of_b: Vec<i64> = calls
        .iter()
        .filter(|(id, _)| *id == b.to_string())
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(of_b, vec![1, 2, 3], "another aggregate is not held back");
    db.drop().await;
}

#[tokio::test]
async fn a_resumed_replay_keeps_skipping_the_aggregate_an_earlier_run_gave_up_on() {
    let config = PublisherConfig {
        handler_retry: RetryPolicy {
            initial_interval_ms: 5,
            max_interval_ms: 5,
            max_attempts: 2,
            jitter: 0.0,
            ..RetryPolicy::default()
        },
        ..PublisherConfig::default()
    };
    let (db, publisher) = publisher_with("replayparked", config).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let calls = Arc::new(Mutex::new(Vec::<(String, i64)>::new()));
    // b1's handler never returns until released: the first run is stopped there.
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (calls, released, failing) = (calls.clone(), released.clone(), a.to_string());
        publisher.register_event_handler(
            EventType::StockLevelChanged,
            Arc::new(move |event: inventory_outbox::event::DomainEvent| {
                let (calls, released, failing) = (calls.clone(), released.clone(), failing.clone());
                async move {
                    let sequence = event.payload["newQuantity"].as_i64().unwrap_or_default();
                    calls.lock().await.push((event.aggregate_id.clone(), sequence));
                    if event.aggregate_id == failing && sequence == 2 {
                        return Err(HandlerError("downstream refuses this one".into()));
                    }
                    if event.aggregate_id != failing && !released.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    Ok(())
                }
            }),
        );
    }
    // In position order (one transaction each): a1, a2 (always refused), b1 (blocks the first
    // run), a3.
    for (aggregate, sequence) in [(a, 1), (a, 2), (b, 1), (a, 3)] {
        let mut tx = db.pool.begin().await.unwrap();
        publisher
            .publish_event(&mut tx, stock_changed(aggregate, sequence))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let options = ReplayOptions {
        replay_id: "parked".into(),
        range: EventRange::default(),
        dry_run: false,
        batch_size: 1,
    };

    // Run 1: a2 is given up (its checkpoint saved with a parked), then b1 blocks; the run is
    // dropped there, as a crashed process would stop.
    let b_reached = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !calls.lock().await.iter().any(|(id, _)| *id == b.to_string()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the first run never reached b1; calls: {:?}",
                calls.lock().await
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        result = publisher.replay_events(&options) => panic!("the first run finished though b1 blocks: {result:?}"),
        () = b_reached => {}
    }

    // Run 2 resumes after a2: b1 is delivered, a3 is still skipped behind the given-up a2.
    released.store(true, Ordering::SeqCst);
    let result = publisher.replay_events(&options).await.unwrap();
    let calls = calls.lock().await.clone();
    let of_a: Vec<i64> = calls
        .iter()
        .filter(|(id, _)| *id == a.to_string())
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(of_a, vec![1, 2, 2], "a2 tried twice, a3 never handed over: {calls:?}");
    assert_eq!(
        (result.matched, result.replayed, result.failed),
        (4, 2, 2),
        "a1 and b1 replayed, a2 given up, a3 skipped; calls: {calls:?}"
    );
    db.drop().await;
}
