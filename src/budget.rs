//! The destination budget: one rate limiter and one 429 pause per Wigzo organization token,
//! shared by every run a process executes (audiences, traits, manual and scheduled runs), and
//! across replicas through PostgreSQL ([`coordinate`]): each live replica takes an equal share
//! of `requests_per_second`, and a 429 seen by any replica pauses them all.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How often a replica writes its heartbeat, publishes its pause and reads the others'.
pub const BEAT: Duration = Duration::from_millis(200);

/// One token's budget; clones share it. [`crate::wigzo::WigzoClient`] holds one (a client is
/// one token), and every run of the process uses its client's.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

struct Inner {
    /// `requests_per_second` of the whole deployment; 0: no client-side limit.
    rate: u32,
    /// The rate this process may use now (its share), and its limiter (`None`: unlimited).
    share: AtomicU32,
    limiter: RwLock<Option<Arc<DefaultDirectRateLimiter>>>,
    /// No call starts before this: the latest 429's `Retry-After` (or backoff), this
    /// process's or another replica's.
    not_before: Mutex<Instant>,
    /// Identifies the destination in the shared tables: an md5 of base URL and token.
    destination: String,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("rate", &self.inner.rate)
            .field("share", &self.share())
            .finish()
    }
}

/// A limiter of `rate` calls per second whose bursts are a tenth of a second's calls at most,
/// so that any window of a few seconds stays within the rate (a full second's burst on top of
/// the rate would let a 5 s window carry 20% more).
fn limiter(rate: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    NonZeroU32::new(rate).map(|rps| {
        let burst = NonZeroU32::new((rps.get() / 10).max(1)).expect("at least 1");
        Arc::new(RateLimiter::direct(
            Quota::per_second(rps).allow_burst(burst),
        ))
    })
}

impl Budget {
    /// A budget of `requests_per_second` calls (0: unlimited) for the destination that
    /// `destination` identifies (never the token itself).
    pub fn new(requests_per_second: u32, destination: String) -> Self {
        Budget {
            inner: Arc::new(Inner {
                rate: requests_per_second,
                share: AtomicU32::new(requests_per_second),
                limiter: RwLock::new(limiter(requests_per_second)),
                not_before: Mutex::new(Instant::now()),
                destination,
            }),
        }
    }

    /// The rate this process may use now.
    pub fn share(&self) -> u32 {
        self.inner.share.load(Ordering::Relaxed)
    }

    /// Takes an equal share of the rate among `replicas` live replicas (at least 1 call/s).
    pub fn set_replicas(&self, replicas: u32) {
        if self.inner.rate == 0 {
            return;
        }
        let share = (self.inner.rate / replicas.max(1)).max(1);
        if self.inner.share.swap(share, Ordering::Relaxed) != share {
            *self.inner.limiter.write().expect("lock") = limiter(share);
            tracing::info!(replicas, share, "destination budget: rate share changed");
        }
    }

    /// Waits for this process's turn to make one call: past any 429 pause, then a slot of the
    /// rate. `false` if `stop` fired first.
    pub async fn turn(&self, stop: &CancellationToken) -> bool {
        loop {
            let until = *self.inner.not_before.lock().expect("lock");
            if until <= Instant::now() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = stop.cancelled() => return false,
            }
            // A 429 seen meanwhile may have moved the pause further: look again.
        }
        let limiter = self.inner.limiter.read().expect("lock").clone();
        if let Some(l) = limiter {
            tokio::select! {
                _ = l.until_ready() => {}
                _ = stop.cancelled() => return false,
            }
        }
        true
    }

    /// Pauses every call of the process for `wait` from now (a 429), unless a longer pause is
    /// already set; [`coordinate`] passes it on to the other replicas.
    pub fn pause(&self, wait: Duration) {
        let mut nb = self.inner.not_before.lock().expect("lock");
        *nb = (*nb).max(Instant::now() + wait);
    }

    /// How long the pause still runs.
    fn paused_for(&self) -> Duration {
        self.inner
            .not_before
            .lock()
            .expect("lock")
            .saturating_duration_since(Instant::now())
    }
}

/// Keeps `budget` in step with the other replicas of the same destination until `stop`
/// fires: every [`BEAT`], one statement (`budget_beat.sql`) records this replica as live,
/// publishes its 429 pause, and reads the number of live replicas (whose equal share of the
/// rate this process then takes) and the shared pause (which this process then honours). If
/// the database does not answer, the last share and pause stay in force.
pub async fn coordinate(budget: Budget, pool: PgPool, owner: String, stop: CancellationToken) {
    let mut tick = tokio::time::interval(BEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let beat: Result<(i64, Option<f64>), sqlx::Error> = sqlx::query_as(crate::sql::BUDGET_BEAT)
            .bind(&budget.inner.destination)
            .bind(&owner)
            .bind(budget.paused_for().as_secs_f64())
            .fetch_one(&pool)
            .await;
        match beat {
            Ok((replicas, shared_pause)) => {
                warned = false;
                budget.set_replicas(u32::try_from(replicas).unwrap_or(u32::MAX));
                if let Some(secs) = shared_pause.filter(|s| *s > 0.0) {
                    budget.pause(Duration::from_secs_f64(secs.min(300.0)));
                }
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %crate::audience::db_message(&e), "destination budget: cannot reach the other replicas; keeping the last share");
            }
            Err(_) => {}
        }
    }
    // Leaving: the others take this share back at their next beat.
    let _ = sqlx::query("DELETE FROM destination_replicas WHERE destination = $1 AND owner = $2")
        .bind(&budget.inner.destination)
        .bind(&owner)
        .execute(&pool)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pause_holds_every_holder_of_the_budget() {
        let a = Budget::new(0, "t".into());
        let b = a.clone();
        a.pause(Duration::from_millis(300));
        let started = Instant::now();
        assert!(b.turn(&CancellationToken::new()).await);
        assert!(started.elapsed() >= Duration::from_millis(300));
        let stop = CancellationToken::new();
        a.pause(Duration::from_secs(60));
        stop.cancel();
        assert!(
            !b.turn(&stop).await,
            "a stopped run does not wait the pause out"
        );
    }

    #[tokio::test]
    async fn bursts_are_a_tenth_of_the_rate() {
        let b = Budget::new(100, "t".into());
        let stop = CancellationToken::new();
        let started = Instant::now();
        for _ in 0..30 {
            assert!(b.turn(&stop).await);
        }
        // 10 at once, then one per 10 ms: 30 turns take at least 0.19 s.
        assert!(
            started.elapsed() >= Duration::from_millis(190),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn replicas_take_equal_shares_of_the_rate() {
        let b = Budget::new(100, "t".into());
        b.set_replicas(3);
        assert_eq!(b.share(), 33);
        b.set_replicas(1);
        assert_eq!(b.share(), 100);
        b.set_replicas(500);
        assert_eq!(b.share(), 1, "never below one call a second");
        let unlimited = Budget::new(0, "t".into());
        unlimited.set_replicas(3);
        assert_eq!(unlimited.share(), 0);
    }
}
