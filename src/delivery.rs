//! Delivery: claims an audience's pending changes in batches, sends them with bounded
//! concurrency and a rate limit, retries with backoff, and records every result. No database
//! transaction is open while a call is in flight.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sqlx::PgPool;
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::WigzoConfig;
use crate::outbox::{self, Change, Confirmed, NotConfirmed};
use crate::wigzo::{Identify, Outcome, WigzoClient, backoff};

/// Longest wait honoured from one `Retry-After` (longer asks are capped at this).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// A change throttled (429) this many times in one run gives up until the next run.
pub const MAX_THROTTLED: u32 = 50;
/// Results written to the database at once, at most (the recorder writes whatever has
/// arrived, usually far fewer). Writes this large need TCP_NODELAY, which
/// [`crate::db::set_nodelay`] sets: without it a ~24 KB confirmation met Nagle's algorithm and
/// the server's delayed ACK, ~40 ms per write, and delivery fell from 30k to 10k calls/s.
const RECORD_BATCH: usize = 500;

/// Retries of one result-recording statement whose database connection was lost.
const DB_RETRIES: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(
        "database error during delivery: {}; unconfirmed changes stay in the outbox for the next run",
        crate::audience::db_message(.0)
    )]
    Db(#[from] sqlx::Error),
}

/// A failure that another try on a fresh connection may not have: the connection was lost
/// (terminated backend, database restart or failover), or the pool was briefly exhausted.
fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            c.starts_with("08") || c.starts_with("57P") || c == "40001" || c == "40P01"
        }),
        _ => false,
    }
}

/// Runs one single-statement, idempotent write, again on a fresh connection if the first
/// was lost: a confirmation must not be dropped because one pooled connection died. (Each
/// write is one statement, so a lost connection either committed it or did nothing; trying
/// again after an unseen commit matches no rows, since both filter on the lease.)
async fn retry_write<T, F, Fut>(what: &str, mut write: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut retries = 0;
    loop {
        match write().await {
            Err(e) if retries < DB_RETRIES && transient(&e) => {
                retries += 1;
                tracing::warn!(error = %crate::audience::db_message(&e), retries, "lost the database connection while {what}; trying again");
                tokio::time::sleep(Duration::from_millis(50 << retries)).await;
            }
            r => return r,
        }
    }
}

/// What a delivery pass did.
#[derive(Debug, Clone, Default)]
pub struct DeliveryReport {
    pub sent: u64,
    /// Changes rejected (4xx) or out of retries in this run.
    pub failed: u64,
    pub rejected: u64,
    /// HTTP retries made (429s included).
    pub retried: u64,
    /// Set when Wigzo refused the organization token (401/403).
    pub unauthorized: Option<u16>,
    /// The last error seen on a change that was not confirmed.
    pub last_error: Option<String>,
    pub cancelled: bool,
}

/// Who the audience is, for the payload, and where progress is shown.
#[derive(Debug, Clone)]
pub struct Target {
    pub audience_id: i64,
    pub key: String,
    /// Advanced as changes are confirmed or given up; `ProgressBar::hidden()` when no
    /// terminal watches.
    pub progress: indicatif::ProgressBar,
}

enum Result1 {
    Confirmed(Confirmed),
    NotConfirmed(NotConfirmed, bool),
}

