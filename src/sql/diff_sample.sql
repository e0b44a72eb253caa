-- (follows diff.sql) The first $3 changes, entries first (a dry run's sample).
SELECT user_id, member, email, phone, name, target_version, now() AS detected_at
  FROM diff ORDER BY member DESC, user_id LIMIT $3
