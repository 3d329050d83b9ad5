//! The retry backoff policy (pure).
//!
//! Attempt `n` (1-based: the attempt that just failed) waits
//! `base · 2^(n−1)`, spread by ±20 % jitter so that a burst of failures does
//! not retry in lockstep, and capped at ten minutes (a wait at the cap
//! is spread over its last 20 %).

use std::time::Duration;

/// The longest any retry waits, whatever the base and attempt.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// The jitter spread: the delay is multiplied by a factor in `1 ± JITTER`.
pub const JITTER: f64 = 0.2;

/// The delay before the retry that follows failed attempt `attempt`.
/// `unit_jitter` is a number in `[-1, 1]`; [`backoff`] draws it at random.
pub fn backoff_with(base: Duration, attempt: u32, unit_jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(32);
    let raw = base.as_secs_f64() * 2f64.powi(exponent as i32);
    let unit_jitter = unit_jitter.clamp(-1.0, 1.0);
    let max = MAX_BACKOFF.as_secs_f64();
    // At the cap the jitter only shortens the wait: capped after it, every
    // wait past ten minutes was exactly ten minutes, retried in lockstep.
    let (delay, spread) = match raw >= max {
        true => (max, -(unit_jitter + 1.0) / 2.0),
        false => (raw, unit_jitter),
    };
    let jittered = delay * (1.0 + JITTER * spread);
    // Just under the cap, a wait jittered past it is reflected below it
    // rather than cut to it (a quarter of them were exactly the cap).
    let jittered = match jittered > max {
        true => 2.0 * max - jittered,
        false => jittered,
    };
    Duration::from_secs_f64(jittered.min(max).max(0.0))
}

/// The delay before the retry that follows failed attempt `attempt`, with random jitter.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    backoff_with(base, attempt, fastrand::f64() * 2.0 - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_per_attempt_without_jitter() {
        let base = Duration::from_secs(10);
        assert_eq!(backoff_with(base, 1, 0.0), Duration::from_secs(10));
        assert_eq!(backoff_with(base, 2, 0.0), Duration::from_secs(20));
        assert_eq!(backoff_with(base, 3, 0.0), Duration::from_secs(40));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let base = Duration::from_secs(10);
        assert_eq!(backoff_with(base, 2, -1.0), Duration::from_secs(16));
        assert_eq!(backoff_with(base, 2, 1.0), Duration::from_secs(24));
        for _ in 0..1000 {
            let d = backoff(base, 3);
            assert!(
                d >= Duration::from_secs(32) && d <= Duration::from_secs(48),
                "{d:?}"
            );
        }
    }

    #[test]
    fn jitter_actually_varies() {
        let delays: std::collections::HashSet<_> = (0..50)
            .map(|_| backoff(Duration::from_secs(10), 1))
            .collect();
        assert!(delays.len() > 1);
    }

    #[test]
    fn capped_at_ten_minutes_and_still_spread() {
        let base = Duration::from_secs(10);
        assert_eq!(backoff_with(base, 20, -1.0), MAX_BACKOFF);
        assert_eq!(backoff_with(base, 20, 1.0), MAX_BACKOFF.mul_f64(0.8));
        assert_eq!(backoff_with(base, u32::MAX, 0.0), MAX_BACKOFF.mul_f64(0.9));
        // Just under the cap (raw 560 s), none lands on it.
        let near = Duration::from_secs(35);
        assert_eq!(backoff_with(near, 5, 1.0), MAX_BACKOFF.mul_f64(1.0 - 0.12));
        assert!((0..200).all(|_| backoff(near, 5) < MAX_BACKOFF));
        let delays: std::collections::HashSet<_> = (0..50).map(|_| backoff(base, 9)).collect();
        assert!(delays.len() > 40, "{delays:?}");
        assert!(
            delays
                .iter()
                .all(|d| *d >= MAX_BACKOFF.mul_f64(0.8) && *d <= MAX_BACKOFF)
        );
    }
}
