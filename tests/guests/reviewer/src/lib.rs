//! `reviewer`: a reviewing agent. Approves the reviewed task's output unless
//! that output contains `"revise": true`, in which case it asks for a revision.
//! Payload: `{"task_id": .., "agent": "..", "payload": <JSON>, "output": <JSON>, "effects": [..], "state_writes": [..]}`
//! (bodies and values past the first 1 MiB are null beside their sizes).

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Review {
    #[serde(default)]
    output: Value,
}

struct Reviewer;

impl Guest for Reviewer {
    fn run(task: Task) -> Result<Outcome, Failure> {
        let review: Review = serde_json::from_str(&task.payload)
            .map_err(|e| Failure::Permanent(format!("bad review payload: {e}")))?;
        // Accept the reviewed output either embedded or as a JSON string.
        let output = match review.output {
            Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
            other => other,
        };
        let verdict = if output.get("revise") == Some(&Value::Bool(true)) {
            json!({ "approve": false, "note": "please revise" })
        } else {
            json!({ "approve": true, "note": "looks good" })
        };
        Ok(Outcome {
            output: verdict.to_string(),
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Reviewer);
