//! The binary as operators use it: exit codes, JSON output, and the token kept out of every
//! byte it prints, at every log level.

use std::process::Command;

use crate::support::*;
use sqlx::PgPool;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(pool: &PgPool, config: &str, wigzo: &str, args: &[&str]) -> Out {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audience-sync.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_audience-sync"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .env("DATABASE_URL", db_url(pool))
        .env("WIGZO_ORG_TOKEN", TOKEN)
        .env("WIGZO_BASE_URL", wigzo)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let o = Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !o.stdout.contains(TOKEN) && !o.stderr.contains(TOKEN),
        "the org token leaked into the output of {args:?}:\n{}\n{}",
        o.stdout,
        o.stderr
    );
    o
}

const CONFIG: &str = r#"
[wigzo]
retry_base_ms = 10
retry_max_ms = 20
max_attempts = 2

[[audience]]
name = "Order Completed Last 30days"
query = "SELECT id AS user_id, email, phone FROM shop_users WHERE member"
"#;

#[sqlx::test]
async fn sync_json_status_and_runs_work_and_never_print_the_token(pool: PgPool) {
    seed(&pool, 10, 4).await;
    let server = wigzo_ok().await;
    let o = run(&pool, CONFIG, &server.uri(), &["sync", "--json"]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let r = &v[0];
    assert_eq!(r["audience"], KEY);
    assert_eq!(r["kind"], "initial");
    assert_eq!(r["status"], "succeeded");
    for (field, want) in [
        ("members", 4),
        ("added", 4),
        ("removed", 0),
        ("sent", 4),
        ("failed", 0),
        ("skipped_rows", 0),
    ] {
        assert_eq!(r[field], want, "{field}");
    }
    assert!(r["run_id"].is_i64());
    assert_eq!(calls(&server).await.len(), 4);

    let o = run(&pool, CONFIG, &server.uri(), &["status"]);
    assert_eq!(o.code, 0);
    assert!(
        o.stdout.contains("KEY") && o.stdout.contains(KEY),
        "{}",
        o.stdout
    );
    let o = run(&pool, CONFIG, &server.uri(), &["runs", "--json"]);
    let runs: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(runs[0]["sent"], 4);
}

#[sqlx::test]
async fn a_refused_token_or_unreachable_wigzo_exits_non_zero_without_the_token(pool: PgPool) {
    seed(&pool, 10, 4).await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(403))
        .mount(&server)
        .await;
    let o = run(&pool, CONFIG, &server.uri(), &["sync", "--json"]);
    assert_eq!(o.code, 1);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert!(
        v[0]["error"]
            .as_str()
            .unwrap()
            .contains("refused the organization token")
    );

    let o = run(&pool, CONFIG, "http://127.0.0.1:9", &["sync"]);
    assert_eq!(o.code, 1);
    assert!(o.stdout.contains("connection failed"), "{}", o.stdout);
}

#[sqlx::test]
async fn a_bad_config_is_refused_and_changes_nothing_stored(pool: PgPool) {
    seed(&pool, 10, 4).await;
    let server = wigzo_ok().await;
    assert_eq!(run(&pool, CONFIG, &server.uri(), &["sync"]).code, 0);
    let bad = format!(
        "{CONFIG}\n[[audience]]\nname = \"Extra\"\nquery = \"SELECT id FROM shop_users\"\n"
    );
    let o = run(&pool, &bad, &server.uri(), &["sync"]);
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.contains("audience \"extra\"") && o.stderr.contains("no user_id column"),
        "{}",
        o.stderr
    );
    assert_eq!(scalar(&pool, "SELECT count(*) FROM audiences").await, 1);
    let o = run(
        &pool,
        "[wigzo]\nconcurency = 3\n",
        &server.uri(),
        &["status"],
    );
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.contains("unknown field `concurency`"),
        "{}",
        o.stderr
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM audiences WHERE enabled").await,
        1
    );
}

