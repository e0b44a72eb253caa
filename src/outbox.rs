//! The outbox: changes still owed to Wigzo, one live row per (audience, user) in a partition
//! per audience, claimed under a lease, and confirmed together with the user's synced snapshot
//! in one statement.

use chrono::{DateTime, Utc};
use md5::{Digest, Md5};
use sqlx::{Connection, Executor, FromRow, PgConnection, PgPool};
use uuid::Uuid;

use crate::sql::{self, Table, template};

/// The messageId of a change: md5 of `audience:user:change number:value` read as a UUID.
/// The change number (`target_version`) is the user's per-audience change sequence: one more
/// than the last confirmed change for a change written over nothing owed, and one more than
/// the change it replaces when that one may have been sent (see `diff::write_outbox`). So
/// every attempt of one change carries the same id, and no two changes share one, confirmed
/// or not. Equal to SQL's `md5(audience || ':' || user_id || ':' || version || ':' || member)::uuid`,
/// the formula older versions stored. A trait's change puts its value (the JSON text sent,
/// `null` for a removal) in place of the flag, so two values never share an id even under one
/// change number.
pub fn message_id(audience_id: i64, user_id: &str, version: i64, value: Sent<'_>) -> Uuid {
    let mut h = Md5::new();
    match value {
        Sent::Flag(member) => h.update(format!("{audience_id}:{user_id}:{version}:{member}")),
        Sent::Value(v) => h.update(format!("{audience_id}:{user_id}:{version}:{v}")),
    }
    Uuid::from_bytes(h.finalize().into())
}

/// What a change sets the key to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent<'a> {
    /// An audience's membership flag.
    Flag(bool),
    /// A trait's value as JSON text (`null` for a user without a value any more).
    Value(&'a str),
}

/// The name of the table that holds an audience's changes: its partition of `outbox`.
pub fn partition(audience_id: i64) -> String {
    Table::partition(audience_id).name().to_string()
}

/// Whether the audience has its partition of `outbox` yet (it gets one from its first run
/// that writes changes).
pub async fn has_partition(conn: &mut PgConnection, audience_id: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_inherits
                         WHERE inhparent = 'outbox'::regclass AND inhrelid = to_regclass($1))",
    )
    .bind(partition(audience_id))
    .fetch_one(conn)
    .await
}

/// Gives the audience its (empty) partition if it has none, in a transaction of its own.
pub async fn ensure_partition(
    conn: &mut PgConnection,
    audience_id: i64,
    run_id: i64,
) -> Result<(), sqlx::Error> {
    if has_partition(conn, audience_id).await? {
        return Ok(());
    }
    let mut tx = conn.begin().await?;
    NewPartition::create(&mut tx, audience_id, run_id)
        .await?
        .attach(&mut tx)
        .await?;
    tx.commit().await
}

/// An audience's partition being built inside the caller's transaction: a plain table at
/// first, without indexes, so rows go in at the speed of the heap; its key is built once, by
/// sorting, when it is attached. `ATTACH PARTITION` takes a SHARE UPDATE EXCLUSIVE lock on
/// `outbox`, which claims, confirmations and reads of other audiences do not wait for
/// (`CREATE TABLE ... PARTITION OF` would take an ACCESS EXCLUSIVE one). Nothing of it is seen
/// by others before the transaction commits; if it rolls back, nothing is left.
pub struct NewPartition {
    audience_id: i64,
    table: Table,
}

impl NewPartition {
    /// Creates the table. Rows copied in with only (user_id, email, phone, name) become
    /// version-1 `true` changes of `run_id`: an audience's first sync, where every member
    /// enters and nothing was confirmed before.
    pub async fn create(
        conn: &mut PgConnection,
        audience_id: i64,
        run_id: i64,
    ) -> Result<Self, sqlx::Error> {
        let table = Table::partition(audience_id);
        conn.execute(sql::render(
            template::PARTITION_CREATE,
            Some(&table),
            &[("audience_id", audience_id), ("run_id", run_id)],
        ))
        .await?;
        Ok(Self { audience_id, table })
    }

    /// The COPY statement that fills the table: text format, one member per line.
    pub fn copy_in(&self) -> String {
        sql::render(template::PARTITION_COPY, Some(&self.table), &[]).0
    }

