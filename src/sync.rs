//! A sync run of one audience, start to finish, as a sequence of named steps: lock the
//! audience, record the run, capture the query, guard and diff into the outbox, deliver, and
//! record the outcome before the lock is released. How a run can end is `RunError`.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::audience::{Audience, db_message};
use crate::config::WigzoConfig;
use crate::delivery::{self, DeliveryReport, Halt, Target};
use crate::diff::{self, DiffCounts};
use crate::guard;
use crate::lock::AudienceLock;
use crate::outbox;
use crate::run::{self, Counts, RunKind, RunStatus, Trigger};
use crate::snapshot;
use crate::wigzo::{WigzoClient, identify_payload};

/// How often a delivering run checks that it still holds its audience lock.
const LOCK_CHECK: Duration = Duration::from_secs(1);

/// What a run is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Initial or incremental, as due.
    Sync,
    /// Re-send every member, and `false` for confirmed members who left.
    FullResync,
}

/// The ways a run ends without delivering everything (other than `partial` and `held`, which
/// are outcomes, not errors).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Another process holds the audience's lock.
    #[error(
        "audience {key:?} is already being synced by another process{holder}; nothing was sent by this one"
    )]
    Busy {
        /// The audience.
        key: String,
        /// " (owner)" of the run holding it, when known.
        holder: String,
    },
    /// The lock could not be taken (no connection).
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    /// A bookkeeping statement failed.
    #[error("{}", db_message(.0))]
    Db(#[from] sqlx::Error),
    /// The query could not be read.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// The diff could not be written.
    #[error(transparent)]
    Diff(#[from] diff::DiffError),
    /// Results could not be recorded during delivery.
    #[error(transparent)]
    Delivery(#[from] delivery::DeliveryError),
    /// An answer showed the configuration is wrong (token, redirect, endpoint).
    #[error(
        "{halt}. Nothing unconfirmed was lost: the run stopped at once and its {owed} unconfirmed changes stay pending"
    )]
    Halted {
        /// What Wigzo answered.
        halt: Halt,
        /// Changes still owed.
        owed: u64,
    },
    /// The lock's session ended or stopped answering during delivery.
    #[error(
        "lost the lock on audience {key:?} when its database session ended or stopped answering (restart, failover, network?); {confirmed} changes were confirmed, the rest stay pending for the next run"
    )]
    LockLost {
        /// The audience.
        key: String,
        /// Changes confirmed before it stopped.
        confirmed: u64,
    },
    /// Shutdown (SIGTERM, Ctrl-C) stopped delivery.
    #[error("run was interrupted; unsent changes stay pending for the next run")]
    Interrupted,
    /// Changes ran out of retries (5xx, timeouts).
    #[error(
        "{failed} of {total} changes were not delivered ({rejected} rejected by Wigzo, {out_of_retries} out of retries; last error: {last_error}); they stay in the outbox and are retried by the next run"
    )]
    Undelivered {
        /// Not delivered in this run.
        failed: u64,
        /// Changes the diff wrote.
        total: i64,
        /// Of `failed`, rejected.
        rejected: u64,
        /// Of `failed`, out of retries.
        out_of_retries: u64,
        /// The last error seen.
        last_error: String,
    },
}

/// What the worker needs to run syncs.
#[derive(Clone)]
pub struct Worker {
    /// The worker's database.
    pub pool: PgPool,
    /// For the dedicated connection each run holds (its lock and capture table).
    pub connect: PgConnectOptions,
    /// The Wigzo client.
    pub client: WigzoClient,
    /// How calls are made.
    pub wigzo: WigzoConfig,
    /// Longest an audience query may run.
    pub statement_timeout: std::time::Duration,
    /// Identifies this process in runs and leases.
    pub owner: String,
    /// Fired on shutdown: runs stop claiming and record themselves abandoned.
    pub cancel: CancellationToken,
    /// Draw a progress bar on stderr during delivery when stderr is a terminal (the CLI);
    /// otherwise delivery logs a progress line every 10 s.
    pub progress: bool,
}

