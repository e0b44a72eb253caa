//! A sync run of one audience, start to finish: take the audience's lock, record the run,
//! capture, diff into the outbox, deliver, and record the outcome.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use crate::audience::{Audience, db_message};
use crate::config::WigzoConfig;
use crate::delivery::{self, Target};
use crate::diff;
use crate::guard;
use crate::outbox;
use crate::snapshot;
use crate::wigzo::{WigzoClient, identify_payload};

/// First key of the two-key advisory lock that makes runs of one audience exclusive.
const LOCK_CLASS: i32 = 0x4153_4e43;
/// How often a delivering run checks that it still holds its audience lock.
const LOCK_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// How long that check may take: a lock session that does not answer (a half-open
/// connection, a hung server) is treated as lost, and the run stops claiming.
const LOCK_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Initial or incremental, as due.
    Sync,
    /// Re-send every member, and `false` for confirmed members who left.
    FullResync,
}

/// What the worker needs to run syncs.
#[derive(Clone)]
pub struct Worker {
    pub pool: PgPool,
    /// For the dedicated connection each run holds (its lock and capture table).
    pub connect: PgConnectOptions,
    pub client: WigzoClient,
    pub wigzo: WigzoConfig,
    pub statement_timeout: std::time::Duration,
    /// Identifies this process in runs and leases.
    pub owner: String,
    pub cancel: CancellationToken,
    /// Draw a progress bar on stderr during delivery when stderr is a terminal (the CLI);
    /// otherwise delivery logs a progress line every 10 s.
    pub progress: bool,
}

/// How a run was started, and when it should quietly not happen.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub dry_run: bool,
    /// Recorded in `runs.trigger`: `manual`, `schedule` or `api`.
    pub trigger: &'static str,
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
            trigger: "manual",
            skip_if_busy: false,
            expect_last_run: None,
            allow_removals: false,
        }
    }
}

/// One run's outcome: what `sync --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub audience: String,
    pub run_id: Option<i64>,
    pub kind: &'static str,
    pub status: &'static str,
    pub dry_run: bool,
    pub members: i64,
    pub added: i64,
    pub removed: i64,
    pub sent: u64,
    pub failed: u64,
    pub retried: u64,
    /// The audience's changes held as rejected by Wigzo when the run ended (a run with any is
    /// `partial`).
    pub rejected: i64,
    pub skipped_rows: i64,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the removal guard held the run (status `held`), or would hold it (dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_reason: Option<String>,
    /// A dry run that a real run would be held.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub would_hold: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sample: Vec<Value>,
}

impl RunReport {
    pub fn succeeded(&self) -> bool {
        self.status == "succeeded"
    }

