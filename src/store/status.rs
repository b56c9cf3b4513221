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
    /// Workers whose heartbeat is recent enough to count as alive.
    pub workers: Vec<WorkerFigures>,
}

/// One live worker's heartbeat.
#[derive(Clone, Debug, PartialEq)]
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

/// Reads the figures of `consumer`; workers count as alive when seen within `alive_within`.
pub async fn publisher_figures(
    store: &Store,
    consumer: &str,
    alive_within: std::time::Duration,
) -> Result<PublisherFigures, StoreError> {
    let schema = store.schema();
    let pool = store.pool();
    // Pending is everything committed and not yet delivered: events above the cursors, and
    // events the relay already read but parked (held behind a failure or an open circuit, or
    // waiting for a retry). Without the parked ones a broker outage would show 0 pending and an
    // ever-younger oldest event, exactly when the backlog matters.
    let pending = format!(
        "SELECT count(*), min(recorded_at) FROM ( \
           SELECT e.recorded_at FROM {schema}.relay_cursors c \
           JOIN {schema}.events e ON e.shard = c.shard AND e.position > c.position WHERE c.consumer = $1 \
           UNION ALL \
           SELECT e.recorded_at FROM {schema}.failed_events f JOIN {schema}.events e ON e.event_id = f.event_id \
           WHERE f.consumer = $1 AND f.status IN ('retrying', 'held')) undelivered"
    );
    let (pending_events, oldest_pending_at): (i64, Option<DateTime<Utc>>) = sqlx::query_as(sql(pending))
        .bind(consumer)
        .fetch_one(pool)
        .await
        .map_err(StoreError::query("count pending events"))?;
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
    let workers = format!(
        "SELECT worker_id, circuit_state, last_seen_at, published_total, failed_total, dead_lettered_total, \
         last_published_at FROM {schema}.worker_heartbeats \
         WHERE consumer = $1 AND last_seen_at > now() - make_interval(secs => $2) ORDER BY worker_id"
    );
    type Row = (String, String, DateTime<Utc>, i64, i64, i64, Option<DateTime<Utc>>);
    let rows: Vec<Row> = sqlx::query_as(sql(workers))
        .bind(consumer)
        .bind(alive_within.as_secs_f64())
        .fetch_all(pool)
        .await
        .map_err(StoreError::query("read worker heartbeats"))?;
    Ok(PublisherFigures {
        pending_events,
        oldest_pending_at,
        retrying,
        held,
        dead_lettered,
        published,
        workers: rows
            .into_iter()
            .map(
                |(
                    worker_id,
                    circuit_state,
                    last_seen_at,
                    published_total,
                    failed_total,
                    dead_lettered_total,
                    last_published_at,
                )| {
                    WorkerFigures {
                        worker_id,
                        circuit_state,
                        last_seen_at,
                        published_total,
                        failed_total,
                        dead_lettered_total,
                        last_published_at,
                    }
                },
            )
            .collect(),
    })
}
