//! The throughput path: a batch of finished runs, or a batch of claims,
//! written with a few set-based statements instead of a few per task.
//!
//! On PostgreSQL every statement is a round trip to the server, so a run
//! that costs five statements costs five round trips; here a whole batch
//! of plain completions costs five. On SQLite a statement is a function
//! call: events go a few rows per cached statement ([`BySize`]), and each
//! completion is one cached one-row UPDATE fenced in its own WHERE.
//! Only the common case takes this path — a successful
//! run that needs no review, queued no effect, spawned nothing and has no
//! chain to insert, and on PostgreSQL wrote no state either (on SQLite the
//! batch's state writes are checked run by run and applied together, see
//! [`state::BatchWrites`]); every other run goes through
//! [`finish::finish_in`] one by one, in the same transaction, after them.
//!
//! The invariants are the same as on the slow path: each completion is
//! fenced on `(id, state = 'in_progress', claim_token)` in the UPDATE's own
//! WHERE (which also locks the row on PostgreSQL), asks the transition
//! table, and writes its audit event.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::task::{self, Event, RunOutcome, State};

use super::finish;
use super::sql::{Dialect, Param, Sql, args};
use super::tasks::promote_due_in;
use super::validate::validate_json;
use super::{Applied, ClaimFacts, FinishedRun, MAX_OUTPUT_BYTES, Result, state};

/// Rows per statement: well under both databases' limits on parameters.
const CHUNK: usize = 200;

/// `(?1, ?2), (?3, ?4), ...`: `rows` groups of `width` numbered placeholders,
/// each wrapped by `cast(column, placeholder)`.
pub(super) fn values_list(
    rows: usize,
    width: usize,
    cast: impl Fn(usize, String) -> String,
) -> String {
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
    /// The event's name: a transition's (`Event::as_str`), or a record
    /// such as `state_write` (then `from` and `to` are the same).
    pub event: &'static str,
    /// `None` for a submit: the task had no state before.
    pub from: Option<State>,
    pub to: State,
    pub detail: String,
}

/// Statements whose text depends on how many rows they write, for the few
/// sizes SQLite gets: [`SQLITE_ROWS`], each text built once. SQLite parses
/// a statement of a new text anew each time (measured: ~100 µs for a
/// 20-row INSERT, more than running it), but a cached statement of a fixed
/// size writes many rows for one statement's setup (cursors on the table
/// and each index, binding, halting), which costs as much as a row.
///
/// On SQLite these statements say `OR FAIL`: a statement that writes many
/// rows and may abort half-way (any NOT NULL column may) otherwise keeps
/// a statement journal, a copy of every page it touches, to undo its own
/// rows. Here an error fails the whole transaction anyway, which rolls
/// back everything, so that copy is never needed.
pub(super) struct BySize {
    build: fn(Dialect, usize) -> String,
    texts: std::sync::OnceLock<Vec<String>>,
}

/// Rows per statement on SQLite, largest first: a batch is written as
/// `16 + 16 + ... + 4 + ... + 1 + ...` rows.
const SQLITE_ROWS: [usize; 3] = [16, 4, 1];

impl BySize {
    pub(super) const fn new(build: fn(Dialect, usize) -> String) -> BySize {
        BySize {
            build,
            texts: std::sync::OnceLock::new(),
        }
    }

    /// `items` cut into the rows of successive statements in `dialect`.
    pub(super) fn chunks<T>(dialect: Dialect, mut items: &[T]) -> impl Iterator<Item = &[T]> {
        std::iter::from_fn(move || {
            let rows = match dialect {
                _ if items.is_empty() => return None,
                Dialect::Postgres => items.len().min(CHUNK),
                Dialect::Sqlite => *SQLITE_ROWS.iter().find(|&&n| n <= items.len())?,
            };
            let (chunk, rest) = items.split_at(rows);
            items = rest;
            Some(chunk)
        })
    }

