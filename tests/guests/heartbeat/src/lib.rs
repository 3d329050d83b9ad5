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
    fn run(_task: Task) -> Result<Outcome, Failure> {
        for i in 1..=STEPS {
            heartbeat(Some(&format!("step {i}/{STEPS}")));
            if i < STEPS {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
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