/// How a run was started, and when it should quietly not happen.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Compute and report, write and send nothing.
    pub dry_run: bool,
    /// Recorded in `runs.trigger`.
    pub trigger: Trigger,
    /// Skip (no report) instead of failing when another process holds the audience.
    pub skip_if_busy: bool,
    /// Skip unless the audience's latest run is still this one, with this status (None: it
    /// has no run yet). Checked after the lock is taken, so a run another replica started or
    /// finished in the meantime is not repeated.
    pub expect_last_run: Option<Option<(i64, String)>>,
    /// Let removals through that the audience's removal guard would hold (a person's
    /// release).
    pub allow_removals: bool,
}

impl RunOptions {
    /// A run asked for by hand: it fails, rather than skips, when the audience is busy.
    pub fn manual(dry_run: bool) -> Self {
        Self {
            dry_run,
            trigger: Trigger::Manual,
            skip_if_busy: false,
            expect_last_run: None,
            allow_removals: false,
        }
    }
}

/// One run's outcome: what `sync --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The audience's (or trait's) key.
    pub audience: String,
    /// `audience` or `trait`.
    pub computation: crate::audience::Kind,
    /// Its `runs` row (none for a dry run).
    pub run_id: Option<i64>,
    /// What it sent.
    pub kind: RunKind,
    /// How it ended.
    pub status: RunStatus,
    /// Whether it was a dry run.
    pub dry_run: bool,
    /// Members the query returned.
    pub members: i64,
    /// `true` changes.
    pub added: i64,
    /// `false` changes.
    pub removed: i64,
    /// Changes Wigzo confirmed.
    pub sent: u64,
    /// Changes rejected or out of retries.
    pub failed: u64,
    /// Extra HTTP attempts (429s included).
    pub retried: u64,
    /// The audience's changes held as rejected by Wigzo when the run ended (a run with any is
    /// `partial`).
    pub rejected: i64,
    /// Rows skipped for an unusable user id.
    pub skipped_rows: i64,
    /// How long it took.
    pub duration_ms: u64,
    /// Why it did not succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the removal guard held the run (status `held`), or would hold it (dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_reason: Option<String>,
    /// A dry run that a real run would be held.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub would_hold: bool,
    /// A dry run's first calls, as they would be sent.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sample: Vec<Value>,
}

impl RunReport {
    /// Whether every change was confirmed.
    pub fn succeeded(&self) -> bool {
        self.status == RunStatus::Succeeded
    }

    fn captured(&mut self, captured: snapshot::Captured) {
        self.members = captured.members;
        self.skipped_rows = captured.skipped_rows;
        if captured.skipped_rows > 0 {
            tracing::warn!(audience = %self.audience, skipped_rows = captured.skipped_rows, "rows with an empty, NULL or over-long user_id (or a NaN or infinite trait value) were skipped");
        }
    }

    fn diffed(&mut self, counts: DiffCounts) {
        self.added = counts.added;
        self.removed = counts.removed;
    }

    fn counts(&self) -> Counts {
        Counts {
            members: self.members,
            added: self.added,
            removed: self.removed,
            skipped_rows: self.skipped_rows,
        }
    }
}

/// A name for this process: host and pid.
pub fn owner_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{host}:{}:{}",
        std::process::id(),
        &uuid::Uuid::new_v4().to_string()[..8]
    )
}

