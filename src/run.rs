//! Run bookkeeping: a run's kind, trigger and status as types, and the `runs` rows that record
//! them (start, counts, finish, abandoned runs, the audience's resync mark).

use serde::Serialize;
use sqlx::PgPool;

/// What a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum RunKind {
    /// An audience's first sync: every member.
    Initial,
    /// Only the changes since the last confirmed state.
    Incremental,
    /// Every member again, and `false` for confirmed members who left.
    FullResync,
}

/// What started a run (`runs.trigger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Trigger {
    /// The command line.
    Manual,
    /// The daemon's schedule.
    Schedule,
    /// `POST /api/audiences/{key}/...` on the daemon's ops server.
    Api,
}

/// How a run ended (or that it has not yet): `runs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum RunStatus {
    /// In progress (or its process died: the next lock holder marks it abandoned).
    Running,
    /// Every change confirmed.
    Succeeded,
    /// Everything confirmed but changes Wigzo rejected, which are held.
    Partial,
    /// Held by the removal guard: nothing written or sent until a person releases it.
    Held,
    /// Changes out of retries, or the run stopped on an error.
    Failed,
    /// Stopped by shutdown or a dead process; the next run resumes it.
    Abandoned,
}

macro_rules! text_enum {
    ($t:ty { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $t {
            /// The name stored in the database and printed.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

text_enum!(RunKind { Initial => "initial", Incremental => "incremental", FullResync => "full_resync" });
text_enum!(Trigger { Manual => "manual", Schedule => "schedule", Api => "api" });
text_enum!(RunStatus {
    Running => "running",
    Succeeded => "succeeded",
    Partial => "partial",
    Held => "held",
    Failed => "failed",
    Abandoned => "abandoned",
});

/// The latest run of an audience: its id and status (None: it has none).
pub async fn latest(pool: &PgPool, audience_id: i64) -> Result<Option<(i64, String)>, sqlx::Error> {
    sqlx::query_as("SELECT id, status FROM runs WHERE audience_id = $1 ORDER BY id DESC LIMIT 1")
        .bind(audience_id)
        .fetch_optional(pool)
        .await
}

/// Who is running the audience, as its latest `running` run says.
pub async fn running_owner(pool: &PgPool, audience_id: i64) -> Option<String> {
    sqlx::query_scalar(
        "SELECT owner FROM runs WHERE audience_id = $1 AND status = 'running'
          ORDER BY id DESC LIMIT 1",
    )
    .bind(audience_id)
    .fetch_optional(pool)
    .await
    .ok()
    .flatten()
}

/// Marks the audience's runs still `running` as abandoned: called by the lock holder, so their
/// processes are gone.
pub async fn mark_abandoned(pool: &PgPool, audience_id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE runs SET status = 'abandoned', finished_at = now(),
                error = COALESCE(error, 'the process running it stopped before it finished')
          WHERE audience_id = $1 AND status = 'running'",
    )
    .bind(audience_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether a full resync of the audience was started and has not finished.
pub async fn resync_pending(pool: &PgPool, audience_id: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT resync_pending FROM audiences WHERE id = $1")
        .bind(audience_id)
        .fetch_one(pool)
        .await
}

/// Whether the audience has never synced: no successful run and nothing confirmed.
pub async fn never_synced(pool: &PgPool, audience_id: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM runs WHERE audience_id = $1 AND status = 'succeeded')
            AND NOT EXISTS (SELECT 1 FROM synced_members WHERE audience_id = $1)",
    )
    .bind(audience_id)
    .fetch_one(pool)
    .await
}

/// Records a run as started and returns its id. A full resync also sets the audience's resync
/// mark, in the same statement: from here on, until a full resync ends, every run of the
/// audience is one.
pub async fn start(
    pool: &PgPool,
    audience_id: i64,
    kind: RunKind,
    owner: &str,
    trigger: Trigger,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(crate::sql::RUN_START)
        .bind(audience_id)
        .bind(kind)
        .bind(owner)
        .bind(trigger)
        .fetch_one(pool)
        .await
}

/// A run's counts as its diff left them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// Members the query returned (distinct, usable ids).
    pub members: i64,
    /// `true` changes.
    pub added: i64,
    /// `false` changes.
    pub removed: i64,
    /// Rows skipped for an unusable user id.
    pub skipped_rows: i64,
}

/// Records the diff's counts on a running run.
pub async fn record_counts(pool: &PgPool, run_id: i64, c: Counts) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE runs SET members = $2, added = $3, removed = $4, skipped_rows = $5 WHERE id = $1",
    )
    .bind(run_id)
    .bind(c.members)
    .bind(c.added)
    .bind(c.removed)
    .bind(c.skipped_rows)
    .execute(pool)
    .await?;
    Ok(())
}

/// How a run ended, as recorded.
#[derive(Debug, Clone)]
pub struct Finish<'a> {
    /// Final status.
    pub status: RunStatus,
    /// The diff's counts.
    pub counts: Counts,
    /// Changes Wigzo confirmed.
    pub sent: u64,
    /// Changes rejected or out of retries.
    pub failed: u64,
    /// Extra HTTP attempts.
    pub retried: u64,
    /// Why it did not succeed.
    pub error: Option<&'a str>,
}

/// Records a run's end. A full resync that delivered everything it could (succeeded or
/// partial) clears the audience's resync mark in the same statement.
pub async fn finish(pool: &PgPool, run_id: i64, f: &Finish<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(crate::sql::RUN_FINISH)
        .bind(run_id)
        .bind(f.status)
        .bind(f.counts.members)
        .bind(f.counts.added)
        .bind(f.counts.removed)
        .bind(f.sent as i64)
        .bind(f.failed as i64)
        .bind(f.retried as i64)
        .bind(f.counts.skipped_rows)
        .bind(f.error)
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_stored_and_printed_ones() {
        assert_eq!(RunKind::FullResync.as_str(), "full_resync");
        assert_eq!(RunStatus::Partial.to_string(), "partial");
        assert_eq!(Trigger::Api, "api");
        assert_eq!(serde_json::to_string(&RunStatus::Held).unwrap(), "\"held\"");
    }
}
