//! Claiming and dispatching: what the loop asks the writer to claim for
//! each agent (a batch ahead, or what its free slots can start now), and
//! how claimed tasks wait in their buffers and go to free slots, agents in
//! rotation.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::prefetch::Prefetch;
use super::{Daemon, InFlight, prefetch};
use crate::queue::{ClaimFacts, ClaimedTask, FinishedRun};
use crate::runtime::{Agent, RunHooks};

impl Daemon {
    /// Fills free slots from the claim buffers, agents in rotation so that
    /// none starves the others.
    pub(super) fn dispatch_buffered(&mut self) {
        let mut names = self.agents.loaded_names();
        if names.is_empty() || !self.buffered_leases_fresh() {
            return;
        }
        let start = self.rotation % names.len();
        names.rotate_left(start);
        self.rotation = self.rotation.wrapping_add(1);
        for name in names {
            let free = (self.cfg.concurrency as usize).saturating_sub(self.inflight.len());
            if free == 0 {
                break;
            }
            if self.prefetched.get(&name).is_none_or(VecDeque::is_empty) {
                continue;
            }
            let Some(agent) = self.agents.loaded(&name) else {
                continue;
            };
            let running = self.inflight.values().filter(|f| f.agent == name).count();
            let slots = (agent.limits.concurrency as usize)
                .saturating_sub(running)
                .min(free);
            let buffer = self.prefetched.get_mut(&name).expect("checked above");
            let take = slots.min(buffer.len());
            let tasks: Vec<ClaimedTask> = buffer.drain(..take).collect();
            for task in tasks {
                self.dispatch(agent.clone(), task);
            }
        }
    }

    /// Whether `agent`'s tasks may be claimed ahead of the free slots (see
    /// `prefetch.rs`). The runs in flight are looked at only for an agent
    /// whose recent runs were short.
    pub(super) fn claims_ahead(&self, agent: &str) -> bool {
        if !self.run_times.claims_ahead(self.cfg.prefetch, agent) {
            return false;
        }
        if self.cfg.prefetch == Prefetch::Always {
            return true;
        }
        let started = self
            .inflight
            .values()
            .filter(|f| f.agent == agent)
            .map(|f| f.since);
        let long_ago = Instant::now().checked_sub(prefetch::LONG_IN_FLIGHT);
        !prefetch::slots_held_by_long_runs(started, self.usable_slots(agent), long_ago)
    }

    /// How many runs of `agent` may be in flight here at once.
    pub(super) fn usable_slots(&self, agent: &str) -> usize {
        let cap = self
            .agents
            .loaded(agent)
            .map_or(0, |a| a.limits.concurrency as usize);
        cap.min(self.cfg.concurrency as usize)
    }

    /// Adds the slots left free since the last look to the idle slot-time.
    pub(super) fn account_idle_slots(&mut self) {
        let now = Instant::now();
        let (since, free, starved) = self.idle_mark;
        let idle = (now - since) * free;
        self.summary.time.idle_slots += idle;
        if starved {
            self.summary.time.idle_slots_starved += idle;
        }
        let free = (self.cfg.concurrency as usize).saturating_sub(self.inflight.len());
        let starved = self.prefetched.values().all(VecDeque::is_empty);
        self.idle_mark = (now, free as u32, starved);
    }

    /// Whether claims may be sent now: not while stores fail, nor for a
    /// moment after a claim failed.
    pub(super) fn may_claim(&self) -> bool {
        self.write_backoff.is_zero()
            && self
                .claims_paused_until
                .is_none_or(|at| Instant::now() >= at)
    }

