//! What operators see: the ops views after a scripted sequence of runs, /metrics against the
//! runs table, health and readiness, the guarded trigger endpoints, and the status page as
//! headless Chromium renders it.

use std::collections::HashMap;
use std::time::Duration;

use audience_sync::audience::store_definitions;
use audience_sync::ops::{OpsState, Trigger, TriggerRequest};
use audience_sync::sync::Mode;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{body_partial_json, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::*;

/// Run 1 (initial): users 1..=5 enter, all confirmed. Run 2 (incremental): 1 leaves, 6 and 7
/// enter, and Wigzo rejects user 7 with a 400 (the run fails). Run 3 (incremental): 2 leaves,
/// 8 enters, and user 7 is retried and rejected again (the run fails again).
async fn scripted_runs(pool: &PgPool) -> MockServer {
    seed(pool, 10, 5).await;
    let a = audience(pool).await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({"userId": "7"})))
        .respond_with(ResponseTemplate::new(400).set_body_string(r#"{"error":"invalid user"}"#))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let w = worker(pool, &server);
    assert!(sync(&w, &a).await.succeeded());
    set_members(pool, &[1], false).await;
    set_members(pool, &[6, 7], true).await;
    assert!(!sync(&w, &a).await.succeeded());
    set_members(pool, &[2], false).await;
    set_members(pool, &[8], true).await;
    assert!(!sync(&w, &a).await.succeeded());
    server
}

/// Serves the ops router on a random port; returns its base URL.
async fn serve(state: OpsState) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(audience_sync::ops::serve(listener, state, stop.clone()));
    (url, stop)
}

fn state(pool: &PgPool) -> OpsState {
    OpsState {
        pool: pool.clone(),
        trigger: None,
    }
}