    /// Builds the key (user ids that repeat collapse to the first row stored) and the other
    /// index `outbox` has, gathers statistics, and attaches the table. Returns how many
    /// duplicate rows were removed.
    pub async fn attach(self, conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
        let NewPartition { audience_id, table } = self;
        let duplicates = crate::snapshot::unique_user_ids(
            conn,
            &table,
            &sql::render(template::PARTITION_INDEX, Some(&table), &[]).0,
        )
        .await?;
        conn.execute(sql::render(template::PARTITION_KEYS, Some(&table), &[]))
            .await?;
        // Autovacuum refines the partition's statistics as its changes are confirmed.
        crate::snapshot::analyze_roughly(conn, &table).await?;
        conn.execute(sql::render(
            template::PARTITION_ATTACH,
            Some(&table),
            &[("audience_id", audience_id)],
        ))
        .await?;
        Ok(duplicates)
    }
}

/// One change to deliver.
#[derive(Debug, Clone, FromRow)]
pub struct Change {
    /// The user's id, as the query returned it (text).
    pub user_id: String,
    /// The value sent: `true` entered, `false` left (a trait: has a value, or is sent null).
    pub member: bool,
    /// A trait's value as JSON text (`null` for a removal); `None` for an audience.
    pub value: Option<String>,
    /// Contact fields sent with it, when known.
    pub email: Option<String>,
    /// Phone, when known.
    pub phone: Option<String>,
    /// Name, when known.
    pub name: Option<String>,
    /// The version this change gives the user's confirmed row.
    pub target_version: i64,
    /// Derived from the other fields ([`message_id`]); filled in by [`claim`].
    #[sqlx(skip)]
    pub message_id: Uuid,
    /// When the diff first found this change; sent as the call's timestamp, so a retried
    /// call is byte-for-byte the same.
    pub detected_at: DateTime<Utc>,
}

impl Change {
    /// What this change sets the key to.
    pub fn sent(&self) -> Sent<'_> {
        match &self.value {
            Some(v) => Sent::Value(v),
            None => Sent::Flag(self.member),
        }
    }

    /// Its messageId ([`message_id`]).
    pub fn derive_message_id(&self, audience_id: i64) -> Uuid {
        message_id(audience_id, &self.user_id, self.target_version, self.sent())
    }
}

/// A batch of claimed changes and the claim cursor to continue from.
#[derive(Debug, Default)]
pub struct Claimed {
    /// The claimed changes, leased to the claimer.
    pub changes: Vec<Change>,
    /// The greatest user id claimed, in the database's own ordering (`None` if none was).
    pub last: Option<String>,
}

#[derive(FromRow)]
struct ClaimedRow {
    #[sqlx(flatten)]
    change: Change,
    last: String,
}

/// Claims up to `limit` pending changes of one audience for `owner`, in user id order after
/// `after` (the previous batch's [`Claimed::last`], `""` to start: each claim seeks straight
/// past the rows already claimed or confirmed in this delivery, so a delivery walks the
/// outbox's (audience_id, user_id) key once instead of once per batch). Each claim counts as an attempt:
/// once claimed, the change may have reached Wigzo.
pub async fn claim(
    pool: &PgPool,
    audience_id: i64,
    owner: &str,
    after: &str,
    limit: i64,
    lease: std::time::Duration,
) -> Result<Claimed, sqlx::Error> {
    let rows = sqlx::query_as::<_, ClaimedRow>(sql::CLAIM)
        .bind(audience_id)
        .bind(owner)
        .bind(limit)
        .bind(lease.as_secs_f64())
        .bind(after)
        .fetch_all(pool)
        .await?;
    let last = rows.first().map(|r| r.last.clone());
    let changes = rows
        .into_iter()
        .map(|r| {
            let mut c = r.change;
            c.message_id = c.derive_message_id(audience_id);
            c
        })
        .collect();
    Ok(Claimed { changes, last })
}

/// A confirmed change, the extra HTTP attempts it took, and what identifies it.
#[derive(Debug, Clone)]
pub struct Confirmed {
    /// The user.
    pub user_id: String,
    /// The change number that was sent.
    pub target_version: i64,
    /// The value that was sent.
    pub member: bool,
    /// A trait's value that was sent (JSON text); `None` for an audience.
    pub value: Option<String>,
    /// The messageId that was sent (recorded in the history).
    pub message_id: Uuid,
    /// Calls after the first, 429s included.
    pub extra_attempts: i32,
}