    /// The statement for `rows` rows in `dialect`.
    pub(super) fn sql(&'static self, dialect: Dialect, rows: usize) -> Cow<'static, str> {
        let cached = match dialect {
            Dialect::Sqlite => SQLITE_ROWS.iter().position(|&n| n == rows),
            Dialect::Postgres => None,
        };
        let Some(i) = cached else {
            return Cow::Owned((self.build)(dialect, rows));
        };
        let texts = self.texts.get_or_init(|| {
            SQLITE_ROWS
                .iter()
                .map(|&n| (self.build)(Dialect::Sqlite, n))
                .collect()
        });
        Cow::Borrowed(texts[i].as_str())
    }
}

/// `INSERT`, or on SQLite `INSERT OR FAIL` (see [`BySize`]).
pub(super) fn insert_or_fail(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Sqlite => "INSERT OR FAIL",
        Dialect::Postgres => "INSERT",
    }
}

static INSERT_EVENTS: BySize = BySize::new(|dialect, rows| {
    format!(
        "{} INTO events (at, task_id, event, from_state, to_state, actor, detail) VALUES {}",
        insert_or_fail(dialect),
        values_list(rows, 7, |_, p| p)
    )
});

/// Writes many audit events, many per statement (see [`BySize`]).
pub(super) fn insert_events(
    tx: &dyn Sql,
    events: &[NewEvent],
    actor: &str,
    now: i64,
) -> Result<()> {
    for chunk in BySize::chunks(tx.dialect(), events) {
        let mut args = Vec::with_capacity(chunk.len() * 7);
        for e in chunk {
            args.extend([
                Param::Int(now),
                Param::Int(e.task_id),
                Param::Text(e.event),
                match e.from {
                    Some(from) => Param::Text(from.as_str()),
                    None => Param::Null,
                },
                Param::Text(e.to.as_str()),
                Param::Text(actor),
                Param::Text(&e.detail),
            ]);
        }
        tx.execute(&INSERT_EVENTS.sql(tx.dialect(), chunk.len()), &args)?;
    }
    Ok(())
}

/// What [`finish_runs`] did.
#[derive(Default)]
pub(super) struct Finished {
    /// In the order of the runs.
    pub applied: Vec<Applied>,
    /// Whether any run went through [`finish::finish_in`].
    pub took_per_run_path: bool,
}

/// Records a batch of finished runs: plain completions set-based, the rest
/// one by one.
pub(super) fn finish_runs(
    tx: &dyn Sql,
    runs: &[FinishedRun],
    actor: &str,
    max_payload: usize,
    now: i64,
) -> Result<Finished> {
    // Every key the batch writes, locked first and in order (PostgreSQL).
    super::state::lock_batch_keys(tx, runs)?;
    let mut out = vec![None; runs.len()];
    let dialect = tx.dialect();
    let candidates: Vec<usize> = (0..runs.len())
        .filter(|&i| is_plain(&runs[i], dialect))
        .collect();
    for chunk in candidates.chunks(CHUNK) {
        for (i, attempts) in complete_plain(tx, runs, chunk, actor, now)? {
            out[i] = Some(attempts);
        }
    }
    let mut finished = Finished {
        applied: Vec::with_capacity(runs.len()),
        took_per_run_path: false,
    };
    for (i, done) in out.into_iter().enumerate() {
        finished.applied.push(match done {
            Some(_) => Applied::Moved(State::Complete),
            None => {
                finished.took_per_run_path = true;
                finish::finish_in(tx, &runs[i], actor, max_payload, now)?
            }
        });
    }
    Ok(finished)
}

/// A successful run with nothing but its output and log to store (and on
/// SQLite, its state writes).
fn is_plain(run: &FinishedRun, dialect: Dialect) -> bool {
    match &run.outcome {
        RunOutcome::Success {
            output,
            spawn,
            needs_review,
        } => {
            !needs_review
                && spawn.is_empty()
                && (run.state.is_empty() || dialect == Dialect::Sqlite)
                && run.effects.is_empty()
                // A bad output fails the run: the slow path says how.
                && validate_json("output", output, MAX_OUTPUT_BYTES).is_ok()
        }
        RunOutcome::Failure(_) => false,
    }
}

