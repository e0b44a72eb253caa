//! Benchmark harness for audience-sync: see BENCHMARKS.md.
//!
//! `cargo bench --bench sync -- --members N --churn F [--kind audience|trait] [--json]
//! [--delivery-cap C]`
//!
//! Creates a throwaway database `bench_<random>` on `DATABASE_URL`, generates a source whose
//! audience query returns exactly N members (or, `--kind trait`, whose computed trait gives N
//! users a value: their spend in the last 30 days, a numeric), starts an in-process Wigzo
//! receiver, and measures each phase of audience-sync against a bare reference doing the same
//! work, in one run.

use std::fmt::Write as _;
use std::io::Write as _;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use audience_sync::audience::{Audience, AudienceDef, Kind, ValueType, store_definitions};
use audience_sync::config::WigzoConfig;
use audience_sync::delivery::{self, Target};
use audience_sync::demo::receiver::Receiver;
use audience_sync::outbox::Change;
use audience_sync::wigzo::{IDENTIFY_PATH, Identify, WigzoClient};
use audience_sync::{db, diff, snapshot};
use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor, PgPool};
use tokio_util::sync::CancellationToken;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const TOKEN: &str = "bench-org-token";
/// The audience query: users with an order completed in the last 30 days.
const QUERY: &str = "SELECT u.id AS user_id, u.email, u.phone FROM users u \
     WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id \
                   AND o.completed_at > now() - interval '30 days')";
/// The trait query (`--kind trait`): the same users, each with their spend in those 30 days.
const TRAIT_QUERY: &str = "SELECT u.id AS user_id, u.email, u.phone, sum(o.amount) AS value \
     FROM users u JOIN orders o ON o.user_id = u.id \
     WHERE o.completed_at > now() - interval '30 days' GROUP BY u.id";
const CONCURRENCY: usize = 8;
const BATCH_SIZE: i64 = 500;
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(3600);

struct Args {
    members: i64,
    churn: f64,
    json: bool,
    delivery_cap: i64,
    kind: Kind,
}

impl Args {
    /// The query of the computation benchmarked.
    fn query(&self) -> &'static str {
        match self.kind {
            Kind::Audience => QUERY,
            Kind::Trait => TRAIT_QUERY,
        }
    }
}

impl Args {
    /// Parses by hand: `cargo bench` adds `--bench`, and unknown flags are ignored.
    fn parse() -> Result<Args> {
        let mut a = Args {
            members: 20_000,
            churn: 0.01,
            json: false,
            delivery_cap: 50_000,
            kind: Kind::Audience,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let mut value = |name: &str| -> Result<String> {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .with_context(|| format!("{name} needs a value"))
            };
            match flag.as_str() {
                "--members" => a.members = parse_int(&value("--members")?)?,
                "--churn" => a.churn = value("--churn")?.parse().context("--churn")?,
                "--delivery-cap" => a.delivery_cap = parse_int(&value("--delivery-cap")?)?,
                "--json" => a.json = true,
                "--kind" => {
                    a.kind = match value("--kind")?.as_str() {
                        "audience" => Kind::Audience,
                        "trait" => Kind::Trait,
                        other => bail!("--kind is audience or trait, not {other:?}"),
                    }
                }
                "-h" | "--help" => {
                    eprintln!(
                        "usage: cargo bench --bench sync -- --members N --churn F [--kind audience|trait] [--json] [--delivery-cap C]"
                    );
                    std::process::exit(0);
                }
                // `--bench` (added by cargo) and anything else: ignored.
                _ => {}
            }
        }
        ensure!(a.members >= 100, "--members must be at least 100");
        ensure!(
            (0.0..=0.5).contains(&a.churn),
            "--churn must be between 0 and 0.5"
        );
        ensure!(a.delivery_cap >= 1, "--delivery-cap must be positive");
        Ok(a)
    }
}

fn parse_int(s: &str) -> Result<i64> {
    s.replace('_', "")
        .parse()
        .with_context(|| format!("not an integer: {s:?}"))
}

fn main() -> Result<()> {
    let args = Args::parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(run(&args))?;
    if args.json {
        println!("{out}");
    } else {
        print_table(&out);
    }
    Ok(())
}

