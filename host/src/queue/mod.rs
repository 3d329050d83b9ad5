//! The durable queue: the schema, every SQL statement, and the audit trail.
//!
//! Every operation is one SQLite transaction that asks [`crate::task::transition`]
//! before it moves a task and writes an audit event beside the move. Writes
//! about a claimed task are fenced on `(id, state = 'in_progress', claim_token)`,
//! so a host that lost its lease changes nothing (it is told so instead).
//!
//! SQLite allows one writer at a time; that lock is what makes a claim atomic.
//! Throughput comes from batching: `claim` takes up to `n` tasks in one
//! transaction and `finish_batch` records many runs in one.

mod journal;
mod outbox;
mod schema;
mod state;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use serde_json::json;

use crate::retry;
use crate::task::{
    self, ErrorKind, Event, NewTask, NextSpec, RunOutcome, SpawnSpec, State, Task, TaskError,
};
pub use crate::task::{ClaimedTask, Lease};
pub use journal::{ModelCallRow, SpendRow, TaskUsage};
pub use outbox::{Delivery, EffectRow};

/// Errors from the queue. Bad input is refused before anything is stored.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("task #{} of the batch: {source}", index + 1)]
    InvalidInBatch {
        index: usize,
        #[source]
        source: Box<QueueError>,
    },
    #[error("task {0} does not exist")]
    NotFound(i64),
    #[error("task {id} is {state}, so it cannot {action}")]
    Illegal {
        id: i64,
        state: State,
        action: &'static str,
    },
    #[error(
        "the database {path} has schema version {found}, newer than this colony knows ({known}); upgrade colony"
    )]
    SchemaTooNew {
        path: String,
        found: u32,
        known: u32,
    },
    #[error("the database holds data this colony cannot read: {0}")]
    Corrupt(String),
    // Not a `#[source]`: the message already carries it, and error chains
    // printed with `{:#}` would repeat it.
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for QueueError {
    fn from(e: rusqlite::Error) -> Self {
        QueueError::Sqlite(e)
    }
}

impl QueueError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> QueueError {
        QueueError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// True for trouble that may pass (the database busy or locked by
    /// another process, the disk full, an I/O error): retry the same write later.
    pub fn is_transient(&self) -> bool {
        use rusqlite::ErrorCode::*;
        match self {
            QueueError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                DatabaseBusy
                    | DatabaseLocked
                    | DiskFull
                    | SystemIoFailure
                    | OutOfMemory
                    | CannotOpen
            ),
            _ => false,
        }
    }

    /// True when retrying cannot help: the file is read-only or not a
    /// database, the disk image is malformed, or the schema is newer than
    /// this build. A daemon stops on these rather than spinning.
    pub fn is_permanent(&self) -> bool {
        use rusqlite::ErrorCode::*;
        match self {
            QueueError::SchemaTooNew { .. } => true,
            QueueError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                ReadOnly
                    | DatabaseCorrupt
                    | NotADatabase
                    | PermissionDenied
                    | AuthorizationForStatementDenied
            ),
            _ => false,
        }
    }

    /// True when the caller's input was at fault (and nothing was stored).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            QueueError::Invalid { .. }
                | QueueError::InvalidInBatch { .. }
                | QueueError::NotFound(_)
                | QueueError::Illegal { .. }
        )
    }
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// How hard SQLite works to make each commit durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    /// WAL + `synchronous=NORMAL`: a power cut may lose the last commits, never corrupt.
    Normal,
    /// `synchronous=FULL`: every commit is on disk before it returns.
    Full,
}

#[derive(Clone, Debug)]
pub struct QueueOptions {
    pub sync: Sync,
    /// How long a write waits for another process's lock before failing as busy.
    pub busy_timeout: Duration,
    pub max_payload_bytes: usize,
    /// Who this connection acts as: recorded as the actor of every event and
    /// as `claimed_by` on claims.
    pub actor: String,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            sync: Sync::Normal,
            busy_timeout: Duration::from_secs(5),
            max_payload_bytes: task::DEFAULT_MAX_PAYLOAD_BYTES,
            actor: format!("pid:{}", std::process::id()),
        }
    }
}

/// What a fenced write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The task moved to this state.
    Moved(State),
    /// The lease was reset, the task cancelled or re-claimed: nothing changed.
    LeaseLost,
}

/// The result of a submit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    pub id: i64,
    /// True when the idempotency key matched an existing task (nothing new stored).
    pub existed: bool,
}

/// One finished run, for [`Queue::finish_batch`].
#[derive(Clone, Debug)]
pub struct FinishedRun {
    pub lease: Lease,
    pub outcome: RunOutcome,
    /// The run's captured log (stdout, stderr, `log` calls); empty to store none.
    pub log: String,
    /// The run's state writes, committed only with a successful completion.
    pub state: Vec<crate::state::Write>,
    /// The run's effects, stored in the outbox only with a successful completion.
    pub effects: Vec<crate::effects::Effect>,
}

/// A lease the reaper reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiredLease {
    pub task_id: i64,
    pub holder: String,
    pub to: State,
}

/// An audit event.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AuditEvent {
    pub id: i64,
    pub at: i64,
    pub task_id: i64,
    pub event: String,
    pub from: Option<State>,
    pub to: State,
    pub actor: String,
    pub detail: serde_json::Value,
}

/// A stored task row this build cannot decode (written by an older or
/// damaged build): listed with its id and the reason instead of failing
/// the listing of every other task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadableTask {
    pub id: i64,
    pub reason: String,
}

/// One row of a listing: a task, or why it cannot be read.
pub type TaskRow = std::result::Result<Task, UnreadableTask>;

/// The tasks of a listing, or an error naming the first unreadable row: for
/// callers (the demo, the torture verdict) that cannot work around a hole.
pub fn all_readable(rows: Vec<TaskRow>) -> Result<Vec<Task>> {
    rows.into_iter()
        .map(|row| row.map_err(|bad| QueueError::Corrupt(bad.reason)))
        .collect()
}

/// One stored run log.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RunLog {
    pub attempt: u32,
    pub at: i64,
    pub text: String,
}

/// Filters for [`Queue::list`].
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub state: Option<State>,
    pub agent: Option<String>,
    pub limit: Option<u32>,
}

/// Unfinished work for one agent, as the daemon's idle check needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Pending tasks waiting only for their `run_at` (a schedule or a retry backoff).
    pub scheduled: u64,
    /// Pending tasks waiting for dependencies.
    pub blocked: u64,
    pub ready: u64,
    pub in_progress: u64,
    /// The earliest `run_at` among the scheduled tasks.
    pub next_due: Option<i64>,
}

/// The largest `output` a run may return. It is stored, passed to children as
/// `parent-result` and to reviewers, so it is bounded like a payload, more loosely.
pub const MAX_OUTPUT_BYTES: usize = 8 * 1024 * 1024;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The claim token of the run ending now, when it journaled model calls
/// (the next run replays them), or else the journal kept so far: a run that
/// never called a model (say, released before it started) must not make the
/// next one pay again for an older run's calls.
const REPLAY_FROM_THIS_RUN: &str = "CASE WHEN EXISTS (SELECT 1 FROM model_calls
         WHERE task_id = tasks.id AND token = tasks.claim_token) THEN claim_token ELSE replay_token END";

/// The columns [`task_from_row`] reads, in order.
const TASK_COLUMNS: &str = "id, agent, state, payload, priority, attempts, max_attempts, revisions, \
     max_revisions, review, reviewer, reviews, parent_id, next_tasks, result, error_kind, \
     error_message, feedback, progress, idem_key, timeout_ms, backoff_ms, run_at, claimed_by, \
     heartbeat_at, created_at, updated_at, finished_at";

/// A handle on one queue database. Not shared between threads: open one per
/// worker thread or guard it with a mutex.
pub struct Queue {
    conn: Connection,
    opts: QueueOptions,
}

