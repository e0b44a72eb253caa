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

/// Users 1..=5 enter (initial, all confirmed); then 1 leaves and 6 and 7 enter, and Wigzo
/// rejects user 7 with a 400.
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

#[sqlx::test]
async fn the_ops_views_show_the_runs_failures_and_history(pool: PgPool) {
    scripted_runs(&pool).await;

    let o: (String, i64, String, String, i64, i64, bool, bool) = sqlx::query_as(
        "SELECT key, members, last_run_kind, last_run_status, pending, failed,
                oldest_pending_at IS NOT NULL, last_success_at IS NOT NULL
           FROM ops.audience_overview",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        o,
        (
            KEY.to_string(),
            5,
            "incremental".into(),
            "failed".into(),
            0,
            1,
            true,
            true
        )
    );

    type Run = (String, String, String, i64, i64, i64, i64, bool);
    let runs: Vec<Run> = sqlx::query_as(
        "SELECT kind, status, trigger, added, removed, sent, failed, duration_s IS NOT NULL
           FROM ops.recent_runs ORDER BY run_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        runs,
        vec![
            (
                "initial".into(),
                "succeeded".into(),
                "manual".into(),
                5,
                0,
                5,
                0,
                true
            ),
            (
                "incremental".into(),
                "failed".into(),
                "manual".into(),
                2,
                1,
                2,
                1,
                true
            ),
        ]
    );

    type Failed = (String, String, bool, String, Option<i32>, String);
    let failed: Vec<Failed> = sqlx::query_as(
        "SELECT key, user_id, value, status, last_status, last_error FROM ops.failed_changes",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(failed.len(), 1);
    let f = &failed[0];
    assert_eq!(
        (f.0.as_str(), f.1.as_str(), f.2, f.3.as_str(), f.4),
        (KEY, "7", true, "rejected", Some(400))
    );
    assert!(f.5.contains("invalid user"), "{}", f.5);

    let history: Vec<(String, String)> = sqlx::query_as(
        "SELECT user_id, change FROM ops.membership_history ORDER BY confirmed_at, user_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut entered: Vec<&str> = history
        .iter()
        .filter(|h| h.1 == "entered")
        .map(|h| h.0.as_str())
        .collect();
    entered.sort();
    assert_eq!(entered, ["1", "2", "3", "4", "5", "6"]);
    let left: Vec<&str> = history
        .iter()
        .filter(|h| h.1 == "left")
        .map(|h| h.0.as_str())
        .collect();
    assert_eq!(left, ["1"]);
}

/// Parses Prometheus / OpenMetrics text strictly: every sample line is `name{labels} value`.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    assert!(text.trim_end().ends_with("# EOF"), "no # EOF terminator");
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.starts_with("# UNIT ")
                    || line == "# EOF",
                "bad comment line: {line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels: {line}");
        }
        out.insert(series.to_string(), value);
    }
    out
}

#[sqlx::test]
async fn metrics_parse_and_match_the_runs_table(pool: PgPool) {
    scripted_runs(&pool).await;
    let (url, stop) = serve(state(&pool)).await;
    let resp = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("text")
    );
    let m = parse_metrics(&resp.text().await.unwrap());
    let series = |name: &str, labels: &str| {
        *m.get(&format!("{name}{{{labels}}}"))
            .unwrap_or_else(|| panic!("missing {name}{{{labels}}} in {m:?}"))
    };
    let aud = format!("audience=\"{KEY}\"");
    let by_table: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT kind, status, count(*) FROM runs GROUP BY 1, 2")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(by_table.len(), 2);
    for (kind, status, n) in by_table {
        assert_eq!(
            series(
                "audience_sync_runs_total",
                &format!("{aud},kind=\"{kind}\",status=\"{status}\"")
            ),
            n as f64
        );
    }
    let sent = scalar(&pool, "SELECT sum(sent)::bigint FROM runs").await;
    assert_eq!(
        series("audience_sync_changes_sent_total", &aud),
        sent as f64
    );
    assert_eq!(series("audience_sync_changes_failed_total", &aud), 1.0);
    assert_eq!(series("audience_sync_failed_changes", &aud), 1.0);
    assert_eq!(series("audience_sync_pending_changes", &aud), 0.0);
    assert_eq!(series("audience_sync_members", &aud), 5.0);
    assert!(series("audience_sync_last_success_timestamp_seconds", &aud) > 1.7e9);
    // This process made 8 identify calls (5 + 3) before the scrape.
    assert!(m["audience_sync_delivery_latency_seconds_count"] >= 8.0);
    stop.cancel();
}

#[sqlx::test]
async fn health_and_readiness(pool: PgPool) {
    let (url, stop) = serve(state(&pool)).await;
    let get = |p: &str| reqwest::get(format!("{url}{p}"));
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 4")
        .execute(&pool)
        .await
        .unwrap();
    let r = get("/readyz").await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("[4]"));
    stop.cancel();
}

#[sqlx::test]
async fn triggers_are_off_by_default_and_need_the_bearer_token(pool: PgPool) {
    audience(&pool).await;
    let (off, stop_off) = serve(state(&pool)).await;
    let http = reqwest::Client::new();
    let path = format!("/api/audiences/{KEY}/resync");
    let r = http.post(format!("{off}{path}")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    stop_off.cancel();

    let (tx, mut rx) = tokio::sync::mpsc::channel::<TriggerRequest>(4);
    let (on, stop) = serve(OpsState {
        pool: pool.clone(),
        trigger: Some(Trigger {
            token: "trigger-s3cret".to_string().into(),
            tx,
        }),
    })
    .await;
    let r = http.post(format!("{on}{path}")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let r = http
        .post(format!("{on}{path}"))
        .bearer_auth("trigger-s3cre")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{on}/api/audiences/no_such_audience/sync"))
        .bearer_auth("trigger-s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(rx.try_recv().is_err(), "a refused request was queued");
    let r = http
        .post(format!("{on}{path}"))
        .bearer_auth("trigger-s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["mode"], "full_resync");
    let req = rx.recv().await.unwrap();
    assert_eq!((req.key.as_str(), req.mode), (KEY, Mode::FullResync));
    // The status page is read-only.
    let r = http.post(format!("{on}/")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    stop.cancel();
}

#[sqlx::test]
async fn the_status_page_renders_in_headless_chromium(pool: PgPool) {
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
        return;
    };
    scripted_runs(&pool).await;
    store_definitions(
        &pool,
        &[
            def("Order Completed Last 30days", MEMBERS_QUERY),
            def(
                "<script>alert(1)</script> Shoppers",
                "SELECT id AS user_id FROM shop_users WHERE id = 1",
            ),
        ],
    )
    .await
    .unwrap();
    let (url, stop) = serve(state(&pool)).await;
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
                &format!("{url}/"),
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium did not finish within 60 s")
    .unwrap();
    stop.cancel();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("audience-sync status"),
        "chromium rendered no page: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each audience, by key and name.
    assert!(dom.contains(&format!(r#"data-key="{KEY}""#)));
    assert!(dom.contains("Order Completed Last 30days"));
    assert!(dom.contains(r#"data-key="script_alert_1_script_shoppers""#));
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
    // Membership over time: the audience with two finished runs has a chart line.
    assert!(dom.contains("<polyline"));
    assert!(!dom.contains(TOKEN));
}
