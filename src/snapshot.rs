//! Snapshot capture: runs an audience's query in a read-only transaction with a statement
//! timeout and writes its result, set-based and in one pass, into a temporary table on the
//! run's connection.

use std::time::Duration;

use futures::TryStreamExt;
use secrecy::SecretString;
// Audience queries come from the operator's config file, like any other SQL they run.
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

use crate::audience::{AudienceError, QueryShape, db_message, inspect_query};

/// The capture table (temporary: private to the run's connection, gone when it closes).
pub const CAPTURE: &str = "pg_temp.audience_capture";
/// Longest user id kept; longer ones are skipped and counted (they cannot be indexed).
pub const MAX_USER_ID_LEN: i32 = 512;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Audience(#[from] AudienceError),
    #[error("audience {key:?}: query failed: {message}")]
    Query { key: String, message: String },
    #[error(
        "audience {key:?}: query was cancelled after the statement timeout of {secs} s; raise [database] statement_timeout_secs or speed the query up"
    )]
    Timeout { key: String, secs: u64 },
    #[error("database error while capturing audience {key:?}: {message}")]
    Db { key: String, message: String },
}

/// What a capture found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Captured {
    pub members: i64,
    pub skipped_rows: i64,
}

/// Captures the members of an audience into [`CAPTURE`] on `conn`. With `source`, the query
/// runs on that database and its rows are streamed over with COPY.
pub async fn capture(
    conn: &mut PgConnection,
    key: &str,
    query: &str,
    source: Option<&SecretString>,
    timeout: Duration,
) -> Result<Captured, SnapshotError> {
    let db = |e: sqlx::Error| SnapshotError::Db {
        key: key.to_string(),
        message: db_message(&e),
    };
    // One pass: the query's rows, ids cleaned, land sorted by bytes in the capture table (in
    // the query's order when they come from a separate source database); the unique index
    // built afterwards both checks for duplicate ids and, on input already in order, costs
    // little. Sorted rows also make the first-sync outbox insert walk its key in order.
    // Sorting by bytes ("C") is several times faster than by the database's linguistic
    // collation, and equality is the same either way.
    conn.execute(
        "DROP TABLE IF EXISTS pg_temp.audience_capture;
         CREATE TEMP TABLE audience_capture (user_id text, email text, phone text, name text)",
    )
    .await
    .map_err(db)?;

    let query_err = |e: sqlx::Error| {
        if let sqlx::Error::Database(d) = &e
            && d.code().as_deref() == Some("57014")
        {
            return SnapshotError::Timeout {
                key: key.to_string(),
                secs: timeout.as_secs(),
            };
        }
        SnapshotError::Query {
            key: key.to_string(),
            message: db_message(&e),
        }
    };
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128);
    // Empty or blank ids, and ids too long to index, become NULL: skipped and counted. A
    // separate source database is not asked to sort: that work stays on ours.
    let cleaned = |select: &str, sorted: bool| {
        let order = if sorted {
            "ORDER BY user_id COLLATE \"C\""
        } else {
            ""
        };
        format!(
            "SELECT user_id, email, phone, name
               FROM (SELECT CASE WHEN btrim(user_id) <> '' AND length(user_id) <= {MAX_USER_ID_LEN}
                                 THEN user_id END AS user_id, email, phone, name
                       FROM ({select}) AS s) AS r
              {order}"
        )
    };

    let rows = match source {
        None => {
            let shape = inspect_query(conn, key, query).await?;
            let select = cleaned(&source_select(query, shape), true);
            let mut tx = conn.begin().await.map_err(db)?;
            tx.execute("SET TRANSACTION READ ONLY").await.map_err(db)?;
            tx.execute(AssertSqlSafe(format!(
                "SET LOCAL statement_timeout = {timeout_ms}"
            )))
            .await
            .map_err(db)?;
            let rows = tx
                .execute(AssertSqlSafe(format!(
                    "INSERT INTO pg_temp.audience_capture (user_id, email, phone, name) {select}"
                )))
                .await
                .map_err(query_err)?
                .rows_affected();
            tx.commit().await.map_err(db)?;
            rows
        }
        Some(url) => {
            let opts = crate::db::options(url).map_err(|e| AudienceError::Source {
                key: key.to_string(),
                message: e.to_string(),
            })?;
            let mut src = crate::db::dedicated(&opts)
                .await
                .map_err(|e| AudienceError::Source {
                    key: key.to_string(),
                    message: e.to_string(),
                })?;
            let shape = inspect_query(&mut src, key, query).await?;
            let select = cleaned(&source_select(query, shape), false);
            let mut tx = src.begin().await.map_err(query_err)?;
            tx.execute("SET TRANSACTION READ ONLY")
                .await
                .map_err(query_err)?;
            tx.execute(AssertSqlSafe(format!(
                "SET LOCAL statement_timeout = {timeout_ms}"
            )))
            .await
            .map_err(query_err)?;
            let mut sink = conn
                .copy_in_raw("COPY pg_temp.audience_capture FROM STDIN (FORMAT binary)")
                .await
                .map_err(db)?;
            {
                let mut rows = tx
                    .copy_out_raw(&format!("COPY ({select}) TO STDOUT (FORMAT binary)"))
                    .await
                    .map_err(query_err)?;
                while let Some(chunk) = rows.try_next().await.map_err(query_err)? {
                    sink.send(chunk).await.map_err(db)?;
                }
            }
            let rows = sink.finish().await.map_err(db)?;
            tx.commit().await.map_err(query_err)?;
            rows
        }
    };

    // NULL ids (the skipped rows) do not collide in a unique index; duplicate ids do, and then
    // collapse to one member (the first stored of the rows sharing the id). The failed build
    // shows in the server's log as an ERROR; nothing else comes of it.
    let mut duplicates = 0;
    if let Err(e) = create_index(conn).await {
        if !is_unique_violation(&e) {
            return Err(db(e));
        }
        duplicates = conn
            .execute(
                "DELETE FROM pg_temp.audience_capture a
                  USING pg_temp.audience_capture b
                  WHERE a.user_id = b.user_id AND a.ctid > b.ctid",
            )
            .await
            .map_err(db)?
            .rows_affected();
        create_index(conn).await.map_err(db)?;
    }
    let skipped = conn
        .execute("DELETE FROM pg_temp.audience_capture WHERE user_id IS NULL")
        .await
        .map_err(db)?
        .rows_affected();
    // Temporary tables are never analysed by autovacuum; the diff's plan needs statistics.
    conn.execute("ANALYZE pg_temp.audience_capture")
        .await
        .map_err(db)?;
    Ok(Captured {
        members: (rows - duplicates - skipped) as i64,
        skipped_rows: skipped as i64,
    })
}

async fn create_index(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    conn.execute(
        "CREATE UNIQUE INDEX audience_capture_user_id ON pg_temp.audience_capture (user_id)",
    )
    .await
    .map(drop)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

/// The query reduced to the four columns we keep, all as text.
fn source_select(query: &str, shape: QueryShape) -> String {
    let col = |present: bool, name: &str| {
        if present {
            format!("q.{name}::text AS {name}")
        } else {
            format!("NULL::text AS {name}")
        }
    };
    format!(
        "SELECT q.user_id::text AS user_id, {}, {}, {} FROM (\n{query}\n) AS q",
        col(shape.email, "email"),
        col(shape.phone, "phone"),
        col(shape.name, "name"),
    )
}
