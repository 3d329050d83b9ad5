//! Durable agent state: every statement about the `state` table.
//!
//! A run's writes are applied in the transaction that completes its task
//! (or approves it), after every `set-if` condition was checked against the
//! committed state, so a conflict refuses the completion as a whole. Each
//! applied write appends a `state_write` event (scope, key, versions; never
//! the value).

use super::sql::{Dialect, Row, Sql, args};
use super::{Queue, QueueError, Result};
use crate::state::{Entry, Scope, Write, check_write};
use crate::task::{ErrorKind, State, TaskError};
use std::collections::HashMap;
use std::fmt::Write as _;

mod batch_writes;
mod locks;
pub(super) use batch_writes::BatchWrites;
pub(super) use locks::lock_batch_keys;
use locks::lock_keys;

/// The owners of a task's two scopes: what `owner` holds in each.
pub(super) struct Owners {
    /// The task's agent.
    agent: String,
    /// The task's chain: its root task's id.
    chain: String,
}

impl Owners {
    /// The owners of a task of `agent` in the chain rooted at `root_id`.
    pub(super) fn new(agent: String, root_id: i64) -> Owners {
        Owners {
            agent,
            chain: root_id.to_string(),
        }
    }

    fn of(&self, scope: Scope) -> &str {
        match scope {
            Scope::Agent => &self.agent,
            Scope::Chain => &self.chain,
        }
    }
}

pub(super) fn owners_of(tx: &dyn Sql, task_id: i64) -> Result<Owners> {
    let row = tx
        .query_opt(
            "SELECT agent, COALESCE(root_id, id) FROM tasks WHERE id = ?1",
            args![task_id],
        )?
        .ok_or(QueueError::NotFound(task_id))?;
    Ok(Owners::new(row.get(0)?, row.get(1)?))
}

/// A key's committed version (0: absent). Only called in write
/// transactions, before or after writing the key: the row stays locked
/// (on PostgreSQL) until the transaction ends.
fn version_of(tx: &dyn Sql, scope: Scope, owner: &str, key: &str) -> Result<u64> {
    let sql = match tx.dialect() {
        Dialect::Sqlite => "SELECT version FROM state WHERE scope = ?1 AND owner = ?2 AND key = ?3",
        Dialect::Postgres => {
            "SELECT version FROM state WHERE scope = ?1 AND owner = ?2 AND key = ?3 FOR UPDATE"
        }
    };
    match tx.query_opt(sql, args![scope.as_str(), owner, key])? {
        Some(row) => row.get(0),
        None => Ok(0),
    }
}

/// Writes that passed their check: whose state they change, and each one's
/// old version, for [`apply_writes`].
pub(super) struct CheckedWrites {
    pub owners: Owners,
    pub olds: Vec<u64>,
}

impl CheckedWrites {
    /// Applies the checked `writes` of the task `task_id`, which stands in
    /// `task_state` (see [`apply_writes`]).
    pub fn apply(
        &self,
        tx: &dyn Sql,
        task_id: i64,
        task_state: State,
        writes: &[Write],
        actor: &str,
        now: i64,
    ) -> Result<()> {
        apply_writes(
            tx,
            Some((task_id, task_state)),
            &self.owners,
            writes,
            &self.olds,
            actor,
            now,
        )
    }
}

/// Checks every `set-if` of `writes` in order, as if the earlier writes had
/// been applied. Returns each write's old version (for [`apply_writes`]),
/// or the failure of the first conflict.
pub(super) fn check_writes(
    tx: &dyn Sql,
    owners: &Owners,
    writes: &[Write],
) -> Result<std::result::Result<Vec<u64>, TaskError>> {
    lock_keys(tx, owners, writes)?;
    let mut versions: HashMap<(Scope, &str), u64> = HashMap::new();
    let mut olds = Vec::with_capacity(writes.len());
    for (i, write) in writes.iter().enumerate() {
        let current = match versions.get(&(write.scope, write.key.as_str())) {
            Some(&v) => v,
            None => version_of(tx, write.scope, owners.of(write.scope), &write.key)?,
        };
        let next = match next_version(write, current) {
            Some(next) => next,
            None => return Ok(Err(set_if_conflict(writes, i, current))),
        };
        versions.insert((write.scope, write.key.as_str()), next);
        olds.push(current);
    }
    Ok(Ok(olds))
}

