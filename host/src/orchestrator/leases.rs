//! The leases a daemon holds: renewed at every heartbeat, lost ones
//! stopped, expired ones of other hosts reset, and at shutdown the runs
//! given their grace and the rest released without burning an attempt.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::Daemon;
use super::prefetch::Prefetch;
use crate::queue::{
    Applied, CLOCK_STEP_MS, ExpiredLease, FinishedRun, Lease, QueueError, StaleGuard,
    clock_ran_ahead,
};
use crate::task::{ErrorKind, RunOutcome, State, TaskError};

/// How many ms this host's clock ran ahead of the monotonic one since
/// `seen` (an instant and the clock then).
fn clock_jump_since(seen: (Instant, i64)) -> i64 {
    clock_ran_ahead(seen, crate::queue::now_ms())
}

fn clock_jumped(ms: i64) -> String {
    let by = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    format!(
        "this host's clock jumped {} forward",
        humantime::format_duration(by)
    )
}

/// What a heartbeat's write came to: the leases it found lost, the
/// expired leases of other runs it reset, and why its own renewals may
/// have come too late (a stall, a clock step).
type Renewal = (Vec<Lease>, Vec<ExpiredLease>, Option<String>);

impl Daemon {
    /// Every lease this daemon renews: running, waiting for a slot, or
    /// waiting to have its result stored.
    pub(super) fn held_leases(&self) -> Vec<Lease> {
        self.inflight
            .values()
            .map(|f| f.lease)
            .chain(self.prefetched.values().flatten().map(|t| t.lease))
            .chain(self.unwritten.iter().map(|r| r.lease))
            .chain(self.unreleased.iter().map(|(lease, _)| *lease))
            // Not the leases of a store in flight: the writer holds their
            // rows locked, and renewing them in another transaction would
            // wait for it, or deadlock with it (found at 1 s stalls). A store
            // that fails puts them back among the unwritten.
            .collect()
    }