/// Creates the throwaway database, runs the phases, and always drops it.
async fn run(args: &Args) -> Result<Value> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
    let admin_opts = PgConnectOptions::from_str(&url)
        .context("DATABASE_URL is not a valid URL")?
        .application_name("audience-sync-bench")
        .disable_statement_logging();
    let mut admin = admin_opts
        .connect()
        .await
        .context("cannot connect to DATABASE_URL")?;
    let name = format!("bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    admin
        .execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .with_context(|| format!("cannot create database {name}"))?;
    progress(args, &format!("created database {name}"));
    // The same server and role, the bench database: for the worker process of phase 4.
    let mut db_url = reqwest::Url::parse(&url).context("DATABASE_URL is not a valid URL")?;
    db_url.set_path(&name);
    let result = bench(args, admin_opts.clone().database(&name), db_url.as_str()).await;
    let dropped = admin
        .execute(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await;
    let out = result?;
    dropped.with_context(|| format!("cannot drop database {name}"))?;
    progress(args, &format!("dropped database {name}"));
    Ok(out)
}

fn progress(_args: &Args, msg: &str) {
    eprintln!("[bench] {msg}");
}

fn def(args: &Args, name: &str) -> AudienceDef {
    AudienceDef {
        key: audience_sync::audience::derive_key(name).expect("valid name"),
        kind: args.kind,
        on_missing: audience_sync::audience::OnMissing::Null,
        name: name.into(),
        schedule: "0 0 */3 * * *".into(),
        query: args.query().into(),
        source_url: None,
        enabled: true,
        guard: audience_sync::guard::Guard::default(),
    }
}

async fn bench(args: &Args, opts: PgConnectOptions, db_url: &str) -> Result<Value> {
    let n = args.members;
    let pool = db::pool_options()
        .max_connections(8)
        .connect_with(opts.clone())
        .await
        .context("cannot connect to the bench database")?;
    db::migrate(&pool).await?;

    // ---- Source ---------------------------------------------------------------------------
    let t = Instant::now();
    generate(&pool, n).await?;
    let generate_s = t.elapsed().as_secs_f64();
    // Also warms the cache for both capture measurements.
    let count: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM ({}) q",
        args.query()
    )))
    .fetch_one(&pool)
    .await?;
    ensure!(count == n, "the query returns {count} rows, expected {n}");
    progress(
        args,
        &format!(
            "generated {} users, {n} members in {generate_s:.2} s",
            n + n / 4
        ),
    );

    let auds = store_definitions(
        &pool,
        &[
            def(args, "Bench Capture Diff"),
            def(args, "Bench End To End"),
        ],
    )
    .await?;
    let receiver = Receiver::start(TOKEN).await?;

    // ---- Phases 1+2: capture + diff vs CREATE TEMP TABLE AS + EXCEPT ---------------------
    let a = &auds[0];
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO runs (audience_id, kind, status, owner)
         VALUES ($1, 'initial', 'running', 'bench') RETURNING id",
    )
    .bind(a.id)
    .fetch_one(&pool)
    .await?;
    // A first sync: the query's rows stream straight into the audience's new outbox partition.
    let mut conn = db::dedicated(&opts).await?;
    let t = Instant::now();
    let reader = snapshot::Reader::open(
        &mut conn,
        &pool,
        &a.def.key,
        args.kind,
        args.query(),
        None,
        STATEMENT_TIMEOUT,
    )
    .await?;
    let (captured, counts) = diff::first_sync(&mut conn, reader, a.id, run_id).await?;
    let capture_diff_s = t.elapsed().as_secs_f64();
    conn.close().await?;
    ensure!(
        captured.members == n && counts.added == n && counts.removed == 0,
        "first sync found {} members, {} added, {} removed; expected {n}, {n}, 0",
        captured.members,
        counts.added,
        counts.removed
    );
    sqlx::query("UPDATE runs SET status = 'succeeded', finished_at = now() WHERE id = $1")
        .bind(run_id)
        .execute(&pool)
        .await?;

    let mut rconn = db::dedicated(&opts).await?;
    let (ref_capture_s, ref_diff_s) = reference(args, &mut rconn, a.id, (n, 0)).await?;
    // Informational, not in the ratio: the entering side of the diff written to a plain
    // (logged, unindexed) table, the floor for any diff that persists its changes.
    let t = Instant::now();
    rconn
        .execute(AssertSqlSafe(format!(
            "CREATE TABLE ref_changes AS
             SELECT r.user_id, true AS member, r.email, r.phone
               FROM ref r
              WHERE NOT EXISTS (SELECT 1 FROM synced_members s
                                 WHERE s.audience_id = {} AND s.user_id = r.user_id)",
            a.id
        )))
        .await?;
    let ref_diff_write_s = t.elapsed().as_secs_f64();
    rconn.close().await?;
    let capture_diff_ratio = capture_diff_s / (ref_capture_s + ref_diff_s);
    progress(
        args,
        &format!(
            "first sync: capture+diff {capture_diff_s:.3} s vs reference {:.3} s",
            ref_capture_s + ref_diff_s
        ),
    );

    // ---- Phase 3: delivery vs a bare HTTP client ------------------------------------------
    let delivered_n = n.min(args.delivery_cap);
    if delivered_n < n {
        sqlx::query(
            "DELETE FROM outbox WHERE audience_id = $1 AND user_id NOT IN
                (SELECT user_id FROM outbox WHERE audience_id = $1 ORDER BY user_id LIMIT $2)",
        )
        .bind(a.id)
        .bind(delivered_n)
        .execute(&pool)
        .await?;
        // Without this, the delivery's last claim walks the key over every row just deleted
        // (0.5 s at 1M), a cost of the cap, not of delivery.
        pool.execute("VACUUM (ANALYZE) outbox").await?;
    }
    let mut changes: Vec<Change> = sqlx::query_as(
        "SELECT user_id, member, email, phone, name, value, target_version,
                created_at AS detected_at
           FROM outbox WHERE audience_id = $1 ORDER BY user_id",
    )
    .bind(a.id)
    .fetch_all(&pool)
    .await?;
    for c in &mut changes {
        c.message_id = c.derive_message_id(a.id);
    }
    ensure!(changes.len() as i64 == delivered_n);

    let mut wigzo = WigzoConfig::new(receiver.base_url(), TOKEN);
    wigzo.requests_per_second = 0;
    wigzo.concurrency = CONCURRENCY;
    wigzo.batch_size = BATCH_SIZE;
    wigzo.timeout = Duration::from_secs(30);
    let client = WigzoClient::new(&wigzo)?;
    let target = Target {
        progress: indicatif::ProgressBar::hidden(),
        audience_id: a.id,
        key: a.def.key.clone(),
        kind: a.def.kind,
    };
    let calls_before = receiver.calls();
    let t = Instant::now();
    let d = delivery::deliver(
        &pool,
        &client,
        &wigzo,
        &target,
        "bench",
        &CancellationToken::new(),
    )
    .await?;
    let delivery_s = t.elapsed().as_secs_f64();
    ensure!(
        d.sent == delivered_n as u64 && d.failed == 0,
        "delivery sent {} of {delivered_n}, failed {} ({:?})",
        d.sent,
        d.failed,
        d.last_error
    );
    ensure!(receiver.calls() - calls_before == delivered_n as u64);

    let bare_s = bare_client(&receiver, a, &changes, delivered_n).await?;
    drop(changes);
    let calls_per_s = delivered_n as f64 / delivery_s;
    let bare_calls_per_s = delivered_n as f64 / bare_s;
    let delivery_ratio = calls_per_s / bare_calls_per_s;
    progress(
        args,
        &format!(
            "delivery of {delivered_n}: {calls_per_s:.0} calls/s vs bare {bare_calls_per_s:.0} calls/s"
        ),
    );

    // ---- Phase 4: end to end, the worker binary in a process of its own -----------------
    // `audience-sync --json sync --audience <key>` (or `--trait`), as an operator runs it: an initial sync,
    // then churn and an incremental one. Its peak RSS (phase 5) is the worker's alone,
    // without the harness, the receiver or the bare client.
    let b = &auds[1];
    let mut config = tempfile::NamedTempFile::new()?;
    write!(
        config,
        "[wigzo]\nrequests_per_second = 0\nconcurrency = {CONCURRENCY}\nbatch_size = {BATCH_SIZE}\n\
         [database]\nstatement_timeout_secs = {}\n\
         [[{}]]\nname = {:?}\nschedule = {:?}\nquery = {:?}\n",
        STATEMENT_TIMEOUT.as_secs(),
        args.kind,
        b.def.name,
        b.def.schedule,
        args.query()
    )?;
    let worker = WorkerProcess {
        config: config.path(),
        db_url,
        receiver: &receiver,
        key: &b.def.key,
        kind: args.kind,
    };
    let calls_before = receiver.calls();
    let (initial, initial_sync_s, initial_kib) = worker.sync().await?;
    ensure!(
        initial["kind"] == "initial"
            && initial["status"] == "succeeded"
            && initial["sent"] == n
            && receiver.calls() - calls_before == n as u64,
        "initial sync: {initial}"
    );
    progress(
        args,
        &format!("initial sync of {n} in {initial_sync_s:.2} s"),
    );

    let k = (args.churn * n as f64 / 2.0).round() as i64;
    churn(&pool, n, k).await?;
    // A trait's churn also changes k users' values: k left, k entered, k changed.
    let expected_added = if args.kind == Kind::Trait { 2 * k } else { k };
    let incr_cd = incremental_capture_diff(args, &pool, &opts, b, (expected_added, k)).await?;
    progress(
        args,
        &format!(
            "incremental: capture+diff {:.3} s vs reference {:.3} s",
            incr_cd.capture_s + incr_cd.diff_s,
            incr_cd.ref_capture_s + incr_cd.ref_diff_s
        ),
    );
    let (incr, incremental_sync_s, incremental_kib) = worker.sync().await?;
    ensure!(
        incr["kind"] == "incremental"
            && incr["status"] == "succeeded"
            && incr["added"] == expected_added
            && incr["removed"] == k
            && incr["sent"] == expected_added + k,
        "incremental sync: {incr}; expected {expected_added} added and {k} removed"
    );
    progress(
        args,
        &format!(
            "incremental sync ({expected_added} in or changed, {k} out) in {incremental_sync_s:.2} s"
        ),
    );

    receiver.shutdown().await;
    pool.close().await;

    // ---- Phase 5: memory ------------------------------------------------------------------
    let worker_kib = initial_kib.max(incremental_kib);
    ensure!(worker_kib > 0, "cannot read the worker process's peak RSS");
    let harness_kib = status_kib("VmHWM").unwrap_or(0);
    let mib = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;

    Ok(json!({
        "kind": args.kind.as_str(),
        "members": n,
        "churn": args.churn,
        "capture_diff_ratio": r3(capture_diff_ratio),
        "delivery_ratio": r3(delivery_ratio),
        "initial_sync_s": r3(initial_sync_s),
        "incremental_sync_s": r3(incremental_sync_s),
        "calls_per_s": calls_per_s.round(),
        "peak_rss_mib": mib(worker_kib),
        "harness_peak_rss_mib": mib(harness_kib),
        "generate_s": r3(generate_s),
        "capture_diff_s": r3(capture_diff_s),
        "ref_capture_s": r3(ref_capture_s),
        "ref_diff_s": r3(ref_diff_s),
        "ref_diff_write_s": r3(ref_diff_write_s),
        "incremental_capture_diff_ratio": r3(
            (incr_cd.capture_s + incr_cd.diff_s) / (incr_cd.ref_capture_s + incr_cd.ref_diff_s)
        ),
        "incremental_capture_s": r3(incr_cd.capture_s),
        "incremental_diff_s": r3(incr_cd.diff_s),
        "ref_incremental_capture_s": r3(incr_cd.ref_capture_s),
        "ref_incremental_diff_s": r3(incr_cd.ref_diff_s),
        "capture_ratio": r3(incr_cd.capture_s / incr_cd.ref_capture_s),
        "diff_ratio": r3(incr_cd.diff_s / incr_cd.ref_diff_s),
        "delivery_changes": delivered_n,
        "delivery_s": r3(delivery_s),
        "bare_s": r3(bare_s),
        "bare_calls_per_s": bare_calls_per_s.round(),
        "initial_calls_per_s": (n as f64 / initial_sync_s).round(),
        "churn_changes": expected_added + k,
        "concurrency": CONCURRENCY,
        "batch_size": BATCH_SIZE,
    }))
}

