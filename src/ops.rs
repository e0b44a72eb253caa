//! The daemon's HTTP server for operators: liveness, readiness, Prometheus metrics, a
//! server-rendered status page, and (only with a configured bearer token) run triggers.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::sync::Mode;

/// What the handlers share.
#[derive(Clone)]
pub struct OpsState {
    /// The worker's database (every view is read from it at request time).
    pub pool: PgPool,
    /// `None`: the POST endpoints answer 404 (the default).
    pub trigger: Option<Trigger>,
}

/// Where API-triggered runs go, and the bearer token that guards them.
#[derive(Clone)]
pub struct Trigger {
    /// The bearer token a trigger must present (a secret).
    pub token: SecretString,
    /// Where accepted requests go: the daemon's loop.
    pub tx: tokio::sync::mpsc::Sender<TriggerRequest>,
}

/// A run asked for over the API.
#[derive(Debug, Clone)]
pub struct TriggerRequest {
    /// The audience's key.
    pub key: String,
    /// Sync or full resync.
    pub mode: Mode,
    /// `?allow_removals=true`: a person's release of removals the guard held.
    pub allow_removals: bool,
}

/// Query parameters of the trigger endpoints.
#[derive(Debug, Default, serde::Deserialize)]
pub struct TriggerParams {
    #[serde(default)]
    allow_removals: bool,
}

/// The ops server's routes.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/audiences/{key}/sync", post(trigger_sync))
        .route("/api/audiences/{key}/resync", post(trigger_resync))
        .with_state(state)
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: OpsState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, body.into()).into_response()
}

async fn readyz(State(s): State<OpsState>) -> Response {
    let applied: Result<Vec<i64>, sqlx::Error> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&s.pool)
            .await;
    let applied = match applied {
        Ok(v) => v,
        Err(e) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("database not ready: {}\n", crate::audience::db_message(&e)),
            );
        }
    };
    let missing: Vec<i64> = crate::db::MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect();
    if missing.is_empty() {
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("migrations not applied: {missing:?}; run `audience-sync migrate`\n"),
        )
    }
}

async fn metrics(State(s): State<OpsState>) -> Response {
    match crate::metrics::render(&s.pool).await {
        Ok(body) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response(),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "cannot read metrics from the database: {}\n",
                crate::audience::db_message(&e)
            ),
        ),
    }
}

async fn trigger_sync(
    s: State<OpsState>,
    key: Path<String>,
    q: Query<TriggerParams>,
    h: HeaderMap,
) -> Response {
    trigger(s, key, h, Mode::Sync, q.allow_removals).await
}

async fn trigger_resync(
    s: State<OpsState>,
    key: Path<String>,
    q: Query<TriggerParams>,
    h: HeaderMap,
) -> Response {
    trigger(s, key, h, Mode::FullResync, q.allow_removals).await
}

/// The credentials of an `Authorization: Bearer <token>` header (the scheme is
/// case-insensitive, RFC 7235).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

/// Constant-time comparison: the time depends only on the length of `a` (the caller's input),
/// never on where the two differ or on the secret's content.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= (*x ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

async fn trigger(
    State(s): State<OpsState>,
    Path(key): Path<String>,
    headers: HeaderMap,
    mode: Mode,
    allow_removals: bool,
) -> Response {
    let Some(t) = &s.trigger else {
        return text(
            StatusCode::NOT_FOUND,
            "run triggers are off; set [ops] trigger_token to enable them\n",
        );
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer(v.as_bytes()))
        .unwrap_or(b"");
    if !same(given, t.token.expose_secret().as_bytes()) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong bearer token\n",
        )
            .into_response();
    }
    let known: Result<bool, sqlx::Error> =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM audiences WHERE key = $1 AND enabled)")
            .bind(&key)
            .fetch_one(&s.pool)
            .await;
    match known {
        Ok(true) => {}
        Ok(false) => {
            return text(
                StatusCode::NOT_FOUND,
                format!("no enabled audience with key {key:?}\n"),
            );
        }
        Err(e) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                crate::audience::db_message(&e),
            );
        }
    }
    let mode_name = if mode == Mode::Sync {
        "sync"
    } else {
        "full_resync"
    };
    match t.tx.try_send(TriggerRequest {
        key: key.clone(),
        mode,
        allow_removals,
    }) {
        Ok(()) => (
            StatusCode::ACCEPTED,
            axum::Json(
                serde_json::json!({"queued": true, "audience": key, "mode": mode_name, "allow_removals": allow_removals}),
            ),
        )
            .into_response(),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the worker is not taking requests (stopping or busy); try again\n",
        ),
    }
}

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "—".into())
}

#[derive(sqlx::FromRow)]
struct AudienceRow {
    audience_id: i64,
    key: String,
    /// audience or trait.
    kind: String,
    name: String,
    enabled: bool,
    members: i64,
    last_run_kind: Option<String>,
    last_run_status: Option<String>,
    last_run_finished_at: Option<DateTime<Utc>>,
    next_run_at: Option<DateTime<Utc>>,
    pending: i64,
    failed: i64,
    oldest_pending_s: Option<f64>,
    held_reason: Option<String>,
}

