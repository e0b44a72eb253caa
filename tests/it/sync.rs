//! The sync path end to end: initial, incremental, full resync, dry run, crash recovery,
//! concurrent runs.

use crate::support::*;
use audience_sync::outbox::Sent;
use audience_sync::sync::Mode;
use sqlx::PgPool;

#[sqlx::test]
async fn initial_sync_sends_every_member_true_with_the_documented_payload(pool: PgPool) {
    seed(&pool, 50, 20).await;
    let a = audience(&pool).await;
    let server = wigzo_ok().await;
    let r = sync(&worker(&pool, &server), &a).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(
        (r.kind.as_str(), r.members, r.added, r.removed, r.sent),
        ("initial", 20, 20, 0, 20)
    );

    let reqs = server.received_requests().await.unwrap();
    assert_eq!(reqs.len(), 20);
    let first = &reqs[0];
    assert_eq!(
        first.url.query(),
        Some(format!("org_token={TOKEN}").as_str())
    );
    assert_eq!(
        first.headers.get("content-type").unwrap(),
        "application/json"
    );
    let bodies = calls(&server).await;
    assert_eq!(sorted_users(&bodies), ids(1..=20));
    let c = bodies.iter().find(|c| c["userId"] == "7").unwrap();
    assert_eq!(c["type"], "identify");
    assert_eq!(c["traits"][KEY], true);
    assert_eq!(c["traits"]["email"], "u7@example.com");
    assert_eq!(c["traits"]["phone"], "+15557");
    assert_eq!(c["email"], "u7@example.com");
    assert_eq!(c["phone"], "+15557");
    assert_eq!(c["is_active"], true);
    assert_eq!(c["context"]["personas"]["computation_class"], "audience");
    assert_eq!(c["context"]["personas"]["computation_key"], KEY);
    assert_eq!(c["context"]["personas"]["computation_id"], a.id.to_string());
    assert_eq!(c["context"]["library"]["name"], "audience-sync");
    assert!(uuid::Uuid::parse_str(c["messageId"].as_str().unwrap()).is_ok());
    assert!(chrono::DateTime::parse_from_rfc3339(c["timestamp"].as_str().unwrap()).is_ok());
    // Confirmed state advanced for each member.
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM synced_members WHERE member").await,
        20
    );
    assert_eq!(scalar(&pool, "SELECT count(*) FROM outbox").await, 0);
}

#[sqlx::test]
async fn a_second_sync_without_changes_sends_nothing(pool: PgPool) {
    seed(&pool, 30, 10).await;
    let a = audience(&pool).await;
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);
    assert!(sync(&w, &a).await.succeeded());
    let r = sync(&w, &a).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(
        (r.kind.as_str(), r.added, r.removed, r.sent),
        ("incremental", 0, 0, 0)
    );
    assert_eq!(calls(&server).await.len(), 10);
}

#[sqlx::test]
async fn adds_and_removes_send_exactly_the_changed_users(pool: PgPool) {
    seed(&pool, 30, 10).await;
    let a = audience(&pool).await;
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);
    assert!(sync(&w, &a).await.succeeded());
    server.reset().await;
    let server2 = wigzo_ok().await;
    let w = worker(&pool, &server2);
    set_members(&pool, &[11, 12], true).await;
    set_members(&pool, &[3], false).await;
    // The source forgets user 3's email: the removal still carries the confirmed one.
    sqlx::query("UPDATE shop_users SET email = NULL WHERE id = 3")
        .execute(&pool)
        .await
        .unwrap();
    let r = sync(&w, &a).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!((r.members, r.added, r.removed, r.sent), (11, 2, 1, 3));
    let got = last_values(&server2, KEY).await;
    assert_eq!(got.len(), 3);
    assert!(got["11"]);
    assert!(got["12"]);
    assert!(!got["3"]);
    let removal = calls(&server2)
        .await
        .into_iter()
        .find(|c| c["userId"] == "3")
        .unwrap();
    assert_eq!(removal["traits"]["email"], "u3@example.com");
    assert_eq!(removal["email"], "u3@example.com");
}