    /// Renews every lease held, records progress, and resets other hosts'
    /// expired leases. Returns whether any lease was reset or lost (so
    /// there may be tasks to claim).
    pub(super) fn heartbeat_and_reap(&mut self) -> bool {
        self.notice_clock_step();
        self.collect_finished();
        // A stopped run's result, if it sent one, came in long since.
        self.aborted
            .retain(|_, at| at.elapsed() < Duration::from_secs(60));
        self.run_side.forget_stopped(Duration::from_secs(60));
        self.release_unconfirmed_claims();
        self.recover_vanished_runs();
        let leases = self.held_leases();
        let progress: Vec<(Lease, Option<String>)> =
            self.run_side.progress.lock().unwrap().drain().collect();
        let stale_after = self.cfg.stale_after;
        // A stall this long held up the other hosts' renewals long enough
        // for their leases to go stale: a lease renewed a heartbeat before
        // it, then nothing.
        let long_stall = stale_after.saturating_sub(self.cfg.heartbeat);
        let (may_reap, resumed_at, clock_seen) =
            (self.may_reap(), self.resumed_at, self.clock_seen);
        let queue = &mut self.queue;
        // The leases are renewed as of about now, whenever the write returns.
        let started = Instant::now();
        let result = tokio::task::block_in_place(|| -> Result<Renewal, QueueError> {
            // A daemon whose file was deleted would go on claiming and
            // completing where no other command looks.
            queue.check_database_file()?;
            // Only a run that still holds its claim: an older run of a task
            // re-claimed here must not write over the new claim's progress.
            for (lease, text) in &progress {
                if !leases.contains(lease) {
                    continue;
                }
                // A progress text the database refuses is the run's
                // problem: it must not keep every lease from renewal.
                match queue.record_progress(*lease, text.as_deref()) {
                    Err(e) if !e.is_transient() && !e.is_permanent() => {
                        tracing::warn!(task = lease.task_id, "progress not recorded: {e}");
                    }
                    other => drop(other?),
                }
            }
            let lost = if leases.is_empty() {
                // Nothing to renew, but a waiting reaper must learn whether
                // the database takes writes again.
                // (While it waits to reap, also the wait at its start:
                // an outage then must restart that wait, not end it.)
                if !may_reap {
                    queue.check_writable()?;
                }
                Vec::new()
            } else {
                queue.heartbeat(&leases)?
            };
            // Nor a reset that only reached the rows after such a stall,
            // or after the clock stepped (checked at the start too).
            let jumped = clock_jump_since(clock_seen);
            let expired =
                match may_reap && started.elapsed() <= long_stall && jumped <= CLOCK_STEP_MS {
                    true => {
                        let guard = StaleGuard {
                            deadline: Some(started + long_stall),
                            resumed_at,
                            clock_seen: Some(clock_seen),
                        };
                        queue.reset_stale_leases_guarded(stale_after, guard)?
                    }
                    false => Vec::new(),
                };
            // A step the reset's own check caught is said now, not at
            // the next heartbeat.
            let jumped = jumped.max(clock_jump_since(clock_seen));
            let stalled = match () {
                _ if started.elapsed() > long_stall => {
                    Some("the heartbeat's write stalled for most of stale_after".to_string())
                }
                _ if jumped > CLOCK_STEP_MS => Some(clock_jumped(jumped)),
                _ => None,
            };
            for lease in &expired {
                tracing::warn!(task = lease.task_id, holder = %lease.holder, to = %lease.to, "reset an expired lease");
            }
            Ok((lost, expired, stalled))
        });
        match result {
            Ok((lost, expired, stalled)) => {
                self.summary.leases_reset += expired.len() as u64;
                self.summary.leases_reset_failed +=
                    expired.iter().filter(|e| e.to == State::Failed).count() as u64;
                if let Some(lasted) = self.heartbeat_errors.succeeded() {
                    tracing::info!(
                        "heartbeats go through again: the database answers (it failed for {lasted:.0?})"
                    );
                }
                if let Some(why) = stalled {
                    // Also a step the start's check saw: the time it
                    // measures from moves on to now.
                    self.clock_seen = (Instant::now(), crate::queue::now_ms());
                    self.renewals_failed(&why);
                }
                self.renewals_answered();
                self.drop_lost(&lost);
                // After the lost runs are stopped: their requests waiting
                // on the renewal (see `RunHooks::wait_while_lease_in_doubt`)
                // must not go out.
                self.run_side.renewals.renewed(started);
                // Once the database answers, not before: each try would
                // wait out its busy timeout ahead of the renewal.
                self.summary.given_back += self.retry_releases();
                self.record_deliveries_again();
                !lost.is_empty() || !expired.is_empty()
            }
            Err(e) if e.is_permanent() => {
                self.unusable = Some(e);
                false
            }
            Err(e) => {
                if let Some(more) = self.heartbeat_errors.failed() {
                    tracing::error!(
                        "heartbeat failed, will retry{}: {e}",
                        crate::repeats::more(more)
                    );
                }
                self.renewals_failed("the heartbeat failed");
                self.stop_runs_whose_leases_may_be_reset();
                false
            }
        }
    }

    /// Whether this daemon's leases have gone unrenewed so long that the
    /// next heartbeat would come after `stale_after`, the time its claims
    /// promised to renew them within: then another daemon that can reach
    /// the database (this one cut off from it, say) may soon reset them and
    /// run their tasks. Nothing more is started, and the runs stop.
    /// Runs check it too (see [`crate::runtime::RunHooks::wait_while_lease_in_doubt`]), as the loop
    /// can be held up in a heartbeat that does not return.
    pub(super) fn leases_may_soon_be_reset(&self) -> bool {
        self.run_side.renewals.may_soon_be_reset()
    }

    /// Stops every run once [`Daemon::leases_may_soon_be_reset`]: run on,
    /// they would run beside the daemon that takes their tasks over (model
    /// calls and requests made twice), their results refused anyway. Their
    /// leases stay held: the first heartbeat that reaches the database
    /// renews and gives them back, the attempts returned (an outage every
    /// daemon saw resets nobody's), unless another daemon reset them first.
    pub(super) fn stop_runs_whose_leases_may_be_reset(&mut self) {
        if !self.leases_may_soon_be_reset() {
            return;
        }
        // Results already sent are stored when the database answers.
        self.collect_finished();
        let runs: Vec<super::InFlight> = self.inflight.drain().map(|(_, run)| run).collect();
        if runs.is_empty() {
            return;
        }
        tracing::error!(
            runs = runs.len(),
            unrenewed_for = ?self.run_side.renewals.unrenewed_for(),
            stale_after = ?self.cfg.stale_after,
            "this daemon's leases could not be renewed for nearly stale_after: stopping its runs, which another daemon may soon take over (given back, their attempts returned, once the database answers)"
        );
        for run in runs {
            self.unreleased.push((run.lease, true));
            self.stop_run(run);
        }
    }

