//! `noop`: does nothing and succeeds with `{}`. The smallest possible agent —
//! no serde, no host calls — so benchmarks measure the host, not the guest.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

struct Noop;

impl Guest for Noop {
    fn run(_task: Task) -> Result<Outcome, Failure> {
        Ok(Outcome {
            output: "{}".into(),
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Noop);
