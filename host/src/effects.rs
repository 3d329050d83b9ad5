//! Side effects as data: HTTP requests a run queues to be sent after its
//! task commits. Pure (no SQL, no wasm, no network): the runtime collects
//! them, the queue stores them with the completion (the outbox), the daemon
//! delivers them.

use serde::{Deserialize, Serialize};

/// Most effects one run may queue.
pub const MAX_EFFECTS_PER_RUN: usize = 100;
/// Largest body of one effect.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Most body bytes of all of one run's effects (held by the host, outside
/// the run's memory cap, until the task completes).
pub const MAX_BODY_BYTES_PER_RUN: usize = 8 << 20;
/// Delivery attempts before an effect is marked failed.
pub const DEFAULT_DELIVERY_ATTEMPTS: u32 = 5;

/// A request to send once the task has committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    /// 1, 2, ... within the run: with the task id, the idempotency key.
    pub seq: u32,
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Effect {
    /// The `Idempotency-Key` header value every delivery attempt carries.
    pub fn idempotency_key(task_id: i64, seq: u32) -> String {
        format!("colony-{task_id}-{seq}")
    }
}

/// Methods an effect may use.
pub const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Checks the parts of an effect that need no grant: method, URL shape,
/// headers and body size. The message is for the agent.
pub fn check_shape(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> Result<(), String> {
    if !METHODS.contains(&method) {
        return Err(format!(
            "method {method:?} is not one of {}",
            METHODS.join(", ")
        ));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("{url:?} is not an http:// or https:// URL"));
    }
    if let Some((name, _)) = headers.iter().find(|(name, value)| {
        name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            || value.bytes().any(|b| b == b'\r' || b == b'\n')
    }) {
        return Err(format!("header {name:?} is not a valid HTTP header"));
    }
    if let Some(body) = body
        && body.len() > MAX_BODY_BYTES
    {
        return Err(format!(
            "the body is {} bytes, more than the limit of {MAX_BODY_BYTES}",
            body.len()
        ));
    }
    Ok(())
}
