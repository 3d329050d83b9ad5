//! Checks on everything the queue stores, made before it is stored: nothing
//! is written that a reader could not parse back.

use std::collections::{HashMap, HashSet};

use crate::task::{self, MAX_REVISIONS, NewTask, NextSpec, SpawnSpec};

use super::error::in_batch;
use super::{QueueError, Result};

/// Agent names are file stems of components: keep them portable and printable.
pub fn validate_agent_name(field: &str, name: &str) -> Result<()> {
    task::check_agent_name(name).map_err(|why| QueueError::invalid(field, why))
}

/// How deep serde_json reads arrays and objects nested in each other.
pub const MAX_JSON_DEPTH: usize = 127;

/// Checks a JSON document exactly the way every reader of the database parses
/// it (into a `serde_json::Value`, under serde_json's nesting limit), so that
/// nothing is stored that cannot be read back: `1e999`, a lone surrogate
/// escape or a 129-deep array would otherwise poison every listing.
/// The one check on every write path: payloads, results, spawns.
pub(super) fn validate_json(field: &str, text: &str, max_bytes: usize) -> Result<()> {
    if text.len() > max_bytes {
        return Err(QueueError::invalid(
            field,
            format!(
                "{} bytes is more than the limit of {max_bytes} bytes",
                text.len()
            ),
        ));
    }
    let value = serde_json::from_str::<serde_json::Value>(text).map_err(|e| {
        // Valid JSON, but deeper than anything stored may be: said as what
        // it is, not "not valid JSON".
        let why = match e.to_string().starts_with("recursion limit exceeded") {
            true => format!(
                "nested deeper than the {MAX_JSON_DEPTH} levels of arrays and objects a stored document may have"
            ),
            false => format!("not valid JSON: {e}"),
        };
        QueueError::invalid(field, why)
    })?;
    crate::json::check_numbers(&value).map_err(|why| QueueError::invalid(field, why))
}

/// Serializes a value to be stored and checks it reads back (nesting adds
/// up: a payload nested 100 deep inside a chain nested 20 deep is deeper
/// than serde_json reads).
pub(super) fn stored_json<T: serde::Serialize + serde::de::DeserializeOwned>(
    field: &str,
    value: &T,
) -> Result<String> {
    let text = serde_json::to_string(value)
        .map_err(|e| QueueError::invalid(field, format!("cannot be stored: {e}")))?;
    serde_json::from_str::<T>(&text).map_err(|e| {
        QueueError::invalid(
            field,
            format!(
                "is nested too deeply to be read back ({e}); flatten the payloads or the chain"
            ),
        )
    })?;
    Ok(text)
}

fn validate_next(field: &str, specs: &[NextSpec], max_payload: usize, depth: usize) -> Result<()> {
    if depth > 32 {
        return Err(QueueError::invalid(
            field,
            "chains may nest at most 32 levels deep",
        ));
    }
    for (i, spec) in specs.iter().enumerate() {
        let here = format!("{field}[{i}]");
        validate_agent_name(&format!("{here}.agent"), &spec.agent)?;
        let payload_len = spec.payload.to_string().len();
        if payload_len > max_payload {
            return Err(QueueError::invalid(
                format!("{here}.payload"),
                format!("{payload_len} bytes is more than the limit of {max_payload} bytes"),
            ));
        }
        crate::json::check_numbers(&spec.payload)
            .map_err(|why| QueueError::invalid(format!("{here}.payload"), why))?;
        validate_next(&format!("{here}.next"), &spec.next, max_payload, depth + 1)?;
    }
    Ok(())
}

/// Everything about a batch that can be checked without the database: each
/// task ([`QueueError::InvalidInBatch`] names it), and no key twice.
pub(super) fn check_batch(batch: &[NewTask], max_payload: usize) -> Result<()> {
    let mut keys = HashMap::new();
    for (index, new) in batch.iter().enumerate() {
        validate_new_task(new, max_payload).map_err(|e| in_batch(index, e))?;
        if let Some(key) = &new.key
            && let Some(first) = keys.insert(key.as_str(), index)
        {
            return Err(QueueError::KeyTwiceInBatch {
                index,
                first,
                key: key.clone(),
            });
        }
    }
    Ok(())
}

/// Everything about a new task that can be checked without the database.
pub(super) fn validate_new_task(new: &NewTask, max_payload: usize) -> Result<()> {
    validate_agent_name("agent", &new.agent)?;
    validate_json("payload", &new.payload, max_payload)?;
    if new.max_attempts == 0 {
        return Err(QueueError::invalid("max_attempts", "must be at least 1"));
    }
    if new.max_attempts > 1000 {
        return Err(QueueError::invalid("max_attempts", "must be at most 1000"));
    }
    if new.max_revisions > MAX_REVISIONS {
        return Err(QueueError::invalid(
            "max_revisions",
            format!("must be at most {MAX_REVISIONS}"),
        ));
    }
    if let Some(reviewer) = &new.reviewer {
        validate_agent_name("reviewer", reviewer)?;
    }
    if let Some(budget) = new.token_budget
        && !(1..=i64::MAX as u64).contains(&budget)
    {
        return Err(QueueError::invalid(
            "token_budget",
            format!("{budget} is outside 1..={}", i64::MAX),
        ));
    }
    if new.timeout_ms == Some(0) {
        return Err(QueueError::invalid("timeout", "must be at least 1ms"));
    }
    if let Some(key) = &new.key
        && (key.is_empty() || key.len() > 256)
    {
        return Err(QueueError::invalid(
            "key",
            "the idempotency key must be 1 to 256 bytes long",
        ));
    }
    let mut seen = HashSet::new();
    for dep in &new.depends_on {
        if !seen.insert(dep) {
            return Err(QueueError::invalid(
                "after",
                format!("task {dep} is listed twice"),
            ));
        }
    }
    validate_next("next", &new.next, max_payload, 0)
}

/// A child the agent spawned, checked and turned into a chain spec.
pub(super) fn spawn_to_next(i: usize, child: &SpawnSpec, max_payload: usize) -> Result<NextSpec> {
    validate_agent_name(&format!("spawn[{i}].agent"), &child.agent)?;
    validate_json(&format!("spawn[{i}].payload"), &child.payload, max_payload)?;
    let payload = serde_json::from_str(&child.payload)
        .map_err(|e| QueueError::invalid(format!("spawn[{i}].payload"), e.to_string()))?;
    Ok(NextSpec {
        agent: child.agent.clone(),
        payload,
        priority: child.priority,
        review: child.review,
        next: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_deep_is_said_as_depth_not_as_broken_json() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(validate_json("output", &deep(MAX_JSON_DEPTH), 1 << 20).is_ok());
        let why = validate_json("output", &deep(MAX_JSON_DEPTH + 1), 1 << 20)
            .unwrap_err()
            .to_string();
        assert_eq!(
            why,
            "invalid output: nested deeper than the 127 levels of arrays and objects a stored document may have"
        );
        let broken = validate_json("output", "[1,", 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            broken.starts_with("invalid output: not valid JSON: "),
            "{broken}"
        );
    }
}
