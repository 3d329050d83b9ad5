//! How a run ends, inside a transaction: the fenced read of the task, the
//! log, then completion (or review) or a failure that retries with backoff
//! or fails for good. A result that arrives after its lease was lost
//! changes nothing and is put on the audit trail.

use std::time::Duration;

use serde_json::json;

use crate::retry;
use crate::task::{Event, RunOutcome, State, TaskError};

use super::cancel::cancel_dependents;
use super::sql::{Sql, args};
use super::tasks::{REPLAY_FROM_THIS_RUN, lock_held, parse_state, record, set_failed};
use super::{Applied, FinishedRun, Result, outbox, review};

/// Puts a refused late result on the audit trail (it changes no state): a
/// run that finished after its lease was reset, cancelled or re-claimed.
/// Without it, the trail would show a second claim and no trace of the first
/// run's outcome, which only the old holder's log would mention.
pub(super) fn record_refused_result(
    tx: &dyn Sql,
    run: &FinishedRun,
    actor: &str,
    now: i64,
) -> Result<()> {
    let id = run.lease.task_id;
    let Some(current) = tx.query_opt(
        "SELECT state, claimed_by FROM tasks WHERE id = ?1",
        args![id],
    )?
    else {
        return Ok(());
    };
    let state: String = current.get(0)?;
    let holder: Option<String> = current.get(1)?;
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
    tx.execute(
        "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
         VALUES (?1, ?2, 'result_refused', ?3, ?3, ?4, ?5)",
        args![now, id, state, actor, detail.to_string()],
    )?;
    Ok(())
}

/// The state this run's outcome moved its task to, if an earlier
/// transaction of this holder already stored it: a store retried after a
/// commit whose answer was lost (`CommitUnknown`: the connection dropped
/// during COMMIT) finds its lease gone because its own first try took it.
/// That is not a late result to refuse on the audit trail. Recognised by
/// the first transition out of `in_progress` after this run's claim (the
/// claim event holding its token) being one only a run's outcome writes,
/// by this holder.
fn stored_already(tx: &dyn Sql, run: &FinishedRun, actor: &str) -> Result<Option<State>> {
    let id = run.lease.task_id;
    let claims = tx.query(
        "SELECT id, detail FROM events WHERE task_id = ?1 AND event = 'claim'",
        args![id],
    )?;
    let mut this_claim = None;
    for claim in claims {
        let token = serde_json::from_str::<serde_json::Value>(&claim.get::<String>(1)?)
            .ok()
            .and_then(|detail| detail["token"].as_i64());
        if token == Some(run.lease.token) {
            this_claim = Some(claim.get::<i64>(0)?);
        }
    }
    let Some(claim_id) = this_claim else {
        return Ok(None);
    };
    let Some(outcome) = tx.query_opt(
        "SELECT event, actor, to_state FROM events
         WHERE task_id = ?1 AND id > ?2 AND from_state = 'in_progress' AND to_state <> 'in_progress'
         ORDER BY id LIMIT 1",
        args![id, claim_id],
    )?
    else {
        return Ok(None);
    };
    let by_a_run = [
        Event::Complete,
        Event::CompleteForReview,
        Event::RetryLater,
        Event::Fail,
    ]
    .map(Event::as_str)
    .contains(&outcome.get::<String>(0)?.as_str());
    if !by_a_run || outcome.get::<String>(1)? != actor {
        return Ok(None);
    }
    Ok(Some(parse_state(&outcome.get::<String>(2)?)?))
}

/// The row facts `finish_in` needs about a task it holds the lease of.
pub(super) struct Held {
    pub attempts: u32,
    pub max_attempts: u32,
    pub review: bool,
    pub reviewer: Option<String>,
    pub reviews: Option<i64>,
    pub backoff_ms: u64,
}

/// Records how one run ended (see `Queue::finish_batch`).
pub(super) fn finish_in(
    tx: &dyn Sql,
    run: &FinishedRun,
    actor: &str,
    max_payload: usize,
    now: i64,
) -> Result<Applied> {
    let id = run.lease.task_id;
    let held = tx.query_opt(
        &lock_held(
            tx,
            "SELECT attempts, max_attempts, review, reviewer, reviews, backoff_ms FROM tasks",
        ),
        args![id, run.lease.token],
    )?;
    let Some(row) = held else {
        if let Some(to) = stored_already(tx, run, actor)? {
            return Ok(Applied::Moved(to));
        }
        record_refused_result(tx, run, actor, now)?;
        return Ok(Applied::LeaseLost);
    };
    let held = Held {
        attempts: row.get(0)?,
        max_attempts: row.get(1)?,
        review: row.get(2)?,
        reviewer: row.get(3)?,
        reviews: row.get(4)?,
        backoff_ms: row.get(5)?,
    };
    if !run.log.is_empty() {
        tx.execute(
            "INSERT INTO task_logs (task_id, attempt, at, text) VALUES (?1, ?2, ?3, ?4)",
            args![id, held.attempts, now, run.log],
        )?;
    }
    let outcome = match review::check_outcome(&run.outcome, held.reviews, max_payload) {
        Ok(answer) => {
            review::check_state_writes(tx, id, &run.state)?.map(|owners| (answer, owners))
        }
        Err(error) => Err(error),
    };
    let to = match outcome {
        Ok(((output, spawn, needs_review), owners)) => {
            if held.review || needs_review {
                super::state::hold_writes(tx, id, &run.state)?;
                outbox::store(tx, id, &run.effects, true, now)?;
                let run = review::HeldRun {
                    output,
                    spawn: &spawn,
                    effects: &run.effects,
                    writes: &run.state,
                };
                review::enter_review(tx, id, &held, &run, actor, now)?
            } else {
                if let Some(checked) = &owners {
                    checked.apply(tx, id, State::InProgress, &run.state, actor, now)?;
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
                review::complete(tx, id, to, output, spawn, actor, now)?;
                if let Some(judged) = held.reviews {
                    review::apply_verdict(tx, id, judged, output, actor, now)?;
                }
                to
            }
        }
        Err(error) => {
            // An interrupted run's model calls are replayed by the next run;
            // after an answer of the agent's own, the next run asks afresh.
            // A run that made no model call leaves the older journal in place.
            tx.execute(
                &format!(
                    "UPDATE tasks SET replay_token = CASE WHEN ?1 = 1 THEN {REPLAY_FROM_THIS_RUN} ELSE NULL END
                     WHERE id = ?2"
                ),
                args![error.kind.is_interruption(), id],
            )?;
            fail_run(tx, id, &held, &error, actor, now)?
        }
    };
    Ok(Applied::Moved(to))
}

fn fail_run(
    tx: &dyn Sql,
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
        tx.execute(
            "UPDATE tasks SET state = ?6, run_at = ?1, error_kind = ?2, error_message = ?3,
                    claim_token = NULL, claimed_by = NULL, heartbeat_at = NULL, updated_at = ?4
             WHERE id = ?5",
            args![
                run_at,
                error.kind.as_str(),
                error.message,
                now,
                id,
                to.as_str()
            ],
        )?;
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
        set_failed(tx, id, to, error, now)?;
        cancel_dependents(tx, id, actor, now)?;
        Ok(to)
    }
}
