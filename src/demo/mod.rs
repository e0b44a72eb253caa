//! `audience-sync demo`: the whole job in one command, on a throwaway shop database and an
//! in-process Wigzo-compatible receiver, with no setup.
//!
//! It seeds a small shop, defines three audiences and a computed trait (lifetime value), runs an
//! initial sync, moves the shop forward a week (new orders, time passing), runs an incremental
//! sync and a full resync, printing what was sent at each step, and checks that what the
//! receiver got matches what the runs report.
//!
//! The demo's machinery lives here, apart from the sync path, which never imports it:
//! [`embedded_pg`] (a throwaway PostgreSQL cluster) and [`receiver`] (an in-process
//! Wigzo-compatible receiver, also used by the benchmarks).

pub mod embedded_pg;
pub mod receiver;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::audience::{self, Audience, AudienceDef};
use crate::config::{DEFAULT_BASE_URL, DEFAULT_SCHEDULE, EnvOverrides, WigzoConfig};
use crate::status;
use crate::sync::{Mode, RunReport, Worker, owner_id};
use crate::wigzo::WigzoClient;
use embedded_pg::EmbeddedPostgres;
use receiver::Receiver;

/// Users seeded when `--members` is not given.
pub const DEFAULT_MEMBERS: i64 = 3000;
/// The org token the in-process receiver expects.
const DEMO_TOKEN: &str = "demo-token";
/// The audience given a full resync in step 4.
const RESYNC_KEY: &str = "dormant_shoppers";
/// The demo's computed trait.
const TRAIT_KEY: &str = "lifetime_value";

/// What `demo` was asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Keep the database (embedded cluster or created database) afterwards.
    pub keep: bool,
    /// Send to the real Wigzo (needs `WIGZO_ORG_TOKEN`).
    pub live: bool,
    /// Users to seed.
    pub members: i64,
}

