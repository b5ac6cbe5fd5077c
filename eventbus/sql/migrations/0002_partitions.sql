-- eventbus schema, version 2: ownership of the key partitions, fenced in the database.
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
