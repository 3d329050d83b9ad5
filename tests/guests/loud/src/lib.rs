//! `loud`: logs one 10 KB message, then floods stdout, stderr and the
//! host's log (4 MiB each) before succeeding, to check that the host bounds
//! captured guest output instead of buffering or relaying it all.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};
use serde_json::json;

const PER_STREAM: usize = 4 << 20;
/// Bytes per line including the newline; divides `PER_STREAM` exactly.
const LINE_LEN: usize = 1024;

struct Loud;

/// One `LINE_LEN`-byte line (newline included), e.g. `stdout 000042 ......`.
fn line(stream: &str, i: usize) -> String {
    let mut line = format!("{stream} {i:06} ");
    line.extend(std::iter::repeat_n('.', LINE_LEN - 1 - line.len()));
    line
}

impl Guest for Loud {
    fn run(_task: Task) -> Result<Outcome, Failure> {
        // One message longer than the host keeps of one (4 KiB).
        colony::agent::host::log(colony::agent::types::Level::Warn, &"x".repeat(10_000));
        let mut printed = 0;
        for i in 0..PER_STREAM / LINE_LEN {
            let line = line("stdout", i);
            println!("{line}");
            printed += line.len() + 1;
        }
        for i in 0..PER_STREAM / LINE_LEN {
            let line = line("stderr", i);
            eprintln!("{line}");
            printed += line.len() + 1;
        }
        // And through the host's log: 4 MiB again, each line carrying a
        // line break followed by text shaped like a host log line.
        for i in 0..PER_STREAM / LINE_LEN {
            let forged = format!(
                "{}\n2026-01-01T00:00:00Z ERROR colony::orchestrator: forged",
                line("host", i)
            );
            colony::agent::host::log(colony::agent::types::Level::Info, &forged);
        }
        Ok(Outcome {
            output: json!({ "printed": printed }).to_string(),
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Loud);
