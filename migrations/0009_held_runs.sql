-- A run the removal guard held: its diff would have removed most of the audience's confirmed
-- members (or the query returned nothing), so it wrote and sent nothing until a person
-- releases it (`--allow-removals`). Its reason is the run's error.
ALTER TABLE runs DROP CONSTRAINT runs_status_known;
ALTER TABLE runs ADD CONSTRAINT runs_status_known
    CHECK (status IN ('running', 'succeeded', 'partial', 'held', 'failed', 'abandoned'));

-- The overview gains `held` (the latest run was held) and `held_reason`; the columns before
-- them are unchanged.
CREATE OR REPLACE VIEW ops.audience_overview AS
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
       now() - o.oldest_pending_at AS oldest_pending_age,
       coalesce(lr.status = 'held', false) AS held,
       CASE WHEN lr.status = 'held' THEN regexp_replace(lr.error, '^held: ', '') END AS held_reason
  FROM audiences a
  LEFT JOIN LATERAL (SELECT r.id, r.kind, r.status, r.started_at, r.finished_at, r.error
                       FROM runs r WHERE r.audience_id = a.id
                      ORDER BY r.id DESC LIMIT 1) lr ON true
  LEFT JOIN LATERAL (SELECT count(*) FILTER (WHERE ob.status = 'pending') AS pending,
                            count(*) FILTER (WHERE ob.status IN ('failed', 'rejected')) AS failed,
                            min(ob.created_at) AS oldest_pending_at
                       FROM outbox ob WHERE ob.audience_id = a.id) o ON true;
