-- Computed traits: a per-user value computed by a query (lifetime value, last order date),
-- synced to Wigzo as a user property on the same pipeline as audience membership. A row of
-- `audiences` is a computation of one of two kinds; keys stay one namespace (Wigzo has one).
-- Every stored audience, change owed and messageId is kept as it is: audiences get
-- kind = 'audience' and their value columns stay NULL.
ALTER TABLE audiences
    ADD COLUMN kind text NOT NULL DEFAULT 'audience'
        CONSTRAINT audiences_kind_known CHECK (kind IN ('audience', 'trait')),
    -- For traits: what a user who leaves the result (or whose value becomes NULL) is sent:
    -- 'null' once, or nothing ('keep').
    ADD COLUMN on_missing text NOT NULL DEFAULT 'null'
        CONSTRAINT audiences_on_missing_known CHECK (on_missing IN ('null', 'keep'));

-- A trait's value as the JSON text sent (canonical: `1.5`, `"gold"`, `"2026-01-02"`), so that
-- comparing two values is comparing two strings. For a trait, `member` says whether the user
-- has a value (false: the trait was, or is to be, sent as null, and `value` is 'null'). NULL
-- for audiences, whose value is `member`.
ALTER TABLE synced_members ADD COLUMN value text;
ALTER TABLE outbox ADD COLUMN value text;
ALTER TABLE membership_events ADD COLUMN value text;

-- The overview and failed changes gain `kind` (audience or trait); the columns before it are
-- unchanged. For a trait, `members` counts users with a confirmed value.
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
       CASE WHEN lr.status = 'held' THEN regexp_replace(lr.error, '^held: ', '') END AS held_reason,
       a.kind
  FROM audiences a
  LEFT JOIN LATERAL (SELECT r.id, r.kind, r.status, r.started_at, r.finished_at, r.error
                       FROM runs r WHERE r.audience_id = a.id
                      ORDER BY r.id DESC LIMIT 1) lr ON true
  LEFT JOIN LATERAL (SELECT count(*) FILTER (WHERE ob.status = 'pending') AS pending,
                            count(*) FILTER (WHERE ob.status IN ('failed', 'rejected')) AS failed,
                            min(ob.created_at) AS oldest_pending_at
                       FROM outbox ob WHERE ob.audience_id = a.id) o ON true;

-- `value` stays the membership flag (for a trait: whether it has a value); `trait_value` is
-- the JSON a trait's change sends.
CREATE OR REPLACE VIEW ops.failed_changes AS
SELECT o.audience_id, a.key, o.user_id, o.member AS value, o.status, o.attempts,
       o.last_status, o.last_error, o.run_id, o.created_at, o.next_attempt_at,
       a.kind, o.value AS trait_value
  FROM outbox o JOIN audiences a ON a.id = o.audience_id
 WHERE o.status IN ('failed', 'rejected');

-- `kind` here is the run's (initial, incremental, full_resync); `computation_class` is what
-- was synced (audience or trait), named as the identify call's context names it.
CREATE OR REPLACE VIEW ops.recent_runs AS
SELECT r.id AS run_id, r.audience_id, a.key, r.kind, r.status, r.trigger, r.owner,
       r.started_at, r.finished_at,
       round(extract(epoch FROM r.finished_at - r.started_at)::numeric, 3) AS duration_s,
       r.members, r.added, r.removed, r.sent, r.failed, r.retried, r.skipped_rows, r.error,
       a.kind AS computation_class
  FROM runs r JOIN audiences a ON a.id = r.audience_id;

-- Entered and left are audience words: the history of audiences only.
CREATE OR REPLACE VIEW ops.membership_history AS
SELECT e.audience_id, a.key, e.user_id,
       CASE WHEN e.member THEN 'entered' ELSE 'left' END AS change,
       e.run_id, e.message_id, e.detected_at, e.confirmed_at
  FROM membership_events e JOIN audiences a ON a.id = e.audience_id
 WHERE a.kind = 'audience';

-- Every value Wigzo confirmed for a trait: `value` is the JSON sent (NULL when the trait was
-- sent as null), `value_text` the same as plain text (a string without its quotes).
CREATE VIEW ops.trait_history AS
SELECT e.audience_id, a.key, e.user_id,
       CASE WHEN e.member THEN e.value::jsonb END AS value,
       CASE WHEN e.member THEN e.value::jsonb #>> '{}' END AS value_text,
       e.run_id, e.message_id, e.detected_at, e.confirmed_at
  FROM membership_events e JOIN audiences a ON a.id = e.audience_id
 WHERE a.kind = 'trait';
