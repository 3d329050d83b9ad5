//! The daemon: wake, record finished runs, promote, claim, dispatch,
//! heartbeat, reap, and shut down gracefully.
//!
//! One loop owns all the state (the queue connection, the runs in flight, the
//! results not yet stored), so nothing here needs a lock. Each wake-up does at
//! most one write transaction for all finished runs and one claim transaction
//! per agent: batching is where throughput comes from, since SQLite takes one
//! writer at a time. Runs execute as tokio tasks and report back on a channel.
//!
//! Queue calls block (SQLite is synchronous); they run under
//! `block_in_place`, so the daemon needs tokio's multi-threaded runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use crate::queue::{Applied, ClaimedTask, FinishedRun, Lease, Queue, QueueError};
use crate::runtime::{AgentDir, RunHooks, Runtime, TaskInput};
use crate::task::State;

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
    /// Most tasks taken in one claim transaction (64).
    pub claim_batch: usize,
    /// Exit once nothing runnable remains for the loaded agents.
    pub until_idle: bool,
    /// How often the database is checked for commits by other processes, so
    /// a task submitted from the CLI starts at once rather than at the next poll.
    pub watch_interval: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            poll: Duration::from_secs(60),
            concurrency: 16,
            heartbeat: Duration::from_secs(10),
            stale_after: Duration::from_secs(60),
            grace: Duration::from_secs(30),
            claim_batch: 64,
            until_idle: false,
            watch_interval: Duration::from_millis(200),
        }
    }
}

