//! Fault injection: a Wigzo mock that misbehaves on purpose, a convergence check over what it
//! received, and scenarios (destination chaos, SIGKILL of the worker at many points, Wigzo
//! down, concurrent workers) that must all converge with nothing lost.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audience_sync::audience::Audience;
use audience_sync::sync::{RunReport, Worker};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use rand::Rng;
use serde_json::Value;
use sqlx::PgPool;

use crate::support::*;

/// Per-request fault rates (each in 0..1; they add up to the total fault rate).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub server_error: f64,
    pub throttle_secs: f64,
    pub throttle_date: f64,
    pub timeout: f64,
    pub close: f64,
    pub slow_ok: f64,
    /// Users always answered 400.
    pub reject_users: HashSet<String>,
    pub unauthorized: bool,
    /// Added to every request.
    pub delay: Duration,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Call {
    pub user: String,
    pub value: bool,
    pub message_id: String,
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    faults: Mutex<Faults>,
    calls: Mutex<Vec<Call>>,
    received: AtomicU64,
    injected: AtomicU64,
    /// Requests being handled now (a handler dropped with its connection counts down too).
    active: Arc<AtomicU64>,
}

struct Active(Arc<AtomicU64>);
impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The misbehaving Wigzo.
pub struct Chaos {
    addr: SocketAddr,
    inner: Arc<Inner>,
    /// Client timeout the `timeout` fault must exceed.
    pub client_timeout: Duration,
}

