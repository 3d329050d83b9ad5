//! What a task is and how it may move: the states, the events that move it,
//! and the transition table — the single authority every other module asks.
//!
//! Pure data and functions: no SQL, no wasm. `queue` consults [`transition`]
//! before every state change it writes, so an illegal move is an error there,
//! never silently applied.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The lifecycle state of a task. See `DESIGN.md` for the full table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not runnable yet: waiting for dependencies, a scheduled time or a retry backoff.
    Pending,
    /// Runnable now; waiting to be claimed.
    Ready,
    /// Claimed by exactly one host under a lease.
    InProgress,
    /// Finished running, waiting for approval or rejection.
    Review,
    /// Done (terminal).
    Complete,
    /// The dead letter: kept, inspectable, revivable with `retry`.
    Failed,
    /// Stopped by a user or by a failed dependency; revivable with `retry`.
    Cancelled,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Pending,
        State::Ready,
        State::InProgress,
        State::Review,
        State::Complete,
        State::Failed,
        State::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Ready => "ready",
            State::InProgress => "in_progress",
            State::Review => "review",
            State::Complete => "complete",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    /// The state in a sentence: "task 4 is {phrase}".
    pub fn phrase(self) -> &'static str {
        match self {
            State::InProgress => "in progress",
            State::Review => "in review",
            other => other.as_str(),
        }
    }

    /// Terminal states only change again through an explicit user `retry`.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Complete | State::Failed | State::Cancelled)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                format!("unknown state {s:?}; expected one of pending, ready, in_progress, review, complete, failed, cancelled")
            })
    }
}

/// Everything that can happen to a task. Each one is also the name of the
/// audit event written with the transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// Submitted with dependencies or a `run_at` outstanding.
    SubmitPending,
    /// Submitted and runnable now.
    SubmitReady,
    /// Dependencies complete and `run_at` due.
    Promote,
    /// Claimed by a host: attempts + 1, new claim token, lease.
    Claim,
    /// The agent returned ok.
    Complete,
    /// The agent returned ok and asked for review, or the task requires it.
    CompleteForReview,
    /// A retryable failure (or trap) with attempts left: wait out the backoff.
    RetryLater,
    /// A permanent failure, or a retryable one with no attempts left.
    Fail,
    /// The lease was not renewed in time and attempts remain.
    LeaseExpired,
    /// The lease was not renewed in time and no attempts remain.
    LeaseExpiredFinal,
    /// A graceful shutdown interrupted the run; the attempt is given back.
    Release,
    /// A reviewer approved the result.
    Approve,
    /// A reviewer rejected the result and revisions remain.
    Reject,
    /// A reviewer rejected the result and no revisions remain.
    RejectFinal,
    /// A reviewer approved, but a `set-if` the result holds no longer holds
    /// (another task wrote the key first): the result is stale, and the task
    /// runs again, a revision used up (so a key that never stays still
    /// cannot keep a task running for ever).
    ApproveStale,
    /// As `ApproveStale`, with no revisions left: the task fails (`conflict`).
    ApproveStaleFinal,
    /// A user revived a failed or cancelled task.
    Retry,
    /// A user revived a failed or cancelled task whose dependencies are not
    /// all complete yet: it waits for them.
    RetryWaiting,
    /// A user (or a failed dependency) cancelled the task.
    Cancel,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::SubmitPending | Event::SubmitReady => "submit",
            Event::Promote => "promote",
            Event::Claim => "claim",
            Event::Complete => "complete",
            Event::CompleteForReview => "await_review",
            Event::RetryLater => "retry_later",
            Event::Fail => "fail",
            Event::LeaseExpired | Event::LeaseExpiredFinal => "lease_expired",
            Event::Release => "release",
            Event::Approve => "approve",
            Event::Reject | Event::RejectFinal => "reject",
            Event::ApproveStale | Event::ApproveStaleFinal => "approve_stale",
            Event::Retry | Event::RetryWaiting => "retry",
            Event::Cancel => "cancel",
        }
    }
}

