//! An operator's decision on a failed event sticks: a resolve (or a delivery) made while an
//! attempt was in flight is not undone by that attempt's outcome.

use chrono::Utc;
use inventory_outbox::store::failed::{FailedEventQuery, FailedEvents, FailedStatus};
use inventory_outbox::store::outbox::{OutboxReader, SHARDS};
use uuid::Uuid;

use super::{publisher, stock_changed};

const CONSUMER: &str = "decisions";

async fn status(failed: &FailedEvents, event_id: Uuid) -> (FailedStatus, i32) {
    let rows = failed
        .list(&FailedEventQuery {
            consumer: Some(CONSUMER.to_owned()),
            limit: 100,
            ..FailedEventQuery::default()
        })
        .await
        .unwrap();
    let row = rows.iter().find(|r| r.event_id == event_id).expect("failed event row");
    (row.status, row.attempts)
}

#[tokio::test]
async fn a_resolve_made_while_a_retry_is_in_flight_sticks() {
    let (db, publisher) = publisher("resolvesticks").await;
    let failed = FailedEvents::new(publisher.store().clone());
    let mut tx = db.pool.begin().await.unwrap();
    let written = publisher
        .publish_events(
            &mut tx,
            vec![stock_changed(Uuid::now_v7(), 1), stock_changed(Uuid::now_v7(), 1)],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let reader = OutboxReader::new(publisher.store().clone(), CONSUMER);
    let shards: Vec<i16> = (0..SHARDS).collect();
    reader.ensure_cursors(&shards).await.unwrap();
    let first_read = reader.read(&shards, 10).await.unwrap();
    reader.commit(first_read.advance).await.unwrap();
    let stored = first_read.events;
    let (fails_again, gets_delivered) = (&stored[0], &stored[1]);
    assert_eq!(stored.len(), written.len());

    // Both failed once and are due now.
    for e in &stored {
        failed
            .record_attempt(CONSUMER, e, "broker down", Some(Utc::now()))
            .await
            .unwrap()
            .expect("first failure recorded");
    }
    let due = failed.due_heads(CONSUMER, &shards, 10).await.unwrap();
    assert_eq!(due.len(), 2, "both heads due");

    // The relay took both heads for a retry; meanwhile an operator resolves them.
    for e in &stored {
        let before = failed
            .resolve(CONSUMER, e.event.event_id, "handled by hand")
            .await
            .unwrap()
            .expect("resolvable");
        assert_eq!(before.status, FailedStatus::Retrying);
    }
    // The in-flight attempts end: one fails again, one is delivered.
    let recorded = failed
        .record_attempt(CONSUMER, fails_again, "broker down", Some(Utc::now()))
        .await
        .unwrap();
    assert!(
        recorded.is_none(),
        "a failure after the resolve was recorded: {recorded:?}"
    );
    failed
        .mark_delivered(CONSUMER, gets_delivered.event.event_id)
        .await
        .unwrap();

    assert_eq!(
        status(&failed, fails_again.event.event_id).await,
        (FailedStatus::Resolved, 1),
        "the resolve was undone by a late failure"
    );
    assert_eq!(
        status(&failed, gets_delivered.event.event_id).await.0,
        FailedStatus::Resolved,
        "the resolve was overwritten by a late delivery"
    );
    assert!(
        failed.due_heads(CONSUMER, &shards, 10).await.unwrap().is_empty(),
        "a resolved event is due again"
    );
    assert!(failed.blocked_aggregates(CONSUMER).await.unwrap().is_empty());

    // A delivered event stays delivered when a stale failure of it arrives.
    let mut tx = db.pool.begin().await.unwrap();
    publisher
        .publish_event(&mut tx, stock_changed(Uuid::now_v7(), 1))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let third = reader.read(&shards, 10).await.unwrap().events.remove(0);
    failed
        .record_attempt(CONSUMER, &third, "timeout", Some(Utc::now()))
        .await
        .unwrap();
    failed.mark_delivered(CONSUMER, third.event.event_id).await.unwrap();
    let late = failed
        .record_attempt(CONSUMER, &third, "timeout", Some(Utc::now()))
        .await
        .unwrap();
    assert!(late.is_none());
    assert_eq!(status(&failed, third.event.event_id).await.0, FailedStatus::Delivered);
    db.drop().await;
}
