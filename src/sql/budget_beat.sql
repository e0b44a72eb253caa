-- A replica's heartbeat for destination $1 (owner $2): records it as live, publishes its own
-- 429 pause ($3 seconds from now, when above 0), forgets replicas gone for a minute, and
-- returns how many replicas are live (itself included) and how long the shared pause still
-- runs (seconds; NULL or negative when none). The statement's reads see the tables as they
-- were before it: this replica's own writes count from its next beat.
WITH beat AS (
    INSERT INTO destination_replicas (destination, owner, seen_at) VALUES ($1, $2, now())
    ON CONFLICT (destination, owner) DO UPDATE SET seen_at = now()
), publish AS (
    INSERT INTO destination_throttle (destination, until)
    SELECT $1, now() + make_interval(secs => $3) WHERE $3 > 0
    ON CONFLICT (destination) DO UPDATE
       SET until = greatest(destination_throttle.until, EXCLUDED.until)
), forget AS (
    DELETE FROM destination_replicas
     WHERE destination = $1 AND seen_at < now() - interval '1 minute'
)
SELECT 1 + (SELECT count(*) FROM destination_replicas
             WHERE destination = $1 AND owner <> $2
               AND seen_at > now() - interval '3 seconds'),
       (SELECT extract(epoch FROM until - now())::float8
          FROM destination_throttle WHERE destination = $1)
