-- Records a run's end. Runs before the run's lock is released, so another replica never finds
-- it `running`. A full resync that delivered everything it could (succeeded or partial)
-- clears the audience's resync mark in the same statement.
WITH r AS (
    UPDATE runs SET status = $2, finished_at = now(), members = $3, added = $4,
           removed = $5, sent = $6, failed = $7, retried = $8, skipped_rows = $9,
           error = $10
     WHERE id = $1
 RETURNING audience_id, kind, status)
UPDATE audiences a SET resync_pending = false
  FROM r
 WHERE a.id = r.audience_id AND r.kind = 'full_resync'
   AND r.status IN ('succeeded', 'partial')