    /// What to claim, per loaded agent: a batch for each agent whose buffer
    /// ran low, so the next batch arrives before its slots free up. With
    /// `top_up` (a store goes to the writer anyway) buffers below a batch
    /// are filled too.
    ///
    /// Low means fewer tasks than it may run at once on PostgreSQL, whose
    /// claims have lanes of their own. On SQLite a claim rides in the
    /// writer's next transaction, after the one in flight, so it is asked
    /// for at half a batch: the slots do not run dry meanwhile, and the
    /// writer is not handed a small transaction each time a run finishes
    /// (measured against topping up at every finished run: writer time per
    /// task 21.0 -> 16.8 us, median of 8 pairs, transactions of ~35 tasks
    /// instead of ~15).
    ///
    /// Agents not claimed ahead (see `prefetch.rs`) share the free slots:
    /// each asks for what it could start now, and the transaction claims
    /// among them, in turn, no more than the slots.
    pub(super) fn claims_wanted(&self, top_up: bool) -> prefetch::Asks {
        let mut ahead = Vec::new();
        let mut for_slots = Vec::new();
        // Slots no run holds and no task claimed for an agent claimed for
        // its slots is waiting to take.
        let mut slots = (self.cfg.concurrency as usize).saturating_sub(self.inflight.len());
        for name in self.agents.loaded_names() {
            let Some(agent) = self.agents.loaded(&name) else {
                continue;
            };
            let cap = (agent.limits.concurrency as usize).min(self.cfg.concurrency as usize);
            let buffered = self.prefetched.get(&name).map_or(0, VecDeque::len);
            if !self.claims_ahead(&name) {
                let running = self.inflight.values().filter(|f| f.agent == name).count();
                let coming = buffered + self.claiming.get(&name).copied().unwrap_or(0);
                slots = slots.saturating_sub(coming);
                let room = cap.saturating_sub(running + coming);
                if room > 0 {
                    for_slots.push((name, room));
                }
                continue;
            }
            let batch = self.cfg.claim_batch.max(cap);
            let low = match self.queue.is_postgres() {
                true => cap,
                false => cap.max(batch / 2),
            };
            // Claims in flight count as claimed: PostgreSQL's two claimer
            // lanes each took a batch, and a SIGKILL spent the attempts of
            // twice as many tasks that never started.
            let claimed = buffered + self.claiming.get(&name).copied().unwrap_or(0);
            if claimed < low || (top_up && claimed < batch) {
                ahead.push((name, batch - claimed));
            }
        }
        // In turn, so that one agent's backlog does not keep the others'
        // waiting for the same free slot.
        if !for_slots.is_empty() {
            let turn = self.rotation % for_slots.len();
            for_slots.rotate_left(turn);
        }
        if slots == 0 {
            for_slots.clear();
        }
        let shared_from = ahead.len();
        ahead.extend(for_slots);
        prefetch::Asks {
            claims: ahead,
            shared_from,
            slots,
        }
    }

    pub(super) fn dispatch(&mut self, agent: Arc<Agent>, task: ClaimedTask) {
        tracing::info!(task = task.lease.task_id, agent = %task.agent, attempt = task.attempt, "started");
        self.summary.runs += 1;
        let lease = task.lease;
        let runtime = self.runtime.clone();
        let run_side = self.run_side.clone();
        let hooks: Arc<dyn RunHooks> = run_side.clone();
        let done = self.done_tx.clone();
        let agent_name = task.agent.clone();
        let panic_here = self.cfg.panicking_runs > 0;
        if panic_here {
            self.cfg.panicking_runs -= 1;
        }
        let handle = tokio::spawn(async move {
            if panic_here {
                panic!("a panicking run, as the test asked");
            }
            let report = runtime.run(&agent, &task, hooks).await;
            let nanos = u64::try_from(report.elapsed.as_nanos()).unwrap_or(u64::MAX);
            run_side.run_nanos.fetch_add(nanos, Ordering::Relaxed);
            let _ = done.send(FinishedRun {
                lease,
                outcome: report.outcome,
                log: report.log,
                state: report.state_writes,
                effects: report.effects,
                claimed: Some(ClaimFacts {
                    attempt: task.attempt,
                    agent: task.agent,
                    chain: task.chain,
                }),
            });
            // Sending on the channel wakes the daemon loop, which waits on it.
        });
        // A run of an older lease of this task (reset, cancelled, retried and
        // reclaimed) can only produce a result that would be discarded.
        if let Some(old) = self.inflight.insert(
            lease.task_id,
            InFlight {
                agent: agent_name,
                since: Instant::now(),
                lease,
                handle,
            },
        ) && !old.handle.is_finished()
        {
            tracing::warn!(
                task = lease.task_id,
                "the task was claimed again here (its lease reset, or cancelled and retried); stopping the run of its older claim"
            );
            self.stop_run(old);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::orchestrator::{Daemon, DaemonConfig, Prefetch};

    /// Claims in flight count as claimed ahead: PostgreSQL's two claimer
    /// lanes each asked for a whole batch (128 tasks claimed ahead of 8
    /// slots where 64 were meant), and a SIGKILL spent the attempts of
    /// twice as many tasks that never started.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claims_in_flight_count_as_claimed_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let agents_dir = dir.path().join("agents");
        std::fs::create_dir_all(&agents_dir).unwrap();
        std::fs::write(
            agents_dir.join("noop.wasm"),
            include_bytes!(env!("COLONY_GUEST_NOOP")),
        )
        .unwrap();
        let cfg = DaemonConfig {
            concurrency: 8,
            claim_batch: 64,
            prefetch: Prefetch::Always,
            ..DaemonConfig::default()
        };
        let db = dir.path().join("colony.db");
        let mut daemon = Daemon::for_test(&db, &agents_dir, cfg).await;
        let asked = |daemon: &Daemon| -> Vec<(String, usize)> {
            let asks = daemon.claims_wanted(true);
            asks.claims[..asks.shared_from].to_vec()
        };
        assert_eq!(asked(&daemon), [("noop".to_string(), 64)]);
        daemon.claiming.insert("noop".into(), 24);
        assert_eq!(asked(&daemon), [("noop".to_string(), 40)]);
        daemon.claiming.insert("noop".into(), 64);
        assert_eq!(asked(&daemon), []);
    }
}
