//! Reading tasks, events and logs back, and turning rows into [`Task`]s.
//! A row that cannot be decoded is reported with its id, never fatal to a
//! listing.

use std::collections::BTreeMap;

use crate::task::{Lease, State, Task, TaskError};

use super::batch::BySize;
use super::sql::{Param, Row, Sql, args};
use super::tasks::parse_state;
use super::{AuditEvent, Backlog, ListFilter, QueueError, Result, RunLog, TaskRow, UnreadableTask};

/// The columns [`task_from_row`] reads, in order.
pub(super) const TASK_COLUMNS: &str = "id, agent, state, payload, priority, attempts, max_attempts, revisions, \
     max_revisions, review, reviewer, reviews, parent_id, next_tasks, result, error_kind, \
     error_message, feedback, progress, idem_key, timeout_ms, backoff_ms, run_at, claimed_by, \
     heartbeat_at, created_at, updated_at, finished_at";

pub(super) fn get(db: &dyn Sql, id: i64) -> Result<Task> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1");
    let row = db
        .query_opt(&sql, args![id])?
        .ok_or(QueueError::NotFound(id))?;
    let mut task = task_from_row(&row)?;
    task.depends_on = db.query_column(
        "SELECT depends_on FROM task_deps WHERE task_id = ?1 ORDER BY depends_on",
        args![id],
    )?;
    Ok(task)
}

pub(super) fn list(db: &dyn Sql, filter: &ListFilter) -> Result<Vec<TaskRow>> {
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM tasks
         WHERE (CAST(?1 AS TEXT) IS NULL OR state = ?1) AND (CAST(?2 AS TEXT) IS NULL OR agent = ?2)
           AND id < ?4
         ORDER BY id DESC LIMIT ?3"
    );
    let limit = filter.limit.map(i64::from).unwrap_or(i64::MAX);
    let before = filter.before.unwrap_or(i64::MAX);
    let rows = db.query(
        &sql,
        args![filter.state.map(State::as_str), filter.agent, limit, before],
    )?;
    with_dependencies(db, rows.iter().map(task_row).collect())
}

pub(super) fn children(db: &dyn Sql, parent_id: i64) -> Result<Vec<TaskRow>> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE parent_id = ?1 ORDER BY id");
    let rows = db.query(&sql, args![parent_id])?;
    with_dependencies(db, rows.iter().map(task_row).collect())
}

/// Fills in the `depends_on` of listed tasks, as [`get`] does for one:
/// one read per 500 tasks (a listing left them empty).
pub(super) fn with_dependencies(db: &dyn Sql, mut rows: Vec<TaskRow>) -> Result<Vec<TaskRow>> {
    let mut tasks: BTreeMap<i64, &mut Task> = rows
        .iter_mut()
        .filter_map(|row| row.as_mut().ok().map(|task| (task.id, task)))
        .collect();
    let ids: Vec<i64> = tasks.keys().copied().collect();
    for chunk in ids.chunks(500) {
        let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("?{i}")).collect();
        let args: Vec<Param<'_>> = chunk.iter().map(|&id| Param::Int(id)).collect();
        let sql = format!(
            "SELECT task_id, depends_on FROM task_deps WHERE task_id IN ({})
             ORDER BY task_id, depends_on",
            marks.join(", ")
        );
        for row in db.query(&sql, &args)? {
            if let Some(task) = tasks.get_mut(&row.get::<i64>(0)?) {
                task.depends_on.push(row.get(1)?);
            }
        }
    }
    Ok(rows)
}

/// Tasks per agent and state, without reading the rows of finished work:
/// each state but `complete` is counted through `tasks_at_rest` or
/// `tasks_leases` (its rows are few), and `complete` (the bulk of any
/// history) is each agent's total, an index-only count of
/// `tasks_by_agent`, less the rest.
pub(super) fn counts(db: &dyn Sql) -> Result<Vec<(String, State, u64)>> {
    // Per agent, a count per state in the order of `State::ALL`.
    let mut by_agent: BTreeMap<String, [u64; State::ALL.len()]> = BTreeMap::new();
    let complete = State::ALL
        .iter()
        .position(|s| *s == State::Complete)
        .unwrap();
    for row in db.query(&counts_sql(), args![])? {
        let (agent, state, n): (String, String, u64) = (row.get(0)?, row.get(1)?, row.get(2)?);
        let counts = by_agent.entry(agent).or_default();
        if state == "*" {
            counts[complete] = counts[complete].wrapping_add(n);
        } else {
            let i = State::ALL
                .iter()
                .position(|s| s.as_str() == state)
                .unwrap_or(complete);
            counts[i] = n;
            counts[complete] = counts[complete].wrapping_sub(n);
        }
    }
    let mut out = Vec::new();
    for (agent, counts) in by_agent {
        let mut states: Vec<(State, u64)> = State::ALL
            .into_iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .collect();
        states.sort_by_key(|(state, _)| state.as_str());
        out.extend(
            states
                .into_iter()
                .map(|(state, n)| (agent.clone(), state, n)),
        );
    }
    Ok(out)
}

