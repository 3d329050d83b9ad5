//! When an until-idle daemon is done, and what it says while it waits
//! (effects still to deliver, tasks scheduled for later).

use std::collections::VecDeque;
use std::time::Duration;

use super::{Daemon, Left};
use crate::queue::QueueError;

impl Daemon {
    pub(super) fn is_quiet(&self) -> bool {
        self.deliverer.is_idle()
            && self.inflight.is_empty()
            && self.unwritten.is_empty()
            && !self.writer.busy
            && self.claimers.iter().all(|lane| !lane.busy)
            && self.prefetched.values().all(VecDeque::is_empty)
    }

    /// `Some((missing, blocked))` when nothing runnable remains for the
    /// loaded agents and nothing runs anywhere: what is left for agents not
    /// loaded, and what loaded agents have waiting for dependencies.
    pub(super) fn idle(&mut self) -> Result<Option<Left>, QueueError> {
        // Effects of completed tasks still to deliver (their retries are
        // bounded) keep an until-idle daemon at work.
        let loaded = self.agents.loaded_names();
        let effects = tokio::task::block_in_place(|| self.queue.effects_outstanding_by_agent())?;
        let ours: u64 = effects
            .iter()
            .filter(|(agent, _)| loaded.contains(agent))
            .map(|(_, n)| n)
            .sum();
        if ours > 0 {
            self.announce_effects_wait(ours);
            return Ok(None);
        }
        let backlog = tokio::task::block_in_place(|| self.queue.backlog())?;
        let (mut missing, mut blocked) = (Vec::new(), Vec::new());
        let mut scheduled = 0;
        for (agent, b) in backlog {
            if b.in_progress > 0 {
                return Ok(None);
            }
            if loaded.contains(&agent) {
                if b.ready > 0 {
                    return Ok(None);
                }
                scheduled += b.scheduled;
                if b.blocked > 0 {
                    blocked.push((agent, b.blocked));
                }
            } else if b.ready + b.scheduled + b.blocked > 0 {
                missing.push((agent, b.ready + b.scheduled + b.blocked));
            }
        }
        if scheduled > 0 {
            // Waited for (a retry's backoff is a schedule too), but say so:
            // a daemon waiting silently for a task due in an hour looks hung.
            self.announce_scheduled_wait(scheduled);
            return Ok(None);
        }
        // Only an agent's daemon can send its effects (its allow-list and
        // secrets): those of agents not loaded here are left, and said so.
        self.summary.effects_left_for_missing_agents = effects;
        Ok(Some((missing, blocked)))
    }

    /// Logs, once per next try, that an until-idle daemon waits for
    /// `outstanding` effects to be delivered (a retry's backoff grows to ten
    /// minutes).
    fn announce_effects_wait(&mut self, outstanding: u64) {
        let loaded = self.agents.loaded_names();
        let next = tokio::task::block_in_place(|| self.queue.next_effect_due(&loaded));
        if let Some(wait) = self.wait_to_announce(next, |d| &mut d.announced_effect_wait) {
            tracing::info!(
                "waiting for {outstanding} effect(s) to be delivered; the next try is due in {wait} (`colony effects` lists them)"
            );
        }
    }

    /// Logs, once per next due time, that an until-idle daemon waits for
    /// `scheduled` tasks.
    fn announce_scheduled_wait(&mut self, scheduled: u64) {
        let next = tokio::task::block_in_place(|| self.queue.next_due_at());
        if let Some(wait) = self.wait_to_announce(next, |d| &mut d.announced_wait) {
            tracing::info!(
                "waiting for {scheduled} task(s) scheduled for later; the next is due in {wait}"
            );
        }
    }

    /// How long until `next` (queue clock, ms), to say once: when it is more
    /// than a few seconds away and not the time `announced` last said.
    fn wait_to_announce(
        &mut self,
        next: Result<Option<i64>, QueueError>,
        announced: impl Fn(&mut Daemon) -> &mut Option<i64>,
    ) -> Option<humantime::FormattedDuration> {
        let now = tokio::task::block_in_place(|| self.queue.now()).ok()?;
        let next = next.ok()??;
        let said = announced(self);
        if *said == Some(next) || next - now < 10_000 {
            return None;
        }
        *said = Some(next);
        let wait = Duration::from_millis(u64::try_from(next - now).unwrap_or(0) / 1000 * 1000);
        Some(humantime::format_duration(wait))
    }
}