/// Runs the demo; returns the exit code. Ctrl-C stops it and still removes the database.
pub async fn run(opts: &DemoOptions) -> Result<i32> {
    if !(10..=1_000_000).contains(&opts.members) {
        bail!("--members must be between 10 and 1000000");
    }
    let started = Instant::now();
    let env = EnvOverrides::from_env();
    let db = DemoDb::open(env.database_url.as_deref()).await?;
    let outcome = tokio::select! {
        r = story(&db, opts, &env) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted; removing the demo database")),
    };
    db.finish(opts.keep).await;
    let calls = outcome?;
    println!(
        "\ndemo finished: {calls} calls received, matching {calls} sent ({:.1}s in all)",
        started.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// Where the demo's data lives.
enum DemoDb {
    /// A database created on the server of `DATABASE_URL`.
    External {
        admin: Box<PgConnectOptions>,
        name: String,
        opts: PgConnectOptions,
        /// `DATABASE_URL` pointed at the new database, for `--keep`.
        url: String,
    },
    /// A private cluster, stopped and removed on drop.
    Embedded {
        pg: EmbeddedPostgres,
        opts: PgConnectOptions,
    },
}

impl DemoDb {
    async fn open(database_url: Option<&str>) -> Result<Self> {
        if let Some(url) = database_url {
            let admin = crate::db::options(&SecretString::from(url.to_string()))?;
            match admin.connect().await {
                Ok(mut conn) => {
                    let name = format!(
                        "audience_sync_demo_{}",
                        &uuid::Uuid::new_v4().simple().to_string()[..12]
                    );
                    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                        .execute(&mut conn)
                        .await
                        .with_context(|| format!("cannot create the demo database {name}"))?;
                    let _ = conn.close().await;
                    println!("database: created {name} on the server of DATABASE_URL");
                    return Ok(Self::External {
                        opts: admin.clone().database(&name),
                        url: url_with_database(url, &name),
                        admin: Box::new(admin),
                        name,
                    });
                }
                Err(e) => {
                    println!(
                        "database: DATABASE_URL is set but unreachable ({}); using a throwaway PostgreSQL instead",
                        audience::db_message(&e)
                    );
                }
            }
        }
        let t = Instant::now();
        let pg = EmbeddedPostgres::start().await?;
        let opts = crate::db::options(&SecretString::from(pg.url()))?;
        println!(
            "database: throwaway PostgreSQL cluster in {} (started in {:.1}s)",
            pg.socket_dir().display(),
            t.elapsed().as_secs_f64()
        );
        Ok(Self::Embedded { pg, opts })
    }

    fn options(&self) -> &PgConnectOptions {
        match self {
            Self::External { opts, .. } | Self::Embedded { opts, .. } => opts,
        }
    }

    /// Removes the database, or keeps it and says how to use it.
    async fn finish(self, keep: bool) {
        match self {
            Self::External {
                admin, name, url, ..
            } => {
                if keep {
                    println!("\nkept the demo database {name}; inspect it with:");
                    println!("  DATABASE_URL='{url}' audience-sync status");
                    println!("  DATABASE_URL='{url}' audience-sync runs");
                    println!("remove it with: DROP DATABASE {name};");
                    return;
                }
                let dropped = async {
                    let mut conn = admin.connect().await?;
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await?;
                    conn.close().await
                }
                .await;
                if let Err(e) = dropped {
                    eprintln!(
                        "warning: cannot drop the demo database {name}: {}",
                        audience::db_message(&e)
                    );
                }
            }
            Self::Embedded { pg, .. } => {
                if keep {
                    let url = pg.url();
                    println!("\n{}", pg.keep().trim_end());
                    println!("  run status against it:  DATABASE_URL='{url}' audience-sync status");
                }
                // Otherwise dropping `pg` stops the server and removes its folder.
            }
        }
    }
}

/// `url` with its database name replaced by `name`; a password is masked.
fn url_with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", base));
    let (authority, _db) = rest.split_once('/').unwrap_or((rest, ""));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:PASSWORD@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let mut out = format!("{scheme}://{authority}/{name}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The three demo audiences, then the demo's computed trait. Their queries read "now" from
/// `demo_clock` so the demo can move time forward.
pub fn audience_defs() -> Vec<AudienceDef> {
    let def = |name: &str, query: &str| AudienceDef {
        key: audience::derive_key(name).expect("demo names have keys"),
        kind: if name == "Lifetime Value" {
            audience::Kind::Trait
        } else {
            audience::Kind::Audience
        },
        on_missing: audience::OnMissing::Null,
        name: name.to_string(),
        schedule: DEFAULT_SCHEDULE.to_string(),
        query: query.to_string(),
        source_url: None,
        enabled: true,
        guard: crate::guard::Guard::default(),
    };
    vec![
        def(
            "Order Completed Last 30days",
            "SELECT u.id AS user_id, u.email, u.phone
               FROM demo_users u
              WHERE EXISTS (SELECT 1 FROM demo_orders o, demo_clock c
                             WHERE o.user_id = u.id
                               AND o.ordered_at > c.now - interval '30 days'
                               AND o.ordered_at <= c.now)",
        ),
        def(
            "Dormant Shoppers",
            "SELECT u.id AS user_id, u.email, u.phone
               FROM demo_users u
              WHERE EXISTS (SELECT 1 FROM demo_orders o, demo_clock c
                             WHERE o.user_id = u.id AND o.ordered_at <= c.now - interval '30 days')
                AND NOT EXISTS (SELECT 1 FROM demo_orders o, demo_clock c
                                 WHERE o.user_id = u.id
                                   AND o.ordered_at > c.now - interval '30 days'
                                   AND o.ordered_at <= c.now)",
        ),
        def(
            "High-Value Customers (EU)",
            "SELECT u.id AS user_id, u.email, u.phone
               FROM demo_users u
              WHERE u.country IN ('DE', 'FR', 'IT', 'ES', 'NL', 'IE', 'PL', 'SE')
                AND (SELECT sum(o.amount) FROM demo_orders o, demo_clock c
                      WHERE o.user_id = u.id AND o.ordered_at <= c.now) > 400",
        ),
        def(
            "Lifetime Value",
            "SELECT u.id AS user_id, u.email, u.phone, sum(o.amount) AS value
               FROM demo_users u JOIN demo_orders o ON o.user_id = u.id, demo_clock c
              WHERE o.ordered_at <= c.now
              GROUP BY u.id",
        ),
    ]
}

/// Seeds the shop: users, orders over the last 60 days, and the clock. Deterministic (seeded
/// random) so runs print the same numbers.
const SEED: &[&str] = &[
    "CREATE TABLE demo_clock (now timestamptz NOT NULL)",
    "INSERT INTO demo_clock VALUES (date_trunc('hour', now()))",
    "CREATE TABLE demo_users (
        id      bigint PRIMARY KEY,
        email   text NOT NULL,
        phone   text,
        country text NOT NULL)",
    "CREATE TABLE demo_orders (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id    bigint NOT NULL REFERENCES demo_users (id),
        amount     numeric(10, 2) NOT NULL,
        ordered_at timestamptz NOT NULL)",
    "CREATE INDEX demo_orders_user ON demo_orders (user_id, ordered_at)",
];

/// Users, then orders for 70% of them (1 to 4 each, spread over the last 60 days).
const SEED_ROWS: &[&str] = &[
    "INSERT INTO demo_users (id, email, phone, country)
     SELECT g, 'shopper' || g || '@example.com',
            CASE WHEN g % 5 = 0 THEN NULL ELSE '+1555' || lpad(g::text, 7, '0') END,
            (ARRAY['DE', 'FR', 'IT', 'ES', 'NL', 'US', 'GB', 'IN', 'BR', 'CA'])[1 + (g * 7) % 10]
       FROM generate_series(1, $1::bigint) g",
    "INSERT INTO demo_orders (user_id, amount, ordered_at)
     SELECT u.id, round((10 + random() * 240)::numeric, 2),
            c.now - random() * interval '60 days'
       FROM demo_users u CROSS JOIN demo_clock c
            CROSS JOIN LATERAL generate_series(1, 1 + (u.id % 4)::int) n
      WHERE u.id % 10 < 7",
];

/// A week passes; one user in nine orders in that week (some new, some coming back).
const MOVE_FORWARD: &[&str] = &[
    "UPDATE demo_clock SET now = now + interval '7 days'",
    "SELECT setseed(0.7)",
    "INSERT INTO demo_orders (user_id, amount, ordered_at)
     SELECT u.id, round((20 + random() * 300)::numeric, 2),
            c.now - random() * interval '7 days'
       FROM demo_users u CROSS JOIN demo_clock c
      WHERE u.id % 9 = 0",
];

async fn exec_all(pool: &PgPool, stmts: &[&'static str]) -> Result<()> {
    let mut tx = pool.begin().await?;
    for s in stmts {
        sqlx::query(*s)
            .execute(&mut *tx)
            .await
            .map_err(|e| anyhow!("demo SQL failed: {}", audience::db_message(&e)))?;
    }
    tx.commit().await?;
    Ok(())
}

/// The destination: the in-process receiver, or the real Wigzo with `--live`.
struct Destination {
    receiver: Option<Receiver>,
    wigzo: WigzoConfig,
}

async fn destination(opts: &DemoOptions, env: &EnvOverrides) -> Result<Destination> {
    if opts.live {
        let Some(token) = env.org_token.clone() else {
            bail!("--live needs WIGZO_ORG_TOKEN (the organization token of your Wigzo account)");
        };
        let base = env
            .base_url
            .clone()
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
        println!("destination: Wigzo at {base} (live)");
        return Ok(Destination {
            receiver: None,
            wigzo: WigzoConfig::new(base, token),
        });
    }
    let receiver = Receiver::start(DEMO_TOKEN)
        .await
        .context("cannot start the demo receiver")?;
    println!(
        "destination: in-process Wigzo-compatible receiver at {}",
        receiver.base_url()
    );
    let mut wigzo = WigzoConfig::new(receiver.base_url(), DEMO_TOKEN);
    wigzo.requests_per_second = 0;
    wigzo.concurrency = 16;
    Ok(Destination {
        receiver: Some(receiver),
        wigzo,
    })
}

/// The story; returns the number of calls sent (and, with the receiver, received).
async fn story(db: &DemoDb, opts: &DemoOptions, env: &EnvOverrides) -> Result<u64> {
    let pool = crate::db::pool_options()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(db.options().clone())
        .await
        .context("cannot connect to the demo database")?;
    let result = story_on(&pool, db, opts, env).await;
    pool.close().await;
    result
}

async fn story_on(
    pool: &PgPool,
    db: &DemoDb,
    opts: &DemoOptions,
    env: &EnvOverrides,
) -> Result<u64> {
    crate::db::migrate(pool).await?;
    let t = Instant::now();
    exec_all(pool, SEED).await?;
    {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT setseed(0.42)")
            .execute(&mut *tx)
            .await?;
        for s in SEED_ROWS {
            sqlx::query(*s)
                .bind(opts.members)
                .execute(&mut *tx)
                .await
                .map_err(|e| anyhow!("demo SQL failed: {}", audience::db_message(&e)))?;
        }
        tx.commit().await?;
    }
    let (users, orders): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM demo_users), (SELECT count(*) FROM demo_orders)",
    )
    .fetch_one(pool)
    .await?;
    println!(
        "shop: seeded {users} users and {orders} orders over the last 60 days in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let defs = audience_defs();
    let stored = audience::store_definitions(pool, &defs).await?;
    for a in &stored {
        println!("{}: {} ({})", a.def.kind, a.def.key, a.def.name);
    }

    let mut dest = destination(opts, env).await?;
    let worker = Worker {
        pool: pool.clone(),
        connect: db.options().clone(),
        client: WigzoClient::new(&dest.wigzo)?,
        wigzo: dest.wigzo.clone(),
        statement_timeout: Duration::from_secs(60),
        owner: owner_id(),
        cancel: CancellationToken::new(),
        progress: false,
    };
    let all: Vec<&Audience> = stored.iter().collect();
    let mut sent = 0u64;

    let r = step(&worker, "1) initial sync", &all, Mode::Sync).await?;
    sent += total_sent(&r);
    if let Some(rx) = &dest.receiver {
        for key in [stored[0].def.key.as_str(), TRAIT_KEY] {
            if let Some(sample) = rx.sample(key) {
                println!(
                    "\nsample identify call ({key}):\n{}",
                    serde_json::to_string_pretty(&sample)?
                );
            }
        }
    }

    exec_all(pool, MOVE_FORWARD).await?;
    let new_orders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM demo_orders o, demo_clock c WHERE o.ordered_at > c.now - interval '7 days'",
    )
    .fetch_one(pool)
    .await?;
    println!("\n2) the shop moves forward: 7 days pass, {new_orders} new orders");

    let r = step(&worker, "3) incremental sync", &all, Mode::Sync).await?;
    sent += total_sent(&r);

    let dormant: Vec<&Audience> = stored.iter().filter(|a| a.def.key == RESYNC_KEY).collect();
    let r = step(
        &worker,
        &format!("4) full resync of {RESYNC_KEY}"),
        &dormant,
        Mode::FullResync,
    )
    .await?;
    sent += total_sent(&r);

    let rows = status::audiences(pool)
        .await
        .context("cannot read status")?;
    println!("\nstatus:");
    print!("{}", status::render_audiences(&rows));

    // Consistency: confirmed membership (for the trait: users with a value, and the values
    // themselves) equals what the queries say now.
    for a in &stored {
        let expected: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM ({}) q",
            a.def.query
        )))
        .fetch_one(pool)
        .await?;
        let got = rows
            .iter()
            .find(|r| r.key == a.def.key)
            .map(|r| r.members)
            .unwrap_or(-1);
        if got != expected {
            bail!(
                "{}: {got} confirmed members, but its query returns {expected}",
                a.def.label()
            );
        }
    }
    let trait_id = stored
        .iter()
        .find(|a| a.def.key == TRAIT_KEY)
        .map(|a| a.id)
        .context("the demo trait is stored")?;
    let wrong: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM ({}) q
           JOIN synced_members s ON s.audience_id = {trait_id} AND s.user_id = q.user_id::text
          WHERE s.value::numeric <> q.value",
        audience_defs()
            .iter()
            .find(|d| d.key == TRAIT_KEY)
            .map(|d| d.query.clone())
            .unwrap_or_default()
    )))
    .fetch_one(pool)
    .await?;
    if wrong > 0 {
        bail!("{TRAIT_KEY}: {wrong} users' confirmed values differ from what the query says now");
    }
    match dest.receiver.take() {
        Some(rx) => {
            let calls = rx.calls();
            rx.shutdown().await;
            if calls != sent {
                bail!("the receiver got {calls} calls, but the runs report {sent} sent");
            }
        }
        None => println!("(live: calls went to Wigzo; receiver check skipped)"),
    }
    Ok(sent)
}

