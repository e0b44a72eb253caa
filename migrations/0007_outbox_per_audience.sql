-- The outbox, partitioned by audience: each audience's changes live in a table of their own,
-- `outbox_<audience id>`, attached to `outbox`. An audience's first sync writes one change per
-- member, so it builds its partition in bulk (`outbox::Partition`): the query's rows stream
-- into a new table without indexes, the key is built once by sorting, and the table is
-- attached, which takes only a SHARE UPDATE EXCLUSIVE lock on `outbox`, so the other
-- audiences' claims and confirmations go on. Maintaining the key row by row was half the cost
-- of that first diff. The audiences that exist now get an empty partition here.
--
-- User ids compare by bytes (COLLATE "C") here, in synced_members and in the capture table:
-- ids are opaque, equality is the same under any deterministic collation, and sorting by bytes
-- (with abbreviated keys) builds a key over a million ids in 0.42 s where the database's
-- linguistic collation took 0.71 s.

-- The views that read outbox are bound to the table itself: recreated below, unchanged.
DROP VIEW ops.audience_overview;
DROP VIEW ops.failed_changes;
ALTER TABLE outbox RENAME TO outbox_unpartitioned;
ALTER INDEX outbox_not_pending RENAME TO outbox_unpartitioned_not_pending;

CREATE TABLE outbox (
    audience_id     bigint NOT NULL,
    user_id         text COLLATE "C" NOT NULL,
    member          boolean NOT NULL,
    email           text,
    phone           text,
    name            text,
    -- The version the user's confirmed row will have once this change is confirmed.
    target_version  bigint NOT NULL,
    run_id          bigint NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CONSTRAINT outbox_status_known CHECK (status IN ('pending', 'failed', 'rejected')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,
    lease_until     timestamptz,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (audience_id, user_id)
) PARTITION BY LIST (audience_id);
-- Failed and rejected changes are few: counting them per audience stays an index lookup.
CREATE INDEX outbox_not_pending ON outbox (audience_id) WHERE status <> 'pending';

-- A partition for every audience there is; new audiences get theirs from their first run.
-- (Claims update only unindexed lease columns: fillfactor 70 keeps them HOT updates.)
DO $$
DECLARE a bigint;
BEGIN
    FOR a IN SELECT id FROM audiences LOOP
        EXECUTE format('CREATE TABLE outbox_%s PARTITION OF outbox FOR VALUES IN (%s)
                        WITH (fillfactor = 70)', a, a);
        EXECUTE format('ALTER TABLE outbox_%s ADD CONSTRAINT outbox_%s_audience
                        CHECK (audience_id = %s)', a, a, a);
    END LOOP;
END $$;

INSERT INTO outbox (audience_id, user_id, member, email, phone, name, target_version, run_id,
                    status, attempts, next_attempt_at, lease_owner, lease_until, last_status,
                    last_error, created_at)
SELECT audience_id, user_id, member, email, phone, name, target_version, run_id,
       status, attempts, next_attempt_at, lease_owner, lease_until, last_status,
       last_error, created_at
  FROM outbox_unpartitioned;
DROP TABLE outbox_unpartitioned;

ALTER TABLE synced_members ALTER COLUMN user_id TYPE text COLLATE "C";

CREATE VIEW ops.audience_overview AS
SELECT a.id AS audience_id, a.key, a.name, a.enabled, a.schedule,
       (SELECT count(*) FROM synced_members s WHERE s.audience_id = a.id AND s.member) AS members,
       lr.id AS last_run_id, lr.kind AS last_run_kind, lr.status AS last_run_status,
       lr.started_at AS last_run_started_at, lr.finished_at AS last_run_finished_at,
       (SELECT max(r.finished_at) FROM runs r
         WHERE r.audience_id = a.id AND r.status = 'succeeded') AS last_success_at,
       a.next_run_at,
       coalesce(o.pending, 0) AS pending,
       coalesce(o.failed, 0) AS failed,
       o.oldest_pending_at,
       now() - o.oldest_pending_at AS oldest_pending_age
  FROM audiences a
  LEFT JOIN LATERAL (SELECT r.id, r.kind, r.status, r.started_at, r.finished_at
                       FROM runs r WHERE r.audience_id = a.id
                      ORDER BY r.id DESC LIMIT 1) lr ON true
  LEFT JOIN LATERAL (SELECT count(*) FILTER (WHERE ob.status = 'pending') AS pending,
                            count(*) FILTER (WHERE ob.status IN ('failed', 'rejected')) AS failed,
                            min(ob.created_at) AS oldest_pending_at
                       FROM outbox ob WHERE ob.audience_id = a.id) o ON true;

CREATE VIEW ops.failed_changes AS
SELECT o.audience_id, a.key, o.user_id, o.member AS value, o.status, o.attempts,
       o.last_status, o.last_error, o.run_id, o.created_at, o.next_attempt_at
  FROM outbox o JOIN audiences a ON a.id = o.audience_id
 WHERE o.status IN ('failed', 'rejected');
