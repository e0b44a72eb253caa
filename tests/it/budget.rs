//! One destination budget per process: concurrent runs share the rate limit and the 429
//! pause of their organization token.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;
use audience_sync::audience::store_definitions;
use sqlx::PgPool;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// Answers 200, or 429 with `Retry-After: 2` to the first call of audience `throttle.0` that
/// arrives once audience `throttle.1` has sent one (both runs are then sending), and records
/// when each call arrived.
#[derive(Clone, Default)]
pub struct Recorder {
    pub arrivals: Arc<Mutex<Vec<(Instant, String, String)>>>,
    pub throttle: Option<(&'static str, &'static str)>,
    pub throttled_at: Arc<Mutex<Option<Instant>>>,
}

impl Respond for Recorder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        let key = body["context"]["personas"]["computation_key"]
            .as_str()
            .unwrap()
            .to_string();
        let user = body["userId"].as_str().unwrap().to_string();
        let now = Instant::now();
        let mut arrivals = self.arrivals.lock().unwrap();
        arrivals.push((now, key.clone(), user));
        if let Some((k, other)) = self.throttle {
            let mut at = self.throttled_at.lock().unwrap();
            if at.is_none() && k == key && arrivals.iter().any(|(_, o, _)| o == other) {
                *at = Some(now);
                return ResponseTemplate::new(429).insert_header("Retry-After", "2");
            }
        }
        ResponseTemplate::new(200).set_delay(Duration::from_millis(5))
    }
}

impl Recorder {
    /// Calls (of audience `key`, or of any) that arrived from `from` after the 429 until `to`
    /// after it (`None`: the end).
    pub fn after_429(&self, key: Option<&str>, from: Duration, to: Option<Duration>) -> usize {
        let t = self.throttled_at.lock().unwrap().expect("the 429 was sent");
        self.arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, k, _)| {
                key.is_none_or(|key| key == k)
                    && *at >= t + from
                    && to.is_none_or(|to| *at < t + to)
            })
            .count()
    }
}

pub async fn mock(r: &Recorder) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(wiremock::matchers::method("POST"))
        .respond_with(r.clone())
        .mount(&server)
        .await;
    server
}

/// Two audiences over `shop_users` (ids 1..=n): odd ids and even ids.
async fn two_audiences(pool: &PgPool, n: i64) -> Vec<audience_sync::audience::Audience> {
    seed(pool, n, n).await;
    store_definitions(
        pool,
        &[
            def(
                "Odd",
                "SELECT id AS user_id FROM shop_users WHERE id % 2 = 1",
            ),
            def(
                "Even",
                "SELECT id AS user_id FROM shop_users WHERE id % 2 = 0",
            ),
        ],
    )
    .await
    .unwrap()
}

#[sqlx::test]
async fn two_runs_in_one_process_share_requests_per_second(pool: PgPool) {
    let auds = two_audiences(&pool, 700).await;
    let rec = Recorder::default();
    let server = mock(&rec).await;
    let mut cfg = wigzo_config(&server.uri());
    cfg.requests_per_second = 100;
    cfg.concurrency = 8;
    let w = worker_with(&pool, cfg);
    let (a, b) = tokio::join!(sync(&w, &auds[0]), sync(&w, &auds[1]));
    assert!(a.succeeded() && b.succeeded(), "{a:?} {b:?}");
    let at = sorted_arrivals(&rec);
    assert_eq!(at.len(), 700);
    // Both runs sent all along (the budget is shared, not taken in turns).
    let arrivals = rec.arrivals.lock().unwrap().clone();
    let first_half_end = at[0] + Duration::from_secs(3);
    for key in ["odd", "even"] {
        assert!(
            arrivals
                .iter()
                .any(|(t, k, _)| k == key && *t < first_half_end),
            "{key} waited for the other run"
        );
    }
    // Any 5 s window: at most 110 calls/s (10% over 100). Two budgets would allow 200.
    let most = most_in_5s(&at);
    assert!(most <= 550, "{most} calls in a 5 s window");
    let span = at[at.len() - 1] - at[0];
    assert!(span >= Duration::from_secs(6), "700 calls in {span:?}");
}

#[sqlx::test]
async fn a_429_seen_by_one_run_pauses_every_run_of_the_process(pool: PgPool) {
    let auds = two_audiences(&pool, 600).await;
    let rec = Recorder {
        throttle: Some(("odd", "even")),
        ..Recorder::default()
    };
    let server = mock(&rec).await;
    let mut cfg = wigzo_config(&server.uri());
    cfg.concurrency = 4;
    let w = worker_with(&pool, cfg);
    let (a, b) = tokio::join!(sync(&w, &auds[0]), sync(&w, &auds[1]));
    assert!(a.succeeded() && b.succeeded(), "{a:?} {b:?}");
    let t = rec.throttled_at.lock().unwrap().expect("the 429 was sent");
    let arrivals = rec.arrivals.lock().unwrap().clone();
    // Calls already on their way when the 429 was answered arrive just after it; then
    // nothing, from either run, until Retry-After has passed.
    let ms = Duration::from_millis;
    let quiet = rec.after_429(None, ms(300), Some(ms(1900)));
    assert_eq!(quiet, 0, "calls made during the 2 s pause");
    let even_after = rec.after_429(Some("even"), ms(2000), None);
    assert!(
        even_after > 0,
        "the other run had calls left after the pause"
    );
    let even_before = arrivals
        .iter()
        .filter(|(at, k, _)| k == "even" && *at < t)
        .count();
    assert!(
        even_before > 0,
        "the other run was sending when the 429 came"
    );
}

/// When each call arrived, in order.
pub fn sorted_arrivals(rec: &Recorder) -> Vec<Instant> {
    let mut at: Vec<Instant> = rec.arrivals.lock().unwrap().iter().map(|a| a.0).collect();
    at.sort();
    at
}

/// The most calls that arrived within any 5 s window.
pub fn most_in_5s(at: &[Instant]) -> usize {
    let window = Duration::from_secs(5);
    (0..at.len())
        .map(|i| at[i..].iter().take_while(|t| **t < at[i] + window).count())
        .max()
        .unwrap_or(0)
}
