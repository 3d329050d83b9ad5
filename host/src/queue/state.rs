//! Durable agent state: every statement about the `state` table.
//!
//! A run's writes are applied in the transaction that completes its task
//! (or approves it), after every `set-if` condition was checked against the
//! committed state, so a conflict refuses the completion as a whole. Each
//! applied write appends a `state_write` event (scope, key, versions; never
//! the value).

use rusqlite::{OptionalExtension, Transaction, params};
use serde_json::json;

use super::{Queue, QueueError, Result, now_ms};
use crate::state::{Entry, Scope, Write, check_write};
use std::collections::HashMap;

/// The owners of a task's two scopes.
pub(super) struct Owners {
    /// The task's agent.
    agent: String,
    /// The task's chain: its root task's id.
    chain: String,
}

impl Owners {
    fn of(&self, scope: Scope) -> &str {
        match scope {
            Scope::Agent => &self.agent,
            Scope::Chain => &self.chain,
        }
    }
}

pub(super) fn owners_of(tx: &rusqlite::Connection, task_id: i64) -> Result<Owners> {
    let (agent, root): (String, i64) = tx
        .prepare_cached("SELECT agent, COALESCE(root_id, id) FROM tasks WHERE id = ?1")?
        .query_row([task_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .ok_or(QueueError::NotFound(task_id))?;
    Ok(Owners {
        agent,
        chain: root.to_string(),
    })
}

fn version_of(conn: &rusqlite::Connection, scope: Scope, owner: &str, key: &str) -> Result<u64> {
    Ok(conn
        .prepare_cached("SELECT version FROM state WHERE scope = ?1 AND owner = ?2 AND key = ?3")?
        .query_row(params![scope.as_str(), owner, key], |r| r.get::<_, i64>(0))
        .optional()?
        .map_or(0, |v| v as u64))
}

/// Writes that passed their check: whose state they change, and each one's
/// old version, for [`apply_writes`].
pub(super) struct CheckedWrites {
    pub owners: Owners,
    pub olds: Vec<u64>,
}

/// Checks every `set-if` of `writes` in order, as if the earlier writes had
/// been applied. Returns each write's old version (for [`apply_writes`]),
/// or `Err(why)` naming the first conflict.
pub(super) fn check_writes(
    tx: &Transaction<'_>,
    owners: &Owners,
    writes: &[Write],
) -> Result<std::result::Result<Vec<u64>, String>> {
    let mut versions: HashMap<(Scope, &str), u64> = HashMap::new();
    let mut olds = Vec::with_capacity(writes.len());
    for write in writes {
        let current = match versions.get(&(write.scope, write.key.as_str())) {
            Some(&v) => v,
            None => version_of(tx, write.scope, owners.of(write.scope), &write.key)?,
        };
        if let Some(expected) = write.if_version
            && expected != current
        {
            return Ok(Err(format!(
                "set-if on {} state key {:?} expected version {expected}, found {current}",
                write.scope.as_str(),
                write.key
            )));
        }
        let next = if write.value.is_some() {
            current + 1
        } else {
            0
        };
        versions.insert((write.scope, write.key.as_str()), next);
        olds.push(current);
    }
    Ok(Ok(olds))
}

/// Applies checked writes in order (`olds`: their old versions, from
/// [`check_writes`] in the same transaction), each with its `state_write` event.
pub(super) fn apply_writes(
    tx: &Transaction<'_>,
    task_id: Option<i64>,
    owners: &Owners,
    writes: &[Write],
    olds: &[u64],
    actor: &str,
    now: i64,
) -> Result<()> {
    for (write, &old) in writes.iter().zip(olds) {
        let owner = owners.of(write.scope);
        let new = match &write.value {
            Some(value) => {
                tx.prepare_cached(
                    "INSERT INTO state (scope, owner, key, value, version, updated_at, task_id)
                     VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6)
                     ON CONFLICT (scope, owner, key) DO UPDATE
                     SET value = excluded.value, version = version + 1,
                         updated_at = excluded.updated_at, task_id = excluded.task_id",
                )?
                .execute(params![
                    write.scope.as_str(),
                    owner,
                    write.key,
                    value,
                    now,
                    task_id
                ])?;
                old + 1
            }
            None => {
                tx.prepare_cached(
                    "DELETE FROM state WHERE scope = ?1 AND owner = ?2 AND key = ?3",
                )?
                .execute(params![write.scope.as_str(), owner, write.key])?;
                0
            }
        };
        let detail = json!({
            "scope": write.scope,
            "owner": owner,
            "key": write.key,
            "old_version": old,
            "new_version": new,
        });
        // Not a transition: the task's state column is read, not written.
        // Operator writes have no task; they are recorded under task 0.
        tx.prepare_cached(
            "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
             SELECT ?1, ?2, 'state_write', s, s, ?3, ?4
             FROM (SELECT COALESCE((SELECT state FROM tasks WHERE id = ?2), 'complete') AS s)",
        )?
        .execute(params![
            now,
            task_id.unwrap_or(0),
            actor,
            detail.to_string()
        ])?;
    }
    Ok(())
}

/// The writes a task holds while it waits in review.
pub(super) fn held_writes(tx: &Transaction<'_>, task_id: i64) -> Result<Vec<Write>> {
    let held: Option<String> = tx
        .prepare_cached("SELECT held_state FROM tasks WHERE id = ?1")?
        .query_row([task_id], |r| r.get(0))?;
    match held {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| QueueError::Corrupt(format!("task {task_id} held_state: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// Keeps a run's writes on a task waiting in review.
pub(super) fn hold_writes(tx: &Transaction<'_>, task_id: i64, writes: &[Write]) -> Result<()> {
    // Every way out of review clears it, so nothing is held now.
    if writes.is_empty() {
        return Ok(());
    }
    let text =
        (!writes.is_empty()).then(|| serde_json::to_string(writes).expect("writes serialize"));
    tx.prepare_cached("UPDATE tasks SET held_state = ?1 WHERE id = ?2")?
        .execute(params![text, task_id])?;
    Ok(())
}

impl Queue {
    /// The owner of `scope` for a task of `agent`: the agent's name, or the
    /// task's chain (its root task's id).
    pub fn state_owner(&self, task_id: i64, scope: Scope) -> Result<String> {
        let owners = owners_of(&self.conn, task_id)?;
        Ok(owners.of(scope).to_string())
    }

    /// One committed entry of a task's scope (what a run reads).
    pub fn state_get_for_task(
        &self,
        task_id: i64,
        scope: Scope,
        key: &str,
    ) -> Result<Option<Entry>> {
        let owners = owners_of(&self.conn, task_id)?;
        self.state_get(scope, owners.of(scope), key)
    }

    /// Committed entries of a task's scope whose key starts with `prefix`.
    pub fn state_scan_for_task(
        &self,
        task_id: i64,
        scope: Scope,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<Entry>> {
        let owners = owners_of(&self.conn, task_id)?;
        self.state_scan(scope, owners.of(scope), prefix, limit)
    }

    /// One committed entry.
    pub fn state_get(&self, scope: Scope, owner: &str, key: &str) -> Result<Option<Entry>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT key, value, version FROM state WHERE scope = ?1 AND owner = ?2 AND key = ?3",
            )?
            .query_row(params![scope.as_str(), owner, key], entry_from_row)
            .optional()?)
    }

    /// Committed entries whose key starts with `prefix`, in key order.
    pub fn state_scan(
        &self,
        scope: Scope,
        owner: &str,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<Entry>> {
        // Keys compare as UTF-8 bytes, which never contain 0xFF: every key
        // with the prefix sorts before prefix || 0xFF (an index range scan).
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, value, version FROM state
             WHERE scope = ?1 AND owner = ?2 AND key >= ?3 AND key < ?3 || CAST(x'FF' AS TEXT)
             ORDER BY key LIMIT ?4",
        )?;
        let rows = stmt.query_map(
            params![scope.as_str(), owner, prefix, limit],
            entry_from_row,
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// An operator's write (`colony state set/delete`): checked like a run's,
    /// applied at once and audited with this connection's actor. Returns the
    /// new version (0 after a delete).
    pub fn state_write_by_operator(
        &mut self,
        scope: Scope,
        owner: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<u64> {
        let write = Write {
            scope,
            key: key.to_string(),
            value: value.map(str::to_string),
            if_version: None,
        };
        check_write(&write).map_err(|m| QueueError::Invalid {
            field: "state".into(),
            message: m,
        })?;
        if scope == Scope::Chain && owner.parse::<i64>().is_err() {
            return Err(QueueError::Invalid {
                field: "chain".into(),
                message: format!("{owner:?} is not a task id"),
            });
        }
        let owners = Owners {
            agent: owner.to_string(),
            chain: owner.to_string(),
        };
        let actor = self.opts.actor.clone();
        let tx = self.write()?;
        let task = match scope {
            Scope::Chain => owner.parse().ok(),
            Scope::Agent => None,
        };
        let writes = std::slice::from_ref(&write);
        let olds = check_writes(&tx, &owners, writes)?.expect("no set-if, no conflict");
        apply_writes(&tx, task, &owners, writes, &olds, &actor, now_ms())?;
        let version = version_of(&tx, scope, owner, key)?;
        tx.commit()?;
        Ok(version)
    }
}

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    Ok(Entry {
        key: r.get(0)?,
        value: r.get(1)?,
        version: r.get::<_, i64>(2)? as u64,
    })
}
