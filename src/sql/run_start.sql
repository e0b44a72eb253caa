-- Records a run as started ($1 audience, $2 kind, $3 owner, $4 trigger) and returns its id.
-- A full resync sets the audience's resync mark in the same statement, so until a full resync
-- ends every run of the audience is one: an interrupted resync finishes as a resync.
WITH mark AS (
    UPDATE audiences SET resync_pending = true
     WHERE id = $1 AND $2 = 'full_resync' AND NOT resync_pending)
INSERT INTO runs (audience_id, kind, status, owner, trigger)
VALUES ($1, $2, 'running', $3, $4)
RETURNING id
