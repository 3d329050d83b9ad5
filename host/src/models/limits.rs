//! Per-alias rate limits: requests per minute and tokens per minute, shared
//! by every run of the daemon (eight parallel runs must not together exceed
//! what the provider allows one key).
//!
//! Each limit is a token bucket holding up to one minute's allowance and
//! refilling continuously, which is how providers meter too. A caller
//! *reserves* at once and then sleeps until its reservation is covered: the
//! bucket may go below zero, so later callers see the debt and queue behind
//! earlier ones instead of racing them. Tokens are reserved as the reply's
//! limit plus the prompt's estimate and settled to the provider's count
//! afterwards.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One limit: `capacity` units, refilled at `capacity` per minute.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    per_sec: f64,
    /// Units available now; negative while callers wait for their reservation.
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn per_minute(limit: u32, now: Instant) -> Bucket {
        let capacity = f64::from(limit);
        Bucket {
            capacity,
            per_sec: capacity / 60.0,
            level: capacity,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_sec).min(self.capacity);
        self.updated = self.updated.max(now);
    }

    /// How long from now until `units` more would be covered.
    fn wait_for(&self, units: f64) -> Duration {
        let short = units - self.level;
        if short <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(short / self.per_sec)
        }
    }
}

/// Why a reservation was refused.
#[derive(Debug, PartialEq)]
pub(super) enum Refusal {
    /// More tokens than one minute's allowance: it could never be sent.
    TooLarge { needed: u64, per_minute: u32 },
    /// It could be sent only after the caller's deadline.
    TooLate { wait: Duration },
}

/// The limits of one alias. Without limits every reservation is immediate.
#[derive(Debug)]
pub(super) struct Limiter {
    requests: Option<Mutex<Bucket>>,
    tokens: Option<(u32, Mutex<Bucket>)>,
}

impl Limiter {
    pub(super) fn new(requests_per_minute: Option<u32>, tokens_per_minute: Option<u32>) -> Limiter {
        let now = Instant::now();
        Limiter {
            requests: requests_per_minute.map(|n| Mutex::new(Bucket::per_minute(n, now))),
            tokens: tokens_per_minute.map(|n| (n, Mutex::new(Bucket::per_minute(n, now)))),
        }
    }

    /// Reserves one request and `tokens` tokens if both are covered by
    /// `deadline`, and returns how long the caller must wait before sending.
    /// Nothing is reserved when it is refused. A retry of a call reserves no
    /// tokens (`0`): it needs a request slot only, not a place in the queue
    /// behind other calls' token reservations.
    pub(super) fn reserve(
        &self,
        tokens: u64,
        now: Instant,
        deadline: Instant,
    ) -> Result<Duration, Refusal> {
        // Lock order: requests, then tokens (the only place both are held).
        let mut requests = self.requests.as_ref().map(|b| lock(b));
        let mut token_bucket = match &self.tokens {
            Some((per_minute, bucket)) if tokens > 0 => {
                if tokens > u64::from(*per_minute) {
                    return Err(Refusal::TooLarge {
                        needed: tokens,
                        per_minute: *per_minute,
                    });
                }
                Some(lock(bucket))
            }
            _ => None,
        };
        let mut wait = Duration::ZERO;
        if let Some(bucket) = requests.as_deref_mut() {
            bucket.refill(now);
            wait = wait.max(bucket.wait_for(1.0));
        }
        if let Some(bucket) = token_bucket.as_deref_mut() {
            bucket.refill(now);
            wait = wait.max(bucket.wait_for(tokens as f64));
        }
        if now + wait > deadline {
            return Err(Refusal::TooLate { wait });
        }
        if let Some(bucket) = requests.as_deref_mut() {
            bucket.level -= 1.0;
        }
        if let Some(bucket) = token_bucket.as_deref_mut() {
            bucket.level -= tokens as f64;
        }
        Ok(wait)
    }

    /// Gives back a reservation of one request and `tokens` tokens whose
    /// call was never sent.
    pub(super) fn give_back(&self, tokens: u64) {
        if let Some(bucket) = &self.requests {
            let mut bucket = lock(bucket);
            bucket.level = (bucket.level + 1.0).min(bucket.capacity);
        }
        self.settle(tokens, 0);
    }

