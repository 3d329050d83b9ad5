//! The reads behind the web dashboard and `/metrics` (host/src/web): pages
//! of tasks, the audit trail with each event's agent, the model journal in
//! id order and the outbox by state. Every one is bounded and index-backed,
//! so a page stays fast with a million tasks stored.

use super::reads::{TASK_COLUMNS, event_from_row, id_and_agent, task_row, with_dependencies};
use super::sql::{Param, args};
use super::tasks::parse_state;
use super::{AuditEvent, Queue, QueueError, Result, TaskRow};
use crate::task::State;

/// How many of the newest tasks (before the page's cursor, matching its
/// other filters) a text search looks through: a search never becomes a
/// scan of the whole history. The next page searches the next window.
pub const TEXT_SEARCH_WINDOW: u32 = 20_000;

/// The longest text a search may look for: SQLite refuses a LIKE pattern
/// past 50,000 bytes as an error, not as bad input.
pub const MAX_SEARCH_CHARS: usize = 1_000;

/// One page of the task list, newest first.
#[derive(Clone, Debug, Default)]
pub struct TaskQuery {
    pub state: Option<State>,
    pub agent: Option<String>,
    /// Text to find in the payload, result or error message (case-insensitive
    /// for ASCII), within [`TEXT_SEARCH_WINDOW`] tasks.
    pub text: Option<String>,
    /// Only tasks with an id below this one (the previous page's last id).
    pub before: Option<i64>,
    pub limit: u32,
}

/// A page of tasks and where the next one starts.
#[derive(Debug)]
pub struct TaskPage {
    pub tasks: Vec<TaskRow>,
    /// The `before` of the next page; `None` on the last page.
    pub next_before: Option<i64>,
}

/// An audit event with the agent of its task, for the metrics tailer.
#[derive(Clone, Debug)]
pub struct AgentEvent {
    pub event: AuditEvent,
    pub agent: String,
}

/// One model call's charge, for the metrics tailer.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelCharge {
    pub id: i64,
    pub agent: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: Option<f64>,
}

/// A state write a task's completion made, as its `state_write` event
/// records it.
#[derive(Clone, Debug, PartialEq)]
pub struct StateWriteRow {
    pub scope: String,
    pub owner: String,
    pub key: String,
    /// The version the write made (0: it deleted the key).
    pub version: i64,
    /// The value it wrote, while that is still the key's (the audit trail
    /// keeps no values: one written over since is gone).
    pub value: Option<String>,
}

/// One task of a chain, for drawing it as a tree.
#[derive(Clone, Debug, PartialEq)]
pub struct ChainNode {
    pub id: i64,
    pub parent_id: Option<i64>,
    pub agent: String,
    pub state: State,
}

/// Most tasks of a chain drawn, and most steps walked up to its root.
pub const MAX_CHAIN_NODES: usize = 200;
const MAX_CHAIN_DEPTH: usize = 100;

impl Queue {
    /// A page of tasks, newest first, read through `tasks_at_rest`,
    /// `tasks_leases`, `tasks_by_agent` or the primary key. (The state is one of the
    /// transition table's names, written into the SQL as a literal.)
    pub fn task_page(&self, query: &TaskQuery) -> Result<TaskPage> {
        if let Some(text) = &query.text
            && text.chars().count() > MAX_SEARCH_CHARS
        {
            return Err(QueueError::invalid(
                "q",
                format!(
                    "a search of {} characters: at most {MAX_SEARCH_CHARS}",
                    text.chars().count()
                ),
            ));
        }
        let before = query.before.unwrap_or(i64::MAX);
        let limit = i64::from(query.limit.max(1));
        let page = page_filter(query);
        let pattern = query.text.as_deref().map(like_pattern);
        let tasks = self.read(|db| {
            let mut params = vec![Param::Int(before)];
            if let Some(agent) = &query.agent {
                params.push(Param::Text(agent));
            }
            let sql = match &pattern {
                None => page.select(limit),
                Some(pattern) => {
                    params.push(Param::Text(pattern));
                    page.search(limit, params.len())
                }
            };
            let rows = db.query(&sql, &params)?;
            with_dependencies(db, rows.iter().map(task_row).collect())
        })?;
        let last = tasks.last().map(|row| match row {
            Ok(task) => task.id,
            Err(bad) => bad.id,
        });
        let next_before = if tasks.len() as i64 == limit {
            last
        } else if query.text.is_some() {
            // A short page of a search only means this window is done: the
            // next one starts below it, while older tasks remain.
            self.window_end(&page, before, query.agent.as_deref())?
        } else {
            None
        };
        Ok(TaskPage { tasks, next_before })
    }

