-- Every index on outbox is paid once per change the diff writes: a first sync of 1M members
-- writes 1M rows. Profiling that insert at 1M (EXPLAIN ANALYZE, each part removed in turn):
-- heap 0.93 s, the message id's md5 0.9 s, the unique (audience_id, user_id) index 0.6 s,
-- the id primary key 0.35 s, the claim index 0.5 s, and the (audience_id, status) index.
-- What stays is the heap and the one index every statement uses.

-- The message id is computed by the worker from (audience, user, target_version, member)
-- (`outbox::message_id`), the same md5 as before, so pending changes keep their ids.
ALTER TABLE outbox DROP COLUMN message_id;

-- Claims walk (audience_id, user_id) after a cursor; confirmations and failures address a
-- change by (audience_id, user_id), both NOT NULL and UNIQUE: the table's key. The surrogate
-- id and its indexes are no longer needed.
DROP INDEX IF EXISTS outbox_claim;
DROP INDEX IF EXISTS outbox_audience_status;
ALTER TABLE outbox DROP CONSTRAINT outbox_pkey;
ALTER TABLE outbox DROP COLUMN id;

-- Failed and rejected changes are few: counting them per audience stays an index lookup.
CREATE INDEX outbox_not_pending ON outbox (audience_id) WHERE status <> 'pending';
