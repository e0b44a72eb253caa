-- Claiming a change updates its lease columns, none of them indexed. Free space on each page
-- lets PostgreSQL make those HOT updates (no new index entries) instead of writing three.
ALTER TABLE outbox SET (fillfactor = 70);