    /// Where a text search's window ended, when tasks remain below it.
    fn window_end(&self, page: &Page, before: i64, agent: Option<&str>) -> Result<Option<i64>> {
        let sql = page.window_end();
        self.read(|db| {
            let mut params = vec![Param::Int(before)];
            if let Some(agent) = agent {
                params.push(Param::Text(agent));
            }
            let row = db.query_one(&sql, &params)?;
            let (min, n): (Option<i64>, i64) = (row.get(0)?, row.get(1)?);
            Ok(min.filter(|_| n == i64::from(TEXT_SEARCH_WINDOW)))
        })
    }

    /// The audit events with `from < id <= to` (a range a
    /// [`super::TrailCursor`] found safe) with the agent of each one's
    /// task, oldest first.
    pub fn events_with_agent(&self, from: i64, to: i64) -> Result<Vec<AgentEvent>> {
        self.read(|db| {
            let rows = db.query(
                "SELECT e.id, e.at, e.task_id, e.event, e.from_state, e.to_state, e.actor, e.detail, t.agent
                 FROM events e JOIN tasks t ON t.id = e.task_id
                 WHERE e.id > ?1 AND e.id <= ?2 ORDER BY e.id",
                args![from, to],
            )?;
            rows.iter()
                .map(|row| {
                    Ok(AgentEvent {
                        event: event_from_row(row)?,
                        agent: row.get(8)?,
                    })
                })
                .collect()
        })
    }

    /// The id just before the first audit event at or after `at_ms`: a
    /// binary search over the primary key (ids are handed out in time
    /// order, near enough for a chart), a few dozen point reads however
    /// long the trail.
    pub fn event_id_before(&self, at_ms: i64) -> Result<i64> {
        self.read(|db| {
            let bounds = db.query_one("SELECT MIN(id), MAX(id) FROM events", args![])?;
            let (Some(mut low), Some(mut high)) =
                (bounds.get::<Option<i64>>(0)?, bounds.get::<Option<i64>>(1)?)
            else {
                return Ok(0);
            };
            // Invariant: every event below `low` is older than `at_ms`; the
            // answer is in [low, high + 1].
            high += 1;
            while low < high {
                let mid = low + (high - low) / 2;
                let at: Option<i64> = db
                    .query_opt(
                        "SELECT at FROM events WHERE id >= ?1 ORDER BY id LIMIT 1",
                        args![mid],
                    )?
                    .map(|r| r.get(0))
                    .transpose()?;
                match at {
                    Some(at) if at < at_ms => low = mid + 1,
                    _ => high = mid,
                }
            }
            Ok(low - 1)
        })
    }

    /// The newest audit event's id (0 when there is none).
    pub fn last_event_id(&self) -> Result<i64> {
        self.read(|db| db.query_value("SELECT COALESCE(MAX(id), 0) FROM events", args![]))
    }

    /// The model calls with `from < id <= to` (a range a
    /// [`TrailCursor::over_model_calls`] handed on), with what each charged.
    pub fn model_charges_between(&self, from: i64, to: i64) -> Result<Vec<ModelCharge>> {
        self.read(|db| {
            let rows = db.query(
                "SELECT id, agent, alias, input_tokens, output_tokens, cost_usd FROM model_calls
                 WHERE id > ?1 AND id <= ?2 ORDER BY id",
                args![from, to],
            )?;
            rows.iter()
                .map(|r| {
                    Ok(ModelCharge {
                        id: r.get(0)?,
                        agent: r.get(1)?,
                        model: r.get(2)?,
                        input_tokens: r.get(3)?,
                        output_tokens: r.get(4)?,
                        cost_usd: r.get(5)?,
                    })
                })
                .collect()
        })
    }

    /// The newest model call's id (0 when there is none).
    pub fn last_model_call_id(&self) -> Result<i64> {
        self.read(|db| db.query_value("SELECT COALESCE(MAX(id), 0) FROM model_calls", args![]))
    }

    /// How many effects are in each outbox state (read off `effects_state`).
    pub fn effect_counts(&self) -> Result<Vec<(String, u64)>> {
        self.read(|db| {
            let rows = db.query(
                "SELECT state, COUNT(*) FROM effects GROUP BY state ORDER BY state",
                args![],
            )?;
            rows.iter().map(|r| Ok((r.get(0)?, r.get(1)?))).collect()
        })
    }

    /// The tasks that failed last, latest first (read through
    /// `tasks_failed_recently`): a task retried long after it was submitted
    /// that failed again is among them, which a list by id buried.
    pub fn recent_failures(&self, limit: u32) -> Result<Vec<TaskRow>> {
        self.read(|db| {
            Ok(db
                .query(&recent_failures_sql(), args![i64::from(limit)])?
                .iter()
                .map(task_row)
                .collect())
        })
    }

