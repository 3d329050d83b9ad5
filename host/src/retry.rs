//! The retry backoff policy (pure).
//!
//! Attempt `n` (1-based: the attempt that just failed) waits
//! `base · 2^(n−1)`, spread by ±20 % jitter so that a burst of failures does
//! not retry in lockstep, and capped at ten minutes (a wait at the cap
//! is spread over its last 20 %). And how long a server asks to be left
//! alone (`Retry-After`), for model calls and effect deliveries alike.

use std::time::Duration;

use http::HeaderMap;

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

/// `Retry-After` in seconds or as an HTTP date (RFC 9110), or OpenAI's
/// `retry-after-ms`, at most a day (a larger wait is past any call's
/// deadline anyway, and a number past `Duration`'s range would panic the
/// run). A date already past asks for no wait.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    retry_after_at(headers, std::time::SystemTime::now())
}

fn retry_after_at(headers: &HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    const DAY: Duration = Duration::from_secs(86_400);
    let number = |name: &str| {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    if let Some(ms) = number("retry-after-ms") {
        return Some(Duration::from_secs_f64(ms.min(86_400_000.0) / 1000.0));
    }
    if let Some(secs) = number("retry-after") {
        return Some(Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let date = headers.get("retry-after")?.to_str().ok()?;
    let at = httpdate::parse_http_date(date.trim()).ok()?;
    Some(at.duration_since(now).unwrap_or_default().min(DAY))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(150)));
        // A date: the time until then, nothing once it has passed.
        let mut dated = HeaderMap::new();
        dated.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        let then = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let before = then - Duration::from_secs(4);
        assert_eq!(retry_after_at(&dated, before), Some(Duration::from_secs(4)));
        assert_eq!(retry_after(&dated), Some(Duration::ZERO));
        dated.insert("retry-after", HeaderValue::from_static("next week"));
        assert_eq!(retry_after(&dated), None);
        // A provider's (or a proxy's) absurd number is a day, not a panic.
        for (name, value) in [("retry-after-ms", "1e23"), ("retry-after", "1e300")] {
            let mut huge = HeaderMap::new();
            huge.insert(name, HeaderValue::from_static(value));
            assert_eq!(
                retry_after(&huge),
                Some(Duration::from_secs(86_400)),
                "{name}"
            );
        }
    }

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
