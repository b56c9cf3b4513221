//! The figures a relay serves on its status endpoint (and the operator copies into the
//! EventPublisher status): backlog, failed events and the workers' heartbeats of one publisher.

use chrono::{DateTime, Utc};

use super::{Store, StoreError, sql};

/// One publisher's delivery figures, read in one call.
#[derive(Clone, Debug, PartialEq)]
pub struct PublisherFigures {
    /// Committed events not yet delivered: above the publisher's cursors, or read and parked
    /// (retrying or held); dead-lettered ones are not pending.
    pub pending_events: i64,
    /// Commit time of the oldest of them.
    pub oldest_pending_at: Option<DateTime<Utc>>,
    /// Failed events waiting for their next attempt.
    pub retrying: i64,
    /// Events held behind an earlier failed event of their aggregate.
    pub held: i64,
    /// Events that exhausted their retries and are not redelivered or resolved.
    pub dead_lettered: i64,
    /// Events delivered to the broker, counted from the store (see [`publisher_figures`]).
    pub published: i64,
    /// When any worker of the publisher last had an event acknowledged.
    pub last_published_at: Option<DateTime<Utc>>,
    /// Workers whose heartbeat is recent enough to count as alive.
    pub workers: Vec<WorkerFigures>,
}

/// One live worker's heartbeat (a row of `worker_heartbeats`, read by column name).
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct WorkerFigures {
    pub worker_id: String,
    /// `closed`, `half_open` or `open`: the worst of the worker's destinations.
    pub circuit_state: String,
    pub last_seen_at: DateTime<Utc>,
    pub published_total: i64,
    pub failed_total: i64,
    pub dead_lettered_total: i64,
    pub last_published_at: Option<DateTime<Utc>>,
}

/// Committed events of one consumer not delivered yet.
#[derive(Clone, Debug, PartialEq)]
pub struct Backlog {
    pub events: i64,
    /// Commit time of the oldest of them.
    pub oldest_at: Option<DateTime<Utc>>,
    /// Its age by the database's clock, in seconds (0 without a backlog).
    pub oldest_age_seconds: f64,
}

/// The one definition of "pending" (the status endpoint, the library's
/// `get_publisher_status` and the relay's backlog gauge all use it): events above the
/// consumer's cursors, and events already read but parked (held behind a failure or an open
/// circuit, or waiting for a retry). Without the parked ones a broker outage would show 0
/// pending and an ever-younger oldest event, exactly when the backlog matters. Dead-lettered
/// events are not pending. With `owner`, only the shards that worker leases.
pub async fn backlog(store: &Store, consumer: &str, owner: Option<&str>) -> Result<Backlog, StoreError> {
    let schema = store.schema();
    let statement = format!(
        "SELECT count(*), min(recorded_at), coalesce(extract(epoch FROM now() - min(recorded_at))::float8, 0) \
         FROM ( \
           SELECT e.recorded_at FROM {schema}.relay_cursors c \
           JOIN {schema}.events e ON e.shard = c.shard AND e.position > c.position \
           WHERE c.consumer = $1 AND ($2::text IS NULL OR c.owner = $2) \
           UNION ALL \
           SELECT e.recorded_at FROM {schema}.failed_events f JOIN {schema}.events e ON e.event_id = f.event_id \
           WHERE f.consumer = $1 AND f.status IN ('retrying', 'held') \
             AND ($2::text IS NULL OR EXISTS (SELECT 1 FROM {schema}.relay_cursors c \
                  WHERE c.consumer = $1 AND c.shard = e.shard AND c.owner = $2))) undelivered"
    );
    let (events, oldest_at, oldest_age_seconds): (i64, Option<DateTime<Utc>>, f64) = sqlx::query_as(sql(statement))
        .bind(consumer)
        .bind(owner)
        .fetch_one(store.pool())
        .await
        .map_err(StoreError::query("count pending events"))?;
    Ok(Backlog {
        events,
        oldest_at,
        oldest_age_seconds,
    })
}

/// Reads the figures of `consumer`; workers count as alive when seen within `alive_within`.
pub async fn publisher_figures(
    store: &Store,
    consumer: &str,
    alive_within: std::time::Duration,
) -> Result<PublisherFigures, StoreError> {
    let schema = store.schema();
    let pool = store.pool();
    let backlog = backlog(store, consumer, None).await?;
    let failed = format!(
        "SELECT count(*) FILTER (WHERE status = 'retrying'), count(*) FILTER (WHERE status = 'held'), \
         count(*) FILTER (WHERE status = 'dead_lettered') FROM {schema}.failed_events WHERE consumer = $1"
    );
    let (retrying, held, dead_lettered): (i64, i64, i64) = sqlx::query_as(sql(failed))
        .bind(consumer)
        .fetch_one(pool)
        .await
        .map_err(StoreError::query("count failed events"))?;
    // Published = passed by the publisher's cursors and not (or no longer) failed: redriven
    // dead letters count once delivered. Counted from the store rather than summed from the
    // workers' heartbeat counters, which start at zero in every process and go with a stopped
    // relay's row, so a rollout or a crash made the figure drop. A transaction that commits
    // below a cursor counts a round before the relay has sent its late rows. The count reads
    // every published event's index entry, per status request.
    let published = format!(
        "SELECT count(*) FROM {schema}.relay_cursors c \
         JOIN {schema}.events e ON e.shard = c.shard AND e.position <= c.position \
         WHERE c.consumer = $1 AND NOT EXISTS (SELECT 1 FROM {schema}.failed_events f \
             WHERE f.consumer = $1 AND f.event_id = e.event_id AND f.status <> 'delivered')"
    );
    let published: i64 = sqlx::query_scalar(sql(published))
        .bind(consumer)
        .fetch_one(pool)
        .await
        .map_err(StoreError::query("count published events"))?;
    let workers = worker_heartbeats(store, consumer, Some(alive_within)).await?;
    // Over every row, stopped and silent ones included: after a rollout the new relay may
    // have nothing to send for a while, and the publisher's last publish is still a fact.
    let last = format!("SELECT max(last_published_at) FROM {schema}.worker_heartbeats WHERE consumer = $1");
    let last_published_at: Option<DateTime<Utc>> = sqlx::query_scalar(sql(last))
        .bind(consumer)
        .fetch_one(pool)
        .await
        .map_err(StoreError::query("read the last publish time"))?;
    Ok(PublisherFigures {
        last_published_at,
        pending_events: backlog.events,
        oldest_pending_at: backlog.oldest_at,
        retrying,
        held,
        dead_lettered,
        published,
        workers,
    })
}

/// The heartbeat rows of `consumer`'s workers that did not stop, by worker id; with
/// `alive_within`, only those seen that recently.
pub async fn worker_heartbeats(
    store: &Store,
    consumer: &str,
    alive_within: Option<std::time::Duration>,
) -> Result<Vec<WorkerFigures>, StoreError> {
    let schema = store.schema();
    let statement = format!(
        "SELECT worker_id, circuit_state, last_seen_at, published_total, failed_total, dead_lettered_total, \
         last_published_at FROM {schema}.worker_heartbeats \
         WHERE consumer = $1 AND stopped_at IS NULL \
           AND ($2::float8 IS NULL OR last_seen_at > now() - make_interval(secs => $2)) \
         ORDER BY worker_id"
    );
    sqlx::query_as::<_, WorkerFigures>(sql(statement))
        .bind(consumer)
        .bind(alive_within.map(|d| d.as_secs_f64()))
        .fetch_all(store.pool())
        .await
        .map_err(StoreError::query("read worker heartbeats"))
}
