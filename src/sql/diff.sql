-- The changes a run owes Wigzo, as a CTE `diff` over the run's capture
-- (pg_temp.audience_capture) and what Wigzo confirmed (synced_members).
-- $1 = audience id, $2 = full resync (every member or value, not only what changed),
-- $3 = send removals (users confirmed with a value, or as members, whom the capture no longer
-- has: audiences, and traits with on_missing = "null"), $4 = a trait (a removal sends the
-- value JSON null, stored as 'null'; an audience's sends `false`).
-- A trait's user is a "member" while they have a value: `value` is compared as canonical
-- text, so a user whose value changed is sent again.
-- Besides real changes it re-asserts users whose owed change may already have reached Wigzo
-- unconfirmed: it was attempted (attempts > 0), or it replaced one that was (its change
-- number is past the next one). Wigzo may hold that value, so the current one is sent again:
-- a failed removal must not hide a re-add. Invariant: no change is lost.
WITH diff AS (
    SELECT c.user_id, true AS member, c.email, c.phone, c.name, c.value,
           COALESCE(s.version, 0) + 1 AS target_version
      FROM pg_temp.audience_capture c
      LEFT JOIN synced_members s ON s.audience_id = $1 AND s.user_id = c.user_id
      LEFT JOIN outbox o ON o.audience_id = $1 AND o.user_id = c.user_id
     WHERE $2 OR s.member IS NOT TRUE OR s.value IS DISTINCT FROM c.value
        OR o.attempts > 0 OR o.target_version > COALESCE(s.version, 0) + 1
    UNION ALL
    SELECT u.user_id, false, u.email, u.phone, u.name, CASE WHEN $4 THEN 'null' END,
           u.version + 1
      FROM (
            SELECT s.user_id, s.email, s.phone, s.name, s.version
              FROM synced_members s
             WHERE s.audience_id = $1 AND s.member
            UNION ALL
            SELECT o.user_id, COALESCE(s.email, o.email), COALESCE(s.phone, o.phone),
                   COALESCE(s.name, o.name), COALESCE(s.version, 0)
              FROM outbox o
              LEFT JOIN synced_members s ON s.audience_id = $1 AND s.user_id = o.user_id
             WHERE o.audience_id = $1 AND s.member IS NOT TRUE
               AND (o.attempts > 0 OR o.target_version > COALESCE(s.version, 0) + 1)
           ) u
     WHERE $3
       AND NOT EXISTS (SELECT 1 FROM pg_temp.audience_capture c WHERE c.user_id = u.user_id)
    UNION ALL
    -- Without removals (a trait with on_missing = "keep"), a user who left still keeps an owed
    -- change that may have reached Wigzo: it is carried as it is (same number, same id) until
    -- confirmed, so the confirmed value never falls behind what Wigzo may hold.
    SELECT o.user_id, o.member, o.email, o.phone, o.name, o.value,
           COALESCE(s.version, 0) + 1
      FROM outbox o
      LEFT JOIN synced_members s ON s.audience_id = $1 AND s.user_id = o.user_id
     WHERE NOT $3 AND o.audience_id = $1
       AND (o.attempts > 0 OR o.target_version > COALESCE(s.version, 0) + 1)
       AND NOT EXISTS (SELECT 1 FROM pg_temp.audience_capture c WHERE c.user_id = o.user_id)
)
