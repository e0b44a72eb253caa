-- Read-only views for operators and dashboards (Grafana, Metabase, psql). They never expose
-- email or phone. Order recent runs with ORDER BY run_id DESC.
CREATE SCHEMA IF NOT EXISTS ops;

CREATE INDEX IF NOT EXISTS outbox_audience_status ON outbox (audience_id, status);

-- One row per audience: members, last run, next scheduled run, backlog.
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

-- Every run with its counts and duration (NULL while running).
CREATE VIEW ops.recent_runs AS
SELECT r.id AS run_id, r.audience_id, a.key, r.kind, r.status, r.trigger, r.owner,
       r.started_at, r.finished_at,
       round(extract(epoch FROM r.finished_at - r.started_at)::numeric, 3) AS duration_s,
       r.members, r.added, r.removed, r.sent, r.failed, r.retried, r.skipped_rows, r.error
  FROM runs r JOIN audiences a ON a.id = r.audience_id;

-- Changes Wigzo rejected or that ran out of retries; retried by the next run.
CREATE VIEW ops.failed_changes AS
SELECT o.audience_id, a.key, o.user_id, o.member AS value, o.status, o.attempts,
       o.last_status, o.last_error, o.run_id, o.created_at, o.next_attempt_at
  FROM outbox o JOIN audiences a ON a.id = o.audience_id
 WHERE o.status IN ('failed', 'rejected');

-- Who entered or left which audience, when it was detected and when Wigzo confirmed it.
CREATE VIEW ops.membership_history AS
SELECT e.audience_id, a.key, e.user_id,
       CASE WHEN e.member THEN 'entered' ELSE 'left' END AS change,
       e.run_id, e.message_id, e.detected_at, e.confirmed_at
  FROM membership_events e JOIN audiences a ON a.id = e.audience_id;
