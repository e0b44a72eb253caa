//! Delivery: claims an audience's pending changes in batches, sends them with bounded
//! concurrency and a rate limit, retries with backoff, and records every result. No database
//! transaction is open while a call is in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::WigzoConfig;
use crate::outbox::{self, Change, ChangeStatus, Confirmed, NotConfirmed};
use crate::wigzo::{Identify, Outcome, WigzoClient, backoff};

/// Longest wait honoured from one `Retry-After` (longer asks are capped at this).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// A change throttled (429) this many times in one run gives up until the next run.
pub const MAX_THROTTLED: u32 = 50;
/// Results written to the database at once, at most (the recorder writes whatever has
/// arrived, usually far fewer). Writes this large need TCP_NODELAY, which
/// [`crate::db::set_nodelay`] sets: without it a large confirmation meets Nagle's algorithm and
/// the server's delayed ACK on every write (BENCHMARKS.md has what that cost).
const RECORD_BATCH: usize = 500;

/// Retries of one result-recording statement whose database connection was lost.
const DB_RETRIES: u32 = 4;

/// Why delivery stopped on a database problem.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// A claim or a result write failed, even on a fresh connection.
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

/// Why delivery stopped the whole run instead of going on change by change: the destination
/// answered in a way that says the configuration is wrong, so every further call would be
/// wasted (and nothing it answered confirms anything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    /// 401/403: the organization token was refused.
    TokenRefused {
        /// 401 or 403.
        status: u16,
    },
    /// 3xx: `base_url` points at something that redirects; redirects are never followed.
    Redirected {
        /// The 3xx status.
        status: u16,
        /// The host its `Location` named, if any.
        location_host: Option<String>,
    },
    /// The first [`ENDPOINT_PROBE`] answers were all 404/405/410 and none 2xx: wrong host or
    /// path, not a problem of any one user.
    WrongEndpoint {
        /// The last of those statuses.
        status: u16,
    },
}

impl std::fmt::Display for Halt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Halt::TokenRefused { status } => write!(
                f,
                "Wigzo refused the organization token (HTTP {status}); check WIGZO_ORG_TOKEN / [wigzo] org_token"
            ),
            Halt::Redirected {
                status,
                location_host,
            } => write!(
                f,
                "the identify call was answered with a redirect (HTTP {status}{}), which is never followed; check WIGZO_BASE_URL / [wigzo] base_url",
                location_host
                    .as_deref()
                    .map(|h| format!(" to host {h}"))
                    .unwrap_or_default()
            ),
            Halt::WrongEndpoint { status } => write!(
                f,
                "the first {ENDPOINT_PROBE} identify calls were all answered HTTP 404/405/410 (last: {status}) and none 2xx: the endpoint looks wrong; check WIGZO_BASE_URL / [wigzo] base_url"
            ),
        }
    }
}

/// Answers looked at to tell a wrong endpoint from users Wigzo rejects one by one.
pub const ENDPOINT_PROBE: u32 = 20;

/// Statuses that, when every one of the first answers has one, mean the endpoint is wrong.
const WRONG_ENDPOINT: [u16; 3] = [404, 405, 410];

/// What a delivery pass did.
#[derive(Debug, Clone, Default)]
pub struct DeliveryReport {
    /// Changes Wigzo confirmed.
    pub sent: u64,
    /// Changes rejected (4xx) or out of retries in this run.
    pub failed: u64,
    /// Of `failed`, the changes Wigzo rejected (4xx).
    pub rejected: u64,
    /// HTTP retries made (429s included).
    pub retried: u64,
    /// Set when an answer stopped the run (token refused, redirect, wrong endpoint).
    pub halted: Option<Halt>,
    /// The last error seen on a change that was not confirmed.
    pub last_error: Option<String>,
    /// Users rejected with 404/405/410 in this delivery (at most the first answers and the
    /// calls in flight with them: all that a wrong endpoint can have answered).
    pub endpoint_rejected: Vec<String>,
    /// Shutdown (or a lost lock) stopped it.
    pub cancelled: bool,
}

