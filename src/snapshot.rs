//! Snapshot capture: runs an audience's query in a read-only transaction with a statement
//! timeout, on a connection apart from the run's, and streams its rows (ids cleaned) with COPY
//! into a table on the run's connection: the capture table, or a first sync's outbox partition.

use std::time::Duration;

use futures::TryStreamExt;
use secrecy::SecretString;
use sqlx::pool::PoolConnection;
// Audience queries come from the operator's config file, like any other SQL they run.
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool, Postgres};

use crate::audience::{AudienceError, Kind, QueryShape, db_message, inspect_query};
use crate::sql::{self, Table, template};

/// The capture table (temporary: private to the run's connection, gone when it closes).
/// Longest user id kept; longer ones are skipped and counted (they cannot be indexed).
pub const MAX_USER_ID_LEN: i32 = 512;
/// Rows are passed on to the writer in chunks of about this many bytes.
const CHUNK: usize = 256 * 1024;

/// Why an audience's query could not be captured.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The query is not usable.
    #[error(transparent)]
    Audience(#[from] AudienceError),
    #[error("audience {key:?}: query failed: {message}")]
    /// The query failed (its error, from the database).
    Query {
        /// The audience.
        key: String,
        /// The database's message.
        message: String,
    },
    #[error(
        "audience {key:?}: query was cancelled after the statement timeout of {secs} s; raise [database] statement_timeout_secs or speed the query up"
    )]
    /// The query ran past the statement timeout.
    Timeout {
        /// The audience.
        key: String,
        /// The timeout.
        secs: u64,
    },
    #[error("database error while capturing audience {key:?}: {message}")]
    /// Storing the rows failed.
    Db {
        /// The audience.
        key: String,
        /// The database's message.
        message: String,
    },
}

/// What a capture found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Captured {
    /// Distinct usable user ids: the audience's members.
    pub members: i64,
    /// Rows left out for a NULL, empty or over-long user id, or a trait value JSON cannot
    /// carry (NaN, infinities).
    pub skipped_rows: i64,
}

/// What [`Reader::copy_into`] passed on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Streamed {
    /// Rows written to the target.
    pub rows: u64,
    /// Rows left out: NULL, empty or blank ids, or ids longer than [`MAX_USER_ID_LEN`].
    pub skipped: u64,
}

/// An audience query opened for reading: a connection apart from the run's (one of the
/// worker's pool, or a new one to the audience's `source_url`), inside a read-only
/// transaction with the statement timeout, so a query that writes is refused by PostgreSQL
/// and one that runs too long is cancelled.
pub struct Reader {
    conn: ReaderConn,
    key: String,
    /// The query reduced to (user_id, email, phone, name, value) as text, unusable ids (and
    /// ids of rows with an unusable value) as NULL.
    select: String,
    timeout: Duration,
    /// Set once the read-only transaction has ended and the connection can be reused.
    finished: bool,
}

enum ReaderConn {
    /// The worker's own database, no connection taken yet: a capture runs the query on the
    /// run's own connection ([`capture`]); a first sync takes one from the pool when it
    /// streams ([`Reader::copy_into`]).
    Home(PgPool),
    /// The worker's own database: a pooled connection (a new one costs a TLS handshake, slow
    /// before TCP_NODELAY can be set; see `db::set_nodelay` and BENCHMARKS.md), inside the
    /// read-only transaction.
    Pooled(PoolConnection<Postgres>),
    /// A `source_url` database, inside the read-only transaction.
    Source(PgConnection),
}

impl Drop for Reader {
    /// A reader dropped before its query finished (an error, or never used) may leave its
    /// connection inside the read-only transaction or a COPY: it never goes back to the pool.
    fn drop(&mut self) {
        if let ReaderConn::Pooled(c) = &mut self.conn
            && !self.finished
        {
            c.close_on_drop();
        }
    }
}

