//! Bad input gets a clear error naming the problem, and stored state is untouched.

use crate::support::*;
use audience_sync::audience::store_definitions;
use audience_sync::sync::Mode;
use sqlx::PgPool;

async fn run_query(pool: &PgPool, query: &str) -> audience_sync::sync::RunReport {
    let server = wigzo_ok().await;
    let a = store_definitions(pool, &[def("Q", query)])
        .await
        .unwrap()
        .remove(0);
    worker(pool, &server).run(&a, Mode::Sync, false).await
}

#[sqlx::test]
async fn queries_are_checked_before_anything_runs(pool: PgPool) {
    seed(&pool, 3, 3).await;
    let check = |q: &'static str| {
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            audience_sync::audience::inspect_query(&mut conn, "q", q)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    assert!(check("SELECT id AS user_id FROM shop_users").await.is_ok());
    let e = check("SELECT id, email FROM shop_users").await.unwrap_err();
    assert!(
        e.contains("audience \"q\"") && e.contains("no user_id column") && e.contains("id, email"),
        "{e}"
    );
    let e = check("SELEC id FROM shop_users").await.unwrap_err();
    assert!(
        e.contains("not valid SQL") && e.contains("syntax error"),
        "{e}"
    );
    let e = check("SELECT true AS user_id").await.unwrap_err();
    assert!(e.contains("type BOOL"), "{e}");
    let e = check("DELETE FROM shop_users RETURNING id AS user_id")
        .await
        .unwrap_err();
    assert!(e.contains("not valid SQL"), "{e}");
}

#[sqlx::test]
async fn a_query_that_writes_is_refused_and_changes_nothing(pool: PgPool) {
    seed(&pool, 3, 3).await;
    let r = run_query(
        &pool,
        "SELECT id AS user_id FROM shop_users WHERE pg_catalog.nextval('outbox_id_seq') > 0",
    )
    .await;
    assert_eq!(r.status, "failed");
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("read-only transaction"),
        "{r:?}"
    );
    assert_eq!(scalar(&pool, "SELECT count(*) FROM shop_users").await, 3);
}

#[sqlx::test]
async fn a_query_that_runs_too_long_hits_the_statement_timeout(pool: PgPool) {
    seed(&pool, 3, 3).await;
    let server = wigzo_ok().await;
    let a = store_definitions(
        &pool,
        &[def(
            "Slow",
            "SELECT id AS user_id FROM shop_users, pg_sleep(30)",
        )],
    )
    .await
    .unwrap()
    .remove(0);
    let mut w = worker(&pool, &server);
    w.statement_timeout = std::time::Duration::from_millis(300);
    let r = w.run(&a, Mode::Sync, false).await;
    assert_eq!(r.status, "failed");
    assert!(
        r.error.as_deref().unwrap().contains("statement timeout"),
        "{r:?}"
    );
    assert!(calls(&server).await.is_empty());
}

#[sqlx::test]
async fn null_empty_long_and_duplicate_ids_are_skipped_or_collapsed(pool: PgPool) {
    let r = run_query(
        &pool,
        "SELECT * FROM (VALUES ('1', 'a@b.c'), ('1', 'dup@b.c'), (NULL, 'x'), ('', 'y'), ('  ', 'z'),
                               (repeat('x', 10000), 'long'), ('ü🎉', '🎉@例え.jp')) v(user_id, email)",
    )
    .await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!((r.members, r.skipped_rows, r.sent), (2, 4, 2));
    let users: Vec<String> = sqlx::query_scalar("SELECT user_id FROM synced_members ORDER BY 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(users, vec!["1".to_string(), "ü🎉".to_string()]);
}

#[sqlx::test]
async fn integer_user_ids_are_sent_as_strings(pool: PgPool) {
    let r = run_query(&pool, "SELECT 42::bigint AS user_id").await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM synced_members WHERE user_id = '42'"
        )
        .await,
        1
    );
}

#[sqlx::test]
async fn a_failing_query_fails_its_run_only_and_keeps_confirmed_state(pool: PgPool) {
    seed(&pool, 5, 5).await;
    let a = audience(&pool).await;
    let server = wigzo_ok().await;
    assert!(sync(&worker(&pool, &server), &a).await.succeeded());
    sqlx::query("DROP TABLE shop_users")
        .execute(&pool)
        .await
        .unwrap();
    let r = sync(&worker(&pool, &server), &a).await;
    assert_eq!(r.status, "failed");
    assert!(r.error.as_deref().unwrap().contains("shop_users"), "{r:?}");
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM synced_members WHERE member").await,
        5
    );
    assert_eq!(calls(&server).await.len(), 5);
}

#[sqlx::test]
async fn renaming_keeps_the_key_and_removed_audiences_are_disabled(pool: PgPool) {
    let first = store_definitions(
        &pool,
        &[
            def("Dormant Shoppers", "SELECT 1 AS user_id"),
            def("Other", "SELECT 1 AS user_id"),
        ],
    )
    .await
    .unwrap();
    let mut renamed = def("Sleepy Shoppers", "SELECT 1 AS user_id");
    renamed.key = "dormant_shoppers".into();
    let second = store_definitions(&pool, &[renamed]).await.unwrap();
    assert_eq!(first[0].id, second[0].id);
    let (key, name): (String, String) =
        sqlx::query_as("SELECT key, name FROM audiences WHERE id = $1")
            .bind(first[0].id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (key.as_str(), name.as_str()),
        ("dormant_shoppers", "Sleepy Shoppers")
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM audiences WHERE key = 'other' AND NOT enabled"
        )
        .await,
        1
    );
}
