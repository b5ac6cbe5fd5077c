-- eventbus schema, version 5: whether a relay can reach its broker.
-- Expand only: the column is nullable, so relays of the release before keep sending their heartbeats without it.

-- When the relay's broker (NATS) stopped answering, as of its last heartbeat; NULL while it answers, and for the
-- local transport.
ALTER TABLE __schema__.eventbus_relays ADD COLUMN broker_unreachable_since timestamptz;