/// Hostile or broken config files: each is refused (exit 2) with a message naming the
/// problem, and the audience already stored keeps its state.
const TRAIT_ONLY: &str = r#"
[[trait]]
name = "Lifetime Value"
query = "SELECT id AS user_id, email, id * 1.5 AS value FROM shop_users WHERE member"
"#;

#[sqlx::test]
async fn a_file_with_traits_only_syncs_them_by_flag_or_all_together(pool: PgPool) {
    seed(&pool, 10, 4).await;
    let server = wigzo_ok().await;
    // A dry run sends nothing, so it takes no share of the destination budget either.
    let o = run(&pool, TRAIT_ONLY, &server.uri(), &["sync", "--dry-run"]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM destination_replicas").await,
        0
    );
    // `sync` with neither flag: every enabled audience and trait.
    let o = run(&pool, TRAIT_ONLY, &server.uri(), &["sync", "--json"]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v[0]["audience"], "lifetime_value");
    assert_eq!(v[0]["computation"], "trait");
    assert_eq!(
        (v[0]["kind"].as_str(), v[0]["sent"].as_i64()),
        (Some("initial"), Some(4))
    );
    let bodies = calls(&server).await;
    let c = bodies.iter().find(|c| c["userId"] == "3").unwrap();
    assert_eq!(c["traits"]["lifetime_value"], 4.5);

    // Named the wrong way: refused, saying which flag names it.
    let o = run(
        &pool,
        TRAIT_ONLY,
        &server.uri(),
        &["sync", "--audience", "lifetime_value"],
    );
    assert_ne!(o.code, 0);
    assert!(
        o.stderr
            .contains("is a trait in the config file; name it with --trait lifetime_value"),
        "{}",
        o.stderr
    );

    set_members(&pool, &[5], true).await;
    let o = run(
        &pool,
        TRAIT_ONLY,
        &server.uri(),
        &["sync", "--trait", "lifetime_value"],
    );
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("lifetime_value incremental"),
        "{}",
        o.stdout
    );
    assert_eq!(calls(&server).await.len(), 5);

    let o = run(
        &pool,
        TRAIT_ONLY,
        &server.uri(),
        &["resync", "--trait", "lifetime_value", "--dry-run"],
    );
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("would send=5"), "{}", o.stdout);
    assert!(
        o.stdout.contains(r#""computation_class":"trait""#),
        "{}",
        o.stdout
    );
    let o = run(
        &pool,
        TRAIT_ONLY,
        &server.uri(),
        &["resync", "--trait", "lifetime_value"],
    );
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_eq!(calls(&server).await.len(), 10);
    let o = run(&pool, TRAIT_ONLY, &server.uri(), &["resync"]);
    assert_eq!(
        o.code, 2,
        "resync needs --audience or --trait: {}",
        o.stderr
    );

    let o = run(&pool, TRAIT_ONLY, &server.uri(), &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        (v[0]["key"].as_str(), v[0]["kind"].as_str()),
        (Some("lifetime_value"), Some("trait"))
    );
    assert_eq!(v[0]["members"], 5);
    let o = run(
        &pool,
        TRAIT_ONLY,
        &server.uri(),
        &["runs", "--trait", "lifetime_value"],
    );
    assert!(
        o.stdout
            .lines()
            .nth(1)
            .unwrap()
            .contains("lifetime_value  trait  full_resync"),
        "{}",
        o.stdout
    );
}