impl Worker {
    /// A bar over the audience's pending changes, or a hidden one.
    async fn progress_bar(&self, audience_id: i64, key: &str) -> ProgressBar {
        use std::io::IsTerminal;
        if !self.progress || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE audience_id = $1 AND status = 'pending'",
        )
        .bind(audience_id)
        .fetch_one(&self.pool)
        .await
        .unwrap_or(0);
        let bar = ProgressBar::new(pending.max(0) as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} changes ({per_sec}, eta {eta})",
            )
            .expect("valid template"),
        );
        bar.set_prefix(key.to_string());
        bar
    }

    /// Runs one audience by hand. Failures of the run are in the report (status `failed`).
    pub async fn run(&self, audience: &Audience, mode: Mode, dry_run: bool) -> RunReport {
        self.run_with(audience, mode, RunOptions::manual(dry_run))
            .await
            .expect("a manual run is never skipped")
    }

    /// Runs one audience; `None` when the options say to skip it (busy, or already run).
    pub async fn run_with(
        &self,
        audience: &Audience,
        mode: Mode,
        opts: RunOptions,
    ) -> Option<RunReport> {
        let started = Instant::now();
        let mut report = RunReport {
            audience: audience.def.key.clone(),
            computation: audience.def.kind,
            run_id: None,
            kind: match mode {
                Mode::FullResync => RunKind::FullResync,
                Mode::Sync => RunKind::Incremental,
            },
            status: RunStatus::Failed,
            dry_run: opts.dry_run,
            members: 0,
            added: 0,
            removed: 0,
            sent: 0,
            failed: 0,
            retried: 0,
            rejected: 0,
            skipped_rows: 0,
            duration_ms: 0,
            error: None,
            held_reason: None,
            would_hold: false,
            sample: Vec::new(),
        };
        // The audience lock, kept until the run's end is recorded: another replica that takes
        // the lock must find the run finished, not `running`.
        let mut lock = None;
        match self
            .run_inner(audience, mode, &opts, &mut report, &mut lock)
            .await
        {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                report.status = RunStatus::Failed;
                report.error = Some(e.to_string());
            }
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        self.record_end(&report).await;
        // Only now is the audience free for another run.
        drop(lock);
        self.log_end(&report);
        Some(report)
    }

    /// The run, step by step; `Ok(false)`: skipped as `opts` asked, nothing recorded.
    async fn run_inner(
        &self,
        audience: &Audience,
        mode: Mode,
        opts: &RunOptions,
        report: &mut RunReport,
        lock: &mut Option<AudienceLock>,
    ) -> Result<bool, RunError> {
        let Some(held) = self.lock(audience, opts).await? else {
            return Ok(false);
        };
        let lock = lock.insert(held);
        if let Some(expected) = &opts.expect_last_run
            && &run::latest(&self.pool, audience.id).await? != expected
        {
            return Ok(false);
        }
        // We hold the lock, so any run still marked running lost its owner.
        run::mark_abandoned(&self.pool, audience.id).await?;
        let mode = self.plan(audience, mode, report).await?;
        if !opts.dry_run {
            report.run_id = Some(
                run::start(
                    &self.pool,
                    audience.id,
                    report.kind,
                    &self.owner,
                    opts.trigger,
                )
                .await?,
            );
        }
        tracing::info!(audience = %audience.def.key, run_id = ?report.run_id, kind = %report.kind, dry_run = opts.dry_run, "run started");

        let reader = snapshot::Reader::open(
            lock.conn(),
            &self.pool,
            &audience.def.key,
            audience.def.kind,
            &audience.def.query,
            audience.def.source_url.as_ref(),
            self.statement_timeout,
        )
        .await?;
        let full = mode == Mode::FullResync;
        let Some(run_id) = report.run_id else {
            self.preview(lock.conn(), reader, audience, full, opts, report)
                .await?;
            return Ok(true);
        };
        if !self
            .capture_and_diff(lock.conn(), reader, audience, run_id, full, opts, report)
            .await?
        {
            return Ok(true);
        }
        run::record_counts(&self.pool, run_id, report.counts()).await?;
        let d = self.deliver(lock, audience, report).await?;
        self.outcome(audience, d, report).await?;
        Ok(true)
    }

    /// Takes the audience's lock: `None` to skip quietly (busy, when `opts` says so).
    async fn lock(
        &self,
        audience: &Audience,
        opts: &RunOptions,
    ) -> Result<Option<AudienceLock>, RunError> {
        match AudienceLock::try_acquire(&self.connect, audience.id).await? {
            Some(lock) => Ok(Some(lock)),
            None if opts.skip_if_busy => Ok(None),
            None => Err(RunError::Busy {
                key: audience.def.key.clone(),
                holder: run::running_owner(&self.pool, audience.id)
                    .await
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default(),
            }),
        }
    }

    /// The run's kind: a full resync stopped part-way is finished as one, whatever run comes
    /// next; otherwise initial until the audience has synced, then incremental.
    async fn plan(
        &self,
        audience: &Audience,
        mode: Mode,
        report: &mut RunReport,
    ) -> Result<Mode, RunError> {
        let mode = if run::resync_pending(&self.pool, audience.id).await? {
            Mode::FullResync
        } else {
            mode
        };
        report.kind = match mode {
            Mode::FullResync => RunKind::FullResync,
            Mode::Sync if run::never_synced(&self.pool, audience.id).await? => RunKind::Initial,
            Mode::Sync => RunKind::Incremental,
        };
        Ok(mode)
    }

    /// A dry run: capture, guard and preview; nothing is written.
    async fn preview(
        &self,
        conn: &mut PgConnection,
        reader: snapshot::Reader,
        audience: &Audience,
        full: bool,
        opts: &RunOptions,
        report: &mut RunReport,
    ) -> Result<(), RunError> {
        let captured = snapshot::capture(conn, reader).await?;
        report.captured(captured);
        if !opts.allow_removals {
            report.held_reason = self.guard_verdict(conn, audience, captured).await?;
            report.would_hold = report.held_reason.is_some();
        }
        let rules = diff::Rules::new(&audience.def, full);
        let (counts, sample) = diff::preview(conn, audience.id, rules, 3).await?;
        report.diffed(counts);
        report.sample = sample
            .iter()
            .map(|c| identify_payload(audience.id, &audience.def.key, audience.def.kind, c))
            .collect();
        report.status = RunStatus::Succeeded;
        Ok(())
    }

    /// Captures the query and writes the diff to the outbox (a first sync streams straight
    /// into the audience's new partition). Returns false when the removal guard held the run:
    /// then nothing was written, and the report says why.
    #[allow(clippy::too_many_arguments)]
    async fn capture_and_diff(
        &self,
        conn: &mut PgConnection,
        reader: snapshot::Reader,
        audience: &Audience,
        run_id: i64,
        full: bool,
        opts: &RunOptions,
        report: &mut RunReport,
    ) -> Result<bool, RunError> {
        if diff::is_first_sync(conn, audience.id).await? {
            let (captured, counts) = diff::first_sync(conn, reader, audience.id, run_id).await?;
            report.captured(captured);
            report.diffed(counts);
            return Ok(true);
        }
        let captured = snapshot::capture(conn, reader).await?;
        report.captured(captured);
        let rules = diff::Rules::new(&audience.def, full);
        if !opts.allow_removals
            && let Some(reason) = self.guard_verdict(conn, audience, captured).await?
        {
            // Nothing is written or sent; the counts say what would have been.
            let (counts, _) = diff::preview(conn, audience.id, rules, 0).await?;
            report.diffed(counts);
            let command = if full { "resync" } else { "sync" };
            report.error = Some(format!(
                "held: {reason}. Fix the query, or send it anyway with \"audience-sync {command} --{} {} --allow-removals\"",
                audience.def.kind, audience.def.key
            ));
            report.held_reason = Some(reason);
            report.status = RunStatus::Held;
            return Ok(false);
        }
        let counts = diff::write_outbox(conn, audience.id, run_id, rules).await?;
        report.diffed(counts);
        // The capture is no longer needed; free it before a long delivery.
        let _ = sqlx::query("DROP TABLE IF EXISTS pg_temp.audience_capture")
            .execute(&mut *conn)
            .await;
        Ok(true)
    }

    /// The removal guard's reason to hold this run, given its captured snapshot.
    async fn guard_verdict(
        &self,
        conn: &mut PgConnection,
        audience: &Audience,
        captured: snapshot::Captured,
    ) -> Result<Option<String>, RunError> {
        if !audience.def.sends_removals() {
            // A trait that keeps values when users leave sends no removal to hold.
            return Ok(None);
        }
        let (confirmed, removing) = guard::measure(conn, audience.id).await?;
        let verdict = audience.def.guard.verdict(&guard::Seen {
            confirmed,
            removing,
            rows: captured.members,
            skipped: captured.skipped_rows,
        });
        if let Some(reason) = &verdict {
            tracing::warn!(audience = %audience.def.key, confirmed, removing, rows = captured.members, reason = %reason, "removal guard: run held");
        }
        Ok(verdict)
    }

    /// Delivers the audience's pending changes while checking, every [`LOCK_CHECK`], that the
    /// lock's session still answers: if it ends (restart, failover, terminated backend) or
    /// hangs, another worker may take the audience, so delivery stops claiming.
    async fn deliver(
        &self,
        lock: &mut AudienceLock,
        audience: &Audience,
        report: &mut RunReport,
    ) -> Result<DeliveryReport, RunError> {
        let key = &audience.def.key;
        let progress = self.progress_bar(audience.id, key).await;
        let target = Target {
            audience_id: audience.id,
            key: key.clone(),
            kind: audience.def.kind,
            progress: progress.clone(),
        };
        let run_cancel = self.cancel.child_token();
        let mut lock_lost = false;
        let d = {
            let deliver = delivery::deliver(
                &self.pool,
                &self.client,
                &self.wigzo,
                &target,
                &self.owner,
                &run_cancel,
            );
            tokio::pin!(deliver);
            let mut check = tokio::time::interval(LOCK_CHECK);
            check.tick().await;
            loop {
                tokio::select! {
                    r = &mut deliver => break r,
                    _ = check.tick(), if !lock_lost => {
                        if !lock.still_held().await {
                            tracing::warn!(audience = %key, "lost the audience lock (its database session ended or stopped answering); stopping delivery");
                            lock_lost = true;
                            run_cancel.cancel();
                        }
                    }
                }
            }
        }?;
        progress.finish_and_clear();
        report.sent = d.sent;
        report.failed = d.failed;
        report.retried = d.retried;
        if lock_lost {
            return Err(RunError::LockLost {
                key: key.clone(),
                confirmed: d.sent,
            });
        }
        Ok(d)
    }

    /// What the delivery came to: an error, `partial` (only rejected changes are left, held),
    /// or `succeeded`.
    async fn outcome(
        &self,
        audience: &Audience,
        d: DeliveryReport,
        report: &mut RunReport,
    ) -> Result<(), RunError> {
        let total = report.added + report.removed;
        if let Some(halt) = d.halted {
            return Err(RunError::Halted {
                halt,
                owed: (total as u64).saturating_sub(d.sent),
            });
        }
        if d.cancelled {
            return Err(RunError::Interrupted);
        }
        let out_of_retries = d.failed - d.rejected;
        if out_of_retries > 0 {
            return Err(RunError::Undelivered {
                failed: d.failed,
                total,
                rejected: d.rejected,
                out_of_retries,
                last_error: d.last_error.unwrap_or_else(|| "none".into()),
            });
        }
        report.rejected = outbox::rejected_count(&self.pool, audience.id).await?;
        if report.rejected > 0 {
            // Everything else is confirmed. Re-running the audience would not change Wigzo's
            // answer, so the run ends partial and the audience waits for its next tick.
            report.status = RunStatus::Partial;
            report.error = Some(format!(
                "{} changes are held because Wigzo rejected them ({} in this run; last error: {}); they are sent again when the user's value or contact fields change, by a full resync, or by `audience-sync retry --{} {}`",
                report.rejected,
                d.rejected,
                d.last_error.as_deref().unwrap_or("see ops.failed_changes"),
                audience.def.kind,
                audience.def.key
            ));
            return Ok(());
        }
        report.status = RunStatus::Succeeded;
        Ok(())
    }

    /// Writes the run's end. A run stopped by shutdown is recorded as abandoned: the next
    /// worker resumes it at once instead of treating it as a failure to back off from.
    async fn record_end(&self, report: &RunReport) {
        let Some(run_id) = report.run_id else {
            return;
        };
        let status = if report.status == RunStatus::Failed && self.cancel.is_cancelled() {
            RunStatus::Abandoned
        } else {
            report.status
        };
        let finish = run::Finish {
            status,
            counts: report.counts(),
            sent: report.sent,
            failed: report.failed,
            retried: report.retried,
            error: report.error.as_deref(),
        };
        if let Err(e) = run::finish(&self.pool, run_id, &finish).await {
            tracing::error!(run_id, error = %e, "cannot record the end of a run; the next run of this audience will mark it abandoned");
        }
    }

    fn log_end(&self, r: &RunReport) {
        if r.succeeded() {
            tracing::info!(audience = %r.audience, run_id = ?r.run_id, kind = %r.kind, members = r.members, added = r.added, removed = r.removed, sent = r.sent, duration_ms = r.duration_ms, dry_run = r.dry_run, "run succeeded");
        } else {
            tracing::warn!(audience = %r.audience, run_id = ?r.run_id, kind = %r.kind, status = %r.status, sent = r.sent, failed = r.failed, rejected = r.rejected, error = r.error.as_deref().unwrap_or(""), "run did not deliver everything");
        }
    }
}
