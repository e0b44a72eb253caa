//! The Guarantees at their edges: each test attacks one promise the way an unlucky network,
//! a hurried operator or a misconfigured destination would (flip-flops while unconfirmed,
//! interrupted resyncs, redirects, wrong endpoints, long throttling, a lock session that
//! stops answering, endless error bodies).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use audience_sync::sync::Mode;
use serde_json::Value;
use sqlx::PgPool;
use wiremock::matchers::{any, body_partial_json, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn message_ids(calls: &[Value]) -> Vec<String> {
    calls
        .iter()
        .map(|c| c["messageId"].as_str().unwrap().to_string())
        .collect()
}

#[sqlx::test]
async fn each_message_id_names_one_change_through_unconfirmed_flip_flops(pool: PgPool) {
    // Users 1 and 2 are members; user 1 flips (user 2 stays, so the audience never empties).
    seed(&pool, 3, 2).await;
    let a = audience(&pool).await;
    // v1: user 1 enters, confirmed.
    let ok = wigzo_ok().await;
    assert!(sync(&worker(&pool, &ok), &a).await.succeeded());
    let user1: Vec<Value> = calls(&ok)
        .await
        .into_iter()
        .filter(|c| c["userId"] == "1")
        .collect();
    let confirmed = message_ids(&user1);

    // Wigzo fails every call: each flip is a new change, sent twice and never confirmed.
    let down = wigzo_answering(503).await;
    let mut cfg = wigzo_config(&down.uri());
    cfg.max_attempts = 2;
    let w = worker_with(&pool, cfg);
    for member in [false, true, false] {
        set_members(&pool, &[1], member).await;
        let r = sync(&w, &a).await;
        assert_eq!((r.status.as_str(), r.sent), ("failed", 0), "{r:?}");
    }
    let sent = calls(&down).await;
    assert_eq!(sent.len(), 6, "three changes, two attempts each");
    let values: Vec<bool> = sent
        .iter()
        .map(|c| c["traits"][KEY].as_bool().unwrap())
        .collect();
    assert_eq!(values, [false, false, true, true, false, false]);
    let ids = message_ids(&sent);
    for pair in ids.chunks(2) {
        assert_eq!(pair[0], pair[1], "a retry carries its change's messageId");
    }
    let changes: Vec<&String> = std::iter::once(&confirmed[0])
        .chain(ids.iter().step_by(2))
        .collect();
    let distinct: HashSet<&&String> = changes.iter().collect();
    assert_eq!(
        distinct.len(),
        4,
        "four changes, four messageIds: {changes:?}"
    );

    // Wigzo back: the owed change (the last `false`) goes with its own id, and is confirmed.
    let back = wigzo_ok().await;
    assert!(sync(&worker(&pool, &back), &a).await.succeeded());
    let last = calls(&back).await;
    assert_eq!(last.len(), 1);
    assert_eq!(last[0]["traits"][KEY], false);
    assert_eq!(message_ids(&last)[0], ids[4]);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM synced_members WHERE NOT member"
        )
        .await,
        1
    );
}

