-- The registered-schema check moves from the per-row trigger to one check per statement.
-- Looking up schema_versions for every row was a query per row from PL/pgSQL (the rest of
-- the row checks are plain expressions): about a quarter of the time of a 1,000-row insert
-- (BENCHMARKS.md, "write path"). The statement-level trigger below reads the inserted rows'
-- distinct (event type, version) pairs from the transition table and looks each up once.
-- A row with an unregistered version now takes its lock and position before the statement
-- fails; the failure still rolls the whole statement (so the writer's transaction) back,
-- and a position drawn by a rolled-back insert is a gap like any aborted writer's.

CREATE OR REPLACE FUNCTION events_before_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    aggregate_key integer;
    expected_aggregate text;
    problem text;
BEGIN
    expected_aggregate := CASE NEW.event_type
        WHEN 'InventoryItemCreated' THEN 'InventoryItem'
        WHEN 'InventoryItemUpdated' THEN 'InventoryItem'
        WHEN 'InventoryItemDeactivated' THEN 'InventoryItem'
        WHEN 'StockLevelChanged' THEN 'InventoryItem'
        WHEN 'StockTransferred' THEN 'InventoryItem'
        WHEN 'LowStockThresholdReached' THEN 'InventoryItem'
        WHEN 'Stockout' THEN 'InventoryItem'
        WHEN 'ItemAssignedToLocation' THEN 'InventoryItem'
        WHEN 'AllocationCreated' THEN 'Allocation'
        WHEN 'AllocationConfirmed' THEN 'Allocation'
        WHEN 'AllocationCancelled' THEN 'Allocation'
        WHEN 'AllocationFulfilled' THEN 'Allocation'
        WHEN 'WarehouseCreated' THEN 'Warehouse'
        WHEN 'WarehouseUpdated' THEN 'Warehouse'
        WHEN 'WarehouseBinCreated' THEN 'Warehouse'
    END;
    IF expected_aggregate IS NULL THEN
        RAISE EXCEPTION 'invalid event: unknown event type %', quote_literal(left(NEW.event_type, 64))
            USING ERRCODE = 'check_violation', HINT = 'see docs/EVENTS.md for the event types';
    END IF;
    IF NEW.aggregate_type IS DISTINCT FROM expected_aggregate THEN
        RAISE EXCEPTION 'invalid event: % belongs to aggregate type %, not %',
            NEW.event_type, expected_aggregate, quote_literal(left(NEW.aggregate_type, 64))
            USING ERRCODE = 'check_violation';
    END IF;
    IF jsonb_typeof(NEW.payload) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'invalid event: payload must be a JSON object, not %', coalesce(jsonb_typeof(NEW.payload), 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    IF btrim(NEW.aggregate_id) = ''
       OR greatest(octet_length(NEW.aggregate_id), octet_length(NEW.correlation_id), octet_length(NEW.causation_id),
                   octet_length(NEW.user_id), octet_length(NEW.source), octet_length(NEW.traceparent)) > 256
       OR concat(NEW.aggregate_id, NEW.correlation_id, NEW.causation_id, NEW.user_id, NEW.source, NEW.traceparent)
          ~ '[\x01-\x1f\x7f-\u009f]' THEN
        problem := coalesce(
            events_id_problem('aggregate_id', NEW.aggregate_id, true),
            events_id_problem('correlation_id', NEW.correlation_id, false),
            events_id_problem('causation_id', NEW.causation_id, false),
            events_id_problem('user_id', NEW.user_id, false),
            events_id_problem('source', NEW.source, false),
            events_id_problem('traceparent', NEW.traceparent, false));
        RAISE EXCEPTION 'invalid event: %', problem USING ERRCODE = 'check_violation';
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

CREATE FUNCTION events_check_schema_versions() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    missing record;
BEGIN
    SELECT n.event_type, n.event_version INTO missing
      FROM (SELECT DISTINCT event_type, event_version FROM inserted) n
     WHERE NOT EXISTS (SELECT 1 FROM schema_versions v
                       WHERE v.subject = n.event_type AND v.version = n.event_version)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid event: no schema registered for % version %', missing.event_type, missing.event_version
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

-- Named to fire before events_notify (statement triggers of one event fire in name order).
CREATE TRIGGER events_check_schema_versions AFTER INSERT ON events
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION events_check_schema_versions();
