//! Cancelling, inside a transaction: a task an operator cancels, and what
//! can no longer run once a task will never complete: the unfinished tasks
//! that depend on it, and the reviewer tasks of a task whose review was
//! decided or cancelled. Every cancellation asks the transition table
//! through [`record`] like any other move.

use serde_json::json;

use crate::task::{self, ErrorKind, Event, State, TaskError};

use super::sql::{Dialect, Sql, args};
use super::tasks::{REPLAY_FROM_THIS_RUN, parse_state, record, set_failed, state_of};
use super::{QueueError, Result, outbox};

/// Cancels a task that has not finished and every task that depends on it.
pub(super) fn cancel_in(
    tx: &dyn Sql,
    id: i64,
    reason: &str,
    actor: &str,
    now: i64,
) -> Result<Vec<i64>> {
    let from = state_of(tx, id)?;
    if task::transition(Some(from), Event::Cancel).is_none() {
        return Err(QueueError::Illegal {
            id,
            state: from,
            action: "be cancelled (it has already finished)",
        });
    }
    let mut cancelled = vec![id];
    cancelled.extend(cancel_one(tx, id, from, reason, actor, now)?);
    cancelled.extend(cancel_dependents(tx, id, actor, now)?);
    Ok(cancelled)
}

/// Cancels one task; a task cancelled in review takes its reviewer tasks
/// still to answer with it. Returns those reviewer tasks' ids.
fn cancel_one(
    tx: &dyn Sql,
    id: i64,
    from: State,
    reason: &str,
    actor: &str,
    now: i64,
) -> Result<Vec<i64>> {
    let mut reviewers = Vec::new();
    if from == State::InProgress {
        // A run cancelled mid-way was interrupted, not answered: a retry
        // replays its model calls rather than paying for them again.
        tx.execute(
            &format!("UPDATE tasks SET replay_token = {REPLAY_FROM_THIS_RUN} WHERE id = ?1"),
            args![id],
        )?;
    }
    if from == State::Review {
        outbox::drop_proposed(tx, id)?;
        (reviewers, _) =
            cancel_pending_reviewers(tx, id, i64::MAX, &judged_cancelled(id), actor, now)?;
    }
    let to = record(
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
    set_failed(tx, id, to, &error, now)?;
    Ok(reviewers)
}

/// Cancels the reviewer tasks of `judged` up to `newest` that have not
/// answered yet (and what depends on them): once a person has decided its
/// review, or it was cancelled, their verdict cannot count, and their run
/// (a model call, say) would be spent for nothing. Returns the ids
/// cancelled, and whether one was skipped: on PostgreSQL a reviewer row
/// another transaction holds is passed over rather than waited for (most
/// likely its own completion, which locks it before the judged task:
/// waiting would deadlock; or a heartbeat, a claim, a model call's
/// reservation), and the caller tries again once the decision is committed
/// (`Queue::cancel_reviewers_left`).
pub(super) fn cancel_pending_reviewers(
    tx: &dyn Sql,
    judged: i64,
    newest: i64,
    why: &str,
    actor: &str,
    now: i64,
) -> Result<(Vec<i64>, bool)> {
    let unfinished = "parent_id = ?1 AND reviews = ?1 AND id <= ?2
                      AND state IN ('pending', 'ready', 'in_progress')";
    let reviewers = tx.query(
        &format!(
            "SELECT id FROM tasks WHERE {unfinished}{}",
            tx.skip_locked()
        ),
        args![judged, newest],
    )?;
    let mut cancelled = Vec::new();
    for row in reviewers {
        cancelled.extend(cancel_in(tx, row.get(0)?, why, actor, now)?);
    }
    let skipped = match tx.dialect() {
        Dialect::Sqlite => false,
        Dialect::Postgres => {
            let left: i64 = tx.query_value(
                &format!("SELECT COUNT(*) FROM tasks WHERE {unfinished}"),
                args![judged, newest],
            )?;
            left > 0
        }
    };
    Ok((cancelled, skipped))
}

/// Why a reviewer task is cancelled with the task it reviews.
pub(super) fn judged_cancelled(judged: i64) -> String {
    format!("task {judged}, which this reviews, was cancelled")
}

/// On PostgreSQL, the newest reviewer task of `judged`, if it has any: the
/// last that a retry after the decision may cancel (a rejected task
/// reviewed again gets newer ones, which must run). `None` on
/// SQLite, where the decision skipped none.
pub(super) fn newest_reviewer(tx: &dyn Sql, judged: i64) -> Result<Option<i64>> {
    if tx.dialect() == Dialect::Sqlite {
        return Ok(None);
    }
    tx.query_value(
        "SELECT MAX(id) FROM tasks WHERE parent_id = ?1 AND reviews = ?1",
        args![judged],
    )
}

/// Cancels, transitively, every unfinished task waiting on `id`, which will
/// never complete now. Returns the ids cancelled.
pub(super) fn cancel_dependents(tx: &dyn Sql, id: i64, actor: &str, now: i64) -> Result<Vec<i64>> {
    let mut cancelled = Vec::new();
    let mut queue = vec![id];
    let sql = format!(
        "SELECT t.id, t.state FROM task_deps d JOIN tasks t ON t.id = d.task_id
         WHERE d.depends_on = ?1 AND t.state IN ('pending', 'ready', 'review', 'in_progress'){}",
        match tx.dialect() {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE OF t",
        }
    );
    while let Some(dep) = queue.pop() {
        for row in tx.query(&sql, args![dep])? {
            let child: i64 = row.get(0)?;
            let reason =
                format!("cancelled because task {dep}, which it depends on, will never complete");
            let reviewers = cancel_one(
                tx,
                child,
                parse_state(&row.get::<String>(1)?)?,
                &reason,
                actor,
                now,
            )?;
            cancelled.push(child);
            cancelled.extend(reviewers);
            queue.push(child);
        }
    }
    Ok(cancelled)
}
