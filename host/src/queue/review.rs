//! Completion and review inside a transaction: checking what a run returned,
//! holding it for review, completing (children, state writes, effects), and
//! the verdicts of people and reviewer agents.

use serde_json::{Value, json};

use crate::task::{self, ErrorKind, Event, NewTask, NextSpec, RunOutcome, State, TaskError};

use super::cancel::{cancel_dependents, cancel_pending_reviewers};
use super::finish::Held;
use super::insert::{check_chain_room, insert_children, insert_new_task};
use super::sql::{Dialect, Sql, args};
use super::tasks::{note, record, set_failed, state_of};
use super::validate::{MAX_JSON_DEPTH, spawn_to_next, stored_json, validate_json};
use super::{MAX_OUTPUT_BYTES, MAX_SPAWN_PER_RUN, QueueError, Result, batch, outbox, state};

/// The owners of the task's state and the writes' old versions when the run
/// wrote any, or the first `set-if` conflict as the run's failure (retried,
/// unless the run's own writes make it certain): a conflict refuses the
/// completion as a whole.
pub(super) fn check_state_writes(
    tx: &dyn Sql,
    id: i64,
    writes: &[crate::state::Write],
) -> Result<std::result::Result<Option<state::CheckedWrites>, TaskError>> {
    if writes.is_empty() {
        return Ok(Ok(None));
    }
    check_writes_of(tx, state::owners_of(tx, id)?, writes)
}

/// [`check_state_writes`] with the owners already known.
pub(super) fn check_writes_of(
    tx: &dyn Sql,
    owners: state::Owners,
    writes: &[crate::state::Write],
) -> Result<std::result::Result<Option<state::CheckedWrites>, TaskError>> {
    Ok(state::check_writes(tx, &owners, writes)?
        .map(|olds| Some(state::CheckedWrites { owners, olds })))
}

