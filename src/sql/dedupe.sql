-- Collapses rows that share a user id to the first stored (lowest ctid: the query's own
-- order, as rows are appended), when building a unique index found duplicates.
DELETE FROM {table} a USING {table} b WHERE a.user_id = b.user_id AND a.ctid > b.ctid
