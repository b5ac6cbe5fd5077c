-- eventbus schema, version 4: what an operator needs to find a dead letter's cause, and the metrics leader.
-- Expand only: the columns are nullable, so relays of the release before keep writing dead letters without them.

-- The formatted traceback of the attempt that failed last (capped, redacted), and the trace it ran in.
ALTER TABLE __schema__.eventbus_dead_letters ADD COLUMN traceback text, ADD COLUMN trace_id text;
