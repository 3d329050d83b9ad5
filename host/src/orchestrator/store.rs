//! Finished runs on their way into the queue: taken in, group-committed on
//! the writer lane (with the next claims on SQLite), and counted; a batch
//! that cannot be stored is retried, or stored run by run.

use std::time::{Duration, Instant};

use super::{CLAIM_RETRY, Daemon, Lane, LaneId, Written};
use crate::queue::{Applied, ClaimedTask, FinishedRun, Lease, QueueError};
use crate::task::{ErrorKind, RunOutcome, State, TaskError};

impl Daemon {
    pub(super) fn collect_finished(&mut self) {
        while let Ok(run) = self.done_rx.try_recv() {
            self.accept(run);
        }
    }

    /// Takes a finished run in. The in-flight entry is removed only if it is
    /// this lease's run: the task may have been reclaimed under a new lease.
    pub(super) fn accept(&mut self, run: FinishedRun) {
        // A run stopped because its lease was lost may have sent its result
        // in the instant before: stored all the same, so that its refusal
        // is on the trail (result_refused), and counted lost once, by that
        // refusal, rather than when the run was stopped.
        if self.aborted.remove(&run.lease).is_some() {
            self.summary.lost = self.summary.lost.saturating_sub(1);
        }
        let id = run.lease.task_id;
        if self.inflight.get(&id).is_some_and(|f| f.lease == run.lease)
            && let Some(run) = self.inflight.remove(&id)
        {
            let took = run.since.elapsed();
            self.summary.time.in_flight += took;
            self.run_times.record(&run.agent, took);
        }
        self.unwritten_since.get_or_insert_with(Instant::now);
        self.unwritten.push(run);
    }

    /// Group commit: store when the oldest result has waited `write_window`
    /// (or the backoff after a failed store), when many are waiting, or when
    /// nothing else is running that could join the batch.
    pub(super) fn write_is_due(&self) -> bool {
        let Some(since) = self.unwritten_since else {
            return false;
        };
        let waited = since.elapsed();
        if !self.write_backoff.is_zero() {
            return waited >= self.write_backoff;
        }
        waited >= self.cfg.write_window || self.unwritten.len() >= 256 || self.inflight.is_empty()
    }