#[sqlx::test]
async fn full_resync_sends_all_members_and_false_for_departed(pool: PgPool) {
    seed(&pool, 30, 10).await;
    let a = audience(&pool).await;
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);
    assert!(sync(&w, &a).await.succeeded());
    set_members(&pool, &[1, 2], false).await;
    // Departures not yet synced: the resync must send them as false.
    let server2 = wigzo_ok().await;
    let w2 = worker(&pool, &server2);
    let r = w2.run(&a, Mode::FullResync, false).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(
        (r.kind.as_str(), r.added, r.removed, r.sent),
        ("full_resync", 8, 2, 10)
    );
    let got = last_values(&server2, KEY).await;
    assert_eq!(got.values().filter(|v| **v).count(), 8);
    assert_eq!((got["1"], got["2"], got["3"]), (false, false, true));
    // Resent members get new message ids (a resync is new information, not a retry).
    let first: Vec<String> = calls(&server)
        .await
        .iter()
        .map(|c| c["messageId"].to_string())
        .collect();
    assert!(
        calls(&server2)
            .await
            .iter()
            .all(|c| !first.contains(&c["messageId"].to_string()))
    );
}

#[sqlx::test]
async fn dry_run_sends_nothing_and_changes_nothing(pool: PgPool) {
    seed(&pool, 30, 10).await;
    let a = audience(&pool).await;
    let server = wigzo_ok().await;
    let r = worker(&pool, &server).run(&a, Mode::Sync, true).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!((r.added, r.removed, r.sent, r.run_id), (10, 0, 0, None));
    assert_eq!(r.sample.len(), 3);
    assert_eq!(r.sample[0]["traits"][KEY], true);
    assert!(calls(&server).await.is_empty());
    assert_eq!(scalar(&pool, "SELECT count(*) FROM outbox").await, 0);
    assert_eq!(scalar(&pool, "SELECT count(*) FROM runs").await, 0);
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM synced_members").await,
        0
    );
}

