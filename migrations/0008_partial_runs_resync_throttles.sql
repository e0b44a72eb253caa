-- A run whose only undelivered changes are ones Wigzo rejected (a 4xx for that user) ends
-- 'partial': everything else was confirmed, and the rejected changes are held until the
-- user's value changes, a full resync, or `audience-sync retry`.
ALTER TABLE runs DROP CONSTRAINT runs_status_check;
ALTER TABLE runs ADD CONSTRAINT runs_status_known
    CHECK (status IN ('running', 'succeeded', 'partial', 'failed', 'abandoned'));

-- Set when a full resync starts, cleared when one finishes (succeeded or partial): a resync
-- stopped part-way (SIGTERM, refused token, lost lock) is resumed as a full resync by
-- whichever run of the audience comes next, instead of as an incremental run whose diff
-- would drop the resync's unsent changes.
ALTER TABLE audiences ADD COLUMN resync_pending boolean NOT NULL DEFAULT false;

-- 429 answers, counted apart from `attempts`: a throttled call was not applied by Wigzo, so
-- it neither uses up the attempt budget nor makes the change look tried.
ALTER TABLE outbox ADD COLUMN throttles integer NOT NULL DEFAULT 0;
