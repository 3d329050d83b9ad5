//! Adding tasks inside a transaction: a submit's batch (plain tasks many
//! rows per statement on PostgreSQL), one task with its key, dependencies
//! and chain, and a completion's children, counted against their chain's
//! cap. Every insert records its audit event through [`record`].

use serde_json::json;

use crate::task::{self, Event, NewTask, NextSpec, State};

use super::batch::{BySize, NewEvent, insert_events, insert_or_fail, values_list};
use super::sql::{Dialect, Param, Sql, ToParam, args};
use super::tasks::{parse_state, record};
use super::validate::stored_json;
use super::{QueueError, Result, Submitted};

/// Inserts a validated batch, in order. On PostgreSQL, where a statement
/// is a round trip, each run of tasks that need no read first (no
/// idempotency key, no dependencies) goes many rows per statement
/// ([`insert_plain_tasks`]: 20,000 tasks submitted at 14,500 a second one
/// by one); every other task, and every task on SQLite, where a statement
/// is a function call, one by one.
pub(super) fn insert_new_tasks(
    tx: &dyn Sql,
    batch: &[NewTask],
    actor: &str,
    now: i64,
) -> Result<Vec<Submitted>> {
    refuse_dead_dependencies(tx, batch)?;
    let mut out = Vec::with_capacity(batch.len());
    let mut may_draw_ids = None;
    while out.len() < batch.len() {
        let next = out.len();
        let plain = match tx.dialect() {
            Dialect::Postgres => batch[next..].iter().take_while(|t| is_plain(t)).count(),
            Dialect::Sqlite => 0,
        };
        if plain > 1 && may_draw_task_ids(tx, &mut may_draw_ids)? {
            out.extend(insert_plain_tasks(
                tx,
                batch,
                next..next + plain,
                actor,
                now,
            )?);
        } else {
            let submitted = insert_new_task(tx, &batch[next], None, actor, now)
                .map_err(|e| super::in_batch(next, e))?;
            out.push(submitted);
        }
    }
    Ok(out)
}

/// Refuses a batch naming a dependency that does not exist or can never
/// complete, before any of it is inserted: on PostgreSQL the earlier tasks'
/// events would take ids from the sequence and give them back at the
/// rollback, and every follower of the trail waits 10 s at such a hole.
/// (Each task's insert checks again, under its lock.) SQLite gives a
/// rolled-back id out again, so there the inserts' own checks suffice.
fn refuse_dead_dependencies(tx: &dyn Sql, batch: &[NewTask]) -> Result<()> {
    if tx.dialect() == Dialect::Sqlite {
        return Ok(());
    }
    for (index, task) in batch.iter().enumerate() {
        for &dep in &task.depends_on {
            let state = tx.query_opt("SELECT state FROM tasks WHERE id = ?1", args![dep])?;
            let state = state.map(|r| r.get::<String>(0)).transpose()?;
            let state = state.as_deref().map(parse_state).transpose()?;
            if let Err(refused) = dependency_waits(dep, state) {
                return Err(super::in_batch(index, refused));
            }
        }
    }
    Ok(())
}

/// Whether a task may wait for dependency `dep` in `state` (`None`: no such
/// task): `Ok(true)` while it has not completed, an error naming it when it
/// does not exist or failed or was cancelled (the task could never run).
fn dependency_waits(dep: i64, state: Option<State>) -> Result<bool> {
    match state {
        // Named as the user wrote it: `--after`, `"after"`.
        None => Err(QueueError::invalid(
            "after",
            format!("task {dep} does not exist"),
        )),
        Some(State::Complete) => Ok(false),
        Some(s @ (State::Failed | State::Cancelled)) => Err(QueueError::invalid(
            "after",
            format!("task {dep} is {s}, so this task could never run; retry task {dep} first"),
        )),
        Some(_) => Ok(true),
    }
}

/// Whether this connection may draw ids from the tasks' sequence itself
/// (asked once per batch): a role granted only the tables, not the
/// sequence, can insert with the default id but not call `nextval`, and
/// then submits one by one.
fn may_draw_task_ids(tx: &dyn Sql, known: &mut Option<bool>) -> Result<bool> {
    if known.is_none() {
        *known = Some(tx.query_value(
            "SELECT has_sequence_privilege(pg_get_serial_sequence('tasks', 'id'), 'USAGE')",
            args![],
        )?);
    }
    Ok(known.unwrap_or(false))
}

/// A task whose insert needs no read first: no idempotency key to look up,
/// no dependencies to check.
fn is_plain(new: &NewTask) -> bool {
    new.key.is_none() && new.depends_on.is_empty()
}

