//! Computed traits on the audience pipeline: values sent as JSON of their type, only changes
//! sent, nulls for users who lose their value (or nothing, with `keep`), convergence while
//! Wigzo fails, one key namespace with audiences.

use std::collections::HashMap;

use crate::support::*;
use audience_sync::audience::{Audience, AudienceDef, OnMissing, store_definitions};
use audience_sync::sync::Mode;
use serde_json::{Value, json};
use sqlx::PgPool;

const LTV: &str = "lifetime_value";
const LTV_QUERY: &str = "SELECT u.id AS user_id, u.email, sum(o.amount) AS value
                           FROM shop u JOIN orders o ON o.user_id = u.id GROUP BY u.id";

/// `shop(id, email)` 1..=5 and one order each: user i spent i * 10.50 (numeric(10, 2)).
async fn seed_shop(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE shop (id bigint PRIMARY KEY, email text);
         CREATE TABLE orders (user_id bigint NOT NULL, amount numeric(10, 2) NOT NULL);
         INSERT INTO shop SELECT i, 'u' || i || '@example.com' FROM generate_series(1, 5) i;
         INSERT INTO orders SELECT i, i * 10.50 FROM generate_series(1, 5) i;",
    )
    .execute(pool)
    .await
    .unwrap();
}

async fn ltv(pool: &PgPool, on_missing: OnMissing) -> Audience {
    let d = AudienceDef {
        on_missing,
        ..trait_def("Lifetime Value", LTV_QUERY)
    };
    store_definitions(pool, &[d]).await.unwrap().remove(0)
}

/// user id -> the trait's value, for each call received (the last per user wins).
async fn values(server: &wiremock::MockServer, key: &str) -> HashMap<String, Value> {
    calls(server)
        .await
        .iter()
        .map(|c| {
            (
                c["userId"].as_str().unwrap().to_string(),
                c["traits"][key].clone(),
            )
        })
        .collect()
}

#[sqlx::test]
async fn initial_then_only_changed_values_then_one_null_for_a_user_without_orders(pool: PgPool) {
    seed_shop(&pool).await;
    let t = ltv(&pool, OnMissing::Null).await;
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);

    let r = sync(&w, &t).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(
        (r.kind.as_str(), r.members, r.added, r.sent),
        ("initial", 5, 5, 5)
    );
    let bodies = calls(&server).await;
    let c = bodies.iter().find(|c| c["userId"] == "2").unwrap();
    // numeric 21.00 is the JSON number 21, with the contact fields and the trait's context.
    assert_eq!(c["traits"], json!({LTV: 21, "email": "u2@example.com"}));
    assert_eq!(c["context"]["personas"]["computation_class"], "trait");
    assert_eq!(c["context"]["personas"]["computation_key"], LTV);
    assert_eq!(c["context"]["personas"]["computation_id"], t.id.to_string());
    assert_eq!(values(&server, LTV).await["3"], json!(31.5));
    server.reset().await;
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);

    // Nothing changed: nothing is sent.
    let r = sync(&w, &t).await;
    assert_eq!(
        (r.kind.as_str(), r.added, r.removed, r.sent),
        ("incremental", 0, 0, 0)
    );

    // User 2 spends more; user 4's orders are deleted.
    sqlx::raw_sql("INSERT INTO orders VALUES (2, 0.25); DELETE FROM orders WHERE user_id = 4")
        .execute(&pool)
        .await
        .unwrap();
    let r = sync(&w, &t).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!((r.added, r.removed, r.sent), (1, 1, 2));
    let got = values(&server, LTV).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got["2"], json!(21.25));
    assert_eq!(got["4"], Value::Null);
    let bodies = calls(&server).await;
    let null_call = bodies.iter().find(|c| c["userId"] == "4").unwrap();
    assert!(
        null_call["traits"].as_object().unwrap().contains_key(LTV),
        "the null is sent, not left out: {null_call}"
    );

    // The null is sent once; the confirmed state says so.
    let r = sync(&w, &t).await;
    assert_eq!((r.added, r.removed, r.sent), (0, 0, 0));
    assert_eq!(calls(&server).await.len(), 2);
    let (member, value): (bool, String) =
        sqlx::query_as("SELECT member, value FROM synced_members WHERE user_id = '4'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((member, value.as_str()), (false, "null"));
    let history: Vec<(String, Option<Value>, Option<String>)> = sqlx::query_as(
        "SELECT user_id, value, value_text FROM ops.trait_history
          WHERE key = $1 AND user_id IN ('2', '4') ORDER BY confirmed_at, user_id",
    )
    .bind(LTV)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        history,
        vec![
            ("2".into(), Some(json!(21)), Some("21".into())),
            ("4".into(), Some(json!(42)), Some("42".into())),
            ("2".into(), Some(json!(21.25)), Some("21.25".into())),
            ("4".into(), None, None),
        ]
    );

    // The same values written with another scale (21.250 is 21.25) are not a change.
    let rescaled = AudienceDef {
        query: LTV_QUERY.replace("sum(o.amount)", "sum(o.amount)::numeric(12, 4)"),
        ..trait_def("Lifetime Value", LTV_QUERY)
    };
    let t = store_definitions(&pool, &[rescaled])
        .await
        .unwrap()
        .remove(0);
    let r = sync(&w, &t).await;
    assert_eq!((r.added, r.removed, r.sent), (0, 0, 0), "{r:?}");

    // A full resync sends every current value again (users with one), and no second null.
    let r = w.run(&t, Mode::FullResync, false).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!((r.kind.as_str(), r.added, r.removed), ("full_resync", 4, 0));
}

