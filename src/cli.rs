//! The command line: parses arguments, prepares the database and audiences, runs commands and
//! prints their results as text or JSON.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::audience::{self, Audience, Kind};
use crate::config::{Config, EnvOverrides};
use crate::status;
use crate::sync::{Mode, RunOptions, RunReport, Worker, owner_id};
use crate::telemetry::LogFormat;
use crate::wigzo::WigzoClient;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "audience-sync",
    version,
    about = "Keeps Wigzo in step with audience membership computed in PostgreSQL"
)]
pub struct Cli {
    /// Config file (default: $AUDIENCE_SYNC_CONFIG, else ./audience-sync.toml if present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "AUDIENCE_SYNC_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// More detailed logs.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The scheduled worker: syncs each audience on its cron schedule until SIGTERM/SIGINT,
    /// reloads the config on SIGHUP, and serves /healthz, /readyz, /metrics and a status page.
    Run(RunArgs),
    /// Sync audiences and computed traits now: initial or incremental, as due.
    Sync(SyncArgs),
    /// Full resync of one audience (every member again, and `false` for those who left) or
    /// trait (every value again, and null for users who no longer have one).
    Resync(ResyncArgs),
    /// Send the changes Wigzo rejected (4xx) again: makes them pending and syncs the audience
    /// (or trait) now. Rejected changes are otherwise held until the user's value changes or a
    /// full resync.
    Retry(RetryArgs),
    /// One line per audience and trait: members, last run, pending and failed changes.
    Status,
    /// Recent runs with their counts.
    Runs(RunsArgs),
    /// Apply database migrations.
    Migrate,
    /// Write a commented example config file.
    Init(InitArgs),
    /// The whole job in one command: a throwaway shop database, three audiences and a computed
    /// trait, an initial sync, a week later an incremental sync, then a full resync (no setup
    /// needed).
    Demo(DemoArgs),
}

/// `run`'s arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address of the ops HTTP server (default: [ops] listen, else 127.0.0.1:9187).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

/// `sync`'s arguments.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Audience key (repeatable; with neither --audience nor --trait: every enabled audience
    /// and trait).
    #[arg(long = "audience", value_name = "KEY")]
    pub audiences: Vec<String>,
    /// Computed trait key (repeatable).
    #[arg(long = "trait", value_name = "KEY")]
    pub traits: Vec<String>,
    /// Compute and show what would be sent; send nothing, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Send removals the removal guard held, once (needs --audience or --trait): a person's
    /// release.
    #[arg(long)]
    pub allow_removals: bool,
}

/// One audience or one trait, named by key.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct OneKey {
    /// Audience key.
    #[arg(long = "audience", value_name = "KEY")]
    pub audience: Option<String>,
    /// Computed trait key.
    #[arg(long = "trait", value_name = "KEY")]
    pub trait_key: Option<String>,
}

impl OneKey {
    /// The key and its kind.
    pub fn get(&self) -> (&str, Kind) {
        match (&self.audience, &self.trait_key) {
            (Some(a), _) => (a, Kind::Audience),
            (None, Some(t)) => (t, Kind::Trait),
            (None, None) => unreachable!("clap requires one of --audience and --trait"),
        }
    }
}

/// `resync`'s arguments.
#[derive(Debug, Args)]
pub struct ResyncArgs {
    /// Which audience or trait.
    #[command(flatten)]
    pub which: OneKey,
    /// Compute and show what would be sent; send nothing, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Send removals the removal guard held, once: a person's release.
    #[arg(long)]
    pub allow_removals: bool,
}

/// `retry`'s arguments.
#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Which audience or trait.
    #[command(flatten)]
    pub which: OneKey,
}

/// `runs`' arguments.
#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Only this audience's (or trait's) runs.
    #[arg(long = "audience", visible_alias = "trait", value_name = "KEY")]
    pub audience: Option<String>,
    /// How many, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
}

/// `init`'s arguments.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where to write it.
    #[arg(default_value = "audience-sync.toml")]
    pub path: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,
}

