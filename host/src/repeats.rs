//! Keeping a log readable while the same error repeats: a database that is
//! down for an hour fails a claim every half second and a heartbeat every
//! few, and one line each would bury everything else (about 14,000 lines
//! per daemon). The first failure is logged at once, then at most one line
//! per [`WINDOW`] counting the ones in between, and the end of the streak
//! once.

use std::time::{Duration, Instant};

/// Most one line per this long while an error repeats.
pub const WINDOW: Duration = Duration::from_secs(30);

/// One kind of failure that may repeat.
#[derive(Debug, Default)]
pub struct Repeats {
    /// When the streak's last line was logged (`None`: no streak).
    logged_at: Option<Instant>,
    /// Failures since then, not logged.
    unlogged: u64,
    /// When the streak began.
    since: Option<Instant>,
}

impl Repeats {
    /// Counts a failure. Returns `Some(n)` when it should be logged now, `n`
    /// being how many were left unlogged since the last line.
    pub fn failed(&mut self) -> Option<u64> {
        let now = Instant::now();
        self.since.get_or_insert(now);
        match self.logged_at {
            Some(at) if now.duration_since(at) < WINDOW => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.logged_at = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }

    /// A success: returns how long the streak it ends lasted, if one did.
    pub fn succeeded(&mut self) -> Option<Duration> {
        self.logged_at = None;
        self.unlogged = 0;
        self.since.take().map(|since| since.elapsed())
    }
}

/// `" (N more like it since the last)"`, or nothing when `n` is 0.
pub fn more(n: u64) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({n} more like it since the last line)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streak_is_logged_once_per_window_then_its_end_once() {
        let mut repeats = Repeats::default();
        assert_eq!(repeats.succeeded(), None, "no streak to end");
        assert_eq!(repeats.failed(), Some(0));
        for _ in 0..100 {
            assert_eq!(repeats.failed(), None);
        }
        // A window later the next failure is logged, with the count.
        repeats.logged_at = Some(Instant::now() - WINDOW);
        assert_eq!(repeats.failed(), Some(100));
        assert!(repeats.succeeded().is_some());
        assert_eq!(repeats.succeeded(), None);
        assert_eq!(repeats.failed(), Some(0), "a new streak logs at once");
        assert_eq!(more(0), "");
        assert_eq!(more(3), " (3 more like it since the last line)");
    }
}
