//! `sleeper`: sleeps for `{"ms": n}` milliseconds without heartbeating, to
//! exercise timeouts, lease expiry and concurrency.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Payload {
    ms: u64,
}

struct Sleeper;

impl Guest for Sleeper {
    fn run(task: Task) -> Result<Outcome, Failure> {
        let Payload { ms } = serde_json::from_str(&task.payload)
            .map_err(|e| Failure::Permanent(format!("bad sleeper payload: {e}")))?;
        std::thread::sleep(std::time::Duration::from_millis(ms));
        Ok(Outcome {
            output: json!({ "slept_ms": ms }).to_string(),
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Sleeper);
