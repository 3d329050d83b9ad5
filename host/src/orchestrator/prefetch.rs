//! How far ahead of its free slots a daemon claims.
//!
//! Claiming a batch ahead hides the claim's round trip behind runs that take
//! microseconds: the drain of no-op tasks is paced by it. For an agent whose
//! runs take seconds (a model call, say) it buys nothing and costs twice:
//! the tasks wait leased in one daemon while other daemons stand idle, and
//! when that daemon dies each of them has used an attempt without running
//! (attempts are counted at claim). So by default a daemon claims ahead only
//! for agents whose recent runs were short; for the others, and for an agent
//! it has not seen run yet, it claims for its free slots alone. An agent
//! whose runs grow long (every slot it may use held by a run in flight past
//! [`LONG_IN_FLIGHT`], or the average past [`SHORT_RUN`]) stops being
//! claimed ahead at once, and the tasks already claimed ahead for it beyond
//! its free slots are given back unstarted
//! (`Daemon::give_back_buffers_gone_slow`). An explicit `--claim-batch`
//! claims ahead for every agent.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Runs shorter than this on average are claimed ahead: a claim transaction
/// takes about a millisecond on SQLite and a few on PostgreSQL, a few per
/// cent of such a run at most.
pub const SHORT_RUN: Duration = Duration::from_millis(50);

/// Runs in flight this long, in every slot an agent may use, make it
/// long-running before they end: without it, tasks claimed ahead while the
/// agent's runs were short would wait leased behind runs of minutes. Far
/// above any short run's stall, a machine starved of CPU included (then
/// tasks given back are claimed again: churn, not harm); one long run among
/// short ones in other slots does not stop the claiming ahead.
pub const LONG_IN_FLIGHT: Duration = Duration::from_secs(5);

/// Whether claimed tasks may wait in the daemon beyond its free slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetch {
    /// Only for agents whose recent runs were shorter than [`SHORT_RUN`].
    Adaptive,
    /// For every agent (an explicit `--claim-batch`).
    Always,
}

/// What one transaction is to claim: the first `shared_from` claims up to
/// their `n` each (agents claimed ahead), the rest up to theirs but at most
/// `slots` among them (the daemon's free slots, shared by the agents it does
/// not claim ahead for; see `Queue::finish_and_claim_sharing`).
#[derive(Debug, Default)]
pub(super) struct Asks {
    pub claims: Vec<(String, usize)>,
    pub shared_from: usize,
    pub slots: usize,
}

impl Asks {
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }
}

/// Each agent's recent run time, from dispatch to result (a moving
/// average, so that an agent whose runs grow long stops being claimed
/// ahead within a few runs).
#[derive(Default)]
pub(super) struct RunTimes {
    average: HashMap<String, Duration>,
}

impl RunTimes {
    /// Counts one run of `agent` that took `took`.
    pub fn record(&mut self, agent: &str, took: Duration) {
        match self.average.get_mut(agent) {
            Some(average) => *average = (*average * 7 + took) / 8,
            None => {
                self.average.insert(agent.to_string(), took);
            }
        }
    }

    /// Whether `agent`'s tasks may be claimed ahead of its free slots, by
    /// its recent runs alone (see [`slots_held_by_long_runs`]).
    pub fn claims_ahead(&self, prefetch: Prefetch, agent: &str) -> bool {
        match prefetch {
            Prefetch::Always => true,
            Prefetch::Adaptive => self.average.get(agent).is_some_and(|&a| a < SHORT_RUN),
        }
    }
}

/// Whether every one of the `usable` slots an agent may fill is held by a
/// run of it started before `long_ago` (now less [`LONG_IN_FLIGHT`]): then
/// no task claimed ahead for it can start soon.
pub(super) fn slots_held_by_long_runs(
    started: impl Iterator<Item = Instant>,
    usable: usize,
    long_ago: Option<Instant>,
) -> bool {
    let Some(long_ago) = long_ago else {
        return false; // the process is younger than LONG_IN_FLIGHT
    };
    usable > 0 && started.filter(|since| *since <= long_ago).count() >= usable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_agents_seen_running_short_are_claimed_ahead() {
        let mut times = RunTimes::default();
        assert!(
            !times.claims_ahead(Prefetch::Adaptive, "new"),
            "not seen yet"
        );
        assert!(times.claims_ahead(Prefetch::Always, "new"));
        times.record("fast", Duration::from_micros(300));
        times.record("slow", Duration::from_secs(4));
        assert!(times.claims_ahead(Prefetch::Adaptive, "fast"));
        assert!(!times.claims_ahead(Prefetch::Adaptive, "slow"));
        // Runs that grow long stop the claiming ahead within a few runs.
        let mut runs = 0;
        while times.claims_ahead(Prefetch::Adaptive, "fast") {
            times.record("fast", Duration::from_secs(2));
            runs += 1;
        }
        assert!(runs <= 2, "{runs} runs");
    }

    #[test]
    fn long_runs_in_every_usable_slot_stop_the_claiming_ahead() {
        let now = Instant::now();
        let long_ago = now.checked_sub(LONG_IN_FLIGHT);
        let Some(old) = long_ago.and_then(|t| t.checked_sub(Duration::from_millis(1))) else {
            return; // a clock this young cannot hold a run started that long ago
        };
        let held = |runs: &[Instant], usable| {
            slots_held_by_long_runs(runs.iter().copied(), usable, long_ago)
        };
        assert!(held(&[old, old], 2), "both slots held long");
        assert!(!held(&[old, now], 2), "one long run among short ones");
        assert!(!held(&[old], 2), "a slot still free");
        assert!(held(&[old, old, now], 2));
        assert!(!held(&[], 0), "no slot at all is not held");
        assert!(!slots_held_by_long_runs([old].into_iter(), 1, None));
    }
}
