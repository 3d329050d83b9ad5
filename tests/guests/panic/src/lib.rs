//! `panic`: panics on every run. On wasm32-wasip2 a panic aborts, which the
//! host sees as a trap rather than a `failure`. With `"exit": N` in the
//! payload it calls `process::exit(N)` instead, as a Python `sys.exit` does.
//! With `"noise": N` it first writes N warning lines to stderr, as an
//! agent logging through Python's `logging` does before it fails.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

struct Panic;

impl Guest for Panic {
    fn run(task: Task) -> Result<Outcome, Failure> {
        for i in 0..number(&task.payload, "noise").unwrap_or(0) {
            eprintln!("WARNING:root:processing item {i}");
        }
        if let Some(status) = number(&task.payload, "exit") {
            eprintln!("fixture exiting with {status}");
            std::process::exit(status);
        }
        panic!("fixture panic: boom")
    }
}

/// `N` from a payload `{"name": N}` (read by hand: no JSON crate here).
fn number(payload: &str, name: &str) -> Option<i32> {
    let rest = payload.split(&format!("\"{name}\":")).nth(1)?;
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

export!(Panic);