type Ts = chrono::DateTime<chrono::Utc>;

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Overview {
    key: String,
    name: String,
    enabled: bool,
    schedule: String,
    members: i64,
    last_run_id: Option<i64>,
    last_run_kind: Option<String>,
    last_run_status: Option<String>,
    last_run_finished: bool,
    last_success_at: Option<Ts>,
    next_run_at: Option<Ts>,
    pending: i64,
    failed: i64,
    has_oldest_pending: bool,
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Run {
    run_id: i64,
    kind: String,
    status: String,
    trigger: String,
    members: Option<i64>,
    added: Option<i64>,
    removed: Option<i64>,
    sent: i64,
    failed: i64,
    retried: i64,
    skipped_rows: Option<i64>,
    has_duration: bool,
    has_error: bool,
}

#[sqlx::test]
async fn the_ops_views_show_the_runs_failures_and_history(pool: PgPool) {
    scripted_runs(&pool).await;
    let first_finished: Ts = sqlx::query_scalar("SELECT finished_at FROM runs WHERE id = 1")
        .fetch_one(&pool)
        .await
        .unwrap();

    // One row per audience: confirmed members 3, 4, 5, 6, 8; run 3 partial; user 7 owed.
    let o: Vec<Overview> = sqlx::query_as(
        "SELECT key, name, enabled, schedule, members, last_run_id, last_run_kind,
                last_run_status, last_run_finished_at IS NOT NULL AS last_run_finished,
                last_success_at, next_run_at, pending, failed,
                oldest_pending_at IS NOT NULL AND oldest_pending_age >= interval '0'
                    AS has_oldest_pending
           FROM ops.audience_overview",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        o,
        vec![Overview {
            key: KEY.into(),
            name: "Order Completed Last 30days".into(),
            enabled: true,
            schedule: "0 0 */3 * * *".into(),
            members: 5,
            last_run_id: Some(3),
            last_run_kind: Some("incremental".into()),
            last_run_status: Some("partial".into()),
            last_run_finished: true,
            last_success_at: Some(first_finished),
            next_run_at: None,
            pending: 0,
            failed: 1,
            has_oldest_pending: true,
        }]
    );

    // Every run, with its counts.
    let runs: Vec<Run> = sqlx::query_as(
        "SELECT run_id, kind, status, trigger, members, added, removed, sent, failed, retried,
                skipped_rows, duration_s >= 0 AS has_duration,
                coalesce(error, '') <> '' AS has_error
           FROM ops.recent_runs ORDER BY run_id DESC",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let run = |run_id, kind: &str, status: &str, members, added, removed, sent, failed| Run {
        run_id,
        kind: kind.into(),
        status: status.into(),
        trigger: "manual".into(),
        members: Some(members),
        added: Some(added),
        removed: Some(removed),
        sent,
        failed,
        retried: 0,
        skipped_rows: Some(0),
        has_duration: true,
        has_error: status != "succeeded",
    };
    assert_eq!(
        runs,
        vec![
            // User 7, rejected in run 2, is held: run 3 does not send it again.
            run(3, "incremental", "partial", 6, 2, 1, 2, 0),
            run(2, "incremental", "partial", 6, 2, 1, 2, 1),
            run(1, "initial", "succeeded", 5, 5, 0, 5, 0),
        ]
    );

    // The one change Wigzo refused: user 7 entering, rejected once with HTTP 400 and held.
    type Failed = (String, String, bool, String, i32, Option<i32>, String, i64);
    let failed: Vec<Failed> = sqlx::query_as(
        "SELECT key, user_id, value, status, attempts, last_status, last_error, run_id
           FROM ops.failed_changes",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let f = &failed[0];
    assert_eq!(
        (f.0.as_str(), f.1.as_str(), f.2, f.3.as_str(), f.4, f.5),
        (KEY, "7", true, "rejected", 1, Some(400))
    );
    assert!(f.6.contains("invalid user"), "{}", f.6);
    assert_eq!(f.7, 3, "the run whose diff last wrote it");

    // Every confirmed change, with the run that detected it.
    let mut history: Vec<(String, String, i64, bool)> = sqlx::query_as(
        "SELECT user_id, change, run_id, confirmed_at >= detected_at
           FROM ops.membership_history WHERE key = $1",
    )
    .bind(KEY)
    .fetch_all(&pool)
    .await
    .unwrap();
    history.sort_by_key(|h| (h.2, h.1.clone(), h.0.parse::<i64>().unwrap()));
    let h = |u: &str, c: &str, run| (u.to_string(), c.to_string(), run, true);
    assert_eq!(
        history,
        vec![
            h("1", "entered", 1),
            h("2", "entered", 1),
            h("3", "entered", 1),
            h("4", "entered", 1),
            h("5", "entered", 1),
            h("6", "entered", 2),
            h("1", "left", 2),
            h("8", "entered", 3),
            h("2", "left", 3),
        ]
    );

    // No personal data in any view.
    let leaky = scalar(
        &pool,
        "SELECT count(*) FROM information_schema.columns
          WHERE table_schema = 'ops' AND column_name IN ('email', 'phone')",
    )
    .await;
    assert_eq!(leaky, 0);
}

/// Parses Prometheus / OpenMetrics text strictly: `# HELP`/`# TYPE`/`# UNIT` comments, a final
/// `# EOF`, and sample lines `name{label="value",...} value` whose family has a TYPE. Returns
/// series (name with labels as written) -> value, and family -> type.
fn parse_metrics(text: &str) -> (HashMap<String, f64>, HashMap<String, String>) {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no # EOF terminator");
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            assert!(valid_name(name), "bad comment line: {line}");
            match kw {
                "HELP" | "UNIT" => {}
                "TYPE" => {
                    let t = parts.next().unwrap_or("");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "unknown"].contains(&t),
                        "bad type: {line}"
                    );
                    types.insert(name.to_string(), t.to_string());
                }
                _ => panic!("bad comment line: {line}"),
            }
            continue;
        }
        assert!(!line.is_empty(), "empty line in the exposition");
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(valid_name(name), "bad metric name: {line}");
        if name_end < series.len() {
            let labels = series[name_end + 1..]
                .strip_suffix('}')
                .unwrap_or_else(|| panic!("unterminated labels: {line}"));
            for pair in labels.split(',') {
                let (k, v) = pair.split_once('=').expect("label=value");
                assert!(valid_name(k), "bad label name: {line}");
                assert!(
                    v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                    "unquoted label value: {line}"
                );
            }
        }
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate series: {line}"
        );
    }
    (samples, types)
}

