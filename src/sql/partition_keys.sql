-- Turns a filled partition's unique index into its key, drops the first sync's defaults, and
-- adds the other index `outbox` has.
ALTER TABLE {table} ADD CONSTRAINT {table}_pkey PRIMARY KEY USING INDEX {table}_pkey,
    ALTER audience_id DROP DEFAULT, ALTER member DROP DEFAULT,
    ALTER target_version DROP DEFAULT, ALTER run_id DROP DEFAULT;
CREATE INDEX {table}_not_pending ON {table} (audience_id) WHERE status <> 'pending'
