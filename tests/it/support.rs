//! Shared fixtures: a seeded source table, audiences, a worker pointed at a mock Wigzo, and
//! readers for what the mock received.

use std::collections::HashMap;
use std::time::Duration;

use audience_sync::audience::{Audience, AudienceDef, store_definitions};
use audience_sync::config::WigzoConfig;
use audience_sync::sync::{Mode, RunReport, Worker};
use audience_sync::wigzo::WigzoClient;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

pub const TOKEN: &str = "org-TOKEN-s3cr3t-42";
pub const KEY: &str = "order_completed_last_30days";

/// Creates `shop_users(id, email, phone, member)` with users 1..=n, members where `id <= m`.
pub async fn seed(pool: &PgPool, n: i64, m: i64) {
    sqlx::query(
        "CREATE TABLE shop_users (id bigint PRIMARY KEY, email text, phone text, member bool NOT NULL)",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO shop_users SELECT i, 'u' || i || '@example.com', '+1555' || i, i <= $2
           FROM generate_series(1, $1) i",
    )
    .bind(n)
    .bind(m)
    .execute(pool)
    .await
    .unwrap();
}

pub async fn set_members(pool: &PgPool, ids: &[i64], member: bool) {
    sqlx::query("UPDATE shop_users SET member = $2 WHERE id = ANY($1)")
        .bind(ids)
        .bind(member)
        .execute(pool)
        .await
        .unwrap();
}

/// The URL of the test's own database, for the binary.
pub fn db_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let db = pool.connect_options().get_database().unwrap().to_string();
    let mut url = reqwest::Url::parse(&base).unwrap();
    url.set_path(&db);
    url.to_string()
}

pub fn def(name: &str, query: &str) -> AudienceDef {
    AudienceDef {
        key: audience_sync::audience::derive_key(name).unwrap(),
        kind: audience_sync::audience::Kind::Audience,
        on_missing: audience_sync::audience::OnMissing::Null,
        name: name.into(),
        schedule: "0 0 */3 * * *".into(),
        query: query.into(),
        source_url: None,
        enabled: true,
        guard: audience_sync::guard::Guard::default(),
    }
}

/// A computed trait over `query` (which returns `user_id` and `value`).
pub fn trait_def(name: &str, query: &str) -> AudienceDef {
    AudienceDef {
        kind: audience_sync::audience::Kind::Trait,
        ..def(name, query)
    }
}

pub const MEMBERS_QUERY: &str = "SELECT id AS user_id, email, phone FROM shop_users WHERE member";

/// The standard audience over `shop_users`.
pub async fn audience(pool: &PgPool) -> Audience {
    store_definitions(pool, &[def("Order Completed Last 30days", MEMBERS_QUERY)])
        .await
        .unwrap()
        .remove(0)
}

pub fn wigzo_config(base_url: &str) -> WigzoConfig {
    let mut w = WigzoConfig::new(base_url, TOKEN);
    w.requests_per_second = 0;
    w.retry_base = Duration::from_millis(10);
    w.retry_max = Duration::from_millis(50);
    w.timeout = Duration::from_secs(5);
    w.batch_size = 100;
    w
}

pub fn worker_with(pool: &PgPool, w: WigzoConfig) -> Worker {
    Worker {
        pool: pool.clone(),
        connect: (*pool.connect_options()).clone(),
        client: WigzoClient::new(&w).unwrap(),
        wigzo: w,
        statement_timeout: Duration::from_secs(5),
        owner: audience_sync::sync::owner_id(),
        cancel: CancellationToken::new(),
        progress: false,
    }
}

pub fn worker(pool: &PgPool, server: &MockServer) -> Worker {
    worker_with(pool, wigzo_config(&server.uri()))
}

/// A mock Wigzo that answers 200 to every identify call.
pub async fn wigzo_ok() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/rest/v1/learn/identify"))
        .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"status":"success"}"#))
        .mount(&server)
        .await;
    server
}

pub async fn sync(w: &Worker, a: &Audience) -> RunReport {
    w.run(a, Mode::Sync, false).await
}

/// A mock Wigzo that answers every call with `status`.
pub async fn wigzo_answering(status: u16) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(status))
        .mount(&server)
        .await;
    server
}

/// A mock Wigzo that confirms every call after `delay_ms`.
pub async fn slow_wigzo(delay_ms: u64) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(delay_ms)))
        .mount(&server)
        .await;
    server
}

/// A mock Wigzo that answers `first` to the calls it picks (only `user`'s when set, at most
/// `times` of them when set) and `then` to every other call.
pub async fn wigzo_first(
    user: Option<&str>,
    first: ResponseTemplate,
    times: Option<u64>,
    then: ResponseTemplate,
) -> MockServer {
    let server = MockServer::start().await;
    let mut picked = Mock::given(method("POST"));
    if let Some(user) = user {
        picked = picked.and(wiremock::matchers::body_partial_json(
            serde_json::json!({ "userId": user }),
        ));
    }
    let mut picked = picked.respond_with(first).with_priority(1);
    if let Some(n) = times {
        picked = picked.up_to_n_times(n);
    }
    picked.mount(&server).await;
    Mock::given(method("POST"))
        .respond_with(then)
        .with_priority(2)
        .mount(&server)
        .await;
    server
}

/// Bodies of every identify call received, in arrival order.
pub async fn calls(server: &MockServer) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

/// Calls received as user id -> trait value (the last call per user wins).
pub async fn last_values(server: &MockServer, key: &str) -> HashMap<String, bool> {
    calls(server)
        .await
        .iter()
        .map(|c| {
            (
                c["userId"].as_str().unwrap().to_string(),
                c["traits"][key].as_bool().unwrap(),
            )
        })
        .collect()
}

pub fn ids(range: std::ops::RangeInclusive<i64>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

pub fn sorted_users(calls: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = calls
        .iter()
        .map(|c| c["userId"].as_str().unwrap().to_string())
        .collect();
    v.sort_by_key(|s| s.parse::<i64>().unwrap_or(i64::MAX));
    v
}

/// An HTTP client for talking to the daemon's ops server, with the process's one TLS crypto
/// provider installed (reqwest has none of its own).
pub fn http() -> reqwest::Client {
    audience_sync::wigzo::install_crypto_provider();
    reqwest::Client::new()
}

/// `GET url` with [`http`].
pub async fn http_get(url: String) -> reqwest::Result<reqwest::Response> {
    http().get(url).send().await
}

pub async fn scalar(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}
