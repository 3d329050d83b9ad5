//! The durable queue: one interface ([`Queue`]) over two drivers.
//!
//! - `sqlite/`: the embedded default, one file, one writer at a time.
//! - `postgres/`: for fleets of daemons on several machines sharing one queue.
//!
//! Each driver owns its connection, schema, migrations and clock; the queue
//! logic above them is written once against [`sql::Sql`]:
//!
//! | file | owns |
//! |---|---|
//! | `insert.rs` | adding tasks: a submit's batch, dependencies, a completion's children |
//! | `tasks.rs` | the run cycle: promote, claim, heartbeat, release, reap, retry |
//! | `cancel.rs` | cancelling, and what it cascades to: dependents, reviewers left to answer |
//! | `finish.rs` | how a run ends: completion, review, retry with backoff, failure |
//! | `batch.rs` | the throughput path: a batch of plain completions or claims in a few statements |
//! | `review.rs` | completion, review and verdicts |
//! | `reads.rs` | reading tasks, events and logs back |
//! | `validate.rs` | checks on everything stored |
//! | `types.rs` | what the operations take and return, and where a queue lives ([`Location`]) |
//! | `state.rs`, `journal.rs`, `outbox.rs` | agent state, the model journal, effects |
//! | `copy.rs` | copying a whole queue between databases (`colony migrate`) |
//! | `error.rs` | [`QueueError`]: what went wrong, classed as the caller must tell it apart |
//!
//! Every operation is one transaction that asks [`crate::task::transition`]
//! before it moves a task, writes the state the table returned and an audit
//! event beside the move. Writes about a claimed task are fenced on
//! `(id, state = 'in_progress', claim_token)`, so a host that lost its lease
//! changes nothing (it is told so instead). Throughput comes from batching:
//! `claim` takes up to `n` tasks in one transaction and `finish_batch`
//! records many runs in one.

mod batch;
pub mod bench;
mod cancel;
mod copy;
mod dashboard;
mod error;
mod finish;
mod follow;
mod insert;
mod journal;
mod outbox;
#[path = "postgres/mod.rs"]
mod postgres_driver;
mod reads;
mod review;
pub(crate) mod sql;
mod sqlite;
mod state;
mod tasks;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::task::{self, NewTask, RunOutcome, State, Task, TaskError};
pub use crate::task::{ClaimedTask, Lease};
pub use copy::CopyReport;
pub use dashboard::{
    AgentEvent, ChainNode, MAX_CHAIN_NODES, ModelCharge, StateWriteRow, TEXT_SEARCH_WINDOW,
    TaskPage, TaskQuery,
};
pub use error::{QueueError, Result};
use error::{in_batch, with_claim_tokens};
pub use follow::{GAP_WAIT, TrailCursor};
pub use insert::MAX_CHAIN_TASKS;
pub use journal::{ChainBudget, ModelCallRow, SpendRow, TaskUsage};
pub use outbox::{Delivery, EffectRow};
pub use reads::HeldLeases;
pub use review::MAX_NOTE_BYTES;
pub use sqlite::ANOTHER_DB;
pub use sqlite::FileId;
pub use sqlite::refuse_what_is_not_a_queue as refuse_sqlite_file_not_a_queue;
pub use sqlite::schema_version as sqlite_schema_version;
pub use state::check_operator_write;
pub use tasks::StaleGuard;
pub use validate::validate_agent_name;

use postgres_driver::PgDb;
pub use postgres_driver::WorkListener;
pub use postgres_driver::redact as redact_url;
pub use postgres_driver::split_credentials as split_url_credentials;
use sql::Sql;
use sqlite::SqliteDb;

mod types;
pub use types::*;

enum Db {
    Sqlite(SqliteDb),
    Postgres(PgDb),
}

/// A handle on one queue database. Not shared between threads: open one per
/// worker thread or guard it with a mutex.
pub struct Queue {
    db: Db,
    opts: QueueOptions,
}

/// Says that a database was brought from schema version `from` to `to`
/// (a new one, from 0, is no news): it happened on opening it, whatever
/// the command, and builds older than this one cannot open it after.
pub(crate) fn note_schema_upgrade(location: &str, from: u32, to: u32) {
    if from > 0 && from < to {
        tracing::warn!(
            "database {location}: upgraded from schema version {from} to {to}; colony builds older than this one cannot open it now"
        );
    }
}