/// Agent names are file stems of components: kept portable and printable.
/// The message says what is wrong with `name`.
pub fn check_agent_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the agent name is empty".into());
    }
    if name.len() > 64 {
        return Err(format!(
            "the agent name {name:?} is longer than 64 characters"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "the agent name {name:?} may only contain letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

/// The transition table. `from` is `None` for a task that does not exist yet.
/// Returns the new state, or `None` when the event is not allowed from `from`.
pub fn transition(from: Option<State>, event: Event) -> Option<State> {
    use Event as E;
    use State as S;
    let to = match (from, event) {
        (None, E::SubmitPending) => S::Pending,
        (None, E::SubmitReady) => S::Ready,
        (Some(S::Pending), E::Promote) => S::Ready,
        (Some(S::Ready), E::Claim) => S::InProgress,
        (Some(S::InProgress), E::Complete) => S::Complete,
        (Some(S::InProgress), E::CompleteForReview) => S::Review,
        (Some(S::InProgress), E::RetryLater) => S::Pending,
        (Some(S::InProgress), E::Fail) => S::Failed,
        (Some(S::InProgress), E::LeaseExpired) => S::Ready,
        (Some(S::InProgress), E::LeaseExpiredFinal) => S::Failed,
        (Some(S::InProgress), E::Release) => S::Ready,
        (Some(S::Review), E::Approve) => S::Complete,
        (Some(S::Review), E::Reject) => S::Ready,
        (Some(S::Review), E::ApproveStale) => S::Ready,
        (Some(S::Review), E::ApproveStaleFinal) => S::Failed,
        (Some(S::Review), E::RejectFinal) => S::Failed,
        (Some(S::Failed | S::Cancelled), E::Retry) => S::Ready,
        (Some(S::Failed | S::Cancelled), E::RetryWaiting) => S::Pending,
        (Some(S::Pending | S::Ready | S::InProgress | S::Review), E::Cancel) => S::Cancelled,
        _ => return None,
    };
    Some(to)
}

/// Why a run (or a task) failed. Stored with the task as `error.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The agent returned `failure::retryable`.
    Retryable,
    /// The agent returned `failure::permanent`.
    Permanent,
    /// The run exceeded its wall-clock deadline.
    Timeout,
    /// The run hit its memory cap.
    OutOfMemory,
    /// The run used up its fuel.
    OutOfFuel,
    /// The guest overflowed its stack.
    StackOverflow,
    /// Any other trap (a panic, an out-of-bounds access, ...).
    Crash,
    /// The agent answered, but with output the host cannot accept (bad JSON).
    InvalidOutput,
    /// The host holding the task stopped renewing its lease too many times.
    LeaseExpired,
    /// Cancelled by a user or because a dependency failed.
    Cancelled,
    /// A reviewer rejected the result more often than `max_revisions` allows.
    Rejected,
    /// A model call found no tokens left in the task's (or chain's) budget:
    /// whatever the agent answered next, it is not retried.
    BudgetExceeded,
    /// A `set-if` state write found another version at commit: the
    /// completion was refused as a whole and the run is retried.
    Conflict,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::Retryable,
        ErrorKind::Permanent,
        ErrorKind::Timeout,
        ErrorKind::OutOfMemory,
        ErrorKind::OutOfFuel,
        ErrorKind::StackOverflow,
        ErrorKind::Crash,
        ErrorKind::InvalidOutput,
        ErrorKind::LeaseExpired,
        ErrorKind::Cancelled,
        ErrorKind::Rejected,
        ErrorKind::BudgetExceeded,
        ErrorKind::Conflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Timeout => "timeout",
            ErrorKind::OutOfMemory => "out_of_memory",
            ErrorKind::OutOfFuel => "out_of_fuel",
            ErrorKind::StackOverflow => "stack_overflow",
            ErrorKind::Crash => "crash",
            ErrorKind::InvalidOutput => "invalid_output",
            ErrorKind::LeaseExpired => "lease_expired",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Rejected => "rejected",
            ErrorKind::BudgetExceeded => "budget_exceeded",
            ErrorKind::Conflict => "conflict",
        }
    }

    /// Whether a failure of this kind may succeed on another attempt. Traps
    /// count as retryable (a flaky input, a transient resource squeeze);
    /// answers the agent itself marked permanent, or output that can never be
    /// parsed, do not.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Retryable
                | ErrorKind::Timeout
                | ErrorKind::OutOfMemory
                | ErrorKind::OutOfFuel
                | ErrorKind::StackOverflow
                | ErrorKind::Crash
                | ErrorKind::Conflict
        )
    }
}

