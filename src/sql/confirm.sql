-- Confirms changes Wigzo answered 2xx: deletes each from the outbox, advances the user's
-- synced snapshot and appends the history, in one statement. Invariant: the snapshot advances
-- only after a 2xx, and only for the change that was sent (same number and value: $4
-- the flag, $7 a trait's value) while owner $6 still holds its lease. Returns how many were confirmed.
-- The lease test is wrapped in coalesce so the planner does not estimate it from the lease
-- column's statistics, stale for most of a run; a plan trusting them scanned the whole outbox.
WITH done AS (
    DELETE FROM outbox o
     USING unnest($2::text[], $3::bigint[], $4::bool[], $5::uuid[], $7::text[])
           AS r(user_id, version, member, message_id, value)
     WHERE o.audience_id = $1 AND o.user_id = r.user_id
       AND o.target_version = r.version AND o.member = r.member
       AND o.value IS NOT DISTINCT FROM r.value
       AND coalesce(o.lease_owner = $6, false)
 RETURNING o.audience_id, o.user_id, o.member, o.email, o.phone, o.name, o.value,
           o.target_version, o.run_id, r.message_id, o.created_at
), snap AS (
    INSERT INTO synced_members
           (audience_id, user_id, member, email, phone, name, value, version, confirmed_at)
    SELECT audience_id, user_id, member, email, phone, name, value, target_version, now()
      FROM done
    ON CONFLICT (audience_id, user_id) DO UPDATE SET
           member = EXCLUDED.member, email = EXCLUDED.email, phone = EXCLUDED.phone,
           name = EXCLUDED.name, value = EXCLUDED.value, version = EXCLUDED.version,
           confirmed_at = EXCLUDED.confirmed_at
), ev AS (
    INSERT INTO membership_events
           (audience_id, user_id, member, value, run_id, message_id, detected_at, confirmed_at)
    SELECT audience_id, user_id, member, value, run_id, message_id, created_at, now()
      FROM done
)
SELECT count(*) FROM done