/// The version a key has after `write`, when it stands at `current`
/// (+1 per set, a delete leaves none), or `None` when it is a `set-if`
/// that does not hold.
fn next_version(write: &Write, current: u64) -> Option<u64> {
    if write.if_version.is_some_and(|expected| expected != current) {
        return None;
    }
    Some(match write.value.is_some() {
        true => current + 1,
        false => 0,
    })
}

/// The failure of `writes[i]`, a `set-if` that found the key at `current`:
/// retried (`conflict`) when another task's write may change that, and
/// permanent (`invalid_output`) when the run's own earlier writes decide
/// it, which every retry repeats: a set-if or a delete of the key before it
/// fixes the version, and k plain sets put it at k or more.
fn set_if_conflict(writes: &[Write], i: usize, current: u64) -> TaskError {
    let write = &writes[i];
    let expected = write.if_version.unwrap_or_default();
    let what = format!(
        "set-if on {} state key {:?} expected version {expected}",
        write.scope.as_str(),
        write.key,
    );
    let earlier: Vec<&Write> = writes[..i]
        .iter()
        .filter(|w| w.scope == write.scope && w.key == write.key)
        .collect();
    let fixed = earlier
        .iter()
        .any(|w| w.if_version.is_some() || w.value.is_none());
    match fixed || expected < earlier.len() as u64 {
        false => TaskError {
            kind: ErrorKind::Conflict,
            message: format!("{what}, found {current}"),
        },
        true => TaskError {
            kind: ErrorKind::InvalidOutput,
            message: format!(
                "{what}, but this run's own earlier writes of the key make it {current}: a run's \
                 writes apply in order when it completes, so a later set-if must expect the \
                 version the earlier ones make (a retry would fail the same way)"
            ),
        },
    }
}

/// Applies checked writes in order (`olds`: their old versions, from
/// [`check_writes`] in the same transaction), each with its `state_write`
/// event (a delete of a key that is not there has none). `task`: the task whose writes they are and the state it stands in
/// (the event is not a transition: it shows that state on both sides).
/// Operator writes have no task; they are recorded under task 0, as
/// `complete`.
///
/// The old version says whether the row exists (the check read it under the
/// write lock, or on PostgreSQL under the key's advisory lock), so each write
/// is a plain INSERT, UPDATE or DELETE of one row: SQLite runs an upsert, or
/// an `INSERT … SELECT`, with a statement journal that copies every page it
/// touches (measured: ~12 µs per write with both, against ~5 without).
pub(super) fn apply_writes(
    tx: &dyn Sql,
    task: Option<(i64, State)>,
    owners: &Owners,
    writes: &[Write],
    olds: &[u64],
    actor: &str,
    now: i64,
) -> Result<()> {
    let task_id = task.map(|(id, _)| id);
    let task_state = task.map_or(State::Complete, |(_, state)| state).as_str();
    for (write, &old) in writes.iter().zip(olds) {
        let owner = owners.of(write.scope);
        let scope = write.scope.as_str();
        let new = match &write.value {
            Some(value) if old == 0 => {
                tx.execute(
                    "INSERT INTO state (scope, owner, key, value, version, updated_at, task_id)
                     VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6)",
                    args![scope, owner, write.key, value, now, task_id],
                )?;
                1
            }
            Some(value) => {
                let updated = tx.execute(
                    "UPDATE state SET value = ?4, version = ?5, updated_at = ?6, task_id = ?7
                     WHERE scope = ?1 AND owner = ?2 AND key = ?3 AND version = ?8",
                    args![scope, owner, write.key, value, old + 1, now, task_id, old],
                )?;
                if updated != 1 {
                    return Err(QueueError::Corrupt(format!(
                        "{scope} state key {:?} of {owner} changed between its check and its write",
                        write.key
                    )));
                }
                old + 1
            }
            // Deleting a key that is not there changes nothing to record.
            None if old == 0 => continue,
            None => {
                tx.execute(
                    "DELETE FROM state WHERE scope = ?1 AND owner = ?2 AND key = ?3",
                    args![scope, owner, write.key],
                )?;
                0
            }
        };
        let detail = write_detail(write.scope, owner, &write.key, old, new);
        tx.execute(
            "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
             VALUES (?1, ?2, 'state_write', ?3, ?3, ?4, ?5)",
            args![now, task_id.unwrap_or(0), task_state, actor, detail],
        )?;
    }
    Ok(())
}