/// Checks what a successful run returned before any of it is applied: the
/// output and every child payload must be JSON, every child agent a valid
/// name, and a review task's output a verdict. A bad outcome becomes a
/// permanent `invalid_output` failure.
pub(super) fn check_outcome(
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
        task::parse_verdict(output).map_err(invalid)?;
    }
    // Bounded like the output: one completion writing a million children
    // held SQLite's write lock for 18 s.
    if spawn.len() > MAX_SPAWN_PER_RUN {
        return Err(invalid(format!(
            "the agent spawned {} tasks; a run may spawn at most {MAX_SPAWN_PER_RUN}",
            spawn.len()
        )));
    }
    let spawned_bytes: usize = spawn.iter().map(|c| c.payload.len()).sum();
    if spawned_bytes > MAX_OUTPUT_BYTES {
        return Err(invalid(format!(
            "the agent's spawned tasks carry {spawned_bytes} bytes of payload; a run's may carry at most {MAX_OUTPUT_BYTES}"
        )));
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

pub(super) fn enter_review(
    tx: &dyn Sql,
    id: i64,
    held: &Held,
    run: &HeldRun,
    actor: &str,
    now: i64,
) -> Result<State> {
    let (output, spawn) = (run.output, run.spawn);
    check_chain_room(tx, id, spawn.len() + next_tasks_of(tx, id)?.len())?;
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
    tx.execute(
        "UPDATE tasks SET state = ?5, result = ?1, spawned = ?2, claim_token = NULL,
                claimed_by = NULL, heartbeat_at = NULL, error_kind = NULL, error_message = NULL,
                replay_token = NULL, updated_at = ?3
         WHERE id = ?4",
        args![output, spawned, now, id, to.as_str()],
    )?;
    if let Some(reviewer) = &held.reviewer {
        let row = tx.query_one("SELECT agent, payload FROM tasks WHERE id = ?1", args![id])?;
        let (agent, payload): (String, String) = (row.get(0)?, row.get(1)?);
        let (effects, state_writes) = proposed_actions_json(run.effects, run.writes);
        // One level deeper in the reviewer's payload, a document at the
        // nesting limit would fail the reviewed task: shown as null instead.
        // Their sizes beside them say which null is one.
        let (payload_bytes, output_bytes) = (payload.len(), output.len());
        let (payload, output) = (fits_one_deeper(&payload), fits_one_deeper(output));
        // What approval would create, as `colony show` lists it.
        let children = spawned.as_deref().map_or("[]", fits_one_deeper);
        let review_payload = format!(
            r#"{{"task_id":{id},"agent":{},"payload":{payload},"payload_bytes":{payload_bytes},"output":{output},"output_bytes":{output_bytes},"effects":{effects},"state_writes":{state_writes},"children":{children}}}"#,
            serde_json::Value::String(agent),
        );
        validate_json("review payload", &review_payload, usize::MAX)?;
        let mut review_task = NewTask::new(reviewer.clone(), review_payload);
        review_task.max_attempts = held.max_attempts;
        let review_id = insert_new_task(tx, &review_task, Some(id), actor, now)?.id;
        tx.execute(
            "UPDATE tasks SET reviews = ?1 WHERE id = ?2",
            args![id, review_id],
        )?;
    }
    Ok(to)
}

/// The tasks task `id`'s run spawned, held while it waits in review
/// (created if approved).
pub(super) fn held_children(tx: &dyn Sql, id: i64) -> Result<Vec<NextSpec>> {
    let spawned: Option<String> =
        tx.query_value("SELECT spawned FROM tasks WHERE id = ?1", args![id])?;
    match spawned {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| QueueError::Corrupt(format!("task {id} spawned: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// `json`, or `null` when it is nested too deeply to be shown one level
/// down (the reviewer finds it whole in `colony show ID --json`).
fn fits_one_deeper(json: &str) -> &str {
    match serde_json::from_str::<Value>(json) {
        Ok(value) if json_depth(&value) < MAX_JSON_DEPTH => json,
        _ => "null",
    }
}

/// How deeply arrays and objects nest in `value` (a scalar: 0).
fn json_depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(json_depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// What a run held for review leaves to be decided: its output and
/// spawned tasks, and the effects and state writes approval would release.
pub(super) struct HeldRun<'a> {
    pub output: &'a str,
    pub spawn: &'a [NextSpec],
    pub effects: &'a [crate::effects::Effect],
    pub writes: &'a [crate::state::Write],
}

/// How many bytes of effect bodies and state values (as stored, before
/// JSON escaping) a reviewer agent's payload shows, the effects first, each
/// in the run's order; one that does not fit is null beside its size. A run may hold 8 MiB of bodies and 16 MiB of state: shown whole
/// they would make a payload a reviewer's default memory cannot parse.
const REVIEW_SHOWS_BYTES: usize = 1 << 20;

/// What is left of [`REVIEW_SHOWS_BYTES`] as bodies and values are shown.
struct ShownBytes(usize);

impl ShownBytes {
    /// Whether `len` more bytes may be shown (and if so, counts them).
    fn take(&mut self, len: usize) -> bool {
        let fits = len <= self.0;
        if fits {
            self.0 -= len;
        }
        fits
    }
}

/// The effects and state writes a reviewer agent approves with the task,
/// as it needs them to judge. Effects: method, URL, the agent's headers,
/// the body as text (null when not UTF-8 or past what the payload shows)
/// and its size. Writes: scope, key, the value (null for a delete or past
/// what the payload shows), its size and the version it was set against.
fn proposed_actions_json(
    effects: &[crate::effects::Effect],
    writes: &[crate::state::Write],
) -> (Value, Value) {
    let mut shown = ShownBytes(REVIEW_SHOWS_BYTES);
    let effects = effects
        .iter()
        .map(|e| {
            let body = e.body.as_deref();
            let text = body
                .and_then(|b| std::str::from_utf8(b).ok())
                .filter(|t| shown.take(t.len()));
            json!({
                "method": e.method,
                "url": e.url,
                "headers": e.headers,
                "body": text,
                "body_bytes": body.map_or(0, <[u8]>::len),
            })
        })
        .collect();
    let writes = writes
        .iter()
        .map(|w| {
            let raw = w.value.as_deref().unwrap_or_default();
            // Checked as JSON by the runtime (`state::check_write`).
            // Three levels down (state_writes, an entry, its value): one
            // nested deeper than fits there is null too, beside its size.
            // (Checked before it counts against what the payload shows.)
            let value = Some(raw)
                .filter(|v| !v.is_empty())
                .and_then(|v| serde_json::from_str::<Value>(v).ok())
                .filter(|v| json_depth(v) + 3 <= MAX_JSON_DEPTH && shown.take(raw.len()));
            json!({"scope": w.scope.as_str(), "key": w.key, "value": value,
                   "value_bytes": raw.len(), "delete": w.value.is_none(),
                   "if_version": w.if_version})
        })
        .collect();
    (effects, writes)
}

/// A reviewer's approval that cannot be applied (the chain has no room
/// for the tasks approval would create): the task stays in review for a
/// person, an audit event on it saying why, and the reviewer's own run
/// completes (it answered as asked).
fn defer_verdict(
    tx: &dyn Sql,
    judged: i64,
    reviewer_task: i64,
    why: &QueueError,
    actor: &str,
    now: i64,
) -> Result<()> {
    let detail = json!({
        "reviewer_task": reviewer_task,
        "why": format!("the reviewer approves, but {why}; a person decides (approving is refused until the chain has room)"),
    });
    note(tx, judged, "verdict_deferred", actor, detail, now)
}

/// The `--next` chain task `id` starts when it completes.
fn next_tasks_of(tx: &dyn Sql, id: i64) -> Result<Vec<NextSpec>> {
    let text = tx.query_value("SELECT next_tasks FROM tasks WHERE id = ?1", args![id])?;
    parse_next_tasks(id, text)
}

/// Task `id`'s stored `next_tasks` column.
fn parse_next_tasks(id: i64, text: Option<String>) -> Result<Vec<NextSpec>> {
    match text {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| QueueError::Corrupt(format!("task {id} next_tasks: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// Marks a task complete (`to`, as the table said), inserts its children
/// (its `next_tasks`, then what it spawned), and wakes tasks that were
/// waiting on it.
pub(super) fn complete(
    tx: &dyn Sql,
    id: i64,
    to: State,
    output: &str,
    spawn: Vec<NextSpec>,
    actor: &str,
    now: i64,
) -> Result<()> {
    let next_tasks: Option<String> = match tx.dialect() {
        // Read, then write by id: SQLite runs an UPDATE with RETURNING
        // through a temporary table (see `tasks::CLAIMABLE_SQLITE`).
        Dialect::Sqlite => {
            let next = tx.query_value("SELECT next_tasks FROM tasks WHERE id = +?1", args![id])?;
            tx.execute(
                batch::COMPLETE_ONE_SQLITE,
                args![now, to.as_str(), id, output],
            )?;
            next
        }
        Dialect::Postgres => tx.query_value(
            "UPDATE tasks SET state = ?4, result = ?1, claim_token = NULL, claimed_by = NULL,
                    heartbeat_at = NULL, error_kind = NULL, error_message = NULL, spawned = NULL,
                    replay_token = NULL, held_state = NULL, finished_at = ?2, updated_at = ?2
             WHERE id = ?3 RETURNING next_tasks",
            args![output, now, id, to.as_str()],
        )?,
    };
    let mut children = parse_next_tasks(id, next_tasks)?;
    children.extend(spawn);
    insert_children(tx, id, &children, actor, now)?;
    batch::release_dependents(tx, std::iter::once(id), actor, now)
}

/// Most bytes of a person's review note or cancel reason: it is stored in
/// the audit trail and handed to the next run, and a reviewer's whole
/// answer is bounded too.
pub const MAX_NOTE_BYTES: usize = 64 << 10;

/// Refuses a note or reason (`field`) longer than [`MAX_NOTE_BYTES`].
pub(super) fn check_note(field: &str, note: &str) -> Result<()> {
    if note.len() > MAX_NOTE_BYTES {
        return Err(QueueError::invalid(
            field,
            format!("{} bytes; at most {} KiB", note.len(), MAX_NOTE_BYTES >> 10),
        ));
    }
    Ok(())
}

/// After a person's verdict on `judged`: its reviewer tasks still to answer
/// are cancelled, since their verdict would be ignored.
pub(super) fn cancel_reviewers_of_decided(
    tx: &dyn Sql,
    judged: i64,
    actor: &str,
    now: i64,
) -> Result<Vec<i64>> {
    let why = decided_first(actor, judged);
    Ok(cancel_pending_reviewers(tx, judged, i64::MAX, &why, actor, now)?.0)
}

/// Why a reviewer task is cancelled when a person decided first.
pub(super) fn decided_first(actor: &str, judged: i64) -> String {
    format!("{actor} decided the review of task {judged} first")
}

/// Applies a reviewer task's verdict to the task it reviewed, if that task is
/// still waiting in review (a person may have decided first).
pub(super) fn apply_verdict(
    tx: &dyn Sql,
    reviewer_task: i64,
    judged: i64,
    output: &str,
    actor: &str,
    now: i64,
) -> Result<()> {
    // Only the newest review of the newest result counts: after a person's
    // rejection and a re-run, an older reviewer task's verdict is stale.
    // The judged task's row is locked first (on PostgreSQL), so a re-run
    // entering review with a newer reviewer commits before we look.
    let judged_state = state_of(tx, judged)?;
    let newest: Option<i64> = tx.query_value(
        "SELECT MAX(id) FROM tasks WHERE parent_id = ?1 AND reviews = ?1",
        args![judged],
    )?;
    if judged_state != State::Review || newest != Some(reviewer_task) {
        return Ok(());
    }
    let (approve, note) = task::parse_verdict(output)
        .map_err(|e| QueueError::Corrupt(format!("verdict of task {reviewer_task}: {e}")))?;
    let by = format!("{actor} (reviewer task {reviewer_task})");
    if approve {
        // A chain that filled up since the task entered review has no room
        // for what approval would create: left to a person (whose approval
        // is refused, saying why), not failing the reviewer's completion.
        let children = held_children(tx, judged)?.len() + next_tasks_of(tx, judged)?.len();
        match check_chain_room(tx, judged, children) {
            Err(full) if full.is_bad_input() => {
                return defer_verdict(tx, judged, reviewer_task, &full, &by, now);
            }
            other => other?,
        }
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

/// The events of task `task` (an SQL expression) that put it in review:
/// its transitions into review from another state, not the audit-only
/// events written while it waits there (a late result refused, a lost
/// run's model call, an operator's write to its chain's state), which
/// start no new round.
fn enters_review(task: &str) -> String {
    format!("task_id = {task} AND to_state = 'review' AND COALESCE(from_state, '') <> 'review'")
}

/// The review round of task `task` (an SQL expression), as a subquery;
/// meaningful while the task is in review.
pub(super) fn round_of(task: &str) -> String {
    format!("SELECT MAX(id) FROM events WHERE {}", enters_review(task))
}

/// See [`super::Queue::review_round`].
pub(super) fn review_round(db: &dyn Sql, id: i64) -> Result<Option<i64>> {
    let row = db.query_opt(
        &format!(
            "SELECT state, ({}) FROM tasks WHERE id = ?1",
            round_of("?1")
        ),
        args![id],
    )?;
    let Some(row) = row else {
        return Ok(None);
    };
    let state: String = row.get(0)?;
    match state == State::Review.as_str() {
        true => Ok(row.get(1)?),
        false => Ok(None),
    }
}

/// Refuses a decision on task `id` made on review `round` when the task
/// waits in another round now (decided and run again since the decider
/// read it): approved, it would release writes, effects and tasks nobody
/// had seen. A task no longer in review is left to the transition's own
/// refusal, which says what it is.
pub(super) fn check_round(tx: &dyn Sql, id: i64, round: Option<i64>) -> Result<()> {
    let Some(seen) = round else {
        return Ok(());
    };
    // Read under the task's lock (PostgreSQL), as the decision is.
    state_of(tx, id)?;
    let now = match review_round(tx, id)? {
        Some(now) if now != seen => now,
        _ => return Ok(()),
    };
    let was_a_round = tx
        .query_opt(
            &format!(
                "SELECT 1 FROM events WHERE {} AND id = ?2",
                enters_review("?1")
            ),
            args![id, seen],
        )?
        .is_some();
    Err(match was_a_round {
        true => QueueError::NotNow(format!(
            "task {id} has been decided and run again since review round {seen}, which this decision was made on; it waits in round {now} now, with a new result: read it again (colony show {id}) and decide on what it holds"
        )),
        false => QueueError::invalid(
            "round",
            format!(
                "{seen} is not a review round of task {id}; it waits in round {now} (colony show {id})"
            ),
        ),
    })
}

pub(super) fn approve_in(
    tx: &dyn Sql,
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
    let output: Option<String> =
        tx.query_value("SELECT result FROM tasks WHERE id = ?1", args![id])?;
    let spawn = held_children(tx, id)?;
    complete(
        tx,
        id,
        to,
        output.as_deref().unwrap_or("null"),
        spawn,
        actor,
        now,
    )?;
    if let Some(checked) = owners {
        checked.apply(tx, id, to, &held, actor, now)?;
    }
    outbox::release_proposed(tx, id, now)?;
    Ok(to)
}

/// An approved result whose held state no longer applies goes round again
/// as a rejected one would: back to `ready` with the conflict as feedback,
/// its attempts given back, a revision used; with none left, the task
/// fails (`conflict`). Without the revision a task whose key another
/// writer keeps changing would run for ever, past the bound of
/// max_attempts x (max_revisions + 1) runs.
fn send_back_stale(tx: &dyn Sql, id: i64, conflict: &str, actor: &str, now: i64) -> Result<State> {
    outbox::drop_proposed(tx, id)?;
    let row = tx.query_one(
        "SELECT revisions, max_revisions FROM tasks WHERE id = ?1",
        args![id],
    )?;
    let (revisions, max_revisions): (u32, u32) = (row.get(0)?, row.get(1)?);
    let detail = revision_detail("conflict", conflict, revisions, max_revisions);
    let from = Some(State::Review);
    if revisions >= max_revisions {
        let to = record(tx, id, from, Event::ApproveStaleFinal, actor, &detail, now)?;
        let error = TaskError {
            kind: ErrorKind::Conflict,
            message: format!(
                "approved, but its state writes had gone stale {} times (max_revisions is {max_revisions}); last: {conflict}",
                revisions + 1
            ),
        };
        set_failed(tx, id, to, &error, now)?;
        cancel_dependents(tx, id, actor, now)?;
        return Ok(to);
    }
    let note = format!("approved, but stale: {conflict}; the task runs again");
    let to = record(tx, id, from, Event::ApproveStale, actor, &detail, now)?;
    tx.execute(
        "UPDATE tasks SET state = ?4, feedback = ?1, revisions = revisions + 1, attempts = 0,
                spawned = NULL, held_state = NULL, run_at = ?2, updated_at = ?2
         WHERE id = ?3",
        args![note, now, id, to.as_str()],
    )?;
    Ok(to)
}

/// The detail of a rejection's or stale approval's event, `why` under
/// `field`: the revision it starts, or, with none left, the revisions the
/// task had used (a final one starts none).
fn revision_detail(field: &str, why: &str, revisions: u32, max_revisions: u32) -> Value {
    let mut detail = json!({ field: why, "max_revisions": max_revisions });
    match revisions < max_revisions {
        true => detail["revision"] = json!(revisions + 1),
        false => detail["revisions_used"] = json!(revisions),
    }
    detail
}

pub(super) fn reject_in(tx: &dyn Sql, id: i64, note: &str, actor: &str, now: i64) -> Result<State> {
    let from = state_of(tx, id)?;
    outbox::drop_proposed(tx, id)?;
    let row = tx.query_one(
        "SELECT revisions, max_revisions FROM tasks WHERE id = ?1",
        args![id],
    )?;
    let (revisions, max_revisions): (u32, u32) = (row.get(0)?, row.get(1)?);
    let detail = revision_detail("note", note, revisions, max_revisions);
    if revisions < max_revisions {
        let to = record(tx, id, Some(from), Event::Reject, actor, &detail, now)?;
        // A revision is a fresh round: it gets its attempts back.
        tx.execute(
            "UPDATE tasks SET state = ?4, feedback = ?1, revisions = revisions + 1, attempts = 0,
                    spawned = NULL, held_state = NULL, run_at = ?2, updated_at = ?2
             WHERE id = ?3",
            args![note, now, id, to.as_str()],
        )?;
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
        tx.execute(
            "UPDATE tasks SET feedback = ?1 WHERE id = ?2",
            args![note, id],
        )?;
        set_failed(tx, id, to, &error, now)?;
        cancel_dependents(tx, id, actor, now)?;
        Ok(to)
    }
}
