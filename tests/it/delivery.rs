//! How delivery treats Wigzo's answers: retries, Retry-After, rejections, refused tokens.

use std::time::{Duration, Instant};

use crate::support::*;
use sqlx::PgPool;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

#[sqlx::test]
async fn a_500_then_200_is_retried_with_the_same_message_id(pool: PgPool) {
    seed(&pool, 3, 1).await;
    let a = audience(&pool).await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_string("boom"))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(&server)
        .await;
    let r = sync(&worker(&pool, &server), &a).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!((r.sent, r.retried), (1, 2));
    let bodies = calls(&server).await;
    assert_eq!(bodies.len(), 3);
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "retries must resend the identical call"
    );
}

#[sqlx::test]
async fn a_429_with_retry_after_is_honoured_and_does_not_use_up_attempts(pool: PgPool) {
    seed(&pool, 3, 1).await;
    let a = audience(&pool).await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(&server)
        .await;
    let mut cfg = wigzo_config(&server.uri());
    cfg.max_attempts = 1; // a 429 must not count against this
    let started = Instant::now();
    let r = sync(&worker_with(&pool, cfg), &a).await;
    assert!(r.succeeded(), "{r:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "Retry-After not honoured: {:?}",
        started.elapsed()
    );
    assert_eq!(calls(&server).await.len(), 3);
}

#[sqlx::test]
async fn a_400_for_one_user_is_held_without_blocking_the_audience_until_retried(pool: PgPool) {
    seed(&pool, 10, 10).await;
    let a = audience(&pool).await;
    let server = wigzo_first(
        Some("4"),
        ResponseTemplate::new(400).set_body_string(r#"{"error":"invalid phone"}"#),
        None,
        ResponseTemplate::new(200),
    )
    .await;
    let w = worker(&pool, &server);
    let r = sync(&w, &a).await;
    assert_eq!(
        (r.status.as_str(), r.sent, r.failed, r.rejected),
        ("partial", 9, 1, 1),
        "{r:?}"
    );
    assert!(
        !r.succeeded(),
        "a partial run is not a success (sync exits 1)"
    );
    let err = r.error.as_deref().unwrap();
    assert!(
        err.contains("rejected") && err.contains("invalid phone") && err.contains("retry"),
        "{err}"
    );
    let (status, code, err): (String, Option<i32>, Option<String>) =
        sqlx::query_as("SELECT status, last_status, last_error FROM outbox WHERE user_id = '4'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), code), ("rejected", Some(400)));
    assert!(err.unwrap().contains("invalid phone"));
    assert_eq!(
        calls(&server).await.len(),
        10,
        "a 400 is not retried within the run"
    );
    let first_mid = calls(&server)
        .await
        .into_iter()
        .find(|c| c["userId"] == "4")
        .unwrap()["messageId"]
        .clone();

    // Next runs: the rejected change is held, not sent again and again; the run is partial
    // (so the daemon waits for the next tick instead of re-running the audience).
    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    for _ in 0..2 {
        let r = sync(&w, &a).await;
        assert_eq!(
            (r.status.as_str(), r.sent, r.rejected),
            ("partial", 0, 1),
            "{r:?}"
        );
    }
    assert!(calls(&server).await.is_empty(), "a held change was sent");

    // `retry` queues it again: one call, with the messageId of its first attempt.
    assert_eq!(
        audience_sync::outbox::requeue_rejected(&pool, a.id, None)
            .await
            .unwrap(),
        1
    );
    let r = sync(&w, &a).await;
    assert!(r.succeeded(), "{r:?}");
    let again = calls(&server).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["userId"], "4");
    assert_eq!(again[0]["messageId"], first_mid);
}

#[sqlx::test]
async fn a_rejected_change_is_sent_again_when_the_users_contact_fields_change(pool: PgPool) {
    seed(&pool, 3, 3).await;
    let a = audience(&pool).await;
    let server = wigzo_first(
        Some("2"),
        ResponseTemplate::new(422),
        Some(1),
        ResponseTemplate::new(200),
    )
    .await;
    let w = worker(&pool, &server);
    assert_eq!(sync(&w, &a).await.status.as_str(), "partial");
    // The user's contact fields change: the held change is owed again.
    sqlx::query("UPDATE shop_users SET email = 'fixed@example.com' WHERE id = 2")
        .execute(&pool)
        .await
        .unwrap();
    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let r = sync(&w, &a).await;
    assert!(r.succeeded(), "{r:?}");
    let c = calls(&server).await;
    assert_eq!(
        (c.len(), c[0]["email"].as_str()),
        (1, Some("fixed@example.com"))
    );
}

#[sqlx::test]
async fn a_401_fails_fast_and_confirms_nothing(pool: PgPool) {
    seed(&pool, 500, 500).await;
    let a = audience(&pool).await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_string("bad token"))
        .mount(&server)
        .await;
    let r = sync(&worker(&pool, &server), &a).await;
    assert_eq!((r.status.as_str(), r.sent), ("failed", 0));
    let err = r.error.clone().unwrap();
    assert!(err.contains("refused the organization token"), "{err}");
    assert!(!err.contains(TOKEN));
    // Fast: the run stopped instead of trying all 500 users.
    assert!(
        calls(&server).await.len() <= 16,
        "{} calls after a 401",
        calls(&server).await.len()
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
        500
    );
}

#[sqlx::test]
async fn wigzo_down_fails_the_run_and_keeps_every_change_pending(pool: PgPool) {
    seed(&pool, 20, 20).await;
    let a = audience(&pool).await;
    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let mut cfg = wigzo_config(&url);
    cfg.max_attempts = 2;
    let r = sync(&worker_with(&pool, cfg), &a).await;
    assert_eq!(
        (r.status.as_str(), r.sent, r.failed),
        ("failed", 0, 20),
        "{r:?}"
    );
    let err = r.error.unwrap();
    assert!(err.contains("connection failed"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
    assert_eq!(scalar(&pool, "SELECT count(*) FROM outbox").await, 20);
    // Back up: the next run converges.
    let server = wigzo_ok().await;
    let r = sync(&worker(&pool, &server), &a).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(sorted_users(&calls(&server).await), ids(1..=20));
}
