//! The removal guard: a query that suddenly returns nothing, or far fewer members, never
//! reaches Wigzo without a person's release.

use crate::support::*;
use audience_sync::audience::{Audience, store_definitions};
use audience_sync::guard::Guard;
use audience_sync::sync::{Mode, RunOptions, RunReport, Worker};
use sqlx::PgPool;

async fn released(w: &Worker, a: &Audience, mode: Mode) -> RunReport {
    let opts = RunOptions {
        allow_removals: true,
        ..RunOptions::manual(false)
    };
    w.run_with(a, mode, opts).await.unwrap()
}

async fn confirmed_members(pool: &PgPool) -> i64 {
    scalar(pool, "SELECT count(*) FROM synced_members WHERE member").await
}

#[sqlx::test]
async fn an_emptied_source_is_held_until_a_person_releases_it(pool: PgPool) {
    seed(&pool, 120, 120).await;
    let a = audience(&pool).await;
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);
    assert!(sync(&w, &a).await.succeeded());
    server.reset().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(200))
        .mount(&server)
        .await;

    sqlx::query("TRUNCATE shop_users")
        .execute(&pool)
        .await
        .unwrap();
    for _ in 0..2 {
        let r = sync(&w, &a).await;
        assert_eq!(
            (r.status.as_str(), r.members, r.removed, r.sent),
            ("held", 0, 120, 0),
            "{r:?}"
        );
        assert_eq!(
            r.held_reason.as_deref(),
            Some(
                "would remove 120 of 120 confirmed members (100%, limit 20%); the query returned 0 rows"
            )
        );
        let err = r.error.unwrap();
        assert!(
            err.contains(&format!(
                "audience-sync sync --audience {KEY} --allow-removals"
            )),
            "{err}"
        );
    }
    assert!(calls(&server).await.is_empty(), "a held run sent calls");
    assert_eq!(confirmed_members(&pool).await, 120, "the snapshot moved");
    assert_eq!(scalar(&pool, "SELECT count(*) FROM outbox").await, 0);
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM runs WHERE status = 'held'").await,
        2
    );

    // A dry run says it would be held.
    let r = w.run(&a, Mode::Sync, true).await;
    assert!(r.would_hold && r.held_reason.is_some(), "{r:?}");

    // A person releases it: every removal goes out, and the audience converges.
    let r = released(&w, &a, Mode::Sync).await;
    assert_eq!(
        (r.status.as_str(), r.removed, r.sent),
        ("succeeded", 120, 120),
        "{r:?}"
    );
    assert_eq!(
        last_values(&server, KEY)
            .await
            .values()
            .filter(|v| !**v)
            .count(),
        120
    );
    assert_eq!(confirmed_members(&pool).await, 0);
    // Nothing left to hold: the next run is an ordinary empty one.
    assert_eq!(sync(&w, &a).await.status.as_str(), "succeeded");
}

#[sqlx::test]
async fn every_user_id_null_is_held_saying_all_rows_were_skipped(pool: PgPool) {
    seed(&pool, 60, 60).await;
    sqlx::raw_sql(
        "ALTER TABLE shop_users ADD COLUMN ext text; UPDATE shop_users SET ext = id::text",
    )
    .execute(&pool)
    .await
    .unwrap();
    let a = store_definitions(
        &pool,
        &[def(
            "Order Completed Last 30days",
            "SELECT ext AS user_id, email FROM shop_users WHERE member",
        )],
    )
    .await
    .unwrap()
    .remove(0);
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);
    assert!(sync(&w, &a).await.succeeded());
    let before = calls(&server).await.len();
    // The upstream column is renamed and refilled empty: every id is NULL.
    sqlx::query("UPDATE shop_users SET ext = NULL")
        .execute(&pool)
        .await
        .unwrap();
    let r = sync(&w, &a).await;
    assert_eq!((r.status.as_str(), r.skipped_rows), ("held", 60), "{r:?}");
    assert!(
        r.held_reason.unwrap().contains("60 rows, all skipped"),
        "the reason must say every row was skipped"
    );
    assert_eq!(calls(&server).await.len(), before, "a held run sent calls");
}

