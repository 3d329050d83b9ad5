//! The host side of `colony:agent/state`: reads see the committed state
//! (through [`RunHooks`], so the runtime knows no SQL) overlaid with the
//! run's own writes; writes are only buffered here and handed to the queue
//! with the run's outcome, to commit with the task's completion.

use std::sync::Arc;

use super::bindings::colony::agent::state as wit;
use super::sandbox::{RunHooks, RunState};
use crate::state::{Entry, MAX_WRITES_PER_RUN, Scope, Write, check_write};

/// One run's state access.
pub struct StateSession {
    hooks: Arc<dyn RunHooks>,
    task_id: i64,
    /// Writes in the order the agent made them.
    pub(super) writes: Vec<Write>,
    /// The first invalid use (bad key or value, too many writes): the run
    /// then fails with `invalid_output` naming it, whatever it returns.
    pub(super) invalid: Option<String>,
}

impl StateSession {
    pub fn new(hooks: Arc<dyn RunHooks>, task_id: i64) -> StateSession {
        StateSession {
            hooks,
            task_id,
            writes: Vec::new(),
            invalid: None,
        }
    }

    fn buffer(&mut self, write: Write) {
        if self.invalid.is_some() {
            return;
        }
        if self.writes.len() >= MAX_WRITES_PER_RUN {
            self.invalid = Some(format!(
                "more than {MAX_WRITES_PER_RUN} state writes in one run (at key {:?})",
                write.key
            ));
            return;
        }
        match check_write(&write) {
            Ok(()) => self.writes.push(write),
            Err(why) => self.invalid = Some(why),
        }
    }

    /// This run's latest write of `key`, if any: `Some(None)` is a delete.
    fn pending(&self, scope: Scope, key: &str) -> Option<Option<&str>> {
        self.writes
            .iter()
            .rev()
            .find(|w| w.scope == scope && w.key == key)
            .map(|w| w.value.as_deref())
    }

    async fn committed(&self, scope: Scope, key: &str) -> wasmtime::Result<Option<Entry>> {
        self.hooks
            .state_get(self.task_id, scope, key.to_string())
            .await
            .map_err(|e| wasmtime::Error::msg(format!("reading state key {key:?} failed: {e}")))
    }

    /// The committed value, or this run's own pending write (with the version
    /// it will have once committed).
    async fn get(&self, scope: Scope, key: &str) -> wasmtime::Result<Option<Entry>> {
        let committed = self.committed(scope, key).await?;
        Ok(match self.pending(scope, key) {
            None => committed,
            Some(None) => None,
            Some(Some(value)) => Some(Entry {
                key: key.to_string(),
                value: value.to_string(),
                version: committed.map_or(0, |e| e.version) + 1,
            }),
        })
    }

    async fn scan(&self, scope: Scope, prefix: &str, limit: u32) -> wasmtime::Result<Vec<Entry>> {
        // Ask for enough committed entries that this run's deletes cannot
        // leave the page short.
        let extra = self.writes.len().min(MAX_WRITES_PER_RUN) as u32;
        let committed = self
            .hooks
            .state_scan(
                self.task_id,
                scope,
                prefix.to_string(),
                limit.saturating_add(extra),
            )
            .await
            .map_err(|e| {
                wasmtime::Error::msg(format!("scanning state prefix {prefix:?} failed: {e}"))
            })?;
        let mut merged: std::collections::BTreeMap<String, Entry> =
            committed.into_iter().map(|e| (e.key.clone(), e)).collect();
        for write in self
            .writes
            .iter()
            .filter(|w| w.scope == scope && w.key.starts_with(prefix))
        {
            match &write.value {
                None => {
                    merged.remove(&write.key);
                }
                Some(value) => {
                    let version = merged.get(&write.key).map_or(0, |e| e.version) + 1;
                    merged.insert(
                        write.key.clone(),
                        Entry {
                            key: write.key.clone(),
                            value: value.clone(),
                            version,
                        },
                    );
                }
            }
        }
        Ok(merged.into_values().take(limit as usize).collect())
    }
}

fn scope(s: wit::Scope) -> Scope {
    match s {
        wit::Scope::Agent => Scope::Agent,
        wit::Scope::Chain => Scope::Chain,
    }
}

fn to_wit(e: Entry) -> wit::Entry {
    wit::Entry {
        key: e.key,
        value: e.value,
        version: e.version,
    }
}

impl wit::Host for RunState {
    async fn get(&mut self, s: wit::Scope, key: String) -> wasmtime::Result<Option<wit::Entry>> {
        Ok(self.state.get(scope(s), &key).await?.map(to_wit))
    }

    async fn scan(
        &mut self,
        s: wit::Scope,
        prefix: String,
        limit: u32,
    ) -> wasmtime::Result<Vec<wit::Entry>> {
        let entries = self.state.scan(scope(s), &prefix, limit).await?;
        Ok(entries.into_iter().map(to_wit).collect())
    }

    fn set(&mut self, s: wit::Scope, key: String, value: String) {
        self.state.buffer(Write {
            scope: scope(s),
            key,
            value: Some(value),
            if_version: None,
        });
    }

    fn set_if(&mut self, s: wit::Scope, key: String, value: String, version: u64) {
        self.state.buffer(Write {
            scope: scope(s),
            key,
            value: Some(value),
            if_version: Some(version),
        });
    }

    fn delete(&mut self, s: wit::Scope, key: String) {
        self.state.buffer(Write {
            scope: scope(s),
            key,
            value: None,
            if_version: None,
        });
    }
}
