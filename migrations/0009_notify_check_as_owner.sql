-- The NOTIFY trigger's look at worker_heartbeats (0008) runs with the function owner's
-- rights, so a writing role needs no SELECT on that table: a role that could append events
-- before 0008 (INSERT on events, USAGE on its sequence, SELECT on schema_versions) still can.
-- A SECURITY DEFINER function must not resolve names through the caller's temporary schema,
-- which PostgreSQL searches first unless named: pin the outbox schema, then pg_temp last.
ALTER FUNCTION events_notify() SECURITY DEFINER;
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION events_notify() SET search_path = %I, pg_temp', current_schema());
END
$$;
