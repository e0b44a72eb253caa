//! The scheduled worker (`audience-sync run`): runs each audience on its cron schedule, safely
//! with any number of replicas on one database, reloads on SIGHUP and stops gracefully.
//!
//! Replicas never talk to each other. Each due run is decided from the `runs` table and then
//! guarded twice: the audience's advisory lock (held by one session at a time, released by
//! PostgreSQL when the session ends, even on SIGKILL) and a check, once the lock is held, that
//! the audience's latest run is still the one the decision was based on. A replica that lost
//! the race therefore skips quietly instead of running the audience again.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audience::{Audience, parse_schedule};
use crate::config::{Config, DaemonConfig, EnvOverrides};
use crate::ops::{OpsState, Trigger, TriggerRequest};
use crate::run;
use crate::sync::{Mode, RunOptions, RunReport, Worker};

/// The latest run of an audience, as the scheduler needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LastRun {
    /// The run's id.
    pub id: i64,
    /// Its status as stored.
    pub status: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it finished, if it did.
    pub finished_at: Option<DateTime<Utc>>,
}

/// When an audience should next run, given its latest run:
/// - never run: now (its initial sync does not wait for a tick);
/// - still marked running or abandoned: now (if its owner is alive the lock says so and the
///   attempt is skipped; if not, the run is resumed);
/// - succeeded, partial (only rejected changes left, which re-running would not change) or
///   held by the removal guard (never released automatically): the first cron tick after it
///   started;
/// - failed: that tick, or `retry_failed` after it finished if sooner.
pub fn next_due(
    schedule: &cron::Schedule,
    last: Option<&LastRun>,
    retry_failed: Duration,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let Some(last) = last else { return now };
    let tick = schedule.after(&last.started_at).next();
    match last.status.as_str() {
        "running" | "abandoned" => now,
        "failed" => {
            let retry = last.finished_at.unwrap_or(last.started_at)
                + chrono::Duration::from_std(retry_failed).unwrap_or(chrono::Duration::MAX);
            tick.map_or(retry, |t| t.min(retry))
        }
        // A schedule with no future tick (e.g. a past year) never runs again.
        _ => tick.unwrap_or(DateTime::<Utc>::MAX_UTC),
    }
}

/// The latest run of an audience, if any.
pub async fn last_run(pool: &PgPool, audience_id: i64) -> Result<Option<LastRun>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, status, started_at, finished_at FROM runs
          WHERE audience_id = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(audience_id)
    .fetch_optional(pool)
    .await
}

/// Loads the config file again and stores its audiences; the old list stays on any error.
async fn reload(
    path: Option<&std::path::Path>,
    env: &EnvOverrides,
    pool: &PgPool,
) -> Result<Vec<Audience>> {
    let cfg = Config::load(path, env)?;
    if cfg.audiences.is_empty() {
        anyhow::bail!(
            "the configuration defines no [[audience]] or [[trait]]; set enabled = false on audiences and traits to stop them"
        );
    }
    crate::audience::check_queries(pool, &cfg.audiences).await?;
    Ok(crate::audience::store_definitions(pool, &cfg.audiences).await?)
}

struct Scheduled {
    audience: Audience,
    schedule: cron::Schedule,
}

fn schedules(audiences: Vec<Audience>) -> Vec<Scheduled> {
    audiences
        .into_iter()
        .filter(|a| a.def.enabled)
        .filter_map(|a| match parse_schedule(&a.def.schedule) {
            Ok(schedule) => Some(Scheduled {
                audience: a,
                schedule,
            }),
            Err(e) => {
                // Validated when the config was loaded; kept for safety.
                tracing::error!(audience = %a.def.key, error = %e, "invalid schedule; audience not scheduled");
                None
            }
        })
        .collect()
}