#[sqlx::test]
async fn a_changed_email_is_a_new_change_with_its_own_message_id(pool: PgPool) {
    // User 1 enters; the call times out (Wigzo may have applied it). Before the retry, the
    // user's email changes: the next call must not reuse the first call's messageId, or a
    // destination that drops repeated ids keeps the old email while we record the new one.
    seed(&pool, 2, 2).await;
    let a = audience(&pool).await;
    let down = wigzo_answering(503).await;
    let mut cfg = wigzo_config(&down.uri());
    cfg.max_attempts = 1;
    assert_eq!(
        sync(&worker_with(&pool, cfg), &a).await.status.as_str(),
        "failed"
    );
    let first = calls(&down).await;
    let first_id = first.iter().find(|c| c["userId"] == "1").unwrap()["messageId"].clone();
    sqlx::query("UPDATE shop_users SET email = 'new@example.com' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    // The dry run's sample shows the id the real run will send.
    let ok = wigzo_ok().await;
    let w = worker(&pool, &ok);
    let preview = w.run(&a, audience_sync::sync::Mode::Sync, true).await;
    let sampled = preview.sample.iter().find(|c| c["userId"] == "1").unwrap()["messageId"].clone();
    assert!(sync(&w, &a).await.succeeded());
    let second = calls(&ok).await;
    let again = second.iter().find(|c| c["userId"] == "1").unwrap();
    assert_eq!(again["email"], "new@example.com");
    assert_ne!(
        again["messageId"], first_id,
        "a new payload reused a messageId"
    );
    assert_eq!(again["messageId"], sampled, "the dry run showed another id");
    // User 2's change did not change: its retry keeps its id.
    let id2 =
        |calls: &[Value]| calls.iter().find(|c| c["userId"] == "2").unwrap()["messageId"].clone();
    assert_eq!(id2(&second), id2(&first));
}

#[sqlx::test]
async fn an_interrupted_full_resync_is_finished_as_a_full_resync(pool: PgPool) {
    seed(&pool, 49, 49).await;
    let a = audience(&pool).await;
    assert!(
        sync(&worker(&pool, &wigzo_ok().await), &a)
            .await
            .succeeded()
    );

    // The resync: Wigzo confirms one call, then refuses the token.
    let server = wigzo_first(
        None,
        ResponseTemplate::new(200),
        Some(1),
        ResponseTemplate::new(401),
    )
    .await;
    let mut cfg = wigzo_config(&server.uri());
    cfg.concurrency = 1;
    let r = worker_with(&pool, cfg)
        .run(&a, Mode::FullResync, false)
        .await;
    assert_eq!(
        (r.kind.as_str(), r.status.as_str(), r.sent),
        ("full_resync", "failed", 1),
        "{r:?}"
    );

    // Whatever comes next (here a plain `sync`) finishes it as a full resync: every member
    // is sent again, and the run says what it was.
    let ok = wigzo_ok().await;
    let w = worker(&pool, &ok);
    let r = sync(&w, &a).await;
    assert_eq!(
        (r.kind.as_str(), r.status.as_str()),
        ("full_resync", "succeeded"),
        "{r:?}"
    );
    assert_eq!(sorted_users(&calls(&ok).await), ids(1..=49));
    assert_eq!(
        last_values(&ok, KEY).await.values().filter(|v| **v).count(),
        49
    );
    // Done: the next run is an ordinary incremental one with nothing to send.
    let r = sync(&w, &a).await;
    assert_eq!(
        (r.kind.as_str(), r.status.as_str(), r.sent),
        ("incremental", "succeeded", 0),
        "{r:?}"
    );
}

#[sqlx::test]
async fn a_redirect_is_never_followed_and_confirms_nothing(pool: PgPool) {
    seed(&pool, 50, 50).await;
    let a = audience(&pool).await;
    // Where the redirect points: it would answer 200 to anything.
    let elsewhere = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .mount(&elsewhere)
        .await;
    let location = format!(
        "http://localhost:{}/rest/v1/learn/identify",
        elsewhere.address().port()
    );
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(301).insert_header("Location", location.as_str()))
        .mount(&server)
        .await;
    let r = sync(&worker(&pool, &server), &a).await;
    assert_eq!((r.status.as_str(), r.sent), ("failed", 0), "{r:?}");
    let err = r.error.unwrap();
    assert!(
        err.contains("redirect") && err.contains("301") && err.contains("host localhost"),
        "{err}"
    );
    assert!(err.contains("base_url") && !err.contains(TOKEN), "{err}");
    assert!(
        elsewhere.received_requests().await.unwrap().is_empty(),
        "the redirect was followed"
    );
    assert!(
        calls(&server).await.len() <= 16,
        "the run did not stop at once"
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM synced_members").await,
        0
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM outbox WHERE status = 'pending' AND lease_owner IS NULL"
        )
        .await,
        50
    );
}

