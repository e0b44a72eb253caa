//! The destination budget of one process: one rate limiter and one 429 pause per Wigzo
//! organization token, shared by every run the process executes (audiences, traits, manual
//! and scheduled runs), so that concurrent runs together stay within `requests_per_second`
//! and a 429 seen by one slows them all.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

/// One token's budget; clones share it. [`crate::wigzo::WigzoClient`] holds one (a client is
/// one token), and every run of the process uses its client's.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None`: no client-side rate limit (`requests_per_second = 0`).
    limiter: Option<DefaultDirectRateLimiter>,
    /// No call starts before this: the latest 429's `Retry-After` (or backoff).
    not_before: Mutex<Instant>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("limited", &self.inner.limiter.is_some())
            .finish()
    }
}

impl Budget {
    /// A budget of `requests_per_second` calls (0: unlimited). Bursts are a tenth of a
    /// second's calls at most, so that any window of a few seconds stays within the rate
    /// (a full second's burst on top of the rate would let a 5 s window carry 20% more).
    pub fn new(requests_per_second: u32) -> Self {
        let limiter = NonZeroU32::new(requests_per_second).map(|rps| {
            let burst = NonZeroU32::new((rps.get() / 10).max(1)).expect("at least 1");
            RateLimiter::direct(Quota::per_second(rps).allow_burst(burst))
        });
        Budget {
            inner: Arc::new(Inner {
                limiter,
                not_before: Mutex::new(Instant::now()),
            }),
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
        if let Some(l) = &self.inner.limiter {
            tokio::select! {
                _ = l.until_ready() => {}
                _ = stop.cancelled() => return false,
            }
        }
        true
    }

    /// Pauses every call of the process for `wait` from now (a 429), unless a longer pause is
    /// already set.
    pub fn pause(&self, wait: Duration) {
        let mut nb = self.inner.not_before.lock().expect("lock");
        *nb = (*nb).max(Instant::now() + wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pause_holds_every_holder_of_the_budget() {
        let a = Budget::new(0);
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
        let b = Budget::new(100);
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
}
