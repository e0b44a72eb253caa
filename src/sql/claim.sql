-- Claims up to $3 pending changes of audience $1 for owner $2 with a lease of $4 seconds, in
-- user id order after $5 (the previous batch's last id): one walk of the (audience_id,
-- user_id) key per delivery. The claim counts an attempt, since once claimed a change may
-- reach Wigzo. Commits before any call: no transaction is open across HTTP.
-- `= ANY (ARRAY(...))` rather than a join: the generic plan of a join (used from the sixth
-- claim on) hashed the whole outbox for every batch.
WITH picked AS (
    SELECT user_id FROM outbox
     WHERE audience_id = $1 AND user_id > $5 AND status = 'pending'
       AND next_attempt_at <= now()
       AND (lease_until IS NULL OR lease_until < now())
     ORDER BY user_id
     LIMIT $3
     FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE outbox o
       SET lease_owner = $2, lease_until = now() + make_interval(secs => $4),
           attempts = attempts + 1
     WHERE o.audience_id = $1 AND o.user_id = ANY (ARRAY(SELECT user_id FROM picked))
 RETURNING o.user_id, o.member, o.email, o.phone, o.name, o.value, o.target_version,
           o.created_at AS detected_at
)
SELECT c.*, (SELECT max(user_id) FROM picked) AS last FROM claimed c
