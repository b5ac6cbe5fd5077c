-- The partitioned outbox layout (`eventbus migrate --partitioning daily|hourly`), converted from the plain one in
-- one transaction. __schema__ is the quoted schema name, __period__ 'day' or 'hour'.
--
--   eventbus_outbox                     partitioned by status (the name every query uses)
--   ├── eventbus_outbox_live            status 0, 1: pending and claimed rows; the only table claims touch
--   └── eventbus_outbox_settled         status 2, 3, partitioned by range of id (UUIDv7: time)
--       ├── eventbus_outbox_history     the plain outbox's settled rows, ids up to the first period boundary
--       ├── eventbus_outbox_settled_<period start>   one per day or hour, made ahead by the relay
--       └── eventbus_outbox_settled_default          ids outside every period made (clocks far off)
--
-- Settling a row moves it from live to a settled partition, so the claim's indexes hold only what is pending or
-- claimed plus what was settled since the last autovacuum of a small table, however long the history grows;
-- retention drops whole settled partitions. A unique index of a partitioned table must contain its partition
-- key, so producer idempotency keys live in their own table (eventbus_idempotency_keys), claimed by a trigger on
-- live insert and kept as long as the outbox keeps rows.
--
-- Locks: ACCESS EXCLUSIVE on the plain outbox for the whole transaction, which reads the pending and claimed rows
-- (through their partial indexes) to move them, and the whole table once, to prove the settled history lies in
-- its partition. Producers and relays wait that long; nothing is lost, and no claimed row loses its lease.

LOCK TABLE __schema__.eventbus_outbox IN ACCESS EXCLUSIVE MODE;

-- The layout, for relays: which period settled partitions span, and up to where they are made.
CREATE TABLE __schema__.eventbus_layout (
    singleton    boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    period       text        NOT NULL CHECK (period IN ('day', 'hour')),
    settled_upto timestamptz NOT NULL,
    converted_at timestamptz NOT NULL DEFAULT now()
);
-- Nothing of a tenant's: every role that reads the outbox (an operator's `eventbus status`) may read it.
GRANT SELECT ON __schema__.eventbus_layout TO PUBLIC;

-- The smallest UUIDv7 of a moment (eventbus.ids.min_id_for): its milliseconds over the first 48 bits.
CREATE FUNCTION __schema__.eventbus_min_id(moment timestamptz) RETURNS uuid
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (lpad(to_hex(floor(extract(epoch FROM moment) * 1000)::bigint), 12, '0')
            || '00000000000000000000')::uuid;

ALTER TABLE __schema__.eventbus_outbox RENAME TO eventbus_outbox_history;
ALTER INDEX __schema__.eventbus_outbox_pkey RENAME TO eventbus_outbox_history_pkey;
ALTER INDEX __schema__.eventbus_outbox_id_brin RENAME TO eventbus_outbox_history_id_brin;
-- Keys are unique through eventbus_idempotency_keys from now on: a key retention forgot may be taken again by a
-- row that settles into the history, among the rows that took it before.
DROP INDEX IF EXISTS __schema__.eventbus_outbox_idempotency;