/// `demo`'s arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo database afterwards and print how to inspect it.
    #[arg(long)]
    pub keep: bool,
    /// Send to the real Wigzo (needs WIGZO_ORG_TOKEN) instead of the in-process receiver.
    #[arg(long)]
    pub live: bool,
    /// Users in the demo shop.
    #[arg(long, value_name = "N", default_value_t = crate::demo::DEFAULT_MEMBERS)]
    pub members: i64,
}

/// The example config written by `init`.
pub const EXAMPLE_CONFIG: &str = include_str!("../audience-sync.example.toml");

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> Result<i32> {
    let env = EnvOverrides::from_env();
    match &cli.command {
        Command::Demo(args) => cmd_demo(args).await,
        Command::Init(args) => cmd_init(args),
        Command::Migrate => cmd_migrate(&cli, &env).await,
        Command::Status => cmd_status(&cli, &env).await,
        Command::Runs(args) => cmd_runs(&cli, &env, args).await,
        Command::Run(args) => cmd_run(&cli, &env, args).await,
        Command::Sync(args) => cmd_sync(&cli, &env, args).await,
        Command::Retry(args) => cmd_retry(&cli, &env, args).await,
        Command::Resync(args) => cmd_resync(&cli, &env, args).await,
    }
}

/// `demo`: the whole job on a throwaway database and receiver.
async fn cmd_demo(args: &DemoArgs) -> Result<i32> {
    crate::demo::run(&crate::demo::DemoOptions {
        keep: args.keep,
        live: args.live,
        members: args.members,
    })
    .await
}

/// `init`: writes the example config.
fn cmd_init(args: &InitArgs) -> Result<i32> {
    if args.path.exists() && !args.force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            args.path.display()
        );
    }
    std::fs::write(&args.path, EXAMPLE_CONFIG)
        .with_context(|| format!("cannot write {}", args.path.display()))?;
    println!(
        "wrote {}; edit it, then run `audience-sync sync --dry-run`",
        args.path.display()
    );
    Ok(0)
}

/// `migrate`: applies the migrations.
async fn cmd_migrate(cli: &Cli, env: &EnvOverrides) -> Result<i32> {
    let cfg = load_config(cli, env)?;
    let _pool = connect(&cfg).await?;
    if cli.json {
        println!("{}", serde_json::json!({"migrated": true}));
    } else {
        println!("database is up to date");
    }
    Ok(0)
}

/// `status`: one line per audience.
async fn cmd_status(cli: &Cli, env: &EnvOverrides) -> Result<i32> {
    let cfg = load_config(cli, env)?;
    let pool = prepare_for_reading(cli, &cfg).await?;
    let rows = status::audiences(&pool)
        .await
        .context("cannot read status")?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", status::render_audiences(&rows));
    }
    Ok(0)
}

/// `runs`: recent runs.
async fn cmd_runs(cli: &Cli, env: &EnvOverrides, args: &RunsArgs) -> Result<i32> {
    let cfg = load_config(cli, env)?;
    let pool = prepare_for_reading(cli, &cfg).await?;
    let rows = status::runs(&pool, args.audience.as_deref(), args.limit.clamp(1, 10_000))
        .await
        .context("cannot read runs")?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", status::render_runs(&rows));
    }
    Ok(0)
}

/// `run`: the daemon.
async fn cmd_run(cli: &Cli, env: &EnvOverrides, args: &RunArgs) -> Result<i32> {
    let cfg = load_config(cli, env)?;
    let (pool, stored) = prepare(&cfg).await?;
    let mut worker = worker(&cfg, pool.clone())?;
    // A daemon logs progress; bars are for people watching a CLI command.
    worker.progress = false;
    share_budget(&worker);
    crate::scheduler::run(cfg, env.clone(), pool, stored, worker, args.listen.clone()).await?;
    Ok(0)
}

