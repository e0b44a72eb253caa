//! Bad input gets a clear error naming the problem, and stored state is untouched.

use crate::support::*;
use audience_sync::audience::{AudienceDef, Kind, store_definitions};
use audience_sync::sync::Mode;
use sqlx::PgPool;

async fn run_query(pool: &PgPool, query: &str) -> audience_sync::sync::RunReport {
    run_def(pool, def("Q", query)).await
}

async fn run_def(pool: &PgPool, d: AudienceDef) -> audience_sync::sync::RunReport {
    let server = wigzo_ok().await;
    let a = store_definitions(pool, &[d]).await.unwrap().remove(0);
    worker(pool, &server).run(&a, Mode::Sync, false).await
}

/// The user ids in the confirmed snapshot, sorted.
async fn synced_users(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT user_id FROM synced_members ORDER BY 1")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn queries_are_checked_before_anything_runs(pool: PgPool) {
    seed(&pool, 3, 3).await;
    let check = |q: &'static str| {
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            audience_sync::audience::inspect_query(&mut conn, "q", Kind::Audience, q)
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
        "SELECT id AS user_id FROM shop_users WHERE pg_catalog.nextval('runs_id_seq') > 0",
    )
    .await;
    assert_eq!(r.status.as_str(), "failed");
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
    assert_eq!(r.status.as_str(), "failed");
    assert!(
        r.error.as_deref().unwrap().contains("statement timeout"),
        "{r:?}"
    );
    assert!(calls(&server).await.is_empty());
}