CREATE TABLE __schema__.eventbus_outbox (LIKE __schema__.eventbus_outbox_history INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY LIST (status);

CREATE TABLE __schema__.eventbus_outbox_live PARTITION OF __schema__.eventbus_outbox FOR VALUES IN (0, 1);
ALTER TABLE __schema__.eventbus_outbox_live ADD PRIMARY KEY (id);
CREATE INDEX eventbus_outbox_live_pending_tenants ON __schema__.eventbus_outbox_live (tenant, event_id)
    INCLUDE (available_at, partition) WHERE status = 0;
CREATE INDEX eventbus_outbox_live_pending_targets ON __schema__.eventbus_outbox_live (target, event_id)
    WHERE status = 0 AND target IS NOT NULL;
CREATE INDEX eventbus_outbox_live_in_flight ON __schema__.eventbus_outbox_live (claimed_until) WHERE status = 1;
-- Small, and every settle leaves a dead row in it: vacuumed after every 5,000 of them, at full speed, so the
-- claim's partial index never carries more than a few thousand dead entries.
ALTER TABLE __schema__.eventbus_outbox_live SET (
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0);

WITH moved AS (DELETE FROM __schema__.eventbus_outbox_history WHERE status IN (0, 1) RETURNING *)
INSERT INTO __schema__.eventbus_outbox_live SELECT * FROM moved;

-- What only pending and claimed rows used; the history keeps its primary key and BRIN index.
DROP INDEX IF EXISTS __schema__.eventbus_outbox_pending_tenants;
DROP INDEX IF EXISTS __schema__.eventbus_outbox_pending_targets;
DROP INDEX IF EXISTS __schema__.eventbus_outbox_pending_events;
DROP INDEX IF EXISTS __schema__.eventbus_outbox_in_flight;

CREATE TABLE __schema__.eventbus_outbox_settled PARTITION OF __schema__.eventbus_outbox FOR VALUES IN (2, 3)
    PARTITION BY RANGE (id);
CREATE TABLE __schema__.eventbus_outbox_settled_default PARTITION OF __schema__.eventbus_outbox_settled DEFAULT;
ALTER TABLE __schema__.eventbus_outbox_settled_default ADD PRIMARY KEY (id);

-- The history holds every id before the first boundary after both now and its newest row (one scan proves it).
DO $convert$
DECLARE
    -- In UTC (timestamp arithmetic, whatever the session's time zone): a day is 24 hours.
    upto timestamptz := (date_trunc('__period__', greatest(now(), (
        SELECT to_timestamp(('x' || substr(replace(id::text, '-', ''), 1, 12))::bit(48)::bigint / 1000.0)
        FROM __schema__.eventbus_outbox_history ORDER BY id DESC LIMIT 1)) AT TIME ZONE 'UTC')
        + '1 __period__'::interval) AT TIME ZONE 'UTC';
BEGIN
    EXECUTE format('ALTER TABLE __schema__.eventbus_outbox_settled ATTACH PARTITION __schema__.eventbus_outbox_history '
                   'FOR VALUES FROM (MINVALUE) TO (%L)', __schema__.eventbus_min_id(upto));
    INSERT INTO __schema__.eventbus_layout (period, settled_upto) VALUES ('__period__', upto);
END
$convert$;

-- Row-level security and privileges as the plain outbox had them: its policies, whole, and its grants.
ALTER TABLE __schema__.eventbus_outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE __schema__.eventbus_outbox FORCE ROW LEVEL SECURITY;
-- (Onto `target`: the plain outbox's grants of `privileges`, and its policies, or only the one `named`.)
CREATE FUNCTION pg_temp.eventbus_copy_rights(target regclass, privileges text[], named name DEFAULT NULL)
    RETURNS void
    LANGUAGE plpgsql AS $function$
DECLARE
    p record;
    g record;
BEGIN
    FOR p IN SELECT polname, polpermissive, polcmd, pg_get_expr(polqual, polrelid) AS qual,
                    pg_get_expr(polwithcheck, polrelid) AS checks,
                    (SELECT string_agg(CASE r WHEN 0 THEN 'PUBLIC' ELSE r::regrole::text END, ', ')
                     FROM unnest(polroles) AS r) AS roles
             FROM pg_catalog.pg_policy WHERE polrelid = '__schema__.eventbus_outbox_history'::regclass
               AND (named IS NULL OR polname = named) LOOP
        EXECUTE format('CREATE POLICY %I ON %s AS %s FOR %s TO %s%s%s', p.polname, target,
                       CASE WHEN p.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
                       CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                     WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                       p.roles, ' USING (' || p.qual || ')', ' WITH CHECK (' || p.checks || ')');
    END LOOP;
    -- Its owner's rights too (the new tables belong to the role migrating, which need not be the owner).
    FOR g IN SELECT DISTINCT a.privilege_type, a.grantee
             FROM pg_catalog.pg_class AS c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) AS a
             WHERE c.oid = '__schema__.eventbus_outbox_history'::regclass AND a.privilege_type = ANY (privileges) LOOP
        EXECUTE format('GRANT %s ON %s TO %s', g.privilege_type, target,
                       CASE g.grantee WHEN 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END);
    END LOOP;
END
$function$;
SELECT pg_temp.eventbus_copy_rights('__schema__.eventbus_outbox',
                                    ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']);

-- Producer idempotency across partitions: a key is taken by the first row offered with it, for as long as the
-- outbox keeps rows (retention forgets keys taken before its window whose rows are neither pending nor claimed).
-- Under the outbox's tenant policy, and insertable by whoever may insert outbox rows: a producer takes a key as
-- itself, so offering another tenant's row fails alike whether that tenant took the key or not.
CREATE TABLE __schema__.eventbus_idempotency_keys (
    tenant          text        NOT NULL,
    idempotency_key text        NOT NULL,
    event_id        uuid        NOT NULL,
    row_id          uuid        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, idempotency_key)
);
CREATE INDEX eventbus_idempotency_keys_created_brin ON __schema__.eventbus_idempotency_keys USING brin (created_at);
INSERT INTO __schema__.eventbus_idempotency_keys (tenant, idempotency_key, event_id, row_id, created_at)
SELECT tenant, idempotency_key, event_id, id, created_at FROM __schema__.eventbus_outbox
WHERE idempotency_key IS NOT NULL
ON CONFLICT DO NOTHING;
ALTER TABLE __schema__.eventbus_idempotency_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE __schema__.eventbus_idempotency_keys FORCE ROW LEVEL SECURITY;
SELECT pg_temp.eventbus_copy_rights('__schema__.eventbus_idempotency_keys', ARRAY['INSERT'], 'eventbus_tenant');
DROP FUNCTION pg_temp.eventbus_copy_rights(regclass, text[], name);

-- A row whose key is taken is not inserted (the offer reports it as a repeat, as the plain layout's unique index
-- does).
CREATE FUNCTION __schema__.eventbus_take_idempotency_key() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $function$
BEGIN
    INSERT INTO __schema__.eventbus_idempotency_keys (tenant, idempotency_key, event_id, row_id)
    VALUES (NEW.tenant, NEW.idempotency_key, NEW.event_id, NEW.id)
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        RETURN NEW;
    END IF;
    RETURN NULL;
END
$function$;
CREATE TRIGGER eventbus_idempotency BEFORE INSERT ON __schema__.eventbus_outbox_live
    FOR EACH ROW WHEN (NEW.idempotency_key IS NOT NULL) EXECUTE FUNCTION __schema__.eventbus_take_idempotency_key();

-- Partition upkeep, for the elected relay (owner's rights: the relay's role owns nothing; EXECUTE is granted to
-- the relay role only). Each waits at most 200 ms for a lock and otherwise leaves the work to its next run, and
-- runs in UTC whatever the caller's time zone (periods are UTC days and hours; a local day can last 23 hours).

-- Make settled partitions, one per period, until they cover `upto` (at most 200 in one call); returns how many
-- were made. Each is made apart and attached (a lock that lets settles go on; the default partition is locked
-- and read, and is nearly always empty).
CREATE FUNCTION __schema__.eventbus_outbox_extend(upto timestamptz) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '200ms'
    SET timezone = 'UTC'
AS $function$
DECLARE
    layout record;
    stop timestamptz;
    name text;
    made integer := 0;
BEGIN
    SELECT * INTO layout FROM __schema__.eventbus_layout FOR UPDATE;
    WHILE layout.settled_upto < upto AND made < 200 LOOP  -- a bounded run, whatever `upto` its caller asks for
        stop := date_trunc(layout.period, layout.settled_upto, 'UTC') + ('1 ' || layout.period)::interval;
        name := 'eventbus_outbox_settled_'
                || to_char(layout.settled_upto AT TIME ZONE 'UTC',
                           CASE layout.period WHEN 'day' THEN 'YYYYMMDD' ELSE 'YYYYMMDDHH24' END);
        EXECUTE format('CREATE TABLE __schema__.%I (LIKE __schema__.eventbus_outbox_settled INCLUDING DEFAULTS '
                       'INCLUDING CONSTRAINTS)', name);
        EXECUTE format('ALTER TABLE __schema__.%I ADD PRIMARY KEY (id)', name);
        -- Rows settled into the default partition while this period had none (no relay made it in time). The
        -- default partition is locked first, as the ATTACH below would lock it: a row settled into it between the
        -- move and the ATTACH would fail the ATTACH. Only settles of rows outside every period made wait.
        LOCK TABLE __schema__.eventbus_outbox_settled_default IN ACCESS EXCLUSIVE MODE;
        EXECUTE format('WITH strays AS (DELETE FROM __schema__.eventbus_outbox_settled_default WHERE id >= %L '
                       'AND id < %L RETURNING *) INSERT INTO __schema__.%I SELECT * FROM strays',
                       __schema__.eventbus_min_id(layout.settled_upto), __schema__.eventbus_min_id(stop), name);
        EXECUTE format('ALTER TABLE __schema__.eventbus_outbox_settled ATTACH PARTITION __schema__.%I '
                       'FOR VALUES FROM (%L) TO (%L)', name, __schema__.eventbus_min_id(layout.settled_upto),
                       __schema__.eventbus_min_id(stop));
        layout.settled_upto := stop;
        made := made + 1;
    END LOOP;
    UPDATE __schema__.eventbus_layout SET settled_upto = layout.settled_upto;
    RETURN made;
END
$function$;

-- Drop the settled partitions whose ids all lie before `before` (their rows are past retention); returns how many
-- rows they held, as the statistics estimate them (counting would read them). The default partition is never
-- dropped (retention deletes from it in batches).
CREATE FUNCTION __schema__.eventbus_outbox_drop_settled(before timestamptz) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '200ms'
    SET timezone = 'UTC'
AS $function$
DECLARE
    part record;
    rows bigint := 0;
BEGIN
    FOR part IN
        SELECT c.oid::regclass AS rel, pg_get_expr(c.relpartbound, c.oid) AS bound, greatest(c.reltuples, 0) AS held
        FROM pg_catalog.pg_inherits AS i JOIN pg_catalog.pg_class AS c ON c.oid = i.inhrelid
        WHERE i.inhparent = '__schema__.eventbus_outbox_settled'::regclass
          AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
    LOOP
        IF substring(part.bound FROM 'TO \(''([0-9a-f-]+)''\)')::uuid <= __schema__.eventbus_min_id(before) THEN
            EXECUTE format('ALTER TABLE __schema__.eventbus_outbox_settled DETACH PARTITION %s', part.rel);
            EXECUTE format('DROP TABLE %s', part.rel);
            rows := rows + part.held::bigint;
        END IF;
    END LOOP;
    RETURN rows;
END
$function$;
REVOKE ALL ON FUNCTION __schema__.eventbus_outbox_extend(timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION __schema__.eventbus_outbox_drop_settled(timestamptz) FROM PUBLIC;

-- The settled partitions of the next two periods.
SELECT __schema__.eventbus_outbox_extend(now() + 2 * '1 __period__'::interval);

ANALYZE __schema__.eventbus_outbox_live;

-- Claimed rows get their leases back for as long as this transaction has held their relays up (it began before
-- waiting for its lock): a relay that could not renew meanwhile does not lose its rows to a reclaim (a renewal
-- that waited behind the conversion never shortens a lease). Leases that had run out stay run out.
UPDATE __schema__.eventbus_outbox_live SET claimed_until = claimed_until + (clock_timestamp() - now())
WHERE status = 1 AND claimed_until >= now();