#[sqlx::test]
async fn metrics_parse_and_match_the_runs_table(pool: PgPool) {
    scripted_runs(&pool).await;
    let (url, stop) = serve(state(&pool)).await;
    let resp = http_get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        audience_sync::metrics::CONTENT_TYPE
    );
    let (m, types) = parse_metrics(&resp.text().await.unwrap());
    let series = |name: &str, labels: &str| {
        *m.get(&format!("{name}{{{labels}}}"))
            .unwrap_or_else(|| panic!("missing {name}{{{labels}}} in {m:?}"))
    };
    for (family, t) in [
        ("audience_sync_runs", "counter"),
        ("audience_sync_changes_sent", "counter"),
        ("audience_sync_changes_failed", "counter"),
        ("audience_sync_changes_retried", "counter"),
        ("audience_sync_pending_changes", "gauge"),
        ("audience_sync_failed_changes", "gauge"),
        ("audience_sync_members", "gauge"),
        ("audience_sync_last_success_timestamp_seconds", "gauge"),
        ("audience_sync_oldest_pending_age_seconds", "gauge"),
        ("audience_sync_delivery_latency_seconds", "histogram"),
    ] {
        assert_eq!(types.get(family).map(String::as_str), Some(t), "{family}");
    }

    let aud = format!("audience=\"{KEY}\",computation_class=\"audience\"");
    let by_table: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT kind, status, count(*) FROM runs GROUP BY 1, 2")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        by_table.len(),
        2,
        "initial/succeeded and incremental/partial"
    );
    let runs_series = m
        .keys()
        .filter(|k| k.starts_with("audience_sync_runs_total{"))
        .count();
    assert_eq!(runs_series, by_table.len());
    for (kind, status, n) in by_table {
        assert_eq!(
            series(
                "audience_sync_runs_total",
                &format!("{aud},kind=\"{kind}\",status=\"{status}\"")
            ),
            n as f64
        );
    }
    for (metric, column) in [
        ("audience_sync_changes_sent_total", "sent"),
        ("audience_sync_changes_failed_total", "failed"),
        ("audience_sync_changes_retried_total", "retried"),
    ] {
        let sql = format!("SELECT sum({column})::bigint FROM runs");
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(series(metric, &aud), n as f64, "{metric}");
    }
    assert_eq!(series("audience_sync_changes_sent_total", &aud), 9.0);
    assert_eq!(series("audience_sync_changes_failed_total", &aud), 1.0);
    assert_eq!(series("audience_sync_failed_changes", &aud), 1.0);
    assert_eq!(series("audience_sync_pending_changes", &aud), 0.0);
    assert_eq!(series("audience_sync_members", &aud), 5.0);
    let last_ok = scalar(
        &pool,
        "SELECT extract(epoch FROM finished_at)::bigint FROM runs WHERE id = 1",
    )
    .await;
    assert!(
        (series("audience_sync_last_success_timestamp_seconds", &aud) - last_ok as f64).abs() < 1.0
    );
    assert!(series("audience_sync_oldest_pending_age_seconds", &aud) >= 0.0);
    // This process made 11 identify calls (5 + 3 + 3) before the scrape (other tests in the
    // binary may have made more: the histogram is process-wide).
    assert!(m["audience_sync_delivery_latency_seconds_count"] >= 11.0);
    assert!(m.contains_key("audience_sync_delivery_latency_seconds_bucket{le=\"0.005\"}"));
    assert!(m.contains_key("audience_sync_delivery_latency_seconds_bucket{le=\"30.0\"}"));
    assert_eq!(
        m["audience_sync_delivery_latency_seconds_bucket{le=\"+Inf\"}"],
        m["audience_sync_delivery_latency_seconds_count"]
    );

    // An audience never run has no last-success sample.
    store_definitions(
        &pool,
        &[
            def("Order Completed Last 30days", MEMBERS_QUERY),
            def("Never Run", MEMBERS_QUERY),
        ],
    )
    .await
    .unwrap();
    let body = http_get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (m, _) = parse_metrics(&body);
    let never = "{audience=\"never_run\",computation_class=\"audience\"}";
    assert_eq!(m[&format!("audience_sync_members{never}")], 0.0);
    assert!(!m.contains_key(&format!(
        "audience_sync_last_success_timestamp_seconds{never}"
    )));

    // A database error is a 500 with a message.
    pool.close().await;
    let r = http_get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(r.status(), 500);
    assert!(r.text().await.unwrap().contains("cannot read metrics"));
    stop.cancel();
}