/// The detail of a `state_write` event. Built by hand: one per state write
/// on the writer's thread, where `format!` and a string per field cost
/// 2,200 instructions.
fn write_detail(scope: Scope, owner: &str, key: &str, old: u64, new: u64) -> String {
    let mut detail = String::with_capacity(80 + owner.len() + key.len());
    detail.push_str(r#"{"scope":""#);
    detail.push_str(scope.as_str());
    detail.push_str(r#"","owner":"#);
    push_json_string(&mut detail, owner);
    detail.push_str(r#","key":"#);
    push_json_string(&mut detail, key);
    let _ = write!(detail, r#","old_version":{old},"new_version":{new}}}"#);
    detail
}

/// `text` as a JSON string, as [`json_string`] writes it: only `"`, `\`
/// and control characters need escaping, and keys rarely hold any.
fn push_json_string(out: &mut String, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        out.push_str(&json_string(text));
    }
}

/// `text` as a JSON string, quoted and escaped.
fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// The writes a task holds while it waits in review.
pub(super) fn held_writes(tx: &dyn Sql, task_id: i64) -> Result<Vec<Write>> {
    let held: Option<String> =
        tx.query_value("SELECT held_state FROM tasks WHERE id = ?1", args![task_id])?;
    match held {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| QueueError::Corrupt(format!("task {task_id} held_state: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// Keeps a run's writes on a task waiting in review.
pub(super) fn hold_writes(tx: &dyn Sql, task_id: i64, writes: &[Write]) -> Result<()> {
    // Every way out of review clears it, so nothing is held now.
    if writes.is_empty() {
        return Ok(());
    }
    let text =
        (!writes.is_empty()).then(|| serde_json::to_string(writes).expect("writes serialize"));
    tx.execute(
        "UPDATE tasks SET held_state = ?1 WHERE id = ?2",
        args![text, task_id],
    )?;
    Ok(())
}

/// One committed entry.
fn entry(db: &dyn Sql, scope: Scope, owner: &str, key: &str) -> Result<Option<Entry>> {
    db.query_opt(
        "SELECT key, value, version FROM state WHERE scope = ?1 AND owner = ?2 AND key = ?3",
        args![scope.as_str(), owner, key],
    )?
    .map(|r| entry_from_row(&r))
    .transpose()
}

/// Committed entries whose key starts with `prefix`, in key order (the
/// order of their UTF-8 bytes).
fn scan(db: &dyn Sql, scope: Scope, owner: &str, prefix: &str, limit: u32) -> Result<Vec<Entry>> {
    let sql = match db.dialect() {
        // Keys compare as UTF-8 bytes, which never contain 0xFF: every key
        // with the prefix sorts before prefix || 0xFF (an index range scan).
        Dialect::Sqlite => {
            "SELECT key, value, version FROM state
             WHERE scope = ?1 AND owner = ?2 AND key >= ?3 AND key < ?3 || CAST(x'FF' AS TEXT)
             ORDER BY key LIMIT ?4"
        }
        // PostgreSQL text cannot hold a 0xFF byte (and x'FF' is a bit
        // string there); the "C" collation orders keys by their bytes.
        Dialect::Postgres => {
            "SELECT key, value, version FROM state
             WHERE scope = ?1 AND owner = ?2 AND starts_with(key, ?3)
             ORDER BY key COLLATE \"C\" LIMIT ?4"
        }
    };
    db.query(sql, args![scope.as_str(), owner, prefix, limit])?
        .iter()
        .map(entry_from_row)
        .collect()
}

impl Queue {
    /// The owner of `scope` for a task of `agent`: the agent's name, or the
    /// task's chain (its root task's id).
    pub fn state_owner(&self, task_id: i64, scope: Scope) -> Result<String> {
        let owners = self.read(|db| owners_of(db, task_id))?;
        Ok(owners.of(scope).to_string())
    }

    /// Checks that `root` names a chain: a task that is its chain's first.
    /// The error says which task to use instead.
    pub fn check_chain_root(&self, root: i64) -> Result<()> {
        self.read(|db| chain_root_state(db, root)).map(drop)
    }

    /// The state writes task `task_id` holds while it waits in review
    /// (committed if approved), in the order its run made them.
    pub fn held_writes(&self, task_id: i64) -> Result<Vec<Write>> {
        self.read(|db| held_writes(db, task_id))
    }

    /// One committed entry.
    pub fn state_get(&self, scope: Scope, owner: &str, key: &str) -> Result<Option<Entry>> {
        self.read(|db| entry(db, scope, owner, key))
    }

    /// Committed entries whose key starts with `prefix`, in key order.
    pub fn state_scan(
        &self,
        scope: Scope,
        owner: &str,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<Entry>> {
        self.read(|db| scan(db, scope, owner, prefix, limit))
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
        let write = check_operator_write(scope, owner, key, value)?;
        let owners = Owners {
            agent: owner.to_string(),
            chain: owner.to_string(),
        };
        let actor = &self.opts.actor;
        let writes = std::slice::from_ref(&write);
        self.write(|tx, now| {
            // A chain's writes are recorded under its root task.
            let task = match scope {
                Scope::Chain => {
                    let root: i64 = owner.parse().expect("checked above");
                    Some((root, chain_root_state(tx, root)?))
                }
                Scope::Agent => None,
            };
            let olds = check_writes(tx, &owners, writes)?.expect("no set-if, no conflict");
            // Missing, as `state get` says of the same key (not_found).
            if value.is_none() && olds[0] == 0 {
                return Err(QueueError::Missing(format!(
                    "no {} state key {key:?} for {owner}, so there is nothing to delete",
                    scope.as_str()
                )));
            }
            apply_writes(tx, task, &owners, writes, &olds, actor, now)?;
            version_of(tx, scope, owner, key)
        })
    }
}

/// The state of task `root`, which must be a chain's root: state written
/// for a chain that does not exist yet would greet the task that later
/// gets its id, and state keyed by a task inside a chain would be read by
/// none (runs read their chain's state by its root).
fn chain_root_state(tx: &dyn Sql, root: i64) -> Result<State> {
    let row = tx
        .query_opt(
            "SELECT state, root_id FROM tasks WHERE id = ?1",
            args![root],
        )?
        .ok_or(QueueError::NotFound(root))?;
    if let Some(actual) = row.get::<Option<i64>>(1)? {
        return Err(QueueError::invalid(
            "chain",
            format!(
                "task {root} is in the chain of task {actual}; chain state is kept under the chain's first task: use {actual}"
            ),
        ));
    }
    super::tasks::parse_state(&row.get::<String>(0)?)
}

fn entry_from_row(r: &Row) -> Result<Entry> {
    Ok(Entry {
        key: r.get(0)?,
        value: r.get(1)?,
        version: r.get(2)?,
    })
}

/// An operator's write (`colony state set`/`delete`, the API), checked as
/// [`Queue::state_write_by_operator`] stores it, without the database: a
/// command line checks before it opens (or creates) one.
pub fn check_operator_write(
    scope: Scope,
    owner: &str,
    key: &str,
    value: Option<&str>,
) -> Result<Write> {
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
    Ok(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_detail_is_json_naming_the_key_whatever_it_holds() {
        for key in [
            "plain",
            "quo\"te",
            "back\\slash",
            "tab\tnew\nline\u{1}",
            "ünï ☃",
            "",
        ] {
            let detail = write_detail(Scope::Chain, "42", key, 3, 4);
            let parsed: serde_json::Value = serde_json::from_str(&detail).unwrap();
            let expected = serde_json::json!({
                "scope": "chain", "owner": "42", "key": key, "old_version": 3, "new_version": 4
            });
            assert_eq!(parsed, expected, "{detail}");
        }
    }
}
