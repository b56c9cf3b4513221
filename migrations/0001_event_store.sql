-- Event store, outbox publication state, failed events, worker heartbeats, schema registry
-- and replay checkpoints. Run with `search_path` set to the publisher's schema (default
-- `outbox`); functions pin that search_path so writers from any session resolve our tables.

-- Append-only event store. `position` is the global order used by replay; it is assigned by
-- the trigger below *after* a per-aggregate advisory lock, so for one aggregate position order
-- equals commit order whichever client writes the rows.
CREATE SEQUENCE event_position_seq AS bigint;

CREATE TABLE events (
    position        bigint      PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    event_type      text        NOT NULL CHECK (event_type <> ''),
    event_version   integer     NOT NULL CHECK (event_version > 0),
    aggregate_type  text        NOT NULL CHECK (aggregate_type <> ''),
    aggregate_id    text        NOT NULL CHECK (aggregate_id <> ''),
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    correlation_id  text,
    causation_id    text,
    user_id         text,
    source          text,
    traceparent     text,
    payload         jsonb       NOT NULL,
    -- 64 shards by aggregate hash: relay replicas split the shards between them.
    shard           smallint    NOT NULL CHECK (shard BETWEEN 0 AND 63),
    -- Top-level transaction id of the writer: the reader uses it to pick up late commits.
    txid            xid8        NOT NULL
);

CREATE INDEX events_shard_position ON events (shard, position);
CREATE INDEX events_txid ON events (txid);
CREATE INDEX events_recorded_at ON events (recorded_at);
CREATE INDEX events_occurred_at ON events (occurred_at);
CREATE INDEX events_type_position ON events (event_type, position);
CREATE INDEX events_aggregate_position ON events (aggregate_type, aggregate_id, position);

CREATE FUNCTION events_before_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    aggregate_key integer := hashtext(NEW.aggregate_type || '/' || NEW.aggregate_id);
BEGIN
    -- The transaction id first: a reader's snapshot must know this transaction is running
    -- before any position of it exists.
    NEW.txid := pg_current_xact_id();
    -- Class 1869574770 spells 'outr': keeps our locks apart from the application's own.
    PERFORM pg_advisory_xact_lock(1869574770, aggregate_key);
    NEW.position := nextval('event_position_seq');
    NEW.shard := (aggregate_key & 63)::smallint;
    RETURN NEW;
END
$$;

CREATE TRIGGER events_before_insert BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_before_insert();

CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event store is append-only: % is not allowed', TG_OP;
END
$$;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();

-- Coalesced wake-up hint for relays: at most one NOTIFY per transaction, however many rows.
CREATE FUNCTION events_notify() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_notify('outbox_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();

-- Publication state: one cursor per (consumer, shard). A consumer is a publisher or an
-- in-process handler group. See `src/store/outbox.rs` for the reading algorithm:
--   position       every event at or below it is handled, except rows of `watched_txids`;
--   watched_txids  transactions in progress when `position` last moved (may commit below it);
--   watch_from     ... and every transaction id from this one up (a running transaction
--                  whose id is at or above a snapshot's xmax is not in its xip list);
--   late_txids     finished watched transactions whose rows are being read in position order,
--   late_after     ... up to this position so far.
CREATE TABLE relay_cursors (
    consumer          text        NOT NULL,
    shard             smallint    NOT NULL CHECK (shard BETWEEN 0 AND 63),
    position          bigint      NOT NULL DEFAULT 0,
    watched_txids     xid8[]      NOT NULL DEFAULT '{}',
    watch_from        xid8        NOT NULL DEFAULT '0',
    late_txids        xid8[]      NOT NULL DEFAULT '{}',
    late_after        bigint      NOT NULL DEFAULT 0,
    owner             text,
    lease_expires_at  timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, shard)
);

-- Events whose delivery failed, per consumer. `held` rows wait behind an earlier failed event
-- of the same aggregate, so per-aggregate order survives retries.
CREATE TABLE failed_events (
    consumer         text        NOT NULL,
    event_id         uuid        NOT NULL REFERENCES events (event_id),
    position         bigint      NOT NULL,
    event_type       text        NOT NULL,
    aggregate_type   text        NOT NULL,
    aggregate_id     text        NOT NULL,
    status           text        NOT NULL
        CHECK (status IN ('retrying', 'held', 'dead_lettered', 'resolved', 'delivered')),
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error       text,
    first_failed_at  timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    next_retry_at    timestamptz,
    resolved_at      timestamptz,
    resolution       text,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

CREATE INDEX failed_events_due ON failed_events (consumer, next_retry_at)
    WHERE status = 'retrying';
CREATE INDEX failed_events_aggregate ON failed_events (consumer, aggregate_type, aggregate_id, position)
    WHERE status IN ('retrying', 'held');
CREATE INDEX failed_events_status ON failed_events (consumer, status, first_failed_at);

-- Relay workers report liveness and health here; the operator reads it into the CR status.
CREATE TABLE worker_heartbeats (
    consumer             text        NOT NULL,
    worker_id            text        NOT NULL,
    started_at           timestamptz NOT NULL DEFAULT now(),
    last_seen_at         timestamptz NOT NULL DEFAULT now(),
    circuit_state        text        NOT NULL DEFAULT 'closed'
        CHECK (circuit_state IN ('closed', 'open', 'half_open')),
    published_total      bigint      NOT NULL DEFAULT 0,
    failed_total         bigint      NOT NULL DEFAULT 0,
    dead_lettered_total  bigint      NOT NULL DEFAULT 0,
    last_published_at    timestamptz,
    owned_shards         smallint[]  NOT NULL DEFAULT '{}',
    details              jsonb       NOT NULL DEFAULT '{}',
    PRIMARY KEY (consumer, worker_id)
);

-- Schema registry: one subject per event type, versioned schemas, a compatibility mode.
CREATE TABLE schema_subjects (
    subject        text        PRIMARY KEY,
    compatibility  text        NOT NULL CHECK (compatibility IN (
        'NONE', 'BACKWARD', 'BACKWARD_TRANSITIVE', 'FORWARD', 'FORWARD_TRANSITIVE', 'FULL', 'FULL_TRANSITIVE')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE schema_versions (
    subject        text        NOT NULL REFERENCES schema_subjects (subject),
    version        integer     NOT NULL CHECK (version > 0),
    schema         jsonb       NOT NULL,
    fingerprint    text        NOT NULL,
    -- Id assigned by a mirrored Confluent-compatible registry, when mirroring is on.
    external_id    integer,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, version),
    UNIQUE (subject, fingerprint)
);

-- Replay progress, so an interrupted replay resumes where it stopped.
CREATE TABLE replay_checkpoints (
    replay_id    text        PRIMARY KEY,
    position     bigint      NOT NULL DEFAULT 0,
    matched      bigint      NOT NULL DEFAULT 0,
    replayed     bigint      NOT NULL DEFAULT 0,
    failed       bigint      NOT NULL DEFAULT 0,
    state        text        NOT NULL DEFAULT 'running'
        CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
