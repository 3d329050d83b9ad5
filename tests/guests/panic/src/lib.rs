//! `panic`: panics on every run. On wasm32-wasip2 a panic aborts, which the
//! host sees as a trap rather than a `failure`.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

struct Panic;

impl Guest for Panic {
    fn run(_task: Task) -> Result<Outcome, Failure> {
        panic!("fixture panic: boom")
    }
}

export!(Panic);