#[sqlx::test]
async fn a_wrong_endpoint_stops_the_run_instead_of_rejecting_every_change(pool: PgPool) {
    seed(&pool, 200, 200).await;
    let a = audience(&pool).await;
    let server = wigzo_answering(404).await;
    let r = sync(&worker(&pool, &server), &a).await;
    assert_eq!(
        (r.status.as_str(), r.sent, r.failed),
        ("failed", 0, 0),
        "{r:?}"
    );
    let err = r.error.unwrap();
    assert!(err.contains("404") && err.contains("base_url"), "{err}");
    let n = calls(&server).await.len();
    assert!((20..=60).contains(&n), "{n} calls to a wrong endpoint");
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM outbox WHERE status = 'pending'"
        )
        .await,
        200,
        "the endpoint's 404s must not reject users"
    );

    // One real 404 among confirmations is that user's: rejected, the rest delivered.
    let server = wigzo_first(
        Some("7"),
        ResponseTemplate::new(404),
        None,
        ResponseTemplate::new(200),
    )
    .await;
    let r = sync(&worker(&pool, &server), &a).await;
    assert_eq!(
        (r.status.as_str(), r.sent, r.rejected),
        ("partial", 199, 1),
        "{r:?}"
    );

    // A wrong endpoint again, with 60 changes owed: the halt re-queues only its own 404s, and
    // user 7's earlier, genuine rejection stays held.
    let gone: Vec<i64> = (101..=160).collect();
    set_members(&pool, &gone, false).await;
    let r = sync(&worker(&pool, &wigzo_answering(404).await), &a).await;
    assert_eq!((r.status.as_str(), r.rejected), ("failed", 0), "{r:?}");
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM outbox WHERE status = 'rejected'"
        )
        .await,
        1,
        "only user 7 stays rejected"
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM outbox WHERE status = 'rejected' AND user_id = '7'"
        )
        .await,
        1
    );
}

