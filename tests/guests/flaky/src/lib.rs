//! `flaky`: fails with a retryable error on attempts 1 and 2 and succeeds on
//! the third, to exercise the host's retry/backoff path.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};
use serde_json::json;

struct Flaky;

impl Guest for Flaky {
    fn run(task: Task) -> Result<Outcome, Failure> {
        let n = task.attempt;
        if n < 3 {
            return Err(Failure::Retryable(format!("flaky: attempt {n} fails")));
        }
        let output = json!({ "succeeded_on_attempt": n });
        Ok(Outcome {
            output: output.to_string(),
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Flaky);
