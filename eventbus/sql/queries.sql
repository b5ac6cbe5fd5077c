-- Named queries. Each block: a "-- name: NAME" header, one line of purpose, then its parameters as "-- $N name type".
-- __schema__ is replaced by the validated, quoted schema name when the file is loaded.

-- name: offer
-- Insert a batch of events in the caller's transaction; skip repeated idempotency keys; wake relays on commit.
-- (No conflict target: the partitioned layout has no unique index on (tenant, idempotency_key) to name; its
-- trigger skips a taken key, and the plain layout's unique index does.)
-- $1 ids uuid[]
-- $2 event_ids uuid[]
-- $3 tenants text[]
-- $4 topics text[]
-- $5 keys text[]
-- $6 partitions smallint[]
-- $7 targets text[]
-- $8 payloads text[]
-- $9 headers text[]
-- $10 delays_seconds float8[]
-- $11 idempotency_keys text[]
-- $12 channel text (NULL: wake nobody; relays find the rows by polling)
WITH rows AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::smallint[], $7::text[],
                         $8::text[], $9::text[], $10::float8[], $11::text[])
        AS r(id, event_id, tenant, topic, key, partition, target, payload, headers, delay, idempotency_key)
), inserted AS (
    INSERT INTO __schema__.eventbus_outbox
        (id, event_id, tenant, topic, key, partition, target, payload, headers, available_at, idempotency_key)
    SELECT id, event_id, tenant, topic, key, partition, target, payload::jsonb, headers::jsonb,
           CASE WHEN delay > 0 THEN now() + make_interval(secs => delay) ELSE now() END, idempotency_key
    FROM rows
    ON CONFLICT DO NOTHING
    RETURNING id, available_at
), wake AS (
    -- Identical notifications within one transaction are folded into one by PostgreSQL, and none is sent
    -- before commit or after a rollback. Rows delayed into the future wake nobody.
    SELECT pg_notify($12, '') FROM (SELECT 1 FROM inserted WHERE available_at <= now() LIMIT 1) AS due
    WHERE $12 IS NOT NULL
)
-- An inner join the planner cannot remove: a LEFT JOIN to an unused one-row subquery is dropped, and with it
-- the notification.
SELECT inserted.id, w.woken FROM inserted CROSS JOIN (SELECT count(*) AS woken FROM wake) AS w;

-- name: offer_one
-- The offer of a single event (the common case) without a wake-up; the command tag says whether it inserted.
-- A bare INSERT: the CTE that wakes relays (offer_one_waking) costs producers measurably (BENCHMARKS.md).
-- $1 id uuid
-- $2 event_id uuid
-- $3 tenant text
-- $4 topic text
-- $5 key text
-- $6 partition smallint
-- $7 target text
-- $8 payload text
-- $9 headers text
-- $10 delay_seconds float8
-- $11 idempotency_key text
INSERT INTO __schema__.eventbus_outbox
    (id, event_id, tenant, topic, key, partition, target, payload, headers, available_at, idempotency_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb,
        CASE WHEN $10::float8 > 0 THEN now() + make_interval(secs => $10::float8) ELSE now() END, $11)
ON CONFLICT DO NOTHING;

-- name: offer_one_waking
-- offer_one, waking relays on commit when the row is due (for transactions that are not the bus's own).
-- $1 id uuid
-- $2 event_id uuid
-- $3 tenant text
-- $4 topic text
-- $5 key text
-- $6 partition smallint
-- $7 target text
-- $8 payload text
-- $9 headers text
-- $10 delay_seconds float8
-- $11 idempotency_key text
-- $12 channel text
WITH inserted AS (
    INSERT INTO __schema__.eventbus_outbox
        (id, event_id, tenant, topic, key, partition, target, payload, headers, available_at, idempotency_key)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb,
            CASE WHEN $10::float8 > 0 THEN now() + make_interval(secs => $10::float8) ELSE now() END, $11)
    ON CONFLICT DO NOTHING
    RETURNING id, available_at
), wake AS (
    SELECT pg_notify($12, '') FROM inserted WHERE available_at <= now()
)
SELECT inserted.id, w.woken FROM inserted CROSS JOIN (SELECT count(*) AS woken FROM wake) AS w;