impl Reader {
    /// Takes a connection (to `source`, else from `home`), checks the query's columns, and
    /// opens the read-only transaction. The columns of a query on the worker's database are
    /// checked on `run_conn`, the run's own new connection: sqlx caches what it prepares, and
    /// a pooled connection could answer from before the query's tables changed.
    pub async fn open(
        run_conn: &mut PgConnection,
        home: &PgPool,
        key: &str,
        kind: Kind,
        query: &str,
        source: Option<&SecretString>,
        timeout: Duration,
    ) -> Result<Reader, SnapshotError> {
        let source_err = |message: String| AudienceError::Source {
            key: key.to_string(),
            message,
        };
        let (conn, shape) = match source {
            Some(url) => {
                let opts = crate::db::options(url).map_err(|e| source_err(e.to_string()))?;
                let mut conn = crate::db::dedicated(&opts)
                    .await
                    .map_err(|e| source_err(e.to_string()))?;
                let shape = inspect_query(&mut conn, key, kind, query).await?;
                (ReaderConn::Source(conn), shape)
            }
            None => {
                let shape = inspect_query(run_conn, key, kind, query).await?;
                (ReaderConn::Home(home.clone()), shape)
            }
        };
        let mut reader = Reader {
            conn,
            key: key.to_string(),
            select: cleaned_select(query, shape),
            timeout,
            finished: false,
        };
        if let ReaderConn::Source(c) = &mut reader.conn {
            let begin = reader_begin(timeout);
            if let Err(e) = c.execute(begin).await {
                return Err(reader.query_err(e));
            }
        }
        Ok(reader)
    }

    /// The reader's connection inside its read-only transaction, taken from the pool first
    /// for the worker's own database.
    async fn started(&mut self) -> Result<&mut PgConnection, SnapshotError> {
        if let ReaderConn::Home(pool) = &self.conn {
            let mut c = pool.acquire().await.map_err(|e| SnapshotError::Db {
                key: self.key.clone(),
                message: db_message(&e),
            })?;
            let begun = c.execute(reader_begin(self.timeout)).await;
            // Held from here on, so a failed BEGIN still closes rather than returns it.
            self.conn = ReaderConn::Pooled(c);
            begun.map_err(|e| self.query_err(e))?;
        }
        Ok(match &mut self.conn {
            ReaderConn::Pooled(c) => c,
            ReaderConn::Source(c) => c,
            ReaderConn::Home(_) => unreachable!("taken above"),
        })
    }

    /// Runs the query on `conn` itself (the worker's own database), in a read-only
    /// transaction with the statement timeout, inserting its rows into the capture table with
    /// no trip through the worker; rows with an unusable id are then deleted and counted.
    /// PostgreSQL lets a read-only transaction write temporary tables only.
    async fn insert_here(mut self, conn: &mut PgConnection) -> Result<Streamed, SnapshotError> {
        let key = self.key.clone();
        let db = |e: sqlx::Error| SnapshotError::Db {
            key: key.clone(),
            message: db_message(&e),
        };
        conn.execute(reader_begin(self.timeout))
            .await
            .map_err(|e| self.query_err(e))?;
        let insert = format!(
            "INSERT INTO pg_temp.audience_capture (user_id, email, phone, name, value) {}",
            self.select
        );
        let inserted = match conn.execute(AssertSqlSafe(insert)).await {
            Ok(done) => done.rows_affected(),
            Err(e) => {
                let _ = conn.execute("ROLLBACK").await;
                return Err(self.query_err(e));
            }
        };
        conn.execute("COMMIT").await.map_err(db)?;
        let skipped = conn
            .execute(sql::CAPTURE_SKIPPED)
            .await
            .map_err(db)?
            .rows_affected();
        self.finished = true;
        Ok(Streamed {
            rows: inserted - skipped,
            skipped,
        })
    }

    fn is_home(&self) -> bool {
        matches!(self.conn, ReaderConn::Home(_))
    }

    fn query_err(&self, e: sqlx::Error) -> SnapshotError {
        if let sqlx::Error::Database(d) = &e
            && d.code().as_deref() == Some("57014")
        {
            return SnapshotError::Timeout {
                key: self.key.clone(),
                secs: self.timeout.as_secs(),
            };
        }
        SnapshotError::Query {
            key: self.key.clone(),
            message: db_message(&e),
        }
    }