/// The bare SQL reference for capture and diff of audience `audience_id`: the query
/// materialised (`CREATE TEMP TABLE ref AS`; a trait's value in the same canonical JSON text
/// the worker compares, since the change set depends on it), then the set difference both
/// ways against its confirmed members (`EXCEPT` on ids, and for a trait on (id, value) pairs,
/// counted). Checks the counts against `expected` (entered or changed, left).
async fn reference(
    args: &Args,
    conn: &mut sqlx::PgConnection,
    audience_id: i64,
    expected: (i64, i64),
) -> Result<(f64, f64)> {
    let value = match args.kind {
        Kind::Audience => "NULL::text".to_string(),
        Kind::Trait => ValueType::Numeric.json_sql("q.value"),
    };
    let t = Instant::now();
    conn.execute(AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS ref;
         CREATE TEMP TABLE ref AS
         SELECT q.user_id::text AS user_id, q.email, q.phone, {value} AS value
           FROM ({}) q",
        args.query()
    )))
    .await?;
    let capture_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let counts: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM (SELECT user_id, value FROM ref
                                       EXCEPT
                                       SELECT user_id, value FROM synced_members
                                        WHERE audience_id = $1 AND member) a),
                (SELECT count(*) FROM (SELECT user_id FROM synced_members
                                        WHERE audience_id = $1 AND member
                                       EXCEPT
                                       SELECT user_id FROM ref) r)",
    )
    .bind(audience_id)
    .fetch_one(&mut *conn)
    .await?;
    let diff_s = t.elapsed().as_secs_f64();
    ensure!(
        counts == expected,
        "reference diff found {counts:?}, expected {expected:?}"
    );
    Ok((capture_s, diff_s))
}