-- name: claim
-- Lease up to $1 due pending rows to worker $2 for $3 seconds, counting the attempt now; keyed rows only from
-- partitions $2 owns, recording the partition's epoch on the row. Fair across tenants: every tenant with pending
-- rows offers its oldest due rows (in event id order, up to 2/n of the batch each when n tenants have rows, and at
-- least 50), and the batch takes them in turn (each tenant's first, then each one's second, ...), so one tenant's
-- backlog never holds another's new events back; with one tenant, it is that tenant's oldest due rows. "more"
-- says a tenant offered as many rows as it could: it may have more due now, so the relay claims again at once.
-- $1 limit int
-- $2 worker text
-- $3 lease_seconds float8
-- $4 partitions smallint[] (NULL: every partition; rows without a key are always claimable)
-- $5 skip_targets text[] (rows targeted at these subscribers are left pending; NULL: none)
-- $6 skip_topics text[] (untargeted rows of these topics are left pending; NULL: none)
-- $7 carried_names text[] (with $8: the subscriber and topic pairs $2 delivers; NULL: take targeted rows whatever
--    the subscriptions say)
-- $8 carried_topics text[]
WITH RECURSIVE tenants AS (
    -- The tenants with pending rows, one index probe each (a loose index scan), with each one's first pending
    -- event id: the tenant's claim starts there, past the index entries of its rows settled since the last
    -- vacuum, which the probe walked once already.
    (SELECT o.tenant, o.event_id FROM __schema__.eventbus_outbox AS o WHERE o.status = 0
     ORDER BY o.tenant, o.event_id LIMIT 1)
    UNION ALL
    SELECT n.tenant, n.event_id FROM tenants AS t CROSS JOIN LATERAL (
        SELECT o.tenant, o.event_id FROM __schema__.eventbus_outbox AS o
        WHERE o.status = 0 AND o.tenant > t.tenant ORDER BY o.tenant, o.event_id LIMIT 1) AS n
), due AS (
    SELECT tenant, event_id AS first, least($1, greatest(50, ceil(2.0 * $1 / count(*) OVER ())))::int AS quota
    FROM tenants
), owned AS (
    -- Keyed rows only from partitions $2 owns now (the fence; $4 is the relay's own view of them). The shared
    -- lock keeps a takeover from committing before this claim does.
    SELECT ARRAY(SELECT p.partition FROM __schema__.eventbus_partitions AS p
                 WHERE p.owner = $2 AND p.lease_until > now() FOR SHARE) AS partitions
), offered AS (
    SELECT c.id, c.event_id, due.quota,
           row_number() OVER (PARTITION BY c.tenant ORDER BY c.event_id) AS turn,
           count(*) OVER (PARTITION BY c.tenant) AS offered
    FROM due CROSS JOIN owned CROSS JOIN LATERAL (
        SELECT r.id, r.event_id, r.tenant FROM __schema__.eventbus_outbox AS r
        WHERE r.status = 0 AND r.tenant = due.tenant AND r.event_id >= due.first AND r.available_at <= now()
          AND ($4::smallint[] IS NULL OR r.partition IS NULL OR r.partition = ANY($4::smallint[]))
          AND ($5::text[] IS NULL OR r.target IS NULL OR NOT r.target = ANY($5::text[]))
          AND ($6::text[] IS NULL OR r.target IS NOT NULL OR NOT r.topic = ANY($6::text[]))
          -- A row targeted at a paused subscriber waits; one targeted at an active subscriber, of a topic it is
          -- registered with, waits for a relay that carries it with that topic. Other targeted rows are taken
          -- (retired or unknown subscribers, topics they do not take: HandlerMissing, unless carried here after
          -- all).
          AND ($7::text[] IS NULL OR r.target IS NULL OR NOT EXISTS (
              SELECT 1 FROM __schema__.eventbus_subscriptions AS s
              WHERE s.name = r.target AND (s.state = 'paused' OR (
                  s.state = 'active' AND r.topic = ANY(s.topics) AND NOT EXISTS (
                      SELECT 1 FROM unnest($7::text[], $8::text[]) AS c(name, topic)
                      WHERE c.name = r.target AND c.topic = r.topic)))))
          AND (r.partition IS NULL OR r.partition = ANY(owned.partitions))
        ORDER BY r.event_id
        LIMIT due.quota
        FOR UPDATE SKIP LOCKED
    ) AS c
), picked AS (
    SELECT id FROM offered ORDER BY turn, event_id LIMIT $1
)
UPDATE __schema__.eventbus_outbox AS o
SET status = 1, claimed_by = $2, claimed_until = now() + make_interval(secs => $3), attempts = o.attempts + 1,
    claimed_epoch = (SELECT p.epoch FROM __schema__.eventbus_partitions AS p WHERE p.partition = o.partition)
-- An id array, not a join with picked: the primary key serves it whatever the plan guesses of the batch size.
-- status = 0: the rows are locked as pending, and the partitioned layout's plan touches the live partition only.
WHERE o.id = ANY(ARRAY(SELECT id FROM picked)) AND o.status = 0
RETURNING o.id, o.event_id, o.tenant, o.topic, o.key, o.target, o.payload::text AS payload, o.headers::text AS headers,
          o.attempts, o.created_at,
          -- Which of $2's subscribers are paused, as this claim saw them: their shares of these rows wait.
          ARRAY(SELECT s.name FROM __schema__.eventbus_subscriptions AS s
                WHERE s.state = 'paused' AND s.name = ANY($7::text[])) AS paused,
          EXISTS (SELECT FROM offered WHERE offered.offered >= offered.quota) AS more;

-- name: settle
-- Settle claimed rows in one statement: set their status, insert targeted retry rows and dead letters.
-- Only rows still leased to worker $1 at the claimed attempt (and, for keyed rows, in a partition $1 still owns
-- at the claimed epoch) are touched: a fenced settle.
-- $1 worker text
-- $2 ids uuid[]
-- $3 attempts int[]
-- $4 statuses smallint[] (0 pending again: retry in place or release, 2 relayed, 3 dead)
-- $5 retry_delays float8[] (seconds, for status 0)
-- $6 errors text[]
-- $7 retry_sources uuid[] (claimed row each targeted row is cut from)
-- $8 retry_ids uuid[]
-- $9 retry_targets text[]
-- $10 retry_attempts int[]
-- $11 retry_delays float8[]
-- $12 retry_errors text[]
-- $13 retry_leased bool[] (true: inserted as claimed by $1 for $21 seconds, a continuation being handled)
-- $14 dead_sources uuid[]
-- $15 dead_ids uuid[]
-- $16 dead_reasons text[]
-- $17 dead_subscribers text[]
-- $18 dead_attempts int[]
-- $19 dead_error_types text[]
-- $20 dead_errors text[]
-- $21 lease_seconds float8
-- $22 carried_names text[] (with $23: the subscriber and topic pairs $1 delivers; NULL: write no catch-up rows)
-- $23 carried_topics text[]
-- $24 refunds bool[] (per row of $2: true gives the claim's attempt back, for a row released before it ran;
--     NULL: none)
-- $25 dead_tracebacks text[] (per dead letter of $15)
-- $26 dead_trace_ids text[]
WITH absent AS (
    -- Registered subscribers that are not retired and that $1 does not deliver, by topic: each gets a targeted
    -- row of every untargeted row settled here (a rolling deploy, or a subscriber running elsewhere).
    SELECT s.name, t.topic
    FROM __schema__.eventbus_subscriptions AS s CROSS JOIN unnest(s.topics) AS t(topic)
    WHERE $22::text[] IS NOT NULL AND s.state <> 'retired'
    EXCEPT
    SELECT * FROM unnest($22::text[], $23::text[])
), settled AS (
    UPDATE __schema__.eventbus_outbox AS o
    -- A row that was dead here (no subscriber here, or each dead-lettered it) is relayed when a subscriber
    -- elsewhere still gets it.
    SET status = CASE WHEN u.status = 3 AND o.target IS NULL AND EXISTS (SELECT 1 FROM absent AS a
                                                                         WHERE a.topic = o.topic)
                      THEN 2 ELSE u.status END,
        claimed_by = NULL,
        claimed_until = NULL,
        published_at = CASE WHEN u.status = 2 OR (u.status = 3 AND o.target IS NULL AND EXISTS (
                                SELECT 1 FROM absent AS a WHERE a.topic = o.topic)) THEN now() END,
        available_at = CASE WHEN u.status = 0 THEN now() + make_interval(secs => u.delay) ELSE o.available_at END,
        attempts = CASE WHEN u.refund THEN o.attempts - 1 ELSE o.attempts END,
        last_error = coalesce(u.error, o.last_error)
    -- The worker travels as a column of u so that every condition on o is a join condition: a plain filter
    -- (claimed_by = $1, status = 1) made the planner expect one matching row, drive the join from a scan of
    -- the outbox and rescan unnest() once per row, a cost that grows with the square of the batch.
    -- claimed_by is set only while a row is claimed, so it also stands for "status = 1".
    FROM unnest($2::uuid[], $3::int[], $4::smallint[], $5::float8[], $6::text[],
                array_fill($1::text, ARRAY[cardinality($2::uuid[])]), $24::bool[])
        AS u(id, attempts, status, delay, error, worker, refund)
    -- o.id = ANY($2) besides the join: each partition of the partitioned layout is read through its primary key
    -- for these ids, whatever its statistics say (unanalyzed, a hash join read every partition whole).
    WHERE o.id = ANY($2::uuid[]) AND o.id = u.id AND o.attempts = u.attempts AND o.claimed_by = u.worker
      -- A keyed row settles only while its worker still owns the partition at the epoch it claimed it under.
      AND (o.partition IS NULL OR EXISTS (
          SELECT 1 FROM __schema__.eventbus_partitions AS p
          WHERE p.partition = o.partition AND p.owner = u.worker AND p.epoch = o.claimed_epoch))
    RETURNING o.id, o.event_id, o.tenant, o.topic, o.key, o.partition, o.payload, o.headers, o.claimed_epoch,
              o.target, u.status
), catch_up AS (
    INSERT INTO __schema__.eventbus_outbox (id, event_id, tenant, topic, key, partition, target, payload, headers)
    -- A UUIDv7 made here: the time in milliseconds over the first 48 bits of a random UUID, version bits 0111.
    SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                  PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                  FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid,
           s.event_id, s.tenant, s.topic, s.key, s.partition, a.name, s.payload, s.headers
    FROM settled AS s JOIN absent AS a ON a.topic = s.topic
    WHERE s.target IS NULL AND s.status <> 0
    RETURNING event_id
), retries AS (
    INSERT INTO __schema__.eventbus_outbox
        (id, event_id, tenant, topic, key, partition, target, payload, headers, attempts, available_at, last_error,
         status, claimed_by, claimed_until, claimed_epoch)
    SELECT r.id, s.event_id, s.tenant, s.topic, s.key, s.partition, r.target, s.payload, s.headers, r.attempts,
           now() + make_interval(secs => r.delay), r.error,
           CASE WHEN r.leased THEN 1 ELSE 0 END, CASE WHEN r.leased THEN $1 END,
           CASE WHEN r.leased THEN now() + make_interval(secs => $21::float8) END,
           CASE WHEN r.leased THEN s.claimed_epoch END
    FROM unnest($7::uuid[], $8::uuid[], $9::text[], $10::int[], $11::float8[], $12::text[], $13::bool[])
        AS r(source, id, target, attempts, delay, error, leased)
    JOIN settled AS s ON s.id = r.source
    RETURNING 1
), dead AS (
    INSERT INTO __schema__.eventbus_dead_letters
        (id, reason, event_id, outbox_id, tenant, topic, key, subscriber, payload, headers, attempts, error_type, error,
         traceback, trace_id)
    SELECT d.id, d.reason, s.event_id, s.id, s.tenant, s.topic, s.key, d.subscriber, s.payload, s.headers,
           d.attempts, d.error_type, d.error, d.traceback, d.trace_id
    FROM unnest($14::uuid[], $15::uuid[], $16::text[], $17::text[], $18::int[], $19::text[], $20::text[],
                $25::text[], $26::text[])
        AS d(source, id, reason, subscriber, attempts, error_type, error, traceback, trace_id)
    JOIN settled AS s ON s.id = d.source
    -- No subscriber here is no dead letter when a subscriber elsewhere gets the event.
    WHERE NOT (d.reason = 'HandlerMissing' AND d.subscriber IS NULL
               AND EXISTS (SELECT 1 FROM catch_up AS c WHERE c.event_id = s.event_id))
    RETURNING id, reason, subscriber, tenant
)
SELECT (SELECT count(*) FROM settled) AS settled, (SELECT count(*) FROM retries) AS retries,
       (SELECT count(*) FROM dead) AS dead, (SELECT count(*) FROM catch_up) AS caught_up,
       -- The letters written, as [id, reason, subscriber, tenant] (for the dead-letter counter and the log),
       -- NULL when none.
       (SELECT jsonb_agg(jsonb_build_array(id, reason, subscriber, tenant))::text FROM dead) AS letters;

-- name: renew
-- Extend the lease of rows worker $1 still holds.
-- $1 worker text
-- $2 ids uuid[]
-- $3 lease_seconds float8
-- Rows another statement has locked are skipped: that is the settling of their batch (so they need no lease),
-- and waiting for it could deadlock with it, the two taking the rows' locks in different orders.
WITH mine AS (
    SELECT o.id FROM __schema__.eventbus_outbox AS o
    WHERE o.id = ANY($2::uuid[]) AND o.claimed_by = $1 AND o.status = 1
      -- Rows of a partition $1 no longer owns are left to expire, for the new owner to reclaim.
      AND (o.partition IS NULL OR EXISTS (
          SELECT 1 FROM __schema__.eventbus_partitions AS p
          WHERE p.partition = o.partition AND p.owner = $1 AND p.epoch = o.claimed_epoch))
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE __schema__.eventbus_outbox
-- Never shorter than it is: a renewal that waited (behind the partitioned conversion, say) began earlier.
SET claimed_until = greatest(claimed_until, now() + make_interval(secs => $3))
WHERE id = ANY(ARRAY(SELECT id FROM mine));

-- name: reclaim
-- Return up to $1 claimed rows whose lease ran out (their relay died or stalled) to pending.
-- $1 limit int
WITH expired AS (
    SELECT id FROM __schema__.eventbus_outbox
    WHERE status = 1 AND claimed_until < now()
    ORDER BY claimed_until
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE __schema__.eventbus_outbox AS o
SET status = 0, claimed_by = NULL, claimed_until = NULL,
    last_error = coalesce(o.last_error, 'lease of ' || o.claimed_by || ' expired before the row was settled')
FROM expired
WHERE o.id = expired.id
RETURNING o.id;

-- name: outbox_purge
-- Delete up to $2 relayed and dead rows older than id $1 (a UUIDv7 time bound), oldest first. (A dead row's dead
-- letters were written with it, payload included.)
-- $1 before_id uuid
-- $2 limit int
WITH doomed AS (
    SELECT id FROM __schema__.eventbus_outbox
    WHERE id < $1 AND status IN (2, 3)
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM __schema__.eventbus_outbox AS o USING doomed WHERE o.id = doomed.id;

-- name: outbox_counts
-- Rows by status, and the age of the oldest due pending row.
SELECT
    count(*) FILTER (WHERE status = 0) AS pending,
    count(*) FILTER (WHERE status = 1) AS claimed,
    count(*) FILTER (WHERE status = 2) AS relayed,
    count(*) FILTER (WHERE status = 3) AS dead,
    extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 0 AND available_at <= now()))::float8
        AS oldest_pending_seconds
FROM __schema__.eventbus_outbox;

-- name: outbox_get
-- One outbox row by id.
-- $1 id uuid
SELECT id, event_id, tenant, topic, key, partition, target, payload::text AS payload, headers::text AS headers,
       status, attempts, available_at, claimed_by, claimed_until, last_error, created_at, published_at AS relayed_at,
       idempotency_key
FROM __schema__.eventbus_outbox WHERE id = $1;

-- name: dead_letter_list
-- Dead letters matching the filters, newest first, one page after cursor $8.
-- $1 reason text
-- $2 subscriber text
-- $3 topic text
-- $4 tenant text
-- $5 since_id uuid
-- $6 until_id uuid
-- $7 include_replayed bool
-- $8 before_id uuid (page cursor: the last id of the previous page)
-- $9 limit int
SELECT id, reason, event_id, outbox_id, tenant, topic, key, subscriber, payload::text AS payload,
       headers::text AS headers, attempts, error_type, error, traceback, trace_id, failed_at, replayed_at,
       replay_count
FROM __schema__.eventbus_dead_letters
-- The filter, written alike in dead_letter_pick: a NULL parameter matches every row.
WHERE ($1::text IS NULL OR reason = $1) AND ($2::text IS NULL OR subscriber = $2)
  AND ($3::text IS NULL OR topic = $3) AND ($4::text IS NULL OR tenant = $4)
  AND ($5::uuid IS NULL OR id >= $5) AND ($6::uuid IS NULL OR id <= $6)
  AND ($7::bool OR replayed_at IS NULL)
  AND ($8::uuid IS NULL OR id < $8)
ORDER BY id DESC
LIMIT $9;

-- name: dead_letter_get
-- One dead letter by id.
-- $1 id uuid
SELECT id, reason, event_id, outbox_id, tenant, topic, key, subscriber, payload::text AS payload,
       headers::text AS headers, attempts, error_type, error, traceback, trace_id, failed_at, replayed_at,
       replay_count
FROM __schema__.eventbus_dead_letters WHERE id = $1;

-- name: dead_letter_counts
-- Unreplayed dead letters by reason and subscriber.
SELECT reason, subscriber, count(*) AS count
FROM __schema__.eventbus_dead_letters
WHERE replayed_at IS NULL
GROUP BY reason, subscriber
ORDER BY reason, subscriber;

-- name: dead_letter_purge
-- Delete up to $2 dead letters older than id $1; only replayed ones unless $3.
-- $1 before_id uuid
-- $2 limit int
-- $3 include_unreplayed bool
WITH doomed AS (
    SELECT id FROM __schema__.eventbus_dead_letters
    WHERE id < $1 AND ($3::bool OR replayed_at IS NOT NULL)
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM __schema__.eventbus_dead_letters AS d USING doomed WHERE d.id = doomed.id;

-- name: inbox_enter
-- Record that subscriber $1 processes event $2 (payload hash $3), in the handler's transaction.
-- Returns inserted = true for a first delivery, else the hash recorded by the earlier one.
-- $1 subscriber text
-- $2 event_id uuid
-- $3 payload_hash bytea
-- $4 tenant text
WITH entered AS (
    INSERT INTO __schema__.eventbus_inbox (subscriber, event_id, payload_hash, tenant)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT DO NOTHING
    RETURNING payload_hash
)
SELECT true AS inserted, NULL::bytea AS existing_hash FROM entered
UNION ALL
SELECT false, i.payload_hash FROM __schema__.eventbus_inbox AS i
WHERE i.subscriber = $1 AND i.event_id = $2 AND NOT EXISTS (SELECT 1 FROM entered);

-- name: inbox_purge
-- Delete up to $2 inbox rows processed more than $1 seconds ago, except those of events with an unreplayed
-- dead letter (its replay must still find the effect recorded).
-- $1 older_than_seconds float8
-- $2 limit int
WITH doomed AS (
    SELECT i.subscriber, i.event_id FROM __schema__.eventbus_inbox AS i
    WHERE i.processed_at < now() - make_interval(secs => $1)
      AND NOT EXISTS (SELECT 1 FROM __schema__.eventbus_dead_letters AS d
                      WHERE d.event_id = i.event_id AND d.replayed_at IS NULL)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM __schema__.eventbus_inbox AS i USING doomed
WHERE i.subscriber = doomed.subscriber AND i.event_id = doomed.event_id;

-- name: inbox_seen
-- Whether subscriber $1 recorded event $2 as processed.
-- $1 subscriber text
-- $2 event_id uuid
SELECT EXISTS (SELECT 1 FROM __schema__.eventbus_inbox WHERE subscriber = $1 AND event_id = $2) AS seen;

-- name: relay_heartbeat
-- Register or refresh relay $1 with the partitions it owns and the subscribers it carries (with their topics);
-- bring each of those subscribers' topics up to what the live relays carrying it declare; return those of its
-- subscribers that are paused, and those no longer registered.
-- $1 worker text
-- $2 hostname text
-- $3 pid int
-- $4 partitions smallint[]
-- $5 carried jsonb ({"name": ["topic", ...], ...})
-- $6 live_seconds float8 (a relay is live when its heartbeat is this recent)
-- $7 unreachable_seconds float8 (how long its broker has not answered; NULL while it answers)
WITH beat AS (
    INSERT INTO __schema__.eventbus_relays (worker, hostname, pid, partitions, carried, broker_unreachable_since)
    VALUES ($1, $2, $3, $4, $5, now() - make_interval(secs => $7))
    ON CONFLICT (worker) DO UPDATE SET heartbeat_at = now(), partitions = EXCLUDED.partitions,
                                       carried = EXCLUDED.carried,
                                       broker_unreachable_since = EXCLUDED.broker_unreachable_since
), declared AS (
    -- What this relay carries, and what the other live relays carry of the same subscribers.
    SELECT c.key AS name, t.topic
    FROM jsonb_each($5::jsonb) AS c CROSS JOIN jsonb_array_elements_text(c.value) AS t(topic)
    UNION
    SELECT c.key, t.topic
    FROM __schema__.eventbus_relays AS r CROSS JOIN jsonb_each(r.carried) AS c
    CROSS JOIN jsonb_array_elements_text(c.value) AS t(topic)
    WHERE r.worker <> $1 AND r.heartbeat_at >= now() - make_interval(secs => $6) AND $5::jsonb ? c.key
), topics AS (
    SELECT name, array_agg(topic ORDER BY topic) AS topics FROM declared GROUP BY name
), seen AS (
    UPDATE __schema__.eventbus_subscriptions AS s SET last_seen = now(), topics = t.topics
    FROM topics AS t WHERE s.name = t.name
    RETURNING s.name, s.state
)
SELECT n.name, coalesce(seen.state, 'unregistered') AS state
FROM jsonb_object_keys($5::jsonb) AS n(name) LEFT JOIN seen ON seen.name = n.name
WHERE seen.state IS DISTINCT FROM 'active' AND seen.state IS DISTINCT FROM 'retired';

-- name: subscription_register
-- Register the subscribers relay $1 carries, as given in $2, with the topics the live relays carrying them declare
-- besides; one that was retired is registered again (a relay carries it), one that is paused stays paused.
-- Returns each with its state and whether it had been retired.
-- $1 worker text
-- $2 subscribers jsonb (an array of {"name": text, "topics": [text], "ordered": bool})
-- $3 live_seconds float8 (a relay is live when its heartbeat is this recent)
WITH given AS (
    SELECT * FROM jsonb_to_recordset($2::jsonb) AS g(name text, topics text[], ordered boolean)
), declared AS (
    SELECT g.name, t.topic FROM given AS g CROSS JOIN unnest(g.topics) AS t(topic)
    UNION
    SELECT c.key, t.topic
    FROM __schema__.eventbus_relays AS r CROSS JOIN jsonb_each(r.carried) AS c
    CROSS JOIN jsonb_array_elements_text(c.value) AS t(topic)
    WHERE r.worker <> $1 AND r.heartbeat_at >= now() - make_interval(secs => $3)
      AND c.key IN (SELECT name FROM given)
), topics AS (
    SELECT name, array_agg(topic ORDER BY topic) AS topics FROM declared GROUP BY name
), before AS (
    SELECT s.name, s.state FROM __schema__.eventbus_subscriptions AS s JOIN given USING (name)
), registered AS (
    INSERT INTO __schema__.eventbus_subscriptions AS s (name, topics, ordered)
    SELECT g.name, t.topics, g.ordered FROM given AS g JOIN topics AS t USING (name)
    ON CONFLICT (name) DO UPDATE
    SET topics = EXCLUDED.topics, ordered = EXCLUDED.ordered, last_seen = now(),
        state = CASE WHEN s.state = 'retired' THEN 'active' ELSE s.state END,
        state_changed = CASE WHEN s.state = 'retired' THEN now() ELSE s.state_changed END
    RETURNING s.name, s.state
), relay AS (
    UPDATE __schema__.eventbus_relays
    SET carried = (SELECT jsonb_object_agg(name, to_jsonb(topics)) FROM given)
    WHERE worker = $1
)
SELECT r.name, r.state, coalesce(b.state = 'retired', false) AS was_retired
FROM registered AS r LEFT JOIN before AS b USING (name) ORDER BY r.name;

-- name: subscription_list
-- Every registered subscriber with the live relays that carry it, its backlog and lag; $2 names one.
-- $1 within_seconds float8 (a relay is live when its heartbeat is this recent)
-- $2 name text (NULL: every subscriber)
SELECT s.name, s.topics, s.ordered, s.state, s.registered_at, s.last_seen, s.state_changed,
       ARRAY(SELECT r.worker FROM __schema__.eventbus_relays AS r
             WHERE r.carried ? s.name AND r.heartbeat_at >= now() - make_interval(secs => $1)
             ORDER BY r.worker) AS relays,
       (SELECT count(*) FROM __schema__.eventbus_outbox AS o
        WHERE o.status = 0 AND o.target = s.name) AS backlog,
       extract(epoch FROM now() - least(
           (SELECT min(o.created_at) FROM __schema__.eventbus_outbox AS o
            WHERE o.status = 0 AND o.target = s.name AND o.available_at <= now()),
           (SELECT min(o.created_at) FROM __schema__.eventbus_outbox AS o
            WHERE o.status IN (0, 1) AND o.target IS NULL AND o.topic = ANY(s.topics) AND o.available_at <= now())
       ))::float8 AS lag_seconds
FROM __schema__.eventbus_subscriptions AS s
WHERE $2::text IS NULL OR s.name = $2
ORDER BY s.name;

-- name: subscription_states
-- The state of each registered subscriber named in $1.
-- $1 names text[]
SELECT name, state FROM __schema__.eventbus_subscriptions WHERE name = ANY($1);

-- name: subscription_set_state
-- Set subscriber $1's state to $2; returns its state before, or no row when it is not registered.
-- $1 name text
-- $2 state text
WITH before AS (
    SELECT name, state FROM __schema__.eventbus_subscriptions WHERE name = $1 FOR UPDATE
)
UPDATE __schema__.eventbus_subscriptions AS s
SET state = $2, state_changed = CASE WHEN before.state <> $2 THEN now() ELSE s.state_changed END
FROM before WHERE s.name = before.name
RETURNING before.state AS previous;

-- name: relay_forget
-- Remove relay $1 (clean shutdown) and relays silent for more than $2 seconds.
-- $1 worker text
-- $2 stale_seconds float8
DELETE FROM __schema__.eventbus_relays
WHERE worker = $1 OR heartbeat_at < now() - make_interval(secs => $2);

-- name: relay_alive
-- Relays that sent a heartbeat within $1 seconds.
-- $1 within_seconds float8
SELECT worker, hostname, pid, started_at, heartbeat_at, partitions, broker_unreachable_since
FROM __schema__.eventbus_relays
WHERE heartbeat_at >= now() - make_interval(secs => $1)
ORDER BY worker;

-- name: tenant_role_other
-- Another tenant role $1 is listed for than $2, if any.
-- $1 role name
-- $2 tenant text
SELECT tenant FROM __schema__.eventbus_tenant_roles WHERE role = $1 AND tenant <> $2 LIMIT 1;

-- name: tenant_role_add
-- Confine role $1 to tenant $2 (and the session's eventbus.tenant within its tenants).
-- $1 role name
-- $2 tenant text
INSERT INTO __schema__.eventbus_tenant_roles (role, tenant) VALUES ($1, $2) ON CONFLICT DO NOTHING;

-- name: outbox_partitioned
-- Whether the outbox has the partitioned layout (see partitioned.sql).
-- $1 outbox text (schema-qualified eventbus_outbox)
SELECT coalesce((SELECT relkind = 'p' FROM pg_catalog.pg_class WHERE oid = to_regclass($1)), false) AS partitioned;

-- name: outbox_layout
-- The partitioned layout's period ('day' or 'hour') and how far its settled partitions reach.
SELECT period, settled_upto FROM __schema__.eventbus_layout;

-- name: outbox_set_period
-- Make the settled partitions made from now on span period $1 ('day' or 'hour').
-- $1 period text
UPDATE __schema__.eventbus_layout SET period = $1;

-- name: outbox_extend
-- Make the settled partitions of the next two periods (the partitioned layout); returns how many were made.
SELECT __schema__.eventbus_outbox_extend(now() + 2 * ('1 ' || period)::interval) AS made
FROM __schema__.eventbus_layout;

-- name: outbox_drop_settled
-- Drop the settled partitions whose rows are all older than $1 seconds (the partitioned layout); returns about
-- how many rows they held.
-- $1 older_than_seconds float8
SELECT __schema__.eventbus_outbox_drop_settled(now() - make_interval(secs => $1)) AS dropped;

-- name: outbox_purge_default
-- Delete up to $2 rows older than id $1 from the default settled partition (ids outside every period made).
-- $1 before_id uuid
-- $2 limit int
WITH doomed AS (
    SELECT id FROM __schema__.eventbus_outbox_settled_default WHERE id < $1 ORDER BY id LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM __schema__.eventbus_outbox_settled_default AS o USING doomed WHERE o.id = doomed.id;

-- name: idempotency_purge
-- Delete up to $2 idempotency keys taken more than $1 seconds ago whose rows are no longer pending or claimed
-- (the partitioned layout).
-- $1 older_than_seconds float8
-- $2 limit int
WITH doomed AS (
    SELECT k.tenant, k.idempotency_key FROM __schema__.eventbus_idempotency_keys AS k
    WHERE k.created_at < now() - make_interval(secs => $1)
      AND NOT EXISTS (SELECT FROM __schema__.eventbus_outbox AS o WHERE o.id = k.row_id AND o.status IN (0, 1))
    LIMIT $2
    FOR UPDATE OF k SKIP LOCKED
)
DELETE FROM __schema__.eventbus_idempotency_keys AS k USING doomed
WHERE k.tenant = doomed.tenant AND k.idempotency_key = doomed.idempotency_key;

-- name: schemas_found
-- Whether schema $1 exists, and the schemas that hold eventbus tables (a version table), by name.
-- $1 schema text
SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = $1) AS exists,
       ARRAY(SELECT n.nspname::text FROM pg_catalog.pg_namespace AS n JOIN pg_catalog.pg_class AS c
             ON c.relnamespace = n.oid
             WHERE c.relname = 'eventbus_migrations' AND c.relkind = 'r' ORDER BY 1) AS found;

-- name: replay_leftovers
-- The statements that drop what is not eventbus's in this schema (the tables, views and sequences a replay test's
-- setup made), one per row.
SELECT format('DROP %s IF EXISTS %I.%I CASCADE',
              CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE'
                             WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
              n.nspname, c.relname) AS statement
FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.oid = '__schema__'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND NOT c.relispartition
  AND c.relname NOT IN ('eventbus_outbox', 'eventbus_dead_letters', 'eventbus_inbox', 'eventbus_relays',
                        'eventbus_partitions', 'eventbus_subscriptions', 'eventbus_migrations',
                        'eventbus_tenant_roles', 'eventbus_layout', 'eventbus_idempotency_keys')
ORDER BY c.relkind = 'S';

-- name: replay_reset
-- Make a migrated schema as a fresh one for the next replay example (what replay_leftovers lists dropped first),
-- under the bus the examples share: empty the tables of events, dead letters, inbox and tenant roles (the relay's
-- registration and partitions stay its own). DELETE, not TRUNCATE: the tables hold a few rows, and TRUNCATE makes
-- new files for every table and index.
DELETE FROM __schema__.eventbus_outbox;
DELETE FROM __schema__.eventbus_dead_letters;
DELETE FROM __schema__.eventbus_inbox;
DELETE FROM __schema__.eventbus_tenant_roles;

-- name: migrate_lock_timeout
-- Let each statement of this migration transaction wait at most $1 for a table lock.
-- $1 lock_timeout text (e.g. '2000ms')
SELECT set_config('lock_timeout', $1, true);

-- name: migrate_lock
-- Serialise migration runs on this schema across processes until the transaction ends.
-- $1 lock_name text
SELECT pg_advisory_xact_lock(hashtextextended($1, 0));

-- name: migrate_prepare
-- Create the schema and the version table if they are missing.
CREATE SCHEMA IF NOT EXISTS __schema__;
CREATE TABLE IF NOT EXISTS __schema__.eventbus_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migrate_applied
-- Versions already applied.
SELECT version FROM __schema__.eventbus_migrations ORDER BY version;

-- name: migrate_record
-- Record migration $1 named $2 as applied.
-- $1 version int
-- $2 name text
INSERT INTO __schema__.eventbus_migrations (version, name) VALUES ($1, $2);

-- name: schema_version_table
-- Whether the version table exists in schema $1.
-- $1 schema text
SELECT to_regclass(quote_ident($1) || '.eventbus_migrations') IS NOT NULL AS present;

-- name: retention_lock
-- Try to become the one relay that runs retention in lock space $1 (held while the session lives).
-- $1 lock_space text
SELECT pg_try_advisory_lock(hashtext($1), -1) AS acquired;

-- name: metrics_lock
-- Try to become the one relay that reads the schema's gauges in lock space $1 (held while the session lives).
-- $1 lock_space text
SELECT pg_try_advisory_lock(hashtext($1), -2) AS acquired;

-- name: metrics_gauges
-- The schema's gauges, in one statement: rows pending and in flight, how long the longest-waiting due pending
-- row has waited since it came due (not counting rows of paused subscribers), the same per registered subscriber (with the rows it has a share of), and
-- unreplayed dead letters by reason and subscriber. It reads pending and claimed rows through their partial
-- indexes and unreplayed letters through theirs, so settled history costs it nothing.
WITH waiting AS (
    -- One branch per status, each matching the predicate of that status's partial index (a plan for
    -- "status IN (0, 1)" can use neither and scans the table).
    SELECT 0 AS status, target, topic, count(*) AS n,
           min(available_at) FILTER (WHERE available_at <= now()) AS due_since
    FROM __schema__.eventbus_outbox WHERE status = 0
    GROUP BY target, topic
    UNION ALL
    SELECT 1 AS status, target, topic, count(*) AS n,
           min(available_at) FILTER (WHERE available_at <= now()) AS due_since
    FROM __schema__.eventbus_outbox WHERE status = 1
    GROUP BY target, topic
), per_subscriber AS (
    SELECT s.name, coalesce(sum(w.n) FILTER (WHERE w.status = 0), 0)::bigint AS pending,
           coalesce(extract(epoch FROM now() - min(w.due_since)), 0)::float8 AS lag
    FROM __schema__.eventbus_subscriptions AS s
    LEFT JOIN waiting AS w ON w.topic = ANY(s.topics) AND (w.target IS NULL OR w.target = s.name)
    WHERE s.state <> 'retired'
    GROUP BY s.name
), letters AS (
    SELECT reason, subscriber, count(*) AS n
    FROM __schema__.eventbus_dead_letters
    WHERE replayed_at IS NULL
    GROUP BY reason, subscriber
)
SELECT (SELECT coalesce(sum(n), 0) FROM waiting WHERE status = 0)::bigint AS pending,
       (SELECT coalesce(sum(n), 0) FROM waiting WHERE status = 1)::bigint AS in_flight,
       -- Rows targeted at a paused subscriber wait on purpose: its own lag shows them, the outbox's does not.
       coalesce(extract(epoch FROM now() - (
           SELECT min(w.due_since) FROM waiting AS w
           WHERE w.status = 0 AND (w.target IS NULL OR NOT EXISTS (
               SELECT 1 FROM __schema__.eventbus_subscriptions AS p WHERE p.name = w.target AND p.state = 'paused'))
       )), 0)::float8 AS lag,
       ARRAY(SELECT name FROM per_subscriber ORDER BY name) AS subscribers,
       ARRAY(SELECT pending FROM per_subscriber ORDER BY name) AS subscriber_pending,
       ARRAY(SELECT lag FROM per_subscriber ORDER BY name) AS subscriber_lag,
       ARRAY(SELECT reason FROM letters ORDER BY reason, subscriber) AS letter_reasons,
       ARRAY(SELECT subscriber FROM letters ORDER BY reason, subscriber) AS letter_subscribers,
       ARRAY(SELECT n FROM letters ORDER BY reason, subscriber) AS letter_counts;

-- name: partition_acquire
-- Take those of partitions $2 that nobody owns or whose owner's lease ran out, for worker $1 and $3 seconds;
-- each takeover bumps the partition's epoch, which fences the former owner out.
-- $1 worker text
-- $2 partitions smallint[]
-- $3 lease_seconds float8
-- $4 held uuid[] (rows $1 still has in hand; NULL: every row claimed by $1)
-- Rows $1 still has in hand in a partition it takes back (its lease had run out) are adopted at the new epoch:
-- nobody else can have claimed them meanwhile, and their handlers may still be running here. Its other rows of
-- the partition (shares it gave up when it lost the partition) are left to expire and come back.
WITH taken AS (
    UPDATE __schema__.eventbus_partitions
    SET owner = $1, epoch = epoch + 1, lease_until = now() + make_interval(secs => $3)
    WHERE partition = ANY($2::smallint[]) AND (owner IS NULL OR lease_until < now())
    RETURNING partition, epoch
), adopted AS (
    UPDATE __schema__.eventbus_outbox AS o SET claimed_epoch = t.epoch
    FROM taken AS t
    WHERE o.status = 1 AND o.claimed_by = $1 AND o.partition = t.partition
      AND ($4::uuid[] IS NULL OR o.id = ANY($4::uuid[]))
    RETURNING 1
)
SELECT partition, epoch, (SELECT count(*) FROM adopted) AS adopted FROM taken;

-- name: partition_renew
-- Extend worker $1's leases on partitions $2 for $3 seconds, where they have not run out; returns those still its own.
-- $1 worker text
-- $2 partitions smallint[]
-- $3 lease_seconds float8
UPDATE __schema__.eventbus_partitions
SET lease_until = now() + make_interval(secs => $3)
WHERE owner = $1 AND partition = ANY($2::smallint[]) AND lease_until >= now()
RETURNING partition, epoch;

-- name: partition_release
-- Give up worker $1's partitions $2 (their rows were settled or handed back first).
-- $1 worker text
-- $2 partitions smallint[]
UPDATE __schema__.eventbus_partitions SET owner = NULL, lease_until = NULL
WHERE owner = $1 AND partition = ANY($2::smallint[]);

-- name: partition_owners
-- Every partition with its owner, epoch, and whether the owner's lease still runs.
SELECT partition, owner, epoch, lease_until, coalesce(lease_until >= now(), false) AS live
FROM __schema__.eventbus_partitions ORDER BY partition;

-- name: partition_busy
-- Partitions among $1 with rows still leased to another worker than $2, or to $2 under an earlier epoch (rows it
-- gave up): not yet safe to claim in order.
-- $1 partitions smallint[]
-- $2 worker text
SELECT DISTINCT o.partition FROM __schema__.eventbus_outbox AS o
JOIN __schema__.eventbus_partitions AS p ON p.partition = o.partition
WHERE o.status = 1 AND o.partition = ANY($1::smallint[])
  AND (o.claimed_by <> $2 OR o.claimed_epoch IS DISTINCT FROM p.epoch);

-- name: outbox_unsettled
-- Rows not yet settled: pending (due or not) and claimed.
SELECT count(*) AS unsettled FROM __schema__.eventbus_outbox WHERE status IN (0, 1);

-- name: outbox_outgrown
-- Whether the outbox has outgrown its planner statistics: no statistics yet and over 64 pages, or twice the
-- pages they describe. Plans cached on a small table (a sequential scan to settle ten rows) stay until ANALYZE.
SELECT pg_relation_size(c.oid) / current_setting('block_size')::int > greatest(64, 2 * c.relpages) AS outgrown
FROM pg_class AS c WHERE c.oid = '__schema__.eventbus_outbox'::regclass;

-- name: outbox_analyze
-- Refresh the outbox's planner statistics; cached plans of every session are made again.
ANALYZE __schema__.eventbus_outbox;

-- name: ping
-- Check that a connection is alive.
SELECT 1;

-- name: wake
-- Wake the relays listening on channel $1, unless the notification queue is over half full (relays lag: they poll).
-- $1 channel text
SELECT pg_notify($1, '') WHERE pg_notification_queue_usage() < 0.5;

-- name: dead_letter_pick
-- Lock up to $9 unreplayed dead letters matching the filters (or the ids $7) after cursor $8, oldest first;
-- letters another replay holds are skipped, so concurrent replays never take the same letter.
-- $1 reason text
-- $2 subscriber text
-- $3 topic text
-- $4 tenant text
-- $5 since_id uuid
-- $6 until_id uuid
-- $7 ids uuid[]
-- $8 after_id uuid
-- $9 limit int
-- $10 failed_before timestamptz (the first page's now(): letters that fail while the replay runs wait for the next)
SELECT id, reason, event_id, outbox_id, tenant, topic, key, subscriber, payload::text AS payload,
       headers::text AS headers, attempts, error_type, error, traceback, trace_id, failed_at, replayed_at,
       replay_count,
       now() AS picked_at
FROM __schema__.eventbus_dead_letters
WHERE replayed_at IS NULL
  AND ($10::timestamptz IS NULL OR failed_at <= $10)
  AND ($1::text IS NULL OR reason = $1) AND ($2::text IS NULL OR subscriber = $2)
  AND ($3::text IS NULL OR topic = $3) AND ($4::text IS NULL OR tenant = $4)
  AND ($5::uuid IS NULL OR id >= $5) AND ($6::uuid IS NULL OR id <= $6)
  AND ($7::uuid[] IS NULL OR id = ANY($7::uuid[]))
  AND ($8::uuid IS NULL OR id > $8)
ORDER BY id
LIMIT $9
FOR UPDATE SKIP LOCKED;

-- name: dead_letter_insert
-- Write one dead letter of a delivery that did not come from an outbox claim (a broker consumer's), unless the
-- same row's delivery to the same subscriber has an unreplayed letter already (a consumer that died between
-- writing it and acknowledging the message sees it again).
-- $1 id uuid
-- $2 reason text
-- $3 event_id uuid
-- $4 outbox_id uuid
-- $5 tenant text
-- $6 topic text
-- $7 key text
-- $8 subscriber text
-- $9 payload text (JSON)
-- $10 headers text (JSON)
-- $11 attempts int
-- $12 error_type text
-- $13 error text
-- $14 traceback text
-- $15 trace_id text
INSERT INTO __schema__.eventbus_dead_letters
    (id, reason, event_id, outbox_id, tenant, topic, key, subscriber, payload, headers, attempts, error_type, error,
     traceback, trace_id)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb, $11, $12, $13, $14, $15
WHERE NOT EXISTS (
    SELECT 1 FROM __schema__.eventbus_dead_letters AS d
    WHERE d.event_id = $3 AND d.replayed_at IS NULL AND d.outbox_id = $4 AND d.subscriber IS NOT DISTINCT FROM $8)
ON CONFLICT (id) DO NOTHING;

-- name: dead_letter_mark_replayed
-- Mark dead letters $1 replayed (in the transaction that re-offered them).
-- $1 ids uuid[]
UPDATE __schema__.eventbus_dead_letters
SET replayed_at = now(), replay_count = replay_count + 1
WHERE id = ANY($1::uuid[]) AND replayed_at IS NULL;