impl ErrorKind {
    /// Whether a run that failed this way was interrupted rather than
    /// answered: the next run may replay its model calls from the journal
    /// (it would have asked the same questions). An answer of the agent's
    /// own, good or bad, means it wants something different next time. A
    /// run stopped by its budget was stopped by the host: its retry, with
    /// more budget, replays what was paid for.
    pub fn is_interruption(self) -> bool {
        matches!(
            self,
            ErrorKind::BudgetExceeded
                | ErrorKind::Timeout
                | ErrorKind::OutOfMemory
                | ErrorKind::OutOfFuel
                | ErrorKind::StackOverflow
                | ErrorKind::Crash
                | ErrorKind::LeaseExpired
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| format!("unknown error kind {s:?}"))
    }
}

/// A failure recorded on a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    pub kind: ErrorKind,
    pub message: String,
}

/// A child task to create when its parent completes: an entry of a task's
/// `next_tasks`. `next` nests, so chains can be as deep as needed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NextSpec {
    pub agent: String,
    #[serde(default = "empty_object")]
    pub payload: serde_json::Value,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub review: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub next: Vec<NextSpec>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// Defaults applied when a submit does not say otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_MAX_REVISIONS: u32 = 3;
/// The most rejections with a note a task may be given (each a fresh round
/// of `max_attempts` runs).
pub const MAX_REVISIONS: u32 = 100;
pub const DEFAULT_BACKOFF_MS: u64 = 10_000;
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Everything needed to create a task. Built by the CLI or by a chain;
/// validated by `queue` before anything is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTask {
    pub agent: String,
    /// The payload as JSON text (validated on submit).
    pub payload: String,
    pub priority: i32,
    pub max_attempts: u32,
    pub max_revisions: u32,
    /// Whether completion must pass through `review`.
    pub review: bool,
    /// An agent that reviews the result automatically (implies `review`).
    pub reviewer: Option<String>,
    pub next: Vec<NextSpec>,
    pub depends_on: Vec<i64>,
    /// Idempotency key: a second submit with the same key returns the first task.
    pub key: Option<String>,
    /// Milliseconds since the Unix epoch before which the task does not run.
    pub run_at: Option<i64>,
    /// Per-task wall-clock budget for one run, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Base of the exponential retry backoff, in milliseconds.
    pub backoff_ms: u64,
    /// Tokens this task and every task of its chain may spend on model
    /// calls together; `None` leaves each to its agent's manifest budget.
    pub token_budget: Option<u64>,
}

impl NewTask {
    /// A task for `agent` with `payload` and every option at its default.
    pub fn new(agent: impl Into<String>, payload: impl Into<String>) -> NewTask {
        NewTask {
            agent: agent.into(),
            payload: payload.into(),
            priority: 0,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_revisions: DEFAULT_MAX_REVISIONS,
            review: false,
            reviewer: None,
            next: Vec::new(),
            depends_on: Vec::new(),
            key: None,
            run_at: None,
            timeout_ms: None,
            backoff_ms: DEFAULT_BACKOFF_MS,
            token_budget: None,
        }
    }
}

/// The right to write about one claimed task: every write about a claimed
/// task is fenced on `(task_id, state = in_progress, token)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    pub task_id: i64,
    pub token: i64,
}