/// Delivers every pending change of one audience. Returns when none is left to claim, or when
/// `cancel` fires (then in-flight calls finish and the rest stays pending).
pub async fn deliver(
    pool: &PgPool,
    client: &WigzoClient,
    cfg: &WigzoConfig,
    target: &Target,
    owner: &str,
    cancel: &CancellationToken,
) -> Result<DeliveryReport, DeliveryError> {
    let stop = cancel.child_token();
    let limiter: Option<Arc<DefaultDirectRateLimiter>> = NonZeroU32::new(cfg.requests_per_second)
        .map(|rps| Arc::new(RateLimiter::direct(Quota::per_second(rps))));
    let in_flight = Arc::new(Semaphore::new(cfg.concurrency));
    // Changes held in memory at once (sending or waiting to retry): bounded.
    let outstanding = Arc::new(Semaphore::new(
        (cfg.batch_size as usize * 2).max(cfg.concurrency),
    ));
    let not_before = Arc::new(Mutex::new(Instant::now()));
    let (res_tx, mut res_rx) = mpsc::channel::<Result1>(RECORD_BATCH * 2);

    // Recorder: writes results in batches while calls go on.
    let rec_pool = pool.clone();
    let rec_owner = owner.to_string();
    let rec_progress = target.progress.clone();
    let rec_stop = stop.clone();
    let rec_audience = target.audience_id;
    let recorder = tokio::spawn(async move {
        let mut report = DeliveryReport::default();
        let mut buf = Vec::with_capacity(RECORD_BATCH);
        loop {
            let n = res_rx.recv_many(&mut buf, RECORD_BATCH).await;
            if n == 0 {
                break;
            }
            let mut ok = Vec::new();
            let mut bad = Vec::new();
            for r in buf.drain(..) {
                match r {
                    Result1::Confirmed(c) => {
                        report.retried += c.extra_attempts as u64;
                        ok.push(c)
                    }
                    Result1::NotConfirmed(nc, counts) => {
                        report.retried += nc.extra_attempts as u64;
                        if counts {
                            report.failed += 1;
                            if nc.status == "rejected" {
                                report.rejected += 1;
                            }
                        }
                        if nc.error.is_some() {
                            report.last_error.clone_from(&nc.error);
                        }
                        bad.push(nc)
                    }
                }
            }
            let recorded = async {
                report.sent += retry_write("confirming changes", || {
                    outbox::confirm(&rec_pool, rec_audience, &rec_owner, &ok)
                })
                .await?;
                retry_write("recording failed changes", || {
                    outbox::record_failures(&rec_pool, rec_audience, &rec_owner, &bad)
                })
                .await
            }
            .await;
            if let Err(e) = recorded {
                // Results can no longer be written: stop sending rather than deliver blind
                // (every unrecorded call would be sent again by the next run).
                rec_stop.cancel();
                return Err(e);
            }
            rec_progress.inc((ok.len() + bad.len()) as u64);
        }
        Ok::<_, sqlx::Error>(report)
    });

    let mut tasks = tokio::task::JoinSet::new();
    let unauthorized = Arc::new(std::sync::Mutex::new(None::<u16>));
    let mut progress = Instant::now();
    let mut claimed_total = 0u64;
    let claim_result: Result<(), sqlx::Error> = async {
        // One pass in user id order, then one more from the start for anything skipped
        // (rows whose lease, held by a process that died, expired meanwhile).
        let mut after = String::new();
        let mut second_pass = false;
        while !stop.is_cancelled() {
            let claimed =
                outbox::claim(pool, target.audience_id, owner, &after, cfg.batch_size).await?;
            let Some(last) = claimed.last else {
                if second_pass || after.is_empty() {
                    break;
                }
                second_pass = true;
                after.clear();
                continue;
            };
            after = last;
            let batch = claimed.changes;
            claimed_total += batch.len() as u64;
            for change in batch {
                let permit = tokio::select! {
                    p = outstanding.clone().acquire_owned() => p.expect("semaphore open"),
                    _ = stop.cancelled() => break,
                };
                let ctx = SendCtx {
                    client: client.clone(),
                    limiter: limiter.clone(),
                    in_flight: in_flight.clone(),
                    not_before: not_before.clone(),
                    stop: stop.clone(),
                    max_attempts: cfg.max_attempts,
                    retry_base: cfg.retry_base,
                    retry_max: cfg.retry_max,
                    unauthorized: unauthorized.clone(),
                };
                let tx = res_tx.clone();
                let target = target.clone();
                tasks.spawn(async move {
                    let r = send_one(&ctx, &target, change).await;
                    let _ = tx.send(r).await;
                    drop(permit);
                });
                // Reap finished tasks so the set stays small.
                while tasks.try_join_next().is_some() {}
            }
            if progress.elapsed() > Duration::from_secs(10) {
                tracing::info!(audience = %target.key, claimed = claimed_total, done = target.progress.position(), total = target.progress.length().unwrap_or(0), "delivery progress");
                progress = Instant::now();
            }
        }
        Ok(())
    }
    .await;
    if claim_result.is_err() {
        // No more claims: let the calls in flight end now instead of retrying on.
        stop.cancel();
    }
    while tasks.join_next().await.is_some() {}
    drop(res_tx);
    let recorded = recorder.await.expect("recorder task panicked");
    // Whatever happened, hand back the changes still leased (the next run's diff would
    // otherwise have to reset them).
    if let Err(e) = retry_write("releasing leases", || {
        outbox::release(pool, target.audience_id, owner)
    })
    .await
    {
        tracing::warn!(audience = %target.key, error = %crate::audience::db_message(&e), "cannot release leases; the next run of this audience resets them");
    }
    let mut report = recorded?;
    claim_result?;
    report.unauthorized = *unauthorized.lock().expect("lock");
    report.cancelled = cancel.is_cancelled();
    Ok(report)
}