#[sqlx::test]
async fn keep_sends_nothing_for_a_user_who_loses_their_value(pool: PgPool) {
    seed_shop(&pool).await;
    let t = ltv(&pool, OnMissing::Keep).await;
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);
    assert!(sync(&w, &t).await.succeeded());
    server.reset().await;
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);
    sqlx::raw_sql("DELETE FROM orders WHERE user_id IN (1, 2, 3, 4, 5)")
        .execute(&pool)
        .await
        .unwrap();
    // Every value gone: with `keep` there is nothing to hold and nothing to send.
    let r = sync(&w, &t).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!((r.added, r.removed, r.sent), (0, 0, 0));
    let r = w.run(&t, Mode::FullResync, false).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!((r.added, r.removed, r.sent), (0, 0, 0));
    assert!(calls(&server).await.is_empty());
    // A user who gets a value again is sent it.
    sqlx::raw_sql("INSERT INTO orders VALUES (3, 1.10)")
        .execute(&pool)
        .await
        .unwrap();
    let r = sync(&w, &t).await;
    assert_eq!((r.added, r.removed, r.sent), (1, 0, 1), "{r:?}");
    assert_eq!(values(&server, LTV).await["3"], json!(1.1));
}

#[sqlx::test]
async fn an_emptied_trait_source_is_held_like_an_audience(pool: PgPool) {
    seed_shop(&pool).await;
    let t = ltv(&pool, OnMissing::Null).await;
    let server = wigzo_ok().await;
    let w = worker(&pool, &server);
    assert!(sync(&w, &t).await.succeeded());
    sqlx::raw_sql("DELETE FROM orders")
        .execute(&pool)
        .await
        .unwrap();
    let r = sync(&w, &t).await;
    assert_eq!(r.status, "held", "{r:?}");
    assert_eq!(r.removed, 5);
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("--trait lifetime_value --allow-removals"),
        "{r:?}"
    );
    assert_eq!(calls(&server).await.len(), 5, "nothing sent while held");
}

