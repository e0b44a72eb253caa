-- Records changes that were not confirmed (status, calls made, 429s, last answer) and
-- releases their lease; they stay in the outbox for the next run. `attempts - 1 + made`: the
-- claim counted one attempt in case the call reached Wigzo, and the calls actually made
-- replace it (0 when the run stopped before sending or Wigzo answered only 429s).
UPDATE outbox o
   SET status = r.status, attempts = greatest(o.attempts - 1 + r.attempts, 0),
       throttles = o.throttles + r.throttles,
       last_status = COALESCE(r.code, o.last_status),
       last_error = COALESCE(r.error, o.last_error),
       lease_owner = NULL, lease_until = NULL
  FROM unnest($1::text[], $2::text[], $3::int[], $4::int[], $5::text[], $8::int[])
       AS r(user_id, status, attempts, code, error, throttles)
 WHERE o.audience_id = $7 AND o.user_id = r.user_id AND o.lease_owner = $6
