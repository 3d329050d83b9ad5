//! The state writes of a batch of plain completions, checked against each
//! other and applied together (SQLite's plain completion path).

use std::collections::HashMap;

use super::{Owners, next_version, set_if_conflict, version_of, write_detail};
use crate::queue::batch::{BySize, insert_or_fail, values_list};
use crate::queue::sql::{Param, Sql, args};
use crate::queue::{QueueError, Result};
use crate::state::{Scope, Write};
use crate::task::TaskError;

/// The state writes of a batch of plain completions on SQLite (see
/// `batch::complete_plain`), under the transaction's write lock: each run's
/// writes are checked against the committed state overlaid with the
/// batch's earlier accepted writes, and all of them are applied at the
/// end, one row write per key however many runs wrote it, new keys many
/// rows per statement. Each key's version is read once per batch.
///
/// Against [`super::check_writes`] + [`super::apply_writes`] per run, this saves a read
/// and a row write per key already seen in the batch, a statement per new
/// key and the per-statement cost of every `state_write` event, which the
/// caller writes with the batch's other events. Writer instructions per
/// state write (`writer_bench 20000 34`, callgrind): a new key per run
/// 39,600 → 37,400 (`--state`), one key for every run 31,500 → 14,200
/// (`--state-one-key`).
#[derive(Default)]
pub(in crate::queue) struct BatchWrites<'a> {
    /// Every key touched so far, in the order first touched.
    keys: Vec<PendingKey<'a>>,
    /// Where each key is in `keys`, by scope and name (its owners told
    /// apart by a look at each: a batch rarely holds more than one).
    index: HashMap<(Scope, &'a str), Vec<usize>>,
    /// The `state_write` events of the accepted writes, in order.
    pub(in crate::queue) events: Vec<(i64, String)>,
}

/// One key as the batch leaves it.
struct PendingKey<'a> {
    scope: Scope,
    owner: String,
    key: &'a str,
    /// Its committed version when the batch first touched it (0: absent).
    committed: u64,
    /// Its version after the batch's accepted writes.
    version: u64,
    /// Its value after them (`None`: absent).
    value: Option<&'a str>,
    /// The task that wrote it last (`None`: no accepted write yet).
    task_id: Option<i64>,
}

/// A run's writes that passed their check: for each, the key's place in
/// [`BatchWrites::keys`] and its old and new version.
pub(in crate::queue) struct CheckedBatchWrites(Vec<(usize, u64, u64)>);

impl<'a> BatchWrites<'a> {
    /// Checks every `set-if` of one run's `writes` in order, as if the
    /// batch's accepted writes and this run's earlier ones had been applied.
    /// Nothing is accepted yet (the run's completion may still be refused):
    /// see [`BatchWrites::accept`]. `Err(failure)`: the first conflict, as
    /// [`set_if_conflict`] words and classifies it.
    pub(in crate::queue) fn check(
        &mut self,
        tx: &dyn Sql,
        owners: &Owners,
        writes: &'a [Write],
    ) -> Result<std::result::Result<CheckedBatchWrites, TaskError>> {
        let mut checked: Vec<(usize, u64, u64)> = Vec::with_capacity(writes.len());
        for (i, write) in writes.iter().enumerate() {
            let at = self.key_index(tx, write.scope, owners.of(write.scope), &write.key)?;
            // This run's own latest write of the key, if any, else the batch's.
            let current = checked
                .iter()
                .rev()
                .find(|(key, _, _)| *key == at)
                .map_or(self.keys[at].version, |&(_, _, next)| next);
            let next = match next_version(write, current) {
                Some(next) => next,
                None => return Ok(Err(set_if_conflict(writes, i, current))),
            };
            checked.push((at, current, next));
        }
        Ok(Ok(CheckedBatchWrites(checked)))
    }

    /// Accepts the checked `writes` of task `task_id`, whose completion went
    /// through: they overlay later checks and are applied by
    /// [`BatchWrites::apply`].
    pub(in crate::queue) fn accept(
        &mut self,
        task_id: i64,
        writes: &'a [Write],
        checked: CheckedBatchWrites,
    ) {
        for (write, (at, old, new)) in writes.iter().zip(checked.0) {
            let key = &mut self.keys[at];
            key.version = new;
            key.value = write.value.as_deref();
            key.task_id = Some(task_id);
            // Deleting a key that is not there changes nothing to record.
            if old != 0 || new != 0 {
                self.events.push((
                    task_id,
                    write_detail(key.scope, &key.owner, key.key, old, new),
                ));
            }
        }
    }

    /// Where the key is in `keys`, reading its committed version the first
    /// time.
    fn key_index(
        &mut self,
        tx: &dyn Sql,
        scope: Scope,
        owner: &str,
        key: &'a str,
    ) -> Result<usize> {
        if let Some(places) = self.index.get(&(scope, key))
            && let Some(&at) = places.iter().find(|&&at| self.keys[at].owner == owner)
        {
            return Ok(at);
        }
        let committed = version_of(tx, scope, owner, key)?;
        self.keys.push(PendingKey {
            scope,
            owner: owner.to_string(),
            key,
            committed,
            version: committed,
            value: None,
            task_id: None,
        });
        let at = self.keys.len() - 1;
        self.index.entry((scope, key)).or_default().push(at);
        Ok(at)
    }

    /// Writes every key the accepted writes changed: new keys many per
    /// INSERT, the others one UPDATE or DELETE each (fenced on the version
    /// read, which the write lock keeps). The events are the caller's.
    pub(in crate::queue) fn apply(&self, tx: &dyn Sql, now: i64) -> Result<()> {
        let mut new_keys = Vec::new();
        for key in self.keys.iter().filter(|k| k.task_id.is_some()) {
            let scope = key.scope.as_str();
            match (key.committed, key.value) {
                (0, Some(_)) => new_keys.push(key),
                (0, None) => {} // created and deleted again, or never there
                (_, Some(value)) => {
                    let updated = tx.execute(
                        "UPDATE state SET value = ?4, version = ?5, updated_at = ?6, task_id = ?7
                         WHERE scope = ?1 AND owner = ?2 AND key = ?3 AND version = ?8",
                        args![
                            scope,
                            key.owner,
                            key.key,
                            value,
                            key.version,
                            now,
                            key.task_id,
                            key.committed
                        ],
                    )?;
                    if updated != 1 {
                        return Err(QueueError::Corrupt(format!(
                            "{scope} state key {:?} of {} changed between its check and its write",
                            key.key, key.owner
                        )));
                    }
                }
                (_, None) => {
                    tx.execute(
                        "DELETE FROM state WHERE scope = ?1 AND owner = ?2 AND key = ?3",
                        args![scope, key.owner, key.key],
                    )?;
                }
            }
        }
        for chunk in BySize::chunks(tx.dialect(), &new_keys) {
            let mut params = Vec::with_capacity(chunk.len() * 7);
            for key in chunk {
                params.extend([
                    Param::Text(key.scope.as_str()),
                    Param::Text(&key.owner),
                    Param::Text(key.key),
                    Param::Text(key.value.expect("new keys have a value")),
                    Param::Int(key.version as i64),
                    Param::Int(now),
                    Param::Int(key.task_id.expect("new keys were written")),
                ]);
            }
            tx.execute(&INSERT_STATE.sql(tx.dialect(), chunk.len()), &params)?;
        }
        Ok(())
    }
}

static INSERT_STATE: BySize = BySize::new(|dialect, rows| {
    format!(
        "{} INTO state (scope, owner, key, value, version, updated_at, task_id) VALUES {}",
        insert_or_fail(dialect),
        values_list(rows, 7, |_, p| p)
    )
});