#[sqlx::test]
async fn a_value_changing_while_wigzo_fails_converges_to_the_last_value(pool: PgPool) {
    seed_shop(&pool).await;
    let t = ltv(&pool, OnMissing::Null).await;
    let ok = wigzo_ok().await;
    assert!(sync(&worker(&pool, &ok), &t).await.succeeded());

    let down = wigzo_first(
        Some("1"),
        wiremock::ResponseTemplate::new(503),
        None,
        wiremock::ResponseTemplate::new(200),
    )
    .await;
    let mut cfg = wigzo_config(&down.uri());
    cfg.max_attempts = 2;
    let w = worker_with(&pool, cfg);
    // User 1: 10.5 -> 20 -> 10.5 -> null -> 30, a run after each, every call answered 503.
    for step in [
        "UPDATE orders SET amount = 20 WHERE user_id = 1",
        "UPDATE orders SET amount = 10.5 WHERE user_id = 1",
        "DELETE FROM orders WHERE user_id = 1",
        "INSERT INTO orders VALUES (1, 30)",
    ] {
        sqlx::raw_sql(step).execute(&pool).await.unwrap();
        let r = sync(&w, &t).await;
        assert_eq!(r.status, "failed", "{r:?}");
    }
    let sent = calls(&down).await;
    let mut by_value: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for c in &sent {
        by_value
            .entry(c["traits"][LTV].to_string())
            .or_default()
            .insert(c["messageId"].as_str().unwrap().to_string());
    }
    // Each change was tried (twice) with one id of its own; 10.5 twice, as two changes.
    assert_eq!(sent.len(), 8, "{sent:?}");
    assert_eq!(by_value["20"].len(), 1);
    assert_eq!(by_value["null"].len(), 1);
    assert_eq!(by_value["30"].len(), 1);
    assert_eq!(by_value["10.5"].len(), 1, "10.5 was retried with its id");
    let all: std::collections::HashSet<&String> = by_value.values().flatten().collect();
    assert_eq!(all.len(), 4, "four changes, four ids: {by_value:?}");

    // Wigzo is back: the last value is sent and confirmed, with the id its change had.
    let back = wigzo_ok().await;
    let r = sync(&worker(&pool, &back), &t).await;
    assert!(r.succeeded(), "{r:?}");
    let last = calls(&back).await;
    assert_eq!(last.len(), 1, "{last:?}");
    assert_eq!(last[0]["traits"][LTV], json!(30));
    assert!(by_value["30"].contains(last[0]["messageId"].as_str().unwrap()));
    let value: String = sqlx::query_scalar("SELECT value FROM synced_members WHERE user_id = '1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(value, "30");
}

/// One trait per type over one row (user 1), synced; the JSON each sent.
async fn sent_value(pool: &PgPool, name: &str, query: &str, source_url: Option<String>) -> Value {
    let d = AudienceDef {
        source_url: source_url.map(Into::into),
        ..trait_def(name, query)
    };
    let t = store_definitions(pool, &[d]).await.unwrap().remove(0);
    let server = wigzo_ok().await;
    let r = sync(&worker(pool, &server), &t).await;
    assert!(r.succeeded(), "{name}: {r:?}");
    let got = values(&server, &t.def.key).await;
    assert_eq!(got.len(), 1, "{name}: {got:?}");
    got["1"].clone()
}

#[sqlx::test]
async fn every_value_type_is_sent_as_its_json_type(pool: PgPool) {
    let q = |expr: &str| format!("SELECT 1 AS user_id, {expr} AS value");
    for (name, expr, want) in [
        ("T Text", "'gold'::text", json!("gold")),
        (
            "T Varchar",
            "'a \"quoted\" \\ word'::varchar(20)",
            json!("a \"quoted\" \\ word"),
        ),
        ("T Int2", "7::smallint", json!(7)),
        ("T Int4", "(-2147483648)::integer", json!(-2147483648i64)),
        (
            "T Int8",
            "9007199254740993::bigint",
            json!(9007199254740993i64),
        ),
        ("T Numeric", "1.50::numeric", json!(1.5)),
        ("T Numeric Small", "0.1::numeric(5, 3)", json!(0.1)),
        ("T Numeric Whole", "100::numeric(10, 2)", json!(100)),
        // More digits than a double keeps: sent as a string, exactly.
        (
            "T Numeric Precise",
            "12345678901234567890.12::numeric",
            json!("12345678901234567890.12"),
        ),
        (
            "T Numeric Huge",
            "1e400::numeric",
            json!(format!("1{}", "0".repeat(400))),
        ),
        ("T Float4", "0.1::real", json!(0.1)),
        ("T Float8", "1.5e300::float8", json!(1.5e300)),
        ("T Bool", "true", json!(true)),
        ("T Bool False", "false", json!(false)),
        ("T Date", "'2026-02-03'::date", json!("2026-02-03")),
        (
            "T Timestamp",
            "'2026-02-03 04:05:06.5'::timestamp",
            json!("2026-02-03T04:05:06.5"),
        ),
    ] {
        assert_eq!(
            sent_value(&pool, name, &q(expr), None).await,
            want,
            "{name}"
        );
    }

    // A timestamptz is sent in UTC whatever the session's time zone. (sqlx starts every
    // session in UTC, so the query itself moves its transaction to another zone first.)
    let in_kolkata = |expr: &str| {
        format!(
            "WITH tz AS MATERIALIZED (SELECT set_config('TimeZone', 'Asia/Kolkata', true))
             SELECT 1 AS user_id, {expr} AS value FROM tz"
        )
    };
    assert_eq!(
        sent_value(
            &pool,
            "T Zone Check",
            &in_kolkata("current_setting('TimeZone')"),
            None
        )
        .await,
        json!("Asia/Kolkata"),
        "values are rendered while the session is in another time zone"
    );
    for (name, expr, want) in [
        (
            "T Timestamptz",
            "'2026-02-03 10:00:00+05:30'::timestamptz",
            "2026-02-03T04:30:00Z",
        ),
        (
            "T Timestamptz Micros",
            "'2026-02-03 00:00:00.123456+05:30'::timestamptz",
            "2026-02-02T18:30:00.123456Z",
        ),
    ] {
        assert_eq!(
            sent_value(&pool, name, &in_kolkata(expr), None).await,
            json!(want),
            "{name}"
        );
    }
}

#[sqlx::test]
async fn nan_and_infinite_values_are_skipped_and_counted(pool: PgPool) {
    let query = "SELECT * FROM (VALUES (1, 'NaN'::float8), (2, 'Infinity'), (3, '-Infinity'),
                                       (4, 2.5), (5, NULL)) v(user_id, value)
                 UNION ALL SELECT 6, 'NaN'::numeric::float8";
    let t = store_definitions(&pool, &[trait_def("Score", query)])
        .await
        .unwrap()
        .remove(0);
    let server = wigzo_ok().await;
    let r = sync(&worker(&pool, &server), &t).await;
    assert!(r.succeeded(), "{r:?}");
    // Only user 4 has a value JSON can carry; user 5 has none (not an error).
    assert_eq!((r.members, r.skipped_rows, r.sent), (1, 4, 1));
    assert_eq!(values(&server, "score").await["4"], json!(2.5));
    let nan_numeric = "SELECT * FROM (VALUES (1, 'NaN'::numeric), (2, 3.25)) v(user_id, value)";
    let t = store_definitions(&pool, &[trait_def("Score Numeric", nan_numeric)])
        .await
        .unwrap()
        .remove(0);
    let r = sync(&worker(&pool, &server), &t).await;
    assert_eq!((r.members, r.skipped_rows), (1, 1), "{r:?}");
}

