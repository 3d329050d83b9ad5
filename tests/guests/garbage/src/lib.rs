//! `garbage`: succeeds with an output that is not JSON, which the host must
//! reject as a contract violation.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

struct Garbage;

impl Guest for Garbage {
    fn run(_task: Task) -> Result<Outcome, Failure> {
        Ok(Outcome {
            output: "not json {".into(),
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Garbage);
