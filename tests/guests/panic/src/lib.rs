//! `panic`: panics on every run. On wasm32-wasip2 a panic aborts, which the
//! host sees as a trap rather than a `failure`. With `"exit": N` in the
//! payload it calls `process::exit(N)` instead, as a Python `sys.exit` does.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};

struct Panic;

impl Guest for Panic {
    fn run(task: Task) -> Result<Outcome, Failure> {
        if let Some(status) = exit_status(&task.payload) {
            eprintln!("fixture exiting with {status}");
            std::process::exit(status);
        }
        panic!("fixture panic: boom")
    }
}

/// `N` from a payload `{"exit": N}` (read by hand: no JSON crate here).
fn exit_status(payload: &str) -> Option<i32> {
    let rest = payload.split("\"exit\":").nth(1)?;
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

export!(Panic);
