-- Attaches an audience's partition to `outbox`: a SHARE UPDATE EXCLUSIVE lock, which the
-- other audiences' claims, confirmations and reads do not wait for.
ALTER TABLE outbox ATTACH PARTITION {table} FOR VALUES IN ({audience_id})
