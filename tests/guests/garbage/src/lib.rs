//! `garbage`: succeeds with an output that is not JSON, which the host must
//! reject as a contract violation; with the payload `"not utf-8"`, with an
//! output that is not even UTF-8 (which the canonical ABI refuses when the
//! host reads it).

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

struct Garbage;

impl Guest for Garbage {
    fn run(task: Task) -> Result<Outcome, Failure> {
        let output = match task.payload.contains("not utf-8") {
            // SAFETY: deliberately not UTF-8, to test the host's side; the
            // string is only handed over, never used as text here.
            true => unsafe { String::from_utf8_unchecked(vec![b'"', 0xff, 0xfe, b'"']) },
            false => "not json {".into(),
        };
        Ok(Outcome {
            output,
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Garbage);