    /// Tasks waiting in review, oldest first (read through `tasks_at_rest`),
    /// each with its review round read in the same statement: the round a
    /// decision form sends is that of the result it shows.
    pub fn in_review(&self, limit: u32) -> Result<Vec<(TaskRow, Option<i64>)>> {
        self.read(|db| {
            let sql = format!(
                "SELECT {TASK_COLUMNS}, ({}) FROM tasks WHERE state = 'review' ORDER BY id LIMIT ?1",
                super::review::round_of("tasks.id")
            );
            let round_at = TASK_COLUMNS.split(',').count();
            db.query(&sql, args![i64::from(limit)])?
                .iter()
                .map(|r| Ok((task_row(r), r.get(round_at)?)))
                .collect()
        })
    }
}

/// The WHERE clause of a page and the expression it is ordered by.
pub(super) struct Page {
    /// `?1` is the cursor, `?2` the agent when there is one.
    filtered: String,
    /// `id`, or for running tasks `id + 0` (see [`id_and_agent`]).
    id: &'static str,
}

/// A page's filter; running tasks are read through the lease index (see
/// [`id_and_agent`] and [`AT_REST_INDEX`]).
pub(super) fn page_filter(query: &TaskQuery) -> Page {
    let (id, agent) = id_and_agent(query.state);
    let mut filters = vec![format!("{id} < ?1")];
    if let Some(state) = query.state {
        filters.push(format!("state = '{}'", state.as_str()));
    }
    if query.agent.is_some() {
        filters.push(format!("{agent} = ?2"));
    }
    Page {
        filtered: filters.join(" AND "),
        id,
    }
}

impl Page {
    /// The page's tasks, at most `limit`.
    pub(super) fn select(&self, limit: i64) -> String {
        let Page { filtered, id } = self;
        format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE {filtered} ORDER BY {id} DESC LIMIT {limit}"
        )
    }

    /// Those of the page's search window whose text matches `?{p}`.
    pub(super) fn search(&self, limit: i64, p: usize) -> String {
        let Page { filtered, id } = self;
        format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id IN (
                 SELECT id FROM tasks WHERE {filtered} ORDER BY {id} DESC LIMIT {TEXT_SEARCH_WINDOW})
               AND (LOWER(payload) LIKE ?{p} ESCAPE '\\'
                    OR LOWER(COALESCE(result, '')) LIKE ?{p} ESCAPE '\\'
                    OR LOWER(COALESCE(error_message, '')) LIKE ?{p} ESCAPE '\\')
             ORDER BY id DESC LIMIT {limit}"
        )
    }

    /// The lowest id of the search window and its size.
    pub(super) fn window_end(&self) -> String {
        let Page { filtered, id } = self;
        format!(
            "SELECT MIN(id), COUNT(*) FROM
               (SELECT id FROM tasks WHERE {filtered} ORDER BY {id} DESC LIMIT {TEXT_SEARCH_WINDOW}) w"
        )
    }
}

impl Queue {
    /// The state writes task `task_id`'s completion made, in order (the
    /// first `limit`), read off its `state_write` events, and how many it
    /// made in all. The entries it wrote were shown instead: a key written
    /// over or deleted since by another task vanished from the page.
    pub fn state_written_by(&self, task_id: i64, limit: u32) -> Result<(Vec<StateWriteRow>, u64)> {
        self.read(|db| {
            let total: Option<i64> = db.query_value(
                "SELECT COUNT(*) FROM events WHERE task_id = ?1 AND event = 'state_write'",
                args![task_id],
            )?;
            let total = total.unwrap_or(0);
            let details: Vec<String> = db.query_column(
                "SELECT detail FROM events WHERE task_id = ?1 AND event = 'state_write'
                 ORDER BY id LIMIT ?2",
                args![task_id, i64::from(limit)],
            )?;
            let mut written = Vec::with_capacity(details.len());
            for detail in details {
                let d: serde_json::Value = serde_json::from_str(&detail).map_err(|e| {
                    QueueError::Corrupt(format!("a state_write event of task {task_id}: {e}"))
                })?;
                let text = |field: &str| d[field].as_str().unwrap_or_default().to_string();
                let (scope, owner, key) = (text("scope"), text("owner"), text("key"));
                let version = d["new_version"].as_i64().unwrap_or_default();
                let value = match version {
                    0 => None,
                    _ => db
                        .query_opt(
                            "SELECT value FROM state
                             WHERE scope = ?1 AND owner = ?2 AND key = ?3 AND version = ?4",
                            args![scope.as_str(), owner.as_str(), key.as_str(), version],
                        )?
                        .map(|row| row.get(0))
                        .transpose()?,
                };
                written.push(StateWriteRow {
                    scope,
                    owner,
                    key,
                    version,
                    value,
                });
            }
            Ok((written, total as u64))
        })
    }