    /// Streams the query's rows into `copy_in`, a text-format
    /// `COPY <table> (user_id, email, phone, name, value) FROM STDIN` on `writer`, leaving out (and
    /// counting) the rows whose id is unusable. The query runs on the reader's backend while
    /// the writer's stores the rows: on two cores the two overlap. If the query fails, the
    /// COPY is aborted, so the target gets no row of a failed query.
    pub async fn copy_into(
        mut self,
        writer: &mut PgConnection,
        copy_in: &str,
    ) -> Result<Streamed, SnapshotError> {
        let key = self.key.clone();
        let db = |e: sqlx::Error| SnapshotError::Db {
            key: key.clone(),
            message: db_message(&e),
        };
        let statement = format!("COPY ({}) TO STDOUT", self.select);
        self.started().await?;
        let mut sink = writer.copy_in_raw(copy_in).await.map_err(db)?;
        let mut lines = Lines::default();
        let streamed: Result<(), Failed> = async {
            let reader = self.started().await.map_err(Failed::Started)?;
            let mut rows = reader
                .copy_out_raw(&statement)
                .await
                .map_err(Failed::Read)?;
            while let Some(chunk) = rows.try_next().await.map_err(Failed::Read)? {
                lines.push(&chunk);
                if lines.out.len() >= CHUNK {
                    let full = std::mem::replace(&mut lines.out, Vec::with_capacity(CHUNK * 2));
                    sink.send(full).await.map_err(Failed::Write)?;
                }
            }
            Ok(())
        }
        .await;
        match streamed {
            Ok(()) => {}
            Err(Failed::Read(e)) => {
                let _ = sink.abort("the audience query failed").await;
                return Err(self.query_err(e));
            }
            Err(Failed::Write(e)) => {
                let _ = sink.abort("the rows could not be stored").await;
                return Err(db(e));
            }
            Err(Failed::Started(e)) => {
                let _ = sink.abort("the audience query could not start").await;
                return Err(e);
            }
        }
        lines.finish();
        if !lines.out.is_empty() {
            sink.send(std::mem::take(&mut lines.out))
                .await
                .map_err(db)?;
        }
        let rows = sink.finish().await.map_err(db)?;
        // Ends the read-only transaction; a pooled connection then goes back to the pool.
        self.started().await?.execute("COMMIT").await.map_err(db)?;
        self.finished = true;
        Ok(Streamed {
            rows,
            skipped: lines.skipped,
        })
    }
}

/// Which side of a copy failed.
enum Failed {
    Read(sqlx::Error),
    Write(sqlx::Error),
    Started(SnapshotError),
}

/// The read-only transaction with the statement timeout.
fn reader_begin(timeout: Duration) -> AssertSqlSafe<String> {
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128);
    sql::render(
        template::READER_BEGIN,
        None,
        &[("timeout_ms", timeout_ms as i64)],
    )
}

/// Text-format COPY rows on their way from reader to writer: whole lines are kept in `out`,
/// except those whose first field (the user id) is NULL, which are counted. A line split across
/// two chunks is held back until its end arrives.
#[derive(Default)]
struct Lines {
    out: Vec<u8>,
    partial: Vec<u8>,
    skipped: u64,
}

impl Lines {
    fn push(&mut self, mut data: &[u8]) {
        if !self.partial.is_empty() {
            let Some(end) = memchr::memchr(b'\n', data) else {
                self.partial.extend_from_slice(data);
                return;
            };
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&data[..=end]);
            self.line(&line);
            data = &data[end + 1..];
        }
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', data) {
            self.line(&data[start..=end]);
            start = end + 1;
        }
        self.partial.extend_from_slice(&data[start..]);
    }

    /// A last line without its newline (PostgreSQL always sends one; kept whole if not).
    fn finish(&mut self) {
        if !self.partial.is_empty() {
            let mut line = std::mem::take(&mut self.partial);
            line.push(b'\n');
            self.line(&line);
        }
    }

    fn line(&mut self, line: &[u8]) {
        // COPY writes NULL as \N; a real backslash is doubled, so "\N" as text never matches.
        if line.starts_with(b"\\N\t") || line == b"\\N\n" {
            self.skipped += 1;
        } else {
            self.out.extend_from_slice(line);
        }
    }
}

/// Captures the members of an audience into the capture table (`pg_temp.audience_capture`) on `conn`, with a unique index on the
/// user id (duplicate ids collapse to the first row stored) and fresh statistics.
pub async fn capture(conn: &mut PgConnection, reader: Reader) -> Result<Captured, SnapshotError> {
    let key = reader.key.clone();
    let db = |e: sqlx::Error| SnapshotError::Db {
        key: key.clone(),
        message: db_message(&e),
    };
    conn.execute(sql::CAPTURE_CREATE).await.map_err(db)?;
    let streamed = if reader.is_home() {
        reader.insert_here(conn).await?
    } else {
        reader.copy_into(conn, sql::CAPTURE_COPY).await?
    };
    let duplicates = unique_user_ids(conn, &Table::capture(), sql::CAPTURE_INDEX)
        .await
        .map_err(db)?;
    // Temporary tables are never analysed by autovacuum; the diff's plan needs statistics.
    analyze_roughly(conn, &Table::capture()).await.map_err(db)?;
    Ok(Captured {
        members: (streamed.rows - duplicates) as i64,
        skipped_rows: streamed.skipped as i64,
    })
}

