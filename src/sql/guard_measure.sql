-- The removal guard's measure: audience $1's confirmed members, and how many of them the
-- run's capture no longer has (each would be sent `false`). Nothing is written.
SELECT count(*),
       count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM pg_temp.audience_capture c
                                           WHERE c.user_id = s.user_id))
  FROM synced_members s
 WHERE s.audience_id = $1 AND s.member
