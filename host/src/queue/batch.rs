//! The throughput path: a batch of finished runs, or a batch of claims,
//! written with a few set-based statements instead of a few per task.
//!
//! On PostgreSQL every statement is a round trip to the server, so a run
//! that costs five statements costs five round trips; here a whole batch
//! of plain completions costs five. (SQLite gains less: its statements are
//! function calls.) Only the common case takes this path — a successful
//! run that needs no review, wrote no state, queued no effect, spawned
//! nothing and has no chain to insert; every other run goes through
//! [`tasks::finish_in`] one by one, in the same transaction.
//!
//! The invariants are the same as on the slow path: each completion is
//! fenced on `(id, state = 'in_progress', claim_token)` by a locking read,
//! asks the transition table, and writes its audit event.

use std::collections::HashMap;

use serde_json::json;

use crate::task::{self, Event, RunOutcome, State};

use super::sql::{Param, Sql};
use super::tasks::{self, promote_due_in};
use super::validate::validate_json;
use super::{Applied, FinishedRun, MAX_OUTPUT_BYTES, Result};

/// Rows per statement: well under both databases' limits on parameters.
const CHUNK: usize = 200;

/// `(?1, ?2), (?3, ?4), ...`: `rows` groups of `width` numbered placeholders,
/// each wrapped by `cast(column, placeholder)`.
fn values_list(rows: usize, width: usize, cast: impl Fn(usize, String) -> String) -> String {
    let mut out = String::new();
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..width {
            if c > 0 {
                out.push_str(", ");
            }
            out.push_str(&cast(c, format!("?{}", r * width + c + 1)));
        }
        out.push(')');
    }
    out
}

/// One audit event to write.
pub(super) struct NewEvent {
    pub task_id: i64,
    pub event: Event,
    pub from: State,
    pub to: State,
    pub detail: String,
}

/// Writes many audit events with one statement per [`CHUNK`].
pub(super) fn insert_events(
    tx: &dyn Sql,
    events: &[NewEvent],
    actor: &str,
    now: i64,
) -> Result<()> {
    for chunk in events.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail) VALUES {}",
            values_list(chunk.len(), 7, |_, p| p)
        );
        let mut args = Vec::with_capacity(chunk.len() * 7);
        for e in chunk {
            args.extend([
                Param::Int(now),
                Param::Int(e.task_id),
                Param::Text(e.event.as_str()),
                Param::Text(e.from.as_str()),
                Param::Text(e.to.as_str()),
                Param::Text(actor),
                Param::Text(&e.detail),
            ]);
        }
        tx.execute(&sql, &args)?;
    }
    Ok(())
}

/// What the locking read found about a task a run held.
struct Held {
    token: i64,
    attempts: u32,
    /// Review, a reviewer task, or a chain to insert: not a plain completion.
    special: bool,
}

/// Records a batch of finished runs: plain completions set-based, the rest
/// one by one. Answers in the order of `runs`.
pub(super) fn finish_runs(
    tx: &dyn Sql,
    runs: &[FinishedRun],
    actor: &str,
    max_payload: usize,
    now: i64,
) -> Result<Vec<Applied>> {
    let mut out = vec![Applied::LeaseLost; runs.len()];
    let mut plain = Vec::new();
    let mut others = Vec::new();
    for chunk in (0..runs.len()).collect::<Vec<_>>().chunks(CHUNK) {
        let held = lock_held(tx, chunk.iter().map(|&i| runs[i].lease.task_id))?;
        for &i in chunk {
            let run = &runs[i];
            match held.get(&run.lease.task_id) {
                Some(h) if h.token == run.lease.token && !h.special && is_plain(run) => {
                    plain.push((i, h.attempts))
                }
                _ => others.push(i),
            }
        }
    }
    complete_plain(tx, runs, &plain, actor, now)?;
    for &(i, _) in &plain {
        out[i] = Applied::Moved(State::Complete);
    }
    for i in others {
        out[i] = tasks::finish_in(tx, &runs[i], actor, max_payload, now)?;
    }
    Ok(out)
}

/// A successful run with nothing but its output and log to store.
fn is_plain(run: &FinishedRun) -> bool {
    match &run.outcome {
        RunOutcome::Success {
            output,
            spawn,
            needs_review,
        } => {
            !needs_review
                && spawn.is_empty()
                && run.state.is_empty()
                && run.effects.is_empty()
                // A bad output fails the run: the slow path says how.
                && validate_json("output", output, MAX_OUTPUT_BYTES).is_ok()
        }
        RunOutcome::Failure(_) => false,
    }
}