/// Who the audience is, for the payload, and where progress is shown.
#[derive(Debug, Clone)]
pub struct Target {
    /// The audience's id (its outbox partition).
    pub audience_id: i64,
    /// Its key (the trait the calls set).
    pub key: String,
    /// Audience or computed trait (`context.personas.computation_class`).
    pub kind: crate::audience::Kind,
    /// Advanced as changes are confirmed or given up; `ProgressBar::hidden()` when no
    /// terminal watches.
    pub progress: indicatif::ProgressBar,
}

/// How one change's sending ended.
enum SendResult {
    Confirmed(Confirmed),
    NotConfirmed {
        change: NotConfirmed,
        /// Whether it counts as a failure of this run (rejected or out of retries), rather
        /// than left pending because the run stopped.
        failure: bool,
    },
}

/// The run's first answers, watched for a wrong endpoint.
#[derive(Debug, Default)]
struct EndpointCheck {
    answers: u32,
    any_other: bool,
}

impl EndpointCheck {
    /// Counts one HTTP answer; returns true when it completes a probe of nothing but
    /// 404/405/410.
    fn answer(&mut self, status: u16) -> bool {
        if self.answers >= ENDPOINT_PROBE {
            return false;
        }
        self.answers += 1;
        self.any_other |= !WRONG_ENDPOINT.contains(&status);
        self.answers == ENDPOINT_PROBE && !self.any_other
    }
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
    let (res_tx, res_rx) = mpsc::channel::<SendResult>(RECORD_BATCH * 2);
    let recorder = tokio::spawn(record_results(
        pool.clone(),
        target.clone(),
        owner.to_string(),
        stop.clone(),
        res_rx,
        ENDPOINT_PROBE as usize + cfg.concurrency,
    ));
    let renewer = tokio::spawn(renew_leases(
        pool.clone(),
        target.clone(),
        owner.to_string(),
        cfg.lease,
    ));
    let ctx = Arc::new(SendCtx {
        client: client.clone(),
        budget: client.budget().clone(),
        in_flight: Arc::new(Semaphore::new(cfg.concurrency)),
        stop: stop.clone(),
        max_attempts: cfg.max_attempts,
        retry_base: cfg.retry_base,
        retry_max: cfg.retry_max,
        halted: Arc::new(std::sync::Mutex::new(None::<Halt>)),
        endpoint: Arc::new(std::sync::Mutex::new(EndpointCheck::default())),
    });
    let mut tasks = tokio::task::JoinSet::new();
    let claim_result = claim_and_send(pool, cfg, target, owner, &ctx, &res_tx, &mut tasks).await;
    if claim_result.is_err() {
        // No more claims: let the calls in flight end now instead of retrying on.
        stop.cancel();
    }
    while tasks.join_next().await.is_some() {}
    drop(res_tx);
    let recorded = recorder.await.expect("recorder task panicked");
    renewer.abort();
    let halted = ctx.halted.lock().expect("lock").clone();
    let mut report = recorded?;
    if let Some(Halt::WrongEndpoint { .. }) = &halted {
        // The 404s before the verdict were the endpoint's, not the users': owed again. Only
        // this delivery's: changes rejected by earlier runs stay held.
        let users = std::mem::take(&mut report.endpoint_rejected);
        let reset = retry_write("re-queueing changes answered by a wrong endpoint", || {
            outbox::requeue_rejected(pool, target.audience_id, Some(&users))
        })
        .await?;
        report.failed = report.failed.saturating_sub(reset);
        report.rejected = report.rejected.saturating_sub(reset);
    }
    // Whatever happened, hand back the changes still leased (the next run's diff would
    // otherwise have to reset them).
    if let Err(e) = retry_write("releasing leases", || {
        outbox::release(pool, target.audience_id, owner)
    })
    .await
    {
        tracing::warn!(audience = %target.key, error = %crate::audience::db_message(&e), "cannot release leases; the next run of this audience resets them");
    }
    claim_result?;
    report.halted = halted;
    report.cancelled = cancel.is_cancelled();
    Ok(report)
}

