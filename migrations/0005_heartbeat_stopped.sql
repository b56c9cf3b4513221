-- A worker that stops gracefully marks its heartbeat row stopped instead of deleting it, so
-- the publisher's last publish time survives a rollout (the new Pod may have nothing to send
-- for a while). Stopped rows and rows of workers gone for ten minutes are pruned by the next
-- live worker's heartbeat, which first folds their last publish time into its own row.
ALTER TABLE worker_heartbeats ADD COLUMN stopped_at timestamptz;