impl Queue {
    /// Opens (creating if needed) the queue at `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Queue> {
        Queue::open_with(path, QueueOptions::default())
    }

    pub fn open_with(path: impl AsRef<Path>, opts: QueueOptions) -> Result<Queue> {
        let path = path.as_ref();
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(opts.busy_timeout)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match opts.sync {
            Sync::Normal => "NORMAL",
            Sync::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.set_prepared_statement_cache_capacity(64);
        schema::migrate(&mut conn, &path.display().to_string())?;
        Ok(Queue { conn, opts })
    }

    /// Opens further connections to the same database with the same options
    /// (for work that must not wait for this connection's user, like the
    /// model journal of runs in flight).
    pub fn reopener(&self) -> impl Fn() -> Result<Queue> + Send + std::marker::Sync + 'static {
        let path = self.conn.path().unwrap_or_default().to_string();
        let opts = self.opts.clone();
        move || Queue::open_with(&path, opts.clone())
    }

    pub fn actor(&self) -> &str {
        &self.opts.actor
    }

    /// Caps the database file at `pages` pages (`PRAGMA max_page_count`):
    /// used to rehearse a full disk.
    pub fn set_max_page_count(&self, pages: i64) -> Result<()> {
        self.conn.pragma_update(None, "max_page_count", pages)?;
        Ok(())
    }

    fn write(&mut self) -> Result<Transaction<'_>> {
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }

    /// A number that changes whenever another connection (another process,
    /// say the CLI) commits to the database: a cheap way to notice new work.
    pub fn data_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    // ----- submit ---------------------------------------------------------

    /// Validates and stores one task. With an idempotency key that already
    /// exists, returns the existing task's id and stores nothing.
    pub fn submit(&mut self, new: &NewTask) -> Result<Submitted> {
        let max_payload = self.opts.max_payload_bytes;
        validate_new_task(new, max_payload)?;
        let actor = self.opts.actor.clone();
        let tx = self.write()?;
        let submitted = insert_new_task(&tx, new, None, &actor, now_ms())?;
        tx.commit()?;
        Ok(submitted)
    }

    /// Stores all tasks or none, in one transaction. A bad task is reported
    /// with its index ([`QueueError::InvalidInBatch`]).
    pub fn submit_batch(&mut self, tasks: &[NewTask]) -> Result<Vec<Submitted>> {
        let max_payload = self.opts.max_payload_bytes;
        for (index, new) in tasks.iter().enumerate() {
            validate_new_task(new, max_payload).map_err(|e| in_batch(index, e))?;
        }
        let actor = self.opts.actor.clone();
        let now = now_ms();
        let tx = self.write()?;
        let mut out = Vec::with_capacity(tasks.len());
        for (index, new) in tasks.iter().enumerate() {
            out.push(insert_new_task(&tx, new, None, &actor, now).map_err(|e| in_batch(index, e))?);
        }
        tx.commit()?;
        Ok(out)
    }

    // ----- the run cycle --------------------------------------------------

    /// Moves every pending task whose dependencies are complete and whose
    /// `run_at` has passed to `ready`. Returns how many moved.
    pub fn promote_due(&mut self) -> Result<usize> {
        let actor = self.opts.actor.clone();
        let tx = self.write()?;
        let n = promote_due_in(&tx, &actor, now_ms())?;
        tx.commit()?;
        Ok(n)
    }

    /// Claims up to `n` ready tasks of `agent`, highest priority first, in one
    /// transaction: each gets `attempts + 1`, the batch's fresh claim token and
    /// a lease held by this queue's actor.
    pub fn claim(&mut self, agent: &str, n: usize) -> Result<Vec<ClaimedTask>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let actor = self.opts.actor.clone();
        let now = now_ms();
        // One random token per batch: (id, token) is unique per claim, which is
        // all fencing needs, and it saves a random draw per task.
        let token = fastrand::i64(1..i64::MAX);
        let tx = self.write()?;
        let mut claimed = Vec::with_capacity(n);
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE tasks SET state = 'in_progress', attempts = attempts + 1, claim_token = ?1,
                        claimed_by = ?2, heartbeat_at = ?3, updated_at = ?3, progress = NULL
                 WHERE id IN (SELECT id FROM tasks WHERE state = 'ready' AND agent = ?4
                              ORDER BY priority DESC, id LIMIT ?5)
                 RETURNING id, payload, attempts, max_attempts, parent_id, feedback, timeout_ms",
            )?;
            let rows = stmt.query_map(params![token, actor, now, agent, n as i64], |r| {
                Ok((
                    ClaimedTask {
                        lease: Lease {
                            task_id: r.get(0)?,
                            token,
                        },
                        agent: agent.to_string(),
                        payload: r.get(1)?,
                        attempt: r.get(2)?,
                        max_attempts: r.get(3)?,
                        parent_result: None,
                        feedback: r.get(5)?,
                        timeout_ms: r.get::<_, Option<i64>>(6)?.map(|t| t as u64),
                    },
                    r.get::<_, Option<i64>>(4)?,
                ))
            })?;
            for row in rows {
                claimed.push(row?);
            }
        }
        let mut out = Vec::with_capacity(claimed.len());
        for (mut task, parent_id) in claimed {
            let detail = json!({"attempt": task.attempt, "holder": actor, "token": token});
            record(
                &tx,
                task.lease.task_id,
                Some(State::Ready),
                Event::Claim,
                &actor,
                &detail,
                now,
            )?;
            if let Some(parent) = parent_id {
                task.parent_result = tx
                    .prepare_cached("SELECT result FROM tasks WHERE id = ?1")?
                    .query_row([parent], |r| r.get(0))
                    .optional()?
                    .flatten();
            }
            out.push(task);
        }
        // RETURNING gives no order guarantee; hand tasks out in claim order.
        out.sort_by_key(|t| t.lease.task_id);
        tx.commit()?;
        Ok(out)
    }

    /// Renews the given leases in one write. Returns those that were lost
    /// (the task was reset, cancelled or re-claimed): their runs should stop.
    pub fn heartbeat(&mut self, leases: &[Lease]) -> Result<Vec<Lease>> {
        let now = now_ms();
        let tx = self.write()?;
        let mut lost = Vec::new();
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE tasks SET heartbeat_at = ?1
                 WHERE id = ?2 AND state = 'in_progress' AND claim_token = ?3",
            )?;
            for lease in leases {
                if stmt.execute(params![now, lease.task_id, lease.token])? == 0 {
                    lost.push(*lease);
                }
            }
        }
        tx.commit()?;
        Ok(lost)
    }

    /// Records an agent's progress text and renews its lease.
    pub fn record_progress(&mut self, lease: Lease, progress: Option<&str>) -> Result<Applied> {
        let n = self
            .conn
            .prepare_cached(
                "UPDATE tasks SET heartbeat_at = ?1, progress = ?2
             WHERE id = ?3 AND state = 'in_progress' AND claim_token = ?4",
            )?
            .execute(params![now_ms(), progress, lease.task_id, lease.token])?;
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
        };
        Ok(self.finish_batch(std::slice::from_ref(&run))?[0])
    }

    /// Records many finished runs in one transaction (the throughput path).
    /// Success completes the task (or sends it to review) and inserts its
    /// children in the same transaction; a failure retries with backoff while
    /// attempts remain and is retryable, else fails the task for good.
    pub fn finish_batch(&mut self, runs: &[FinishedRun]) -> Result<Vec<Applied>> {
        let actor = self.opts.actor.clone();
        let max_payload = self.opts.max_payload_bytes;
        let now = now_ms();
        let tx = self.write()?;
        let mut out = Vec::with_capacity(runs.len());
        for run in runs {
            out.push(finish_in(&tx, run, &actor, max_payload, now)?);
        }
        tx.commit()?;
        Ok(out)
    }

    /// Gives a claimed task back without burning its attempt (graceful shutdown).
    pub fn release(&mut self, lease: Lease) -> Result<Applied> {
        let actor = self.opts.actor.clone();
        let now = now_ms();
        let tx = self.write()?;
        let n = tx
            .prepare_cached(&format!(
                "UPDATE tasks SET state = 'ready', attempts = attempts - 1, claim_token = NULL,
                        replay_token = {REPLAY_FROM_THIS_RUN}, claimed_by = NULL, heartbeat_at = NULL,
                        updated_at = ?1
                 WHERE id = ?2 AND state = 'in_progress' AND claim_token = ?3"
            ))?
            .execute(params![now, lease.task_id, lease.token])?;
        if n == 0 {
            return Ok(Applied::LeaseLost);
        }
        let detail =
            json!({"reason": "the host shut down before the run ended; the attempt is given back"});
        let to = record(
            &tx,
            lease.task_id,
            Some(State::InProgress),
            Event::Release,
            &actor,
            &detail,
            now,
        )?;
        tx.commit()?;
        Ok(Applied::Moved(to))
    }

    /// Resets every lease whose last heartbeat is older than `stale_after`:
    /// back to `ready` (the attempt stays counted), or `failed` with kind
    /// `lease_expired` when no attempts remain. Safe to run from every host.
    pub fn reset_stale_leases(&mut self, stale_after: Duration) -> Result<Vec<ExpiredLease>> {
        let actor = self.opts.actor.clone();
        let now = now_ms();
        let cutoff = now - stale_after.as_millis() as i64;
        let tx = self.write()?;
        let stale: Vec<(i64, u32, u32, String, i64)> = tx
            .prepare_cached(
                "SELECT id, attempts, max_attempts, claimed_by, heartbeat_at FROM tasks
                 WHERE state = 'in_progress' AND heartbeat_at < ?1",
            )?
            .query_map([cutoff], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                    r.get(4)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(stale.len());
        for (id, attempts, max_attempts, holder, heartbeat_at) in stale {
            // The dead run's model-token reservations no longer count.
            tx.prepare_cached("DELETE FROM model_reservations WHERE task_id = ?1")?
                .execute([id])?;
            let silent_ms = now - heartbeat_at;
            let detail = json!({
                "holder": holder,
                "last_heartbeat_at": heartbeat_at,
                "silent_ms": silent_ms,
                "attempt": attempts,
            });
            let to = if attempts < max_attempts {
                let to = record(
                    &tx,
                    id,
                    Some(State::InProgress),
                    Event::LeaseExpired,
                    &actor,
                    &detail,
                    now,
                )?;
                tx.prepare_cached(&format!(
                    "UPDATE tasks SET state = 'ready', claim_token = NULL, replay_token = {REPLAY_FROM_THIS_RUN},
                            claimed_by = NULL, heartbeat_at = NULL, updated_at = ?1 WHERE id = ?2"
                ))?
                .execute(params![now, id])?;
                to
            } else {
                let error = TaskError {
                    kind: ErrorKind::LeaseExpired,
                    message: format!(
                        "the lease held by {holder} expired (no heartbeat for {silent_ms} ms) on the last of {max_attempts} attempts"
                    ),
                };
                let to = record(
                    &tx,
                    id,
                    Some(State::InProgress),
                    Event::LeaseExpiredFinal,
                    &actor,
                    &detail,
                    now,
                )?;
                tx.prepare_cached(&format!(
                    "UPDATE tasks SET replay_token = {REPLAY_FROM_THIS_RUN} WHERE id = ?1"
                ))?
                .execute([id])?;
                set_failed(&tx, id, &error, now)?;
                cancel_dependents(&tx, id, &actor, now)?;
                to
            };
            out.push(ExpiredLease {
                task_id: id,
                holder,
                to,
            });
        }
        tx.commit()?;
        Ok(out)
    }

    // ----- review, retry, cancel -----------------------------------------

    /// Approves a task waiting in review: it completes and its children are inserted.
    pub fn approve(&mut self, id: i64, note: Option<&str>) -> Result<State> {
        let actor = self.opts.actor.clone();
        let tx = self.write()?;
        let to = approve_in(&tx, id, note, &actor, now_ms())?;
        tx.commit()?;
        Ok(to)
    }

    /// Rejects a task waiting in review: back to `ready` with the note as the
    /// next run's feedback, or `failed` once `max_revisions` rejections are used.
    pub fn reject(&mut self, id: i64, note: &str) -> Result<State> {
        let actor = self.opts.actor.clone();
        let tx = self.write()?;
        let to = reject_in(&tx, id, note, &actor, now_ms())?;
        tx.commit()?;
        Ok(to)
    }

    /// Revives a failed or cancelled task with attempts reset: `ready`, or
    /// `pending` while some of its dependencies have not completed. Refused
    /// when a dependency failed or was cancelled (retry that one first).
    pub fn retry(&mut self, id: i64) -> Result<State> {
        let actor = self.opts.actor.clone();
        let now = now_ms();
        let tx = self.write()?;
        let from = state_of(&tx, id)?;
        let waiting = count_unfinished_dependencies(&tx, id)?;
        let event = if waiting > 0 {
            Event::RetryWaiting
        } else {
            Event::Retry
        };
        let detail = json!({"revived_from": from, "waiting_for": waiting});
        let to = record(&tx, id, Some(from), event, &actor, &detail, now)?;
        tx.prepare_cached(
            "UPDATE tasks SET state = ?1, attempts = 0, revisions = 0, pending_deps = ?2, error_kind = NULL,
                    error_message = NULL, finished_at = NULL, run_at = ?3, updated_at = ?3
             WHERE id = ?4",
        )?
        .execute(params![to.as_str(), waiting, now, id])?;
        tx.commit()?;
        Ok(to)
    }

    /// Cancels a task that has not finished, and every task that depends on
    /// it. A running task's claim is voided at once, so its outcome is
    /// discarded when the run ends. Returns the ids cancelled.
    pub fn cancel(&mut self, id: i64, reason: &str) -> Result<Vec<i64>> {
        let actor = self.opts.actor.clone();
        let now = now_ms();
        let tx = self.write()?;
        let from = state_of(&tx, id)?;
        if transition(Some(from), Event::Cancel).is_none() {
            return Err(QueueError::Illegal {
                id,
                state: from,
                action: "be cancelled (it has already finished)",
            });
        }
        let mut cancelled = vec![id];
        cancel_one(&tx, id, from, reason, &actor, now)?;
        cancelled.extend(cancel_dependents(&tx, id, &actor, now)?);
        tx.commit()?;
        Ok(cancelled)
    }

    // ----- reading --------------------------------------------------------

    pub fn get(&self, id: i64) -> Result<Task> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1");
        let mut task = self
            .conn
            .prepare_cached(&sql)?
            .query_row([id], task_from_row)
            .optional()?
            .ok_or(QueueError::NotFound(id))??;
        task.depends_on = self
            .conn
            .prepare_cached(
                "SELECT depends_on FROM task_deps WHERE task_id = ?1 ORDER BY depends_on",
            )?
            .query_map([id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(task)
    }

    /// Tasks, newest first. A row that cannot be decoded is returned as an
    /// [`UnreadableTask`] in its place.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRow>> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks
             WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR agent = ?2)
             ORDER BY id DESC LIMIT ?3"
        );
        let limit = filter.limit.map(i64::from).unwrap_or(-1);
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(
            params![filter.state.map(State::as_str), filter.agent, limit],
            task_row,
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The children of a task (from chains and spawns), oldest first.
    pub fn children(&self, parent_id: i64) -> Result<Vec<TaskRow>> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE parent_id = ?1 ORDER BY id");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([parent_id], task_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many tasks each agent has in each state: `(agent, state, count)`.
    pub fn counts(&self) -> Result<Vec<(String, State, u64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT agent, state, COUNT(*) FROM tasks GROUP BY agent, state ORDER BY agent, state",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (agent, state, n) = row?;
            out.push((agent, parse_state(&state)?, n as u64));
        }
        Ok(out)
    }

    /// Unfinished work per agent, read through the partial indexes only (cheap
    /// however large the history).
    pub fn backlog(&self) -> Result<Vec<(String, Backlog)>> {
        let mut by_agent: std::collections::BTreeMap<String, Backlog> = Default::default();
        let queries = [
            "SELECT agent, COUNT(*), NULL FROM tasks WHERE state = 'ready' GROUP BY agent",
            "SELECT agent, COUNT(*), NULL FROM tasks WHERE state = 'in_progress' GROUP BY agent",
            "SELECT agent, COUNT(*), MIN(run_at) FROM tasks
             WHERE state = 'pending' AND pending_deps = 0 GROUP BY agent",
            "SELECT agent, COUNT(*), NULL FROM tasks
             WHERE state = 'pending' AND pending_deps > 0 GROUP BY agent",
        ];
        for (i, sql) in queries.iter().enumerate() {
            let mut stmt = self.conn.prepare_cached(sql)?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, Option<i64>>(2)?,
                ))
            })?;
            for row in rows {
                let (agent, n, due) = row?;
                let b = by_agent.entry(agent).or_default();
                match i {
                    0 => b.ready = n,
                    1 => b.in_progress = n,
                    2 => {
                        b.scheduled = n;
                        b.next_due = due;
                    }
                    _ => b.blocked = n,
                }
            }
        }
        Ok(by_agent.into_iter().collect())
    }

    /// Leases currently held, by holder: `(holder, count)`.
    pub fn leases_by_holder(&self) -> Result<Vec<(String, u64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT claimed_by, COUNT(*) FROM tasks WHERE state = 'in_progress' GROUP BY claimed_by",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                r.get::<_, i64>(1)? as u64,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The earliest `run_at` of a pending task that waits only for its time.
    pub fn next_due_at(&self) -> Result<Option<i64>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT MIN(run_at) FROM tasks WHERE state = 'pending' AND pending_deps = 0",
            )?
            .query_row([], |r| r.get(0))?)
    }

    /// The `created_at` of the oldest ready task, if any.
    pub fn oldest_ready_at(&self) -> Result<Option<i64>> {
        Ok(self
            .conn
            .prepare_cached("SELECT MIN(created_at) FROM tasks WHERE state = 'ready'")?
            .query_row([], |r| r.get(0))?)
    }

    /// Audit events with id greater than `since`, oldest first, optionally for one task.
    pub fn events(&self, task_id: Option<i64>, since: i64, limit: u32) -> Result<Vec<AuditEvent>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, at, task_id, event, from_state, to_state, actor, detail FROM events
             WHERE id > ?1 AND (?2 IS NULL OR task_id = ?2) ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![since, task_id, limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, String>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at, task_id, event, from, to, actor, detail) = row?;
            out.push(AuditEvent {
                id,
                at,
                task_id,
                event,
                from: from.as_deref().map(parse_state).transpose()?,
                to: parse_state(&to)?,
                actor,
                detail: serde_json::from_str(&detail).unwrap_or_else(
                    |e| serde_json::json!({"unreadable": e.to_string(), "raw": detail}),
                ),
            });
        }
        Ok(out)
    }

    /// Milliseconds from each claim to the end of that run (the next event
    /// of the task), for tasks with id >= `first_id`. For benchmarks.
    pub fn claim_to_finish_ms(&self, first_id: i64) -> Result<Vec<i64>> {
        let mut stmt = self.conn.prepare(
            "SELECT (SELECT MIN(e2.at) FROM events e2 WHERE e2.task_id = e.task_id AND e2.id > e.id) - e.at
             FROM events e WHERE e.event = 'claim' AND e.task_id >= ?1",
        )?;
        let rows = stmt.query_map([first_id], |r| r.get::<_, Option<i64>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.extend(row?);
        }
        Ok(out)
    }

    /// Inserts `n` already-completed tasks (with their audit events), to
    /// measure that claiming stays fast as history grows. For benchmarks.
    pub fn seed_completed_history(&mut self, n: usize) -> Result<()> {
        let now = now_ms();
        let tx = self.write()?;
        {
            let mut task = tx.prepare(
                "INSERT INTO tasks (agent, payload, state, attempts, max_attempts, max_revisions, run_at,
                                    backoff_ms, result, created_at, updated_at, finished_at)
                 VALUES ('noop', '{}', 'complete', 1, 3, 3, ?1, 10000, '{}', ?1, ?1, ?1)",
            )?;
            let mut event = tx.prepare(
                "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
                 VALUES (?1, ?2, 'complete', 'in_progress', 'complete', 'history', '{}')",
            )?;
            for _ in 0..n {
                task.execute([now])?;
                event.execute(params![now, tx.last_insert_rowid()])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The stored logs of a task's runs, oldest first.
    pub fn logs(&self, task_id: i64) -> Result<Vec<RunLog>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT attempt, at, text FROM task_logs WHERE task_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([task_id], |r| {
            Ok(RunLog {
                attempt: r.get(0)?,
                at: r.get(1)?,
                text: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

// ----- transitions and events ---------------------------------------------

/// Asks the transition table whether `event` may move a task in `from`, and
/// writes the audit event. The caller writes the row change in the same
/// transaction.
fn record(
    tx: &Transaction<'_>,
    task_id: i64,
    from: Option<State>,
    event: Event,
    actor: &str,
    detail: &serde_json::Value,
    now: i64,
) -> Result<State> {
    let to = transition(from, event).ok_or(QueueError::Illegal {
        id: task_id,
        state: from.unwrap_or(State::Pending),
        action: event_action(event),
    })?;
    tx.prepare_cached(
        "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        now,
        task_id,
        event.as_str(),
        from.map(State::as_str),
        to.as_str(),
        actor,
        detail.to_string()
    ])?;
    Ok(to)
}

fn transition(from: Option<State>, event: Event) -> Option<State> {
    task::transition(from, event)
}

/// Puts a refused late result on the audit trail (it changes no state): a
/// run that finished after its lease was reset, cancelled or re-claimed.
/// Without it, the trail would show a second claim and no trace of the first
/// run's outcome, which only the old holder's log would mention.
fn record_refused_result(
    tx: &Transaction<'_>,
    run: &FinishedRun,
    actor: &str,
    now: i64,
) -> Result<()> {
    let id = run.lease.task_id;
    let current: Option<(String, Option<String>)> = tx
        .prepare_cached("SELECT state, claimed_by FROM tasks WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((state, holder)) = current else {
        return Ok(());
    };
    let outcome = match &run.outcome {
        RunOutcome::Success { .. } => "success".to_string(),
        RunOutcome::Failure(e) => e.kind.as_str().to_string(),
    };
    let detail = json!({
        "refused_holder": actor,
        "refused_lease": run.lease.token,
        "outcome": outcome,
        "current_holder": holder,
        "why": "the lease was lost (reset after missed heartbeats, cancelled, or re-claimed) before the result arrived",
    });
    tx.prepare_cached(
        "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
         VALUES (?1, ?2, 'result_refused', ?3, ?3, ?4, ?5)",
    )?
    .execute(params![now, id, state, actor, detail.to_string()])?;
    Ok(())
}

fn event_action(event: Event) -> &'static str {
    match event {
        Event::Approve => "be approved (only tasks in review can)",
        Event::Reject | Event::RejectFinal => "be rejected (only tasks in review can)",
        Event::ApproveStale => "be approved (only tasks in review can)",
        Event::Retry | Event::RetryWaiting => "be retried (only failed or cancelled tasks can)",
        Event::Cancel => "be cancelled (it has already finished)",
        Event::Claim => "be claimed",
        _ => "make this move",
    }
}

fn state_of(tx: &Transaction<'_>, id: i64) -> Result<State> {
    let state: Option<String> = tx
        .prepare_cached("SELECT state FROM tasks WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    parse_state(&state.ok_or(QueueError::NotFound(id))?)
}

fn parse_state(s: &str) -> Result<State> {
    s.parse().map_err(QueueError::Corrupt)
}

fn in_batch(index: usize, e: QueueError) -> QueueError {
    match e {
        QueueError::Sqlite(_) => e,
        other => QueueError::InvalidInBatch {
            index,
            source: Box::new(other),
        },
    }
}

// ----- validation -----------------------------------------------------------

/// Agent names are file stems of components: keep them portable and printable.
pub fn validate_agent_name(field: &str, name: &str) -> Result<()> {
    task::check_agent_name(name).map_err(|why| QueueError::invalid(field, why))
}

/// Checks a JSON document exactly the way every reader of the database parses
/// it (into a `serde_json::Value`, under serde_json's nesting limit), so that
/// nothing is stored that cannot be read back: `1e999`, a lone surrogate
/// escape or a 129-deep array would otherwise poison every listing.
/// The one check on every write path: payloads, results, spawns.
fn validate_json(field: &str, text: &str, max_bytes: usize) -> Result<()> {
    if text.len() > max_bytes {
        return Err(QueueError::invalid(
            field,
            format!(
                "{} bytes is more than the limit of {max_bytes} bytes",
                text.len()
            ),
        ));
    }
    serde_json::from_str::<serde_json::Value>(text)
        .map_err(|e| QueueError::invalid(field, format!("not valid JSON: {e}")))?;
    Ok(())
}

/// Serializes a value to be stored and checks it reads back (nesting adds
/// up: a payload nested 100 deep inside a chain nested 20 deep is deeper
/// than serde_json reads).
fn stored_json<T: serde::Serialize + serde::de::DeserializeOwned>(
    field: &str,
    value: &T,
) -> Result<String> {
    let text = serde_json::to_string(value)
        .map_err(|e| QueueError::invalid(field, format!("cannot be stored: {e}")))?;
    serde_json::from_str::<T>(&text).map_err(|e| {
        QueueError::invalid(
            field,
            format!(
                "is nested too deeply to be read back ({e}); flatten the payloads or the chain"
            ),
        )
    })?;
    Ok(text)
}

fn validate_next(field: &str, specs: &[NextSpec], max_payload: usize, depth: usize) -> Result<()> {
    if depth > 32 {
        return Err(QueueError::invalid(
            field,
            "chains may nest at most 32 levels deep",
        ));
    }
    for (i, spec) in specs.iter().enumerate() {
        let here = format!("{field}[{i}]");
        validate_agent_name(&format!("{here}.agent"), &spec.agent)?;
        let payload_len = spec.payload.to_string().len();
        if payload_len > max_payload {
            return Err(QueueError::invalid(
                format!("{here}.payload"),
                format!("{payload_len} bytes is more than the limit of {max_payload} bytes"),
            ));
        }
        validate_next(&format!("{here}.next"), &spec.next, max_payload, depth + 1)?;
    }
    Ok(())
}

/// Everything about a new task that can be checked without the database.
fn validate_new_task(new: &NewTask, max_payload: usize) -> Result<()> {
    validate_agent_name("agent", &new.agent)?;
    validate_json("payload", &new.payload, max_payload)?;
    if new.max_attempts == 0 {
        return Err(QueueError::invalid("max_attempts", "must be at least 1"));
    }
    if new.max_attempts > 1000 {
        return Err(QueueError::invalid("max_attempts", "must be at most 1000"));
    }
    if let Some(reviewer) = &new.reviewer {
        validate_agent_name("reviewer", reviewer)?;
    }
    if let Some(budget) = new.token_budget
        && !(1..=i64::MAX as u64).contains(&budget)
    {
        return Err(QueueError::invalid(
            "token_budget",
            format!("{budget} is outside 1..={}", i64::MAX),
        ));
    }
    if new.timeout_ms == Some(0) {
        return Err(QueueError::invalid("timeout", "must be longer than 0"));
    }
    if let Some(key) = &new.key
        && (key.is_empty() || key.len() > 256)
    {
        return Err(QueueError::invalid(
            "key",
            "the idempotency key must be 1 to 256 bytes long",
        ));
    }
    let mut seen = HashSet::new();
    for dep in &new.depends_on {
        if !seen.insert(dep) {
            return Err(QueueError::invalid(
                "depends_on",
                format!("task {dep} is listed twice"),
            ));
        }
    }
    validate_next("next", &new.next, max_payload, 0)
}

// ----- writes inside a transaction -----------------------------------------

/// Inserts a validated task (and its dependency rows and submit event).
fn insert_new_task(
    tx: &Transaction<'_>,
    new: &NewTask,
    parent_id: Option<i64>,
    actor: &str,
    now: i64,
) -> Result<Submitted> {
    if let Some(key) = &new.key {
        let existing: Option<i64> = tx
            .prepare_cached("SELECT id FROM tasks WHERE idem_key = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()?;
        if let Some(id) = existing {
            return Ok(Submitted { id, existed: true });
        }
    }
    let mut pending_deps = 0;
    for &dep in &new.depends_on {
        let state: Option<String> = tx
            .prepare_cached("SELECT state FROM tasks WHERE id = ?1")?
            .query_row([dep], |r| r.get(0))
            .optional()?;
        match state.as_deref().map(parse_state).transpose()? {
            None => {
                return Err(QueueError::invalid(
                    "depends_on",
                    format!("task {dep} does not exist"),
                ));
            }
            Some(State::Complete) => {}
            Some(s @ (State::Failed | State::Cancelled)) => {
                return Err(QueueError::invalid(
                    "depends_on",
                    format!(
                        "task {dep} is {s}, so this task could never run; retry task {dep} first"
                    ),
                ));
            }
            Some(_) => pending_deps += 1,
        }
    }
    let run_at = new.run_at.unwrap_or(now);
    let event = if pending_deps == 0 && run_at <= now {
        Event::SubmitReady
    } else {
        Event::SubmitPending
    };
    let state = transition(None, event).expect("submit is always allowed");
    let next_json = if new.next.is_empty() {
        None
    } else {
        Some(stored_json("next", &new.next)?)
    };
    let review = new.review || new.reviewer.is_some();
    let id: i64 = tx
        .prepare_cached(
            "INSERT INTO tasks (agent, payload, state, priority, max_attempts, max_revisions, review,
                                reviewer, run_at, timeout_ms, backoff_ms, parent_id, next_tasks,
                                pending_deps, idem_key, created_at, updated_at, token_budget, root_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?16, ?17,
                     (SELECT COALESCE(root_id, id) FROM tasks WHERE id = ?12))
             RETURNING id",
        )?
        .query_row(
            params![
                new.agent,
                new.payload,
                state.as_str(),
                new.priority,
                new.max_attempts,
                new.max_revisions,
                review,
                new.reviewer,
                run_at,
                new.timeout_ms.map(|t| t as i64),
                new.backoff_ms as i64,
                parent_id,
                next_json,
                pending_deps,
                new.key,
                now,
                new.token_budget.map(|b| b as i64)
            ],
            |r| r.get(0),
        )?;
    for &dep in &new.depends_on {
        tx.prepare_cached("INSERT INTO task_deps (task_id, depends_on) VALUES (?1, ?2)")?
            .execute(params![id, dep])?;
    }
    let detail = match parent_id {
        Some(parent) => json!({"parent_id": parent}),
        None if pending_deps > 0 => json!({"waiting_for": pending_deps}),
        None => json!({}),
    };
    record(tx, id, None, event, actor, &detail, now)?;
    Ok(Submitted { id, existed: false })
}

/// How many of a task's dependencies have not completed; an error when one
/// of them failed or was cancelled, since the task could then never run.
fn count_unfinished_dependencies(tx: &Transaction<'_>, id: i64) -> Result<u32> {
    let deps: Vec<(i64, String)> = tx
        .prepare_cached(
            "SELECT t.id, t.state FROM task_deps d JOIN tasks t ON t.id = d.depends_on WHERE d.task_id = ?1",
        )?
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut waiting = 0;
    for (dep, state) in deps {
        match parse_state(&state)? {
            State::Complete => {}
            s @ (State::Failed | State::Cancelled) => {
                return Err(QueueError::invalid(
                    "depends_on",
                    format!(
                        "task {id} depends on task {dep}, which is {s}; retry task {dep} first"
                    ),
                ));
            }
            _ => waiting += 1,
        }
    }
    Ok(waiting)
}

fn promote_due_in(tx: &Transaction<'_>, actor: &str, now: i64) -> Result<usize> {
    let ids: Vec<i64> = tx
        .prepare_cached(
            "UPDATE tasks SET state = 'ready', updated_at = ?1
             WHERE state = 'pending' AND pending_deps = 0 AND run_at <= ?1 RETURNING id",
        )?
        .query_map([now], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for &id in &ids {
        record(
            tx,
            id,
            Some(State::Pending),
            Event::Promote,
            actor,
            &json!({}),
            now,
        )?;
    }
    Ok(ids.len())
}

/// The row facts `finish_in` needs about a task it holds the lease of.
struct Held {
    attempts: u32,
    max_attempts: u32,
    review: bool,
    reviewer: Option<String>,
    reviews: Option<i64>,
    backoff_ms: u64,
}

fn finish_in(
    tx: &Transaction<'_>,
    run: &FinishedRun,
    actor: &str,
    max_payload: usize,
    now: i64,
) -> Result<Applied> {
    let id = run.lease.task_id;
    let held = tx
        .prepare_cached(
            "SELECT attempts, max_attempts, review, reviewer, reviews, backoff_ms FROM tasks
             WHERE id = ?1 AND state = 'in_progress' AND claim_token = ?2",
        )?
        .query_row(params![id, run.lease.token], |r| {
            Ok(Held {
                attempts: r.get(0)?,
                max_attempts: r.get(1)?,
                review: r.get(2)?,
                reviewer: r.get(3)?,
                reviews: r.get(4)?,
                backoff_ms: r.get::<_, i64>(5)? as u64,
            })
        })
        .optional()?;
    let Some(held) = held else {
        record_refused_result(tx, run, actor, now)?;
        return Ok(Applied::LeaseLost);
    };
    if !run.log.is_empty() {
        tx.prepare_cached(
            "INSERT INTO task_logs (task_id, attempt, at, text) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![id, held.attempts, now, run.log])?;
    }
    let outcome = match check_outcome(&run.outcome, held.reviews, max_payload) {
        Ok(answer) => check_state_writes(tx, id, &run.state)?.map(|owners| (answer, owners)),
        Err(error) => Err(error),
    };
    let to = match outcome {
        Ok(((output, spawn, needs_review), owners)) => {
            if held.review || needs_review {
                state::hold_writes(tx, id, &run.state)?;
                outbox::store(tx, id, &run.effects, true, now)?;
                enter_review(tx, id, &held, output, &spawn, actor, now)?
            } else {
                if let Some(checked) = &owners {
                    state::apply_writes(
                        tx,
                        Some(id),
                        &checked.owners,
                        &run.state,
                        &checked.olds,
                        actor,
                        now,
                    )?;
                }
                outbox::store(tx, id, &run.effects, false, now)?;
                let to = record(
                    tx,
                    id,
                    Some(State::InProgress),
                    Event::Complete,
                    actor,
                    &json!({"attempt": held.attempts}),
                    now,
                )?;
                complete(tx, id, output, spawn, actor, now)?;
                if let Some(judged) = held.reviews {
                    apply_verdict(tx, id, judged, output, actor, now)?;
                }
                to
            }
        }
        Err(error) => {
            // An interrupted run's model calls are replayed by the next run;
            // after an answer of the agent's own, the next run asks afresh.
            // A run that made no model call leaves the older journal in place.
            tx.prepare_cached(&format!(
                "UPDATE tasks SET replay_token = CASE WHEN ?1 THEN {REPLAY_FROM_THIS_RUN} ELSE NULL END
                 WHERE id = ?2"
            ))?
            .execute(params![error.kind.is_interruption(), id])?;
            fail_run(tx, id, &held, &error, actor, now)?
        }
    };
    Ok(Applied::Moved(to))
}

/// The owners of the task's state and the writes' old versions when the run
/// wrote any, or the first `set-if` conflict as the run's (retryable)
/// failure: a conflict refuses the completion as a whole.
fn check_state_writes(
    tx: &Transaction<'_>,
    id: i64,
    writes: &[crate::state::Write],
) -> Result<std::result::Result<Option<state::CheckedWrites>, TaskError>> {
    if writes.is_empty() {
        return Ok(Ok(None));
    }
    let owners = state::owners_of(tx, id)?;
    Ok(match state::check_writes(tx, &owners, writes)? {
        Ok(olds) => Ok(Some(state::CheckedWrites { owners, olds })),
        Err(conflict) => Err(TaskError {
            kind: ErrorKind::Conflict,
            message: conflict,
        }),
    })
}

/// Checks what a successful run returned before any of it is applied: the
/// output and every child payload must be JSON, every child agent a valid
/// name, and a review task's output a verdict. A bad outcome becomes a
/// permanent `invalid_output` failure.
fn check_outcome(
    outcome: &RunOutcome,
    reviews: Option<i64>,
    max_payload: usize,
) -> Result<(&str, Vec<NextSpec>, bool), TaskError> {
    let (output, spawn, needs_review) = match outcome {
        RunOutcome::Failure(error) => return Err(error.clone()),
        RunOutcome::Success {
            output,
            spawn,
            needs_review,
        } => (output, spawn, *needs_review),
    };
    let invalid = |message: String| TaskError {
        kind: ErrorKind::InvalidOutput,
        message,
    };
    validate_json("output", output, MAX_OUTPUT_BYTES)
        .map_err(|e| invalid(format!("the agent's {e}")))?;
    // A reviewer's own answer is the verdict; it is never held for review.
    let needs_review = needs_review && reviews.is_none();
    if reviews.is_some() {
        parse_verdict(output).map_err(invalid)?;
    }
    let mut children = Vec::with_capacity(spawn.len());
    for (i, child) in spawn.iter().enumerate() {
        children.push(
            spawn_to_next(i, child, max_payload)
                .map_err(|e| invalid(format!("the agent's {e}")))?,
        );
    }
    Ok((output, children, needs_review))
}

fn spawn_to_next(i: usize, child: &SpawnSpec, max_payload: usize) -> Result<NextSpec> {
    validate_agent_name(&format!("spawn[{i}].agent"), &child.agent)?;
    validate_json(&format!("spawn[{i}].payload"), &child.payload, max_payload)?;
    let payload = serde_json::from_str(&child.payload)
        .map_err(|e| QueueError::invalid(format!("spawn[{i}].payload"), e.to_string()))?;
    Ok(NextSpec {
        agent: child.agent.clone(),
        payload,
        priority: child.priority,
        review: child.review,
        next: Vec::new(),
    })
}

/// A reviewer agent's answer: `{"approve": bool, "note": "..."}`.
fn parse_verdict(output: &str) -> Result<(bool, Option<String>), String> {
    let value: serde_json::Value = serde_json::from_str(output).map_err(|e| e.to_string())?;
    let approve = value
        .get("approve")
        .and_then(|v| v.as_bool())
        .ok_or_else(|| "a reviewer's output must be {\"approve\": true|false, \"note\": \"...\"}; \"approve\" is missing or not a boolean".to_string())?;
    let note = value
        .get("note")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    Ok((approve, note))
}

fn enter_review(
    tx: &Transaction<'_>,
    id: i64,
    held: &Held,
    output: &str,
    spawn: &[NextSpec],
    actor: &str,
    now: i64,
) -> Result<State> {
    let detail = json!({"attempt": held.attempts, "reviewer": held.reviewer});
    let to = record(
        tx,
        id,
        Some(State::InProgress),
        Event::CompleteForReview,
        actor,
        &detail,
        now,
    )?;
    let spawned = match spawn.is_empty() {
        true => None,
        false => Some(stored_json("spawn", &spawn.to_vec())?),
    };
    tx.prepare_cached(
        "UPDATE tasks SET state = 'review', result = ?1, spawned = ?2, claim_token = NULL,
                claimed_by = NULL, heartbeat_at = NULL, error_kind = NULL, error_message = NULL,
                replay_token = NULL, updated_at = ?3
         WHERE id = ?4",
    )?
    .execute(params![output, spawned, now, id])?;
    if let Some(reviewer) = &held.reviewer {
        let (agent, payload): (String, String) = tx
            .prepare_cached("SELECT agent, payload FROM tasks WHERE id = ?1")?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let review_payload = format!(
            r#"{{"task_id":{id},"agent":{},"payload":{payload},"output":{output}}}"#,
            serde_json::Value::String(agent)
        );
        validate_json("review payload", &review_payload, usize::MAX)?;
        let mut review_task = NewTask::new(reviewer.clone(), review_payload);
        review_task.max_attempts = held.max_attempts;
        let review_id = insert_new_task(tx, &review_task, Some(id), actor, now)?.id;
        tx.prepare_cached("UPDATE tasks SET reviews = ?1 WHERE id = ?2")?
            .execute(params![id, review_id])?;
    }
    Ok(to)
}

/// Marks a task complete, inserts its children (its `next_tasks`, then what
/// it spawned), and wakes tasks that were waiting on it.
fn complete(
    tx: &Transaction<'_>,
    id: i64,
    output: &str,
    spawn: Vec<NextSpec>,
    actor: &str,
    now: i64,
) -> Result<()> {
    let next_tasks: Option<String> = tx
        .prepare_cached(
            "UPDATE tasks SET state = 'complete', result = ?1, claim_token = NULL, claimed_by = NULL,
                    heartbeat_at = NULL, error_kind = NULL, error_message = NULL, spawned = NULL,
                    replay_token = NULL, held_state = NULL, finished_at = ?2, updated_at = ?2
             WHERE id = ?3 RETURNING next_tasks",
        )?
        .query_row(params![output, now, id], |r| r.get(0))?;
    let mut children: Vec<NextSpec> = match next_tasks {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| QueueError::Corrupt(format!("task {id} next_tasks: {e}")))?,
        None => Vec::new(),
    };
    children.extend(spawn);
    for child in &children {
        let mut new = NewTask::new(child.agent.clone(), child.payload.to_string());
        new.priority = child.priority;
        new.review = child.review;
        new.next = child.next.clone();
        insert_new_task(tx, &new, Some(id), actor, now)?;
    }
    let woken = tx
        .prepare_cached(
            "UPDATE tasks SET pending_deps = pending_deps - 1
             WHERE state = 'pending' AND id IN (SELECT task_id FROM task_deps WHERE depends_on = ?1)",
        )?
        .execute([id])?;
    if woken > 0 {
        promote_due_in(tx, actor, now)?;
    }
    Ok(())
}

/// Applies a reviewer task's verdict to the task it reviewed, if that task is
/// still waiting in review (a person may have decided first).
fn apply_verdict(
    tx: &Transaction<'_>,
    reviewer_task: i64,
    judged: i64,
    output: &str,
    actor: &str,
    now: i64,
) -> Result<()> {
    // Only the newest review of the newest result counts: after a person's
    // rejection and a re-run, an older reviewer task's verdict is stale.
    let newest: Option<i64> = tx
        .prepare_cached("SELECT MAX(id) FROM tasks WHERE parent_id = ?1 AND reviews = ?1")?
        .query_row([judged], |r| r.get(0))?;
    if state_of(tx, judged)? != State::Review || newest != Some(reviewer_task) {
        return Ok(());
    }
    let (approve, note) = parse_verdict(output)
        .map_err(|e| QueueError::Corrupt(format!("verdict of task {reviewer_task}: {e}")))?;
    let by = format!("{actor} (reviewer task {reviewer_task})");
    if approve {
        approve_in(tx, judged, note.as_deref(), &by, now)?;
    } else {
        reject_in(
            tx,
            judged,
            note.as_deref().unwrap_or("rejected without a note"),
            &by,
            now,
        )?;
    }
    Ok(())
}

fn approve_in(
    tx: &Transaction<'_>,
    id: i64,
    note: Option<&str>,
    actor: &str,
    now: i64,
) -> Result<State> {
    let from = state_of(tx, id)?;
    // The held state writes commit with the approval. If another task's
    // write got there first, a set-if no longer holds: the approved result
    // is stale, so the task goes round again instead of applying it.
    let held = if from == State::Review {
        state::held_writes(tx, id)?
    } else {
        Vec::new()
    };
    let owners = match check_state_writes(tx, id, &held)? {
        Ok(owners) => owners,
        Err(conflict) => return send_back_stale(tx, id, &conflict.message, actor, now),
    };
    let to = record(
        tx,
        id,
        Some(from),
        Event::Approve,
        actor,
        &json!({"note": note}),
        now,
    )?;
    let (output, spawned): (Option<String>, Option<String>) = tx
        .prepare_cached("SELECT result, spawned FROM tasks WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let spawn: Vec<NextSpec> = match spawned {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| QueueError::Corrupt(format!("task {id} spawned: {e}")))?,
        None => Vec::new(),
    };
    complete(
        tx,
        id,
        output.as_deref().unwrap_or("null"),
        spawn,
        actor,
        now,
    )?;
    if let Some(checked) = owners {
        state::apply_writes(
            tx,
            Some(id),
            &checked.owners,
            &held,
            &checked.olds,
            actor,
            now,
        )?;
    }
    outbox::release_proposed(tx, id, now)?;
    Ok(to)
}

/// An approved result whose held state no longer applies goes round again:
/// back to `ready` with the conflict as feedback, its attempts given back,
/// no revision used (nobody rejected it).
fn send_back_stale(
    tx: &Transaction<'_>,
    id: i64,
    conflict: &str,
    actor: &str,
    now: i64,
) -> Result<State> {
    outbox::drop_proposed(tx, id)?;
    let note = format!("approved, but stale: {conflict}; the task runs again");
    let detail = json!({"conflict": conflict});
    let to = record(
        tx,
        id,
        Some(State::Review),
        Event::ApproveStale,
        actor,
        &detail,
        now,
    )?;
    tx.prepare_cached(
        "UPDATE tasks SET state = 'ready', feedback = ?1, attempts = 0, spawned = NULL,
                held_state = NULL, run_at = ?2, updated_at = ?2
         WHERE id = ?3",
    )?
    .execute(params![note, now, id])?;
    Ok(to)
}

fn reject_in(tx: &Transaction<'_>, id: i64, note: &str, actor: &str, now: i64) -> Result<State> {
    let from = state_of(tx, id)?;
    outbox::drop_proposed(tx, id)?;
    let (revisions, max_revisions): (u32, u32) = tx
        .prepare_cached("SELECT revisions, max_revisions FROM tasks WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let detail = json!({"note": note, "revision": revisions + 1, "max_revisions": max_revisions});
    if revisions < max_revisions {
        let to = record(tx, id, Some(from), Event::Reject, actor, &detail, now)?;
        // A revision is a fresh round: it gets its attempts back.
        tx.prepare_cached(
            "UPDATE tasks SET state = 'ready', feedback = ?1, revisions = revisions + 1, attempts = 0,
                    spawned = NULL, held_state = NULL, run_at = ?2, updated_at = ?2
             WHERE id = ?3",
        )?
        .execute(params![note, now, id])?;
        Ok(to)
    } else {
        let to = record(tx, id, Some(from), Event::RejectFinal, actor, &detail, now)?;
        let error = TaskError {
            kind: ErrorKind::Rejected,
            message: format!(
                "rejected {} times (max_revisions is {max_revisions}); last note: {note}",
                revisions + 1
            ),
        };
        tx.prepare_cached("UPDATE tasks SET feedback = ?1 WHERE id = ?2")
            .map(|mut s| s.execute(params![note, id]))??;
        set_failed(tx, id, &error, now)?;
        cancel_dependents(tx, id, actor, now)?;
        Ok(to)
    }
}

fn fail_run(
    tx: &Transaction<'_>,
    id: i64,
    held: &Held,
    error: &TaskError,
    actor: &str,
    now: i64,
) -> Result<State> {
    let attempts_left = held.attempts < held.max_attempts;
    if error.kind.is_retryable() && attempts_left {
        let delay = retry::backoff(Duration::from_millis(held.backoff_ms), held.attempts);
        let run_at = now + delay.as_millis() as i64;
        let detail = json!({"attempt": held.attempts, "kind": error.kind, "message": error.message, "retry_in_ms": delay.as_millis() as i64});
        let to = record(
            tx,
            id,
            Some(State::InProgress),
            Event::RetryLater,
            actor,
            &detail,
            now,
        )?;
        tx.prepare_cached(
            "UPDATE tasks SET state = 'pending', run_at = ?1, error_kind = ?2, error_message = ?3,
                    claim_token = NULL, claimed_by = NULL, heartbeat_at = NULL, updated_at = ?4
             WHERE id = ?5",
        )?
        .execute(params![run_at, error.kind.as_str(), error.message, now, id])?;
        Ok(to)
    } else {
        let why = if error.kind.is_retryable() {
            "attempts exhausted"
        } else {
            "permanent"
        };
        let detail = json!({"attempt": held.attempts, "kind": error.kind, "message": error.message, "why": why});
        let to = record(
            tx,
            id,
            Some(State::InProgress),
            Event::Fail,
            actor,
            &detail,
            now,
        )?;
        set_failed(tx, id, error, now)?;
        cancel_dependents(tx, id, actor, now)?;
        Ok(to)
    }
}

fn set_failed(tx: &Transaction<'_>, id: i64, error: &TaskError, now: i64) -> Result<()> {
    tx.prepare_cached(
        "UPDATE tasks SET state = 'failed', error_kind = ?1, error_message = ?2, claim_token = NULL,
                claimed_by = NULL, heartbeat_at = NULL, held_state = NULL, finished_at = ?3,
                updated_at = ?3
         WHERE id = ?4",
    )?
    .execute(params![error.kind.as_str(), error.message, now, id])?;
    Ok(())
}

fn cancel_one(
    tx: &Transaction<'_>,
    id: i64,
    from: State,
    reason: &str,
    actor: &str,
    now: i64,
) -> Result<()> {
    if from == State::Review {
        outbox::drop_proposed(tx, id)?;
    }
    record(
        tx,
        id,
        Some(from),
        Event::Cancel,
        actor,
        &json!({"reason": reason}),
        now,
    )?;
    let error = TaskError {
        kind: ErrorKind::Cancelled,
        message: reason.to_string(),
    };
    tx.prepare_cached(
        "UPDATE tasks SET state = 'cancelled', error_kind = ?1, error_message = ?2, claim_token = NULL,
                claimed_by = NULL, heartbeat_at = NULL, held_state = NULL, finished_at = ?3,
                updated_at = ?3
         WHERE id = ?4",
    )?
    .execute(params![error.kind.as_str(), error.message, now, id])?;
    Ok(())
}

/// Cancels, transitively, every unfinished task waiting on `id`, which will
/// never complete now. Returns the ids cancelled.
fn cancel_dependents(tx: &Transaction<'_>, id: i64, actor: &str, now: i64) -> Result<Vec<i64>> {
    let mut cancelled = Vec::new();
    let mut queue = vec![id];
    while let Some(dep) = queue.pop() {
        let dependents: Vec<(i64, String)> = tx
            .prepare_cached(
                "SELECT t.id, t.state FROM task_deps d JOIN tasks t ON t.id = d.task_id
                 WHERE d.depends_on = ?1 AND t.state IN ('pending', 'ready', 'review', 'in_progress')",
            )?
            .query_map([dep], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (child, state) in dependents {
            let reason =
                format!("cancelled because task {dep}, which it depends on, will never complete");
            cancel_one(tx, child, parse_state(&state)?, &reason, actor, now)?;
            cancelled.push(child);
            queue.push(child);
        }
    }
    Ok(cancelled)
}

// ----- reading rows -----------------------------------------------------------

/// A listing row: the task, or the id and why it cannot be decoded.
fn task_row(r: &Row<'_>) -> rusqlite::Result<TaskRow> {
    let id: i64 = r.get(0)?;
    Ok(task_from_row(r)?.map_err(|e| UnreadableTask {
        id,
        reason: e.to_string(),
    }))
}

fn task_from_row(r: &Row<'_>) -> rusqlite::Result<Result<Task>> {
    let id: i64 = r.get(0)?;
    let state: String = r.get(2)?;
    let payload: String = r.get(3)?;
    let next_tasks: Option<String> = r.get(13)?;
    let result: Option<String> = r.get(14)?;
    let error_kind: Option<String> = r.get(15)?;
    let error_message: Option<String> = r.get(16)?;
    let corrupt = |what: &str, e: String| QueueError::Corrupt(format!("task {id} {what}: {e}"));
    let build = || -> Result<Task> {
        Ok(Task {
            id,
            agent: r.get(1)?,
            state: parse_state(&state)?,
            payload: serde_json::from_str(&payload)
                .map_err(|e| corrupt("payload", e.to_string()))?,
            priority: r.get(4)?,
            attempts: r.get(5)?,
            max_attempts: r.get(6)?,
            revisions: r.get(7)?,
            max_revisions: r.get(8)?,
            review: r.get(9)?,
            reviewer: r.get(10)?,
            reviews: r.get(11)?,
            parent_id: r.get(12)?,
            depends_on: Vec::new(),
            next_tasks: match next_tasks {
                Some(text) => {
                    serde_json::from_str(&text).map_err(|e| corrupt("next_tasks", e.to_string()))?
                }
                None => Vec::new(),
            },
            result: result
                .map(|text| serde_json::from_str(&text))
                .transpose()
                .map_err(|e| corrupt("result", e.to_string()))?,
            error: match error_kind {
                Some(kind) => Some(TaskError {
                    kind: kind.parse().map_err(|e| corrupt("error_kind", e))?,
                    message: error_message.unwrap_or_default(),
                }),
                None => None,
            },
            feedback: r.get(17)?,
            progress: r.get(18)?,
            idempotency_key: r.get(19)?,
            timeout_ms: r.get::<_, Option<i64>>(20)?.map(|t| t as u64),
            backoff_ms: r.get::<_, i64>(21)? as u64,
            run_at: r.get(22)?,
            claimed_by: r.get(23)?,
            heartbeat_at: r.get(24)?,
            created_at: r.get(25)?,
            updated_at: r.get(26)?,
            finished_at: r.get(27)?,
        })
    };
    Ok(build())
}