#[sqlx::test]
async fn unusable_trait_queries_are_refused_naming_the_problem(pool: PgPool) {
    for (query, want) in [
        (
            "SELECT 1 AS user_id, '{}'::jsonb AS value",
            "column value has type jsonb",
        ),
        (
            "SELECT 1 AS user_id, ARRAY[1] AS value",
            "column value has type int4[]",
        ),
        (
            "SELECT 1 AS user_id, 2 AS amount",
            "alias the value AS value",
        ),
        (
            "SELECT 1 AS user_id, 2 AS value, 3 AS value",
            "more than one value column",
        ),
    ] {
        let e = audience_sync::audience::check_queries(&pool, &[trait_def("Bad", query)])
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{query}: {e}");
    }
    // An audience's query may return a `value` column of any type: it is not read.
    audience_sync::audience::check_queries(
        &pool,
        &[def("Fine", "SELECT 1 AS user_id, '{}'::jsonb AS value")],
    )
    .await
    .unwrap();
}

#[sqlx::test]
async fn a_key_keeps_its_kind_and_nothing_stored_changes(pool: PgPool) {
    seed(&pool, 5, 5).await;
    let a = audience(&pool).await;
    let as_trait = trait_def(
        "Order Completed Last 30days",
        "SELECT 1 AS user_id, 1 AS value",
    );
    let e = store_definitions(&pool, &[as_trait])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("belongs to an audience already stored") && e.contains(KEY),
        "{e}"
    );
    let (kind, query): (String, String) =
        sqlx::query_as("SELECT kind, query FROM audiences WHERE id = $1")
            .bind(a.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((kind.as_str(), query.as_str()), ("audience", MEMBERS_QUERY));
}

