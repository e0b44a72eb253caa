-- The unique index that becomes a new partition's key, built once by sorting.
CREATE UNIQUE INDEX {table}_pkey ON {table} (audience_id, user_id)
