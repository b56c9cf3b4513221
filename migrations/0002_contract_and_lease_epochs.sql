-- The SQL contract of docs/EVENTS.md enforced for every writer (raw SQL included), and lease
-- epochs that fence a relay's cursor writes to the lease it read under.

-- An identifier as the library limits it (`event::validate`): at most 256 bytes, no control
-- characters (Unicode Cc); required ones not blank. Only called to name the problem once the
-- fast combined check in the trigger below has failed.
CREATE FUNCTION events_id_problem(field text, value text, required boolean) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value IS NULL THEN
        RETURN CASE WHEN required THEN field || ' is missing' END;
    END IF;
    IF required AND btrim(value) = '' THEN
        RETURN field || ' is empty';
    END IF;
    IF octet_length(value) > 256 THEN
        RETURN format('%s is %s bytes long; the limit is 256', field, octet_length(value));
    END IF;
    IF value ~ '[\x01-\x1f\x7f-\u009f]' THEN
        RETURN field || ' contains control characters';
    END IF;
    RETURN NULL;
END
$$;

-- Same trigger as 0001, with the contract checked first: a refused row takes no lock and no
-- position, and the whole statement (so the writer's transaction) fails. The checks run on
-- every insert, so the common path is plain expressions (no function calls, one regex) and
-- one index lookup for the schema version; the event types are spelled out here (a test
-- keeps them equal to `EventType::ALL`).
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
    IF NOT EXISTS (SELECT 1 FROM schema_versions v
                   WHERE v.subject = NEW.event_type AND v.version = NEW.event_version) THEN
        RAISE EXCEPTION 'invalid event: no schema registered for % version %', NEW.event_type, NEW.event_version
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