impl Queue {
    /// Opens (creating and migrating if needed) the queue at `location` — a
    /// SQLite path, `sqlite:PATH`, or a `postgres://` URL — with default options.
    pub fn open(location: impl AsRef<Path>) -> Result<Queue> {
        Queue::open_with(location, QueueOptions::default())
    }

    pub fn open_with(location: impl AsRef<Path>, opts: QueueOptions) -> Result<Queue> {
        let db = match Location::of(location.as_ref()) {
            Location::Sqlite(path) => Db::Sqlite(SqliteDb::open(&path, &opts)?),
            Location::Postgres(url) => Db::Postgres(PgDb::connect(&url, &opts)?),
        };
        Ok(Queue { db, opts })
    }

    /// Opens further connections to the same database with the same options
    /// (for work that must not wait for this connection's user, like the
    /// model journal of runs in flight).
    pub fn reopener(&self) -> impl Fn() -> Result<Queue> + Send + std::marker::Sync + 'static {
        let location = match &self.db {
            Db::Sqlite(db) => db.path().to_path_buf(),
            Db::Postgres(db) => PathBuf::from(db.url()),
        };
        let opts = QueueOptions {
            must_exist: true,
            same_file: self.database_file(),
            ..self.opts.clone()
        };
        move || Queue::open_with(&location, opts.clone())
    }

    /// The SQLite file this connection opened; `None` on
    /// PostgreSQL.
    pub fn database_file(&self) -> Option<FileId> {
        match &self.db {
            Db::Sqlite(db) => db.file(),
            Db::Postgres(_) => None,
        }
    }

    /// SQLite's `PRAGMA synchronous` on this connection (1 NORMAL, 2 FULL);
    /// `None` on PostgreSQL. For the tests that `--sync` reaches it.
    pub fn sqlite_synchronous(&self) -> Option<i64> {
        match &self.db {
            Db::Sqlite(db) => db.synchronous().ok(),
            Db::Postgres(_) => None,
        }
    }

    /// Fails when the SQLite file this connection has open was deleted or
    /// replaced since: a connection keeps writing to a deleted file, where
    /// no other command will ever read it. A `stat`; nothing on PostgreSQL.
    pub fn check_database_file(&self) -> Result<()> {
        match &self.db {
            Db::Sqlite(db) => db.check_file(),
            Db::Postgres(_) => Ok(()),
        }
    }

    /// On SQLite, this connection and those [`Queue::reopener`] opens from
    /// now on leave WAL checkpoints to a thread of their own, so the commit
    /// that fills the WAL does not also copy it into the database file (the
    /// daemon's writer, which every run waits on). Nothing on PostgreSQL.
    pub fn checkpoint_in_background(&mut self) -> Result<()> {
        if let Db::Sqlite(db) = &mut self.db {
            db.checkpoint_in_background()?;
            self.opts.background_checkpoints = true;
        }
        Ok(())
    }

    /// Acts as someone else from now on (the dashboard acts for whoever
    /// signed in, over connections it keeps open).
    pub fn set_actor(&mut self, actor: &str) {
        self.opts.actor = actor.to_string();
    }

    pub fn actor(&self) -> &str {
        &self.opts.actor
    }

    /// True on PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    /// Where the queue lives, for messages (a URL without its password).
    pub fn location(&self) -> String {
        match &self.db {
            Db::Sqlite(db) => db.path().display().to_string(),
            Db::Postgres(db) => db.location().to_string(),
        }
    }

    /// One write transaction. `now` is the clock decisions use: this host's
    /// on SQLite, the server's on PostgreSQL (so hosts with skewed clocks
    /// agree on due times and lease expiry). `f` may run more than once
    /// (PostgreSQL retries a serialization failure), so it keeps its effects
    /// inside the transaction.
    pub(crate) fn write<T>(&self, mut f: impl FnMut(&dyn Sql, i64) -> Result<T>) -> Result<T> {
        match &self.db {
            Db::Sqlite(db) => db.write(&mut f),
            Db::Postgres(db) => db.write(&mut f),
        }
    }

    pub(crate) fn read<T>(&self, mut f: impl FnMut(&dyn Sql) -> Result<T>) -> Result<T> {
        match &self.db {
            Db::Sqlite(db) => db.read(&mut f),
            Db::Postgres(db) => db.read(&mut f),
        }
    }

    /// Whether this connection can write tasks now: the server reachable,
    /// and no lock in the way past the busy timeout. SQLite's `BEGIN
    /// IMMEDIATE` takes the write lock itself; on PostgreSQL the lock a
    /// row write would take on `tasks` is asked for (a migration or a
    /// `VACUUM FULL` holding the table makes it wait, as a heartbeat would).
    pub fn check_writable(&self) -> Result<()> {
        self.write(|tx, _| {
            if tx.dialect() == sql::Dialect::Postgres {
                tx.execute("LOCK TABLE tasks IN ROW EXCLUSIVE MODE", &[])?;
            }
            Ok(())
        })
    }

    /// Makes this connection's claims (and those of connections
    /// [`Queue::reopener`] opens from it) promise to renew their leases
    /// within `lease`: a daemon passes its `stale_after`.
    pub fn set_claim_lease(&mut self, lease: Duration) {
        self.opts.claim_lease = Some(lease);
    }

    fn claim_lease_ms(&self) -> Option<i64> {
        self.opts
            .claim_lease
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }

    /// The clock the queue decides by (see [`Queue::write`]).
    pub fn now(&self) -> Result<i64> {
        match &self.db {
            Db::Sqlite(_) => Ok(now_ms()),
            Db::Postgres(db) => db.now(),
        }
    }

    /// A number that changes whenever another connection committed (SQLite's
    /// `PRAGMA data_version`): a cheap way to notice new work without a
    /// query. On PostgreSQL it changes only when the connection was reopened;
    /// new work there is pushed to [`Queue::listen_for_work`].
    pub fn data_version(&self) -> Result<i64> {
        match &self.db {
            Db::Sqlite(db) => db.data_version(),
            Db::Postgres(db) => db.wake_version(),
        }
    }

    /// On PostgreSQL, calls `on_work` from a thread of its own the moment
    /// another connection commits runnable work (`LISTEN colony_work`),
    /// until the answer is dropped. `None` on SQLite, where
    /// [`Queue::data_version`] is the (cheap, local) way to notice.
    pub fn listen_for_work(&self, on_work: Box<dyn Fn() + Send>) -> Result<Option<WorkListener>> {
        match &self.db {
            Db::Sqlite(_) => Ok(None),
            Db::Postgres(db) => db.listen(on_work).map(Some),
        }
    }

    // ----- submit ---------------------------------------------------------

    /// Validates and stores one task. With an idempotency key that already
    /// exists, returns the existing task's id and stores nothing.
    pub fn submit(&mut self, new: &NewTask) -> Result<Submitted> {
        validate::validate_new_task(new, self.opts.max_payload_bytes)?;
        self.write(|tx, now| insert::insert_new_task(tx, new, None, &self.opts.actor, now))
    }

    /// Stores all tasks or none, in one transaction. A bad task is reported
    /// with its index ([`QueueError::InvalidInBatch`]).
    pub fn submit_batch(&mut self, batch: &[NewTask]) -> Result<Vec<Submitted>> {
        validate::check_batch(batch, self.opts.max_payload_bytes)?;
        self.write(|tx, now| insert::insert_new_tasks(tx, batch, &self.opts.actor, now))
    }

    // ----- the run cycle --------------------------------------------------

    /// Moves every pending task whose dependencies are complete and whose
    /// `run_at` has passed to `ready`. Returns how many moved.
    pub fn promote_due(&mut self) -> Result<usize> {
        self.write(|tx, now| tasks::promote_due_in(tx, &self.opts.actor, now))
    }

    /// Claims up to `n` ready tasks of `agent`, highest priority first, in one
    /// transaction: each gets `attempts + 1`, the batch's fresh claim token and
    /// a lease held by this queue's actor.
    pub fn claim(&mut self, agent: &str, n: usize) -> Result<Vec<ClaimedTask>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let lease_ms = self.claim_lease_ms();
        let token = tasks::new_claim_token();
        self.write(|tx, now| tasks::claim_in(tx, agent, n, token, lease_ms, &self.opts.actor, now))
            .map_err(|e| with_claim_tokens(e, vec![token]))
    }

    /// Renews the given leases in one write. Returns those that were lost
    /// (the task was reset, cancelled or re-claimed): their runs should stop.
    pub fn heartbeat(&mut self, leases: &[Lease]) -> Result<Vec<Lease>> {
        self.write(|tx, now| tasks::heartbeat_in(tx, leases, now))
    }

    /// Records an agent's progress text and renews its lease.
    pub fn record_progress(&mut self, lease: Lease, progress: Option<&str>) -> Result<Applied> {
        let n = self.write(|tx, now| {
            tx.execute(
                "UPDATE tasks SET heartbeat_at = ?1, progress = ?2
                 WHERE id = ?3 AND state = 'in_progress' AND claim_token = ?4",
                sql::args![now, progress, lease.task_id, lease.token],
            )
        })?;
        Ok(if n == 0 {
            Applied::LeaseLost
        } else {
            Applied::Moved(State::InProgress)
        })
    }

    /// Records how one run ended. See [`Queue::finish_batch`].
    pub fn finish(&mut self, lease: Lease, outcome: RunOutcome, log: &str) -> Result<Applied> {
        let run = FinishedRun {
            lease,
            outcome,
            log: log.to_string(),
            state: Vec::new(),
            effects: Vec::new(),
            claimed: None,
        };
        Ok(self.finish_batch(std::slice::from_ref(&run))?[0])
    }

    /// Records many finished runs in one transaction (the throughput path).
    /// Success completes the task (or sends it to review) and inserts its
    /// children in the same transaction; a failure retries with backoff while
    /// attempts remain and is retryable, else fails the task for good.
    pub fn finish_batch(&mut self, runs: &[FinishedRun]) -> Result<Vec<Applied>> {
        let max_payload = self.opts.max_payload_bytes;
        self.write(|tx, now| {
            batch::finish_runs(tx, runs, &self.opts.actor, max_payload, now).map(|f| f.applied)
        })
    }

    /// The daemon's hot path as one transaction: records `runs` (as
    /// [`Queue::finish_batch`]), then, when `claims` asks for any, promotes
    /// due tasks (as [`Queue::promote_due`]) and claims up to `n` tasks of
    /// each `(agent, n)` (as [`Queue::claim`]). Answers the runs' outcomes in order and
    /// the tasks claimed for each agent, in the order of `claims`.
    ///
    /// One commit instead of two: a completion and the next claims touch the
    /// same pages of `tasks` and its indexes, which SQLite then writes to its
    /// log once.
    pub fn finish_and_claim(
        &mut self,
        runs: &[FinishedRun],
        claims: &[(String, usize)],
    ) -> Result<FinishedAndClaimed> {
        self.finish_and_claim_sharing(runs, claims, claims.len(), 0)
    }

    /// As [`Queue::finish_and_claim`], with the claims from `shared_from` on
    /// sharing `slots`: they take up to their `n` each, in order, and at most
    /// `slots` tasks among them. A daemon's free slots, shared by agents it
    /// claims no further ahead for: an agent with nothing ready leaves them
    /// to the next, and together they never take more than can start.
    pub fn finish_and_claim_sharing(
        &mut self,
        runs: &[FinishedRun],
        claims: &[(String, usize)],
        shared_from: usize,
        slots: usize,
    ) -> Result<FinishedAndClaimed> {
        let max_payload = self.opts.max_payload_bytes;
        let lease_ms = self.claim_lease_ms();
        // Drawn before the transaction, so that if its commit cannot be
        // confirmed the caller can give back whatever these claimed.
        let tokens: Vec<i64> = claims.iter().map(|_| tasks::new_claim_token()).collect();
        self.write(|tx, now| {
            let actor = &self.opts.actor;
            let finished = match runs.is_empty() {
                true => batch::Finished::default(),
                false => batch::finish_runs(tx, runs, actor, max_payload, now)?,
            };
            let mut claimed = Vec::with_capacity(claims.len());
            if claims.iter().any(|(_, n)| *n > 0) {
                tasks::promote_due_in(tx, actor, now)?;
            }
            let mut slots_left = slots;
            for (i, ((agent, n), token)) in claims.iter().zip(&tokens).enumerate() {
                let n = match i >= shared_from {
                    true => (*n).min(slots_left),
                    false => *n,
                };
                let tasks = match n {
                    0 => Vec::new(),
                    _ => tasks::claim_in(tx, agent, n, *token, lease_ms, actor, now)?,
                };
                if i >= shared_from {
                    slots_left -= tasks.len();
                }
                claimed.push(tasks);
            }
            Ok(FinishedAndClaimed {
                applied: finished.applied,
                claimed,
                effects_may_be_due: finished.took_per_run_path,
            })
        })
        .map_err(|e| with_claim_tokens(e, tokens))
    }

    /// Gives back, unstarted, the tasks claimed under `tokens` in a
    /// transaction whose commit could not be confirmed
    /// ([`QueueError::CommitUnknown`]): if it did commit, they sit in
    /// `in_progress` with no run, until a lease reset would spend their
    /// attempt. Returns the ids given back (none when it did not commit).
    pub fn release_unconfirmed_claims(&mut self, tokens: &[i64]) -> Result<Vec<i64>> {
        self.write(|tx, now| tasks::release_unconfirmed_in(tx, tokens, &self.opts.actor, now))
    }

    /// Gives a claimed task back without burning its attempt (graceful shutdown).
    pub fn release(&mut self, lease: Lease) -> Result<Applied> {
        self.write(|tx, now| tasks::release_in(tx, lease, true, &self.opts.actor, now))
    }

    /// Gives back a task claimed ahead whose run never started (a daemon's
    /// buffer at shutdown, or of an agent it unloaded): as `release`, the
    /// event marked as no run.
    pub fn release_unstarted(&mut self, lease: Lease) -> Result<Applied> {
        self.write(|tx, now| tasks::release_in(tx, lease, false, &self.opts.actor, now))
    }

    /// Resets every lease whose last heartbeat is older than `stale_after`:
    /// back to `ready` (the attempt stays counted), or `failed` with kind
    /// `lease_expired` when no attempts remain. Safe to run from every host.
    pub fn reset_stale_leases(&mut self, stale_after: Duration) -> Result<Vec<ExpiredLease>> {
        self.reset_stale_leases_guarded(stale_after, StaleGuard::default())
    }

    /// [`Queue::reset_stale_leases`], sparing leases their holders could
    /// not renew (see [`StaleGuard`]): a reset that waited past the guard's
    /// deadline for a lock or the server waited through a stall that kept
    /// every holder from renewing.
    pub fn reset_stale_leases_guarded(
        &mut self,
        stale_after: Duration,
        guard: StaleGuard,
    ) -> Result<Vec<ExpiredLease>> {
        self.write(|tx, now| {
            let cutoff = now - stale_after.as_millis() as i64;
            tasks::reset_stale_in(tx, cutoff, guard, &self.opts.actor, now)
        })
    }

    // ----- review, retry, cancel -----------------------------------------

    /// Approves a task waiting in review: it completes and its children are
    /// inserted. Its reviewer tasks still to answer are cancelled.
    pub fn approve(&mut self, id: i64, note: Option<&str>) -> Result<State> {
        self.approve_round(id, note, None)
    }

    /// As [`Queue::approve`], refused (`NotNow`) unless the task is still
    /// in review `round` (see [`Queue::review_round`]), when one is given:
    /// the round its approver read.
    pub fn approve_round(
        &mut self,
        id: i64,
        note: Option<&str>,
        round: Option<i64>,
    ) -> Result<State> {
        review::check_note("note", note.unwrap_or(""))?;
        let (to, newest) = self.write(|tx, now| {
            review::check_round(tx, id, round)?;
            let to = review::approve_in(tx, id, note, &self.opts.actor, now)?;
            review::cancel_reviewers_of_decided(tx, id, &self.opts.actor, now)?;
            Ok((to, cancel::newest_reviewer(tx, id)?))
        })?;
        let why = review::decided_first(&self.opts.actor, id);
        self.cancel_reviewers_left(id, newest, &why);
        Ok(to)
    }

    /// Rejects a task waiting in review: back to `ready` with the note as the
    /// next run's feedback, or `failed` once `max_revisions` rejections are
    /// used. Its reviewer tasks still to answer are cancelled.
    pub fn reject(&mut self, id: i64, note: &str) -> Result<State> {
        self.reject_round(id, note, None)
    }

    /// As [`Queue::reject`], refused unless the task is still in review
    /// `round`, when one is given (see [`Queue::approve_round`]).
    pub fn reject_round(&mut self, id: i64, note: &str, round: Option<i64>) -> Result<State> {
        review::check_note("note", note)?;
        let note = match note.trim() {
            "" => "rejected without a note",
            _ => note,
        };
        let (to, newest) = self.write(|tx, now| {
            review::check_round(tx, id, round)?;
            let to = review::reject_in(tx, id, note, &self.opts.actor, now)?;
            review::cancel_reviewers_of_decided(tx, id, &self.opts.actor, now)?;
            Ok((to, cancel::newest_reviewer(tx, id)?))
        })?;
        let why = review::decided_first(&self.opts.actor, id);
        self.cancel_reviewers_left(id, newest, &why);
        Ok(to)
    }

    /// After a decision on `judged` (or its cancel) is committed: cancels
    /// its reviewer tasks up to `newest` that the decision skipped because
    /// another transaction held their rows (PostgreSQL; see
    /// [`cancel::cancel_pending_reviewers`]), trying for half a second.
    /// Returns the ids cancelled. The decision stands whatever happens here;
    /// a reviewer left running has its verdict ignored.
    fn cancel_reviewers_left(&mut self, judged: i64, newest: Option<i64>, why: &str) -> Vec<i64> {
        let mut cancelled = Vec::new();
        let Some(newest) = newest else {
            return cancelled;
        };
        let actor = self.opts.actor.clone();
        for _ in 0..10 {
            let tried = self.write(|tx, now| {
                cancel::cancel_pending_reviewers(tx, judged, newest, why, &actor, now)
            });
            match tried {
                Ok((ids, skipped)) => {
                    cancelled.extend(ids);
                    if !skipped {
                        return cancelled;
                    }
                }
                Err(e) if e.is_transient() => {}
                Err(e) => {
                    tracing::warn!(
                        task = judged,
                        "could not cancel its reviewer tasks after the decision (their verdicts will be ignored): {e}"
                    );
                    return cancelled;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::warn!(
            task = judged,
            "a reviewer task of it still runs after the decision: another transaction held its row throughout (its verdict will be ignored)"
        );
        cancelled
    }

    /// Revives a failed or cancelled task with attempts reset: `ready`, or
    /// `pending` while some of its dependencies have not completed. Refused
    /// when a dependency failed or was cancelled (retry that one first).
    pub fn retry(&mut self, id: i64) -> Result<State> {
        self.retry_with_token_budget(id, None)
    }

    /// [`Queue::retry`], first giving the task's chain a token budget of
    /// `token_budget` tokens (more than it has spent), in the same
    /// transaction: a task that failed on its budget would fail on it again.
    pub fn retry_with_token_budget(&mut self, id: i64, token_budget: Option<u64>) -> Result<State> {
        self.write(|tx, now| tasks::retry_in(tx, id, token_budget, &self.opts.actor, now))
    }

    /// Cancels a task that has not finished, and every task that depends on
    /// it. A running task's claim is voided at once, so its outcome is
    /// discarded when the run ends. Returns the ids cancelled.
    pub fn cancel(&mut self, id: i64, reason: &str) -> Result<Vec<i64>> {
        review::check_note("reason", reason)?;
        let (cancelled, newest) = self.write(|tx, now| {
            let cancelled = cancel::cancel_in(tx, id, reason, &self.opts.actor, now)?;
            Ok((cancelled, cancel::newest_reviewer(tx, id)?))
        })?;
        let mut cancelled = cancelled;
        cancelled.extend(self.cancel_reviewers_left(id, newest, &cancel::judged_cancelled(id)));
        Ok(cancelled)
    }

    // ----- reading --------------------------------------------------------

    pub fn get(&self, id: i64) -> Result<Task> {
        self.read(|db| reads::get(db, id))
    }

    /// Tasks, newest first. A row that cannot be decoded is returned as an
    /// [`UnreadableTask`] in its place.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRow>> {
        self.read(|db| reads::list(db, filter))
    }

    /// The round of review task `id` waits in: the id of the event that
    /// put it there, `None` when it is not in review. A rejected task that
    /// comes back, or a stale approval sent round again, is in a new round
    /// with a new result: a decision made on what an earlier one showed
    /// names its round and is refused in another.
    pub fn review_round(&self, id: i64) -> Result<Option<i64>> {
        self.read(|db| review::review_round(db, id))
    }

    /// The tasks task `id`'s run spawned, held while it waits in review
    /// (created if approved), in the order the run spawned them; none once
    /// it left review otherwise (cancelled: they will never exist).
    pub fn held_children(&self, id: i64) -> Result<Vec<crate::task::NextSpec>> {
        self.read(|db| {
            let state: Option<String> =
                db.query_value("SELECT state FROM tasks WHERE id = ?1", sql::args![id])?;
            match state.as_deref() {
                Some("review") => review::held_children(db, id),
                _ => Ok(Vec::new()),
            }
        })
    }

    /// The children of a task (from chains and spawns), oldest first.
    pub fn children(&self, parent_id: i64) -> Result<Vec<TaskRow>> {
        self.read(|db| reads::children(db, parent_id))
    }

    /// The tasks that depend on `id` (`--after`) and stand cancelled: a
    /// cancel takes its dependents down with it, and a retry does not bring
    /// them back.
    pub fn cancelled_dependents(&self, id: i64) -> Result<Vec<i64>> {
        self.read(|db| {
            db.query_column(
                "SELECT t.id FROM task_deps d JOIN tasks t ON t.id = d.task_id
                 WHERE d.depends_on = ?1 AND t.state = 'cancelled' ORDER BY t.id",
                sql::args![id],
            )
        })
    }

    /// How many tasks each agent has in each state: `(agent, state, count)`.
    pub fn counts(&self) -> Result<Vec<(String, State, u64)>> {
        self.read(reads::counts)
    }

    /// Unfinished work per agent, read through the partial indexes only (cheap
    /// however large the history).
    pub fn backlog(&self) -> Result<Vec<(String, Backlog)>> {
        self.read(reads::backlog)
    }

    /// Those of `leases` whose claim no longer holds (the task cancelled,
    /// reset or claimed again since): a daemon's check of the tasks it
    /// claimed ahead, before it starts them.
    pub fn voided_claims(&self, leases: &[Lease]) -> Result<Vec<Lease>> {
        self.read(|db| reads::voided_claims(db, leases))
    }

    /// Leases currently held, by holder: `(holder, count)`.
    pub fn leases_by_holder(&self) -> Result<Vec<HeldLeases>> {
        let now = self.now()?;
        self.read(|db| reads::leases_by_holder(db, now))
    }

    /// Leases not stale at `now` (queue clock, ms) by their holder's own
    /// `--stale-after` (60 s when it recorded none), by holder: daemons that
    /// are most likely alive and running those tasks.
    pub fn live_leases(&self, now: i64) -> Result<Vec<(String, u64)>> {
        let held = self.read(|db| reads::leases_by_holder(db, now))?;
        Ok(held
            .into_iter()
            .filter(|h| h.count > h.stale)
            .map(|h| (h.holder, h.count - h.stale))
            .collect())
    }

    /// The earliest `run_at` of a pending task that waits only for its time.
    pub fn next_due_at(&self) -> Result<Option<i64>> {
        self.read(|db| {
            db.query_value(
                "SELECT MIN(run_at) FROM tasks WHERE state = 'pending' AND pending_deps = 0",
                sql::args![],
            )
        })
    }

    /// When the task that has been ready longest became ready, if any.
    pub fn oldest_ready_at(&self) -> Result<Option<i64>> {
        self.read(|db| {
            db.query_value(
                // A ready task's row changes only as it becomes ready: a
                // retried or delayed task waits from then, not from its
                // creation (a retry of a task made 12 minutes before said
                // it had waited 12 minutes).
                "SELECT MIN(updated_at) FROM tasks WHERE state = 'ready'",
                sql::args![],
            )
        })
    }

    /// Audit events with id greater than `since`, oldest first, optionally for one task.
    pub fn events(&self, task_id: Option<i64>, since: i64, limit: u32) -> Result<Vec<AuditEvent>> {
        self.read(|db| reads::events(db, task_id, since, limit))
    }

    /// The stored logs of a task's runs, oldest first.
    pub fn logs(&self, task_id: i64) -> Result<Vec<RunLog>> {
        self.read(|db| reads::logs(db, task_id))
    }
}
