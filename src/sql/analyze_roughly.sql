-- Planner statistics for a table just filled, from a tenth of the default sample: the plans
-- that read it need its size and a rough picture of its columns.
SET default_statistics_target = 10; ANALYZE {table}; RESET default_statistics_target