#[sqlx::test]
async fn throttles_are_stored_apart_from_attempts(pool: PgPool) {
    seed(&pool, 1, 1).await;
    let a = audience(&pool).await;
    let server = wigzo_first(
        None,
        ResponseTemplate::new(429).insert_header("Retry-After", "0"),
        Some(3),
        ResponseTemplate::new(500),
    )
    .await;
    let mut cfg = wigzo_config(&server.uri());
    cfg.max_attempts = 2;
    let r = sync(&worker_with(&pool, cfg), &a).await;
    assert_eq!(r.status.as_str(), "failed", "{r:?}");
    assert_eq!(calls(&server).await.len(), 5);
    let (attempts, throttles): (i32, i32) =
        sqlx::query_as("SELECT attempts, throttles FROM outbox WHERE user_id = '1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((attempts, throttles), (2, 3));
}

#[sqlx::test]
async fn a_run_never_claims_its_own_changes_again_while_throttled_past_the_lease(pool: PgPool) {
    seed(&pool, 10, 10).await;
    let a = audience(&pool).await;
    let server = MockServer::start().await;
    // User 1 is throttled, then told to come back later, for about five seconds in all; the
    // lease is one second. The others take half a second each, so the claim loop reaches its
    // second pass (which claims expired leases) while user 1 is still being worked on.
    let user1 = || body_partial_json(serde_json::json!({"userId": "1"}));
    Mock::given(method("POST"))
        .and(user1())
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(user1())
        .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", "1"))
        .up_to_n_times(4)
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(500)))
        .with_priority(3)
        .mount(&server)
        .await;
    let mut cfg = wigzo_config(&server.uri());
    cfg.batch_size = 1;
    cfg.concurrency = 2;
    cfg.max_attempts = 10;
    cfg.lease = Duration::from_secs(1);
    let r = sync(&worker_with(&pool, cfg), &a).await;
    assert!(r.succeeded(), "{r:?}");
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for c in calls(&server).await {
        *per_user
            .entry(c["userId"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(
        per_user.get("1"),
        Some(&6),
        "one 429, four 503s, then one 200: {per_user:?}"
    );
    for u in 2..=10 {
        assert_eq!(
            per_user.get(&u.to_string()),
            Some(&1),
            "user {u} sent twice: {per_user:?}"
        );
    }
}

#[sqlx::test]
async fn a_run_records_its_end_before_it_releases_the_audience(pool: PgPool) {
    seed(&pool, 5, 5).await;
    let a = audience(&pool).await;
    // Every final write of a run checks, a moment later, that the audience's lock is still
    // held: if the lock went first, another replica could take it and see the run `running`.
    sqlx::raw_sql(
        "CREATE TABLE lock_gaps (run_id bigint);
         CREATE FUNCTION check_lock() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_sleep(0.3);
             IF NOT EXISTS (SELECT 1 FROM pg_locks
                             WHERE locktype = 'advisory' AND granted
                               AND objid = NEW.audience_id AND objsubid = 2) THEN
                 INSERT INTO lock_gaps VALUES (NEW.id);
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER runs_end BEFORE UPDATE OF status ON runs
            FOR EACH ROW WHEN (NEW.status <> 'running') EXECUTE FUNCTION check_lock();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let w = worker(&pool, &wigzo_ok().await);
    assert!(sync(&w, &a).await.succeeded());
    // A failed run too (its query fails).
    sqlx::query("ALTER TABLE shop_users RENAME TO gone")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(sync(&w, &a).await.status.as_str(), "failed");
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM runs WHERE status <> 'running'").await,
        2
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM lock_gaps").await,
        0,
        "a run's lock was released before its final status was written"
    );
}

#[sqlx::test]
async fn a_lock_session_that_stops_answering_stops_the_run(pool: PgPool) {
    seed(&pool, 200, 200).await;
    let a = audience(&pool).await;
    // Wigzo answers slowly, so delivery lasts long enough to lose the lock session.
    let server = slow_wigzo(200).await;
    // The run's own connection (lock, capture) goes through a proxy we can freeze: a
    // half-open connection, as after a network partition.
    let proxy = FreezableProxy::start().await;
    let mut w = worker(&pool, &server);
    w.wigzo.concurrency = 1;
    w.connect = w.connect.clone().host("127.0.0.1").port(proxy.port);
    let run = tokio::spawn({
        let w = w.clone();
        let a = a.clone();
        async move { sync(&w, &a).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while calls(&server).await.len() < 3 {
        assert!(Instant::now() < deadline, "delivery never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.freeze();
    let frozen_at = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run hung on a lock session that does not answer")
        .unwrap();
    assert!(
        frozen_at.elapsed() < Duration::from_secs(15),
        "{:?}",
        frozen_at.elapsed()
    );
    assert_eq!(r.status.as_str(), "failed", "{r:?}");
    assert!(
        r.error.as_deref().unwrap().contains("lost the lock"),
        "{r:?}"
    );
    assert!(r.sent < 200, "{r:?}");
    proxy.close();
    // The frozen session ends once its socket closes; then its lock is free again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while scalar(
        &pool,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
    )
    .await
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "the frozen session kept its lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing lost: the next run (direct connection) delivers the rest.
    let ok = wigzo_ok().await;
    let r = sync(&worker(&pool, &ok), &a).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM synced_members WHERE member").await,
        200
    );
}

#[tokio::test]
async fn error_bodies_are_read_bounded() {
    // A server that answers 400 with a body that starts and never ends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 65536];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 1000000000\r\n\r\n")
                    .await;
                let _ = sock.write_all(&[b'x'; 65536]).await;
                // ... and then nothing more, for longer than the client's timeout.
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    let cfg = wigzo_config(&url);
    let client = audience_sync::wigzo::WigzoClient::new(&cfg).unwrap();
    let change = audience_sync::outbox::Change {
        user_id: "1".into(),
        member: true,
        value: None,
        email: None,
        phone: None,
        name: None,
        target_version: 1,
        message_id: uuid::Uuid::nil(),
        detected_at: chrono::Utc::now(),
    };
    let body = audience_sync::wigzo::Identify::new(
        1,
        KEY,
        audience_sync::audience::Kind::Audience,
        &change,
    );
    let started = Instant::now();
    let outcome = client.send(&body).await;
    assert!(
        matches!(&outcome, audience_sync::wigzo::Outcome::Rejected { status: 400, error } if error.len() < 400),
        "{outcome:?}"
    );
    // Reading to the end would have lasted until the client's 5 s timeout.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// A TCP proxy to the test database that can stop forwarding (keeping both sockets open),
/// as a network partition leaves a connection, and later close everything.
struct FreezableProxy {
    port: u16,
    frozen: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl FreezableProxy {
    async fn start() -> Self {
        let url = reqwest::Url::parse(&std::env::var("DATABASE_URL").unwrap()).unwrap();
        let upstream = format!(
            "{}:{}",
            url.host_str().unwrap_or("127.0.0.1"),
            url.port().unwrap_or(5432)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        let f = frozen.clone();
        tasks.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                conns.spawn(pump(cr, sw, f.clone()));
                conns.spawn(pump(sr, cw, f.clone()));
            }
        });
        Self {
            port,
            frozen,
            tasks,
        }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Drops every connection (the server then ends their sessions).
    fn close(mut self) {
        self.tasks.abort_all();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Frozen: what arrives is held back for good, as on a dead network path.
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
