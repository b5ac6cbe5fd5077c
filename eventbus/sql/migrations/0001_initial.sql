-- eventbus schema, version 1: the outbox, the shared dead-letter table, the consumer inbox, relay heartbeats.
-- __schema__ is replaced by the validated, quoted schema name when the file is loaded.

CREATE TABLE __schema__.eventbus_outbox (
    id              uuid        PRIMARY KEY,
    event_id        uuid        NOT NULL,
    tenant          text        NOT NULL DEFAULT '',
    topic           text        NOT NULL,
    key             text,
    partition       smallint,
    target          text,
    payload         jsonb       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status          smallint    NOT NULL DEFAULT 0 CHECK (status IN (0, 1, 2, 3)),  -- pending, in_flight, published, dead
    attempts        integer     NOT NULL DEFAULT 0,
    available_at    timestamptz NOT NULL DEFAULT now(),
    claimed_by      text,
    claimed_until   timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    idempotency_key text
);

-- Claims walk pending rows in id order; this index holds only pending rows, so published history costs nothing.
CREATE INDEX eventbus_outbox_pending ON __schema__.eventbus_outbox (id) INCLUDE (available_at, partition)
    WHERE status = 0;
-- Reclaiming rows of relays that died.
CREATE INDEX eventbus_outbox_in_flight ON __schema__.eventbus_outbox (claimed_until) WHERE status = 1;
-- Time ranges and retention (UUIDv7 ids grow with time).
CREATE INDEX eventbus_outbox_id_brin ON __schema__.eventbus_outbox USING brin (id uuid_minmax_ops);
-- Producer idempotency: one row per (tenant, idempotency_key).
CREATE UNIQUE INDEX eventbus_outbox_idempotency ON __schema__.eventbus_outbox (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE __schema__.eventbus_dead_letters (
    id           uuid        PRIMARY KEY,
    source       text        NOT NULL DEFAULT 'event' CHECK (source IN ('event', 'job')),
    reason       text        NOT NULL CHECK (reason IN ('DeliveryFailed', 'DeserializationFailed', 'DuplicateEvent',
                                                        'HandlerMissing', 'HandlerTimeout')),
    event_id     uuid        NOT NULL,
    outbox_id    uuid,
    tenant       text        NOT NULL DEFAULT '',
    topic        text        NOT NULL,
    key          text,
    subscriber   text,
    payload      jsonb       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    attempts     integer     NOT NULL DEFAULT 0,
    error_type   text,
    error        text,
    failed_at    timestamptz NOT NULL DEFAULT now(),
    replayed_at  timestamptz,
    replay_count integer     NOT NULL DEFAULT 0
);

CREATE INDEX eventbus_dead_letters_id_brin ON __schema__.eventbus_dead_letters USING brin (id uuid_minmax_ops);
CREATE INDEX eventbus_dead_letters_reason ON __schema__.eventbus_dead_letters (reason, subscriber);

CREATE TABLE __schema__.eventbus_inbox (
    subscriber   text        NOT NULL,
    event_id     uuid        NOT NULL,
    payload_hash bytea       NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscriber, event_id)
);

CREATE TABLE __schema__.eventbus_relays (
    worker       text        PRIMARY KEY,
    hostname     text        NOT NULL,
    pid          integer     NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    partitions   smallint[]  NOT NULL DEFAULT '{}'
);
