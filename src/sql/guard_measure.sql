-- The removal guard's measure for audience $1: the users Wigzo has, or may have, as members
-- (confirmed members, and owed `true` changes that may already have reached it: attempted, or
-- replacing one that was), and how many of them the run's capture no longer has (each would
-- be sent `false`). Nothing is written.
WITH maybe_members AS (
    SELECT s.user_id
      FROM synced_members s
     WHERE s.audience_id = $1 AND s.member
    UNION
    SELECT o.user_id
      FROM outbox o
      LEFT JOIN synced_members s ON s.audience_id = $1 AND s.user_id = o.user_id
     WHERE o.audience_id = $1 AND o.member AND s.member IS NOT TRUE
       AND (o.attempts > 0 OR o.target_version > COALESCE(s.version, 0) + 1)
)
SELECT count(*),
       count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM pg_temp.audience_capture c
                                           WHERE c.user_id = m.user_id))
  FROM maybe_members m
