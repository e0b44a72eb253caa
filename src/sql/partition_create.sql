-- An audience's outbox partition, created without indexes inside its first sync's
-- transaction: rows copied in with only (user_id, email, phone, name, value)
-- become version-1 `true` changes of the run. fillfactor 70: a claim updates only unindexed lease columns, and free
-- space on the page keeps those HOT updates. The CHECK lets ATTACH skip its validation scan.
CREATE TABLE {table} (LIKE outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    WITH (fillfactor = 70);
ALTER TABLE {table} ADD CONSTRAINT {table}_audience CHECK (audience_id = {audience_id}),
    ALTER audience_id SET DEFAULT {audience_id}, ALTER member SET DEFAULT true,
    ALTER target_version SET DEFAULT 1, ALTER run_id SET DEFAULT {run_id}