/// Claims the audience's pending changes batch by batch and starts a task sending each, with
/// at most `2 * batch_size` changes held at once. One pass in user id order, then one more
/// from the start for anything skipped (rows whose lease, held by a process that died,
/// expired meanwhile); this run's own claims never expire while it works on them, since
/// `renew_leases` keeps them fresh. Stops claiming when `ctx.stop` fires.
async fn claim_and_send(
    pool: &PgPool,
    cfg: &WigzoConfig,
    target: &Target,
    owner: &str,
    ctx: &Arc<SendCtx>,
    results: &mpsc::Sender<SendResult>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), sqlx::Error> {
    let outstanding = Arc::new(Semaphore::new(
        (cfg.batch_size as usize * 2).max(cfg.concurrency),
    ));
    let mut progress = Instant::now();
    let mut claimed_total = 0u64;
    let mut after = String::new();
    let mut second_pass = false;
    while !ctx.stop.is_cancelled() {
        let claimed = outbox::claim(
            pool,
            target.audience_id,
            owner,
            &after,
            cfg.batch_size,
            cfg.lease,
        )
        .await?;
        let Some(last) = claimed.last else {
            if second_pass || after.is_empty() {
                break;
            }
            second_pass = true;
            after.clear();
            continue;
        };
        after = last;
        claimed_total += claimed.changes.len() as u64;
        for change in claimed.changes {
            let permit = tokio::select! {
                p = outstanding.clone().acquire_owned() => p.expect("semaphore open"),
                _ = ctx.stop.cancelled() => break,
            };
            let (ctx, tx, target) = (ctx.clone(), results.clone(), target.clone());
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

/// Writes results in batches while calls go on. If a write fails even on a fresh connection,
/// it stops the delivery (`stop`) rather than let calls go on whose results cannot be kept.
async fn record_results(
    pool: PgPool,
    target: Target,
    owner: String,
    stop: CancellationToken,
    mut results: mpsc::Receiver<SendResult>,
    endpoint_cap: usize,
) -> Result<DeliveryReport, sqlx::Error> {
    let mut report = DeliveryReport::default();
    let mut buf = Vec::with_capacity(RECORD_BATCH);
    loop {
        let n = results.recv_many(&mut buf, RECORD_BATCH).await;
        if n == 0 {
            break;
        }
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for r in buf.drain(..) {
            match r {
                SendResult::Confirmed(c) => {
                    report.retried += c.extra_attempts as u64;
                    ok.push(c)
                }
                SendResult::NotConfirmed { change, failure } => {
                    report.retried += change.retries as u64;
                    if failure {
                        report.failed += 1;
                        if change.status == ChangeStatus::Rejected {
                            report.rejected += 1;
                            let by_endpoint = change
                                .last_status
                                .is_some_and(|s| WRONG_ENDPOINT.iter().any(|w| i32::from(*w) == s));
                            if by_endpoint && report.endpoint_rejected.len() < endpoint_cap {
                                report.endpoint_rejected.push(change.user_id.clone());
                            }
                        }
                    }
                    if change.error.is_some() {
                        report.last_error.clone_from(&change.error);
                    }
                    bad.push(change)
                }
            }
        }
        let recorded = async {
            report.sent += retry_write("confirming changes", || {
                outbox::confirm(&pool, target.audience_id, &owner, &ok)
            })
            .await?;
            retry_write("recording failed changes", || {
                outbox::record_failures(&pool, target.audience_id, &owner, &bad)
            })
            .await
        }
        .await;
        if let Err(e) = recorded {
            // Results can no longer be written: stop sending rather than deliver blind
            // (every unrecorded call would be sent again by the next run).
            stop.cancel();
            return Err(e);
        }
        target.progress.inc((ok.len() + bad.len()) as u64);
    }
    Ok(report)
}

/// Keeps this delivery's claims leased while it works on them: a change can wait longer than
/// one lease (long 429 pauses), and an expired lease would let the claim loop's second pass,
/// or another worker, claim and send it again. Renews every third of the lease.
async fn renew_leases(pool: PgPool, target: Target, owner: String, lease: Duration) {
    let mut tick = tokio::time::interval((lease / 3).max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = outbox::renew_leases(&pool, target.audience_id, &owner, lease).await {
            tracing::warn!(audience = %target.key, error = %crate::audience::db_message(&e), "cannot renew the leases of changes in flight");
        }
    }
}

struct SendCtx {
    client: WigzoClient,
    /// The process's budget for this token: rate and 429 pause, shared with every other run.
    budget: crate::budget::Budget,
    in_flight: Arc<Semaphore>,
    stop: CancellationToken,
    max_attempts: u32,
    retry_base: Duration,
    retry_max: Duration,
    halted: Arc<std::sync::Mutex<Option<Halt>>>,
    endpoint: Arc<std::sync::Mutex<EndpointCheck>>,
}

impl SendCtx {
    /// Stops the run for `why` (the first reason given is kept).
    fn halt(&self, why: Halt) {
        self.halted.lock().expect("lock").get_or_insert(why);
        self.stop.cancel();
    }
}

/// Calls made for one change, as stored: `attempts` counts calls that may have reached Wigzo
/// (429s did not: Wigzo refused them unapplied), `throttles` the 429s.
#[derive(Debug, Default, Clone, Copy)]
struct Tries {
    sent: u32,
    throttled: u32,
}

/// Sends one change until it is confirmed, rejected, out of attempts, or the run stops.
async fn send_one(ctx: &SendCtx, target: &Target, change: Change) -> SendResult {
    let body = Identify::new(target.audience_id, &target.key, target.kind, &change);
    let mut a = Attempts {
        change: &change,
        tries: Tries::default(),
        failures: 0,
    };
    loop {
        let Some(outcome) = ctx.call(&body, &mut a.tries).await else {
            return a.not_confirmed(ChangeStatus::Pending, None, None, false);
        };
        let (code, error, wait) = match outcome {
            Outcome::Confirmed { .. } => return a.confirmed(),
            Outcome::Rejected { status, error } => {
                tracing::warn!(audience = %target.key, user_id = %change.user_id, status, error = %error, "Wigzo rejected a change");
                return a.not_confirmed(ChangeStatus::Rejected, Some(status), Some(error), true);
            }
            Outcome::Unauthorized { status } => {
                return a.stop_run(ctx, Halt::TokenRefused { status }, status);
            }
            Outcome::Redirected {
                status,
                location_host,
            } => {
                let halt = Halt::Redirected {
                    status,
                    location_host,
                };
                return a.stop_run(ctx, halt, status);
            }
            Outcome::Retry {
                status,
                error,
                retry_after,
                throttled,
            } => match a
                .next_wait(ctx, target, throttled, retry_after, &error)
                .await
            {
                Some(wait) => (status, error, wait),
                None => return a.not_confirmed(ChangeStatus::Failed, status, Some(error), true),
            },
        };
        tracing::debug!(audience = %target.key, user_id = %change.user_id, status = ?code, error = %error, wait_ms = wait.as_millis() as u64, "retrying call");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.stop.cancelled() => {
                return a.not_confirmed(ChangeStatus::Pending, code, Some(error), false);
            }
        }
    }
}

impl SendCtx {
    /// Makes one call when it is this change's turn (a free slot, then past any 429 pause and
    /// within the rate), and watches the answer for a wrong endpoint. `None` if the run stopped
    /// first.
    async fn call(&self, body: &Identify<'_>, tries: &mut Tries) -> Option<Outcome> {
        if self.stop.is_cancelled() {
            return None;
        }
        let outcome = {
            let _permit = self.in_flight.acquire().await.expect("semaphore open");
            // The budget is asked last, just before the call: a task that waited for a slot
            // must not slip past a 429 pause set meanwhile (by this run or another).
            if !self.budget.turn(&self.stop).await {
                return None;
            }
            // The run may have stopped (e.g. token refused) while this call waited its turn.
            if self.stop.is_cancelled() {
                return None;
            }
            tries.sent += 1;
            self.client.send(body).await
        };
        if let Some(status) = outcome.status()
            && self.endpoint.lock().expect("lock").answer(status)
        {
            self.halt(Halt::WrongEndpoint { status });
        }
        Some(outcome)
    }
}

/// One change's calls so far.
struct Attempts<'a> {
    change: &'a Change,
    tries: Tries,
    /// Retryable failures (5xx, timeouts), which use up `max_attempts`; 429s do not.
    failures: u32,
}

impl Attempts<'_> {
    fn confirmed(&self) -> SendResult {
        SendResult::Confirmed(Confirmed {
            user_id: self.change.user_id.clone(),
            target_version: self.change.target_version,
            member: self.change.member,
            value: self.change.value.clone(),
            message_id: self.change.message_id,
            extra_attempts: self.tries.sent as i32 - 1,
        })
    }

    fn not_confirmed(
        &self,
        status: ChangeStatus,
        code: Option<u16>,
        error: Option<String>,
        failure: bool,
    ) -> SendResult {
        SendResult::NotConfirmed {
            change: NotConfirmed {
                user_id: self.change.user_id.clone(),
                status,
                attempts: (self.tries.sent - self.tries.throttled) as i32,
                throttles: self.tries.throttled as i32,
                retries: self.tries.sent.saturating_sub(1) as i32,
                last_status: code.map(i32::from),
                error,
            },
            failure,
        }
    }

    /// An answer that shows the configuration is wrong stops the whole run; this change
    /// stays owed, its last answer recorded.
    fn stop_run(&self, ctx: &SendCtx, halt: Halt, status: u16) -> SendResult {
        let error = halt.to_string();
        ctx.halt(halt);
        self.not_confirmed(ChangeStatus::Pending, Some(status), Some(error), false)
    }

    /// How long to wait before calling again after a retryable answer, or `None` when the
    /// change is out of retries (or throttled too often) for this run. A 429 pauses every
    /// sender, not only this one: the destination asked us to slow down.
    async fn next_wait(
        &mut self,
        ctx: &SendCtx,
        target: &Target,
        throttled: bool,
        retry_after: Option<Duration>,
        error: &str,
    ) -> Option<Duration> {
        if throttled {
            self.tries.throttled += 1;
            if self.tries.throttled > MAX_THROTTLED {
                return None;
            }
            let wait = retry_after
                .unwrap_or_else(|| backoff(self.tries.throttled - 1, ctx.retry_base, ctx.retry_max))
                .min(MAX_RETRY_AFTER);
            ctx.budget.pause(wait);
            return Some(wait);
        }
        self.failures += 1;
        if self.failures >= ctx.max_attempts {
            tracing::warn!(audience = %target.key, user_id = %self.change.user_id, error = %error, attempts = self.tries.sent - self.tries.throttled, "change out of retries for this run");
            return None;
        }
        Some(
            retry_after
                .unwrap_or_else(|| backoff(self.failures - 1, ctx.retry_base, ctx.retry_max))
                .min(MAX_RETRY_AFTER),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_probe_of_nothing_but_404_405_410_means_a_wrong_endpoint() {
        let mut c = EndpointCheck::default();
        let verdicts: Vec<bool> = (0..ENDPOINT_PROBE).map(|_| c.answer(404)).collect();
        assert_eq!(verdicts.iter().filter(|v| **v).count(), 1);
        assert!(verdicts[ENDPOINT_PROBE as usize - 1]);
        assert!(!c.answer(404), "the verdict is given once");

        let mut c = EndpointCheck::default();
        assert!(!c.answer(200));
        assert!((1..ENDPOINT_PROBE).all(|_| !c.answer(410)));

        let mut c = EndpointCheck::default();
        let mixed = [405, 410, 404];
        assert!((0..ENDPOINT_PROBE - 1).all(|i| !c.answer(mixed[i as usize % 3])));
        assert!(c.answer(404));
    }
}