/// Runs the daemon until SIGTERM or SIGINT. `audiences` are the stored audiences of `cfg`.
pub async fn run(
    cfg: Config,
    env: EnvOverrides,
    pool: PgPool,
    audiences: Vec<Audience>,
    worker: Worker,
    listen: Option<String>,
) -> Result<()> {
    let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let (trigger_tx, mut trigger_rx) = mpsc::channel::<TriggerRequest>(64);
    let ops = OpsServer::start(&cfg, &pool, listen, &trigger_tx).await?;
    tracing::info!(listen = %ops.addr, owner = %worker.owner, audiences = audiences.len(), "daemon started");

    let mut daemon = Daemon {
        settings: cfg.daemon.clone(),
        pool,
        worker,
        scheduled: schedules(audiences),
        tasks: JoinSet::new(),
        running: HashMap::new(),
        cool_until: HashMap::new(),
    };
    loop {
        let wake = daemon.start_due_runs().await;
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            Some(done) = daemon.tasks.join_next(), if !daemon.tasks.is_empty() => daemon.finished(done),
            Some(req) = trigger_rx.recv() => daemon.requested(req),
            _ = hup.recv() => daemon.reload(&cfg, &env).await,
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
        }
    }
    drop(trigger_tx);
    daemon.drain().await;
    ops.stop().await;
    tracing::info!("daemon stopped");
    Ok(())
}

/// The daemon's ops server (health, readiness, metrics, status page, and triggers if enabled).
struct OpsServer {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl OpsServer {
    async fn start(
        cfg: &Config,
        pool: &PgPool,
        listen: Option<String>,
        triggers: &mpsc::Sender<TriggerRequest>,
    ) -> Result<Self> {
        let trigger = cfg.ops.trigger_token.clone().map(|token| Trigger {
            token,
            tx: triggers.clone(),
        });
        let listen = listen.unwrap_or_else(|| cfg.ops.listen.clone());
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {listen} for the ops server; set [ops] listen or --listen"
                )
            })?;
        let stop = CancellationToken::new();
        let addr = listener.local_addr()?;
        let task = tokio::spawn(crate::ops::serve(
            listener,
            OpsState {
                pool: pool.clone(),
                trigger,
            },
            stop.clone(),
        ));
        Ok(Self { addr, stop, task })
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The daemon's state between wake-ups.
struct Daemon {
    settings: DaemonConfig,
    pool: PgPool,
    worker: Worker,
    scheduled: Vec<Scheduled>,
    tasks: JoinSet<(String, Option<RunReport>)>,
    running: HashMap<String, tokio::task::AbortHandle>,
    /// After a run (or a skipped attempt) an audience is not looked at again until then.
    cool_until: HashMap<String, Instant>,
}