#[sqlx::test]
async fn a_crash_between_send_and_confirm_loses_nothing_and_keeps_message_ids(pool: PgPool) {
    seed(&pool, 30, 10).await;
    let a = audience(&pool).await;
    // A "crashed" run: the diff was written and a batch was claimed (and possibly sent),
    // then the process died before confirming anything.
    let dead = wigzo_ok().await;
    let w = worker(&pool, &dead);
    let r = w.run(&a, Mode::Sync, true).await; // capture works
    assert!(r.succeeded());
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("INSERT INTO runs (audience_id, kind, status, owner) VALUES ($1, 'initial', 'running', 'dead:1')")
        .bind(a.id).execute(&mut *conn).await.unwrap();
    let run_id: i64 = sqlx::query_scalar("SELECT max(id) FROM runs")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let reader = audience_sync::snapshot::Reader::open(
        &mut conn,
        &pool,
        KEY,
        audience_sync::audience::Kind::Audience,
        MEMBERS_QUERY,
        None,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    audience_sync::snapshot::capture(&mut conn, reader)
        .await
        .unwrap();
    audience_sync::diff::write_outbox(
        &mut conn,
        a.id,
        run_id,
        audience_sync::diff::Rules::audience(false),
    )
    .await
    .unwrap();
    let claimed = audience_sync::outbox::claim(
        &pool,
        a.id,
        "dead:1",
        "",
        4,
        std::time::Duration::from_secs(900),
    )
    .await
    .unwrap()
    .changes;
    assert_eq!(claimed.len(), 4);
    let claimed_ids: Vec<(String, String)> = claimed
        .iter()
        .map(|c| (c.user_id.clone(), c.message_id.to_string()))
        .collect();
    drop(conn);

    let server = wigzo_ok().await;
    let r = sync(&worker(&pool, &server), &a).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(r.sent, 10);
    let bodies = calls(&server).await;
    assert_eq!(sorted_users(&bodies), ids(1..=10));
    for (user, mid) in claimed_ids {
        let c = bodies
            .iter()
            .find(|c| c["userId"] == user.as_str())
            .unwrap();
        assert_eq!(
            c["messageId"],
            mid.as_str(),
            "user {user} got a new message id on resume"
        );
    }
    let abandoned: String = sqlx::query_scalar("SELECT status FROM runs WHERE id = $1")
        .bind(run_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(abandoned, "abandoned");
}

#[sqlx::test]
async fn two_concurrent_syncs_of_one_audience_do_not_double_send(pool: PgPool) {
    seed(&pool, 200, 200).await;
    let a = audience(&pool).await;
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(
            wiremock::ResponseTemplate::new(200).set_delay(std::time::Duration::from_millis(5)),
        )
        .mount(&server)
        .await;
    let w1 = worker(&pool, &server);
    let w2 = worker(&pool, &server);
    let (r1, r2) = tokio::join!(sync(&w1, &a), sync(&w2, &a));
    let (ok, busy) = if r1.succeeded() { (r1, r2) } else { (r2, r1) };
    assert!(ok.succeeded(), "{ok:?}");
    assert!(!busy.succeeded());
    assert!(
        busy.error
            .as_deref()
            .unwrap()
            .contains("already being synced by another process"),
        "{busy:?}"
    );
    let bodies = calls(&server).await;
    assert_eq!(bodies.len(), 200, "some user was sent twice");
    assert_eq!(sorted_users(&bodies), ids(1..=200));
}

#[sqlx::test]
async fn a_user_removed_then_re_added_while_the_removal_fails_ends_true(pool: PgPool) {
    seed(&pool, 5, 5).await;
    let a = audience(&pool).await;
    let server = wigzo_ok().await;
    assert!(sync(&worker(&pool, &server), &a).await.succeeded());
    // The removal of user 2 fails with 500s (Wigzo may still have applied it).
    set_members(&pool, &[2], false).await;
    let failing = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(503))
        .mount(&failing)
        .await;
    let r = sync(&worker(&pool, &failing), &a).await;
    assert!(!r.succeeded());
    assert!(!last_values(&failing, KEY).await["2"]);
    // User 2 comes back before the removal was ever confirmed.
    set_members(&pool, &[2], true).await;
    let healthy = wigzo_ok().await;
    let r = sync(&worker(&pool, &healthy), &a).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(last_values(&healthy, KEY).await.get("2"), Some(&true));
}

/// The worker computes messageIds itself; they must equal the SQL formula the outbox used to
/// store (`md5(audience:user:version:value)::uuid`), so changes pending across an upgrade
/// keep their ids and Wigzo can still drop duplicates.
#[sqlx::test]
async fn message_ids_equal_the_sql_formula(pool: PgPool) {
    for (aud, user, version, member) in [
        (1i64, "42", 1i64, true),
        (7, "user@example.com", 3, false),
        (123456789, "🎉 é\u{301} \"q\" \\", 99, true),
    ] {
        let sql: uuid::Uuid =
            sqlx::query_scalar("SELECT md5($1::text || ':' || $2 || ':' || $3 || ':' || $4)::uuid")
                .bind(aud)
                .bind(user)
                .bind(version)
                .bind(member)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            audience_sync::outbox::message_id(aud, user, version, Sent::Flag(member)),
            sql,
            "{aud} {user:?} {version} {member}"
        );
    }
}

/// sqlx 0.9.0 leaves Nagle's algorithm on, and a confirmation larger than one TCP segment then
/// waited ~40 ms for the server's delayed ACK. Every connection of ours turns it off. When the
/// first assertion fails, sqlx sets TCP_NODELAY itself and `db::set_nodelay` can go.
#[sqlx::test]
async fn database_connections_turn_off_nagle(pool: PgPool) {
    use audience_sync::db;
    use sqlx::ConnectOptions;
    let opts = pool.connect_options().as_ref().clone();
    let mut plain = opts.connect().await.unwrap();
    let Some(sqlx_default) = db::tcp_nodelay(&mut plain).await.unwrap() else {
        eprintln!("DATABASE_URL is not a TCP address; TCP_NODELAY does not apply");
        return;
    };
    assert!(
        !sqlx_default,
        "sqlx now sets TCP_NODELAY: remove db::set_nodelay"
    );

    let mut dedicated = db::dedicated(&opts).await.unwrap();
    assert_eq!(db::tcp_nodelay(&mut dedicated).await.unwrap(), Some(true));
    let pooled = db::pool_options()
        .max_connections(2)
        .connect_with(opts)
        .await
        .unwrap();
    let mut a = pooled.acquire().await.unwrap();
    let mut b = pooled.acquire().await.unwrap();
    assert_eq!(db::tcp_nodelay(&mut a).await.unwrap(), Some(true));
    assert_eq!(db::tcp_nodelay(&mut b).await.unwrap(), Some(true));
}