    /// Whether other hosts' stale leases may be reset now.
    pub(super) fn may_reap(&self) -> bool {
        self.reaping_from.is_some_and(|at| Instant::now() >= at)
    }

    /// When this host's clock jumped forward since the last heartbeat (a
    /// step by NTP or by hand, a resume from suspend), every lease's last
    /// heartbeat, written by the old clock, looks that much older: on
    /// SQLite, whose leases are timed by the hosts' clocks, a reset now
    /// would take the live leases of the other daemons on this machine
    /// before they renewed them. Treated as an outage: nothing is reset
    /// until the holders have had `stale_after` to renew by the new clock.
    fn notice_clock_step(&mut self) {
        let jumped = clock_jump_since(self.clock_seen);
        self.clock_seen = (Instant::now(), crate::queue::now_ms());
        if jumped > CLOCK_STEP_MS {
            self.renewals_failed(&clock_jumped(jumped));
        }
    }

    /// This daemon could not renew its leases in time (`why`): if the
    /// database was out or stalled, no host could renew theirs meanwhile,
    /// so none of theirs is reset here until renewals have worked again for
    /// `stale_after` (see [`Daemon::renewals_answered`]). Only the
    /// heartbeat counts: other writes fail for reasons of their own (a
    /// full pool, a large batch), and each failure restarts the wait, which
    /// would leave a crashed host's leases unreset for as long as they
    /// recur.
    pub(super) fn renewals_failed(&mut self, why: &str) {
        if self.reaping_from.take().is_some() {
            tracing::info!(
                stale_after = ?self.cfg.stale_after,
                "{why}: other hosts' leases are not reset until the database has answered for stale_after, so that live holders can renew theirs first"
            );
        }
    }

    /// The heartbeat's write went through. The first after a failure starts
    /// the wait before other hosts' leases may be reset: resetting them at
    /// once would take the work of live daemons that reconnect a moment
    /// later (seen on PostgreSQL restarts: every lease of the others reset,
    /// tasks with one attempt failed as `lease_expired`). The holders' own
    /// promises (`lease_ms`, which may be longer than this daemon's
    /// stale_after) count from the same moment, on the queue's clock.
    pub(super) fn renewals_answered(&mut self) {
        if self.reaping_from.is_none() {
            self.reaping_from = Some(Instant::now() + self.cfg.stale_after);
            let queue = &self.queue;
            let now = tokio::task::block_in_place(|| queue.now());
            self.resumed_at = Some(now.unwrap_or_else(|_| crate::queue::now_ms()));
        }
    }

    /// Whether the leases of buffered tasks can still be ours: renewed
    /// within `stale_after`. Otherwise another host may have reset them,
    /// and a run started now could run beside that host's; they wait for
    /// the next heartbeat, which renews them or reports them lost.
    pub(super) fn buffered_leases_fresh(&self) -> bool {
        !self.leases_may_soon_be_reset()
    }

    /// Gives back buffered tasks of agents that are no longer loaded (removed
    /// or replaced by a broken file): nothing here could run them.
    pub(super) fn release_orphaned_buffers(&mut self) {
        let loaded = self.agents.loaded_names();
        let orphaned: Vec<String> = self
            .prefetched
            .keys()
            .filter(|a| !loaded.contains(a))
            .cloned()
            .collect();
        for agent in orphaned {
            let leases: Vec<Lease> = self
                .prefetched
                .remove(&agent)
                .into_iter()
                .flatten()
                .map(|t| t.lease)
                .collect();
            self.summary.given_back += self.release_all(&leases, false);
        }
    }

