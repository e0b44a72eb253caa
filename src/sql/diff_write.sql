-- (follows diff.sql) Writes the run's changes to the outbox; $3 = run id. Returns the counts
-- of `true` and `false` changes. Invariants: one messageId per change (the same value keeps
-- its change number; a new value moves past a replaced change that may have been sent), and
-- rejected changes are held until their value or contact fields change or a full resync asks.
, ins AS (
    INSERT INTO outbox (audience_id, user_id, member, email, phone, name, target_version, run_id)
    SELECT $1, user_id, member, email, phone, name, target_version, $3
      FROM diff
    ON CONFLICT (audience_id, user_id) DO UPDATE SET
        member = EXCLUDED.member, email = EXCLUDED.email, phone = EXCLUDED.phone,
        name = EXCLUDED.name, run_id = EXCLUDED.run_id, next_attempt_at = now(),
        lease_owner = NULL, lease_until = NULL,
        target_version = CASE WHEN outbox.member = EXCLUDED.member OR outbox.attempts = 0
                              THEN outbox.target_version
                              ELSE outbox.target_version + 1 END,
        attempts = CASE WHEN outbox.member = EXCLUDED.member THEN outbox.attempts ELSE 0 END,
        throttles = CASE WHEN outbox.member = EXCLUDED.member THEN outbox.throttles ELSE 0 END,
        created_at = CASE WHEN outbox.member = EXCLUDED.member
                          THEN outbox.created_at ELSE now() END,
        status = CASE WHEN outbox.status = 'rejected' AND NOT $2
                           AND outbox.member = EXCLUDED.member
                           AND (outbox.email, outbox.phone, outbox.name)
                               IS NOT DISTINCT FROM (EXCLUDED.email, EXCLUDED.phone, EXCLUDED.name)
                      THEN 'rejected' ELSE 'pending' END
    RETURNING member
)
SELECT count(*) FILTER (WHERE member), count(*) FILTER (WHERE NOT member) FROM ins