    /// Hands the hot path's next transaction to a lane: on the writer, every
    /// finished run waiting to be stored, then the `claims` (promotion
    /// first); on a claimer, the claims alone. It runs on a blocking thread
    /// with the lane's own connection while the loop goes on dispatching from
    /// the claim buffers and collecting finished runs, which wait for the
    /// writer's next transaction.
    ///
    /// Off the loop, because a transaction takes hundreds of µs during which
    /// runs finish and slots would otherwise stay empty. On SQLite all of
    /// the hot path goes through the writer, one transaction for both,
    /// because a completion and the next claims touch the same pages and
    /// SQLite has one writer at a time anyway; it never waits for the lock
    /// behind the loop's own connection (which only heartbeats, reaps and
    /// sends effects).
    pub(super) fn start_job(&mut self, lane_id: LaneId, claims: super::prefetch::Asks) {
        let runs = match lane_id {
            LaneId::Writer => {
                self.unwritten_since = None;
                std::mem::take(&mut self.unwritten)
            }
            LaneId::Claimer(_) => Vec::new(),
        };
        for (agent, asked) in &claims.claims {
            *self.claiming.entry(agent.clone()).or_default() += asked;
        }
        let panic_here = !runs.is_empty() && self.cfg.panicking_stores > 0;
        if panic_here {
            self.cfg.panicking_stores -= 1;
        }
        let lane = self.lane(lane_id);
        lane.busy = true;
        let writer = lane.conn.take();
        let reopen = self.run_side.reopen.clone();
        let done = self.written_tx.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            // Whatever happens, the job answers: a lane whose job vanished
            // would stay busy, and its runs unstored, for good. After a
            // panic the connection is dropped and the lane opens another.
            let mut used = writer;
            let result = catch_panic(|| {
                let queue = match used.take() {
                    Some(queue) => used.insert(queue),
                    None => used.insert(reopen()?),
                };
                if panic_here {
                    panic!("a panicking store, as the test asked");
                }
                queue.finish_and_claim_sharing(
                    &runs,
                    &claims.claims,
                    claims.shared_from,
                    claims.slots,
                )
            });
            let queue = match &result {
                Err(QueueError::Panicked(_)) => None,
                _ => used,
            };
            let _ = done.send(Written {
                lane: lane_id,
                queue,
                took: started.elapsed(),
                runs,
                claims,
                result,
            });
        });
    }

    /// Takes a transaction's outcome in (see [`Daemon::start_job`]). Answers
    /// whether there may be more to claim: a claim got all it asked for, or
    /// stored completions may have made dependents ready.
    pub(super) fn on_written(&mut self, written: Written) -> bool {
        let lane = self.lane(written.lane);
        lane.busy = false;
        lane.conn = written.queue;
        self.summary.time.writing += written.took;
        self.summary.time.transactions += 1;
        let Written {
            runs,
            claims,
            result,
            ..
        } = written;
        for (agent, asked) in &claims.claims {
            if let Some(claiming) = self.claiming.get_mut(agent) {
                *claiming = claiming.saturating_sub(*asked);
            }
        }
        let done = match result {
            Ok(done) => done,
            Err(e) => {
                // Its claims may have committed all the same: give them back.
                if let QueueError::CommitUnknown { claim_tokens, .. } = &e {
                    let since = Instant::now();
                    self.unconfirmed_claims
                        .extend(claim_tokens.iter().map(|&token| (token, since)));
                    self.release_unconfirmed_claims();
                }
                // Nothing was stored and nothing claimed (or what was
                // claimed is being given back).
                if !claims.is_empty() {
                    self.claims_paused_until = Some(Instant::now() + CLAIM_RETRY);
                }
                if runs.is_empty() {
                    match e.is_permanent() {
                        true => self.unusable = Some(e),
                        false => {
                            if let Some(more) = self.claim_errors.failed() {
                                tracing::error!(
                                    "claiming failed, will retry{}: {e}",
                                    crate::repeats::more(more)
                                );
                            }
                        }
                    }
                } else {
                    // Runs that finished meanwhile join the retry.
                    let mut runs = runs;
                    runs.append(&mut self.unwritten);
                    self.after_write(runs, Err(e));
                }
                return true;
            }
        };
        self.claims_paused_until = None;
        // Only a transaction that claimed ends a streak of failed claims (on
        // PostgreSQL the writer stores without claiming).
        if !claims.is_empty()
            && let Some(lasted) = self.claim_errors.succeeded()
        {
            tracing::info!("claiming works again (it failed for {lasted:.0?})");
        }
        self.effects_due |= done.effects_may_be_due;
        let mut more = !runs.is_empty();
        for ((agent, asked), tasks) in claims.claims.into_iter().zip(done.claimed) {
            more |= asked > 0 && tasks.len() == asked;
            self.take_claimed(agent, tasks);
        }
        self.after_write(runs, Ok(done.applied));
        more
    }

    /// Gives back the tasks claimed in transactions whose commit could not
    /// be confirmed. Tried again at each heartbeat for `stale_after`: a
    /// commit the server was still finishing (a slow fsync, a synchronous
    /// standby) shows its claims only later, and past `stale_after` any
    /// reaper resets them anyway.
    pub(super) fn release_unconfirmed_claims(&mut self) {
        let stale_after = self.cfg.stale_after;
        // While the database is out (reaping waits), no reaper can have
        // reset them either: keep trying until it has answered that long.
        let may_reap = self.may_reap();
        self.unconfirmed_claims
            .retain(|(_, since)| since.elapsed() <= stale_after || !may_reap);
        if self.unconfirmed_claims.is_empty() {
            return;
        }
        let tokens: Vec<i64> = self.unconfirmed_claims.iter().map(|(t, _)| *t).collect();
        let queue = &mut self.queue;
        match tokio::task::block_in_place(|| queue.release_unconfirmed_claims(&tokens)) {
            Ok(released) if !released.is_empty() => {
                tracing::warn!(
                    tasks = ?released,
                    "gave back tasks claimed in a transaction whose commit could not be confirmed"
                );
                self.summary.given_back += released.len() as u64;
            }
            Ok(_) => {}
            Err(e) => tracing::error!(
                "could not give back claims whose commit is unconfirmed, will retry: {e}"
            ),
        }
    }

    /// Buffers claimed tasks for their slots, or gives them back at once if
    /// their agent was unloaded while they were being claimed.
    pub(super) fn take_claimed(&mut self, agent: String, tasks: Vec<ClaimedTask>) {
        if tasks.is_empty() {
            return;
        }
        if self.agents.loaded(&agent).is_none() {
            let leases: Vec<Lease> = tasks.iter().map(|t| t.lease).collect();
            self.summary.given_back += self.release_all(&leases, false);
            return;
        }
        self.prefetched.entry(agent).or_default().extend(tasks);
    }

    pub(super) fn lane(&mut self, id: LaneId) -> &mut Lane {
        match id {
            LaneId::Writer => &mut self.writer,
            LaneId::Claimer(i) => &mut self.claimers[i],
        }
    }

    /// Waits for the transactions in flight, if any.
    pub(super) async fn wait_for_write(&mut self) {
        while self.writer.busy || self.claimers.iter().any(|lane| lane.busy) {
            match self.written_rx.recv().await {
                Some(written) => {
                    self.on_written(written);
                }
                None => break,
            }
        }
    }

    /// Stores the finished runs now, on the loop's own connection.
    pub(super) fn write_finished(&mut self) {
        let runs = std::mem::take(&mut self.unwritten);
        self.unwritten_since = None;
        let result = tokio::task::block_in_place(|| catch_panic(|| self.queue.finish_batch(&runs)));
        self.effects_due = true; // they may have queued effects
        self.after_write(runs, result);
    }

    pub(super) fn after_write(
        &mut self,
        runs: Vec<FinishedRun>,
        result: Result<Vec<Applied>, QueueError>,
    ) {
        match result {
            Ok(applied) => {
                if !self.write_backoff.is_zero() {
                    // After a streak of errors, the operator reading them
                    // wants to know that it ended.
                    tracing::info!("storing works again: the database is back");
                }
                self.write_backoff = Duration::ZERO;
                for (run, applied) in runs.iter().zip(applied) {
                    self.count(run, applied);
                }
            }
            Err(e) if e.is_permanent() => {
                self.unwritten = runs;
                self.unusable = Some(e);
            }
            Err(e) if e.is_transient() => {
                self.write_backoff = (self.write_backoff * 2)
                    .clamp(Duration::from_millis(50), Duration::from_secs(5));
                tracing::error!(
                    "could not store {} finished runs, retrying in {:?}: {e}",
                    runs.len(),
                    self.write_backoff
                );
                self.unwritten = runs;
                self.unwritten_since = Some(Instant::now());
            }
            Err(e) => {
                tracing::error!(
                    "storing a batch of {} runs failed ({e}); storing them one by one",
                    runs.len()
                );
                for run in runs {
                    self.write_one(run);
                }
                self.write_backoff = if self.unwritten.is_empty() {
                    Duration::ZERO
                } else {
                    (self.write_backoff * 2)
                        .clamp(Duration::from_millis(50), Duration::from_secs(5))
                };
            }
        }
    }

    /// Stores one run; if its outcome itself cannot be stored, records that
    /// as the run's failure instead, so one bad run cannot block the rest.
    pub(super) fn write_one(&mut self, run: FinishedRun) {
        // The whole run — its state writes and effects included — alone.
        let result = tokio::task::block_in_place(|| {
            catch_panic(|| {
                self.queue
                    .finish_batch(std::slice::from_ref(&run))
                    .map(|a| a[0])
            })
        });
        self.effects_due = true; // it may have queued effects
        match result {
            Ok(applied) => self.count(&run, applied),
            Err(e) if e.is_transient() => {
                self.unwritten_since.get_or_insert_with(Instant::now);
                self.unwritten.push(run);
            }
            Err(e) => {
                // An outcome refused as bad input is the agent's fault.
                let kind = match e.is_bad_input() {
                    true => ErrorKind::InvalidOutput,
                    false => ErrorKind::Crash,
                };
                let failure = RunOutcome::Failure(TaskError {
                    kind,
                    message: format!("the host could not store this run's outcome: {e}"),
                });
                let stored = tokio::task::block_in_place(|| {
                    catch_panic(|| self.queue.finish(run.lease, failure.clone(), &run.log))
                });
                match stored {
                    Ok(applied) => self.count(
                        &FinishedRun {
                            outcome: failure,
                            ..run
                        },
                        applied,
                    ),
                    Err(e2) => tracing::error!(
                        task = run.lease.task_id,
                        "dropping a run's outcome that cannot be stored ({e}; recording the failure also failed: {e2}); its lease will expire and it will run again"
                    ),
                }
            }
        }
    }

    pub(super) fn count(&mut self, run: &FinishedRun, applied: Applied) {
        let id = run.lease.task_id;
        match applied {
            Applied::Moved(State::Complete) => {
                self.summary.completed += 1;
                tracing::info!(task = id, "complete");
            }
            Applied::Moved(State::Review) => {
                self.summary.to_review += 1;
                tracing::info!(task = id, "waiting for review");
            }
            Applied::Moved(State::Pending) => {
                self.summary.retried += 1;
                tracing::info!(task = id, outcome = %outcome_summary(id, &run.outcome), "failed, will retry after a backoff");
            }
            Applied::Moved(state) => {
                self.summary.failed += 1;
                tracing::warn!(task = id, %state, outcome = %outcome_summary(id, &run.outcome), "failed");
            }
            Applied::LeaseLost => {
                self.summary.lost += 1;
                tracing::warn!(
                    task = id,
                    "result discarded: the lease was lost (reset by a reaper or cancelled)"
                );
            }
        }
    }
}