/// What a daemon run did, for its caller to print.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaemonSummary {
    pub runs: u64,
    pub completed: u64,
    pub to_review: u64,
    pub retried: u64,
    pub failed: u64,
    /// Results discarded because the lease was lost (reset or cancelled).
    pub lost: u64,
    /// Runs interrupted by shutdown and given back to `ready`.
    pub released: u64,
    /// Unfinished tasks left for agents that are not loaded, by agent.
    pub left_for_missing_agents: Vec<(String, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// A run in flight.
struct InFlight {
    agent: String,
    lease: Lease,
    handle: JoinHandle<()>,
}

/// Latest progress text per task, written at the next heartbeat.
#[derive(Default)]
struct ProgressBoard(Mutex<HashMap<u64, Option<String>>>);

impl RunHooks for ProgressBoard {
    fn progress(&self, task_id: u64, progress: Option<String>) {
        self.0.lock().unwrap().insert(task_id, progress);
    }
}

pub struct Daemon {
    queue: Queue,
    runtime: Arc<Runtime>,
    agents: AgentDir,
    cfg: DaemonConfig,
    wake: Arc<Notify>,
    progress: Arc<ProgressBoard>,
    inflight: HashMap<i64, InFlight>,
    /// Finished runs whose outcome is not stored yet (a write failed).
    unwritten: Vec<FinishedRun>,
    done_tx: mpsc::UnboundedSender<FinishedRun>,
    done_rx: mpsc::UnboundedReceiver<FinishedRun>,
    summary: DaemonSummary,
}

impl Daemon {
    pub fn new(queue: Queue, runtime: Arc<Runtime>, agents: AgentDir, cfg: DaemonConfig) -> Daemon {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Daemon {
            queue,
            runtime,
            agents,
            cfg,
            wake: Arc::new(Notify::new()),
            progress: Arc::default(),
            inflight: HashMap::new(),
            unwritten: Vec::new(),
            done_tx,
            done_rx,
            summary: DaemonSummary::default(),
        }
    }

    /// Notify this to make the daemon look for work at once (e.g. after a
    /// submit in the same process).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Runs until `shutdown` turns true (then shuts down gracefully) or, with
    /// `until_idle`, until no runnable work remains.
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<DaemonSummary, DaemonError> {
        let mut next_heartbeat = Instant::now() + self.cfg.heartbeat;
        let mut next_poll = Instant::now();
        let mut last_data_version = None;
        let mut write_backoff = Duration::ZERO;
        // Whether there may be work to claim: set by anything that can make
        // tasks runnable, so an idle daemon does no write transactions.
        let mut look = true;
        loop {
            if *shutdown.borrow() {
                break;
            }
            // 1. Store what finished (one transaction for all of it).
            while let Ok(run) = self.done_rx.try_recv() {
                self.inflight.remove(&run.lease.task_id);
                self.unwritten.push(run);
            }
            if !self.unwritten.is_empty() {
                look = true;
                match self.write_finished() {
                    Ok(()) => write_backoff = Duration::ZERO,
                    Err(e) => {
                        write_backoff = (write_backoff * 2)
                            .clamp(Duration::from_millis(50), Duration::from_secs(5));
                        tracing::error!(
                            "could not store {} finished runs, retrying in {write_backoff:?}: {e}",
                            self.unwritten.len()
                        );
                    }
                }
            }
            // 2. Housekeeping on the heartbeat tick and the poll tick.
            let now = Instant::now();
            if now >= next_heartbeat {
                next_heartbeat = now + self.cfg.heartbeat;
                self.heartbeat_and_reap();
                look = true;
            }
            if now >= next_poll {
                next_poll = now + self.cfg.poll;
                let report = self.agents.rescan(&self.runtime).await;
                if !report.is_empty() {
                    tracing::debug!(?report, "agents rescanned");
                }
                look = true;
            }
            // 3. Claim and dispatch, unless stored results are still waiting.
            if look && self.unwritten.is_empty() {
                look = false;
                if let Err(e) = self.claim_and_dispatch() {
                    tracing::error!("claiming failed, will retry: {e}");
                    look = true;
                    write_backoff = write_backoff.max(Duration::from_millis(100));
                }
            }
            if self.cfg.until_idle && self.inflight.is_empty() && self.unwritten.is_empty() {
                match self.idle() {
                    Ok(Some(left)) => {
                        self.summary.left_for_missing_agents = left;
                        return Ok(self.summary);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("idle check failed: {e}"),
                }
            }
            // 4. Sleep until something happens.
            let mut wait_until = next_heartbeat
                .min(next_poll)
                .min(Instant::now() + self.cfg.watch_interval);
            if write_backoff > Duration::ZERO {
                wait_until = wait_until.min(Instant::now() + write_backoff);
            }
            tokio::select! {
                Some(run) = self.done_rx.recv() => {
                    self.inflight.remove(&run.lease.task_id);
                    self.unwritten.push(run);
                }
                _ = self.wake.notified() => look = true,
                _ = tokio::time::sleep_until(wait_until.into()) => {
                    // Cheap reads: did another process commit (a CLI submit,
                    // another daemon), or is a scheduled retry due?
                    let version = self.queue.data_version().ok();
                    let due = self.queue.next_due_at().ok().flatten().is_some_and(|t| t <= crate::queue::now_ms());
                    if version != last_data_version || due || write_backoff > Duration::ZERO {
                        look = true;
                    }
                    last_data_version = version;
                }
                _ = shutdown.changed() => {}
            }
        }
        self.shut_down().await;
        Ok(self.summary)
    }

    fn write_finished(&mut self) -> Result<(), QueueError> {
        let runs = std::mem::take(&mut self.unwritten);
        let result = tokio::task::block_in_place(|| self.queue.finish_batch(&runs));
        match result {
            Ok(applied) => {
                for (run, applied) in runs.iter().zip(applied) {
                    self.count(run, applied);
                }
                Ok(())
            }
            Err(e) => {
                self.unwritten = runs;
                Err(e)
            }
        }
    }

    fn count(&mut self, run: &FinishedRun, applied: Applied) {
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
                tracing::info!(task = id, outcome = ?run.outcome, "failed, will retry after a backoff");
            }
            Applied::Moved(state) => {
                self.summary.failed += 1;
                tracing::warn!(task = id, %state, outcome = ?run.outcome, "failed");
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

    fn heartbeat_and_reap(&mut self) {
        let leases: Vec<Lease> = self
            .inflight
            .values()
            .map(|f| f.lease)
            .chain(self.unwritten.iter().map(|r| r.lease))
            .collect();
        let progress: Vec<(u64, Option<String>)> =
            self.progress.0.lock().unwrap().drain().collect();
        let queue = &mut self.queue;
        let result = tokio::task::block_in_place(|| -> Result<Vec<Lease>, QueueError> {
            for (task_id, text) in &progress {
                if let Some(lease) = leases.iter().find(|l| l.task_id as u64 == *task_id) {
                    queue.record_progress(*lease, text.as_deref())?;
                }
            }
            let lost = if leases.is_empty() {
                Vec::new()
            } else {
                queue.heartbeat(&leases)?
            };
            for expired in queue.reset_stale_leases(self.cfg.stale_after)? {
                tracing::warn!(task = expired.task_id, holder = %expired.holder, to = %expired.to, "reset an expired lease");
            }
            Ok(lost)
        });
        match result {
            Ok(lost) => {
                for lease in lost {
                    // Someone reset or cancelled it: stop the run, its result would be discarded.
                    if let Some(run) = self.inflight.remove(&lease.task_id) {
                        tracing::warn!(task = lease.task_id, "lease lost; stopping the run");
                        run.handle.abort();
                        self.summary.lost += 1;
                    }
                }
            }
            Err(e) => tracing::error!("heartbeat failed, will retry: {e}"),
        }
    }

    fn claim_and_dispatch(&mut self) -> Result<(), QueueError> {
        let mut free = (self.cfg.concurrency as usize).saturating_sub(self.inflight.len());
        if free == 0 {
            return Ok(());
        }
        tokio::task::block_in_place(|| self.queue.promote_due())?;
        for name in self.agents.loaded_names() {
            if free == 0 {
                break;
            }
            let Some(agent) = self.agents.loaded(&name) else {
                continue;
            };
            let running = self.inflight.values().filter(|f| f.agent == name).count();
            let slots = (agent.limits.concurrency as usize)
                .saturating_sub(running)
                .min(free)
                .min(self.cfg.claim_batch.max(1));
            if slots == 0 {
                continue;
            }
            let claimed = tokio::task::block_in_place(|| self.queue.claim(&name, slots))?;
            free -= claimed.len();
            for task in claimed {
                self.dispatch(agent.clone(), task);
            }
        }
        Ok(())
    }

    fn dispatch(&mut self, agent: Arc<crate::runtime::Agent>, task: ClaimedTask) {
        tracing::info!(task = task.lease.task_id, agent = %task.agent, attempt = task.attempt, "claimed");
        self.summary.runs += 1;
        let lease = task.lease;
        let runtime = self.runtime.clone();
        let hooks: Arc<dyn RunHooks> = self.progress.clone();
        let done = self.done_tx.clone();
        let wake = self.wake.clone();
        let timeout = task.timeout_ms.map(Duration::from_millis);
        let input = TaskInput {
            id: lease.task_id as u64,
            agent: task.agent.clone(),
            payload: task.payload,
            attempt: task.attempt,
            max_attempts: task.max_attempts,
            parent_result: task.parent_result,
            feedback: task.feedback,
        };
        let handle = tokio::spawn(async move {
            let report = runtime.run(&agent, input, timeout, hooks).await;
            let _ = done.send(FinishedRun {
                lease,
                outcome: report.outcome,
                log: report.log,
            });
            wake.notify_one();
        });
        self.inflight.insert(
            lease.task_id,
            InFlight {
                agent: task.agent,
                lease,
                handle,
            },
        );
    }

    /// `Some(left)` when nothing runnable remains for the loaded agents and
    /// nothing runs anywhere; `left` lists work waiting for missing agents.
    fn idle(&mut self) -> Result<Option<Vec<(String, u64)>>, QueueError> {
        let backlog = tokio::task::block_in_place(|| self.queue.backlog())?;
        let loaded = self.agents.loaded_names();
        let mut left = Vec::new();
        for (agent, b) in backlog {
            if b.in_progress > 0 {
                return Ok(None);
            }
            if loaded.contains(&agent) {
                if b.ready > 0 || b.scheduled > 0 {
                    return Ok(None);
                }
                if b.blocked > 0 {
                    left.push((agent, b.blocked));
                }
            } else if b.ready + b.scheduled + b.blocked > 0 {
                left.push((agent, b.ready + b.scheduled + b.blocked));
            }
        }
        Ok(Some(left))
    }

    /// Stop claiming; let runs finish within the grace period; release the
    /// rest without burning their attempts; store every result we have.
    async fn shut_down(&mut self) {
        tracing::info!(in_flight = self.inflight.len(), grace = ?self.cfg.grace, "shutting down");
        let deadline = Instant::now() + self.cfg.grace;
        while !self.inflight.is_empty() {
            match tokio::time::timeout_at(deadline.into(), self.done_rx.recv()).await {
                Ok(Some(run)) => {
                    self.inflight.remove(&run.lease.task_id);
                    self.unwritten.push(run);
                }
                _ => break,
            }
        }
        for (_, run) in self.inflight.drain() {
            run.handle.abort();
            match tokio::task::block_in_place(|| self.queue.release(run.lease)) {
                Ok(Applied::Moved(_)) => {
                    self.summary.released += 1;
                    tracing::info!(
                        task = run.lease.task_id,
                        "released unfinished run back to ready"
                    );
                }
                Ok(Applied::LeaseLost) => {}
                Err(e) => tracing::error!(
                    task = run.lease.task_id,
                    "could not release; its lease will expire instead: {e}"
                ),
            }
        }
        // Results that finished in time are stored, retrying a few times.
        for attempt in 0..10 {
            if self.unwritten.is_empty() {
                break;
            }
            if let Err(e) = self.write_finished() {
                tracing::error!(
                    "storing results at shutdown failed (attempt {}): {e}",
                    attempt + 1
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
