//! The scheduled worker as operators run it: real `audience-sync run` processes against one
//! database, stopped with SIGTERM, killed with SIGKILL, reloaded with SIGHUP.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;
use tokio::process::{Child, Command};
use wiremock::MockServer;

use crate::support::*;

const GRACE_SECS: u64 = 5;
const CONCURRENCY: usize = 4;

fn config(audiences: &str) -> String {
    format!(
        "[wigzo]\nrequests_per_second = 0\nconcurrency = {CONCURRENCY}\nretry_base_ms = 10\nretry_max_ms = 50\n\
         [daemon]\npoll_interval_secs = 1\ngrace_period_secs = {GRACE_SECS}\nretry_failed_secs = 1\n\
         {audiences}"
    )
}

const ORDERS: &str = "[[audience]]\nname = \"Order Completed Last 30days\"\n\
     query = \"SELECT id AS user_id, email, phone FROM shop_users WHERE member\"\n";
const LTV: &str = "[[trait]]\nname = \"Lifetime Value\"\n\
     query = \"SELECT id AS user_id, id * 1.5 AS value FROM shop_users\"\n";
const DORMANT: &str = "[[audience]]\nname = \"Dormant Shoppers\"\n\
     query = \"SELECT id AS user_id FROM shop_users WHERE NOT member\"\n";

struct Daemons {
    dir: tempfile::TempDir,
    db: String,
    wigzo: String,
}

impl Daemons {
    fn new(pool: &PgPool, wigzo: &str, cfg: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), cfg).unwrap();
        Self {
            dir,
            db: db_url(pool),
            wigzo: wigzo.to_string(),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("a.toml")
    }

    /// Starts `audience-sync run`; its log goes to a file in the temp dir.
    fn start(&self, name: &str) -> Child {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_audience-sync"))
            .arg("--config")
            .arg(self.config_path())
            .args(["run", "--listen", "127.0.0.1:0"])
            .env("DATABASE_URL", &self.db)
            .env("WIGZO_ORG_TOKEN", TOKEN)
            .env("WIGZO_BASE_URL", &self.wigzo)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// The base URL of daemon `name`'s ops server, read from its log once it is listening.
    async fn ops_base(&self, name: &str) -> String {
        let mut addr = String::new();
        until(30, "the daemon to log its ops address", || {
            let log = self.log(name);
            if let Some(at) = log.find("listen=") {
                addr = log[at + 7..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .trim_matches('"')
                    .to_string();
            }
            let found = !addr.is_empty();
            async move { found }
        })
        .await;
        format!("http://{addr}")
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("child still running");
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Polls `check` every 50 ms until it holds or `secs` pass.
async fn until<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits for a daemon to exit after SIGTERM; returns how long it took.
async fn stop(child: &mut Child) -> Duration {
    let t = Instant::now();
    signal(child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(GRACE_SECS + 10), child.wait())
        .await
        .expect("daemon did not exit after SIGTERM")
        .unwrap();
    assert!(status.success(), "daemon exited with {status}");
    t.elapsed()
}

/// Per message id, how many times Wigzo answered it 2xx; and the last value per user.
async fn received(server: &MockServer) -> (HashMap<String, usize>, HashMap<String, bool>) {
    let mut ids = HashMap::new();
    let mut last = HashMap::new();
    for c in calls(server).await {
        *ids.entry(c["messageId"].as_str().unwrap().to_string())
            .or_default() += 1;
        let key = c["context"]["personas"]["computation_key"]
            .as_str()
            .unwrap();
        last.insert(
            format!("{key}:{}", c["userId"].as_str().unwrap()),
            c["traits"][key].as_bool().unwrap(),
        );
    }
    (ids, last)
}

fn duplicates(ids: &HashMap<String, usize>) -> usize {
    ids.values().map(|n| n - 1).sum()
}

async fn requests(server: &MockServer) -> usize {
    server.received_requests().await.unwrap().len()
}

#[sqlx::test]
async fn three_daemons_run_a_due_audience_once(pool: PgPool) {
    seed(&pool, 700, 600).await;
    let server = wigzo_ok().await;
    let d = Daemons::new(&pool, &server.uri(), &config(ORDERS));
    let mut daemons: Vec<Child> = (0..3).map(|i| d.start(&format!("d{i}"))).collect();
    until(60, "the initial run to succeed", || async {
        count(
            &pool,
            "SELECT count(*) FROM runs WHERE status = 'succeeded'",
        )
        .await
            == 1
    })
    .await;
    // Each daemon polls every second: give all three a few polls to (not) run it again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for child in &mut daemons {
        stop(child).await;
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM runs").await,
        1,
        "ran more than once"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM runs WHERE trigger = 'schedule' AND kind = 'initial'"
        )
        .await,
        1
    );
    let (ids, last) = received(&server).await;
    assert_eq!(ids.len(), 600);
    assert_eq!(duplicates(&ids), 0, "a change was delivered twice");
    assert!(last.values().all(|v| *v));
    // The next scheduled run is recorded for dashboards: the next 3-hour tick.
    let next: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT next_run_at FROM audiences")
            .fetch_one(&pool)
            .await
            .unwrap();
    let next = next.expect("next_run_at recorded");
    assert!(next > chrono::Utc::now() && next <= chrono::Utc::now() + chrono::Duration::hours(3));
}

#[sqlx::test]
async fn sigterm_mid_delivery_exits_in_grace_and_a_restart_finishes_without_loss(pool: PgPool) {
    seed(&pool, 500, 400).await;
    let server = slow_wigzo(40).await;
    let d = Daemons::new(&pool, &server.uri(), &config(ORDERS));
    let mut first = d.start("first");
    until(30, "delivery to start", || async {
        requests(&server).await >= 40
    })
    .await;

    // A manual sync while the daemon delivers: refused, sends nothing.
    let manual = Command::new(env!("CARGO_BIN_EXE_audience-sync"))
        .arg("--config")
        .arg(d.config_path())
        .args(["sync", "--json"])
        .env("DATABASE_URL", &d.db)
        .env("WIGZO_ORG_TOKEN", TOKEN)
        .env("WIGZO_BASE_URL", &d.wigzo)
        .output()
        .await
        .unwrap();
    assert_eq!(manual.status.code(), Some(1));
    let reports: Value = serde_json::from_slice(&manual.stdout).unwrap();
    assert!(
        reports[0]["error"]
            .as_str()
            .unwrap()
            .contains("already being synced"),
        "{reports}"
    );

    let took = stop(&mut first).await;
    assert!(took < Duration::from_secs(GRACE_SECS), "took {took:?}");
    assert!(d.log("first").contains("SIGTERM"));
    let sent_before = requests(&server).await;
    assert!(sent_before < 400, "delivery finished before SIGTERM landed");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM runs WHERE status = 'abandoned'"
        )
        .await,
        1
    );
    assert!(count(&pool, "SELECT count(*) FROM outbox").await > 0);

    let mut second = d.start("second");
    until(60, "the restarted daemon to finish", || async {
        count(
            &pool,
            "SELECT count(*) FROM runs WHERE status = 'succeeded'",
        )
        .await
            == 1
    })
    .await;
    stop(&mut second).await;
    assert_eq!(count(&pool, "SELECT count(*) FROM outbox").await, 0);
    let (ids, last) = received(&server).await;
    assert_eq!(last.len(), 400, "a change was lost");
    assert!(last.values().all(|v| *v));
    assert_eq!(ids.len(), 400);
    assert!(
        duplicates(&ids) <= CONCURRENCY,
        "{} duplicates, more than the {CONCURRENCY} calls in flight",
        duplicates(&ids)
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM synced_members WHERE member").await,
        400
    );
}

