-- (follows diff.sql) The first $5 changes, entries first (a dry run's sample), each with the
-- change number and detection time the write would give it (diff_write.sql's rule), so the
-- sample's messageIds are the ones a real run sends.
SELECT d.user_id, d.member, d.email, d.phone, d.name, d.value,
       CASE WHEN o.user_id IS NULL THEN d.target_version
            WHEN (o.member, o.email, o.phone, o.name, o.value)
                 IS NOT DISTINCT FROM (d.member, d.email, d.phone, d.name, d.value)
              OR o.attempts = 0 THEN o.target_version
            ELSE o.target_version + 1 END AS target_version,
       CASE WHEN (o.member, o.email, o.phone, o.name, o.value)
                 IS NOT DISTINCT FROM (d.member, d.email, d.phone, d.name, d.value)
            THEN o.created_at ELSE now() END AS detected_at
  FROM diff d
  LEFT JOIN outbox o ON o.audience_id = $1 AND o.user_id = d.user_id
 ORDER BY d.member DESC, d.user_id LIMIT $5