/// Inserts the validated plain tasks at `plain` in `batch` (see
/// [`is_plain`]) and their submit events, many rows per statement: their
/// ids drawn from the sequence first, so that they follow the batch's
/// order, as one by one.
fn insert_plain_tasks(
    tx: &dyn Sql,
    batch: &[NewTask],
    plain: std::ops::Range<usize>,
    actor: &str,
    now: i64,
) -> Result<Vec<Submitted>> {
    let first = plain.start;
    let batch = &batch[plain];
    let next_json: Vec<Option<String>> = batch
        .iter()
        .enumerate()
        .map(|(i, new)| match new.next.is_empty() {
            true => Ok(None),
            false => stored_json("next", &new.next)
                .map(Some)
                .map_err(|e| super::in_batch(first + i, e)),
        })
        .collect::<Result<_>>()?;
    let mut ids: Vec<i64> = tx.query_column(
        "SELECT nextval(pg_get_serial_sequence('tasks', 'id')) FROM generate_series(1, ?1)",
        args![batch.len() as i64],
    )?;
    ids.sort_unstable();
    let mut events = Vec::with_capacity(batch.len());
    for (rows, ids) in BySize::chunks(tx.dialect(), &ids).scan(0, |done, ids| {
        let rows = *done..*done + ids.len();
        *done = rows.end;
        Some((rows, ids))
    }) {
        let mut params = Vec::with_capacity(ids.len() * 16);
        for (i, id) in rows.zip(ids) {
            let new = &batch[i];
            let run_at = new.run_at.unwrap_or(now);
            let event = match run_at <= now {
                true => Event::SubmitReady,
                false => Event::SubmitPending,
            };
            let state = task::transition(None, event).expect("submit is always allowed");
            params.extend([
                id.to_param(),
                new.agent.to_param(),
                new.payload.to_param(),
                Param::Text(state.as_str()),
                new.priority.to_param(),
                new.max_attempts.to_param(),
                new.max_revisions.to_param(),
                Param::Int((new.review || new.reviewer.is_some()) as i64),
                new.reviewer.to_param(),
                Param::Int(run_at),
                new.timeout_ms.to_param(),
                new.backoff_ms.to_param(),
                next_json[i].to_param(),
                Param::Int(now),
                Param::Int(now),
                new.token_budget.to_param(),
            ]);
            events.push(NewEvent {
                task_id: *id,
                event: event.as_str(),
                from: None,
                to: state,
                detail: "{}".into(),
            });
        }
        tx.execute(&INSERT_PLAIN_TASKS.sql(tx.dialect(), ids.len()), &params)?;
    }
    insert_events(tx, &events, actor, now)?;
    tx.signal_work();
    Ok(ids
        .into_iter()
        .map(|id| Submitted { id, existed: false })
        .collect())
}

static INSERT_PLAIN_TASKS: BySize = BySize::new(|dialect, rows| {
    format!(
        "{} INTO tasks (id, agent, payload, state, priority, max_attempts, max_revisions, review,
                        reviewer, run_at, timeout_ms, backoff_ms, next_tasks, created_at,
                        updated_at, token_budget)
         VALUES {}",
        insert_or_fail(dialect),
        values_list(rows, 16, |_, p| p)
    )
});

