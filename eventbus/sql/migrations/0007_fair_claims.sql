-- eventbus schema, version 7: claims that take from every tenant with due rows, so one tenant's backlog never
-- holds another tenant's new events back.
-- Expand only: the index the release before claims through (eventbus_outbox_pending_events) stays, so its relays
-- keep claiming through an index during a rolling deploy; `eventbus migrate --contract` drops it once none runs
-- (0007_fair_claims.contract.sql). Built without CONCURRENTLY (migrations run in one transaction): writes to the outbox wait
-- while it is built, for as long as it takes to index the rows pending at that moment (a backlog of a million
-- pending rows: a few seconds).

-- Pending rows by tenant, in event id order: the claim finds each tenant with pending rows by skipping through
-- it, and takes each tenant's oldest due rows.
CREATE INDEX eventbus_outbox_pending_tenants ON __schema__.eventbus_outbox (tenant, event_id)
    INCLUDE (available_at, partition) WHERE status = 0;