#[sqlx::test]
async fn a_daemon_killed_mid_run_is_taken_over_by_another(pool: PgPool) {
    seed(&pool, 500, 400).await;
    let server = slow_wigzo(30).await;
    let d = Daemons::new(&pool, &server.uri(), &config(ORDERS));
    let mut victim = d.start("victim");
    until(30, "delivery to start", || async {
        requests(&server).await >= 60
    })
    .await;
    victim.kill().await.unwrap(); // SIGKILL: no chance to clean up
    // Calls Wigzo received whose confirmation was not written when the kill landed: the only
    // ones the heir may send again.
    let confirmed: std::collections::HashSet<String> =
        sqlx::query_scalar("SELECT message_id::text FROM membership_events")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let (before_kill, _) = received(&server).await;
    let in_flight: std::collections::HashSet<String> = before_kill
        .keys()
        .filter(|id| !confirmed.contains(*id))
        .cloned()
        .collect();
    assert_eq!(
        count(&pool, "SELECT count(*) FROM runs WHERE status = 'running'").await,
        1,
        "the killed run is left marked running"
    );
    let mut heir = d.start("heir");
    until(60, "another daemon to finish the work", || async {
        count(
            &pool,
            "SELECT count(*) FROM runs WHERE status = 'succeeded'",
        )
        .await
            == 1
    })
    .await;
    stop(&mut heir).await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM runs WHERE status = 'abandoned'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM runs WHERE status = 'running'").await,
        0
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM outbox").await, 0);
    let (ids, last) = received(&server).await;
    assert_eq!(last.len(), 400);
    assert!(last.values().all(|v| *v));
    let resent: Vec<&String> = ids
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        resent.iter().all(|id| in_flight.contains(*id)),
        "sent twice though confirmed before the kill"
    );
    assert!(resent.len() <= in_flight.len());
}

