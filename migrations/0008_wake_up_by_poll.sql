-- A consumer may poll instead of being woken by NOTIFY (`outbox.wakeUp: poll`). PostgreSQL
-- queues a transaction's notifications at commit under one database-wide lock held through
-- the commit itself, so notifying writers commit one after another: 16 concurrent
-- single-event writers lose 20-40 % of their throughput to it (BENCHMARKS.md). Each worker's
-- heartbeat says how it wants to be woken, and the statement trigger notifies unless every
-- running worker polls. With no running worker at all it still notifies: a worker that starts
-- reads the outbox at once anyway, and an application listening on the channel keeps working.
--
-- The check reads the heartbeat table with the writer's snapshot, so a writer in a
-- REPEATABLE READ transaction sees a worker's change of mode from its next transaction on;
-- a missed wake-up only costs latency (the poll interval), never an event.
ALTER TABLE worker_heartbeats ADD COLUMN wake_by_notify boolean NOT NULL DEFAULT true;

CREATE OR REPLACE FUNCTION events_notify() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    -- bool_or over no rows is NULL: notify.
    IF (SELECT bool_or(wake_by_notify) FROM worker_heartbeats WHERE stopped_at IS NULL)
       IS DISTINCT FROM false THEN
        PERFORM pg_notify('outbox_events', '');
    END IF;
    RETURN NULL;
END
$$;