/// Completes those of the runs at `indexes` whose task is still theirs
/// (fenced on state and claim token) and needs no review, no reviewer
/// verdict and no chain: their rows, events, logs, and the dependents they
/// release. Answers `(index, attempt)` of each run it completed; the others
/// are left to the per-run path.
fn complete_plain(
    tx: &dyn Sql,
    runs: &[FinishedRun],
    indexes: &[usize],
    actor: &str,
    now: i64,
) -> Result<Vec<(usize, u32)>> {
    if indexes.is_empty() {
        return Ok(Vec::new());
    }
    let to = task::transition(Some(State::InProgress), Event::Complete).expect("runs complete");
    let mut events: Vec<NewEvent> = Vec::new();
    let done = match tx.dialect() {
        Dialect::Sqlite => {
            let mut writes = state::BatchWrites::default();
            let done = complete_rows_one_by_one(tx, runs, indexes, to, &mut writes, now)?;
            writes.apply(tx, now)?;
            // State writes come before the completion that commits them,
            // as on the per-run path.
            events.extend(writes.events.into_iter().map(|(task_id, detail)| NewEvent {
                task_id,
                event: "state_write",
                from: Some(State::InProgress),
                to: State::InProgress,
                detail,
            }));
            done
        }
        Dialect::Postgres => complete_rows(tx, runs, indexes, to, now)?,
    };
    if done.is_empty() {
        return Ok(done);
    }
    events.extend(done.iter().map(|&(i, attempt)| NewEvent {
        task_id: runs[i].lease.task_id,
        event: Event::Complete.as_str(),
        from: Some(State::InProgress),
        to,
        detail: format!(r#"{{"attempt":{attempt}}}"#),
    }));
    insert_events(tx, &events, actor, now)?;
    let logs: Vec<(i64, u32, &str)> = done
        .iter()
        .filter(|&&(i, _)| !runs[i].log.is_empty())
        .map(|&(i, attempt)| (runs[i].lease.task_id, attempt, runs[i].log.as_str()))
        .collect();
    insert_logs(tx, &logs, now)?;
    release_dependents(
        tx,
        done.iter().map(|&(i, _)| runs[i].lease.task_id),
        actor,
        now,
    )?;
    Ok(done)
}

/// A plain run's output (see [`is_plain`]).
fn plain_output(run: &FinishedRun) -> &str {
    match &run.outcome {
        RunOutcome::Success { output, .. } => output,
        RunOutcome::Failure(_) => unreachable!("plain runs succeeded"),
    }
}

/// What the claim said of a plain run's task, read back for a caller that
/// did not keep it (see [`FinishedRun::claimed`]), on SQLite. (`+?N`: see
/// `tasks::CLAIMABLE_SQLITE`.)
const CLAIM_FACTS_SQLITE: &str = "SELECT attempts, agent, COALESCE(root_id, id) FROM tasks
 WHERE id = +?1 AND claim_token = +?2 AND state = 'in_progress'";

/// `UPDATE tasks SET` what a completion sets, for SQLite's one-row
/// completions: `?1` now, `?2` the state, `?4` the result.
macro_rules! complete_one_sqlite {
    ($where:literal) => {
        concat!(
            "UPDATE tasks SET state = ?2, result = ?4, claim_token = NULL, claimed_by = NULL,
                heartbeat_at = NULL, error_kind = NULL, error_message = NULL, spawned = NULL,
                replay_token = NULL, held_state = NULL, finished_at = ?1, updated_at = ?1
             WHERE ",
            $where
        )
    };
}

/// Completes task `?3` whatever holds it: for a caller that checked first.
pub(super) const COMPLETE_ONE_SQLITE: &str = complete_one_sqlite!("id = +?3");

/// Completes a plain run's task by id, fenced in its own WHERE: the task is
/// still the run's (state and claim token), the claim's facts hold, and it
/// needs no review, no reviewer verdict and no chain. Where the fence fails
/// nothing changes and the per-run path says why. No read comes first, and
/// no RETURNING (see `tasks::CLAIMABLE_SQLITE`): the run brings the facts.
const COMPLETE_FENCED_SQLITE: &str = complete_one_sqlite!(
    "id = +?3 AND claim_token = +?5 AND attempts = +?6 AND agent = +?7
       AND COALESCE(root_id, id) = +?8
       AND state = 'in_progress' AND review = 0 AND reviews IS NULL AND next_tasks IS NULL"
);

/// Completes each run at `indexes` whose task is still its own, one cached
/// fenced UPDATE each; its state writes are checked (reads only) before
/// and accepted into `writes` after, for the caller to apply. Answers
/// `(index, attempt)` of those completed. A run whose `set-if` conflicts
/// is left to the per-run path, which fails it.
fn complete_rows_one_by_one<'a>(
    tx: &dyn Sql,
    runs: &'a [FinishedRun],
    indexes: &[usize],
    to: State,
    writes: &mut state::BatchWrites<'a>,
    now: i64,
) -> Result<Vec<(usize, u32)>> {
    let mut done = Vec::with_capacity(indexes.len());
    for &i in indexes {
        let run = &runs[i];
        let id = run.lease.task_id;
        let read_back;
        let facts = match &run.claimed {
            Some(facts) => facts,
            None => {
                let Some(row) = tx.query_opt(CLAIM_FACTS_SQLITE, args![id, run.lease.token])?
                else {
                    continue; // the per-run path says why
                };
                read_back = ClaimFacts {
                    attempt: row.get(0)?,
                    agent: row.get(1)?,
                    chain: row.get(2)?,
                };
                &read_back
            }
        };
        let checked = if run.state.is_empty() {
            None
        } else {
            let owners = state::Owners::new(facts.agent.clone(), facts.chain);
            match writes.check(tx, &owners, &run.state)? {
                Ok(checked) => Some(checked),
                Err(_conflict) => continue, // the per-run path fails the run
            }
        };
        let completed = tx.execute(
            COMPLETE_FENCED_SQLITE,
            args![
                now,
                to.as_str(),
                id,
                plain_output(run),
                run.lease.token,
                facts.attempt,
                facts.agent,
                facts.chain
            ],
        )?;
        if completed == 0 {
            continue; // the per-run path says why
        }
        if let Some(checked) = checked {
            writes.accept(id, &run.state, checked);
        }
        done.push((i, facts.attempt));
    }
    Ok(done)
}