impl Chaos {
    pub async fn start(faults: Faults) -> Chaos {
        let inner = Arc::new(Inner::default());
        *inner.faults.lock().unwrap() = faults;
        let app = Router::new()
            .route("/rest/v1/learn/identify", post(handle))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Chaos {
            addr,
            inner,
            client_timeout: Duration::from_millis(400),
        }
    }
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn calls(&self) -> Vec<Call> {
        self.inner.calls.lock().unwrap().clone()
    }
    pub fn received(&self) -> u64 {
        self.inner.received.load(Ordering::SeqCst)
    }
    pub fn injected(&self) -> u64 {
        self.inner.injected.load(Ordering::SeqCst)
    }
    /// Waits until no request is being handled (each has been recorded, or dropped with its
    /// connection before being applied).
    pub async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.inner.active.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "the mock never settled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn handle(State(s): State<Arc<Inner>>, headers: HeaderMap, body: String) -> Response {
    let _ = headers;
    s.active.fetch_add(1, Ordering::SeqCst);
    let _active = Active(s.active.clone());
    s.received.fetch_add(1, Ordering::SeqCst);
    let v: Value = serde_json::from_str(&body).expect("identify body is JSON");
    let key = v["context"]["personas"]["computation_key"]
        .as_str()
        .unwrap()
        .to_string();
    let user = v["userId"].as_str().unwrap().to_string();
    let value = v["traits"][&key]
        .as_bool()
        .expect("trait is a real boolean");
    let message_id = v["messageId"].as_str().unwrap().to_string();
    let f = s.faults.lock().unwrap().clone();
    if !f.delay.is_zero() {
        tokio::time::sleep(f.delay).await;
    }
    let record = |status: u16| {
        s.calls.lock().unwrap().push(Call {
            user: user.clone(),
            value,
            message_id: message_id.clone(),
            status,
        });
    };
    if f.unauthorized {
        record(401);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if f.reject_users.contains(&user) {
        record(400);
        return (StatusCode::BAD_REQUEST, "{\"error\":\"invalid user\"}").into_response();
    }
    let roll: f64 = rand::rng().random();
    let mut edge = 0.0;
    let mut hit = |p: f64| {
        edge += p;
        roll < edge
    };
    let injected = || s.injected.fetch_add(1, Ordering::SeqCst);
    if hit(f.server_error) {
        injected();
        let code = [500, 502, 503][rand::rng().random_range(0..3)];
        record(code);
        return StatusCode::from_u16(code).unwrap().into_response();
    }
    if hit(f.throttle_secs) {
        injected();
        record(429);
        return (StatusCode::TOO_MANY_REQUESTS, [("Retry-After", "0")]).into_response();
    }
    if hit(f.throttle_date) {
        injected();
        record(429);
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        return (StatusCode::TOO_MANY_REQUESTS, [("Retry-After", date)]).into_response();
    }
    if hit(f.timeout) {
        injected();
        // Processed, but answered after the client gave up: a real duplicate risk.
        tokio::time::sleep(Duration::from_millis(600)).await;
        record(200);
        return StatusCode::OK.into_response();
    }
    if hit(f.close) {
        injected();
        record(0);
        // Ends the connection without an answer.
        std::panic::resume_unwind(Box::new("chaos: closing the connection"));
    }
    if hit(f.slow_ok) {
        injected();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    record(200);
    (StatusCode::OK, "{\"status\":\"success\"}").into_response()
}

/// What Wigzo ended up with versus what the query says.
#[derive(Debug)]
pub struct Convergence {
    /// Users whose last received value differs from their membership.
    pub wrong: Vec<String>,
    /// Message ids answered 2xx more than once.
    pub duplicates: usize,
    pub calls: usize,
}

/// Per user, the value of the last call received (any answer: Wigzo may have applied it)
/// must equal membership: `true` for members; `false` or never sent otherwise.
pub fn convergence(calls: &[Call], members: &HashSet<String>) -> Convergence {
    let mut last: HashMap<&str, bool> = HashMap::new();
    let mut ok_ids: HashMap<&str, usize> = HashMap::new();
    for c in calls {
        last.insert(&c.user, c.value);
        if (200..300).contains(&c.status) {
            *ok_ids.entry(&c.message_id).or_default() += 1;
        }
    }
    let mut wrong: Vec<String> = members
        .iter()
        .filter(|m| last.get(m.as_str()) != Some(&true))
        .cloned()
        .collect();
    wrong.extend(
        last.iter()
            .filter(|(u, v)| **v && !members.contains(**u))
            .map(|(u, _)| u.to_string()),
    );
    Convergence {
        wrong,
        duplicates: ok_ids.values().filter(|n| **n > 1).map(|n| n - 1).sum(),
        calls: calls.len(),
    }
}

pub async fn members(pool: &PgPool) -> HashSet<String> {
    sqlx::query_scalar::<_, String>("SELECT id::text FROM shop_users WHERE member")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Message ids of every confirmed change (history is append-only).
async fn confirmed_ids(pool: &PgPool) -> HashSet<String> {
    sqlx::query_scalar("SELECT message_id::text FROM membership_events")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

fn chaos_config(chaos: &Chaos) -> audience_sync::config::WigzoConfig {
    let mut cfg = wigzo_config(&chaos.uri());
    cfg.concurrency = 32;
    cfg.timeout = chaos.client_timeout;
    cfg.max_attempts = 8;
    cfg.batch_size = 500;
    cfg
}

/// Users in the chaos scenario (CHAOS_USERS overrides; 20,000 by default).
/// Starts a sync of `a` in the background.
fn spawn_sync(w: &Worker, a: &Audience) -> tokio::task::JoinHandle<RunReport> {
    let (w, a) = (w.clone(), a.clone());
    tokio::spawn(async move { sync(&w, &a).await })
}

/// Waits, up to a minute, until the mock Wigzo has received `n` calls.
async fn wait_for_calls(chaos: &Chaos, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while chaos.received() < n {
        assert!(Instant::now() < deadline, "delivery never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// After a disruption: a second run succeeds and converges, every confirmation recorded
/// before the disruption is still there, all `members` are synced, and nothing is left
/// pending or running. Returns the convergence of all calls.
async fn rerun_converges(
    pool: &PgPool,
    w: &Worker,
    a: &Audience,
    chaos: &Chaos,
    confirmed_at_kill: &HashSet<String>,
    members_expected: i64,
) -> Convergence {
    let confirmed_before = scalar(pool, "SELECT count(*) FROM membership_events").await;
    let second = sync(w, a).await;
    assert!(second.succeeded(), "{second:?}");
    let c = convergence(&chaos.calls(), &members(pool).await);
    assert!(
        c.wrong.is_empty(),
        "lost: {:?}",
        &c.wrong[..c.wrong.len().min(5)]
    );
    assert!(scalar(pool, "SELECT count(*) FROM membership_events").await >= confirmed_before);
    assert!(
        !confirmed_at_kill.is_empty() && confirmed_at_kill.is_subset(&confirmed_ids(pool).await),
        "a confirmation recorded before the disruption is gone"
    );
    assert_eq!(
        scalar(pool, "SELECT count(*) FROM synced_members WHERE member").await,
        members_expected
    );
    assert_eq!(scalar(pool, "SELECT count(*) FROM outbox").await, 0);
    assert_eq!(
        scalar(pool, "SELECT count(*) FROM runs WHERE status = 'running'").await,
        0
    );
    c
}

fn scale() -> i64 {
    std::env::var("CHAOS_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

#[sqlx::test]
async fn twenty_percent_faults_over_three_churn_rounds_converge(pool: PgPool) {
    let n = scale();
    seed(&pool, n + n / 5, n).await;
    let a = audience(&pool).await;
    let chaos = Chaos::start(Faults {
        server_error: 0.10,
        throttle_secs: 0.03,
        throttle_date: 0.02,
        timeout: 0.003,
        close: 0.02,
        slow_ok: 0.027,
        ..Faults::default()
    })
    .await;
    let w = worker_with(&pool, chaos_config(&chaos));
    let mut runs = 0;
    for round in 0..4 {
        if round > 0 {
            // Churn: 2% leave, 2% join.
            sqlx::query(
                "UPDATE shop_users SET member = NOT member
                  WHERE (member AND random() < 0.02) OR (NOT member AND random() < 0.1)",
            )
            .execute(&pool)
            .await
            .unwrap();
        }
        // A change out of retries waits for the next run, as in production.
        let mut r = sync(&w, &a).await;
        runs += 1;
        while !r.succeeded() && runs < 12 {
            r = sync(&w, &a).await;
            runs += 1;
        }
        assert!(r.succeeded(), "round {round}: {r:?}");
    }
    let calls = chaos.calls();
    let c = convergence(&calls, &members(&pool).await);
    eprintln!(
        "chaos: users={n} runs={runs} calls={} faults_injected={} duplicates={} wrong={}",
        c.calls,
        chaos.injected(),
        c.duplicates,
        c.wrong.len()
    );
    assert!(
        c.wrong.is_empty(),
        "{} users diverged, e.g. {:?}",
        c.wrong.len(),
        &c.wrong[..c.wrong.len().min(5)]
    );
    assert!(
        chaos.injected() as f64 > 0.15 * c.calls as f64,
        "too few faults injected"
    );
    // Duplicates only from calls Wigzo answered after the client had timed out.
    let timeouts = calls.iter().filter(|x| x.status == 200).count() as i64
        - (c.calls as i64 - chaos.injected() as i64);
    assert!(
        c.duplicates as i64 <= timeouts.max(0) + 1,
        "duplicates {} timeouts {timeouts}",
        c.duplicates
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM outbox").await,
        0,
        "changes left undelivered"
    );
}

#[sqlx::test]
async fn a_429_never_uses_up_the_attempt_budget(pool: PgPool) {
    seed(&pool, 40, 40).await;
    let a = audience(&pool).await;
    let chaos = Chaos::start(Faults {
        throttle_secs: 0.5,
        ..Faults::default()
    })
    .await;
    let mut cfg = chaos_config(&chaos);
    cfg.max_attempts = 1;
    let r = sync(&worker_with(&pool, cfg), &a).await;
    assert!(r.succeeded(), "{r:?}");
    assert!(chaos.injected() > 5);
    assert!(
        convergence(&chaos.calls(), &members(&pool).await)
            .wrong
            .is_empty()
    );
}

#[sqlx::test]
async fn three_workers_racing_on_a_healthy_destination_deliver_each_change_once(pool: PgPool) {
    seed(&pool, 3000, 2000).await;
    let a = audience(&pool).await;
    let chaos = Chaos::start(Faults::default()).await;
    let ws: Vec<_> = (0..3)
        .map(|_| worker_with(&pool, chaos_config(&chaos)))
        .collect();
    let (r1, r2, r3) = tokio::join!(sync(&ws[0], &a), sync(&ws[1], &a), sync(&ws[2], &a));
    assert_eq!([&r1, &r2, &r3].iter().filter(|r| r.succeeded()).count(), 1);
    // Whoever lost the race syncs again afterwards: nothing left to send.
    let again = sync(&ws[1], &a).await;
    assert!(again.succeeded() && again.sent == 0, "{again:?}");
    let calls = chaos.calls();
    let c = convergence(&calls, &members(&pool).await);
    assert!(c.wrong.is_empty());
    assert_eq!(calls.len(), 2000, "a change was delivered twice");
}

/// The binary, killed with SIGKILL at chosen points, then rerun: converges, and the extra
/// deliveries per crash are at most the calls that were in flight.
#[sqlx::test]
async fn sigkill_at_many_points_then_rerun_converges(pool: PgPool) {
    seed(&pool, 2500, 2000).await;
    let chaos = Chaos::start(Faults {
        delay: Duration::from_millis(15),
        ..Faults::default()
    })
    .await;
    let concurrency = 8;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("a.toml");
    // The query sleeps a little per row so a kill can land during capture.
    std::fs::write(
        &config,
        format!(
            "[wigzo]\nconcurrency = {concurrency}\nrequests_per_second = 0\nbatch_size = 200\n\
             [[audience]]\nname = \"Order Completed Last 30days\"\n\
             query = \"SELECT id AS user_id, email, phone FROM shop_users WHERE member AND (id <> 7 OR pg_sleep(0.4) IS NOT NULL)\"\n"
        ),
    )
    .unwrap();
    let db = db_url(&pool);
    let spawn = || {
        // tokio's process API: a blocking wait would stall the mock on this test's runtime.
        tokio::process::Command::new(env!("CARGO_BIN_EXE_audience-sync"))
            .args(["--config", config.to_str().unwrap(), "sync", "--json"])
            .env("DATABASE_URL", &db)
            .env("WIGZO_ORG_TOKEN", TOKEN)
            .env("WIGZO_BASE_URL", chaos.uri())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut kills = 0;
    // Kill points: during capture (inside the query), just after capture (diff into the
    // outbox), then after this many calls received: early, middle and late in delivery, each
    // with calls answered 2xx whose confirmation is not yet written.
    let mut crash_points: Vec<Option<u64>> = vec![
        None,
        Some(0),
        Some(1),
        Some(50),
        Some(300),
        Some(700),
        Some(1000),
        Some(1300),
        Some(1600),
        Some(1900),
    ];
    let mut churned = false;
    // Calls Wigzo answered 2xx whose confirmation was not yet written when a kill landed:
    // the only calls a rerun may legitimately send again.
    let mut at_risk: HashSet<String> = HashSet::new();
    let mut at_risk_calls = 0usize;
    while let Some(point) = crash_points.first().cloned() {
        crash_points.remove(0);
        let before = chaos.received();
        let mut child = spawn();
        let deadline = Instant::now() + Duration::from_secs(60);
        match point {
            None => tokio::time::sleep(Duration::from_millis(150)).await, // inside pg_sleep: capture
            Some(0) => tokio::time::sleep(Duration::from_millis(420)).await, // capture done: diff
            Some(n) => {
                // n counts calls over all runs: early, middle and late in the delivery.
                while chaos.received() < n.max(before + 1)
                    && Instant::now() < deadline
                    && child.try_wait().unwrap().is_none()
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        child.kill().await.unwrap(); // SIGKILL, then reaped
        kills += 1;
        // Calls the dead process had in flight are recorded (or dropped) before we look.
        chaos.settle().await;
        let confirmed: HashSet<String> =
            sqlx::query_scalar("SELECT message_id::text FROM membership_events")
                .fetch_all(&pool)
                .await
                .unwrap()
                .into_iter()
                .collect();
        for c in chaos.calls() {
            if (200..300).contains(&c.status)
                && !confirmed.contains(&c.message_id)
                && at_risk.insert(c.message_id.clone())
            {
                at_risk_calls += 1;
            }
        }
        if kills == 5 && !churned {
            // Membership moves while crashes keep happening.
            set_members(&pool, &(1..=100).collect::<Vec<_>>(), false).await;
            set_members(&pool, &(2001..=2100).collect::<Vec<_>>(), true).await;
            churned = true;
        }
    }
    let out = spawn().wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let calls = chaos.calls();
    let c = convergence(&calls, &members(&pool).await);
    eprintln!(
        "sigkill: kills={kills} calls={} in_flight_at_kills={at_risk_calls} duplicates={} wrong={}",
        c.calls,
        c.duplicates,
        c.wrong.len()
    );
    assert!(
        c.wrong.is_empty(),
        "lost changes: {:?}",
        &c.wrong[..c.wrong.len().min(5)]
    );
    // Every duplicate is a call that was answered but not yet confirmed when a kill landed.
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for x in calls.iter().filter(|x| (200..300).contains(&x.status)) {
        *seen.entry(&x.message_id).or_default() += 1;
    }
    let stray: Vec<&&str> = seen
        .iter()
        .filter(|(id, n)| **n > 1 && !at_risk.contains(**id))
        .map(|(id, _)| id)
        .collect();
    assert!(stray.is_empty(), "sent twice though confirmed: {stray:?}");
    assert!(
        c.duplicates <= at_risk_calls,
        "duplicates {} > calls in flight at the kills {at_risk_calls}",
        c.duplicates
    );
    assert_eq!(scalar(&pool, "SELECT count(*) FROM outbox").await, 0);
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM runs WHERE status = 'running'").await,
        0
    );
}

/// Every database connection of the worker is terminated mid-delivery (as a PostgreSQL
/// restart or failover would): the run ends cleanly with an error or finishes, nothing
/// confirmed is lost, and the next run converges.
#[sqlx::test]
async fn connections_terminated_mid_delivery_lose_nothing(pool: PgPool) {
    seed(&pool, 2500, 2000).await;
    let a = audience(&pool).await;
    let chaos = Chaos::start(Faults {
        delay: Duration::from_millis(40),
        ..Faults::default()
    })
    .await;
    let w = worker_with(&pool, chaos_config(&chaos));
    let run = spawn_sync(&w, &a);
    wait_for_calls(&chaos, 400).await;
    let confirmed_at_kill = confirmed_ids(&pool).await;
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(terminated >= 2, "the lock connection and a pool connection");
    let first = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run hung after its connections were terminated")
        .expect("the run panicked");
    // The run lost its audience lock with its session: it must stop, not deliver on
    // unguarded, and say why.
    assert!(!first.succeeded(), "{first:?}");
    let error = first.error.clone().unwrap();
    assert!(
        error.contains("lost the lock") || error.contains("connection"),
        "{error}"
    );
    let c = rerun_converges(&pool, &w, &a, &chaos, &confirmed_at_kill, 2000).await;
    eprintln!(
        "terminate: first={} ({}) sent_first={} calls={} duplicates={} wrong={}",
        first.status,
        error,
        first.sent,
        c.calls,
        c.duplicates,
        c.wrong.len()
    );
}

/// Only the worker's pooled connections (not the run's lock session) are terminated, again
/// and again, while changes are being confirmed: a statement cut off mid-flight must neither
/// lose a confirmation nor let delivery run on blind (sending everything without recording
/// it). The run finishes or stops with a clear error; the next run converges.
#[sqlx::test]
async fn pool_connections_terminated_while_confirming_lose_nothing(pool: PgPool) {
    seed(&pool, 2500, 2000).await;
    let a = audience(&pool).await;
    let chaos = Chaos::start(Faults {
        delay: Duration::from_millis(20),
        ..Faults::default()
    })
    .await;
    let w = worker_with(&pool, chaos_config(&chaos));
    let run = spawn_sync(&w, &a);
    wait_for_calls(&chaos, 300).await;
    let confirmed_at_kill = confirmed_ids(&pool).await;
    // Every backend of this database but ours and the one holding the audience lock.
    let mut terminated = 0i64;
    let until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < until && !run.is_finished() {
        terminated += sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a
              WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
                AND NOT EXISTS (SELECT 1 FROM pg_locks l
                                 WHERE l.pid = a.pid AND l.locktype = 'advisory')) t",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert!(terminated > 0);
    let first = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run hung after its connections were terminated")
        .expect("the run panicked");
    if !first.succeeded() {
        let e = first.error.as_deref().unwrap();
        assert!(e.contains("database") || e.contains("connection"), "{e}");
    }
    let calls_first = chaos.calls().len();
    let c = rerun_converges(&pool, &w, &a, &chaos, &confirmed_at_kill, 2000).await;
    eprintln!(
        "terminate-pool: terminated={terminated} first={} ({}) calls_first={calls_first} calls={} duplicates={} wrong={}",
        first.status,
        first.error.as_deref().unwrap_or(""),
        c.calls,
        c.duplicates,
        c.wrong.len()
    );
    // A dropped statement costs at most the calls in flight, not a blind resend of all.
    assert!(c.duplicates <= 64, "{} duplicates", c.duplicates);
}

/// No database transaction is held while a call is in flight: sampled throughout delivery,
/// no backend of the database sits `idle in transaction` (what a transaction kept open
/// across an HTTP call looks like while the call waits).
#[sqlx::test]
async fn no_transaction_is_open_while_calls_are_in_flight(pool: PgPool) {
    seed(&pool, 1200, 1000).await;
    let a = audience(&pool).await;
    let chaos = Chaos::start(Faults {
        delay: Duration::from_millis(60),
        ..Faults::default()
    })
    .await;
    let w = worker_with(&pool, chaos_config(&chaos));
    let run = spawn_sync(&w, &a);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut samples = 0;
    while !run.is_finished() {
        assert!(Instant::now() < deadline, "the run hung");
        let before = chaos.received();
        let idle_in_tx: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE state LIKE 'idle in transaction%')
               FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let after = chaos.received();
        // Only samples taken while calls were being made count (not capture or diff).
        if before > 0 && after > before && after < 1000 {
            samples += 1;
            assert_eq!(
                idle_in_tx, 0,
                "a transaction is open while calls are in flight"
            );
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let r = run.await.unwrap();
    assert!(r.succeeded(), "{r:?}");
    assert!(samples >= 10, "only {samples} samples during delivery");
}
