-- (follows diff.sql) How many `true` and `false` changes the diff holds (dry runs, held runs).
SELECT count(*) FILTER (WHERE member), count(*) FILTER (WHERE NOT member) FROM diff
