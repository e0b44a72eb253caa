//! The SQL the worker runs, kept in `src/sql/*.sql` files that a DBA can read and `EXPLAIN`
//! (each opens with what it does and which invariant it keeps), and the one place that puts
//! a table name into a statement.

use sqlx::AssertSqlSafe;

/// Writes a run's diff to the outbox ($1 audience, $2 full resync, $3 run).
pub const DIFF_WRITE: &str = concat!(
    include_str!("sql/diff.sql"),
    include_str!("sql/diff_write.sql")
);
/// Counts a diff's changes without writing ($1 audience, $2 full resync).
pub const DIFF_COUNT: &str = concat!(
    include_str!("sql/diff.sql"),
    include_str!("sql/diff_count.sql")
);
/// A diff's first changes ($1 audience, $2 full resync, $3 how many).
pub const DIFF_SAMPLE: &str = concat!(
    include_str!("sql/diff.sql"),
    include_str!("sql/diff_sample.sql")
);
/// Claims pending changes under a lease.
pub const CLAIM: &str = include_str!("sql/claim.sql");
/// Confirms changes: outbox, snapshot and history in one statement.
pub const CONFIRM: &str = include_str!("sql/confirm.sql");
/// Records changes that were not confirmed.
pub const RECORD_FAILURES: &str = include_str!("sql/record_failures.sql");
/// The run's capture table.
pub const CAPTURE_CREATE: &str = include_str!("sql/capture_create.sql");
/// Fills the capture table.
pub const CAPTURE_COPY: &str = include_str!("sql/capture_copy.sql");
/// Drops (and counts) the capture's rows without a usable id.
pub const CAPTURE_SKIPPED: &str = include_str!("sql/capture_skipped.sql");
/// The capture's unique index on the user id.
pub const CAPTURE_INDEX: &str = include_str!("sql/capture_index.sql");
/// The removal guard's measure.
pub const GUARD_MEASURE: &str = include_str!("sql/guard_measure.sql");
/// A replica's heartbeat in the shared destination budget.
pub const BUDGET_BEAT: &str = include_str!("sql/budget_beat.sql");
/// Records a run as started.
pub const RUN_START: &str = include_str!("sql/run_start.sql");
/// Records a run's end.
pub const RUN_FINISH: &str = include_str!("sql/run_finish.sql");

/// Templates that name a table (`{table}`) or hold an integer (`{audience_id}`, `{run_id}`,
/// `{timeout_ms}`): filled in only by [`render`].
pub mod template {
    /// Creates an audience's partition, without indexes.
    pub const PARTITION_CREATE: &str = include_str!("sql/partition_create.sql");
    /// Fills a new partition.
    pub const PARTITION_COPY: &str = include_str!("sql/partition_copy.sql");
    /// A new partition's unique index.
    pub const PARTITION_INDEX: &str = include_str!("sql/partition_index.sql");
    /// A new partition's key and second index.
    pub const PARTITION_KEYS: &str = include_str!("sql/partition_keys.sql");
    /// Attaches a partition to `outbox`.
    pub const PARTITION_ATTACH: &str = include_str!("sql/partition_attach.sql");
    /// Collapses duplicate user ids in a table.
    pub const DEDUPE: &str = include_str!("sql/dedupe.sql");
    /// Rough statistics for a table just filled.
    pub const ANALYZE_ROUGHLY: &str = include_str!("sql/analyze_roughly.sql");
    /// The audience query's read-only transaction.
    pub const READER_BEGIN: &str = include_str!("sql/reader_begin.sql");
}

/// A table a statement template names: the run's capture table, or an audience's outbox
/// partition. Built only from a constant or an integer id, so its name is always a plain
/// identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table(String);

impl Table {
    /// The run's capture of its audience query (a temporary table on the run's connection).
    pub fn capture() -> Self {
        Self("pg_temp.audience_capture".into())
    }

    /// The audience's partition of `outbox`.
    pub fn partition(audience_id: i64) -> Self {
        Self(format!("outbox_{audience_id}"))
    }

    /// The table's name as SQL names it.
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// A template with `{table}` and its integer placeholders filled in. Only identifiers built by
/// [`Table`] and integers go in, never text from outside, so the result is safe to run.
pub fn render(
    template: &'static str,
    table: Option<&Table>,
    ints: &[(&str, i64)],
) -> AssertSqlSafe<String> {
    let mut sql = template.to_string();
    if let Some(t) = table {
        sql = sql.replace("{table}", t.name());
    }
    for (name, value) in ints {
        sql = sql.replace(&format!("{{{name}}}"), &value.to_string());
    }
    debug_assert!(!sql.contains('{'), "unfilled placeholder in {sql}");
    AssertSqlSafe(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_query_file_is_used_and_every_template_filled() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/sql");
        let this = include_str!("sql.rs");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert!(files.len() >= 20, "{files:?}");
        for f in &files {
            assert!(f.ends_with(".sql"), "{f} is not a .sql file");
            assert!(
                this.contains(&format!("include_str!(\"sql/{f}\")")),
                "src/sql/{f} is not used"
            );
            let text = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
            assert!(text.starts_with("--"), "{f} does not open with a comment");
        }
        let sql = render(
            template::PARTITION_CREATE,
            Some(&Table::partition(7)),
            &[("audience_id", 7), ("run_id", 3)],
        );
        assert!(sql.0.contains("CREATE TABLE outbox_7 (LIKE outbox"));
        assert!(sql.0.contains("CHECK (audience_id = 7)") && sql.0.contains("DEFAULT 3"));
    }
}