struct SendCtx {
    client: WigzoClient,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    in_flight: Arc<Semaphore>,
    not_before: Arc<Mutex<Instant>>,
    stop: CancellationToken,
    max_attempts: u32,
    retry_base: Duration,
    retry_max: Duration,
    unauthorized: Arc<std::sync::Mutex<Option<u16>>>,
}

/// Sends one change until it is confirmed, rejected, out of attempts, or the run stops.
async fn send_one(ctx: &SendCtx, target: &Target, change: Change) -> Result1 {
    let body = Identify::new(target.audience_id, &target.key, &change);
    let mut tries: i32 = 0;
    let mut failures: u32 = 0;
    let mut throttles: u32 = 0;
    let not_confirmed =
        |status, tries: i32, code: Option<u16>, error: Option<String>| NotConfirmed {
            user_id: change.user_id.clone(),
            status,
            extra_attempts: (tries - 1).max(0),
            last_status: code.map(i32::from),
            error,
        };
    loop {
        if ctx.stop.is_cancelled() {
            return Result1::NotConfirmed(not_confirmed("pending", tries, None, None), false);
        }
        let wait_until = *ctx.not_before.lock().await;
        if wait_until > Instant::now() {
            tokio::select! {
                _ = tokio::time::sleep_until(wait_until.into()) => {}
                _ = ctx.stop.cancelled() => continue,
            }
        }
        if let Some(l) = &ctx.limiter {
            l.until_ready().await;
        }
        let outcome = {
            let _permit = ctx.in_flight.acquire().await.expect("semaphore open");
            // The run may have stopped (e.g. token refused) while this call waited its turn.
            if ctx.stop.is_cancelled() {
                continue;
            }
            tries += 1;
            ctx.client.send(&body).await
        };
        let (code, error, wait) = match outcome {
            Outcome::Confirmed { .. } => {
                return Result1::Confirmed(Confirmed {
                    user_id: change.user_id.clone(),
                    target_version: change.target_version,
                    member: change.member,
                    message_id: change.message_id,
                    extra_attempts: tries - 1,
                });
            }
            Outcome::Rejected { status, error } => {
                tracing::warn!(audience = %target.key, user_id = %change.user_id, status, error = %error, "Wigzo rejected a change");
                return Result1::NotConfirmed(
                    not_confirmed("rejected", tries, Some(status), Some(error)),
                    true,
                );
            }
            Outcome::Unauthorized { status } => {
                *ctx.unauthorized.lock().expect("lock") = Some(status);
                ctx.stop.cancel();
                let error = format!("HTTP {status}: the organization token was refused");
                return Result1::NotConfirmed(
                    not_confirmed("pending", tries, Some(status), Some(error)),
                    false,
                );
            }
            Outcome::Retry {
                status,
                error,
                retry_after,
                throttled,
            } => {
                let wait = if throttled {
                    throttles += 1;
                    if throttles > MAX_THROTTLED {
                        return Result1::NotConfirmed(
                            not_confirmed("failed", tries, status, Some(error)),
                            true,
                        );
                    }
                    let wait = retry_after
                        .unwrap_or_else(|| backoff(throttles - 1, ctx.retry_base, ctx.retry_max))
                        .min(MAX_RETRY_AFTER);
                    // Everyone pauses: the destination asked us to slow down.
                    let mut nb = ctx.not_before.lock().await;
                    *nb = (*nb).max(Instant::now() + wait);
                    wait
                } else {
                    failures += 1;
                    if failures >= ctx.max_attempts {
                        tracing::warn!(audience = %target.key, user_id = %change.user_id, error = %error, attempts = tries, "change out of retries for this run");
                        return Result1::NotConfirmed(
                            not_confirmed("failed", tries, status, Some(error)),
                            true,
                        );
                    }
                    retry_after
                        .unwrap_or_else(|| backoff(failures - 1, ctx.retry_base, ctx.retry_max))
                        .min(MAX_RETRY_AFTER)
                };
                (status, error, wait)
            }
        };
        tracing::debug!(audience = %target.key, user_id = %change.user_id, status = ?code, error = %error, wait_ms = wait.as_millis() as u64, "retrying call");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.stop.cancelled() => {
                return Result1::NotConfirmed(not_confirmed("pending", tries, code, Some(error)), false);
            }
        }
    }
}