/// The same rows read from a separate source database (streamed over with COPY) are
/// cleaned, counted and collapsed the same way.
#[sqlx::test]
async fn a_source_database_gets_the_same_id_cleaning(pool: PgPool) {
    let mut d = def(
        "Remote",
        "SELECT * FROM (VALUES ('1', 'a@b.c'), ('1', 'dup@b.c'), (NULL, 'x'), ('', 'y'),
                               (repeat('x', 10000), 'long'), ('2', 'b@b.c')) v(user_id, email)",
    );
    d.source_url = Some(db_url(&pool).into());
    let r = run_def(&pool, d).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!((r.members, r.skipped_rows, r.sent), (2, 3, 2));
    assert_eq!(synced_users(&pool).await, ["1", "2"]);
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
    assert_eq!(synced_users(&pool).await, ["1", "ü🎉"]);
    // The first of the rows sharing an id is the one kept.
    let email: String = sqlx::query_scalar("SELECT email FROM synced_members WHERE user_id = '1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(email, "a@b.c");
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
    assert_eq!(r.status.as_str(), "failed");
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

/// What a synced audience has stored: members with their version, history, outbox, source.
async fn stored(pool: &PgPool) -> (Vec<(String, bool, i64)>, i64, i64, i64) {
    let members = sqlx::query_as("SELECT user_id, member, version FROM synced_members ORDER BY 1")
        .fetch_all(pool)
        .await
        .unwrap();
    (
        members,
        scalar(pool, "SELECT count(*) FROM membership_events").await,
        scalar(pool, "SELECT count(*) FROM outbox").await,
        scalar(pool, "SELECT count(*) FROM shop_users").await,
    )
}

/// Queries that write (directly, through a CTE, a function or a smuggled second statement),
/// run forever, are not SQL, lack or mistype `user_id`, or read a table that is gone: each
/// fails its run with an error naming the problem, sends nothing, and leaves the confirmed
/// state of an already-synced audience exactly as it was.
#[sqlx::test]
async fn hostile_queries_fail_their_run_and_change_nothing_stored(pool: PgPool) {
    seed(&pool, 8, 5).await;
    sqlx::query(
        "CREATE FUNCTION sneaky_insert() RETURNS bigint LANGUAGE sql AS
           'INSERT INTO shop_users VALUES (999, NULL, NULL, true) RETURNING id'",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE FUNCTION sneaky_drop() RETURNS bigint LANGUAGE plpgsql AS
           $$ BEGIN EXECUTE 'DROP TABLE shop_users'; RETURN 1; END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    let server = wigzo_ok().await;
    let a = audience(&pool).await;
    assert!(sync(&worker(&pool, &server), &a).await.succeeded());
    let before = stored(&pool).await;
    assert_eq!(before.0.len(), 5);
    let cases = [
        (
            "DELETE FROM shop_users RETURNING id AS user_id",
            "not valid SQL",
        ),
        (
            "WITH d AS (DELETE FROM shop_users RETURNING id) SELECT id AS user_id FROM d",
            "not valid SQL",
        ),
        (
            "INSERT INTO shop_users VALUES (999, NULL, NULL, true) RETURNING id AS user_id",
            "not valid SQL",
        ),
        ("DROP TABLE shop_users", "not valid SQL"),
        (
            "SELECT sneaky_insert() AS user_id",
            "cannot execute INSERT in a read-only transaction",
        ),
        (
            "SELECT sneaky_drop() AS user_id",
            "cannot execute DROP TABLE in a read-only transaction",
        ),
        (
            "SELECT 1 AS user_id) AS x; DELETE FROM shop_users; SELECT * FROM (SELECT 1 AS user_id",
            "not valid SQL",
        ),
        (
            "SELECT id AS user_id FROM shop_users, pg_sleep(30)",
            "statement timeout",
        ),
        ("SELEC id AS user_id FROM shop_users", "syntax error"),
        ("SELECT id, email FROM shop_users", "no user_id column"),
        (
            "SELECT now() AS user_id",
            "column user_id has type TIMESTAMPTZ",
        ),
        ("SELECT id AS user_id FROM no_such_table", "no_such_table"),
    ];
    let mut w = worker(&pool, &server);
    w.statement_timeout = std::time::Duration::from_millis(300);
    for (query, want) in cases {
        // The same audience (same key), its query replaced.
        let hostile = store_definitions(&pool, &[def("Order Completed Last 30days", query)])
            .await
            .unwrap()
            .remove(0);
        assert_eq!(hostile.id, a.id);
        let r = sync(&w, &hostile).await;
        assert_eq!(r.status.as_str(), "failed", "{query}: {r:?}");
        let err = r.error.clone().unwrap();
        assert!(
            err.contains(want) && err.contains(KEY),
            "{query}\nwanted {want:?} and the audience key in: {err}"
        );
        assert_eq!(r.sent, 0, "{query}");
        assert_eq!(stored(&pool).await, before, "{query} changed stored state");
        assert_eq!(calls(&server).await.len(), 5, "{query} sent calls");
    }
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM runs WHERE status = 'running'").await,
        0
    );
    // The audience is fine again once its query is.
    let good = audience(&pool).await;
    let r = sync(&w, &good).await;
    assert!(r.succeeded() && r.sent == 0, "{r:?}");
}

/// Emails and names with emoji, quotes, backslashes, control characters, right-to-left marks
/// and combining accents reach Wigzo exactly as stored, as do such user ids.
#[sqlx::test]
async fn unusual_characters_reach_wigzo_unchanged(pool: PgPool) {
    let odd: Vec<(&str, &str)> = vec![
        ("🎉", "🎉@例え.jp"),
        ("quote\"d", "\"o'hara\"@x.io"),
        ("back\\slash", "a\\b@x.io"),
        ("ctl", "line\nbreak\ttab\u{1}@x.io"),
        ("rtl", "\u{202e}moc.x@evil"),
        ("combining", "e\u{301}@x.io"),
        ("<script>", "</script>@x.io"),
    ];
    let server = wigzo_ok().await;
    sqlx::query("CREATE TABLE odd (user_id text, email text)")
        .execute(&pool)
        .await
        .unwrap();
    for (u, e) in &odd {
        sqlx::query("INSERT INTO odd VALUES ($1, $2)")
            .bind(u)
            .bind(e)
            .execute(&pool)
            .await
            .unwrap();
    }
    let a = store_definitions(
        &pool,
        &[def("Odd", "SELECT user_id, email, email AS name FROM odd")],
    )
    .await
    .unwrap()
    .remove(0);
    let r = worker(&pool, &server).run(&a, Mode::Sync, false).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(r.sent, odd.len() as u64);
    let got: std::collections::HashMap<String, (String, String)> = calls(&server)
        .await
        .iter()
        .map(|c| {
            (
                c["userId"].as_str().unwrap().to_string(),
                (
                    c["email"].as_str().unwrap().to_string(),
                    c["traits"]["name"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    for (u, e) in &odd {
        assert_eq!(
            got.get(*u),
            Some(&(e.to_string(), e.to_string())),
            "user {u:?}"
        );
    }
}

/// A query's reader borrows a connection of the worker's pool: whatever becomes of the query,
/// the pool never gets it back inside the reader's read-only transaction.
#[sqlx::test]
async fn a_failed_or_unused_reader_leaves_the_pool_writable(pool: PgPool) {
    use audience_sync::snapshot::{Reader, capture};
    seed(&pool, 20_001, 20_001).await;
    // One connection, so every reader below takes the same one.
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let mut run_conn = pool.acquire().await.unwrap();
    let timeout = std::time::Duration::from_secs(5);
    sqlx::query("CREATE TABLE scratch (x int)")
        .execute(&pool)
        .await
        .unwrap();
    let writable = || async {
        sqlx::query("INSERT INTO scratch VALUES (1)")
            .execute(&one)
            .await
            .map(|_| ())
    };
    // Fails after 20k rows have streamed.
    let failing = "SELECT id AS user_id FROM shop_users WHERE 1 / (id - 20001) IS NOT NULL";
    let r = Reader::open(
        &mut run_conn,
        &one,
        "q",
        Kind::Audience,
        failing,
        None,
        timeout,
    )
    .await
    .unwrap();
    let mut writer = pool.acquire().await.unwrap();
    let e = capture(&mut writer, r).await.unwrap_err();
    assert!(e.to_string().contains("division by zero"), "{e}");
    writable()
        .await
        .expect("the pool got the failed reader's connection back");
    let all = "SELECT id AS user_id FROM shop_users";
    drop(
        Reader::open(&mut run_conn, &one, "q", Kind::Audience, all, None, timeout)
            .await
            .unwrap(),
    );
    writable()
        .await
        .expect("the pool got an unused reader's connection back");
    let ok = Reader::open(&mut run_conn, &one, "q", Kind::Audience, all, None, timeout)
        .await
        .unwrap();
    assert_eq!(capture(&mut writer, ok).await.unwrap().members, 20_001);
    writable()
        .await
        .expect("a finished reader's connection came back read-only");
}
