//! How a daemon is configured: every setting with its documented default,
//! the combinations refused and those only warned about.

use std::time::Duration;

use super::Prefetch;

/// How the daemon behaves. Every field has the documented default.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// How often the daemon looks for work when nothing wakes it (60 s).
    pub poll: Duration,
    /// Most runs in flight at once across all agents (16).
    pub concurrency: u32,
    /// How often leases are renewed and stale ones reaped (10 s).
    pub heartbeat: Duration,
    /// A lease not renewed for this long is reset by any daemon (60 s).
    pub stale_after: Duration,
    /// How long a shutdown waits for runs to finish before releasing them (30 s).
    pub grace: Duration,
    /// Most tasks taken in one claim transaction (64:
    /// [`DEFAULT_CLAIM_BATCH`]). Tasks claimed beyond
    /// the free slots wait in a local buffer, leased and heartbeated.
    pub claim_batch: usize,
    /// For which agents tasks are claimed beyond the free slots (see
    /// `prefetch.rs`): by default those whose recent runs were short.
    pub prefetch: Prefetch,
    /// How long a finished run may wait to be stored with others (2 ms).
    pub write_window: Duration,
    /// Exit once nothing runnable remains for the loaded agents.
    pub until_idle: bool,
    /// How often the database is checked for commits by other processes, so
    /// a task submitted from the CLI starts at once rather than at the next poll.
    pub watch_interval: Duration,
    /// How long one delivery of an effect may take (30 s); its claim lasts
    /// twice that.
    pub effect_timeout: Duration,
    /// For tests only: this many of the first store jobs carrying finished
    /// runs panic before touching the database, as a bug in the store path
    /// would (0: none).
    #[doc(hidden)]
    pub panicking_stores: u32,
    /// For tests only: this many of the first runs panic before they start,
    /// as a bug in a host call would (0: none).
    #[doc(hidden)]
    pub panicking_runs: u32,
    /// For tests only: this many of the first effect deliveries panic
    /// while sending, as a bug in the sending path would (0: none).
    #[doc(hidden)]
    pub panicking_deliveries: u32,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            poll: Duration::from_secs(60),
            concurrency: 16,
            heartbeat: Duration::from_secs(10),
            stale_after: Duration::from_secs(60),
            grace: Duration::from_secs(30),
            claim_batch: DEFAULT_CLAIM_BATCH,
            prefetch: Prefetch::Adaptive,
            write_window: Duration::from_millis(2),
            until_idle: false,
            watch_interval: Duration::from_millis(200),
            effect_timeout: Duration::from_secs(30),
            panicking_stores: 0,
            panicking_runs: 0,
            panicking_deliveries: 0,
        }
    }
}

impl DaemonConfig {
    /// Settings that are legal but likely a mistake, each a sentence for
    /// the operator (the daemon logs them at start).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.stale_after < self.heartbeat * 2 {
            warnings.push(format!(
                "--stale-after ({}) is less than twice --heartbeat ({}): one late heartbeat (a slow disk, a busy database) lets a daemon reset this daemon's live leases, and their runs are wasted; --stale-after {} or more leaves room for one",
                humantime::format_duration(self.stale_after),
                humantime::format_duration(self.heartbeat),
                humantime::format_duration(self.heartbeat * 2)
            ));
        }
        warnings
    }

    /// Refuses settings under which daemons would spin or reap each other's
    /// live leases. The message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        for (name, value) in [
            ("--poll", self.poll),
            ("--heartbeat", self.heartbeat),
            ("--stale-after", self.stale_after),
            ("--grace", self.grace),
            ("--effect-timeout", self.effect_timeout),
        ] {
            if value > YEAR {
                return Err(format!("{name} must be at most a year"));
            }
        }
        if self.poll.is_zero() {
            return Err("--poll must be longer than 0".into());
        }
        if self.effect_timeout.is_zero() {
            return Err("--effect-timeout must be longer than 0".into());
        }
        if self.heartbeat.is_zero() {
            return Err("--heartbeat must be longer than 0".into());
        }
        if self.heartbeat >= self.stale_after {
            return Err(format!(
                "--heartbeat ({}) must be shorter than --stale-after ({}), or live leases would be reset",
                humantime::format_duration(self.heartbeat),
                humantime::format_duration(self.stale_after)
            ));
        }
        if self.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        if self.claim_batch == 0 {
            return Err("--claim-batch must be at least 1".into());
        }
        Ok(())
    }
}

/// Tasks per claim transaction unless configured, on both drivers, at the price of more
/// tasks leased ahead by one daemon. On PostgreSQL a claim is several round
/// trips to the server, so it takes more at once (measured at concurrency
/// 8: 16 → 5,000–5,600 tasks/s, 32 → 6,000, 64 → 8,000). On SQLite,
/// with claims on the writer's thread, 32 over 16 gave a median paired
/// ratio of 1.30 (3 pairs), and once its statements built no temporary
/// tables, 64 over 32 gave 1.18 (4 pairs; p99 9-10 ms against 8-9, and a
/// quarter less slot-time waiting for claimed tasks).
pub const DEFAULT_CLAIM_BATCH: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_after_under_twice_the_heartbeat_is_warned_about_not_refused() {
        let tight = DaemonConfig {
            heartbeat: Duration::from_secs(10),
            stale_after: Duration::from_secs(15),
            ..DaemonConfig::default()
        };
        assert_eq!(tight.validate(), Ok(()));
        let warnings = tight.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("--stale-after (15s)")
                && warnings[0].contains("--heartbeat (10s)")
                && warnings[0].contains("--stale-after 20s or more"),
            "{}",
            warnings[0]
        );
        let roomy = DaemonConfig {
            stale_after: Duration::from_secs(20),
            ..tight
        };
        assert_eq!(roomy.warnings(), Vec::<String>::new());
        assert_eq!(DaemonConfig::default().warnings(), Vec::<String>::new());
    }
}