/// [`counts`]' one statement, so one snapshot: the parts cannot disagree
/// about a task that moved meanwhile. `*` marks an agent's total.
pub(super) fn counts_sql() -> String {
    let mut parts = vec!["SELECT agent, '*', COUNT(*) FROM tasks GROUP BY agent".to_string()];
    for state in State::ALL.into_iter().filter(|s| *s != State::Complete) {
        parts.push(format!(
            "SELECT {1}, '{0}', COUNT(*) FROM tasks WHERE state = '{0}' GROUP BY 1",
            state.as_str(),
            id_and_agent(Some(state)).1
        ));
    }
    parts.join(" UNION ALL ")
}

/// How a read of tasks in `state` names the `id` and `agent` columns.
/// Running tasks are left out of `tasks_at_rest` and read through
/// `tasks_leases`, which holds only them; named plainly, SQLite would walk
/// the whole history through the primary key or `tasks_by_agent` for their
/// order instead. `id + 0` and `agent || ''` are the same values in a form
/// no index offers (and valid on both databases).
pub(super) fn id_and_agent(state: Option<State>) -> (&'static str, &'static str) {
    match state {
        Some(State::InProgress) => ("id + 0", "agent || ''"),
        _ => ("id", "agent"),
    }
}

/// Unfinished work per agent, read through the partial indexes only (cheap
/// however large the history).
pub(super) fn backlog(db: &dyn Sql) -> Result<Vec<(String, Backlog)>> {
    let mut by_agent: BTreeMap<String, Backlog> = Default::default();
    for (i, sql) in BACKLOG_SQL.iter().enumerate() {
        for row in db.query(sql, args![])? {
            let (agent, n, due): (String, u64, Option<i64>) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
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

/// [`backlog`]'s counts: ready, running, scheduled, blocked.
pub(super) const BACKLOG_SQL: [&str; 4] = [
    "SELECT agent, COUNT(*), NULL FROM tasks WHERE state = 'ready' GROUP BY agent",
    // Grouped by `agent || ''`: see [`id_and_agent`].
    "SELECT agent || '', COUNT(*), NULL FROM tasks WHERE state = 'in_progress' GROUP BY 1",
    "SELECT agent, COUNT(*), MIN(run_at) FROM tasks
     WHERE state = 'pending' AND pending_deps = 0 GROUP BY agent",
    "SELECT agent, COUNT(*), NULL FROM tasks
     WHERE state = 'pending' AND pending_deps > 0 GROUP BY agent",
];

/// A lease is stale at `?1` (queue clock, ms) once its holder's own
/// `--stale-after` (60 s when it recorded none) has passed without a
/// heartbeat: any running daemon will reset it.
pub(super) const LEASES_BY_HOLDER_SQL: &str =
    "SELECT claimed_by, COUNT(*), MAX(heartbeat_at),
            CAST(SUM(CASE WHEN heartbeat_at < ?1 - COALESCE(lease_ms, 60000) THEN 1 ELSE 0 END) AS BIGINT)
     FROM tasks WHERE state = 'in_progress' GROUP BY claimed_by ORDER BY claimed_by";

pub(super) fn leases_by_holder(db: &dyn Sql, now: i64) -> Result<Vec<HeldLeases>> {
    let rows = db.query(LEASES_BY_HOLDER_SQL, args![now])?;
    rows.iter()
        .map(|r| {
            Ok(HeldLeases {
                holder: r.get::<Option<String>>(0)?.unwrap_or_default(),
                count: r.get(1)?,
                last_heartbeat_at: r.get(2)?,
                stale: r.get(3)?,
            })
        })
        .collect()
}

/// The leases one host holds, and whether it still renews them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldLeases {
    pub holder: String,
    pub count: u64,
    /// Its newest heartbeat on any of them (queue clock, ms).
    pub last_heartbeat_at: Option<i64>,
    /// How many went unrenewed past the holder's `--stale-after`: most
    /// likely a dead daemon's, for a running daemon to reset.
    pub stale: u64,
}

/// The columns [`event_from_row`] reads, from `events`.
const EVENT_SELECT: &str =
    "SELECT id, at, task_id, event, from_state, to_state, actor, detail FROM events";

pub(super) fn events(
    db: &dyn Sql,
    task_id: Option<i64>,
    since: i64,
    limit: u32,
) -> Result<Vec<AuditEvent>> {
    // Two statements rather than `(?2 IS NULL OR task_id = ?2)`, which
    // keeps both databases from using `events_by_task`.
    let rows = match task_id {
        Some(task) => db.query(
            &format!("{EVENT_SELECT} WHERE task_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"),
            args![task, since, limit],
        )?,
        None => db.query(
            &format!("{EVENT_SELECT} WHERE id > ?1 ORDER BY id LIMIT ?2"),
            args![since, limit],
        )?,
    };
    rows.iter().map(event_from_row).collect()
}

pub(super) fn events_in_range(
    db: &dyn Sql,
    task_id: Option<i64>,
    from: i64,
    to: i64,
) -> Result<Vec<AuditEvent>> {
    let rows = match task_id {
        Some(task) => db.query(
            &format!("{EVENT_SELECT} WHERE task_id = ?1 AND id > ?2 AND id <= ?3 ORDER BY id"),
            args![task, from, to],
        )?,
        None => db.query(
            &format!("{EVENT_SELECT} WHERE id > ?1 AND id <= ?2 ORDER BY id"),
            args![from, to],
        )?,
    };
    rows.iter().map(event_from_row).collect()
}

/// An event from the columns `id, at, task_id, event, from_state,
/// to_state, actor, detail` (in that order, first in the row).
pub(super) fn event_from_row(row: &Row) -> Result<AuditEvent> {
    let from: Option<String> = row.get(4)?;
    let detail: String = row.get(7)?;
    Ok(AuditEvent {
        id: row.get(0)?,
        at: row.get(1)?,
        task_id: row.get(2)?,
        event: row.get(3)?,
        from: from.as_deref().map(parse_state).transpose()?,
        to: parse_state(&row.get::<String>(5)?)?,
        actor: row.get(6)?,
        detail: serde_json::from_str(&detail)
            .unwrap_or_else(|e| serde_json::json!({"unreadable": e.to_string(), "raw": detail})),
    })
}

pub(super) fn logs(db: &dyn Sql, task_id: i64) -> Result<Vec<RunLog>> {
    let rows = db.query(
        "SELECT attempt, at, text FROM task_logs WHERE task_id = ?1 ORDER BY id",
        args![task_id],
    )?;
    rows.iter()
        .map(|r| {
            Ok(RunLog {
                attempt: r.get(0)?,
                at: r.get(1)?,
                text: r.get(2)?,
            })
        })
        .collect()
}

/// A listing row: the task, or the id and why it cannot be decoded.
pub(super) fn task_row(r: &Row) -> TaskRow {
    task_from_row(r).map_err(|e| UnreadableTask {
        id: r.get(0).unwrap_or_default(),
        reason: e.to_string(),
    })
}

fn task_from_row(r: &Row) -> Result<Task> {
    let id: i64 = r.get(0)?;
    let corrupt = |what: &str, e: String| QueueError::Corrupt(format!("task {id} {what}: {e}"));
    let json = |what: &str, i: usize| -> Result<Option<serde_json::Value>> {
        r.get::<Option<String>>(i)
            .map_err(|e| corrupt(what, e.to_string()))?
            .map(|text| serde_json::from_str(&text).map_err(|e| corrupt(what, e.to_string())))
            .transpose()
    };
    let error_kind: Option<String> = r.get(15)?;
    Ok(Task {
        id,
        agent: r.get(1)?,
        state: parse_state(&r.get::<String>(2)?)?,
        payload: json("payload", 3)?.ok_or_else(|| corrupt("payload", "missing".into()))?,
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
        next_tasks: match json("next_tasks", 13)? {
            Some(value) => {
                serde_json::from_value(value).map_err(|e| corrupt("next_tasks", e.to_string()))?
            }
            None => Vec::new(),
        },
        result: json("result", 14)?,
        error: match error_kind {
            Some(kind) => Some(TaskError {
                kind: kind.parse().map_err(|e| corrupt("error_kind", e))?,
                message: r.get::<Option<String>>(16)?.unwrap_or_default(),
            }),
            None => None,
        },
        feedback: r.get(17)?,
        progress: r.get(18)?,
        idempotency_key: r.get(19)?,
        timeout_ms: r.get(20)?,
        backoff_ms: r.get(21)?,
        run_at: r.get(22)?,
        claimed_by: r.get(23)?,
        heartbeat_at: r.get(24)?,
        created_at: r.get(25)?,
        updated_at: r.get(26)?,
        finished_at: r.get(27)?,
    })
}

/// Those of `leases` whose claim no longer holds: the task cancelled,
/// reset or claimed again since. A read, many ids per statement.
pub(super) fn voided_claims(db: &dyn Sql, leases: &[Lease]) -> Result<Vec<Lease>> {
    let mut held = std::collections::HashSet::new();
    for chunk in BySize::chunks(db.dialect(), leases) {
        let ids: Vec<Param> = chunk.iter().map(|l| Param::Int(l.task_id)).collect();
        for row in db.query(&CLAIMS_HELD.sql(db.dialect(), chunk.len()), &ids)? {
            held.insert(Lease {
                task_id: row.get(0)?,
                token: row.get(1)?,
            });
        }
    }
    Ok(leases
        .iter()
        .filter(|l| !held.contains(l))
        .copied()
        .collect())
}

static CLAIMS_HELD: BySize = BySize::new(|_, rows| {
    let ids: Vec<String> = (1..=rows).map(|i| format!("?{i}")).collect();
    format!(
        "SELECT id, claim_token FROM tasks WHERE state = 'in_progress' AND id IN ({})",
        ids.join(", ")
    )
});