    /// Gives back, unstarted, the tasks claimed ahead for an agent whose
    /// runs have grown long, beyond the slots it may still fill here: they
    /// would wait leased behind its runs while other daemons stand idle, and
    /// each would spend an attempt without running if this daemon died.
    /// Called after the free slots took what they could.
    pub(super) fn give_back_buffers_gone_slow(&mut self) {
        if self.cfg.prefetch == Prefetch::Always || !self.buffered_leases_fresh() {
            return;
        }
        let gone_slow: Vec<(String, usize)> = self
            .prefetched
            .iter()
            .filter(|(agent, buffer)| !buffer.is_empty() && !self.claims_ahead(agent))
            .map(|(agent, buffer)| (agent.clone(), buffer.len()))
            .collect();
        for (agent, buffered) in gone_slow {
            let running = self.inflight.values().filter(|f| f.agent == agent).count();
            let room = self.usable_slots(&agent).saturating_sub(running);
            if buffered <= room {
                continue;
            }
            let buffer = self.prefetched.get_mut(&agent).expect("listed above");
            let leases: Vec<Lease> = buffer.drain(room..).map(|t| t.lease).collect();
            tracing::info!(
                agent,
                tasks = leases.len(),
                "this agent's runs have grown long: giving back the tasks claimed ahead for it, for any daemon with a free slot"
            );
            self.summary.given_back += self.release_all(&leases, false);
        }
    }

    /// Stops a run whose claim no longer holds, counted lost. A result it
    /// sent in the meantime is still stored, refused on the trail and
    /// counted there instead (see `accept`).
    pub(super) fn stop_run(&mut self, run: super::InFlight) {
        self.run_side.stopped(run.lease);
        run.handle.abort();
        self.aborted.insert(run.lease, Instant::now());
        self.summary.lost += 1;
    }

    /// Someone reset or cancelled these leases: stop their runs (the results
    /// would be discarded) and forget tasks that had not started.
    pub(super) fn drop_lost(&mut self, lost: &[Lease]) {
        // Results already sent are taken in first: stored, their refusal is
        // recorded (a result_refused event), where one dropped here would
        // leave no trace of what the run did.
        self.collect_finished();
        for lease in lost {
            if self
                .inflight
                .get(&lease.task_id)
                .is_some_and(|f| f.lease == *lease)
            {
                let run = self.inflight.remove(&lease.task_id).expect("just checked");
                tracing::warn!(task = lease.task_id, "lease lost; stopping the run");
                self.stop_run(run);
            }
            for buffer in self.prefetched.values_mut() {
                buffer.retain(|t| t.lease != *lease);
            }
            self.unreleased.retain(|(held, _)| held != lease);
        }
    }

    /// Forgets the tasks claimed ahead whose claim no longer holds (cancelled,
    /// or a person's verdict cancelled the reviewer task): checked whenever
    /// another connection has committed (on PostgreSQL, which does not tell,
    /// at every check), at most every `watch_interval`.
    /// Left to the next heartbeat (10 s by default), such a task was started
    /// after its cancel had returned, its model calls charged and its
    /// requests sent. A cancel landing between this check and the start is
    /// still caught by the heartbeat, the run then stopped.
    pub(super) fn drop_voided_claims_ahead(&mut self) {
        let buffered: Vec<Lease> = self
            .prefetched
            .values()
            .flatten()
            .map(|task| task.lease)
            .collect();
        if buffered.is_empty() {
            return;
        }
        let queue = &self.queue;
        match tokio::task::block_in_place(|| queue.voided_claims(&buffered)) {
            Ok(voided) if voided.is_empty() => {}
            Ok(voided) => {
                for lease in &voided {
                    tracing::info!(
                        task = lease.task_id,
                        "cancelled or reset while waiting to start: not started"
                    );
                }
                self.drop_lost(&voided);
            }
            // The heartbeat checks them too.
            Err(e) => tracing::debug!("checking the tasks claimed ahead failed: {e}"),
        }
    }

    /// A run whose task ended without reporting (a panic in the host) would
    /// otherwise hold its slot and lease forever: record it as a crash.
    pub(super) fn recover_vanished_runs(&mut self) {
        let finished: Vec<Lease> = self
            .inflight
            .values()
            .filter(|f| f.handle.is_finished())
            .map(|f| f.lease)
            .collect();
        if finished.is_empty() {
            return;
        }
        // A run sends its result before its task ends: drain the channel
        // again, so only runs that really sent nothing are left.
        self.collect_finished();
        for lease in finished {
            if !self
                .inflight
                .get(&lease.task_id)
                .is_some_and(|f| f.lease == lease)
            {
                continue;
            }
            let run = self.inflight.remove(&lease.task_id).expect("checked above");
            self.accept(vanished_run(run.lease));
        }
    }

