-- Aggregates a replay gave up on: once one of an aggregate's events was not delivered, its
-- later events in that replay are skipped, so no consumer sees them out of order. The set is
-- saved with the replay's checkpoint (same transaction), so a resumed run (a restarted Job
-- Pod, or `replay_events` called again with the same id) keeps them skipped instead of
-- starting with it empty.
CREATE TABLE replay_parked_aggregates (
    replay_id      text NOT NULL REFERENCES replay_checkpoints (replay_id) ON DELETE CASCADE,
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    parked_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (replay_id, aggregate_type, aggregate_id)
);
