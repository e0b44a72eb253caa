//! Diff: compares the captured snapshot with the confirmed state inside Postgres and writes the
//! changes to the outbox (or previews them for a dry run); an audience's first sync, where
//! every member is a change, writes them straight from the query.

// The SQL below is built from constants only; values are bound parameters.
use sqlx::{AssertSqlSafe, PgConnection, Row};

use crate::audience::db_message;
use crate::outbox::{self, Change};
use crate::snapshot::{Captured, Reader, SnapshotError};

/// The set of changes, as SQL over the capture table and `synced_members`.
/// $1 = audience id, $2 = full resync (send every member, not only those who entered).
///
/// Besides real changes it re-asserts users whose owed change may already have reached Wigzo
/// unconfirmed: it was attempted (`attempts > 0`), or it replaced one that was (its change
/// number is past the next one, see `write_outbox`). Wigzo may hold that value, so the
/// current one is sent again (a failed removal must not hide a re-add).
const DIFF: &str = "
    diff AS (
        SELECT c.user_id, true AS member, c.email, c.phone, c.name,
               COALESCE(s.version, 0) + 1 AS target_version
          FROM pg_temp.audience_capture c
          LEFT JOIN synced_members s ON s.audience_id = $1 AND s.user_id = c.user_id
          LEFT JOIN outbox o ON o.audience_id = $1 AND o.user_id = c.user_id
         WHERE $2 OR s.member IS NOT TRUE OR o.attempts > 0
            OR o.target_version > COALESCE(s.version, 0) + 1
        UNION ALL
        SELECT u.user_id, false, u.email, u.phone, u.name, u.version + 1
          FROM (
                SELECT s.user_id, s.email, s.phone, s.name, s.version
                  FROM synced_members s
                 WHERE s.audience_id = $1 AND s.member
                UNION ALL
                SELECT o.user_id, COALESCE(s.email, o.email), COALESCE(s.phone, o.phone),
                       COALESCE(s.name, o.name), COALESCE(s.version, 0)
                  FROM outbox o
                  LEFT JOIN synced_members s ON s.audience_id = $1 AND s.user_id = o.user_id
                 WHERE o.audience_id = $1 AND s.member IS NOT TRUE
                   AND (o.attempts > 0 OR o.target_version > COALESCE(s.version, 0) + 1)
               ) u
         WHERE NOT EXISTS (SELECT 1 FROM pg_temp.audience_capture c WHERE c.user_id = u.user_id)
    )";

#[derive(Debug, Clone, Copy, Default)]
pub struct DiffCounts {
    pub added: i64,
    pub removed: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
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

/// An audience's first sync: nothing is confirmed and nothing owed, so every member is a new
/// version-1 `true` change and the diff is the capture itself. The query's rows stream
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
    full: bool,
) -> Result<DiffCounts, DiffError> {
    use sqlx::Connection;
    outbox::ensure_partition(conn, audience_id, run_id).await?;
    let mut tx = conn.begin().await?;
    let row = sqlx::query(AssertSqlSafe(format!(
        "WITH {DIFF},
         ins AS (
            INSERT INTO outbox (audience_id, user_id, member, email, phone, name,
                                target_version, run_id)
            SELECT $1, user_id, member, email, phone, name, target_version, $3
              FROM diff
            ON CONFLICT (audience_id, user_id) DO UPDATE SET
                member = EXCLUDED.member, email = EXCLUDED.email, phone = EXCLUDED.phone,
                name = EXCLUDED.name, run_id = EXCLUDED.run_id, next_attempt_at = now(),
                lease_owner = NULL, lease_until = NULL,
                -- The same value is the same change: same number (so the same messageId),
                -- attempts and detection time. A new value is a new change: its number
                -- moves past the replaced one's if that may have been sent, so no two
                -- changes that could reach Wigzo ever share a messageId.
                target_version = CASE WHEN outbox.member = EXCLUDED.member
                                           OR outbox.attempts = 0
                                      THEN outbox.target_version
                                      ELSE outbox.target_version + 1 END,
                attempts = CASE WHEN outbox.member = EXCLUDED.member
                                THEN outbox.attempts ELSE 0 END,
                throttles = CASE WHEN outbox.member = EXCLUDED.member
                                 THEN outbox.throttles ELSE 0 END,
                created_at = CASE WHEN outbox.member = EXCLUDED.member
                                  THEN outbox.created_at ELSE now() END,
                -- A change Wigzo rejected is held until its value or contact fields change,
                -- or a full resync (or `retry`) asks again.
                status = CASE WHEN outbox.status = 'rejected' AND NOT $2
                                   AND outbox.member = EXCLUDED.member
                                   AND (outbox.email, outbox.phone, outbox.name)
                                       IS NOT DISTINCT FROM
                                       (EXCLUDED.email, EXCLUDED.phone, EXCLUDED.name)
                              THEN 'rejected' ELSE 'pending' END
            RETURNING member)
         SELECT count(*) FILTER (WHERE member), count(*) FILTER (WHERE NOT member) FROM ins"
    )))
    .bind(audience_id)
    .bind(full)
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
/// row for each batch instead of walking the key from the cursor (15 ms instead of 2 ms per
/// 500 changes at 50k, growing with the backlog).
async fn refresh_statistics(
    conn: &mut PgConnection,
    audience_id: i64,
    written: u64,
) -> Result<(), sqlx::Error> {
    if written >= ANALYZE_AFTER {
        // The audience's partition only: ANALYZE of `outbox` would sample every audience's.
        crate::snapshot::analyze_roughly(conn, &outbox::partition(audience_id)).await?;
    }
    Ok(())
}

/// Counts the changes and returns a few of them, writing nothing (dry run).
pub async fn preview(
    conn: &mut PgConnection,
    audience_id: i64,
    full: bool,
    sample: i64,
) -> Result<(DiffCounts, Vec<Change>), sqlx::Error> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "WITH {DIFF} SELECT count(*) FILTER (WHERE member), count(*) FILTER (WHERE NOT member) FROM diff"
    )))
    .bind(audience_id)
    .bind(full)
    .fetch_one(&mut *conn)
    .await?;
    let mut changes = sqlx::query_as::<_, Change>(AssertSqlSafe(format!(
        "WITH {DIFF}
         SELECT user_id, member, email, phone, name, target_version, now() AS detected_at
           FROM diff ORDER BY member DESC, user_id LIMIT $3"
    )))
    .bind(audience_id)
    .bind(full)
    .bind(sample)
    .fetch_all(&mut *conn)
    .await?;
    for c in &mut changes {
        c.message_id = outbox::message_id(audience_id, &c.user_id, c.target_version, c.member);
    }
    Ok((
        DiffCounts {
            added: row.get(0),
            removed: row.get(1),
        },
        changes,
    ))
}
