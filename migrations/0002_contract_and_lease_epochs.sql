-- The SQL contract of docs/EVENTS.md enforced for every writer (raw SQL included), and lease
-- epochs that fence a relay's cursor writes to the lease it read under.

-- Event types and the aggregate each belongs to (kept equal to `EventType::ALL` by a test).
CREATE TABLE event_types (
    event_type      text PRIMARY KEY,
    aggregate_type  text NOT NULL
);

INSERT INTO event_types (event_type, aggregate_type) VALUES
    ('InventoryItemCreated', 'InventoryItem'),
    ('InventoryItemUpdated', 'InventoryItem'),
    ('InventoryItemDeactivated', 'InventoryItem'),
    ('StockLevelChanged', 'InventoryItem'),
    ('StockTransferred', 'InventoryItem'),
    ('LowStockThresholdReached', 'InventoryItem'),
    ('Stockout', 'InventoryItem'),
    ('ItemAssignedToLocation', 'InventoryItem'),
    ('AllocationCreated', 'Allocation'),
    ('AllocationConfirmed', 'Allocation'),
    ('AllocationCancelled', 'Allocation'),
    ('AllocationFulfilled', 'Allocation'),
    ('WarehouseCreated', 'Warehouse'),
    ('WarehouseUpdated', 'Warehouse'),
    ('WarehouseBinCreated', 'Warehouse');

-- An identifier as the library limits it (`event::validate`): at most 256 bytes, no control
-- characters (Unicode Cc), and for required ones not blank.
CREATE FUNCTION events_check_id(field text, value text, required boolean) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value IS NULL THEN
        IF required THEN
            RAISE EXCEPTION 'invalid event: % is missing', field USING ERRCODE = 'check_violation';
        END IF;
        RETURN;
    END IF;
    IF required AND btrim(value) = '' THEN
        RAISE EXCEPTION 'invalid event: % is empty', field USING ERRCODE = 'check_violation';
    END IF;
    IF octet_length(value) > 256 THEN
        RAISE EXCEPTION 'invalid event: % is % bytes long; the limit is 256', field, octet_length(value)
            USING ERRCODE = 'check_violation';
    END IF;
    IF value ~ '[\x01-\x1f\x7f-\u009f]' THEN
        RAISE EXCEPTION 'invalid event: % contains control characters', field USING ERRCODE = 'check_violation';
    END IF;
END
$$;

-- Same trigger as 0001, with the contract checked first: a refused row takes no lock and
-- no position, and the whole statement (so the writer's transaction) fails.
CREATE OR REPLACE FUNCTION events_before_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    aggregate_key integer;
    expected_aggregate text;
BEGIN
    SELECT t.aggregate_type INTO expected_aggregate FROM event_types t WHERE t.event_type = NEW.event_type;
    IF expected_aggregate IS NULL THEN
        RAISE EXCEPTION 'invalid event: unknown event type %', quote_literal(left(NEW.event_type, 64))
            USING ERRCODE = 'check_violation', HINT = 'see docs/EVENTS.md for the event types';
    END IF;
    IF NEW.aggregate_type IS DISTINCT FROM expected_aggregate THEN
        RAISE EXCEPTION 'invalid event: % belongs to aggregate type %, not %',
            NEW.event_type, expected_aggregate, quote_literal(left(NEW.aggregate_type, 64))
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM schema_versions v
                   WHERE v.subject = NEW.event_type AND v.version = NEW.event_version) THEN
        RAISE EXCEPTION 'invalid event: no schema registered for % version %', NEW.event_type, NEW.event_version
            USING ERRCODE = 'check_violation';
    END IF;
    PERFORM events_check_id('aggregate_id', NEW.aggregate_id, true);
    PERFORM events_check_id('correlation_id', NEW.correlation_id, false);
    PERFORM events_check_id('causation_id', NEW.causation_id, false);
    PERFORM events_check_id('user_id', NEW.user_id, false);
    PERFORM events_check_id('source', NEW.source, false);
    PERFORM events_check_id('traceparent', NEW.traceparent, false);
    IF jsonb_typeof(NEW.payload) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'invalid event: payload must be a JSON object, not %', coalesce(jsonb_typeof(NEW.payload), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;

    aggregate_key := hashtext(NEW.aggregate_type || '/' || NEW.aggregate_id);
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

-- Bumped on every claim of a shard. A worker's cursor write carries the epoch it read
-- under, so a write from a lease that was lost (and maybe re-taken) in between is refused.
ALTER TABLE relay_cursors ADD COLUMN lease_epoch bigint NOT NULL DEFAULT 0;