/// A task claimed for one run: what the queue hands the daemon and the
/// daemon hands the agent (the runtime maps it onto the WIT `task`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedTask {
    pub lease: Lease,
    pub agent: String,
    /// The id of the task's chain: its root task's (its own when it starts
    /// one). Owner of the run's chain-scoped state.
    pub chain: i64,
    /// The task's input, a JSON document.
    pub payload: String,
    /// 1 on the first run.
    pub attempt: u32,
    pub max_attempts: u32,
    /// The result of the parent task that created this one, if any.
    pub parent_result: Option<String>,
    /// The reviewer's note after a rejection.
    pub feedback: Option<String>,
    /// This task's deadline per run, overriding the agent's.
    pub timeout_ms: Option<u64>,
}

/// A child an agent asked for in its outcome (`outcome.spawn`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpawnSpec {
    pub agent: String,
    pub payload: String,
    pub priority: i32,
    pub review: bool,
}

/// How a run ended, as the queue needs to know it.
#[derive(Clone, Debug, PartialEq)]
pub enum RunOutcome {
    /// The agent returned ok. `output` is validated JSON text.
    Success {
        output: String,
        spawn: Vec<SpawnSpec>,
        needs_review: bool,
    },
    /// The agent returned an error or trapped.
    Failure(TaskError),
}

/// A stored task, as read back from the queue.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Task {
    pub id: i64,
    pub agent: String,
    pub state: State,
    /// Parsed payload (stored as JSON text).
    pub payload: serde_json::Value,
    pub priority: i32,
    pub attempts: u32,
    pub max_attempts: u32,
    pub revisions: u32,
    pub max_revisions: u32,
    pub review: bool,
    pub reviewer: Option<String>,
    /// The task this one reviews, when it is a review task.
    pub reviews: Option<i64>,
    pub parent_id: Option<i64>,
    pub depends_on: Vec<i64>,
    pub next_tasks: Vec<NextSpec>,
    pub result: Option<serde_json::Value>,
    pub error: Option<TaskError>,
    pub feedback: Option<String>,
    pub progress: Option<String>,
    pub idempotency_key: Option<String>,
    pub timeout_ms: Option<u64>,
    pub backoff_ms: u64,
    pub run_at: i64,
    pub claimed_by: Option<String>,
    pub heartbeat_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
}

/// A reviewer agent's answer: `{"approve": bool, "note": "..."}`.
pub fn parse_verdict(output: &str) -> Result<(bool, Option<String>), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for state in State::ALL {
            assert_eq!(state.as_str().parse::<State>(), Ok(state));
        }
        assert!(
            "running"
                .parse::<State>()
                .unwrap_err()
                .contains("in_progress")
        );
    }

    #[test]
    fn terminal_states_only_leave_through_retry() {
        let events = [
            Event::Promote,
            Event::Claim,
            Event::Complete,
            Event::CompleteForReview,
            Event::RetryLater,
            Event::Fail,
            Event::LeaseExpired,
            Event::Release,
            Event::Approve,
            Event::Reject,
            Event::Cancel,
        ];
        for state in State::ALL.into_iter().filter(|s| s.is_terminal()) {
            for event in events {
                assert_eq!(transition(Some(state), event), None, "{state} --{event:?}");
            }
        }
        assert_eq!(transition(Some(State::Complete), Event::Retry), None);
        assert_eq!(
            transition(Some(State::Failed), Event::Retry),
            Some(State::Ready)
        );
        assert_eq!(
            transition(Some(State::Cancelled), Event::Retry),
            Some(State::Ready)
        );
    }

    #[test]
    fn only_a_claimed_task_can_finish_a_run() {
        for state in State::ALL.into_iter().filter(|s| *s != State::InProgress) {
            for event in [
                Event::Complete,
                Event::RetryLater,
                Event::Fail,
                Event::Release,
            ] {
                assert_eq!(transition(Some(state), event), None, "{state} --{event:?}");
            }
        }
    }

    #[test]
    fn error_kinds_round_trip_and_classify() {
        for kind in ErrorKind::ALL {
            assert_eq!(kind.as_str().parse::<ErrorKind>(), Ok(kind));
        }
        assert!(ErrorKind::Timeout.is_retryable());
        assert!(!ErrorKind::Permanent.is_retryable());
        assert!(!ErrorKind::InvalidOutput.is_retryable());
    }
}
