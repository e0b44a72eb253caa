//! Upgrading a database in use: what migrations 0007 (the outbox per audience) and later ones
//! (0010, computed traits) find stored is kept, and the next run carries on from it with the
//! same messageIds.

use crate::support::*;
use audience_sync::db::MIGRATOR;
use audience_sync::outbox::{Sent, message_id};
use sqlx::PgPool;

#[sqlx::test(migrations = false)]
async fn the_per_audience_outbox_keeps_every_change_stored_before_it(pool: PgPool) {
    MIGRATOR.run_to(6, &pool).await.unwrap();
    seed(&pool, 10, 3).await;
    // Stored as version 6 stored them (today's store_definitions writes later columns).
    let mut stored = Vec::new();
    for d in [
        def("Order Completed Last 30days", MEMBERS_QUERY),
        def(
            "Dormant",
            "SELECT id AS user_id FROM shop_users WHERE NOT member",
        ),
    ] {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO audiences (key, name, query, schedule) VALUES ($1, $2, $3, $4)
             RETURNING id",
        )
        .bind(&d.key)
        .bind(&d.name)
        .bind(&d.query)
        .bind(&d.schedule)
        .fetch_one(&pool)
        .await
        .unwrap();
        stored.push(audience_sync::audience::Audience { id, def: d });
    }
    let other = stored.pop().unwrap();
    let a = stored.pop().unwrap();
    // Confirmed: users 1, 2 and 9 (since left the audience). Owed: 3 entered (tried once),
    // 9 left; and a change of the other audience that Wigzo rejected.
    let run: i64 = sqlx::query_scalar(
        "INSERT INTO runs (audience_id, kind, status, owner)
         VALUES ($1, 'initial', 'failed', 'old') RETURNING id",
    )
    .bind(a.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    for sql in [
        "INSERT INTO synced_members (audience_id, user_id, member, email, version, confirmed_at)
         SELECT $1, u, true, 'u' || u || '@example.com', 1, now()
           FROM unnest('{1,2,9}'::text[]) u",
        "INSERT INTO outbox (audience_id, user_id, member, email, phone, target_version, run_id,
                             attempts, created_at)
         VALUES ($1, '3', true, 'u3@example.com', '+15553', 1, $3, 1, '2026-11-30 08:00:00+00'),
                ($1, '9', false, 'u9@example.com', NULL, 2, $3, 0, '2026-11-30 08:00:00+00')",
        "INSERT INTO outbox (audience_id, user_id, member, target_version, run_id, status,
                             attempts, last_status, last_error)
         VALUES ($2, '7', true, 1, $3, 'rejected', 1, 400, 'bad user')",
    ] {
        sqlx::query(sql)
            .bind(a.id)
            .bind(other.id)
            .bind(run)
            .execute(&pool)
            .await
            .unwrap();
    }
    let before: Vec<(i64, String, bool, i64, String, i32)> = sqlx::query_as(
        "SELECT audience_id, user_id, member, target_version, status, attempts FROM outbox
          ORDER BY 1, 2",
    )
    // Not kept prepared: the migration changes the table under it (the column's collation).
    .persistent(false)
    .fetch_all(&pool)
    .await
    .unwrap();

    MIGRATOR.run(&pool).await.unwrap();

    let after: Vec<(i64, String, bool, i64, String, i32)> = sqlx::query_as(
        "SELECT audience_id, user_id, member, target_version, status, attempts FROM outbox
          ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(after, before);
    let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM audiences ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(kinds, ["audience", "audience"]);
    let mut conn = pool.acquire().await.unwrap();
    for id in [a.id, other.id] {
        assert!(
            audience_sync::outbox::has_partition(&mut conn, id)
                .await
                .unwrap()
        );
    }
    let in_partition: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        audience_sync::outbox::partition(a.id)
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(in_partition, 2);
    let failed: Vec<(String, String, Option<i32>)> =
        sqlx::query_as("SELECT key, user_id, last_status FROM ops.failed_changes")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(failed, [("dormant".into(), "7".into(), Some(400))]);

    // The next run resumes the owed changes as they were: same messageIds and timestamps.
    let server = wigzo_ok().await;
    let r = sync(&worker(&pool, &server), &a).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(
        (r.kind.as_str(), r.added, r.removed, r.sent),
        ("incremental", 1, 1, 2)
    );
    let bodies = calls(&server).await;
    let call = |user: &str| bodies.iter().find(|c| c["userId"] == user).unwrap();
    assert_eq!(
        call("3")["messageId"],
        message_id(a.id, "3", 1, Sent::Flag(true)).to_string()
    );
    assert_eq!(call("3")["timestamp"], "2026-11-30T08:00:00.000Z");
    assert_eq!(call("9")["traits"][KEY], false);
    assert_eq!(
        call("9")["messageId"],
        message_id(a.id, "9", 2, Sent::Flag(false)).to_string()
    );
    let members: Vec<String> = sqlx::query_scalar(
        "SELECT user_id FROM synced_members WHERE audience_id = $1 AND member ORDER BY 1",
    )
    .bind(a.id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(members, ["1", "2", "3"]);
}
