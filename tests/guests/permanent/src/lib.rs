//! `permanent`: always fails permanently, so the host must not retry it.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

struct Permanent;

impl Guest for Permanent {
    fn run(_task: Task) -> Result<Outcome, Failure> {
        Err(Failure::Permanent(
            "permanent: this input can never work".into(),
        ))
    }
}

export!(Permanent);