#[sqlx::test]
async fn sighup_picks_up_a_new_audience_and_disables_a_removed_one(pool: PgPool) {
    seed(&pool, 60, 50).await;
    let server = wigzo_ok().await;
    let d = Daemons::new(&pool, &server.uri(), &config(ORDERS));
    let mut daemon = d.start("d");
    until(30, "the first audience's initial run", || async {
        count(
            &pool,
            "SELECT count(*) FROM runs WHERE status = 'succeeded'",
        )
        .await
            == 1
    })
    .await;

    // A broken file is refused and the daemon keeps going with the previous one.
    std::fs::write(d.config_path(), config("[[audience]]\nname = \"x\"\n")).unwrap();
    signal(&daemon, "HUP");
    until(10, "the bad config to be refused", || async {
        d.log("d").contains("configuration not reloaded")
    })
    .await;

    std::fs::write(d.config_path(), config(DORMANT)).unwrap();
    signal(&daemon, "HUP");
    until(30, "the new audience's initial run", || async {
        count(
            &pool,
            "SELECT count(*) FROM runs r JOIN audiences a ON a.id = r.audience_id
              WHERE a.key = 'dormant_shoppers' AND r.status = 'succeeded'",
        )
        .await
            == 1
    })
    .await;
    stop(&mut daemon).await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM audiences WHERE key = 'order_completed_last_30days' AND NOT enabled").await,
        1
    );
    let (_, last) = received(&server).await;
    assert_eq!(
        last.keys()
            .filter(|k| k.starts_with("dormant_shoppers:"))
            .count(),
        10
    );
}

/// The daemon's own ops server: found from its log line, healthy, ready, and a resync asked
/// for over the API (with the bearer token) runs, recorded with trigger `api`. A computed
/// trait is scheduled and triggered the same way.
#[sqlx::test]
async fn the_daemon_serves_ops_and_runs_a_resync_asked_for_over_the_api(pool: PgPool) {
    seed(&pool, 30, 20).await;
    let server = wigzo_ok().await;
    let cfg = config(&format!("{ORDERS}{LTV}")).replace(
        "[daemon]",
        "[ops]\ntrigger_token = \"api-s3cret-0123456789\"\n[daemon]",
    );
    let d = Daemons::new(&pool, &server.uri(), &cfg);
    let mut daemon = d.start("d");
    let base = d.ops_base("d").await;
    assert_eq!(
        http_get(format!("{base}/healthz")).await.unwrap().status(),
        200
    );
    until(30, "the initial runs", || async {
        count(
            &pool,
            "SELECT count(*) FROM runs WHERE status = 'succeeded'",
        )
        .await
            == 2
    })
    .await;
    assert_eq!(
        http_get(format!("{base}/readyz")).await.unwrap().status(),
        200
    );
    for key in [KEY, "lifetime_value"] {
        let r = http()
            .post(format!("{base}/api/audiences/{key}/resync"))
            .bearer_auth("api-s3cret-0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{key}");
    }
    until(30, "the API resyncs to run", || async {
        count(
            &pool,
            "SELECT count(*) FROM runs WHERE kind = 'full_resync' AND trigger = 'api' AND status = 'succeeded'",
        )
        .await
            == 2
    })
    .await;
    let page = http_get(format!("{base}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(KEY) && page.contains("full_resync"));
    stop(&mut daemon).await;
    // 20 members initially, then 20 again for the resync; 30 values, then 30 again.
    let bodies = calls(&server).await;
    assert_eq!(bodies.len(), 100);
    let values = bodies
        .iter()
        .filter(|c| c["context"]["personas"]["computation_class"] == "trait")
        .count();
    assert_eq!(values, 60);
}

#[sqlx::test]
async fn a_held_audience_waits_for_its_source_or_a_release_over_the_api(pool: PgPool) {
    seed(&pool, 120, 120).await;
    let server = wigzo_ok().await;
    // Every two seconds, so ticks come quickly.
    let audience = ORDERS.replace("query =", "schedule = \"*/2 * * * * *\"\nquery =");
    let cfg = config(&audience).replace(
        "[daemon]",
        "[ops]\ntrigger_token = \"api-s3cret-0123456789\"\n[daemon]",
    );
    let d = Daemons::new(&pool, &server.uri(), &cfg);
    let mut daemon = d.start("d");
    let base = d.ops_base("d").await;
    until(30, "the initial run", || async {
        count(
            &pool,
            "SELECT count(*) FROM runs WHERE status = 'succeeded'",
        )
        .await
            >= 1
    })
    .await;
    let sent = requests(&server).await;
    assert_eq!(sent, 120);

    // The source empties: ticks hold the audience, never send, never release themselves.
    sqlx::raw_sql("CREATE TABLE saved AS SELECT * FROM shop_users; DELETE FROM shop_users")
        .execute(&pool)
        .await
        .unwrap();
    until(30, "two held runs", || async {
        count(&pool, "SELECT count(*) FROM runs WHERE status = 'held'").await >= 2
    })
    .await;
    assert_eq!(requests(&server).await, sent, "a held run sent calls");
    let metrics = http_get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "audience_sync_held{{audience=\"{KEY}\",computation_class=\"audience\"}} 1"
        )),
        "{metrics}"
    );

    // The source recovers: the next tick goes through with no one's help.
    sqlx::query("INSERT INTO shop_users SELECT * FROM saved")
        .execute(&pool)
        .await
        .unwrap();
    until(30, "a run after the source recovered", || async {
        count(
            &pool,
            "SELECT count(*) FROM runs WHERE status = 'succeeded'
                AND id > (SELECT max(id) FROM runs WHERE status = 'held')",
        )
        .await
            >= 1
    })
    .await;
    assert_eq!(requests(&server).await, sent, "nothing had changed");

    // Emptied again, and this time a person releases the removals over the API.
    sqlx::query("DELETE FROM shop_users")
        .execute(&pool)
        .await
        .unwrap();
    let held_before = count(&pool, "SELECT count(*) FROM runs WHERE status = 'held'").await;
    until(30, "the audience held again", || async {
        count(&pool, "SELECT count(*) FROM runs WHERE status = 'held'").await > held_before
    })
    .await;
    let r = http()
        .post(format!(
            "{base}/api/audiences/{KEY}/sync?allow_removals=true"
        ))
        .bearer_auth("api-s3cret-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    until(30, "the released run", || async {
        count(
            &pool,
            "SELECT count(*) FROM runs WHERE trigger = 'api' AND status = 'succeeded' AND removed = 120",
        )
        .await
            == 1
    })
    .await;
    stop(&mut daemon).await;
    assert_eq!(requests(&server).await, sent + 120);
    let (_, last) = received(&server).await;
    assert_eq!(last.values().filter(|v| !**v).count(), 120);
}