#[sqlx::test]
async fn hostile_configs_are_refused_and_change_nothing(pool: PgPool) {
    seed(&pool, 10, 4).await;
    let server = wigzo_ok().await;
    assert_eq!(run(&pool, CONFIG, &server.uri(), &["sync"]).code, 0);
    let aud = |extra: &str| {
        format!(
            "[[audience]]\nname = \"Order Completed Last 30days\"\nquery = \"SELECT id AS user_id FROM shop_users WHERE member\"\n{extra}"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        ("[wigzo]\nconcurrency = \"eight\"\n".into(), "concurrency"),
        ("[wigzo\n".into(), "not valid"),
        (
            format!(
                "{}\n[[audience]]\nname = \"order completed last 30DAYS\"\nquery = \"SELECT 1 AS user_id\"\n",
                aud("")
            ),
            "already used",
        ),
        (
            aud("key = \"x'; DROP TABLE audiences; --\""),
            "is not valid",
        ),
        (aud("schedule = \"every tuesday\""), "not a valid cron"),
        (
            "[[audience]]\nname = \"🎉🎉\"\nquery = \"SELECT 1 AS user_id\"\n".into(),
            "no key can be derived",
        ),
        (
            "[[audience]]\nname = \"Bad SQL\"\nquery = \"SELEC id AS user_id FROM shop_users\"\n"
                .into(),
            "not valid SQL",
        ),
        (
            "[[audience]]\nname = \"Writes\"\nquery = \"DROP TABLE shop_users\"\n".into(),
            "syntax error at or near \"TABLE\"",
        ),
        // Audiences and traits share one key namespace, and a key keeps its kind.
        (
            aud("[[trait]]\nname = \"order completed last 30DAYS\"\nquery = \"SELECT 1 AS user_id, 1 AS value\"\n"),
            "already used by audience \"Order Completed Last 30days\" (audiences and traits share one namespace",
        ),
        (
            "[[trait]]\nname = \"Order Completed Last 30days\"\nquery = \"SELECT 1 AS user_id, 1 AS value\"\n".into(),
            "belongs to an audience already stored",
        ),
        (
            "[[trait]]\nname = \"Email\"\nquery = \"SELECT 1 AS user_id, 'x' AS value\"\n".into(),
            "key \"email\" is reserved",
        ),
        (
            "[[trait]]\nname = \"LTV\"\non_missing = \"drop\"\nquery = \"SELECT 1 AS user_id, 1 AS value\"\n".into(),
            "trait \"LTV\": on_missing must be",
        ),
        (aud("on_missing = \"keep\""), "on_missing is a [[trait]] setting"),
        (
            "[[trait]]\nname = \"LTV\"\nquery = \"SELECT 1 AS user_id, now()::time AS value\"\n".into(),
            "column value has type time",
        ),
    ];
    for (config, want) in cases {
        let o = run(&pool, &config, &server.uri(), &["sync"]);
        assert_eq!(o.code, 2, "{config}\n{}", o.stderr);
        assert!(
            o.stderr.contains(want),
            "{config}\nwanted {want:?} in: {}",
            o.stderr
        );
        assert_eq!(
            scalar(&pool, "SELECT count(*) FROM audiences WHERE enabled").await,
            1,
            "{config}"
        );
        assert_eq!(
            scalar(&pool, "SELECT count(*) FROM synced_members WHERE member").await,
            4
        );
        assert_eq!(scalar(&pool, "SELECT count(*) FROM shop_users").await, 10);
    }
    // An empty file stores nothing either: it does not disable the stored audience.
    let o = run(&pool, "", &server.uri(), &["sync"]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("no enabled audiences"), "{}", o.stderr);
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM audiences WHERE enabled").await,
        1
    );
    // An unreachable source database fails that audience's run, clearly, and nothing else.
    let o = run(
        &pool,
        &format!(
            "{CONFIG}\n[[audience]]\nname = \"Remote\"\nsource_url = \"postgres://nobody@127.0.0.1:9/x\"\nquery = \"SELECT 1 AS user_id\"\n"
        ),
        &server.uri(),
        &["sync", "--json"],
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let remote = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["audience"] == "remote")
        .unwrap();
    assert!(
        remote["error"]
            .as_str()
            .unwrap()
            .contains("cannot connect to the source database"),
        "{remote}"
    );
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|r| r["status"] == "succeeded")
    );
}

