-- The audience query's transaction: read-only, so a query that writes is refused by
-- PostgreSQL, and bounded by the statement timeout (milliseconds).
BEGIN READ ONLY; SET LOCAL statement_timeout = {timeout_ms}
