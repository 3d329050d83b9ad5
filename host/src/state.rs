//! Durable agent state, as data: scopes, entries and the writes a run
//! buffers until its task completes. Pure (no SQL, no wasm): the runtime
//! collects writes, the queue commits them with the completion.

use serde::{Deserialize, Serialize};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value (JSON text), in bytes.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;
/// Most writes one run may buffer.
pub const MAX_WRITES_PER_RUN: usize = 1000;
/// Most bytes (keys and values) one run may buffer: the host holds them
/// outside the run's memory cap until the task completes.
pub const MAX_BYTES_PER_RUN: usize = 16 << 20;
/// Most entries one `scan` returns.
pub const MAX_SCAN: u32 = 1000;

/// Whose state a key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Shared by every task of one agent.
    Agent,
    /// Shared by the tasks of one chain (a root and everything it spawned
    /// or chained, transitively).
    Chain,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Agent => "agent",
            Scope::Chain => "chain",
        }
    }
}

/// A committed value and its version (1 when first written, +1 per write).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    /// JSON text.
    pub value: String,
    pub version: u64,
}

/// One buffered write of a run, applied in order when its task completes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    pub scope: Scope,
    pub key: String,
    /// The new JSON value; `None` deletes the key.
    pub value: Option<String>,
    /// Compare-and-set: the version the key must have at commit (0: must
    /// not exist). `None` writes unconditionally.
    pub if_version: Option<u64>,
}

/// Checks a write the way the queue will store it; the message names the key.
pub fn check_write(write: &Write) -> Result<(), String> {
    let key = &write.key;
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "state key {:?} must be 1 to {MAX_KEY_BYTES} bytes long",
            &key[..key.floor_char_boundary(80)]
        ));
    }
    if let Some(value) = &write.value {
        if value.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "the value of state key {key:?} is {} bytes, more than the limit of {MAX_VALUE_BYTES}",
                value.len()
            ));
        }
        let value = serde_json::from_str::<serde_json::Value>(value)
            .map_err(|e| format!("the value of state key {key:?} is not valid JSON: {e}"))?;
        crate::json::check_numbers(&value)
            .map_err(|why| format!("the value of state key {key:?}: {why}"))?;
    }
    Ok(())
}