/// A Wigzo whose error bodies echo the request, token included, with JSON logs at trace
/// level: the token is blanked out of every output line and of the errors stored for the
/// changes, which `runs` and `--json` print.
#[sqlx::test]
async fn error_bodies_echoing_the_token_are_redacted_everywhere(pool: PgPool) {
    seed(&pool, 10, 4).await;
    let server = MockServer::start().await;
    let echo = format!(
        r#"{{"error":"bad request","request":"POST /rest/v1/learn/identify?org_token={TOKEN}"}}"#
    );
    Mock::given(method("POST"))
        .and(wiremock::matchers::body_partial_json(
            serde_json::json!({"userId": "1"}),
        ))
        .respond_with(ResponseTemplate::new(400).set_body_string(echo.clone()))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_string(echo))
        .with_priority(2)
        .mount(&server)
        .await;
    // `run` fails the test if the token is in any byte printed.
    let o = run(
        &pool,
        CONFIG,
        &server.uri(),
        &["--log-format", "json", "sync", "--json"],
    );
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("org_token=[redacted]"),
        "the echoed body is reported, redacted: {}",
        o.stdout
    );
    let o = run(&pool, CONFIG, &server.uri(), &["runs", "--json"]);
    assert_eq!(o.code, 0);
    let errors: Vec<String> = sqlx::query_scalar("SELECT last_error FROM outbox")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(errors.len(), 4);
    assert!(
        errors
            .iter()
            .all(|e| !e.contains(TOKEN) && e.contains("[redacted]")),
        "{errors:?}"
    );
}

#[sqlx::test]
async fn a_rejected_change_makes_sync_partial_and_retry_sends_it_again(pool: PgPool) {
    seed(&pool, 5, 5).await;
    let server = wigzo_first(
        Some("2"),
        ResponseTemplate::new(400).set_body_string("no email or phone"),
        None,
        ResponseTemplate::new(200),
    )
    .await;
    let o = run(&pool, CONFIG, &server.uri(), &["sync", "--json"]);
    assert_eq!(o.code, 1, "a partial run exits 1: {}{}", o.stdout, o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        (&v[0]["status"], &v[0]["sent"], &v[0]["rejected"]),
        (&"partial".into(), &4.into(), &1.into())
    );
    let o = run(&pool, CONFIG, &server.uri(), &["runs"]);
    assert!(o.stdout.contains("partial"), "{}", o.stdout);

    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let o = run(&pool, CONFIG, &server.uri(), &["retry", "--audience", KEY]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("1 rejected changes queued again") && o.stdout.contains("succeeded"),
        "{}",
        o.stdout
    );
    let c = calls(&server).await;
    assert_eq!((c.len(), c[0]["userId"].as_str()), (1, Some("2")));
}

#[sqlx::test]
async fn a_held_run_exits_3_and_allow_removals_releases_it(pool: PgPool) {
    seed(&pool, 120, 120).await;
    let server = wigzo_ok().await;
    assert_eq!(run(&pool, CONFIG, &server.uri(), &["sync"]).code, 0);
    sqlx::query("DELETE FROM shop_users")
        .execute(&pool)
        .await
        .unwrap();
    let before = calls(&server).await.len();
    let o = run(&pool, CONFIG, &server.uri(), &["sync", "--json"]);
    assert_eq!(o.code, 3, "a held run exits 3: {}{}", o.stdout, o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v[0]["status"], "held");
    assert!(
        v[0]["held_reason"]
            .as_str()
            .unwrap()
            .starts_with("would remove 120 of 120 confirmed members"),
        "{v}"
    );
    assert_eq!(calls(&server).await.len(), before);
    let o = run(&pool, CONFIG, &server.uri(), &["status"]);
    assert!(
        o.stdout
            .contains(&format!("{KEY} is held: would remove 120 of 120")),
        "{}",
        o.stdout
    );

    // The release names its audience.
    let o = run(&pool, CONFIG, &server.uri(), &["sync", "--allow-removals"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--audience"), "{}", o.stderr);
    let o = run(
        &pool,
        CONFIG,
        &server.uri(),
        &["sync", "--audience", KEY, "--allow-removals"],
    );
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_eq!(calls(&server).await.len(), before + 120);
}
