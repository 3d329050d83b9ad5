//! `colony migrate`: copies a whole queue — tasks, dependencies, events,
//! logs, the model journal, state and effects — into an empty database,
//! typically from SQLite to PostgreSQL when a fleet outgrows one machine.
//! Ids are kept, so links between rows (parents, dependencies, the journal's
//! tasks) hold in the copy.

use super::sql::{Dialect, Param, Sql};
use super::{Queue, QueueError, Result};

/// Every table, parents before children, with the columns copied.
const TABLES: &[(&str, &str, &str)] = &[
    (
        "tasks",
        "id, agent, payload, state, priority, attempts, max_attempts, revisions, max_revisions, \
         review, reviewer, reviews, run_at, timeout_ms, backoff_ms, parent_id, next_tasks, spawned, \
         pending_deps, result, error_kind, error_message, feedback, progress, idem_key, claimed_by, \
         claim_token, heartbeat_at, created_at, updated_at, finished_at, token_budget, root_id, \
         replay_token, held_state, lease_ms, chain_tasks",
        "id",
    ),
    ("task_deps", "task_id, depends_on", "task_id, depends_on"),
    (
        "events",
        "id, at, task_id, event, from_state, to_state, actor, detail",
        "id",
    ),
    ("task_logs", "id, task_id, attempt, at, text", "id"),
    (
        "model_calls",
        "id, at, task_id, root_id, agent, token, attempt, seq, alias, request_hash, request, reply, \
         status, error, input_tokens, output_tokens, cost_usd, ms, replayed",
        "id",
    ),
    (
        "model_reservations",
        "id, task_id, root_id, token, seq, tokens",
        "id",
    ),
    (
        "state",
        "scope, owner, key, value, version, updated_at, task_id",
        "scope, owner, key",
    ),
    (
        "effects",
        "id, task_id, seq, agent, method, url, headers, body, state, attempts, max_attempts, next_at, \
         claim_token, claimed_by, lease_until, status, error, created_at, updated_at",
        "id",
    ),
];

/// Tables whose `id` the database assigns: their counters are moved past
/// the copied ids so new rows do not collide.
const IDENTITY_TABLES: &[&str] = &[
    "tasks",
    "events",
    "task_logs",
    "model_calls",
    "model_reservations",
    "effects",
];

/// How many rows of each table were copied.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyReport {
    pub tables: Vec<(String, u64)>,
}

/// Rows read from the source and written to the target at a time.
const CHUNK: i64 = 500;
/// Rows per INSERT statement (well under both databases' parameter limits).
const ROWS_PER_INSERT: usize = 50;

impl Queue {
    /// Copies everything in `self` into `target`, which must be empty, in
    /// one transaction of the target: all or nothing. Run it while no daemon
    /// uses the source.
    pub fn copy_into(&self, target: &mut Queue) -> Result<CopyReport> {
        let location = target.location();
        target.write(|tx, _now| {
            // Two copies into one empty PostgreSQL database at once: the
            // second waits for the first to commit, then finds it not empty
            // (it failed on a duplicate id, raw). A submit meanwhile waits too.
            if tx.dialect() == Dialect::Postgres {
                tx.execute("SET LOCAL lock_timeout = 0", &[])?;
                tx.execute("LOCK TABLE tasks IN SHARE ROW EXCLUSIVE MODE", &[])?;
            }
            let mut occupied = Vec::new();
            for (table, _, _) in TABLES {
                let n: i64 = tx.query_value(&format!("SELECT COUNT(*) FROM {table}"), &[])?;
                if n > 0 {
                    occupied.push(format!("{table} has {n} rows"));
                }
            }
            if !occupied.is_empty() {
                return Err(QueueError::invalid(
                    "--to",
                    format!(
                        "{location} is not empty ({}); migrate only into a new, empty database",
                        occupied.join(", ")
                    ),
                ));
            }
            let mut report = CopyReport::default();
            for (table, columns, order) in TABLES {
                let n = copy_table(self, tx, table, columns, order)?;
                report.tables.push((table.to_string(), n));
            }
            if tx.dialect() == Dialect::Postgres {
                for table in IDENTITY_TABLES {
                    tx.query(
                        &format!(
                            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
                             (SELECT COALESCE(MAX(id), 0) + 1 FROM {table}), false)"
                        ),
                        &[],
                    )?;
                }
            }
            Ok(report)
        })
    }
}

fn copy_table(
    source: &Queue,
    tx: &dyn Sql,
    table: &str,
    columns: &str,
    order: &str,
) -> Result<u64> {
    let width = columns.split(',').count();
    let mut copied = 0u64;
    // Tables keyed by id are read in chunks after the last id seen (an
    // OFFSET would rescan); the two with composite keys are small enough to
    // read at once.
    let keyed = order == "id";
    let mut last_id = i64::MIN;
    loop {
        let rows = source.read(|db| {
            if keyed {
                db.query(
                    &format!("SELECT {columns} FROM {table} WHERE id > ?1 ORDER BY id LIMIT ?2"),
                    &[Param::Int(last_id), Param::Int(CHUNK)],
                )
            } else {
                db.query(
                    &format!("SELECT {columns} FROM {table} ORDER BY {order}"),
                    &[],
                )
            }
        })?;
        if rows.is_empty() {
            return Ok(copied);
        }
        if keyed {
            last_id = rows[rows.len() - 1].get(0)?;
        }
        for group in rows.chunks(ROWS_PER_INSERT) {
            let values: Vec<String> = (0..group.len())
                .map(|r| {
                    let marks: Vec<String> =
                        (1..=width).map(|c| format!("?{}", r * width + c)).collect();
                    format!("({})", marks.join(", "))
                })
                .collect();
            let args: Vec<Param<'_>> = group
                .iter()
                .flat_map(|row| row.values().iter().map(|v| v.as_param()))
                .collect();
            tx.execute(
                &format!(
                    "INSERT INTO {table} ({columns}) VALUES {}",
                    values.join(", ")
                ),
                &args,
            )?;
        }
        copied += rows.len() as u64;
        if !keyed {
            return Ok(copied);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TABLES;
    use std::collections::BTreeSet;

    /// The copy is whole: every table of the newest schema is copied, with
    /// every one of its columns (a column added by a migration and not
    /// listed here came out NULL in the copy).
    #[test]
    fn every_table_and_column_of_the_schema_is_copied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        drop(super::Queue::open(&path).unwrap());
        let conn = rusqlite::Connection::open(&path).unwrap();
        let names = |sql: &str| -> BTreeSet<String> {
            let mut stmt = conn.prepare(sql).unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let tables = names("SELECT name FROM sqlite_master WHERE type = 'table'");
        let copied: BTreeSet<String> = TABLES.iter().map(|t| t.0.to_string()).collect();
        assert_eq!(tables, copied);
        for (table, columns, _) in TABLES {
            let schema = names(&format!("SELECT name FROM pragma_table_info('{table}')"));
            let listed: BTreeSet<String> =
                columns.split(',').map(|c| c.trim().to_string()).collect();
            assert_eq!(schema, listed, "the columns of {table}");
        }
    }
}