#[sqlx::test]
async fn health_and_readiness(pool: PgPool) {
    let (url, stop) = serve(state(&pool)).await;
    let get = |p: &str| http_get(format!("{url}{p}"));
    let r = get("/healthz").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap().trim(), "ok");
    assert_eq!(get("/readyz").await.unwrap().status(), 200);

    // A migration the binary embeds is missing: not ready, and the reason names it.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 4")
        .execute(&pool)
        .await
        .unwrap();
    let r = get("/readyz").await.unwrap();
    assert_eq!(r.status(), 503);
    let reason = r.text().await.unwrap();
    assert_eq!(reason.trim_end().lines().count(), 1, "{reason}");
    assert!(reason.contains("[4]"), "{reason}");

    // A migration recorded as failed counts as not applied.
    sqlx::query("UPDATE _sqlx_migrations SET success = false WHERE version = 2")
        .execute(&pool)
        .await
        .unwrap();
    let reason = get("/readyz").await.unwrap().text().await.unwrap();
    assert!(reason.contains("[2, 4]"), "{reason}");

    // The database is gone: liveness stays up, readiness says why.
    pool.close().await;
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let r = get("/readyz").await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().starts_with("database not ready"));
    stop.cancel();
}

#[sqlx::test]
async fn triggers_are_off_by_default_and_need_the_bearer_token(pool: PgPool) {
    audience(&pool).await;
    let http = http();
    let path = format!("/api/audiences/{KEY}/resync");

    // Off (no token configured): 404, even with a token.
    let (off, stop_off) = serve(state(&pool)).await;
    for p in [path.clone(), format!("/api/audiences/{KEY}/sync")] {
        let r = http
            .post(format!("{off}{p}"))
            .bearer_auth("anything")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    stop_off.cancel();

    let (tx, mut rx) = tokio::sync::mpsc::channel::<TriggerRequest>(1);
    let on_state = OpsState {
        pool: pool.clone(),
        trigger: Some(Trigger {
            token: "trigger-s3cret".to_string().into(),
            tx,
        }),
    };
    let (on, stop) = serve(on_state.clone()).await;
    let post = |p: &str, token: Option<&str>| {
        let r = http.post(format!("{on}{p}"));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
        .send()
    };

    // Without a token, with a wrong one (a prefix, a longer one), or another scheme: 401.
    for token in [
        None,
        Some("trigger-s3cre"),
        Some("trigger-s3cret2"),
        Some(""),
    ] {
        let r = post(&path, token).await.unwrap();
        assert_eq!(r.status(), 401, "{token:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
    }
    let r = http
        .post(format!("{on}{path}"))
        .basic_auth("x", Some("trigger-s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Unknown audience: 404 naming the key.
    let r = post(
        "/api/audiences/no_such_audience/sync",
        Some("trigger-s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("no_such_audience"));
    assert!(rx.try_recv().is_err(), "a refused request was queued");

    // The right token: 202, and the request arrives on the channel.
    let r = post(&path, Some("trigger-s3cret")).await.unwrap();
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"queued": true, "audience": KEY, "mode": "full_resync", "allow_removals": false})
    );
    let req = rx.recv().await.unwrap();
    assert_eq!(
        (req.key.as_str(), req.mode, req.allow_removals),
        (KEY, Mode::FullResync, false)
    );

    // A person's release of held removals.
    let r = post(
        &format!("/api/audiences/{KEY}/sync?allow_removals=true"),
        Some("trigger-s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 202);
    let req = rx.recv().await.unwrap();
    assert_eq!((req.mode, req.allow_removals), (Mode::Sync, true));

    let r = post(
        &format!("/api/audiences/{KEY}/sync"),
        Some("trigger-s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["mode"], "sync");
    // The channel (capacity 1) is now full: 503, nothing lost silently.
    let r = post(&path, Some("trigger-s3cret")).await.unwrap();
    assert_eq!(r.status(), 503);
    let req = rx.recv().await.unwrap();
    assert_eq!((req.key.as_str(), req.mode), (KEY, Mode::Sync));
    // The worker has stopped taking requests: 503.
    drop(rx);
    let r = post(&path, Some("trigger-s3cret")).await.unwrap();
    assert_eq!(r.status(), 503);

    // Read-only everywhere else.
    for p in ["/", "/metrics", "/healthz"] {
        let r = post(p, Some("trigger-s3cret")).await.unwrap();
        assert_eq!(r.status(), 405, "{p}");
    }
    let r = http.get(format!("{on}{path}")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    stop.cancel();
}

/// The DOM headless Chromium renders for `url`; `None` (test skipped) when Chromium is not
/// installed outside CI.
async fn chromium_dom(url: &str) -> Option<String> {
    let Some(browser) = ["chromium", "chromium-browser"].into_iter().find(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .is_ok()
    }) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is not installed; run scripts/ensure-chromium"
        );
        eprintln!("skipping: chromium not installed (scripts/ensure-chromium installs it)");
        return None;
    };
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                &format!("--user-data-dir={}", profile.path().display()),
                "--dump-dom",
                url,
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium did not finish within 60 s")
    .unwrap();
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[sqlx::test]
async fn the_status_page_renders_in_headless_chromium(pool: PgPool) {
    scripted_runs(&pool).await;
    store_definitions(
        &pool,
        &[
            def("Order Completed Last 30days", MEMBERS_QUERY),
            def(
                "<script>alert(1)</script> Shoppers",
                "SELECT id AS user_id FROM shop_users WHERE id = 1",
            ),
            trait_def(
                "Lifetime Value",
                "SELECT id AS user_id, id * 2.5 AS value FROM shop_users",
            ),
        ],
    )
    .await
    .unwrap();
    let (url, stop) = serve(state(&pool)).await;
    let dom = chromium_dom(&format!("{url}/")).await;
    stop.cancel();
    let Some(dom) = dom else { return };
    assert!(
        dom.contains("audience-sync status"),
        "chromium rendered no page: {dom}"
    );
    // Each audience, by key and name.
    assert!(dom.contains(&format!(r#"data-key="{KEY}""#)));
    assert!(dom.contains("Order Completed Last 30days"));
    assert!(dom.contains(r#"data-key="script_alert_1_script_shoppers""#));
    // A computed trait has its row, marked as one.
    assert!(
        dom.contains(r#"data-key="lifetime_value" data-kind="trait""#),
        "no trait row: {dom}"
    );
    // The hostile name is shown as text, never run as markup.
    assert!(dom.contains("&lt;script&gt;alert(1)&lt;/script&gt; Shoppers"));
    assert!(!dom.contains("<script>alert(1)"));
    // The failed change: user 7, rejected with HTTP 400, and its error.
    let failed = &dom[dom.find(r#"id="failed-changes""#).expect("failed table")..];
    let row = &failed[failed
        .find(r#"class="failed-change""#)
        .expect("a failed row")..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains(">7<") && row.contains(">400<") && row.contains("rejected"));
    assert!(row.contains("invalid user"));
    // The last run ended partial (user 7 held), and the page says so.
    assert!(
        dom.contains(r#"class="last-run partial""#),
        "no partial last run"
    );
    // Membership over time: the audience with finished runs has a chart line.
    assert!(dom.contains("<polyline"));
    // Recent runs, newest first.
    let recent = &dom[dom.find(r#"id="recent-runs""#).expect("runs table")..];
    let recent = &recent[..recent.find("</table>").unwrap()];
    let run_ids: Vec<&str> = recent
        .split(r#"class="run" data-run=""#)
        .skip(1)
        .map(|r| &r[..r.find('"').unwrap()])
        .collect();
    assert_eq!(run_ids, ["3", "2", "1"]);
    // Self-contained, refreshing, script-free, and nothing from the config.
    assert!(dom.contains(r#"http-equiv="refresh" content="30""#));
    assert!(!dom.contains("<script") && !dom.contains("src=") && !dom.contains("<link"));
    assert!(!dom.contains(TOKEN));
}

#[sqlx::test]
async fn a_held_audience_shows_on_the_page_the_metrics_and_the_views(pool: PgPool) {
    seed(&pool, 150, 150).await;
    let a = audience(&pool).await;
    let w = worker(&pool, &wigzo_ok().await);
    assert!(sync(&w, &a).await.succeeded());
    sqlx::query("DELETE FROM shop_users")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(sync(&w, &a).await.status.as_str(), "held");

    let (held, reason): (bool, Option<String>) =
        sqlx::query_as("SELECT held, held_reason FROM ops.audience_overview")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(held);
    let reason = reason.unwrap();
    assert!(
        reason.contains("would remove 150 of 150") && reason.contains("--allow-removals"),
        "{reason}"
    );

    let (url, stop) = serve(state(&pool)).await;
    let metrics = http_get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "audience_sync_held{{audience=\"{KEY}\",computation_class=\"audience\"}} 1"
        )),
        "{metrics}"
    );
    let dom = chromium_dom(&format!("{url}/")).await;
    stop.cancel();
    let Some(dom) = dom else { return };
    let row = &dom[dom
        .find(&format!(r#"data-key="{KEY}""#))
        .expect("audience row")..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains(r#"<span class="held">held</span>"#), "{row}");
    assert!(
        row.contains("would remove 150 of 150") && row.contains("--allow-removals"),
        "{row}"
    );
}