/// `sync`: one run of the chosen audiences now.
async fn cmd_sync(cli: &Cli, env: &EnvOverrides, args: &SyncArgs) -> Result<i32> {
    let cfg = load_config(cli, env)?;
    for key in &args.audiences {
        cfg.lookup(key, Kind::Audience)?;
    }
    for key in &args.traits {
        cfg.lookup(key, Kind::Trait)?;
    }
    let every = args.audiences.is_empty() && args.traits.is_empty();
    if args.allow_removals && every {
        bail!("--allow-removals releases one held run: name it with --audience KEY or --trait KEY");
    }
    let (pool, stored) = prepare(&cfg).await?;
    let chosen: Vec<&Audience> = stored
        .iter()
        .filter(|a| {
            if every {
                a.def.enabled
            } else {
                args.audiences.contains(&a.def.key) || args.traits.contains(&a.def.key)
            }
        })
        .collect();
    if chosen.is_empty() {
        bail!(
            "no enabled audiences or traits to sync; add [[audience]] or [[trait]] entries to the config file (see `audience-sync init`)"
        );
    }
    let worker = worker(&cfg, pool)?;
    if !args.dry_run {
        share_budget(&worker);
    }
    let opts = RunOptions {
        allow_removals: args.allow_removals,
        ..RunOptions::manual(args.dry_run)
    };
    let reports = run_all(&worker, &chosen, Mode::Sync, opts).await;
    print_reports(cli, &reports);
    Ok(exit_code(&reports))
}

/// `retry`: rejected changes queued again, then a sync.
async fn cmd_retry(cli: &Cli, env: &EnvOverrides, args: &RetryArgs) -> Result<i32> {
    let (cfg, pool, a) = prepare_one(cli, env, &args.which).await?;
    let requeued = crate::outbox::requeue_rejected(&pool, a.id, None)
        .await
        .context("cannot queue the rejected changes again")?;
    tracing::info!(audience = %a.def.key, requeued, "rejected changes queued again");
    if !cli.json {
        println!("{}: {requeued} rejected changes queued again", a.def.key);
    }
    let worker = worker(&cfg, pool)?;
    share_budget(&worker);
    let reports = run_all(&worker, &[&a], Mode::Sync, RunOptions::manual(false)).await;
    print_reports(cli, &reports);
    Ok(exit_code(&reports))
}

/// `resync`: a full resync of one audience.
async fn cmd_resync(cli: &Cli, env: &EnvOverrides, args: &ResyncArgs) -> Result<i32> {
    let (cfg, pool, a) = prepare_one(cli, env, &args.which).await?;
    let worker = worker(&cfg, pool)?;
    if !args.dry_run {
        share_budget(&worker);
    }
    let opts = RunOptions {
        allow_removals: args.allow_removals,
        ..RunOptions::manual(args.dry_run)
    };
    let reports = run_all(&worker, &[&a], Mode::FullResync, opts).await;
    print_reports(cli, &reports);
    Ok(exit_code(&reports))
}

/// The config, the database and the one audience or trait `which` names: checked against the
/// config file first, then stored with the others.
async fn prepare_one(
    cli: &Cli,
    env: &EnvOverrides,
    which: &OneKey,
) -> Result<(Config, sqlx::PgPool, Audience)> {
    let cfg = load_config(cli, env)?;
    let (key, kind) = which.get();
    cfg.lookup(key, kind)?;
    let (pool, stored) = prepare(&cfg).await?;
    let a = stored
        .into_iter()
        .find(|a| a.def.key == key)
        .expect("validated above");
    Ok((cfg, pool, a))
}

/// 0: every run succeeded; 3: the only runs that did not were held by the removal guard
/// (they wait for a person); 1: a run failed or ended partial.
fn exit_code(reports: &[RunReport]) -> i32 {
    if reports.iter().all(RunReport::succeeded) {
        0
    } else if reports.iter().all(|r| r.succeeded() || r.status == "held") {
        3
    } else {
        1
    }
}

/// Loads the config file named by the command line or environment.
pub fn load_config(cli: &Cli, env: &EnvOverrides) -> Result<Config> {
    let path = crate::config::locate(cli.config.as_deref());
    Ok(Config::load(path.as_deref(), env)?)
}

async fn connect(cfg: &Config) -> Result<sqlx::PgPool> {
    let pool = crate::db::connect(cfg.database_url()?, cfg.database.max_connections).await?;
    crate::db::migrate(&pool).await?;
    Ok(pool)
}

