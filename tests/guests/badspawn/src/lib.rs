//! `badspawn`: succeeds but asks for a child whose payload is not JSON, which
//! the host must reject rather than insert.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use colony::agent::types::TaskSpec;
use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

struct Badspawn;

impl Guest for Badspawn {
    fn run(_task: Task) -> Result<Outcome, Failure> {
        let child = TaskSpec {
            agent: "echo".into(),
            payload: "{oops".into(),
            priority: 0,
            review: false,
        };
        Ok(Outcome {
            output: "{}".into(),
            spawn: vec![child],
            needs_review: false,
        })
    }
}

export!(Badspawn);