    /// Stop claiming; give back tasks that never started; let runs finish
    /// within the grace period (still heartbeating); release the rest without
    /// burning their attempts; store every result we have.
    pub(super) async fn shut_down(&mut self) {
        tracing::info!(in_flight = self.inflight.len(), grace = ?self.cfg.grace, "shutting down");
        self.wait_for_write().await;
        let waiting: Vec<Lease> = self
            .prefetched
            .drain()
            .flat_map(|(_, b)| b)
            .map(|t| t.lease)
            .collect();
        self.summary.released += self.release_all(&waiting, false);
        self.release_unconfirmed_claims();
        // Finished work is stored as it finishes, exactly as in normal
        // operation: a second signal or a SIGKILL during the grace must not
        // discard it (and with it the run's attempt and effects).
        self.collect_finished();
        if !self.unwritten.is_empty() {
            self.write_finished();
        }

        // Runs that already ended without a result are crashes, not runs
        // for the grace to wait for.
        self.recover_vanished_runs();
        let deadline = Instant::now() + self.cfg.grace;
        let mut next_heartbeat = Instant::now() + self.cfg.heartbeat;
        while !self.inflight.is_empty() && Instant::now() < deadline {
            tokio::select! {
                Some(run) = self.done_rx.recv() => {
                    self.accept(run);
                    self.collect_finished();
                    self.write_finished();
                }
                Some(attempt) = self.deliverer.done_rx.recv() => self.record_delivery(attempt),
                _ = tokio::time::sleep_until(deadline.min(next_heartbeat).into()) => {
                    if Instant::now() >= next_heartbeat {
                        next_heartbeat = Instant::now() + self.cfg.heartbeat;
                        let _ = self.heartbeat_and_reap();
                    }
                }
            }
        }
        // Deliveries in flight get what is left of the grace to answer; their
        // results are recorded (an unrecorded 2xx would be sent again).
        while !self.deliverer.is_idle() && Instant::now() < deadline {
            tokio::select! {
                Some(attempt) = self.deliverer.done_rx.recv() => self.record_delivery(attempt),
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
        // Answers that came in by the deadline are recorded (one the
        // database still refuses keeps its claim, left to run out); the
        // rest are given back, due at once, rather than left `sending`
        // until their claim runs out (twice --effect-timeout).
        let stopped = self.deliverer.stop_in_flight().await;
        let mut answered: HashSet<(i64, i64)> = self
            .unrecorded_deliveries
            .iter()
            .map(|attempt| attempt.claim())
            .collect();
        while let Ok(attempt) = self.deliverer.done_rx.try_recv() {
            answered.insert(attempt.claim());
            self.record_delivery(attempt);
        }
        self.record_deliveries_again();
        for attempt in std::mem::take(&mut self.unrecorded_deliveries) {
            self.deliverer.abandon(&attempt);
            tracing::error!(
                "could not record an effect's delivery; another daemon sends it again once its claim runs out"
            );
        }
        let unanswered: Vec<(i64, i64)> = stopped
            .into_iter()
            .filter(|claim| !answered.contains(claim))
            .collect();
        let queue = &mut self.queue;
        match tokio::task::block_in_place(|| queue.release_deliveries(&unanswered)) {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(
                    "gave back {n} effect(s) whose receiver had not answered by the end of the grace; they are sent again with the same idempotency key"
                );
                self.summary.effects_released += n as u64;
            }
            Err(e) => tracing::error!(
                "could not give back {} effect(s) being sent; another daemon takes them over once their claim runs out: {e}",
                unanswered.len()
            ),
        }
        // A run that ended without a result (its task panicked) is a crash,
        // its attempt spent, not an interruption to give back: a task that
        // panicked the host at every run would otherwise never use up its
        // attempts under a daemon restarted often.
        self.recover_vanished_runs();
        // Stop what is still running and wait for it to be gone (a guest
        // yields at every epoch tick), so no run outlives its release: all
        // at once, within 5 s in all.
        let stopping: Vec<(Lease, JoinHandle<()>)> = self
            .inflight
            .drain()
            .map(|(_, run)| (run.lease, run.handle))
            .collect();
        for (_, handle) in &stopping {
            handle.abort();
        }
        let stop_by = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut stopped = Vec::with_capacity(stopping.len());
        for (lease, handle) in stopping {
            match tokio::time::timeout_at(stop_by, handle).await {
                Err(_) => tracing::error!(
                    task = lease.task_id,
                    "a run did not stop within 5 s of being aborted; its lease is left to expire rather than given back while it may still be running"
                ),
                Ok(Err(e)) if e.is_panic() => self.accept(vanished_run(lease)),
                Ok(_) => stopped.push(lease),
            }
        }
        // The stopped runs' model calls that never went out give their
        // token reservations back before the process ends.
        let settle_by = tokio::time::Instant::now() + Duration::from_secs(5);
        self.run_side.settle_releases(settle_by).await;
        // Results that arrived until the runs stopped are kept; the rest is released.
        self.collect_finished();
        let reported: HashSet<Lease> = self.unwritten.iter().map(|r| r.lease).collect();
        let interrupted: Vec<Lease> = stopped
            .into_iter()
            .filter(|l| !reported.contains(l))
            .collect();
        self.summary.released += self.release_all(&interrupted, true);
        // Those the database refused just now get a few more tries: nothing
        // renews them once the daemon is gone.
        for _ in 0..5 {
            if self.unreleased.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.summary.released += self.retry_releases();
        }
        for (lease, _) in std::mem::take(&mut self.unreleased) {
            tracing::error!(
                task = lease.task_id,
                "could not give the task back; its lease will expire instead"
            );
        }
        for attempt in 1..=10 {
            if self.unwritten.is_empty() {
                break;
            }
            self.write_finished();
            if !self.unwritten.is_empty() {
                tracing::error!("storing results at shutdown failed (attempt {attempt} of 10)");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if !self.unwritten.is_empty() {
            self.summary.unstored = self.unwritten.len() as u64;
            tracing::error!(
                "{} finished run(s) could not be stored; their leases expire and the tasks run again",
                self.unwritten.len()
            );
        }
    }

    /// Gives `leases` back; `started`: their runs began (see
    /// `Queue::release_unstarted` for those that did not). Returns how many
    /// went back to `ready`; the others had lost their lease, or are kept
    /// when the database refuses: from the first refusal on, all are kept,
    /// renewed, and tried again after a heartbeat that went through
    /// ([`Daemon::retry_releases`]). Retried here, with sleeps, or tried
    /// one by one each up to the busy timeout, the loop and its heartbeats
    /// stood still for seconds per task.
    pub(super) fn release_all(&mut self, leases: &[Lease], started: bool) -> u64 {
        let mut released = 0;
        for (i, &lease) in leases.iter().enumerate() {
            let queue = &mut self.queue;
            let result = tokio::task::block_in_place(|| match started {
                true => queue.release(lease),
                false => queue.release_unstarted(lease),
            });
            match result {
                Ok(Applied::Moved(_)) => {
                    released += 1;
                    tracing::info!(task = lease.task_id, "released back to ready");
                }
                Ok(Applied::LeaseLost) => {}
                Err(e) => {
                    tracing::warn!(
                        tasks = leases.len() - i,
                        "could not give tasks back now, will retry after the next heartbeat: {e}"
                    );
                    self.unreleased
                        .extend(leases[i..].iter().map(|&lease| (lease, started)));
                    break;
                }
            }
        }
        released
    }

    /// Tries again to give back the claims [`Daemon::release_all`] could
    /// not; returns how many went back. Not one whose run's result came in
    /// (stored instead: given back first, it would be refused).
    pub(super) fn retry_releases(&mut self) -> u64 {
        let reported: HashSet<Lease> = self.unwritten.iter().map(|r| r.lease).collect();
        let pending: Vec<(Lease, bool)> = std::mem::take(&mut self.unreleased)
            .into_iter()
            .filter(|(lease, _)| !reported.contains(lease))
            .collect();
        let mut released = 0;
        for started in [true, false] {
            let leases: Vec<Lease> = pending
                .iter()
                .filter(|(_, s)| *s == started)
                .map(|(lease, _)| *lease)
                .collect();
            released += self.release_all(&leases, started);
        }
        released
    }
}

/// The result recorded for a run whose task ended without sending one (it
/// panicked): a crash, so its attempt counts.
fn vanished_run(lease: Lease) -> FinishedRun {
    tracing::error!(
        task = lease.task_id,
        "a run ended without a result; recording it as a crash"
    );
    FinishedRun {
        lease,
        outcome: RunOutcome::Failure(TaskError {
            kind: ErrorKind::Crash,
            message: "the host's run of this task ended without a result (see the daemon's log)"
                .into(),
        }),
        log: String::new(),
        state: Vec::new(),
        effects: Vec::new(),
        claimed: None,
    }
}