/// Connects, migrates, checks every audience's query, and stores the definitions. Nothing is
/// stored unless every audience is valid.
///
/// A config without any `[[audience]]` or `[[trait]]` stores nothing: an empty or missing file
/// (a mount that failed, a typo in the path) must not disable every audience and trait. To stop syncing an audience,
/// set `enabled = false` on it or remove it while keeping the others.
pub async fn prepare(cfg: &Config) -> Result<(sqlx::PgPool, Vec<Audience>)> {
    let pool = connect(cfg).await?;
    if cfg.audiences.is_empty() {
        tracing::warn!(
            "the configuration defines no [[audience]] or [[trait]]; stored audiences and traits are left as they are"
        );
        return Ok((pool, Vec::new()));
    }
    audience::check_queries(&pool, &cfg.audiences).await?;
    let stored = audience::store_definitions(&pool, &cfg.audiences).await?;
    Ok((pool, stored))
}

/// For the read-only commands: stores the audiences of a config file when there is one, but
/// without a config file only migrates, so `status` against a database (the demo's, a
/// production one from a laptop) never disables the audiences stored there.
async fn prepare_for_reading(cli: &Cli, cfg: &Config) -> Result<sqlx::PgPool> {
    if crate::config::locate(cli.config.as_deref()).is_some() {
        Ok(prepare(cfg).await?.0)
    } else {
        connect(cfg).await
    }
}

/// Builds a worker from the config.
pub fn worker(cfg: &Config, pool: sqlx::PgPool) -> Result<Worker> {
    Ok(Worker {
        connect: crate::db::options(cfg.database_url()?)?,
        pool,
        client: WigzoClient::new(&cfg.wigzo)?,
        wigzo: cfg.wigzo.clone(),
        statement_timeout: cfg.database.statement_timeout,
        owner: owner_id(),
        cancel: CancellationToken::new(),
        progress: true,
    })
}

/// Keeps the worker's destination budget in step with the other replicas
/// (`budget::coordinate`) for as long as the process runs. Only processes that send take a
/// share: a dry run neither writes a heartbeat nor takes one.
fn share_budget(worker: &Worker) {
    tokio::spawn(crate::budget::coordinate(
        worker.client.budget().clone(),
        worker.pool.clone(),
        worker.owner.clone(),
        CancellationToken::new(),
    ));
}

/// Runs the audiences one after another (each uses the full concurrency), stopping early on
/// Ctrl-C.
pub async fn run_all(
    worker: &Worker,
    audiences: &[&Audience],
    mode: Mode,
    opts: RunOptions,
) -> Vec<RunReport> {
    let cancel = worker.cancel.clone();
    let watcher = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("interrupted: finishing calls in flight, leaving the rest pending");
            cancel.cancel();
        }
    });
    let mut out = Vec::with_capacity(audiences.len());
    for a in audiences {
        if worker.cancel.is_cancelled() {
            break;
        }
        out.push(
            worker
                .run_with(a, mode, opts.clone())
                .await
                .expect("a manual run is never skipped"),
        );
    }
    watcher.abort();
    out
}

fn print_reports(cli: &Cli, reports: &[RunReport]) {
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(reports).expect("reports serialize")
        );
        return;
    }
    for r in reports {
        let what = if r.dry_run { "would send" } else { "sent" };
        println!(
            "{} {} ({}): {}. members={} added={} removed={} {what}={} failed={} skipped_rows={} in {:.1}s",
            r.audience,
            r.kind,
            r.run_id
                .map(|id| format!("run {id}"))
                .unwrap_or_else(|| "dry run".into()),
            r.status,
            r.members,
            r.added,
            r.removed,
            if r.dry_run {
                (r.added + r.removed) as u64
            } else {
                r.sent
            },
            r.failed,
            r.skipped_rows,
            r.duration_ms as f64 / 1000.0
        );
        if let Some(e) = &r.error {
            println!("  error: {e}");
        }
        if r.would_hold {
            println!(
                "  would be held: {}",
                r.held_reason.as_deref().unwrap_or_default()
            );
        }
        for s in &r.sample {
            println!("  sample: {s}");
        }
    }
}