/// Inserts a validated task (and its dependency rows and submit event).
pub(super) fn insert_new_task(
    tx: &dyn Sql,
    new: &NewTask,
    parent_id: Option<i64>,
    actor: &str,
    now: i64,
) -> Result<Submitted> {
    if let Some(key) = &new.key {
        let existing = tx.query_opt("SELECT id FROM tasks WHERE idem_key = ?1", args![key])?;
        if let Some(row) = existing {
            return Ok(Submitted {
                id: row.get(0)?,
                existed: true,
            });
        }
    }
    let mut pending_deps = 0;
    for &dep in &new.depends_on {
        // FOR SHARE on PostgreSQL: a dependency completing or cancelled in
        // a transaction still open is waited for and read again, so its
        // decrement or cascade (which cannot see this new task yet) is not
        // missed. SQLite's one writer rules the race out.
        let sql = match tx.dialect() {
            Dialect::Sqlite => "SELECT state FROM tasks WHERE id = ?1",
            Dialect::Postgres => "SELECT state FROM tasks WHERE id = ?1 FOR SHARE",
        };
        let state = tx.query_opt(sql, args![dep])?;
        let state = state.map(|r| r.get::<String>(0)).transpose()?;
        let state = state.as_deref().map(parse_state).transpose()?;
        if dependency_waits(dep, state)? {
            pending_deps += 1;
        }
    }
    let run_at = new.run_at.unwrap_or(now);
    let event = if pending_deps == 0 && run_at <= now {
        Event::SubmitReady
    } else {
        Event::SubmitPending
    };
    let next_json = if new.next.is_empty() {
        None
    } else {
        Some(stored_json("next", &new.next)?)
    };
    let review = new.review || new.reviewer.is_some();
    let state = task::transition(None, event).expect("submit is always allowed");
    // ON CONFLICT: a task with the same key committed since the check above
    // (another host, on PostgreSQL) makes this insert a no-op, answered below.
    let inserted = tx.query_opt(
        "INSERT INTO tasks (agent, payload, state, priority, max_attempts, max_revisions, review,
                            reviewer, run_at, timeout_ms, backoff_ms, parent_id, next_tasks,
                            pending_deps, idem_key, created_at, updated_at, token_budget, root_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?16, ?17,
                 (SELECT COALESCE(root_id, id) FROM tasks WHERE id = ?12))
         ON CONFLICT (idem_key) WHERE idem_key IS NOT NULL DO NOTHING
         RETURNING id",
        args![
            new.agent,
            new.payload,
            state.as_str(),
            new.priority,
            new.max_attempts,
            new.max_revisions,
            review,
            new.reviewer,
            run_at,
            new.timeout_ms,
            new.backoff_ms,
            parent_id,
            next_json,
            pending_deps,
            new.key,
            now,
            new.token_budget
        ],
    )?;
    let id: i64 = match inserted {
        Some(row) => row.get(0)?,
        None => {
            let id = tx.query_value("SELECT id FROM tasks WHERE idem_key = ?1", args![new.key])?;
            return Ok(Submitted { id, existed: true });
        }
    };
    for &dep in &new.depends_on {
        tx.execute(
            "INSERT INTO task_deps (task_id, depends_on) VALUES (?1, ?2)",
            args![id, dep],
        )?;
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
pub(super) fn count_unfinished_dependencies(tx: &dyn Sql, id: i64) -> Result<u32> {
    // FOR SHARE on PostgreSQL, as in `insert_new_task`.
    let sql = match tx.dialect() {
        Dialect::Sqlite => {
            "SELECT t.id, t.state FROM task_deps d JOIN tasks t ON t.id = d.depends_on WHERE d.task_id = ?1"
        }
        Dialect::Postgres => {
            "SELECT t.id, t.state FROM task_deps d JOIN tasks t ON t.id = d.depends_on WHERE d.task_id = ?1 FOR SHARE OF t"
        }
    };
    let deps = tx.query(sql, args![id])?;
    let mut waiting = 0;
    for row in deps {
        let dep: i64 = row.get(0)?;
        match parse_state(&row.get::<String>(1)?)? {
            State::Complete => {}
            state @ (State::Failed | State::Cancelled) => {
                return Err(QueueError::DependencyFinished {
                    id,
                    dependency: dep,
                    state,
                });
            }
            _ => waiting += 1,
        }
    }
    Ok(waiting)
}

/// Most tasks one chain (a root and everything spawned or chained from it)
/// may hold: each run may spawn 1,000, and runs spawning runs that spawn
/// grew a chain by 2.8 million tasks in 50 s, without end.
pub const MAX_CHAIN_TASKS: i64 = 100_000;

/// Refuses `more` tasks for the chain of task `id` when they would take it
/// past [`MAX_CHAIN_TASKS`] (checked without counting them: see
/// [`insert_children`], which does). A run entering review with children
/// its chain has no room for is refused then, as a completing one is:
/// held, they made every approval fail, a reviewer agent's verdict
/// failing the reviewer.
pub(super) fn check_chain_room(tx: &dyn Sql, id: i64, more: usize) -> Result<()> {
    if more == 0 {
        return Ok(());
    }
    let row = tx.query_one(
        "SELECT root.id, root.chain_tasks FROM tasks t JOIN tasks root ON root.id = COALESCE(t.root_id, t.id)
         WHERE t.id = ?1",
        args![id],
    )?;
    let (root, size): (i64, i64) = (row.get(0)?, row.get(1)?);
    chain_fits(root, size + more as i64)
}

fn chain_fits(root: i64, size: i64) -> Result<()> {
    match size > MAX_CHAIN_TASKS {
        true => Err(QueueError::invalid(
            "spawn",
            format!(
                "the chain of task {root} would hold {size} tasks, more than {MAX_CHAIN_TASKS}: a chain (a task and all it spawns and chains, and theirs) is capped, so that runs spawning runs cannot grow it without end"
            ),
        )),
        false => Ok(()),
    }
}

/// Children of a completed task, inserted in its completion's transaction,
/// counted on their chain's root against [`MAX_CHAIN_TASKS`].
pub(super) fn insert_children(
    tx: &dyn Sql,
    id: i64,
    children: &[NextSpec],
    actor: &str,
    now: i64,
) -> Result<()> {
    if children.is_empty() {
        return Ok(());
    }
    let root: i64 = tx.query_value(
        "SELECT COALESCE(root_id, id) FROM tasks WHERE id = ?1",
        args![id],
    )?;
    tx.execute(
        "UPDATE tasks SET chain_tasks = chain_tasks + ?1 WHERE id = ?2",
        args![children.len() as i64, root],
    )?;
    let size: i64 = tx.query_value("SELECT chain_tasks FROM tasks WHERE id = ?1", args![root])?;
    chain_fits(root, size)?;
    for child in children {
        let mut new = NewTask::new(child.agent.clone(), child.payload.to_string());
        new.priority = child.priority;
        new.review = child.review;
        new.next = child.next.clone();
        insert_new_task(tx, &new, Some(id), actor, now)?;
    }
    Ok(())
}
