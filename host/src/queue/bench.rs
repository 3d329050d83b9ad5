//! Measurements for `colony bench`, outside the queue's interface: they
//! read and write history directly and are not part of any workflow.

use super::sql::args;
use super::{Queue, Result};

/// Milliseconds from each claim to the end of that run (the next event of
/// the task), for tasks with id >= `first_id`.
pub fn claim_to_finish_ms(queue: &Queue, first_id: i64) -> Result<Vec<i64>> {
    queue.read(|db| {
        let rows: Vec<Option<i64>> = db.query_column(
            "SELECT (SELECT MIN(e2.at) FROM events e2 WHERE e2.task_id = e.task_id AND e2.id > e.id) - e.at
             FROM events e WHERE e.event = 'claim' AND e.task_id >= ?1",
            args![first_id],
        )?;
        Ok(rows.into_iter().flatten().collect())
    })
}

/// Inserts `n` already-completed tasks (with their audit events), to measure
/// that claiming stays fast as history grows.
pub fn seed_completed_history(queue: &mut Queue, n: usize) -> Result<()> {
    const CHUNK: usize = 10_000;
    let mut left = n;
    while left > 0 {
        let batch = left.min(CHUNK);
        queue.write(|tx, now| {
            for _ in 0..batch {
                let id: i64 = tx.query_value(
                    "INSERT INTO tasks (agent, payload, state, attempts, max_attempts, max_revisions, run_at,
                                        backoff_ms, result, created_at, updated_at, finished_at)
                     VALUES ('noop', '{}', 'complete', 1, 3, 3, ?1, 10000, '{}', ?1, ?1, ?1)
                     RETURNING id",
                    args![now],
                )?;
                tx.execute(
                    "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
                     VALUES (?1, ?2, 'complete', 'in_progress', 'complete', 'history', '{}')",
                    args![now, id],
                )?;
            }
            Ok(())
        })?;
        left -= batch;
    }
    Ok(())
}

/// Caps a SQLite database file at `pages` pages (`PRAGMA max_page_count`),
/// to rehearse a full disk. Does nothing on PostgreSQL.
pub fn set_max_page_count(queue: &Queue, pages: i64) -> Result<()> {
    match &queue.db {
        super::Db::Sqlite(db) => db.set_max_page_count(pages),
        super::Db::Postgres(_) => Ok(()),
    }
}
