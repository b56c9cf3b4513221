//! Shard leases against the cursor commits of the same worker: no deadlock between them, and
//! a cursor move from a lease that was lost (even if re-taken since) is refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use inventory_outbox::store::leases::{HeartbeatReport, LeaseManager};
use inventory_outbox::store::outbox::{OutboxReader, SHARDS};
use uuid::Uuid;

use super::{publisher, stock_changed};

fn report() -> HeartbeatReport {
    HeartbeatReport {
        circuit_state: "closed",
        ..HeartbeatReport::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_renewals_and_cursor_commits_of_one_worker_never_deadlock() {
    const CONSUMER: &str = "deadlock-relay";
    let (db, publisher) = publisher("leaseorder").await;
    let store = publisher.store().clone();
    let shards: Vec<i16> = (0..SHARDS).collect();
    let reader = OutboxReader::new(store.clone(), CONSUMER).with_owner("w1");
    reader.ensure_cursors(&shards).await.unwrap();
    let leases = Arc::new(LeaseManager::new(store.clone(), CONSUMER, "w1", Duration::from_secs(6)));
    assert_eq!(
        leases.tick(&report()).await.unwrap(),
        shards,
        "one worker leases every shard"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (renewals, commits) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // Renewal at full speed, as a heartbeat during a round does.
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (leases, stop, errors, renewals) = (leases.clone(), stop.clone(), errors.clone(), renewals.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match leases.tick_during_round(&report()).await {
                    Ok(owned) => assert_eq!(owned.len(), 64, "a renewal lost shards"),
                    Err(e) => errors.lock().unwrap().push(format!("renewal: {e}")),
                }
                renewals.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Writers put events on many shards so every commit moves many cursors at once.
    {
        let (pool, publisher, stop) = (db.pool.clone(), publisher.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let mut tx = pool.begin().await.unwrap();
                let batch = (0..40).map(|_| stock_changed(Uuid::now_v7(), 1)).collect();
                publisher.publish_events(&mut tx, batch).await.unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    {
        let (reader, shards, stop, errors, commits) = (
            reader.clone(),
            shards.clone(),
            stop.clone(),
            errors.clone(),
            commits.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                // Small batches split the shards into groups with different states, so one
                // commit writes many rows with different values.
                let batch = match reader.read(&shards, 13).await {
                    Ok(b) => b,
                    Err(e) => {
                        errors.lock().unwrap().push(format!("read: {e}"));
                        continue;
                    }
                };
                match reader.commit(batch.advance).await {
                    Ok(outcome) => assert!(outcome.refused.is_empty(), "refused {:?}", outcome.refused),
                    Err(e) => errors.lock().unwrap().push(format!("commit: {e}")),
                }
                commits.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Runs until both sides have done enough work to have met (a loaded machine gets there
    // later, not less surely), or an error shows up.
    const ENOUGH: usize = 200;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(90)
        && errors.lock().unwrap().is_empty()
        && (commits.load(Ordering::Relaxed) < ENOUGH || renewals.load(Ordering::Relaxed) < ENOUGH)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    eprintln!(
        "{} renewals and {} commits in {:?}",
        renewals.load(Ordering::Relaxed),
        commits.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(
        errors.is_empty(),
        "{} failures, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert!(
        commits.load(Ordering::Relaxed) >= ENOUGH && renewals.load(Ordering::Relaxed) >= ENOUGH,
        "too few commits or renewals in 90 s to prove anything"
    );
    db.drop().await;
}

/// A database with 20 committed events, a reader of `consumer` owned by "w1", and w1 holding
/// every shard's lease.
struct Fenced {
    db: crate::support::postgres::TestDatabase,
    publisher: inventory_outbox::publisher::InventoryEventPublisher,
    shards: Vec<i16>,
    reader: OutboxReader,
    w1: LeaseManager,
    written: Vec<inventory_outbox::event::DomainEvent>,
}

async fn fenced(database: &str, consumer: &str) -> Fenced {
    let (db, publisher) = publisher(database).await;
    let store = publisher.store().clone();
    let shards: Vec<i16> = (0..SHARDS).collect();
    let reader = OutboxReader::new(store.clone(), consumer).with_owner("w1");
    reader.ensure_cursors(&shards).await.unwrap();
    let w1 = LeaseManager::new(store, consumer, "w1", Duration::from_secs(6));
    assert_eq!(w1.tick(&report()).await.unwrap().len(), 64);
    let mut tx = db.pool.begin().await.unwrap();
    let written = publisher
        .publish_events(&mut tx, (0..20).map(|_| stock_changed(Uuid::now_v7(), 1)).collect())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    Fenced {
        db,
        publisher,
        shards,
        reader,
        w1,
        written,
    }
}

#[tokio::test]
async fn a_cursor_move_read_under_a_lost_lease_is_refused_even_after_the_lease_is_retaken() {
    const CONSUMER: &str = "fenced-relay";
    let Fenced {
        db,
        publisher,
        shards,
        reader,
        w1,
        written,
    } = fenced("leasefence", CONSUMER).await;
    let store = publisher.store().clone();
    let stale = reader.read(&shards, 100).await.unwrap();
    assert_eq!(stale.events.len(), written.len());

    // The lease is lost and taken again (w1 released everything, then claimed it back):
    // same owner, new epoch. The move read under the old epoch must not land.
    w1.release_all().await.unwrap();
    assert_eq!(w1.tick(&report()).await.unwrap().len(), 64);
    let outcome = reader.commit(stale.advance).await.unwrap();
    assert_eq!(outcome.refused.len(), 64, "every shard's move refused: {outcome:?}");
    let positions: i64 = sqlx::query_scalar("SELECT max(position) FROM outbox.relay_cursors WHERE consumer = $1")
        .bind(CONSUMER)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(positions, 0, "no cursor moved");

    // A shard owned by another worker is not read at all.
    let w2 = LeaseManager::new(store.clone(), CONSUMER, "w2", Duration::from_secs(6));
    w1.release_all().await.unwrap();
    assert_eq!(w2.tick(&report()).await.unwrap().len(), 64);
    let batch = reader.read(&shards, 100).await.unwrap();
    assert!(
        batch.events.is_empty() && batch.advance.is_empty(),
        "w1 read w2's shards"
    );

    // Read under the current lease: the move lands.
    w2.release_all().await.unwrap();
    assert_eq!(w1.tick(&report()).await.unwrap().len(), 64);
    let fresh = reader.read(&shards, 100).await.unwrap();
    assert_eq!(fresh.events.len(), written.len());
    let outcome = reader.commit(fresh.advance).await.unwrap();
    assert!(outcome.refused.is_empty(), "{outcome:?}");
    db.drop().await;
}

#[tokio::test]
async fn a_batch_read_ahead_of_a_move_that_is_refused_is_refused_too() {
    const CONSUMER: &str = "fenced-ahead";
    let Fenced {
        db,
        shards,
        reader,
        w1,
        written,
        ..
    } = fenced("leaseahead", CONSUMER).await;

    // The next batch is read from where the first one's uncommitted move leaves the cursors.
    let first = reader.read(&shards, 10).await.unwrap();
    let ahead = reader.read_after(&shards, 10, &first.advance).await.unwrap();
    let mut ids: Vec<Uuid> = first
        .events
        .iter()
        .chain(&ahead.events)
        .map(|e| e.event.event_id)
        .collect();
    ids.sort();
    let mut want: Vec<Uuid> = written.iter().map(|e| e.event_id).collect();
    want.sort();
    assert_eq!((first.events.len(), ahead.events.len()), (10, 10));
    assert_eq!(ids, want, "the two batches split the events, none twice");

    // The lease is lost and retaken before either move lands: both are refused.
    w1.release_all().await.unwrap();
    assert_eq!(w1.tick(&report()).await.unwrap().len(), 64);
    assert!(!reader.commit(first.advance).await.unwrap().refused.is_empty());
    let outcome = reader.commit(ahead.advance).await.unwrap();
    assert!(!outcome.refused.is_empty(), "{outcome:?}");
    let moved: i64 = sqlx::query_scalar("SELECT max(position) FROM outbox.relay_cursors WHERE consumer = $1")
        .bind(CONSUMER)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(moved, 0, "no cursor moved");
    // Read again under the new lease: all 20 come back.
    let again = reader.read(&shards, 100).await.unwrap();
    assert_eq!(again.events.len(), written.len());
    db.drop().await;
}