#[derive(sqlx::FromRow)]
struct RunRow {
    run_id: i64,
    key: String,
    computation_class: String,
    kind: String,
    status: String,
    trigger: String,
    started_at: DateTime<Utc>,
    duration_s: Option<f64>,
    members: Option<i64>,
    added: Option<i64>,
    removed: Option<i64>,
    sent: i64,
    failed: i64,
    error: Option<String>,
}

#[derive(sqlx::FromRow)]
struct FailedRow {
    key: String,
    user_id: String,
    value: bool,
    /// A trait's value (JSON text; `null` for a removal).
    trait_value: Option<String>,
    status: String,
    attempts: i32,
    last_status: Option<i32>,
    last_error: Option<String>,
}

/// Members after each of the audience's last 50 finished runs, as a small SVG line.
fn chart(points: &[i64]) -> Markup {
    const W: f64 = 160.0;
    const H: f64 = 32.0;
    if points.len() < 2 {
        return html! { svg.chart width="160" height="32" {} };
    }
    let max = *points.iter().max().unwrap_or(&1) as f64;
    let max = if max <= 0.0 { 1.0 } else { max };
    let step = W / (points.len() - 1) as f64;
    let coords: Vec<String> = points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(
                "{:.1},{:.1}",
                i as f64 * step,
                H - 2.0 - (*p as f64 / max) * (H - 4.0)
            )
        })
        .collect();
    html! {
        svg.chart width="160" height="32" role="img"
            aria-label={ "members over the last " (points.len()) " runs" } {
            polyline fill="none" stroke="#2563eb" stroke-width="1.5" points=(coords.join(" ")) {}
        }
    }
}

