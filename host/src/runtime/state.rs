//! The host side of `colony:agent/state`: reads see the committed state
//! (through [`RunHooks`], so the runtime knows no SQL) overlaid with the
//! run's own writes; writes are only buffered here and handed to the queue
//! with the run's outcome, to commit with the task's completion.

use std::sync::Arc;

use super::bindings::colony::agent::state as wit;
use super::sandbox::{RunHooks, RunState};
use crate::state::{
    Entry, MAX_BYTES_PER_RUN, MAX_SCAN, MAX_WRITES_PER_RUN, Scope, Write, check_write,
};

/// One run's state access.
pub struct StateSession {
    hooks: Arc<dyn RunHooks>,
    /// Whose state the run's scopes are: its agent's, and its chain's (the
    /// root task id, known from the claim, so a read is one lookup by key).
    agent: Arc<str>,
    chain: i64,
    /// Writes in the order the agent made them.
    pub(super) writes: Vec<Write>,
    /// Bytes of keys and values in `writes`.
    bytes: usize,
    /// The first invalid use (bad key or value, too many writes): the run
    /// then fails with `invalid_output` naming it, whatever it returns.
    pub(super) invalid: Option<String>,
}

impl StateSession {
    pub fn new(hooks: Arc<dyn RunHooks>, agent: Arc<str>, chain: i64) -> StateSession {
        StateSession {
            hooks,
            agent,
            chain,
            writes: Vec::new(),
            bytes: 0,
            invalid: None,
        }
    }

    /// The owner of `scope`, as the queue stores it.
    fn owner(&self, scope: Scope) -> String {
        match scope {
            Scope::Agent => self.agent.to_string(),
            Scope::Chain => self.chain.to_string(),
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
        let size = write.key.len() + write.value.as_ref().map_or(0, String::len);
        if self.bytes + size > MAX_BYTES_PER_RUN {
            self.invalid = Some(format!(
                "more than {} MiB of state written in one run (at key {:?})",
                MAX_BYTES_PER_RUN >> 20,
                write.key
            ));
            return;
        }
        match check_write(&write) {
            Ok(()) => {
                self.bytes += size;
                self.writes.push(write);
            }
            Err(why) => self.invalid = Some(why),
        }
    }

    /// The entry as it will be once this run's writes commit on top of
    /// `committed`: the same arithmetic as the queue's check (+1 per write,
    /// a delete leaves nothing), so a `set-if` on the version read holds.
    fn fold(&self, scope: Scope, key: &str, committed: Option<Entry>) -> Option<Entry> {
        self.writes
            .iter()
            .filter(|w| w.scope == scope && w.key == key)
            .fold(committed, |current, w| {
                let version = current.as_ref().map_or(0, |e| e.version) + 1;
                w.value.as_ref().map(|value| Entry {
                    key: key.to_string(),
                    value: value.clone(),
                    version,
                })
            })
    }

    async fn committed(&self, scope: Scope, key: &str) -> wasmtime::Result<Option<Entry>> {
        self.hooks
            .state_get(scope, self.owner(scope), key.to_string())
            .await
            .map_err(|e| wasmtime::Error::msg(format!("reading state key {key:?} failed: {e}")))
    }

    /// The committed value, or this run's own pending write (with the version
    /// it will have once committed).
    async fn get(&self, scope: Scope, key: &str) -> wasmtime::Result<Option<Entry>> {
        let committed = self.committed(scope, key).await?;
        Ok(self.fold(scope, key, committed))
    }

    async fn scan(&self, scope: Scope, prefix: &str, limit: u32) -> wasmtime::Result<Vec<Entry>> {
        let limit = limit.min(MAX_SCAN);
        // Ask for enough committed entries that this run's deletes cannot
        // leave the page short.
        let extra = self.writes.len().min(MAX_WRITES_PER_RUN) as u32;
        let committed = self
            .hooks
            .state_scan(
                scope,
                self.owner(scope),
                prefix.to_string(),
                limit.saturating_add(extra),
            )
            .await
            .map_err(|e| {
                wasmtime::Error::msg(format!("scanning state prefix {prefix:?} failed: {e}"))
            })?;
        let mut merged: std::collections::BTreeMap<String, Option<Entry>> = committed
            .into_iter()
            .map(|e| (e.key.clone(), Some(e)))
            .collect();
        for write in self
            .writes
            .iter()
            .filter(|w| w.scope == scope && w.key.starts_with(prefix))
        {
            merged.entry(write.key.clone()).or_insert(None);
        }
        Ok(merged
            .into_iter()
            .filter_map(|(key, committed)| self.fold(scope, &key, committed))
            .take(limit as usize)
            .collect())
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