    /// The chain a task belongs to: from its root down, parents before
    /// children, at most [`MAX_CHAIN_NODES`] tasks (read through `tasks_parent`).
    pub fn chain_of(&self, task_id: i64) -> Result<Vec<ChainNode>> {
        self.read(|db| {
            let mut root = task_id;
            for _ in 0..MAX_CHAIN_DEPTH {
                let parent: Option<i64> = db
                    .query_opt("SELECT parent_id FROM tasks WHERE id = ?1", args![root])?
                    .map(|r| r.get(0))
                    .transpose()?
                    .flatten();
                match parent {
                    Some(parent) => root = parent,
                    None => break,
                }
            }
            let node = |r: &super::sql::Row| -> Result<ChainNode> {
                Ok(ChainNode {
                    id: r.get(0)?,
                    parent_id: r.get(1)?,
                    agent: r.get(2)?,
                    state: parse_state(&r.get::<String>(3)?)?,
                })
            };
            let mut nodes = Vec::new();
            if let Some(r) = db.query_opt(
                "SELECT id, parent_id, agent, state FROM tasks WHERE id = ?1",
                args![root],
            )? {
                nodes.push(node(&r)?);
            }
            let mut next = 0;
            while next < nodes.len() && nodes.len() < MAX_CHAIN_NODES {
                let parent = nodes[next].id;
                next += 1;
                for r in db.query(
                    "SELECT id, parent_id, agent, state FROM tasks WHERE parent_id = ?1 ORDER BY id",
                    args![parent],
                )? {
                    if nodes.len() < MAX_CHAIN_NODES {
                        nodes.push(node(&r)?);
                    }
                }
            }
            Ok(nodes)
        })
    }
}

/// A LIKE pattern that finds `text` anywhere, its own `%`, `_` and `\`
/// taken literally.
fn like_pattern(text: &str) -> String {
    let mut pattern = String::from("%");
    // ASCII only, as SQLite's LOWER folds (PostgreSQL's folds more, which
    // only finds more).
    for c in text.to_ascii_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Migration 4 of both schemas: the indexes the pages read through.
/// `tasks_by_agent` is written only when a task is inserted (its columns
/// never change). `tasks_by_state` covered every state; migration 6
/// replaced it (see [`AT_REST_INDEX`]).
/// `state_by_task` finds a task's state writes for its page.
pub(super) const DASHBOARD_INDEXES: &str = "
    CREATE INDEX tasks_by_agent ON tasks(agent, id);
    CREATE INDEX tasks_by_state ON tasks(state, id);
    CREATE INDEX state_by_task  ON state(task_id) WHERE task_id IS NOT NULL;";

/// Migration 6 of SQLite's schema, 3 of PostgreSQL's: `tasks_by_state`
/// gives way to `tasks_at_rest`, the same index without running tasks.
/// Every task passed through `tasks_by_state` four times on its way from
/// ready to complete (out of ready and into running at its claim, out of
/// running and into complete at its completion): the most expensive writes
/// of the hot path (measured: see the README's benchmark section). Now a
/// claim and a completion write it once each. Running tasks, which are
/// never many, are found through `tasks_leases`, which holds only them.
/// The predicate is spelled as `OR`s because SQLite proves `state =
/// 'failed'` implies those, but not an `IN` list nor a `<>`.
pub(super) const AT_REST_INDEX: &str = "
    DROP INDEX tasks_by_state;
    CREATE INDEX tasks_at_rest ON tasks(state, id)
     WHERE state = 'pending' OR state = 'ready' OR state = 'review'
        OR state = 'complete' OR state = 'failed' OR state = 'cancelled';";

/// The latest failed tasks, `?1` of them.
pub(super) fn recent_failures_sql() -> String {
    format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'failed'
         ORDER BY updated_at DESC, id DESC LIMIT ?1"
    )
}

/// Migration 11 of SQLite's schema, 8 of PostgreSQL's: the overview's
/// latest failures by when they failed. Written only as a task enters or
/// leaves `failed`, never on the hot path of a task that completes. (With
/// `state` first SQLite prefers it to `tasks_at_rest` and a sort; with `id`
/// last PostgreSQL reads it in the query's order, where SQLite has the
/// rowid in every index.)
pub(super) const FAILED_RECENTLY_INDEX: &str =
    "CREATE INDEX tasks_failed_recently ON tasks(state, updated_at, id) WHERE state = 'failed';";

#[cfg(test)]
mod tests {
    use super::like_pattern;

    #[test]
    fn like_patterns_take_wildcards_literally() {
        assert_eq!(like_pattern("50%_a\\B"), "%50\\%\\_a\\\\b%");
    }
}