/// Completes the runs at `indexes` whose task is still theirs in one
/// statement; answers `(index, attempt)` of those completed.
fn complete_rows(
    tx: &dyn Sql,
    runs: &[FinishedRun],
    indexes: &[usize],
    to: State,
    now: i64,
) -> Result<Vec<(usize, u32)>> {
    let mut args = vec![Param::Int(now), Param::Text(to.as_str())];
    for &i in indexes {
        let run = &runs[i];
        let output = plain_output(run);
        args.extend([
            Param::Int(run.lease.task_id),
            Param::Int(run.lease.token),
            Param::Text(output),
        ]);
    }
    // The VALUES rows start after the two shared arguments.
    let rows = values_list(indexes.len(), 3, |c, p| match c {
        2 => format!("CAST({p} AS TEXT)"),
        _ => format!("CAST({p} AS BIGINT)"),
    });
    let rows = shift_placeholders(&rows, 2);
    let completed = tx.query(
        &format!(
            "UPDATE tasks SET state = ?2, result = v.column3, claim_token = NULL, claimed_by = NULL,
                    heartbeat_at = NULL, error_kind = NULL, error_message = NULL, spawned = NULL,
                    replay_token = NULL, held_state = NULL, finished_at = ?1, updated_at = ?1
             FROM (VALUES {rows}) AS v
             WHERE tasks.id = v.column1 AND tasks.claim_token = v.column2
               AND tasks.state = 'in_progress' AND tasks.review = 0
               AND tasks.reviews IS NULL AND tasks.next_tasks IS NULL
             RETURNING id, v.column2, attempts"
        ),
        &args,
    )?;
    // By lease, not by task: a batch may hold an old run of a task beside
    // the run of its new claim, and only the run whose token matched
    // completed it. Each completion is credited to one run: the per-run
    // path refuses any other with the same lease.
    let mut attempts = HashMap::with_capacity(completed.len());
    for row in completed {
        attempts.insert((row.get::<i64>(0)?, row.get::<i64>(1)?), row.get::<u32>(2)?);
    }
    Ok(indexes
        .iter()
        .filter_map(|&i| {
            let lease = runs[i].lease;
            attempts
                .remove(&(lease.task_id, lease.token))
                .map(|a| (i, a))
        })
        .collect())
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
    if tx.dialect() == Dialect::Sqlite {
        for &(id, attempt, text) in logs {
            tx.execute(
                "INSERT INTO task_logs (task_id, attempt, at, text) VALUES (?1, ?2, ?3, ?4)",
                args![id, attempt, now, text],
            )?;
        }
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
pub(super) fn release_dependents(
    tx: &dyn Sql,
    done: impl Iterator<Item = i64>,
    actor: &str,
    now: i64,
) -> Result<()> {
    let done: Vec<i64> = done.collect();
    let woken = match tx.dialect() {
        // Most tasks have no dependents: look them up first, on the covering
        // index, and count off only those (an UPDATE with IN (SELECT ...)
        // builds a temporary table at every run; see `tasks::CLAIMABLE_SQLITE`).
        Dialect::Sqlite => {
            let mut woken = 0;
            for dependent in dependents_sqlite(tx, &done)? {
                woken += tx.execute(
                    "UPDATE tasks SET pending_deps = pending_deps - 1
                     WHERE id = +?1 AND state = 'pending'",
                    args![dependent],
                )?;
            }
            woken
        }
        Dialect::Postgres => count_off_dependents(tx, &done)?,
    };
    if woken > 0 {
        promote_due_in(tx, actor, now)?;
    }
    Ok(())
}

/// The tasks waiting on each of `done` (once per dependency), on SQLite.
/// A batch's ids lie close together, so one look at the span they cover
/// usually answers for all of them (most tasks have no dependents, and the
/// span holds few rows); ids spread wide are looked up one by one.
fn dependents_sqlite(tx: &dyn Sql, done: &[i64]) -> Result<Vec<i64>> {
    let (Some(&lo), Some(&hi)) = (done.iter().min(), done.iter().max()) else {
        return Ok(Vec::new());
    };
    if hi - lo > 4 * done.len() as i64 + 64 {
        let mut dependents = Vec::new();
        for &id in done {
            dependents.extend(tx.query_column::<i64>(
                "SELECT task_id FROM task_deps WHERE depends_on = ?1",
                args![id],
            )?);
        }
        return Ok(dependents);
    }
    let mut sorted = done.to_vec();
    sorted.sort_unstable();
    let mut dependents = Vec::new();
    for row in tx.query(
        "SELECT task_id, depends_on FROM task_deps WHERE depends_on BETWEEN ?1 AND ?2",
        args![lo, hi],
    )? {
        if sorted.binary_search(&row.get::<i64>(1)?).is_ok() {
            dependents.push(row.get(0)?);
        }
    }
    Ok(dependents)
}

/// [`release_dependents`]' count in one statement.
fn count_off_dependents(tx: &dyn Sql, done: &[i64]) -> Result<u64> {
    let marks: Vec<String> = (1..=done.len()).map(|i| format!("?{i}")).collect();
    let marks = marks.join(", ");
    let args: Vec<Param<'_>> = done.iter().map(|&id| Param::Int(id)).collect();
    tx.execute(
        &format!(
            "UPDATE tasks SET pending_deps = pending_deps
                 - (SELECT COUNT(*) FROM task_deps d WHERE d.task_id = tasks.id AND d.depends_on IN ({marks}))
             WHERE state = 'pending' AND id IN (SELECT task_id FROM task_deps WHERE depends_on IN ({marks}))"
        ),
        &args,
    )
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
