//! Read-only views of the worker's state for operators: per-audience (and per-trait) status
//! and recent runs.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgPool};

/// One audience's state, as `status` prints it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct AudienceStatus {
    /// Its key.
    pub key: String,
    /// `audience` or `trait`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Whether it is synced.
    pub enabled: bool,
    /// Members Wigzo has confirmed (for a trait: users with a confirmed value).
    pub members: i64,
    /// Its latest run, if any.
    pub last_run_id: Option<i64>,
    /// That run's kind.
    pub last_run_kind: Option<String>,
    /// That run's status.
    pub last_run_status: Option<String>,
    /// When it finished.
    pub last_run_finished_at: Option<DateTime<Utc>>,
    /// Changes waiting to be sent.
    pub pending: i64,
    /// Changes rejected or out of retries.
    pub failed: i64,
    /// Why the removal guard held the latest run, while it is the latest.
    pub held_reason: Option<String>,
}

/// Every audience's state, enabled ones first.
pub async fn audiences(pool: &PgPool) -> Result<Vec<AudienceStatus>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.key, a.kind, a.name, a.enabled,
                (SELECT count(*) FROM synced_members s WHERE s.audience_id = a.id AND s.member) AS members,
                r.id AS last_run_id, r.kind AS last_run_kind, r.status AS last_run_status,
                r.finished_at AS last_run_finished_at,
                (SELECT count(*) FROM outbox o WHERE o.audience_id = a.id AND o.status = 'pending') AS pending,
                (SELECT count(*) FROM outbox o WHERE o.audience_id = a.id AND o.status <> 'pending') AS failed,
                CASE WHEN r.status = 'held' THEN regexp_replace(r.error, '^held: ', '') END AS held_reason
           FROM audiences a
           LEFT JOIN LATERAL (SELECT * FROM runs WHERE audience_id = a.id ORDER BY id DESC LIMIT 1) r ON true
          ORDER BY a.enabled DESC, a.key",
    )
    .fetch_all(pool)
    .await
}

/// One run, as `runs` prints it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct RunRow {
    /// Its id.
    pub run_id: i64,
    /// The audience's (or trait's) key.
    pub audience: String,
    /// `audience` or `trait`.
    pub computation: String,
    /// initial, incremental or full_resync.
    pub kind: String,
    /// Its status.
    pub status: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Members the query returned.
    pub members: Option<i64>,
    /// `true` changes its diff wrote.
    pub added: Option<i64>,
    /// `false` changes its diff wrote.
    pub removed: Option<i64>,
    /// Changes confirmed.
    pub sent: i64,
    /// Changes rejected or out of retries.
    pub failed: i64,
    /// Extra HTTP attempts.
    pub retried: i64,
    /// Rows skipped for an unusable user id.
    pub skipped_rows: Option<i64>,
    /// Why it did not succeed.
    pub error: Option<String>,
}

/// Recent runs, newest first, of one audience or all.
pub async fn runs(
    pool: &PgPool,
    audience: Option<&str>,
    limit: i64,
) -> Result<Vec<RunRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.id AS run_id, a.key AS audience, a.kind AS computation, r.kind, r.status,
                r.started_at, r.finished_at,
                r.members, r.added, r.removed, r.sent, r.failed, r.retried, r.skipped_rows, r.error
           FROM runs r JOIN audiences a ON a.id = r.audience_id
          WHERE $1::text IS NULL OR a.key = $1
          ORDER BY r.id DESC LIMIT $2",
    )
    .bind(audience)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Renders rows as an aligned text table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.clone()));
        out.push('\n');
    }
    out
}

/// A value, or `-` when there is none.
pub fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(T::to_string).unwrap_or_else(|| "-".into())
}

/// A time in UTC, or `-`.
pub fn time(t: &Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

/// The `status` table, and a line per held audience saying why.
pub fn render_audiences(rows: &[AudienceStatus]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|a| {
            vec![
                a.key.clone(),
                a.kind.clone(),
                if a.enabled {
                    a.name.clone()
                } else {
                    format!("{} (disabled)", a.name)
                },
                a.members.to_string(),
                opt(&a.last_run_kind),
                opt(&a.last_run_status),
                time(&a.last_run_finished_at),
                a.pending.to_string(),
                a.failed.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "KEY",
            "KIND",
            "NAME",
            "MEMBERS",
            "LAST RUN",
            "STATUS",
            "FINISHED (UTC)",
            "PENDING",
            "FAILED",
        ],
        &body,
    ) + &rows
        .iter()
        .filter_map(|a| {
            a.held_reason
                .as_ref()
                .map(|why| format!("\n{} is held: {why}\n", a.key))
        })
        .collect::<String>()
}

/// The `runs` table.
pub fn render_runs(rows: &[RunRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.run_id.to_string(),
                r.audience.clone(),
                r.computation.clone(),
                r.kind.clone(),
                r.status.clone(),
                time(&Some(r.started_at)),
                r.finished_at
                    .map(|f| {
                        format!(
                            "{:.1}s",
                            (f - r.started_at).num_milliseconds() as f64 / 1000.0
                        )
                    })
                    .unwrap_or_else(|| "-".into()),
                opt(&r.members),
                opt(&r.added),
                opt(&r.removed),
                r.sent.to_string(),
                r.failed.to_string(),
                opt(&r.skipped_rows),
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "RUN",
            "KEY",
            "OF",
            "KIND",
            "STATUS",
            "STARTED (UTC)",
            "TOOK",
            "MEMBERS",
            "ADDED",
            "REMOVED",
            "SENT",
            "FAILED",
            "SKIPPED",
            "ERROR",
        ],
        &body,
    )
}
