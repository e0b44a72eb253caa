-- The run's capture of its audience query, on the run's own connection: user ids compare by
-- bytes, like the outbox and synced_members. An id may be NULL only until capture_skipped.sql
-- has run; the unique index is built after it.
DROP TABLE IF EXISTS pg_temp.audience_capture;
CREATE TEMP TABLE audience_capture
    (user_id text COLLATE "C", email text, phone text, name text, value text)
