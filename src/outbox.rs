//! The outbox: changes still owed to Wigzo, one live row per (audience, user), claimed under a
//! lease, and confirmed together with the user's synced snapshot in one statement.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

/// How long a claim protects a change from other workers.
pub const LEASE_SECS: i64 = 900;

/// One change to deliver.
#[derive(Debug, Clone, FromRow)]
pub struct Change {
    pub id: i64,
    pub user_id: String,
    pub member: bool,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub name: Option<String>,
    pub message_id: Uuid,
    /// When the diff first found this change; sent as the call's timestamp, so a retried
    /// call is byte-for-byte the same.
    pub detected_at: DateTime<Utc>,
}

/// Claims up to `limit` pending changes of one audience for `owner`, in id order after
/// `after_id` (the last id of the previous batch: each claim seeks straight past the rows
/// already claimed or confirmed in this delivery, so a delivery scans the outbox once instead
/// of once per batch). Each claim counts as an attempt: once claimed, the change may have
/// reached Wigzo.
pub async fn claim(
    pool: &PgPool,
    audience_id: i64,
    owner: &str,
    after_id: i64,
    limit: i64,
) -> Result<Vec<Change>, sqlx::Error> {
    sqlx::query_as::<_, Change>(
        "UPDATE outbox o
            SET lease_owner = $2, lease_until = now() + make_interval(secs => $4),
                attempts = attempts + 1
          WHERE o.id IN (
                SELECT id FROM outbox
                 WHERE audience_id = $1 AND status = 'pending' AND id > $5
                   AND next_attempt_at <= now()
                   AND (lease_until IS NULL OR lease_until < now())
                 ORDER BY id
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)
      RETURNING o.id, o.user_id, o.member, o.email, o.phone, o.name, o.message_id,
                o.created_at AS detected_at",
    )
    .bind(audience_id)
    .bind(owner)
    .bind(limit)
    .bind(LEASE_SECS as f64)
    .bind(after_id)
    .fetch_all(pool)
    .await
}

/// A confirmed change: its id, message id and the extra HTTP attempts it took.
#[derive(Debug, Clone)]
pub struct Confirmed {
    pub id: i64,
    pub message_id: Uuid,
    pub extra_attempts: i32,
}

/// Deletes confirmed changes and advances each user's synced snapshot, in one statement (one
/// transaction). Returns how many were confirmed.
pub async fn confirm(pool: &PgPool, owner: &str, done: &[Confirmed]) -> Result<u64, sqlx::Error> {
    if done.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = done.iter().map(|d| d.id).collect();
    let mids: Vec<Uuid> = done.iter().map(|d| d.message_id).collect();
    let n: i64 = sqlx::query_scalar(
        "WITH done AS (
            DELETE FROM outbox o
             USING unnest($1::bigint[], $2::uuid[]) AS r(id, message_id)
             WHERE o.id = r.id AND o.message_id = r.message_id AND o.lease_owner = $3
         RETURNING o.audience_id, o.user_id, o.member, o.email, o.phone, o.name,
                   o.target_version, o.run_id, o.message_id, o.created_at
         ), snap AS (
            INSERT INTO synced_members
                   (audience_id, user_id, member, email, phone, name, version, confirmed_at)
            SELECT audience_id, user_id, member, email, phone, name, target_version, now()
              FROM done
            ON CONFLICT (audience_id, user_id) DO UPDATE SET
                   member = EXCLUDED.member, email = EXCLUDED.email, phone = EXCLUDED.phone,
                   name = EXCLUDED.name, version = EXCLUDED.version,
                   confirmed_at = EXCLUDED.confirmed_at
         ), ev AS (
            INSERT INTO membership_events
                   (audience_id, user_id, member, run_id, message_id, detected_at, confirmed_at)
            SELECT audience_id, user_id, member, run_id, message_id, created_at, now() FROM done
         )
         SELECT count(*) FROM done",
    )
    .bind(&ids)
    .bind(&mids)
    .bind(owner)
    .fetch_one(pool)
    .await?;
    Ok(n as u64)
}

/// Why a change was not confirmed in this run.
#[derive(Debug, Clone)]
pub struct NotConfirmed {
    pub id: i64,
    /// `pending` (try again next run, e.g. token refused or cancelled), `failed` (retries used
    /// up) or `rejected` (a 4xx for this change).
    pub status: &'static str,
    pub extra_attempts: i32,
    pub last_status: Option<i32>,
    pub error: Option<String>,
}

/// Records changes that were not confirmed and releases their lease. They stay in the outbox:
/// the next run's diff makes them pending again.
pub async fn record_failures(
    pool: &PgPool,
    owner: &str,
    rows: &[NotConfirmed],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.status).collect();
    let extra: Vec<i32> = rows.iter().map(|r| r.extra_attempts).collect();
    let codes: Vec<Option<i32>> = rows.iter().map(|r| r.last_status).collect();
    let errors: Vec<Option<String>> = rows.iter().map(|r| r.error.clone()).collect();
    sqlx::query(
        "UPDATE outbox o
            SET status = r.status, attempts = o.attempts + r.extra,
                last_status = COALESCE(r.code, o.last_status),
                last_error = COALESCE(r.error, o.last_error),
                lease_owner = NULL, lease_until = NULL
           FROM unnest($1::bigint[], $2::text[], $3::int[], $4::int[], $5::text[])
                AS r(id, status, extra, code, error)
          WHERE o.id = r.id AND o.lease_owner = $6",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&extra)
    .bind(&codes)
    .bind(&errors)
    .bind(owner)
    .execute(pool)
    .await?;
    Ok(())
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