/// Whether `outbox_<id>` exists at all (attached or not).
async fn partition_table_exists(pool: &PgPool, audience_id: i64) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(audience_sync::outbox::partition(audience_id))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn a_first_sync_that_fails_mid_stream_leaves_nothing_and_the_next_one_builds_the_partition(
    pool: PgPool,
) {
    // 20k rows (well over one relay chunk) reach the new partition before the query fails.
    seed(&pool, 20_001, 20_001).await;
    let mut a = audience(&pool).await;
    a.def.query =
        "SELECT id AS user_id, email FROM shop_users WHERE 1 / (id - 20001) IS NOT NULL".into();
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);
    let r = sync(&w, &a).await;
    assert!(!r.succeeded());
    assert!(
        r.error.as_deref().unwrap().contains("division by zero"),
        "{r:?}"
    );
    assert!(!partition_table_exists(&pool, a.id).await);
    assert_eq!(scalar(&pool, "SELECT count(*) FROM outbox").await, 0);
    assert!(server.received_requests().await.unwrap().is_empty());

    a.def.query = "SELECT id AS user_id, email FROM shop_users WHERE id <= 30".into();
    let r = sync(&w, &a).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(
        (r.kind.as_str(), r.members, r.added, r.sent),
        ("initial", 30, 30, 30)
    );
    let mut conn = pool.acquire().await.unwrap();
    assert!(
        audience_sync::outbox::has_partition(&mut conn, a.id)
            .await
            .unwrap()
    );
    // The partition's two indexes are the ones it was built with, attached to the parent's
    // (had they not matched, ATTACH would have built another copy of each).
    let indexes: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT pg_get_indexdef(i.indexrelid), p.inhparent::regclass::text
           FROM pg_index i LEFT JOIN pg_inherits p ON p.inhrelid = i.indexrelid
          WHERE i.indrelid = to_regclass($1) ORDER BY 1",
    )
    .bind(audience_sync::outbox::partition(a.id))
    .fetch_all(&pool)
    .await
    .unwrap();
    let parents: Vec<Option<&str>> = indexes.iter().map(|(_, p)| p.as_deref()).collect();
    assert_eq!(
        parents,
        [Some("outbox_not_pending"), Some("outbox_pkey")],
        "{indexes:?}"
    );
}

#[sqlx::test]
async fn a_first_sync_attaches_its_partition_while_another_session_reads_the_outbox(pool: PgPool) {
    seed(&pool, 40, 40).await;
    let auds = audience_sync::audience::store_definitions(
        &pool,
        &[
            def(
                "First",
                "SELECT id AS user_id FROM shop_users WHERE id <= 20",
            ),
            def(
                "Second",
                "SELECT id AS user_id FROM shop_users WHERE id > 20",
            ),
        ],
    )
    .await
    .unwrap();
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);
    assert!(sync(&w, &auds[0]).await.succeeded());
    // A dashboard's long transaction holds ACCESS SHARE locks on outbox and its partitions.
    let mut reader = pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM outbox")
        .execute(&mut *reader)
        .await
        .unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(30), sync(&w, &auds[1]))
        .await
        .expect("the first sync waited for the reader's locks");
    assert!(r.succeeded(), "{r:?}");
    assert_eq!((r.kind.as_str(), r.sent), ("initial", 20));
    reader.commit().await.unwrap();
}
