-- (follows diff.sql) Writes the run's changes to the outbox; $5 = run id. Returns the counts
-- of `true` and `false` changes. Invariant: one messageId per change. The same change (same
-- value and contact fields) keeps its change number, so its retries carry one messageId,
-- with its attempts and detection time. Anything else is a new change: its number moves past
-- the replaced one's if that may have been sent, so a destination that drops repeated
-- messageIds never drops it. A rejected change is held until it changes or a full resync
-- asks again. ("Same change" is the row comparison repeated in each CASE below: ON CONFLICT
-- has no place to name it once.)
, ins AS (
    INSERT INTO outbox (audience_id, user_id, member, email, phone, name, value,
                        target_version, run_id)
    SELECT $1, user_id, member, email, phone, name, value, target_version, $5
      FROM diff
    ON CONFLICT (audience_id, user_id) DO UPDATE SET
        member = EXCLUDED.member, email = EXCLUDED.email, phone = EXCLUDED.phone,
        name = EXCLUDED.name, value = EXCLUDED.value, run_id = EXCLUDED.run_id,
        next_attempt_at = now(), lease_owner = NULL, lease_until = NULL,
        target_version =
            CASE WHEN (outbox.member, outbox.email, outbox.phone, outbox.name, outbox.value)
                      IS NOT DISTINCT FROM (EXCLUDED.member, EXCLUDED.email, EXCLUDED.phone,
                                            EXCLUDED.name, EXCLUDED.value)
                   OR outbox.attempts = 0
                 THEN outbox.target_version ELSE outbox.target_version + 1 END,
        attempts =
            CASE WHEN (outbox.member, outbox.email, outbox.phone, outbox.name, outbox.value)
                      IS NOT DISTINCT FROM (EXCLUDED.member, EXCLUDED.email, EXCLUDED.phone,
                                            EXCLUDED.name, EXCLUDED.value)
                 THEN outbox.attempts ELSE 0 END,
        throttles =
            CASE WHEN (outbox.member, outbox.email, outbox.phone, outbox.name, outbox.value)
                      IS NOT DISTINCT FROM (EXCLUDED.member, EXCLUDED.email, EXCLUDED.phone,
                                            EXCLUDED.name, EXCLUDED.value)
                 THEN outbox.throttles ELSE 0 END,
        created_at =
            CASE WHEN (outbox.member, outbox.email, outbox.phone, outbox.name, outbox.value)
                      IS NOT DISTINCT FROM (EXCLUDED.member, EXCLUDED.email, EXCLUDED.phone,
                                            EXCLUDED.name, EXCLUDED.value)
                 THEN outbox.created_at ELSE now() END,
        status =
            CASE WHEN outbox.status = 'rejected' AND NOT $2
                  AND (outbox.member, outbox.email, outbox.phone, outbox.name, outbox.value)
                      IS NOT DISTINCT FROM (EXCLUDED.member, EXCLUDED.email, EXCLUDED.phone,
                                            EXCLUDED.name, EXCLUDED.value)
                 THEN 'rejected' ELSE 'pending' END
    RETURNING member
)
SELECT count(*) FILTER (WHERE member), count(*) FILTER (WHERE NOT member) FROM ins