#[sqlx::test]
async fn a_dry_run_of_a_trait_shows_sample_calls_and_writes_nothing(pool: PgPool) {
    seed_shop(&pool).await;
    let t = ltv(&pool, OnMissing::Null).await;
    let server = wigzo_ok().await;
    let r = worker(&pool, &server).run(&t, Mode::Sync, true).await;
    assert!(r.succeeded(), "{r:?}");
    assert_eq!((r.added, r.sample.len()), (5, 3));
    assert_eq!(r.sample[0]["traits"][LTV], json!(10.5));
    assert_eq!(
        r.sample[0]["context"]["personas"]["computation_class"],
        "trait"
    );
    assert!(calls(&server).await.is_empty());
    assert_eq!(scalar(&pool, "SELECT count(*) FROM runs").await, 0);
}

#[sqlx::test]
async fn a_trait_shows_in_the_views_metrics_and_status_with_its_kind(pool: PgPool) {
    seed_shop(&pool).await;
    let t = ltv(&pool, OnMissing::Null).await;
    let rejecting = wigzo_first(
        Some("5"),
        wiremock::ResponseTemplate::new(400).set_body_string("bad user"),
        None,
        wiremock::ResponseTemplate::new(200),
    )
    .await;
    let r = sync(&worker(&pool, &rejecting), &t).await;
    assert_eq!(r.status, "partial", "{r:?}");
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("retry --trait lifetime_value"),
        "{r:?}"
    );

    let (kind, members): (String, i64) =
        sqlx::query_as("SELECT kind, members FROM ops.audience_overview WHERE key = $1")
            .bind(LTV)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((kind.as_str(), members), ("trait", 4));
    let class: String = sqlx::query_scalar("SELECT computation_class FROM ops.recent_runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(class, "trait");
    let failed: (String, String, Option<String>) =
        sqlx::query_as("SELECT kind, user_id, trait_value FROM ops.failed_changes")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(failed, ("trait".into(), "5".into(), Some("52.5".into())));

    let metrics = audience_sync::metrics::render(&pool).await.unwrap();
    for want in [
        "audience_sync_members{audience=\"lifetime_value\",computation_class=\"trait\"} 4",
        "audience_sync_failed_changes{audience=\"lifetime_value\",computation_class=\"trait\"} 1",
        "audience_sync_runs_total{audience=\"lifetime_value\",computation_class=\"trait\",kind=\"initial\",status=\"partial\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} not in {metrics}");
    }
    let rows = audience_sync::status::audiences(&pool).await.unwrap();
    assert_eq!(rows[0].kind, "trait");
    assert!(
        audience_sync::status::render_audiences(&rows)
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("lifetime_value  trait  Lifetime Value  4 "),
        "{}",
        audience_sync::status::render_audiences(&rows)
    );
}

#[sqlx::test]
async fn keep_still_delivers_a_change_that_may_have_reached_wigzo(pool: PgPool) {
    seed_shop(&pool).await;
    let t = ltv(&pool, OnMissing::Keep).await;
    assert!(
        sync(&worker(&pool, &wigzo_ok().await), &t)
            .await
            .succeeded()
    );
    // User 1: 10.5 confirmed; then 20, sent but unconfirmed (503s: it may have arrived).
    sqlx::raw_sql("UPDATE orders SET amount = 20 WHERE user_id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let down = wigzo_answering(503).await;
    let mut cfg = wigzo_config(&down.uri());
    cfg.max_attempts = 1;
    assert_eq!(sync(&worker_with(&pool, cfg), &t).await.status, "failed");
    let tried = calls(&down).await;
    assert_eq!(tried.len(), 1);
    // The user loses their value: with `keep` no null is sent, but the change that may have
    // reached Wigzo is still owed and is delivered with its id.
    sqlx::raw_sql("DELETE FROM orders WHERE user_id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let ok = wigzo_ok().await;
    let r = sync(&worker(&pool, &ok), &t).await;
    assert!(r.succeeded(), "{r:?}");
    let sent = calls(&ok).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["traits"][LTV], json!(20));
    assert_eq!(sent[0]["messageId"], tried[0]["messageId"]);
    // Back to the first value: Wigzo holds 20, so 10.5 is a change and is sent.
    sqlx::raw_sql("INSERT INTO orders VALUES (1, 10.5)")
        .execute(&pool)
        .await
        .unwrap();
    let r = sync(&worker(&pool, &ok), &t).await;
    assert_eq!((r.added, r.sent), (1, 1), "{r:?}");
    assert_eq!(values(&ok, LTV).await["1"], json!(10.5));
}
