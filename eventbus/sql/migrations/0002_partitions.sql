-- eventbus schema, version 2: ownership of the key partitions, fenced in the database; claims in event id order.
-- Stop every relay of the schema before applying it: a relay of 0.1.0 neither checks the ownership recorded here
-- nor claims in event id order.
-- A relay owns a partition while its lease runs; a takeover bumps the epoch. Claims take keyed rows only from
-- partitions the claiming relay owns, record the epoch on the row, and settling checks owner and epoch in the
-- same statement, so a relay that lost a partition can neither claim nor settle its rows.

CREATE TABLE __schema__.eventbus_partitions (
    partition   smallint    PRIMARY KEY,
    owner       text,
    epoch       bigint      NOT NULL DEFAULT 0,
    lease_until timestamptz
);
INSERT INTO __schema__.eventbus_partitions (partition) SELECT generate_series(0, 31);

-- The partition epoch a keyed row was claimed under (NULL for rows without a key, or not claimed).
ALTER TABLE __schema__.eventbus_outbox ADD COLUMN claimed_epoch bigint;

-- Claims walk pending rows in event id order: a retry or continuation row keeps its event's id, and so its
-- place among the key's events (row ids are made when a row is inserted).
CREATE INDEX eventbus_outbox_pending_events ON __schema__.eventbus_outbox (event_id) INCLUDE (available_at, partition)
    WHERE status = 0;
DROP INDEX __schema__.eventbus_outbox_pending;
