//! The audience lock: a PostgreSQL advisory lock held on a connection of the run's own, so
//! one run per audience happens at a time across processes, and a dead process's lock ends
//! with its session. The same connection carries the run's capture table.

use std::time::Duration;

use sqlx::PgConnection;
use sqlx::postgres::PgConnectOptions;

use crate::db::DbError;

/// First key of the two-key advisory lock that makes runs of one audience exclusive.
const LOCK_CLASS: i32 = 0x4153_4e43;
/// How long a check of the lock's session may take: one that does not answer (a half-open
/// connection, a hung server) counts as lost.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A held audience lock. Dropping it closes its connection, which releases the lock: keep it
/// until the run's end is recorded.
pub struct AudienceLock {
    conn: PgConnection,
}

/// Taking the lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// No connection for the lock.
    #[error(transparent)]
    Connect(#[from] DbError),
    /// The lock query failed.
    #[error("cannot take the audience lock: {}", crate::audience::db_message(.0))]
    Db(#[from] sqlx::Error),
}

impl AudienceLock {
    /// Takes the audience's lock on a new connection; `None` if another session holds it.
    pub async fn try_acquire(
        connect: &PgConnectOptions,
        audience_id: i64,
    ) -> Result<Option<Self>, LockError> {
        let mut conn = crate::db::dedicated(connect).await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2::int)")
            .bind(LOCK_CLASS)
            .bind(audience_id as i32)
            .fetch_one(&mut conn)
            .await?;
        Ok(locked.then_some(Self { conn }))
    }

    /// The lock's connection (the run's capture table lives on it).
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Whether the lock's session still answers within [`CHECK_TIMEOUT`]. If it does not, the
    /// lock may be gone (the session ended) or unknowable (the connection hangs): either way
    /// the run must stop claiming.
    pub async fn still_held(&mut self) -> bool {
        let alive = tokio::time::timeout(
            CHECK_TIMEOUT,
            sqlx::query("SELECT 1").execute(&mut self.conn),
        )
        .await;
        matches!(alive, Ok(Ok(_)))
    }
}