impl Daemon {
    /// Starts every audience that is due (within `max_concurrent_runs`), records each one's
    /// next run time, and returns when to look again.
    async fn start_due_runs(&mut self) -> Instant {
        let now = Utc::now();
        let mut wake = Instant::now() + self.settings.poll_interval;
        for i in 0..self.scheduled.len() {
            let s = &self.scheduled[i];
            let key = s.audience.def.key.clone();
            if self.running.contains_key(&key) {
                continue;
            }
            if let Some(until) = self.cool_until.get(&key)
                && *until > Instant::now()
            {
                wake = wake.min(*until);
                continue;
            }
            let last = match last_run(&self.pool, s.audience.id).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(audience = %key, error = %crate::audience::db_message(&e), "cannot read the latest run; will retry");
                    continue;
                }
            };
            let due = next_due(&s.schedule, last.as_ref(), self.settings.retry_failed, now);
            self.record_next_run(s, due, now).await;
            if due > now {
                if let Ok(wait) = (due - now).to_std() {
                    wake = wake.min(Instant::now() + wait);
                }
                continue;
            }
            if self.running.len() >= self.settings.max_concurrent_runs {
                continue;
            }
            let opts = RunOptions {
                dry_run: false,
                trigger: run::Trigger::Schedule,
                skip_if_busy: true,
                expect_last_run: Some(last.as_ref().map(|l| (l.id, l.status.clone()))),
                // A held audience is tried again at its tick; only a person releases it.
                allow_removals: false,
            };
            let audience = s.audience.clone();
            let handle = spawn_run(&mut self.tasks, &self.worker, audience, Mode::Sync, opts);
            self.running.insert(key, handle);
        }
        wake
    }

    /// Writes when the audience's next scheduled run is due, for dashboards.
    async fn record_next_run(&self, s: &Scheduled, due: DateTime<Utc>, now: DateTime<Utc>) {
        let next_tick = if due <= now {
            s.schedule.after(&now).next()
        } else {
            Some(due)
        };
        if let Err(e) = sqlx::query(
            "UPDATE audiences SET next_run_at = $2 WHERE id = $1 AND next_run_at IS DISTINCT FROM $2",
        )
        .bind(s.audience.id)
        .bind(next_tick)
        .execute(&self.pool)
        .await
        {
            tracing::debug!(audience = %s.audience.def.key, error = %e, "cannot record the next run time");
        }
    }

    /// A run task ended.
    fn finished(&mut self, done: Result<(String, Option<RunReport>), tokio::task::JoinError>) {
        match done {
            Ok((key, report)) => {
                self.running.remove(&key);
                self.cool_until
                    .insert(key.clone(), Instant::now() + self.settings.poll_interval);
                if report.is_none() {
                    tracing::debug!(audience = %key, "skipped: another process has it or already ran it");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "a run task ended abnormally");
                self.running.retain(|_, h| !h.is_finished());
            }
        }
    }

    /// A run asked for over the ops API.
    fn requested(&mut self, req: TriggerRequest) {
        match self
            .scheduled
            .iter()
            .find(|s| s.audience.def.key == req.key)
        {
            Some(s) if !self.running.contains_key(&req.key) => {
                tracing::info!(audience = %req.key, mode = ?req.mode, "run requested over the ops API");
                let opts = RunOptions {
                    trigger: run::Trigger::Api,
                    allow_removals: req.allow_removals,
                    ..RunOptions::manual(false)
                };
                let audience = s.audience.clone();
                let handle = spawn_run(&mut self.tasks, &self.worker, audience, req.mode, opts);
                self.running.insert(req.key.clone(), handle);
            }
            Some(_) => {
                tracing::warn!(audience = %req.key, "run requested over the ops API ignored: this process is already running it")
            }
            None => {
                tracing::warn!(audience = %req.key, "run requested over the ops API for an audience this process does not schedule")
            }
        }
    }

    /// SIGHUP: the config file again; the previous list stays on any error.
    async fn reload(&mut self, cfg: &Config, env: &EnvOverrides) {
        tracing::info!("SIGHUP: reloading the configuration");
        match reload(cfg.path.as_deref(), env, &self.pool).await {
            Ok(list) => {
                self.scheduled = schedules(list);
                self.cool_until.clear();
                tracing::info!(audiences = self.scheduled.len(), "configuration reloaded");
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "configuration not reloaded; keeping the previous one")
            }
        }
    }

    /// Shutdown: stop claiming, let in-flight calls finish and their results be recorded
    /// within the grace period, then abandon what is left for the next worker to resume.
    async fn drain(mut self) {
        self.worker.cancel.cancel();
        let drained = tokio::time::timeout(self.settings.grace_period, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_ok() {
            return;
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        // Their sessions (and locks) are gone; leave the runs for the next worker to resume.
        let _ = sqlx::query(
            "UPDATE runs SET status = 'abandoned', finished_at = now(),
                    error = 'stopped by shutdown after the grace period; unsent changes stay pending'
              WHERE owner = $1 AND status = 'running'",
        )
        .bind(&self.worker.owner)
        .execute(&self.pool)
        .await;
        tracing::warn!(
            grace_secs = self.settings.grace_period.as_secs(),
            "grace period over; remaining runs abandoned for the next worker to resume"
        );
    }
}

fn spawn_run(
    tasks: &mut JoinSet<(String, Option<RunReport>)>,
    worker: &Worker,
    audience: Audience,
    mode: Mode,
    opts: RunOptions,
) -> tokio::task::AbortHandle {
    let worker = worker.clone();
    tasks.spawn(async move {
        let key = audience.def.key.clone();
        let report = worker.run_with(&audience, mode, opts).await;
        (key, report)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, h, m, s).unwrap()
    }

    fn last(status: &str, started: DateTime<Utc>, finished: Option<DateTime<Utc>>) -> LastRun {
        LastRun {
            id: 1,
            status: status.into(),
            started_at: started,
            finished_at: finished,
        }
    }

    const RETRY: Duration = Duration::from_secs(300);

    #[test]
    fn a_never_run_audience_is_due_now() {
        let s = parse_schedule("0 0 */3 * * *").unwrap();
        assert_eq!(next_due(&s, None, RETRY, at(10, 17, 0)), at(10, 17, 0));
    }

    #[test]
    fn succeeded_runs_wait_for_the_next_tick_of_each_expression() {
        let cases = [
            // every three hours on the hour
            ("0 0 */3 * * *", at(10, 17, 0), at(12, 0, 0)),
            // classic 5-field form: every 15 minutes
            ("*/15 * * * *", at(10, 17, 0), at(10, 30, 0)),
            // daily at 02:30
            (
                "0 30 2 * * *",
                at(10, 17, 0),
                Utc.with_ymd_and_hms(2026, 11, 29, 2, 30, 0).unwrap(),
            ),
            // Mondays at 09:00 (2026-11-28 is a Saturday)
            (
                "0 0 9 * * Mon",
                at(10, 17, 0),
                Utc.with_ymd_and_hms(2026, 11, 30, 9, 0, 0).unwrap(),
            ),
            // a run started exactly on a tick waits for the following one
            ("0 0 */3 * * *", at(12, 0, 0), at(15, 0, 0)),
        ];
        for (expr, started, want) in cases {
            let s = parse_schedule(expr).unwrap();
            let l = last(
                "succeeded",
                started,
                Some(started + chrono::Duration::seconds(40)),
            );
            assert_eq!(next_due(&s, Some(&l), RETRY, at(10, 18, 0)), want, "{expr}");
        }
    }

    #[test]
    fn a_failed_run_is_retried_after_the_retry_delay_or_its_tick() {
        let s = parse_schedule("0 0 */3 * * *").unwrap();
        let l = last("failed", at(10, 0, 0), Some(at(10, 1, 0)));
        assert_eq!(next_due(&s, Some(&l), RETRY, at(10, 2, 0)), at(10, 6, 0));
        let s = parse_schedule("0 */2 * * * *").unwrap();
        assert_eq!(next_due(&s, Some(&l), RETRY, at(10, 2, 0)), at(10, 2, 0));
    }

    #[test]
    fn partial_and_held_runs_wait_for_their_next_tick_not_the_retry_delay() {
        let s = parse_schedule("0 0 */3 * * *").unwrap();
        for status in ["partial", "held"] {
            let l = last(status, at(10, 0, 0), Some(at(10, 1, 0)));
            assert_eq!(next_due(&s, Some(&l), RETRY, at(10, 2, 0)), at(12, 0, 0));
        }
    }

    #[test]
    fn running_or_abandoned_runs_are_due_now_for_the_lock_to_decide() {
        let s = parse_schedule("0 0 */3 * * *").unwrap();
        for status in ["running", "abandoned"] {
            let l = last(status, at(10, 0, 0), None);
            assert_eq!(next_due(&s, Some(&l), RETRY, at(10, 5, 0)), at(10, 5, 0));
        }
    }
}