/// Deletes confirmed changes and advances each user's synced snapshot, in one statement (one
/// transaction). A change is confirmed only if it is still the one sent (same version and
/// value) and still leased by `owner`. Returns how many were confirmed.
pub async fn confirm(
    pool: &PgPool,
    audience_id: i64,
    owner: &str,
    done: &[Confirmed],
) -> Result<u64, sqlx::Error> {
    if done.is_empty() {
        return Ok(0);
    }
    let users: Vec<&str> = done.iter().map(|d| d.user_id.as_str()).collect();
    let versions: Vec<i64> = done.iter().map(|d| d.target_version).collect();
    let members: Vec<bool> = done.iter().map(|d| d.member).collect();
    let mids: Vec<Uuid> = done.iter().map(|d| d.message_id).collect();
    let values: Vec<Option<&str>> = done.iter().map(|d| d.value.as_deref()).collect();
    let n: i64 = sqlx::query_scalar(sql::CONFIRM)
        .bind(audience_id)
        .bind(&users)
        .bind(&versions)
        .bind(&members)
        .bind(&mids)
        .bind(owner)
        .bind(&values)
        .fetch_one(pool)
        .await?;
    Ok(n as u64)
}

/// What a change that was not confirmed becomes in the outbox (`outbox.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeStatus {
    /// Owed, to be tried again (the run stopped, or the token was refused).
    Pending,
    /// Out of retries in this run (5xx, timeouts); the next run tries again.
    Failed,
    /// Wigzo refused it (a 4xx for this change): held until the user's value changes, a full
    /// resync, or `retry`.
    Rejected,
}

impl ChangeStatus {
    /// The name stored in `outbox.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeStatus::Pending => "pending",
            ChangeStatus::Failed => "failed",
            ChangeStatus::Rejected => "rejected",
        }
    }
}

/// Why a change was not confirmed in this run.
#[derive(Debug, Clone)]
pub struct NotConfirmed {
    /// The user.
    pub user_id: String,
    /// What it becomes.
    pub status: ChangeStatus,
    /// Calls of this claim that may have reached Wigzo (not counting 429s). The claim itself
    /// counted one; the record replaces it with this number.
    pub attempts: i32,
    /// 429 answers in this claim.
    pub throttles: i32,
    /// Calls after the first, 429s included (for the run's `retried` count).
    pub retries: i32,
    /// The last HTTP status Wigzo answered, if any.
    pub last_status: Option<i32>,
    /// The last error (a body excerpt, the token blanked out).
    pub error: Option<String>,
}

/// Records changes that were not confirmed and releases their lease. They stay in the outbox:
/// the next run's diff makes them pending again (rejected ones stay rejected until the user's
/// value changes, a full resync, or `retry`).
pub async fn record_failures(
    pool: &PgPool,
    audience_id: i64,
    owner: &str,
    rows: &[NotConfirmed],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = rows.iter().map(|r| r.user_id.as_str()).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    let attempts: Vec<i32> = rows.iter().map(|r| r.attempts).collect();
    let throttles: Vec<i32> = rows.iter().map(|r| r.throttles).collect();
    let codes: Vec<Option<i32>> = rows.iter().map(|r| r.last_status).collect();
    let errors: Vec<Option<String>> = rows.iter().map(|r| r.error.clone()).collect();
    sqlx::query(sql::RECORD_FAILURES)
        .bind(&users)
        .bind(&statuses)
        .bind(&attempts)
        .bind(&codes)
        .bind(&errors)
        .bind(owner)
        .bind(audience_id)
        .bind(&throttles)
        .execute(pool)
        .await?;
    Ok(())
}

/// Extends the lease of every change `owner` holds in an audience to `lease` from now: the
/// changes a delivery is still working on.
pub async fn renew_leases(
    pool: &PgPool,
    audience_id: i64,
    owner: &str,
    lease: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE outbox SET lease_until = now() + make_interval(secs => $3)
          WHERE audience_id = $1 AND coalesce(lease_owner = $2, false)",
    )
    .bind(audience_id)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
}

/// Makes an audience's rejected changes pending again (all of them, or only these users'), to
/// be sent by its next run. Returns how many.
pub async fn requeue_rejected(
    pool: &PgPool,
    audience_id: i64,
    only_users: Option<&[String]>,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE outbox SET status = 'pending', next_attempt_at = now()
          WHERE audience_id = $1 AND status = 'rejected'
            AND ($2::text[] IS NULL OR user_id = ANY ($2))",
    )
    .bind(audience_id)
    .bind(only_users)
    .execute(pool)
    .await?
    .rows_affected())
}

/// How many of an audience's changes are held as rejected by Wigzo.
pub async fn rejected_count(pool: &PgPool, audience_id: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE audience_id = $1 AND status = 'rejected'")
        .bind(audience_id)
        .fetch_one(pool)
        .await
}

/// Releases every lease `owner` still holds on an audience's changes.
pub async fn release(pool: &PgPool, audience_id: i64, owner: &str) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE outbox SET lease_owner = NULL, lease_until = NULL
          WHERE audience_id = $1 AND lease_owner = $2",
    )
    .bind(audience_id)
    .bind(owner)
    .execute(pool)
    .await?
    .rows_affected())
}