/// Capture and diff of an incremental run, each timed, and their reference.
struct CaptureDiff {
    capture_s: f64,
    diff_s: f64,
    ref_capture_s: f64,
    ref_diff_s: f64,
}

/// An incremental run's capture and diff of `b` (N confirmed members, then churn: `k` left
/// and `k` entered), in process, against the reference on the same tables. The changes it
/// writes, and its run row, are removed again, so the worker's incremental sync that follows
/// finds the same changes itself.
async fn incremental_capture_diff(
    args: &Args,
    pool: &PgPool,
    opts: &PgConnectOptions,
    b: &Audience,
    expected: (i64, i64),
) -> Result<CaptureDiff> {
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO runs (audience_id, kind, status, owner)
         VALUES ($1, 'incremental', 'running', 'bench') RETURNING id",
    )
    .bind(b.id)
    .fetch_one(pool)
    .await?;
    let mut conn = db::dedicated(opts).await?;
    let t = Instant::now();
    let reader = snapshot::Reader::open(
        &mut conn,
        pool,
        &b.def.key,
        args.kind,
        args.query(),
        None,
        STATEMENT_TIMEOUT,
    )
    .await?;
    snapshot::capture(&mut conn, reader).await?;
    let capture_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let counts =
        diff::write_outbox(&mut conn, b.id, run_id, diff::Rules::new(&b.def, false)).await?;
    let diff_s = t.elapsed().as_secs_f64();
    ensure!(
        (counts.added, counts.removed) == expected,
        "incremental diff found {} added, {} removed; expected {expected:?}",
        counts.added,
        counts.removed
    );
    let (ref_capture_s, ref_diff_s) = reference(args, &mut conn, b.id, expected).await?;
    conn.close().await?;
    sqlx::query("DELETE FROM outbox WHERE audience_id = $1")
        .bind(b.id)
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM runs WHERE id = $1")
        .bind(run_id)
        .execute(pool)
        .await?;
    Ok(CaptureDiff {
        capture_s,
        diff_s,
        ref_capture_s,
        ref_diff_s,
    })
}