/// The page's style sheet (no user data in it).
const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#111}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:middle}
th{background:#f9fafb}.num{text-align:right;font-variant-numeric:tabular-nums}
.succeeded{color:#15803d}.failed,.rejected{color:#b91c1c}.running{color:#1d4ed8}.abandoned,.partial{color:#a16207}
.held{color:#7c3aed;font-weight:600}.held-reason{color:#7c3aed;font-size:12px;max-width:420px}
.muted{color:#6b7280}";

/// The status page. Every value from the database goes through maud's escaping (audience
/// names, keys, errors and user ids are user input); only the constant style sheet is not.
fn status_page(
    audiences: &[AudienceRow],
    history: &[(i64, i64)],
    runs: &[RunRow],
    failed: &[FailedRow],
) -> Markup {
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="30";
                title { "audience-sync status" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "audience-sync" }
                p.muted {
                    "Generated " (Utc::now().format("%Y-%m-%d %H:%M:%S")) " UTC; refreshes every 30 s."
                }
                h2 { "Audiences and computed traits" }
                table #audiences {
                    tr {
                        th { "Key" } th { "Kind" } th { "Name" } th { "State" }
                        th.num title="For a trait: users with a value" { "Members" }
                        th { "Members over time" } th { "Last run" } th { "Finished (UTC)" }
                        th { "Next run (UTC)" } th.num { "Pending" } th.num { "Failed" }
                        th.num { "Oldest pending" }
                    }
                    @for a in audiences {
                        @let points: Vec<i64> = history.iter().filter(|(id, _)| *id == a.audience_id).map(|(_, m)| *m).collect();
                        @let status = a.last_run_status.as_deref().unwrap_or("never run");
                        tr.audience data-key=(a.key) data-kind=(a.kind) {
                            td { code { (a.key) } }
                            td.kind { (a.kind) }
                            td { (a.name) }
                            // A held audience waits for a person: say so, why, and how to
                            // release it.
                            td {
                                @if let Some(why) = &a.held_reason {
                                    span.held { "held" }
                                    div."held-reason" { (why) }
                                } @else if a.enabled {
                                    "enabled"
                                } @else {
                                    "disabled"
                                }
                            }
                            td.num { (a.members) }
                            td { (chart(&points)) }
                            td class={ "last-run " (a.last_run_status.as_deref().unwrap_or("never-run")) } {
                                @if let Some(kind) = &a.last_run_kind { (kind) " " }
                                (status)
                            }
                            td { (when(a.last_run_finished_at)) }
                            td { (when(a.next_run_at)) }
                            td.num { (a.pending) }
                            td.num.failed[a.failed > 0] { (a.failed) }
                            td.num {
                                @match a.oldest_pending_s {
                                    Some(s) => { (format!("{s:.0} s")) }
                                    None => { "—" }
                                }
                            }
                        }
                    }
                }
                h2 { "Recent runs" }
                table id="recent-runs" {
                    tr {
                        th { "Run" } th { "Key" } th { "Of" } th { "Kind" } th { "Trigger" } th { "Status" }
                        th { "Started (UTC)" } th.num { "Duration" } th.num { "Members" }
                        th.num { "Entered" } th.num { "Left" } th.num { "Sent" } th.num { "Failed" }
                        th { "Error" }
                    }
                    @for r in runs {
                        tr.run data-run=(r.run_id) {
                            td { (r.run_id) }
                            td { code { (r.key) } }
                            td { (r.computation_class) }
                            td { (r.kind) }
                            td { (r.trigger) }
                            td class=(r.status) { (r.status) }
                            td { (r.started_at.format("%Y-%m-%d %H:%M:%S")) }
                            td.num { (r.duration_s.map(|d| format!("{d:.1} s")).unwrap_or_default()) }
                            td.num { (opt(r.members)) }
                            td.num { (opt(r.added)) }
                            td.num { (opt(r.removed)) }
                            td.num { (r.sent) }
                            td.num { (r.failed) }
                            td { (r.error.as_deref().unwrap_or("")) }
                        }
                    }
                }
                h2 { "Failed changes" }
                table id="failed-changes" {
                    tr {
                        th { "Key" } th { "User id" } th { "Value" } th { "Status" }
                        th.num { "Attempts" } th.num { "HTTP status" } th { "Error" }
                    }
                    @if failed.is_empty() {
                        tr { td colspan="7" .muted { "None." } }
                    }
                    @for f in failed {
                        tr."failed-change" {
                            td { code { (f.key) } }
                            td { (f.user_id) }
                            td { (f.trait_value.as_deref().map_or_else(|| f.value.to_string(), str::to_string)) }
                            td class=(f.status) { (f.status) }
                            td.num { (f.attempts) }
                            td.num."http-status" { (f.last_status.map(|s| s.to_string()).unwrap_or_default()) }
                            td { (f.last_error.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

async fn page(State(s): State<OpsState>) -> Response {
    match render_page(&s.pool).await {
        Ok(html) => Html(html).into_response(),
        Err(e) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "cannot read the status from the database: {}\n",
                crate::audience::db_message(&e)
            ),
        ),
    }
}

async fn render_page(pool: &PgPool) -> Result<String, sqlx::Error> {
    let audiences: Vec<AudienceRow> = sqlx::query_as(
        "SELECT audience_id, key, kind, name, enabled, members, last_run_kind, last_run_status,
                last_run_finished_at, next_run_at, pending, failed,
                extract(epoch FROM oldest_pending_age)::float8 AS oldest_pending_s, held_reason
           FROM ops.audience_overview ORDER BY key",
    )
    .fetch_all(pool)
    .await?;
    let history: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT audience_id, members FROM (
            SELECT audience_id, members, id,
                   row_number() OVER (PARTITION BY audience_id ORDER BY id DESC) AS n
              FROM runs WHERE finished_at IS NOT NULL AND members IS NOT NULL) r
          WHERE n <= 50 ORDER BY audience_id, id",
    )
    .fetch_all(pool)
    .await?;
    let runs: Vec<RunRow> = sqlx::query_as(
        "SELECT run_id, key, computation_class, kind, status, trigger, started_at,
                duration_s::float8 AS duration_s,
                members, added, removed, sent, failed, error
           FROM ops.recent_runs ORDER BY run_id DESC LIMIT 20",
    )
    .fetch_all(pool)
    .await?;
    let failed: Vec<FailedRow> = sqlx::query_as(
        "SELECT key, user_id, value, trait_value, status, attempts, last_status, last_error
           FROM ops.failed_changes ORDER BY created_at DESC, user_id LIMIT 50",
    )
    .fetch_all(pool)
    .await?;

    Ok(status_page(&audiences, &history, &runs, &failed).into_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_escapes_everything_from_the_database() {
        let hostile = r#"<script>alert("x")</script> & 'y'"#;
        let a = AudienceRow {
            audience_id: 1,
            key: hostile.into(),
            kind: hostile.into(),
            name: hostile.into(),
            enabled: true,
            members: 1,
            last_run_kind: Some(hostile.into()),
            last_run_status: Some(hostile.into()),
            last_run_finished_at: None,
            next_run_at: None,
            pending: 0,
            failed: 0,
            oldest_pending_s: None,
            held_reason: Some(hostile.into()),
        };
        let f = FailedRow {
            key: hostile.into(),
            user_id: hostile.into(),
            value: true,
            trait_value: Some(hostile.into()),
            status: hostile.into(),
            attempts: 1,
            last_status: None,
            last_error: Some(hostile.into()),
        };
        let page = status_page(&[a], &[], &[], &[f]).into_string();
        assert!(
            !page.contains("<script>") && !page.contains(r#""x""#),
            "{page}"
        );
        assert!(page.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;"));
    }

    #[test]
    fn compares_tokens_by_content_and_length() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"x"));
    }

    #[test]
    fn reads_the_bearer_scheme_case_insensitively() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
    }

    #[test]
    fn charts_need_two_points() {
        assert!(!chart(&[5]).into_string().contains("polyline"));
        assert!(chart(&[1, 5, 3]).into_string().contains("polyline"));
    }
}
