-- eventbus schema, version 2: a dead letter's `source` is always 'event' (the value 'job' was never written).
-- The column stays so that version 0.1.0 keeps working against this schema during a rolling upgrade.
UPDATE __schema__.eventbus_dead_letters SET source = 'event' WHERE source <> 'event';
ALTER TABLE __schema__.eventbus_dead_letters
    DROP CONSTRAINT eventbus_dead_letters_source_check,
    ADD CONSTRAINT eventbus_dead_letters_source_check CHECK (source = 'event');
