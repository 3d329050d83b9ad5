//! `echo`: reflects everything the host handed over, so tests can check that
//! payload, attempt counters, the parent's result and review feedback reach
//! the agent intact. Sets `needs-review` when the payload asks for it.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use colony::agent::host::{heartbeat, log};
use colony::agent::types::Level;
use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};
use serde_json::{Value, json};

struct Echo;

impl Guest for Echo {
    fn run(task: Task) -> Result<Outcome, Failure> {
        heartbeat(Some("echoing"));
        log(Level::Info, &format!("echo got task {}", task.id));
        let payload: Value = serde_json::from_str(&task.payload)
            .map_err(|e| Failure::Permanent(format!("payload is not JSON: {e}")))?;
        // The host promises JSON here; keep a malformed value visible as a string
        // rather than hiding it behind `null`.
        let parent_result = task.parent_result.as_deref().map_or(Value::Null, |raw| {
            serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
        });
        let needs_review = payload.get("needs_review") == Some(&Value::Bool(true));
        let output = json!({
            "echo": payload,
            "attempt": task.attempt,
            "max_attempts": task.max_attempts,
            "parent_result": parent_result,
            "feedback": task.feedback,
        });
        Ok(Outcome {
            output: output.to_string(),
            spawn: Vec::new(),
            needs_review,
        })
    }
}

export!(Echo);
