//! `spawner`: creates the child tasks its payload lists, to exercise chains.
//! Payload: `{"children": [{"agent": "..", "payload": <JSON>, "priority": 0, "review": false}]}`.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use colony::agent::types::TaskSpec;
use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Payload {
    children: Vec<Child>,
}

#[derive(Deserialize)]
struct Child {
    agent: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    review: bool,
}

struct Spawner;

impl Guest for Spawner {
    fn run(task: Task) -> Result<Outcome, Failure> {
        let payload: Payload = serde_json::from_str(&task.payload)
            .map_err(|e| Failure::Permanent(format!("bad spawner payload: {e}")))?;
        let spawn: Vec<TaskSpec> = payload
            .children
            .into_iter()
            .map(|c| TaskSpec {
                agent: c.agent,
                payload: c.payload.to_string(),
                priority: c.priority,
                review: c.review,
            })
            .collect();
        let output = json!({ "spawned": spawn.len() });
        Ok(Outcome {
            output: output.to_string(),
            spawn,
            needs_review: false,
        })
    }
}

export!(Spawner);
