//! How delivery treats Wigzo's answers: retries, Retry-After, rejections, refused tokens.

use std::time::{Duration, Instant};

use crate::support::*;
use sqlx::PgPool;
use wiremock::matchers::{body_partial_json, method};
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
async fn a_400_for_one_user_does_not_stop_the_others_and_is_retried_next_run(pool: PgPool) {
    seed(&pool, 10, 10).await;
    let a = audience(&pool).await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_partial_json(serde_json::json!({"userId": "4"})))
        .respond_with(ResponseTemplate::new(400).set_body_string(r#"{"error":"invalid phone"}"#))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(&server)
        .await;
    let w = worker(&pool, &server);
    let r = sync(&w, &a).await;
    assert_eq!((r.status, r.sent, r.failed), ("failed", 9, 1), "{r:?}");
    assert!(r.error.as_deref().unwrap().contains("1 rejected"), "{r:?}");
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

    // Next run: only the rejected change is tried again, with the same message id.
    let first_mid = calls(&server)
        .await
        .into_iter()
        .find(|c| c["userId"] == "4")
        .unwrap()["messageId"]
        .clone();
    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let r = sync(&w, &a).await;
    assert!(r.succeeded(), "{r:?}");
    let again = calls(&server).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["userId"], "4");
    assert_eq!(again[0]["messageId"], first_mid);
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
    assert_eq!((r.status, r.sent), ("failed", 0));
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
    assert_eq!((r.status, r.sent, r.failed), ("failed", 0, 20), "{r:?}");
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
