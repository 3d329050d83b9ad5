//! What the queue's operations take and return: options, the records of
//! submits, runs, claims and events, listing filters, and where a queue
//! lives.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

/// How hard SQLite works to make each commit durable (PostgreSQL keeps the
/// server's own `synchronous_commit`).
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
    /// SQLite: the connection leaves WAL checkpoints to a thread of their
    /// own instead of running them in the commit that fills the WAL (the
    /// daemon's connections, see [`Queue::checkpoint_in_background`]).
    pub background_checkpoints: bool,
    /// How long this connection's claims promise to renew their leases
    /// within (a daemon's `stale_after`): no host resets them sooner, even
    /// one whose own `stale_after` is shorter. `None`: no promise.
    pub claim_lease: Option<Duration>,
    /// SQLite: open the file only if it is there, and (when known) only if
    /// it is still this one ([`FileId`]). Further connections to a
    /// database already open ([`Queue::reopener`], the dashboard's pool)
    /// must neither create a fresh empty one where the first was deleted
    /// nor adopt another file put in its place.
    pub must_exist: bool,
    pub same_file: Option<FileId>,
    /// Log that the database was upgraded from an older schema on opening
    /// (`colony migrate` upgrades a scratch copy, and says so itself).
    pub note_upgrade: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            sync: Sync::Normal,
            busy_timeout: Duration::from_secs(5),
            max_payload_bytes: task::DEFAULT_MAX_PAYLOAD_BYTES,
            actor: format!("pid:{}", std::process::id()),
            background_checkpoints: false,
            claim_lease: None,
            must_exist: false,
            same_file: None,
            note_upgrade: true,
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
    /// What the claim said of the task, when the caller kept it: spares the
    /// writer reading it back (the completion's fence checks it).
    pub claimed: Option<ClaimFacts>,
}

/// What a claim said of its task that stays true while its claim token
/// holds: the run's attempt and the owners of its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimFacts {
    pub attempt: u32,
    pub agent: String,
    pub chain: i64,
}

impl ClaimFacts {
    pub fn of(task: &ClaimedTask) -> ClaimFacts {
        ClaimFacts {
            attempt: task.attempt,
            agent: task.agent.clone(),
            chain: task.chain,
        }
    }
}

/// What one [`Queue::finish_and_claim`] transaction did.
#[derive(Debug)]
pub struct FinishedAndClaimed {
    /// The runs' outcomes, in their order.
    pub applied: Vec<Applied>,
    /// The tasks claimed for each agent, in the order they were asked for.
    pub claimed: Vec<Vec<ClaimedTask>>,
    /// Whether a completion may have queued effects or released held ones.
    /// Only a run off the plain path (effects, review, a verdict, children)
    /// can, so a batch of plain completions spares the daemon a look at
    /// the outbox.
    pub effects_may_be_due: bool,
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
    /// Only tasks with a smaller id: the last id of a page, to read the next.
    pub before: Option<i64>,
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
/// Most tasks one run may spawn (their payloads count against
/// [`MAX_OUTPUT_BYTES`] together).
pub const MAX_SPAWN_PER_RUN: usize = 1000;

/// What the queue would refuse in a run's outcome (output not JSON or too
/// large, too many or malformed spawned tasks), as the failure it would
/// store; a failed run's own failure. For `colony bench --agent`, which
/// runs components without storing them.
pub fn outcome_failure(outcome: &RunOutcome) -> Option<TaskError> {
    review::check_outcome(outcome, None, QueueOptions::default().max_payload_bytes).err()
}

/// What the queue would refuse in a new task that it can tell without
/// the database, with the default limits: for a batch file checked line
/// by line before anything is stored.
pub fn check_new_task(new: &NewTask) -> Result<()> {
    validate::validate_new_task(new, QueueOptions::default().max_payload_bytes)
}

/// A batch checked as [`Queue::submit_batch`] checks it before it stores
/// anything, with the default limits: a command line checks before it
/// opens (or creates) a database.
pub fn check_new_batch(batch: &[NewTask]) -> Result<()> {
    validate::check_batch(batch, QueueOptions::default().max_payload_bytes)
}

/// Milliseconds since the Unix epoch, by this host's clock.
///
/// `COLONY_CLOCK_OFFSET_MS` shifts it (for rehearsing a host whose clock is
/// wrong; PostgreSQL decisions use the server's clock and are unaffected).
pub fn now_ms() -> i64 {
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let offset = *OFFSET.get_or_init(|| {
        std::env::var("COLONY_CLOCK_OFFSET_MS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    });
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
        .saturating_add(offset)
}

/// How far this host's clock may run ahead of the monotonic clock before
/// it counts as stepped (NTP slews by far less): on SQLite, whose leases
/// are timed by the hosts' clocks, a step makes every live lease look that
/// much older.
pub const CLOCK_STEP_MS: i64 = 1_000;

/// How many ms the clock reading `now` (ms since the epoch) runs ahead of
/// the monotonic time passed since `seen`: an instant and the clock then.
pub fn clock_ran_ahead((then, then_ms): (std::time::Instant, i64), now: i64) -> i64 {
    let elapsed = i64::try_from(then.elapsed().as_millis()).unwrap_or(i64::MAX);
    now.saturating_sub(then_ms).saturating_sub(elapsed)
}

/// Where a queue lives, as `--db` / `COLONY_DB` name it: a path or
/// `sqlite:PATH` (SQLite), or a `postgres://` / `postgresql://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Location {
    pub fn parse(text: &str) -> Location {
        // Schemes are case-insensitive (`POSTGRES://`); the client wants
        // them in lower case.
        let lower = text.get(..13).unwrap_or(text).to_ascii_lowercase();
        if let Some(scheme) = ["postgres://", "postgresql://"]
            .into_iter()
            .find(|scheme| lower.starts_with(scheme))
        {
            Location::Postgres(format!("{scheme}{}", &text[scheme.len()..]))
        } else {
            Location::Sqlite(PathBuf::from(text.strip_prefix("sqlite:").unwrap_or(text)))
        }
    }

    pub fn of(path: &Path) -> Location {
        match path.to_str() {
            Some(text) => Location::parse(text),
            None => Location::Sqlite(path.to_path_buf()),
        }
    }
}