/// Builds `create_index`, a unique index on `table`'s user ids (with, at most, the audience id
/// before them). If ids repeat, the rows sharing one collapse to the first stored (lowest
/// ctid: the query's own order, as rows are appended) and the index is built again. Returns
/// how many rows were removed. The failed build shows in the server's log as an ERROR;
/// nothing else comes of it.
/// `create_index` is one of `sql`'s statements (a constant, or a template it filled in).
pub(crate) async fn unique_user_ids(
    conn: &mut PgConnection,
    table: &Table,
    create_index: &str,
) -> Result<u64, sqlx::Error> {
    // A savepoint inside the caller's transaction, a transaction of its own otherwise.
    let mut attempt = conn.begin().await?;
    match attempt.execute(AssertSqlSafe(create_index)).await {
        Ok(_) => {
            attempt.commit().await?;
            return Ok(0);
        }
        Err(e) if is_unique_violation(&e) => attempt.rollback().await?,
        Err(e) => return Err(e),
    }
    let removed = conn
        .execute(sql::render(template::DEDUPE, Some(table), &[]))
        .await?
        .rows_affected();
    conn.execute(AssertSqlSafe(create_index)).await?;
    Ok(removed)
}

/// Gathers planner statistics for a table just filled, from a tenth of the default sample
/// (much faster on large tables; BENCHMARKS.md): the plans that read it (the diff's
/// joins, claims and confirmations) need its size and a rough picture of its columns, which
/// the unique index on the user id already sharpens.
pub(crate) async fn analyze_roughly(
    conn: &mut PgConnection,
    table: &Table,
) -> Result<(), sqlx::Error> {
    conn.execute(sql::render(template::ANALYZE_ROUGHLY, Some(table), &[]))
        .await
        .map(drop)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

/// The query reduced to the five columns we keep, all as text; empty or blank ids, ids too
/// long to index, and rows whose trait value JSON cannot carry, get a NULL id (left out and
/// counted by [`Reader::copy_into`]). A trait's value becomes its canonical JSON text, and
/// its users without a value (NULL) are not rows of the capture: they have no value to send.
fn cleaned_select(query: &str, shape: QueryShape) -> String {
    let col = |present: bool, name: &str| {
        if present {
            format!("q.{name}::text AS {name}")
        } else {
            format!("NULL::text AS {name}")
        }
    };
    let (value, usable, filter) = match shape.value {
        Some(t) => (
            t.json_sql("q.value"),
            t.usable_sql("q.value"),
            "WHERE q.value IS NOT NULL",
        ),
        None => ("NULL::text".to_string(), "true".to_string(), ""),
    };
    format!(
        "SELECT CASE WHEN btrim(user_id) <> '' AND length(user_id) <= {MAX_USER_ID_LEN} AND usable
                     THEN user_id END AS user_id, email, phone, name, value
           FROM (SELECT q.user_id::text AS user_id, {}, {}, {},
                        {value} AS value, {usable} AS usable
                   FROM (\n{query}\n) AS q {filter}) AS s",
        col(shape.email, "email"),
        col(shape.phone, "phone"),
        col(shape.name, "name"),
    )
}

#[cfg(test)]
mod tests {
    use super::Lines;

    fn run(chunks: &[&[u8]]) -> (String, u64) {
        let mut l = Lines::default();
        for c in chunks {
            l.push(c);
        }
        l.finish();
        (String::from_utf8(l.out).unwrap(), l.skipped)
    }

    #[test]
    fn rows_with_a_null_id_are_left_out_and_counted() {
        let (out, skipped) = run(&[
            b"1\ta@b\t\\N\t\\N\n",
            b"\\N\tx@y\t\\N\t\\N\n",
            b"2\t\\N\t\\N\t\\N\n",
        ]);
        assert_eq!(out, "1\ta@b\t\\N\t\\N\n2\t\\N\t\\N\t\\N\n");
        assert_eq!(skipped, 1);
    }

    #[test]
    fn an_id_spelled_backslash_n_is_kept() {
        // The text "\N" is sent as "\\N" (backslash doubled): a value, not NULL.
        let (out, skipped) = run(&[b"\\\\N\t\\N\t\\N\t\\N\n"]);
        assert_eq!(out, "\\\\N\t\\N\t\\N\t\\N\n");
        assert_eq!(skipped, 0);
    }

    #[test]
    fn lines_split_across_chunks_are_joined() {
        let (out, skipped) = run(&[
            b"12",
            b"3\ta\tb\tc\n4\t",
            b"d\te\tf\n\\",
            b"N\t\\N\t\\N\t\\N\n5\tg\th\ti",
        ]);
        assert_eq!(out, "123\ta\tb\tc\n4\td\te\tf\n5\tg\th\ti\n");
        assert_eq!(skipped, 1);
    }
}