#[sqlx::test]
async fn normal_churn_passes_and_a_large_drop_is_held(pool: PgPool) {
    seed(&pool, 1000, 1000).await;
    let a = audience(&pool).await;
    let w = worker(&pool, &wigzo_ok().await);
    assert!(sync(&w, &a).await.succeeded());
    // 5% leave: an ordinary run.
    let five: Vec<i64> = (1..=50).collect();
    set_members(&pool, &five, false).await;
    let r = sync(&w, &a).await;
    assert_eq!((r.status.as_str(), r.removed), ("succeeded", 50), "{r:?}");
    // A quarter of the rest leave: held.
    let quarter: Vec<i64> = (51..=300).collect();
    set_members(&pool, &quarter, false).await;
    let r = sync(&w, &a).await;
    assert_eq!(
        (r.status.as_str(), r.removed, r.sent),
        ("held", 250, 0),
        "{r:?}"
    );
    assert_eq!(confirmed_members(&pool).await, 950);

    // This audience moves a lot by design: its own limit lets the move through.
    let mut relaxed = a.clone();
    relaxed.def.guard = Guard {
        max_removed_percent: 60.0,
        ..Guard::default()
    };
    let r = sync(&w, &relaxed).await;
    assert_eq!((r.status.as_str(), r.removed), ("succeeded", 250), "{r:?}");
    assert_eq!(confirmed_members(&pool).await, 700);
}

#[sqlx::test]
async fn a_small_audience_is_not_held_for_a_small_move(pool: PgPool) {
    seed(&pool, 40, 40).await;
    let a = audience(&pool).await;
    let w = worker(&pool, &wigzo_ok().await);
    assert!(sync(&w, &a).await.succeeded());
    let quarter: Vec<i64> = (1..=10).collect();
    set_members(&pool, &quarter, false).await;
    let r = sync(&w, &a).await;
    assert_eq!(
        (r.status.as_str(), r.removed),
        ("succeeded", 10),
        "25% of 40 is under min_removed: {r:?}"
    );
}

#[sqlx::test]
async fn a_full_resync_over_the_limit_is_held_the_same_way(pool: PgPool) {
    seed(&pool, 200, 200).await;
    let a = audience(&pool).await;
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);
    assert!(sync(&w, &a).await.succeeded());
    let before = calls(&server).await.len();
    let half: Vec<i64> = (1..=100).collect();
    set_members(&pool, &half, false).await;
    let r = w.run(&a, Mode::FullResync, false).await;
    assert_eq!(
        (r.kind.as_str(), r.status.as_str(), r.sent),
        ("full_resync", "held", 0),
        "{r:?}"
    );
    assert!(
        r.error.unwrap().contains(&format!(
            "audience-sync resync --audience {KEY} --allow-removals"
        )),
        "the release command is the resync's"
    );
    assert_eq!(calls(&server).await.len(), before, "a held run sent calls");
    // Released: the resync goes out whole (100 members again, 100 removals).
    let r = released(&w, &a, Mode::FullResync).await;
    assert_eq!(
        (r.kind.as_str(), r.status.as_str(), r.added, r.removed),
        ("full_resync", "succeeded", 100, 100),
        "{r:?}"
    );
}

#[sqlx::test]
async fn members_wigzo_may_hold_unconfirmed_count_for_the_guard(pool: PgPool) {
    // The first sync's calls all time out: nothing is confirmed, but Wigzo may hold every
    // member. Then the source empties: the `false`s would reach users Wigzo may have.
    seed(&pool, 150, 150).await;
    let a = audience(&pool).await;
    let down = wigzo_answering(503).await;
    let mut cfg = wigzo_config(&down.uri());
    cfg.max_attempts = 1;
    assert_eq!(
        sync(&worker_with(&pool, cfg), &a).await.status.as_str(),
        "failed"
    );
    assert_eq!(confirmed_members(&pool).await, 0);
    sqlx::query("DELETE FROM shop_users")
        .execute(&pool)
        .await
        .unwrap();
    let ok = wigzo_ok().await;
    let r = sync(&worker(&pool, &ok), &a).await;
    assert_eq!((r.status.as_str(), r.sent), ("held", 0), "{r:?}");
    assert!(
        r.held_reason
            .unwrap()
            .starts_with("would remove 150 of 150 confirmed members"),
        "the owed members Wigzo may hold count"
    );
    assert!(calls(&ok).await.is_empty());
}
