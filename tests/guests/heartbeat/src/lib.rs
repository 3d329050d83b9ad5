//! `heartbeat`: reports progress three times and logs once at every level, to
//! check that heartbeats and log lines reach the task record.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use colony::agent::host::{heartbeat, log};
use colony::agent::types::Level;
use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};
use serde_json::json;

const STEPS: u32 = 3;

struct Heartbeat;

impl Guest for Heartbeat {
    fn run(task: Task) -> Result<Outcome, Failure> {
        for i in 1..=STEPS {
            heartbeat(Some(&format!("step {i}/{STEPS}")));
            if i < STEPS {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        // `{"linger_ms": N}`: stay a while after the last heartbeat, for
        // the daemon's own heartbeat to store the progress.
        let linger = serde_json::from_str::<serde_json::Value>(&task.payload)
            .ok()
            .and_then(|p| p["linger_ms"].as_u64())
            .unwrap_or(0);
        std::thread::sleep(std::time::Duration::from_millis(linger));
        log(Level::Trace, "trace line");
        log(Level::Debug, "debug line");
        log(Level::Info, "info line");
        log(Level::Warn, "warn line");
        log(Level::Error, "error line");
        Ok(Outcome {
            output: json!({ "steps": STEPS }).to_string(),
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Heartbeat);