fn total_sent(reports: &[RunReport]) -> u64 {
    reports.iter().map(|r| r.sent).sum()
}

/// Runs the audiences one after another and prints what each sent; fails if one failed.
async fn step(
    worker: &Worker,
    title: &str,
    audiences: &[&Audience],
    mode: Mode,
) -> Result<Vec<RunReport>> {
    let mut reports = Vec::with_capacity(audiences.len());
    for a in audiences {
        reports.push(worker.run(a, mode, false).await);
    }
    println!("\n{title}:");
    print!("{}", render_step(&reports));
    if let Some(bad) = reports.iter().find(|r| !r.succeeded()) {
        bail!(
            "{} {} failed: {}",
            bad.audience,
            bad.kind,
            bad.error.as_deref().unwrap_or("unknown error")
        );
    }
    Ok(reports)
}

/// A step's table: per audience, entered / left / calls / time.
pub fn render_step(reports: &[RunReport]) -> String {
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.audience.clone(),
                r.computation.to_string(),
                r.kind.to_string(),
                r.members.to_string(),
                r.added.to_string(),
                r.removed.to_string(),
                r.sent.to_string(),
                format!("{:.2}s", r.duration_ms as f64 / 1000.0),
            ]
        })
        .collect();
    status::table(
        &[
            "KEY", "KIND", "RUN", "MEMBERS", "ADDED", "REMOVED", "CALLS", "TIME",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_audiences_have_the_documented_keys() {
        let keys: Vec<String> = audience_defs().into_iter().map(|d| d.key).collect();
        assert_eq!(
            keys,
            [
                "order_completed_last_30days",
                "dormant_shoppers",
                "high_value_customers_eu",
                "lifetime_value"
            ]
        );
    }

    #[test]
    fn kept_database_url_points_at_the_demo_database() {
        assert_eq!(
            url_with_database("postgres://postgres@127.0.0.1:5432/postgres", "d1"),
            "postgres://postgres@127.0.0.1:5432/d1"
        );
        assert_eq!(
            url_with_database("postgres://u:secret@h/db?sslmode=disable", "d1"),
            "postgres://u:PASSWORD@h/d1?sslmode=disable"
        );
        assert_eq!(url_with_database("postgres://h", "d1"), "postgres://h/d1");
    }
}