const ODD_EVEN: &str = "[[audience]]\nname = \"Odd\"\n\
     query = \"SELECT id AS user_id FROM shop_users WHERE id % 2 = 1\"\n\
     [[audience]]\nname = \"Even\"\n\
     query = \"SELECT id AS user_id FROM shop_users WHERE id % 2 = 0\"\n";

/// Two daemons (one run slot each) running one audience each, against `rec`'s mock; returns
/// once both audiences synced and both daemons stopped.
async fn two_replicas(pool: &PgPool, rec: &crate::budget::Recorder, rate: u32) {
    let server = crate::budget::mock(rec).await;
    let cfg = config(ODD_EVEN)
        .replace(
            "requests_per_second = 0",
            &format!("requests_per_second = {rate}"),
        )
        .replace("[daemon]", "[daemon]\nmax_concurrent_runs = 1");
    let d = Daemons::new(pool, &server.uri(), &cfg);
    let mut children = vec![d.start("a"), d.start("b")];
    until(60, "both audiences synced", || async {
        count(pool, "SELECT count(*) FROM runs WHERE status = 'succeeded'").await == 2
    })
    .await;
    for c in &mut children {
        stop(c).await;
    }
    let owners = count(pool, "SELECT count(DISTINCT owner) FROM runs").await;
    assert_eq!(owners, 2, "each replica ran one audience");
}

#[sqlx::test]
async fn two_daemons_share_requests_per_second_through_the_database(pool: PgPool) {
    seed(&pool, 700, 700).await;
    let rec = crate::budget::Recorder::default();
    two_replicas(&pool, &rec, 100).await;
    let at = crate::budget::sorted_arrivals(&rec);
    assert_eq!(at.len(), 700);
    // Two replicas with a budget each would send 200 a second.
    let most = crate::budget::most_in_5s(&at);
    assert!(most <= 550, "{most} calls in a 5 s window");
}

#[sqlx::test]
async fn a_429_seen_by_one_daemon_pauses_the_other(pool: PgPool) {
    seed(&pool, 600, 600).await;
    let rec = crate::budget::Recorder {
        throttle: Some(("odd", "even")),
        ..Default::default()
    };
    two_replicas(&pool, &rec, 0).await;
    // The other replica hears of the pause within two heartbeats (0.4 s); from then on
    // nothing is sent, by either, until Retry-After (2 s) has passed.
    let ms = Duration::from_millis;
    let during = rec.after_429(None, ms(700), Some(ms(1900)));
    assert_eq!(during, 0, "calls during the pause");
    let even_after = rec.after_429(Some("even"), ms(2000), None);
    assert!(
        even_after > 0,
        "the other replica had calls left after the pause"
    );
}