    fn captured(&mut self, captured: snapshot::Captured) {
        self.members = captured.members;
        self.skipped_rows = captured.skipped_rows;
        if captured.skipped_rows > 0 {
            tracing::warn!(audience = %self.audience, skipped_rows = captured.skipped_rows, "rows with an empty, NULL or over-long user_id were skipped");
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
        let dry_run = opts.dry_run;
        let started = Instant::now();
        let mut report = RunReport {
            audience: audience.def.key.clone(),
            run_id: None,
            kind: if mode == Mode::FullResync {
                "full_resync"
            } else {
                "incremental"
            },
            status: "failed",
            dry_run,
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
        // The audience lock's connection, kept until the run's end is recorded: another
        // replica that takes the lock must find the run finished, not `running`.
        let mut lock = None;
        match self
            .run_inner(audience, mode, &opts, &mut report, &mut lock)
            .await
        {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                report.status = "failed";
                report.error = Some(e);
            }
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        // A run stopped by shutdown is recorded as abandoned: the next worker resumes it at
        // once instead of treating it as a failure to back off from.
        let recorded_status = if report.status == "failed" && self.cancel.is_cancelled() {
            "abandoned"
        } else {
            report.status
        };
        if let Some(run_id) = report.run_id {
            // A full resync that delivered everything it could clears the audience's
            // resync mark in the same statement.
            let saved = sqlx::query(
                "WITH r AS (
                    UPDATE runs SET status = $2, finished_at = now(), members = $3, added = $4,
                           removed = $5, sent = $6, failed = $7, retried = $8, skipped_rows = $9,
                           error = $10
                     WHERE id = $1
                 RETURNING audience_id, kind, status)
                 UPDATE audiences a SET resync_pending = false
                   FROM r
                  WHERE a.id = r.audience_id AND r.kind = 'full_resync'
                    AND r.status IN ('succeeded', 'partial')",
            )
            .bind(run_id)
            .bind(recorded_status)
            .bind(report.members)
            .bind(report.added)
            .bind(report.removed)
            .bind(report.sent as i64)
            .bind(report.failed as i64)
            .bind(report.retried as i64)
            .bind(report.skipped_rows)
            .bind(&report.error)
            .execute(&self.pool)
            .await;
            if let Err(e) = saved {
                tracing::error!(run_id, error = %e, "cannot record the end of a run; the next run of this audience will mark it abandoned");
            }
        }
        // Only now is the audience free for another run.
        drop(lock);
        match report.status {
            "succeeded" => {
                tracing::info!(audience = %report.audience, run_id = ?report.run_id, kind = report.kind, members = report.members, added = report.added, removed = report.removed, sent = report.sent, duration_ms = report.duration_ms, dry_run, "run succeeded")
            }
            status => {
                tracing::warn!(audience = %report.audience, run_id = ?report.run_id, kind = report.kind, status, sent = report.sent, failed = report.failed, rejected = report.rejected, error = report.error.as_deref().unwrap_or(""), "run did not deliver everything")
            }
        }
        Some(report)
    }

    /// The removal guard's reason to hold this run, given its captured snapshot.
    async fn guard_verdict(
        &self,
        conn: &mut sqlx::PgConnection,
        audience: &Audience,
        captured: snapshot::Captured,
    ) -> Result<Option<String>, String> {
        let (confirmed, removing) = guard::measure(conn, audience.id)
            .await
            .map_err(|e| db_message(&e))?;
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

    /// `Ok(false)`: skipped as `opts` asked, nothing recorded.
    async fn run_inner(
        &self,
        audience: &Audience,
        mode: Mode,
        opts: &RunOptions,
        report: &mut RunReport,
        lock: &mut Option<sqlx::PgConnection>,
    ) -> Result<bool, String> {
        let dry_run = opts.dry_run;
        let key = &audience.def.key;
        let conn = lock.insert(
            crate::db::dedicated(&self.connect)
                .await
                .map_err(|e| e.to_string())?,
        );
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2::int)")
            .bind(LOCK_CLASS)
            .bind(audience.id as i32)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| db_message(&e))?;
        if !locked && opts.skip_if_busy {
            return Ok(false);
        }
        if !locked {
            let holder: Option<String> = sqlx::query_scalar(
                "SELECT owner FROM runs WHERE audience_id = $1 AND status = 'running'
                  ORDER BY id DESC LIMIT 1",
            )
            .bind(audience.id)
            .fetch_optional(&self.pool)
            .await
            .ok()
            .flatten();
            return Err(format!(
                "audience {key:?} is already being synced by another process{}; nothing was sent by this one",
                holder.map(|h| format!(" ({h})")).unwrap_or_default()
            ));
        }
        if let Some(expected) = &opts.expect_last_run {
            let last: Option<(i64, String)> = sqlx::query_as(
                "SELECT id, status FROM runs WHERE audience_id = $1 ORDER BY id DESC LIMIT 1",
            )
            .bind(audience.id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_message(&e))?;
            if &last != expected {
                return Ok(false);
            }
        }
        // We hold the lock, so any run still marked running lost its owner.
        sqlx::query(
            "UPDATE runs SET status = 'abandoned', finished_at = now(),
                    error = COALESCE(error, 'the process running it stopped before it finished')
              WHERE audience_id = $1 AND status = 'running'",
        )
        .bind(audience.id)
        .execute(&self.pool)
        .await
        .map_err(|e| db_message(&e))?;

        // A full resync stopped part-way is finished as one, whatever run comes next.
        let resync_pending: bool =
            sqlx::query_scalar("SELECT resync_pending FROM audiences WHERE id = $1")
                .bind(audience.id)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| db_message(&e))?;
        let mode = if resync_pending {
            report.kind = "full_resync";
            Mode::FullResync
        } else {
            mode
        };
        if mode == Mode::Sync {
            let initial: bool = sqlx::query_scalar(
                "SELECT NOT EXISTS (SELECT 1 FROM runs WHERE audience_id = $1 AND status = 'succeeded')
                    AND NOT EXISTS (SELECT 1 FROM synced_members WHERE audience_id = $1)",
            )
            .bind(audience.id)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db_message(&e))?;
            report.kind = if initial { "initial" } else { "incremental" };
        }
        if !dry_run {
            // The resync mark goes down with the run row: from here on, until a full resync
            // ends, every run of the audience is one.
            let run_id: i64 = sqlx::query_scalar(
                "WITH mark AS (
                    UPDATE audiences SET resync_pending = true
                     WHERE id = $1 AND $2 = 'full_resync' AND NOT resync_pending)
                 INSERT INTO runs (audience_id, kind, status, owner, trigger)
                 VALUES ($1, $2, 'running', $3, $4)
                 RETURNING id",
            )
            .bind(audience.id)
            .bind(report.kind)
            .bind(&self.owner)
            .bind(opts.trigger)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db_message(&e))?;
            report.run_id = Some(run_id);
        }
        tracing::info!(audience = %key, run_id = ?report.run_id, kind = report.kind, dry_run, "run started");

        let reader = snapshot::Reader::open(
            &mut *conn,
            &self.pool,
            key,
            &audience.def.query,
            audience.def.source_url.as_ref(),
            self.statement_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        let full = mode == Mode::FullResync;
        let Some(run_id) = report.run_id else {
            // A dry run: capture and preview; nothing is written.
            let captured = snapshot::capture(&mut *conn, reader)
                .await
                .map_err(|e| e.to_string())?;
            report.captured(captured);
            if !opts.allow_removals {
                report.held_reason = self.guard_verdict(&mut *conn, audience, captured).await?;
                report.would_hold = report.held_reason.is_some();
            }
            let (counts, sample) = diff::preview(&mut *conn, audience.id, full, 3)
                .await
                .map_err(|e| db_message(&e))?;
            report.added = counts.added;
            report.removed = counts.removed;
            report.sample = sample
                .iter()
                .map(|c| identify_payload(audience.id, key, c))
                .collect();
            report.status = "succeeded";
            return Ok(true);
        };
        let first = diff::is_first_sync(&mut *conn, audience.id)
            .await
            .map_err(|e| db_message(&e))?;
        let (captured, counts) = if first {
            diff::first_sync(&mut *conn, reader, audience.id, run_id)
                .await
                .map_err(|e| e.to_string())?
        } else {
            let captured = snapshot::capture(&mut *conn, reader)
                .await
                .map_err(|e| e.to_string())?;
            if !opts.allow_removals
                && let Some(reason) = self.guard_verdict(&mut *conn, audience, captured).await?
            {
                // Nothing is written or sent; the counts say what would have been.
                let (counts, _) = diff::preview(&mut *conn, audience.id, full, 0)
                    .await
                    .map_err(|e| db_message(&e))?;
                report.captured(captured);
                report.added = counts.added;
                report.removed = counts.removed;
                let command = if full { "resync" } else { "sync" };
                report.error = Some(format!(
                    "held: {reason}. Fix the query, or send it anyway with \"audience-sync {command} --audience {key} --allow-removals\""
                ));
                report.held_reason = Some(reason);
                report.status = "held";
                return Ok(true);
            }
            let counts = diff::write_outbox(&mut *conn, audience.id, run_id, full)
                .await
                .map_err(|e| e.to_string())?;
            (captured, counts)
        };
        report.captured(captured);
        report.added = counts.added;
        report.removed = counts.removed;
        sqlx::query(
            "UPDATE runs SET members = $2, added = $3, removed = $4, skipped_rows = $5 WHERE id = $1",
        )
        .bind(run_id)
        .bind(report.members)
        .bind(report.added)
        .bind(report.removed)
        .bind(report.skipped_rows)
        .execute(&self.pool)
        .await
        .map_err(|e| db_message(&e))?;
        // The capture is no longer needed; free it before a long delivery.
        let _ = sqlx::query("DROP TABLE IF EXISTS pg_temp.audience_capture")
            .execute(&mut *conn)
            .await;

        let progress = self.progress_bar(audience.id, key).await;
        let target = Target {
            audience_id: audience.id,
            key: key.clone(),
            progress: progress.clone(),
        };
        // The audience lock lives on `conn`: if that session ends (database restart,
        // failover, terminated backend) the lock is gone and another worker may take the
        // audience, so delivery stops claiming. Checked every LOCK_CHECK while calls go on.
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
                        let alive = tokio::time::timeout(
                            LOCK_CHECK_TIMEOUT,
                            sqlx::query("SELECT 1").execute(&mut *conn),
                        )
                        .await;
                        if !matches!(alive, Ok(Ok(_))) {
                            tracing::warn!(audience = %key, timed_out = alive.is_err(), "lost the audience lock (its database session ended or stopped answering); stopping delivery");
                            lock_lost = true;
                            run_cancel.cancel();
                        }
                    }
                }
            }
        }
        .map_err(|e| e.to_string())?;
        progress.finish_and_clear();
        report.sent = d.sent;
        report.failed = d.failed;
        report.retried = d.retried;
        let owed = ((report.added + report.removed) as u64).saturating_sub(d.sent);

        if let Some(halt) = d.halted {
            return Err(format!(
                "{halt}. Nothing unconfirmed was lost: the run stopped at once and its {owed} unconfirmed changes stay pending"
            ));
        }
        if lock_lost {
            return Err(format!(
                "lost the lock on audience {key:?} when its database session ended or stopped answering (restart, failover, network?); {} changes were confirmed, the rest stay pending for the next run",
                d.sent
            ));
        }
        if d.cancelled {
            return Err("run was interrupted; unsent changes stay pending for the next run".into());
        }
        let out_of_retries = d.failed - d.rejected;
        if out_of_retries > 0 {
            return Err(format!(
                "{} of {} changes were not delivered ({} rejected by Wigzo, {out_of_retries} out of retries; last error: {}); they stay in the outbox and are retried by the next run",
                d.failed,
                report.added + report.removed,
                d.rejected,
                d.last_error.as_deref().unwrap_or("none")
            ));
        }
        report.rejected = outbox::rejected_count(&self.pool, audience.id)
            .await
            .map_err(|e| db_message(&e))?;
        if report.rejected > 0 {
            // Everything else is confirmed. Re-running the audience would not change Wigzo's
            // answer, so the run ends partial and the audience waits for its next tick.
            report.status = "partial";
            report.error = Some(format!(
                "{} changes are held because Wigzo rejected them ({} in this run; last error: {}); they are sent again when the user's value or contact fields change, by a full resync, or by `audience-sync retry --audience {key}`",
                report.rejected,
                d.rejected,
                d.last_error.as_deref().unwrap_or("see ops.failed_changes")
            ));
            return Ok(true);
        }
        report.status = "succeeded";
        Ok(true)
    }
}