/// users 1..=1.25N; one recent order for 1..=N, an old (31-59 days) order for everyone;
/// amounts from 0.50 to 999.50 (numeric, two decimals).
async fn generate(pool: &PgPool, n: i64) -> Result<()> {
    let total = n + n / 4;
    let mut conn = pool.acquire().await?;
    conn.execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL, phone text NOT NULL);
         CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                              user_id bigint NOT NULL, completed_at timestamptz NOT NULL,
                              amount numeric(10, 2) NOT NULL DEFAULT 10);",
    )
    .await?;
    copy_rows(
        &mut conn,
        "COPY users (id, email, phone) FROM STDIN",
        1..=total,
        |buf, i| writeln!(buf, "{i}\tuser{i}@example.com\t+1555{i:09}"),
    )
    .await?;
    // The database's clock, so that "the last 30 days" of the query means the same days.
    let now: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *conn)
        .await?;
    // Users 1..=N ordered 1-28 days ago; every user also ordered 31-59 days ago.
    let recent = (1..=n).map(|i| (i, 1 + i % 28));
    let old = (1..=total).map(|i| (i, 31 + i % 29));
    copy_rows(
        &mut conn,
        "COPY orders (user_id, completed_at, amount) FROM STDIN",
        recent.chain(old),
        |buf, (user, days)| {
            let at = now - chrono::Duration::days(days) - chrono::Duration::seconds(user % 86_400);
            let amount = format!("{}.{}0", user % 1000, if user % 2 == 0 { 5 } else { 0 });
            writeln!(
                buf,
                "{user}\t{}\t{amount}",
                at.format("%Y-%m-%d %H:%M:%S%.6f+00")
            )
        },
    )
    .await?;
    conn.execute(
        "CREATE INDEX orders_user_completed ON orders (user_id, completed_at);
         ANALYZE users; ANALYZE orders;",
    )
    .await?;
    Ok(())
}

