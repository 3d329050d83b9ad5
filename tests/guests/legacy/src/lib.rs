//! `legacy`: an agent built against the released `colony:agent@0.1.0`
//! contract (`wit/v0.1.0`), before `model` existed. The host must keep
//! loading and running it unchanged: it echoes its payload and logs.

wit_bindgen::generate!({ world: "agent", path: "../../../wit/v0.1.0" });

use colony::agent::host::{heartbeat, log};
use colony::agent::types::Level;
use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};
use serde_json::{Value, json};

struct Legacy;

impl Guest for Legacy {
    fn run(task: Task) -> Result<Outcome, Failure> {
        heartbeat(Some("still speaking 0.1.0"));
        log(Level::Info, "legacy agent ran");
        let payload: Value = serde_json::from_str(&task.payload)
            .map_err(|e| Failure::Permanent(format!("payload is not JSON: {e}")))?;
        Ok(Outcome {
            output: json!({ "contract": "0.1.0", "echo": payload, "attempt": task.attempt })
                .to_string(),
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Legacy);
