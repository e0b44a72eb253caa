-- The scheduled worker writes, after each decision, when each audience's next scheduled run
-- is due (UTC), so dashboards can show it without evaluating cron expressions in SQL.
ALTER TABLE audiences ADD COLUMN next_run_at timestamptz;

-- Runs record what started them: 'manual' (CLI), 'schedule' (the daemon), 'api' (POST).
ALTER TABLE runs ADD CONSTRAINT runs_trigger_known CHECK (trigger IN ('manual', 'schedule', 'api'));