/// Streams text-format COPY rows, written by `write` for each item, to the server in chunks
/// of about 1 MiB (memory stays flat whatever the row count).
async fn copy_rows<T>(
    conn: &mut sqlx::PgConnection,
    statement: &str,
    items: impl Iterator<Item = T>,
    write: impl Fn(&mut String, T) -> std::fmt::Result,
) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut copy = conn.copy_in_raw(statement).await?;
    let mut buf = String::with_capacity(CHUNK + 256);
    for item in items {
        write(&mut buf, item)?;
        if buf.len() >= CHUNK {
            copy.send(std::mem::replace(&mut buf, String::with_capacity(CHUNK + 256)).into_bytes())
                .await?;
        }
    }
    if !buf.is_empty() {
        copy.send(buf.into_bytes()).await?;
    }
    copy.finish().await?;
    Ok(())
}

/// Members 1..=k leave (their recent order is deleted); users N+1..=N+k join; members
/// k+1..=2k spend more (their recent order's amount grows by 1: a trait's value changes, an
/// audience's membership does not).
async fn churn(pool: &PgPool, n: i64, k: i64) -> Result<()> {
    if k > n / 4 {
        bail!("churn too large for the generated non-members");
    }
    sqlx::query(
        "DELETE FROM orders WHERE user_id BETWEEN 1 AND $1
            AND completed_at > now() - interval '30 days'",
    )
    .bind(k)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO orders (user_id, completed_at)
         SELECT i, now() - interval '2 days' FROM generate_series($1::bigint + 1, $1::bigint + $2) i",
    )
    .bind(n)
    .bind(k)
    .execute(pool)
    .await?;
    sqlx::query(
        "UPDATE orders SET amount = amount + 1 WHERE user_id BETWEEN $1 + 1 AND 2 * $1
            AND completed_at > now() - interval '30 days'",
    )
    .bind(k)
    .execute(pool)
    .await?;
    pool.execute("ANALYZE orders").await?;
    Ok(())
}