    /// Replaces a token reservation by what the call really used: the
    /// difference is given back (or, when the call used more, owed).
    pub(super) fn settle(&self, reserved: u64, used: u64) {
        if let Some((_, bucket)) = &self.tokens {
            let mut bucket = lock(bucket);
            bucket.level = (bucket.level + reserved as f64 - used as f64).min(bucket.capacity);
        }
    }
}

/// A poisoned lock only means another call panicked mid-update of plain
/// numbers; the numbers are still usable.
fn lock(bucket: &Mutex<Bucket>) -> std::sync::MutexGuard<'_, Bucket> {
    bucket
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAR: Duration = Duration::from_secs(3600);

    #[test]
    fn unlimited_never_waits() {
        let limiter = Limiter::new(None, None);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(limiter.reserve(1_000_000, now, now), Ok(Duration::ZERO));
        }
    }

    #[test]
    fn requests_burst_to_the_limit_then_queue() {
        let limiter = Limiter::new(Some(60), None);
        let now = Instant::now();
        for _ in 0..60 {
            assert_eq!(limiter.reserve(0, now, now + FAR), Ok(Duration::ZERO));
        }
        // One per second refills: the next callers queue one second apart.
        let secs = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
        assert_eq!(limiter.reserve(0, now, now + FAR).map(secs), Ok(1.0));
        assert_eq!(limiter.reserve(0, now, now + FAR).map(secs), Ok(2.0));
        // Ten seconds later, the debt of two is paid and eight are back.
        let later = now + Duration::from_secs(10);
        for _ in 0..8 {
            assert_eq!(limiter.reserve(0, later, later), Ok(Duration::ZERO));
        }
        assert!(limiter.reserve(0, later, later).is_err());
    }

    #[test]
    fn refuses_past_the_deadline_without_reserving() {
        let limiter = Limiter::new(Some(2), None);
        let now = Instant::now();
        limiter.reserve(0, now, now).unwrap();
        limiter.reserve(0, now, now).unwrap();
        let short = now + Duration::from_secs(5);
        match limiter.reserve(0, now, short) {
            Err(Refusal::TooLate { wait }) => assert_eq!(wait.as_secs(), 30),
            other => panic!("{other:?}"),
        }
        // The refusal took nothing: the next caller still waits only 30 s.
        let wait = limiter.reserve(0, now, now + FAR).unwrap();
        assert_eq!(wait.as_secs(), 30);
    }

    #[test]
    fn a_reservation_given_back_frees_its_request_and_tokens() {
        let limiter = Limiter::new(Some(1), Some(1000));
        let now = Instant::now();
        assert_eq!(limiter.reserve(700, now, now), Ok(Duration::ZERO));
        assert!(
            limiter.reserve(700, now, now).is_err(),
            "no request nor tokens left"
        );
        limiter.give_back(700);
        assert_eq!(limiter.reserve(700, now, now), Ok(Duration::ZERO));
        // Never more than the bucket holds.
        limiter.give_back(700);
        limiter.give_back(700);
        assert_eq!(limiter.reserve(1000, now, now), Ok(Duration::ZERO));
        assert!(limiter.reserve(1, now, now).is_err());
    }

    #[test]
    fn tokens_reserve_then_settle() {
        let limiter = Limiter::new(None, Some(1000));
        let now = Instant::now();
        assert_eq!(limiter.reserve(800, now, now), Ok(Duration::ZERO));
        assert!(limiter.reserve(800, now, now).is_err());
        // The call used 100 of its 800: 700 come back, so 800 fit again.
        limiter.settle(800, 100);
        assert_eq!(limiter.reserve(800, now, now), Ok(Duration::ZERO));
        assert_eq!(
            limiter.reserve(1001, now, now + FAR),
            Err(Refusal::TooLarge {
                needed: 1001,
                per_minute: 1000
            })
        );
    }

    #[test]
    fn both_limits_must_allow() {
        let limiter = Limiter::new(Some(1000), Some(60));
        let now = Instant::now();
        assert_eq!(limiter.reserve(60, now, now), Ok(Duration::ZERO));
        // Requests are plentiful, tokens are not: wait for 30 tokens at 1/s.
        let wait = limiter.reserve(30, now, now + FAR).unwrap();
        assert_eq!(wait.as_secs(), 30);
    }
}
