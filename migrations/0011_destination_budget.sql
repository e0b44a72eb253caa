-- One destination budget across replicas, coordinated through this database (the replicas
-- never talk to each other). `destination` is a fingerprint of the Wigzo base URL and org
-- token (an md5, never the token itself), so replicas with one token share one budget.

-- Live replicas: each writes its row five times a second and takes an equal share of
-- `requests_per_second` among the rows seen in the last 3 seconds. A replica that dies stops
-- writing, and its share returns to the others within 3 seconds.
CREATE TABLE destination_replicas (
    destination text NOT NULL,
    owner       text NOT NULL,
    seen_at     timestamptz NOT NULL,
    PRIMARY KEY (destination, owner)
);

-- The latest 429's pause: no replica calls the destination before `until`.
CREATE TABLE destination_throttle (
    destination text PRIMARY KEY,
    until       timestamptz NOT NULL
);
