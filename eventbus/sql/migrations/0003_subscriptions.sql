-- eventbus schema, version 3: subscriptions known to the database; retention of the inbox.
-- Every relay registers the subscribers it carries (at start) and refreshes them (at each heartbeat). Settling
-- an event's row writes a targeted row for each registered, non-retired subscriber of its topic that the settling
-- relay does not carry, so a rolling deploy or a subscriber that runs elsewhere never loses an event; claims leave
-- rows targeted at a paused subscriber, or at one carried elsewhere, to the relays that deliver them.

CREATE TABLE __schema__.eventbus_subscriptions (
    name          text        PRIMARY KEY,
    -- The topics (aliases included) the live relays carrying it declare, all of them; kept as they were while
    -- no relay carrying it runs.
    topics        text[]      NOT NULL,
    ordered       boolean     NOT NULL DEFAULT false,
    -- active: delivered; paused: its rows wait; retired: removed on purpose, its rows are nobody's.
    state         text        NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'paused', 'retired')),
    registered_at timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz NOT NULL DEFAULT now(),
    state_changed timestamptz
);

-- The subscribers each relay carries, with their topics: {"name": ["topic", ...], ...}.
ALTER TABLE __schema__.eventbus_relays ADD COLUMN carried jsonb NOT NULL DEFAULT '{}';

-- Pending rows by target: the backlog of one subscriber (eventbus subscribers, and lag).
CREATE INDEX eventbus_outbox_pending_targets ON __schema__.eventbus_outbox (target, event_id)
    WHERE status = 0 AND target IS NOT NULL;

-- Retention deletes inbox rows by age, except those of events with a dead letter not yet replayed (a replay must
-- still find the effect recorded).
CREATE INDEX eventbus_inbox_processed_brin ON __schema__.eventbus_inbox USING brin (processed_at);
CREATE INDEX eventbus_dead_letters_unreplayed_events ON __schema__.eventbus_dead_letters (event_id)
    WHERE replayed_at IS NULL;