/// Sends the same payloads with a plain reqwest client, `CONCURRENCY` in flight, no database.
async fn bare_client(
    receiver: &Receiver,
    a: &Audience,
    changes: &[Change],
    expected: i64,
) -> Result<f64> {
    audience_sync::wigzo::install_crypto_provider();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .timeout(Duration::from_secs(30))
        .build()?;
    let endpoint = format!("{}{IDENTIFY_PATH}", receiver.base_url());
    let t = Instant::now();
    let ok = futures::stream::iter(changes)
        .map(|c| {
            let body = Identify::new(a.id, &a.def.key, a.def.kind, c);
            let req = http
                .post(&endpoint)
                .query(&[("org_token", TOKEN)])
                .json(&body);
            async move {
                let resp = req.send().await?;
                let success = resp.status().is_success();
                resp.bytes().await?;
                Ok::<bool, reqwest::Error>(success)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .filter(|r| futures::future::ready(matches!(r, Ok(true))))
        .count()
        .await;
    let s = t.elapsed().as_secs_f64();
    ensure!(
        ok as i64 == expected,
        "bare client: {ok} of {expected} calls succeeded"
    );
    Ok(s)
}

/// A `/proc/self/status` field in KiB.
fn status_kib(field: &str) -> Option<u64> {
    status_field_kib(&std::fs::read_to_string("/proc/self/status").ok()?, field)
}

/// A field of a `/proc/<pid>/status` text, in KiB.
fn status_field_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The `audience-sync` binary of this package, run against the bench database and receiver.
struct WorkerProcess<'a> {
    config: &'a std::path::Path,
    db_url: &'a str,
    receiver: &'a Receiver,
    key: &'a str,
    kind: Kind,
}

impl WorkerProcess<'_> {
    /// Runs `sync --audience <key>` to completion; returns its one report, the wall time and
    /// the process's peak RSS in KiB. The peak is its own `VmHWM`, read every 20 ms while it
    /// runs: the rusage of a waited-for child would also count the harness's own memory, which
    /// a spawned child carries until it executes the binary.
    async fn sync(&self) -> Result<(Value, f64, u64)> {
        let t = Instant::now();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_audience-sync"))
            .args(["--json", "--config"])
            .arg(self.config)
            .args(["sync", &format!("--{}", self.kind), self.key])
            .env("DATABASE_URL", self.db_url)
            .env("WIGZO_BASE_URL", self.receiver.base_url())
            .env("WIGZO_ORG_TOKEN", TOKEN)
            .env_remove("AUDIENCE_SYNC_CONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("cannot run the audience-sync binary")?;
        let status_path = format!("/proc/{}/status", child.id().unwrap_or(0));
        let mut peak_kib = 0;
        let out = child.wait_with_output();
        tokio::pin!(out);
        let out = loop {
            tokio::select! {
                out = &mut out => break out?,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    if let Some(kib) = std::fs::read_to_string(&status_path)
                        .ok()
                        .and_then(|s| status_field_kib(&s, "VmHWM"))
                    {
                        peak_kib = peak_kib.max(kib);
                    }
                }
            }
        };
        let secs = t.elapsed().as_secs_f64();
        ensure!(
            out.status.success(),
            "audience-sync sync exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let reports: Vec<Value> = serde_json::from_slice(&out.stdout)
            .context("audience-sync sync printed no JSON reports")?;
        let [report] = <[Value; 1]>::try_from(reports)
            .map_err(|r| anyhow::anyhow!("expected one report, got {}", r.len()))?;
        Ok((report, secs, peak_kib))
    }
}

fn print_table(v: &Value) {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "audience-sync bench ({}): {} members, churn {} ({} changes), concurrency {}, batch {}",
        v["kind"], v["members"], v["churn"], v["churn_changes"], v["concurrency"], v["batch_size"]
    );
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "phase", "ours", "reference", "ratio"
    );
    let row = |name: &str, ours: f64, reference: f64, ratio: f64| {
        println!("{name:<34} {ours:>10.3} s {reference:>10.3} s {ratio:>8.3}");
    };
    row(
        "1+2. first sync: capture + diff",
        f("capture_diff_s"),
        f("ref_capture_s") + f("ref_diff_s"),
        f("capture_diff_ratio"),
    );
    row(
        "1. incremental: capture",
        f("incremental_capture_s"),
        f("ref_incremental_capture_s"),
        f("capture_ratio"),
    );
    row(
        "2. incremental: diff",
        f("incremental_diff_s"),
        f("ref_incremental_diff_s"),
        f("diff_ratio"),
    );
    row(
        "1+2. incremental: capture + diff",
        f("incremental_capture_s") + f("incremental_diff_s"),
        f("ref_incremental_capture_s") + f("ref_incremental_diff_s"),
        f("incremental_capture_diff_ratio"),
    );
    println!(
        "{:<34} {:>12} {:>10.3} s  (informational)",
        "   diff written to a plain table",
        "",
        f("ref_diff_write_s")
    );
    println!(
        "{:<34} {:>12.0} {:>12.0} {:>8.3}",
        format!("3. delivery calls/s ({} calls)", v["delivery_changes"]),
        f("calls_per_s"),
        f("bare_calls_per_s"),
        f("delivery_ratio")
    );
    println!(
        "{:<34} {:>10.3} s",
        "4. initial sync (worker process)",
        f("initial_sync_s")
    );
    println!(
        "{:<34} {:>10.3} s",
        "4. incremental sync (same)",
        f("incremental_sync_s")
    );
    println!(
        "{:<34} {:>10.1} MiB (the audience-sync process of phase 4)",
        "5. peak RSS of the worker",
        f("peak_rss_mib")
    );
    println!(
        "{:<34} {:>10.1} MiB (receiver and bare client included)",
        "   peak RSS of the bench process",
        f("harness_peak_rss_mib")
    );
    println!("capture_diff_ratio = {}", v["capture_diff_ratio"]);
    println!(
        "incremental_capture_diff_ratio = {}",
        v["incremental_capture_diff_ratio"]
    );
    println!("delivery_ratio     = {}", v["delivery_ratio"]);
}
