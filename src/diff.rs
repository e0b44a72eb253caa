//! Diff: compares the captured snapshot with the confirmed state inside Postgres and writes the
//! changes to the outbox (or previews them for a dry run); an audience's first sync, where
//! every member is a change, writes them straight from the query.

use sqlx::{PgConnection, Row};

use crate::audience::db_message;
use crate::outbox::{self, Change};
use crate::snapshot::{Captured, Reader, SnapshotError};
use crate::sql;

/// What a diff sends, from the computation's kind and the run's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// A full resync: every member (or value) again, not only what changed.
    pub full: bool,
    /// Users the capture no longer has are sent `false` (audiences) or null (traits with
    /// `on_missing = "null"`); a trait with `on_missing = "keep"` sends them nothing.
    pub removals: bool,
    /// A trait: changes carry a value, and a removal's value is JSON null.
    pub values: bool,
}

impl Rules {
    /// The rules for a run of `def`.
    pub fn new(def: &crate::audience::AudienceDef, full: bool) -> Self {
        Rules {
            full,
            removals: def.sends_removals(),
            values: def.kind == crate::audience::Kind::Trait,
        }
    }

    /// An audience's rules (tests, benchmarks).
    pub fn audience(full: bool) -> Self {
        Rules {
            full,
            removals: true,
            values: false,
        }
    }
}

/// How many changes a diff holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiffCounts {
    /// `true` changes (users who entered, or every member on a full resync; for a trait,
    /// values sent).
    pub added: i64,
    /// `false` changes (confirmed members who left; for a trait, nulls sent).
    pub removed: i64,
}

/// Why a diff could not be computed or written.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// The query could not be captured.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Writing the changes failed.
    #[error("cannot write the diff to the outbox: {}", db_message(.0))]
    Db(#[from] sqlx::Error),
}

/// Whether the next run of an audience is its first sync: it has no outbox partition yet
/// (no change was ever written for it) and nothing confirmed.
pub async fn is_first_sync(conn: &mut PgConnection, audience_id: i64) -> Result<bool, sqlx::Error> {
    Ok(!outbox::has_partition(conn, audience_id).await?
        && !sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM synced_members WHERE audience_id = $1)",
        )
        .bind(audience_id)
        .fetch_one(&mut *conn)
        .await?)
}

/// An audience's first sync: nothing is confirmed and nothing owed, so every member (for a
/// trait: every user with a value) is a new version-1 `true` change and the diff is the capture itself. The query's rows stream
/// straight into the audience's new outbox partition (no capture table, no joins), which is
/// indexed and attached in the same transaction: a failed query or a crash leaves nothing.
pub async fn first_sync(
    conn: &mut PgConnection,
    reader: Reader,
    audience_id: i64,
    run_id: i64,
) -> Result<(Captured, DiffCounts), DiffError> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    let partition = outbox::NewPartition::create(&mut tx, audience_id, run_id).await?;
    let streamed = reader.copy_into(&mut tx, &partition.copy_in()).await?;
    let duplicates = partition.attach(&mut tx).await?;
    tx.commit().await?;
    let members = (streamed.rows - duplicates) as i64;
    Ok((
        Captured {
            members,
            skipped_rows: streamed.skipped as i64,
        },
        DiffCounts {
            added: members,
            removed: 0,
        },
    ))
}

/// Writes this run's changes to the outbox in one transaction: new changes are inserted, a
/// stale pending change for the same user is replaced (keeping its attempts and message id if
/// it is the same change), and changes the diff no longer contains are deleted.
pub async fn write_outbox(
    conn: &mut PgConnection,
    audience_id: i64,
    run_id: i64,
    rules: Rules,
) -> Result<DiffCounts, DiffError> {
    use sqlx::Connection;
    outbox::ensure_partition(conn, audience_id, run_id).await?;
    let mut tx = conn.begin().await?;
    let row = sqlx::query(sql::DIFF_WRITE)
        .bind(audience_id)
        .bind(rules.full)
        .bind(rules.removals)
        .bind(rules.values)
        .bind(run_id)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM outbox WHERE audience_id = $1 AND run_id <> $2")
        .bind(audience_id)
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let counts = DiffCounts {
        added: row.get(0),
        removed: row.get(1),
    };
    refresh_statistics(conn, audience_id, (counts.added + counts.removed) as u64).await?;
    Ok(counts)
}

/// Changes written at once above which the outbox's statistics are refreshed.
const ANALYZE_AFTER: u64 = 5_000;

/// After a large diff, brings the outbox's planner statistics up to date (autovacuum would,
/// but only later): with the table still looking empty, the claim's plan sorted every pending
/// row for each batch instead of walking the key from the cursor, a cost that grows with the
/// backlog.
async fn refresh_statistics(
    conn: &mut PgConnection,
    audience_id: i64,
    written: u64,
) -> Result<(), sqlx::Error> {
    if written >= ANALYZE_AFTER {
        // The audience's partition only: ANALYZE of `outbox` would sample every audience's.
        crate::snapshot::analyze_roughly(conn, &sql::Table::partition(audience_id)).await?;
    }
    Ok(())
}

/// Counts the changes and returns a few of them, writing nothing (dry run).
pub async fn preview(
    conn: &mut PgConnection,
    audience_id: i64,
    rules: Rules,
    sample: i64,
) -> Result<(DiffCounts, Vec<Change>), sqlx::Error> {
    let row = sqlx::query(sql::DIFF_COUNT)
        .bind(audience_id)
        .bind(rules.full)
        .bind(rules.removals)
        .bind(rules.values)
        .fetch_one(&mut *conn)
        .await?;
    let mut changes = sqlx::query_as::<_, Change>(sql::DIFF_SAMPLE)
        .bind(audience_id)
        .bind(rules.full)
        .bind(rules.removals)
        .bind(rules.values)
        .bind(sample)
        .fetch_all(&mut *conn)
        .await?;
    for c in &mut changes {
        c.message_id = c.derive_message_id(audience_id);
    }
    Ok((
        DiffCounts {
            added: row.get(0),
            removed: row.get(1),
        },
        changes,
    ))
}
