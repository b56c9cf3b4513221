-- A replay fixes its end (the settled last position) when it first starts; a restarted Pod
-- must read up to the same end, not to wherever the outbox has grown since. `runs` counts
-- the Pods that worked on the replay (a resume is run 2 or later).
ALTER TABLE replay_checkpoints ADD COLUMN end_position bigint;
ALTER TABLE replay_checkpoints ADD COLUMN runs integer NOT NULL DEFAULT 0;
