-- After a capture filled on the run's own connection (INSERT ... SELECT of the query): the
-- rows whose id is unusable (NULL: empty, blank, too long, or a trait value JSON cannot
-- carry) are deleted, and their number is the run's skipped rows.
DELETE FROM pg_temp.audience_capture WHERE user_id IS NULL