/// Locks the in-progress rows of `ids` and reads what deciding needs.
fn lock_held(tx: &dyn Sql, ids: impl Iterator<Item = i64>) -> Result<HashMap<i64, Held>> {
    let ids: Vec<i64> = ids.collect();
    let marks: Vec<String> = (1..=ids.len()).map(|i| format!("?{i}")).collect();
    let sql = format!(
        "SELECT id, claim_token, attempts,
                CASE WHEN review = 0 AND reviews IS NULL AND next_tasks IS NULL THEN 0 ELSE 1 END
         FROM tasks WHERE state = 'in_progress' AND id IN ({}){}",
        marks.join(", "),
        tx.for_update()
    );
    let args: Vec<Param<'_>> = ids.iter().map(|&id| Param::Int(id)).collect();
    let mut held = HashMap::with_capacity(ids.len());
    for row in tx.query(&sql, &args)? {
        held.insert(
            row.get(0)?,
            Held {
                token: row.get::<Option<i64>>(1)?.unwrap_or(0),
                attempts: row.get(2)?,
                special: row.get(3)?,
            },
        );
    }
    Ok(held)
}

/// Completes the plain runs `(index, attempts)`: their rows, events, logs,
/// and the dependents they release.
fn complete_plain(
    tx: &dyn Sql,
    runs: &[FinishedRun],
    plain: &[(usize, u32)],
    actor: &str,
    now: i64,
) -> Result<()> {
    if plain.is_empty() {
        return Ok(());
    }
    let to = task::transition(Some(State::InProgress), Event::Complete).expect("runs complete");
    let events: Vec<NewEvent> = plain
        .iter()
        .map(|&(i, attempts)| NewEvent {
            task_id: runs[i].lease.task_id,
            event: Event::Complete,
            from: State::InProgress,
            to,
            detail: json!({ "attempt": attempts }).to_string(),
        })
        .collect();
    insert_events(tx, &events, actor, now)?;
    for chunk in plain.chunks(CHUNK) {
        let mut args = vec![Param::Int(now), Param::Text(to.as_str())];
        let mut logs = Vec::new();
        for &(i, attempts) in chunk {
            let run = &runs[i];
            let RunOutcome::Success { output, .. } = &run.outcome else {
                unreachable!("plain runs succeeded")
            };
            args.extend([Param::Int(run.lease.task_id), Param::Text(output)]);
            if !run.log.is_empty() {
                logs.push((run.lease.task_id, attempts, run.log.as_str()));
            }
        }
        // The VALUES rows start after the two shared arguments.
        let rows = values_list(chunk.len(), 2, |c, p| match c {
            0 => format!("CAST({p} AS BIGINT)"),
            _ => format!("CAST({p} AS TEXT)"),
        });
        let rows = shift_placeholders(&rows, 2);
        tx.execute(
            &format!(
                "UPDATE tasks SET state = ?2, result = v.column2, claim_token = NULL, claimed_by = NULL,
                        heartbeat_at = NULL, error_kind = NULL, error_message = NULL, spawned = NULL,
                        replay_token = NULL, held_state = NULL, finished_at = ?1, updated_at = ?1
                 FROM (VALUES {rows}) AS v WHERE tasks.id = v.column1"
            ),
            &args,
        )?;
        insert_logs(tx, &logs, now)?;
        release_dependents(
            tx,
            chunk.iter().map(|&(i, _)| runs[i].lease.task_id),
            actor,
            now,
        )?;
    }
    Ok(())
}

/// Renumbers `?N` to `?(N + by)`.
fn shift_placeholders(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + sql.len() / 8);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '?' {
            let mut n = String::new();
            while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                n.push(*d);
                chars.next();
            }
            let n: usize = n.parse().expect("a numbered placeholder");
            out.push_str(&(n + by).to_string());
        }
    }
    out
}

fn insert_logs(tx: &dyn Sql, logs: &[(i64, u32, &str)], now: i64) -> Result<()> {
    if logs.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO task_logs (task_id, attempt, at, text) VALUES {}",
        values_list(logs.len(), 4, |_, p| p)
    );
    let mut args = Vec::with_capacity(logs.len() * 4);
    for &(id, attempt, text) in logs {
        args.extend([
            Param::Int(id),
            Param::Int(attempt.into()),
            Param::Int(now),
            Param::Text(text),
        ]);
    }
    tx.execute(&sql, &args)?;
    Ok(())
}

/// Counts the completions off the tasks waiting on them, and promotes those
/// with nothing left to wait for.
fn release_dependents(
    tx: &dyn Sql,
    done: impl Iterator<Item = i64>,
    actor: &str,
    now: i64,
) -> Result<()> {
    let done: Vec<i64> = done.collect();
    let marks: Vec<String> = (1..=done.len()).map(|i| format!("?{i}")).collect();
    let marks = marks.join(", ");
    let args: Vec<Param<'_>> = done.iter().map(|&id| Param::Int(id)).collect();
    let woken = tx.execute(
        &format!(
            "UPDATE tasks SET pending_deps = pending_deps
                 - (SELECT COUNT(*) FROM task_deps d WHERE d.task_id = tasks.id AND d.depends_on IN ({marks}))
             WHERE state = 'pending' AND id IN (SELECT task_id FROM task_deps WHERE depends_on IN ({marks}))"
        ),
        &args,
    )?;
    if woken > 0 {
        promote_due_in(tx, actor, now)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_shift_and_lists_number_in_order() {
        assert_eq!(values_list(2, 2, |_, p| p), "(?1, ?2), (?3, ?4)");
        assert_eq!(shift_placeholders("(?1, ?12)", 2), "(?3, ?14)");
    }
}