/// A run's outcome for the daemon's log: a failure's kind and message (cut
/// to a line's worth), or a success by its size: a refused output of 8 MiB
/// was logged whole. Why the queue refused it is the task's error.
fn outcome_summary(id: i64, outcome: &RunOutcome) -> String {
    match outcome {
        RunOutcome::Success { output, spawn, .. } => format!(
            "success with {} bytes of output and {} spawned, refused by the queue (`colony show {id}` says why)",
            output.len(),
            spawn.len()
        ),
        RunOutcome::Failure(e) => {
            let message = crate::runtime::truncate(e.message.replace('\n', "\\n"), 500);
            format!("{}: {message}", e.kind.as_str())
        }
    }
}

/// Runs `f`, answering a panic in it as [`QueueError::Panicked`]: a bug in
/// the store path then costs a batch its group commit, not the daemon its
/// writer (or its loop). Queue code holds no state across a panic that
/// outlives its transaction, which unwinding rolls back.
fn catch_panic<T>(f: impl FnOnce() -> Result<T, QueueError>) -> Result<T, QueueError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = crate::panic_message(payload.as_ref());
        tracing::error!("a bug: storing panicked: {message}");
        Err(QueueError::Panicked(message))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crate::orchestrator::{Daemon, DaemonConfig, InFlight};
    use crate::queue::{FinishedRun, Lease, Queue};
    use crate::task::{NewTask, RunOutcome};

    /// A run under `lease` that succeeded with `{}`, queuing `effects`.
    fn succeeded(lease: Lease, effects: Vec<crate::effects::Effect>) -> FinishedRun {
        FinishedRun {
            lease,
            outcome: RunOutcome::Success {
                output: "{}".into(),
                spawn: vec![],
                needs_review: false,
            },
            log: String::new(),
            state: vec![],
            effects,
            claimed: None,
        }
    }

    /// Puts in flight, under `lease`, a run of agent `a` that never ends by
    /// itself; returns what stops it.
    fn a_run_that_never_ends(daemon: &mut Daemon, lease: Lease) -> tokio::task::AbortHandle {
        let handle = tokio::spawn(std::future::pending::<()>());
        let running = handle.abort_handle();
        let run = InFlight {
            agent: "a".into(),
            since: Instant::now(),
            lease,
            handle,
        };
        daemon.inflight.insert(lease.task_id, run);
        running
    }

    /// A daemon on a fresh SQLite file with no agents, beside another
    /// connection to it standing in for everyone else (the directory keeps
    /// the file).
    async fn daemon_beside_a_queue(cfg: DaemonConfig) -> (tempfile::TempDir, Queue, Daemon) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("colony.db");
        let other = Queue::open(&db).unwrap();
        let daemon = Daemon::for_test(&db, &dir.path().join("agents"), cfg).await;
        (dir, other, daemon)
    }

    /// A daemon whose leases went unrenewed for nearly stale_after (its
    /// heartbeats failing: cut off from the database while other daemons
    /// are not) stops its runs: past it, another daemon may reset those
    /// leases and run the tasks beside them. They ran on until the
    /// database answered again, work done twice meanwhile (found by a
    /// review).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_stop_before_their_unrenewed_leases_may_be_reset() {
        let cfg = DaemonConfig {
            stale_after: std::time::Duration::from_secs(6),
            heartbeat: std::time::Duration::from_secs(1),
            ..DaemonConfig::default()
        };
        let (_dir, mut other, mut daemon) = daemon_beside_a_queue(cfg).await;
        let id = other.submit(&NewTask::new("a", "{}")).unwrap().id;
        let lease = other.claim("a", 1).unwrap()[0].lease;
        let running = a_run_that_never_ends(&mut daemon, lease);
        // Unrenewed for 4 s: the promise (6 s) still holds beyond the next
        // heartbeat.
        (daemon.run_side.renewals).renewed(Instant::now() - std::time::Duration::from_secs(4));
        daemon.stop_runs_whose_leases_may_be_reset();
        assert!(daemon.inflight.contains_key(&id) && !running.is_finished());
        assert!(
            daemon.buffered_leases_fresh(),
            "buffered tasks may still start"
        );
        // Unrenewed for 5 s: the next heartbeat would come too late.
        (daemon.run_side.renewals).renewed(Instant::now() - std::time::Duration::from_secs(5));
        assert!(
            !daemon.buffered_leases_fresh(),
            "nor may buffered tasks start"
        );
        daemon.stop_runs_whose_leases_may_be_reset();
        assert!(daemon.inflight.is_empty());
        let stopped_by = Instant::now() + std::time::Duration::from_secs(10);
        while !running.is_finished() && Instant::now() < stopped_by {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(running.is_finished(), "the run was stopped");
        // Its lease stays held: the first heartbeat that goes through (here,
        // the database was never out) gives the task back, its attempt
        // returned, rather than leaving it to expire.
        assert!(daemon.held_leases().contains(&lease));
        daemon.heartbeat_and_reap();
        let task = other.get(id).unwrap();
        assert_eq!((task.state, task.attempts), (crate::task::State::Ready, 0));
        assert!(!daemon.held_leases().contains(&lease));
    }

    /// Tasks claimed for an agent unloaded meanwhile go back unstarted,
    /// counted as given back while the daemon ran, not as released at
    /// shutdown (its closing line said "846 released" of a daemon that
    /// finished every task).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_given_back_while_running_are_not_counted_released() {
        let (_dir, mut other, mut daemon) = daemon_beside_a_queue(DaemonConfig::default()).await;
        for _ in 0..2 {
            other.submit(&NewTask::new("gone", "{}")).unwrap();
        }
        let claimed = daemon.queue.claim("gone", 2).unwrap();
        daemon.take_claimed("gone".into(), claimed);
        assert_eq!((daemon.summary.given_back, daemon.summary.released), (2, 0));
        assert_eq!(
            other.claim("gone", 2).unwrap().len(),
            2,
            "both back in ready"
        );
    }

    /// A claim that cannot be given back now (the database locked past its
    /// busy timeout) stays held, renewed by the heartbeat, and is given
    /// back by a later one. Retried on the spot with sleeps, it held up the
    /// loop and its heartbeats for seconds per task; given up, its lease
    /// expired and spent an attempt of a task that never ran (found by a
    /// review).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_that_cannot_be_given_back_now_is_kept_and_given_back_later() {
        let (dir, mut other, mut daemon) = daemon_beside_a_queue(DaemonConfig::default()).await;
        let id = other.submit(&NewTask::new("gone", "{}")).unwrap().id;
        let claimed = daemon.queue.claim("gone", 1).unwrap();
        let lease = claimed[0].lease;
        let lock = rusqlite::Connection::open(dir.path().join("colony.db")).unwrap();
        lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
        daemon.take_claimed("gone".into(), claimed);
        assert_eq!(daemon.summary.given_back, 0);
        assert!(daemon.held_leases().contains(&lease), "kept, to be renewed");
        lock.execute_batch("COMMIT").unwrap();
        daemon.heartbeat_and_reap();
        assert_eq!(daemon.summary.given_back, 1);
        assert!(!daemon.held_leases().contains(&lease));
        let task = other.get(id).unwrap();
        assert_eq!((task.state, task.attempts), (crate::task::State::Ready, 0));
    }

    /// A delivery's answer the database does not take now (locked past its
    /// busy timeout) is kept and recorded after the next heartbeat that
    /// goes through. It was retried on the spot, 6 tries with 100 ms sleeps
    /// each up to the busy timeout, the loop and its heartbeats standing
    /// still meanwhile (found by a review).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delivery_answer_the_database_refuses_now_is_recorded_later() {
        let (dir, mut other, mut daemon) = daemon_beside_a_queue(DaemonConfig::default()).await;
        other.submit(&NewTask::new("a", "{}")).unwrap();
        let lease = other.claim("a", 1).unwrap()[0].lease;
        let effect = crate::effects::Effect {
            seq: 1,
            method: "POST".into(),
            url: "http://127.0.0.1:9/hook".into(),
            headers: vec![],
            body: None,
            max_attempts: 5,
        };
        other
            .finish_batch(&[succeeded(lease, vec![effect])])
            .unwrap();
        let agents = ["a".to_string()];
        let delivery = other
            .claim_due_effects(1, std::time::Duration::from_secs(60), &agents)
            .unwrap()
            .remove(0);
        let lock = rusqlite::Connection::open(dir.path().join("colony.db")).unwrap();
        lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
        daemon.record_delivery(crate::delivery::Attempt::answered(delivery));
        assert_eq!(daemon.unrecorded_deliveries.len(), 1, "kept");
        lock.execute_batch("COMMIT").unwrap();
        daemon.heartbeat_and_reap();
        assert!(daemon.unrecorded_deliveries.is_empty());
        assert_eq!(daemon.summary.effects_sent, 1);
        let effects = other.effects(Some(lease.task_id), None, 10).unwrap();
        assert_eq!(effects[0].state, "sent");
    }

    /// A result sent in the instant before its run was stopped, its lease
    /// lost (here: its task cancelled), is refused on the trail like one
    /// that came in before, and the run counted lost once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_result_sent_as_its_run_is_stopped_is_refused_on_the_trail() {
        let (_dir, mut other, mut daemon) = daemon_beside_a_queue(DaemonConfig::default()).await;
        let id = other.submit(&NewTask::new("a", "{}")).unwrap().id;
        let lease = other.claim("a", 1).unwrap()[0].lease;
        other.cancel(id, "no longer wanted").unwrap();
        a_run_that_never_ends(&mut daemon, lease);
        daemon.drop_lost(&[lease]);
        // The run's result, sent before the abort landed.
        daemon.done_tx.send(succeeded(lease, vec![])).unwrap();
        daemon.collect_finished();
        daemon.write_finished();

        let events = other.events(Some(id), 0, 100).unwrap();
        let refused: Vec<_> = events
            .iter()
            .filter(|e| e.event == "result_refused")
            .collect();
        assert_eq!(refused.len(), 1, "{events:?}");
        assert_eq!(refused[0].detail["outcome"], "success");
        assert_eq!(daemon.summary.lost, 1);
    }
}
