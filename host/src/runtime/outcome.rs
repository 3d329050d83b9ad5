//! How a run ended, said as a [`RunOutcome`]: traps classified (deadline,
//! memory, fuel, a panic, a host call that failed), failure messages
//! bounded, and a refused model budget charged to the run whatever the
//! agent made of it.

use std::path::Path;
use std::time::Instant;

use wasmtime::Trap;

use super::sandbox::TaskLog;
use super::{Agent, Limits, RunReport};
use crate::task::{ErrorKind, RunOutcome, TaskError};

/// Once a model call was refused for want of tokens, the run's failure —
/// whatever the agent made of the refusal — is `budget_exceeded`, which is
/// never retried: another attempt would only hit the same wall.
pub(super) fn charge_budget_refusal(outcome: RunOutcome, budget_exceeded: bool) -> RunOutcome {
    match outcome {
        RunOutcome::Failure(error)
            if budget_exceeded && error.kind != ErrorKind::BudgetExceeded =>
        {
            RunOutcome::Failure(TaskError {
                kind: ErrorKind::BudgetExceeded,
                message: format!(
                    "a model call exceeded the token budget; then: {}",
                    error.message
                ),
            })
        }
        other => other,
    }
}

pub(super) fn report(outcome: RunOutcome, log: &TaskLog, started: Instant) -> RunReport {
    RunReport {
        outcome,
        log: log.render(),
        elapsed: started.elapsed(),
        state_writes: Vec::new(),
        effects: Vec::new(),
    }
}

pub(super) fn crash(message: String) -> RunOutcome {
    RunOutcome::Failure(TaskError {
        kind: ErrorKind::Crash,
        message,
    })
}

/// Longest trap description (message plus guest backtrace) kept on a task.
pub(super) const MAX_TRAP_MESSAGE: usize = 8 * 1024;

/// Longest failure message a guest reports that is kept: it is stored with
/// the task and its audit event on every attempt, and logged.
pub const MAX_FAILURE_MESSAGE: usize = 8 * 1024;

/// A guest's failure message, cut to [`MAX_FAILURE_MESSAGE`] bytes with a
/// note saying how much was left out (a 50 MB message was stored whole on
/// every attempt, and logged whole).
pub(super) fn bounded_failure_message(mut message: String) -> String {
    if message.len() <= MAX_FAILURE_MESSAGE {
        return message;
    }
    let dropped = message.len() - message.floor_char_boundary(MAX_FAILURE_MESSAGE);
    message.truncate(message.floor_char_boundary(MAX_FAILURE_MESSAGE));
    message.push_str(&format!(" [message cut: {dropped} more bytes]"));
    message
}

/// Most of stderr's end a crash message quotes: enough for a traceback
/// with a long exception message (a failure message keeps 8 KiB).
const CRASH_STDERR_BYTES: usize = 4096;

/// Names what went wrong in a trapped run.
pub(super) fn classify_trap(
    error: &wasmtime::Error,
    memory_denied: Option<usize>,
    agent: &Agent,
    log: &TaskLog,
) -> TaskError {
    let trap = error.downcast_ref::<Trap>().copied();
    // The error and its causes (the guest's backtrace among them), not
    // `{:?}`, which with RUST_BACKTRACE set adds the host's own backtrace:
    // kilobytes of wasmtime and tokio frames the agent's author cannot use.
    let detail = error_chain(error);
    // The guest called `exit` (Python's sys.exit, Rust's process::exit)
    // rather than returning an outcome: its doing, not the host's.
    // (Unless it was refused memory: runtimes exit when an allocation
    // fails, and "raise the memory cap" is the diagnosis to give.)
    if let Some(wasmtime_wasi::I32Exit(status)) = error
        .downcast_ref::<wasmtime_wasi::I32Exit>()
        .filter(|_| memory_denied.is_none())
    {
        let said = log.stderr_tail(CRASH_STDERR_BYTES);
        let said = match said.trim() {
            "" => String::new(),
            text => format!(", after writing to stderr: {text}"),
        };
        // WASI 0.2's exit carries success or failure only: `exit(3)`
        // arrives as 1, so no status is named.
        let how = match status {
            0 => "reporting success",
            _ => "reporting failure; WASI 0.2 carries no exit code",
        };
        let mut message =
            format!("the guest called exit ({how}) instead of returning an outcome{said}");
        message.truncate(message.floor_char_boundary(MAX_TRAP_MESSAGE));
        return TaskError {
            kind: ErrorKind::Crash,
            message,
        };
    }
    let (kind, summary) = match (trap, memory_denied) {
        (Some(Trap::OutOfFuel), _) => (ErrorKind::OutOfFuel, format!("the run used up its fuel ({}: `fuel` in its manifest)", agent.limits.fuel.unwrap_or(0))),
        (Some(Trap::StackOverflow), _) => (ErrorKind::StackOverflow, "the guest overflowed its stack".to_string()),
        (_, Some(desired)) => (
            ErrorKind::OutOfMemory,
            format!(
                "the guest tried to grow its memory to {desired} bytes ({} MiB), over its cap of {} MiB (`memory_mb` in its manifest), and then trapped",
                desired.div_ceil(1 << 20),
                agent.limits.memory_bytes >> 20
            ),
        ),
        (Some(Trap::MemoryOutOfBounds), _) => (
            ErrorKind::Crash,
            "the guest accessed memory out of bounds (in Rust guests this is also how a stack overflow of the shadow stack shows)".to_string(),
        ),
        (Some(trap), _) => {
            let panic = log.stderr_tail(CRASH_STDERR_BYTES);
            // What was raised, first: `list` shows a message's start, where
            // a traceback's first line or a runtime's complaint said nothing.
            let raised = raised(&panic).map_or(String::new(), |what| format!("{what}\n"));
            if panic.contains("panicked at") {
                (ErrorKind::Crash, format!("the guest panicked: {raised}{panic}"))
            } else if !panic.trim().is_empty() {
                // Interpreted guests (JavaScript) report an uncaught
                // exception on stderr and then trap: say what they said.
                let said = panic.trim();
                (ErrorKind::Crash, format!("the guest trapped ({trap}): {raised}after writing to stderr: {said}"))
            } else {
                (ErrorKind::Crash, format!("the guest trapped: {trap}"))
            }
        }
        // No trap: an error where the guest and the host meet, and nearly
        // always the guest's doing (text that is not UTF-8, too many
        // handles held); it was reported as the host's failure.
        (None, None) => {
            let caused_by = |is: &dyn Fn(&(dyn std::error::Error + 'static)) -> bool| {
                error.chain().any(is)
            };
            if caused_by(&|c| c.is::<std::str::Utf8Error>()) {
                (
                    ErrorKind::InvalidOutput,
                    "the guest passed text that is not valid UTF-8 to the host".to_string(),
                )
            } else if caused_by(&|c| {
                matches!(
                    c.downcast_ref::<wasmtime::component::ResourceTableError>(),
                    Some(wasmtime::component::ResourceTableError::Full)
                )
            }) {
                (
                    ErrorKind::Crash,
                    "the guest held more host resources (streams, pollables, requests) at once than a run may"
                        .to_string(),
                )
            } else {
                (
                    ErrorKind::Crash,
                    "the run failed where the guest calls the host (most likely the guest's doing; the error follows)"
                        .to_string(),
                )
            }
        }
    };
    let mut message = format!("{summary}\n{detail}");
    message.truncate(message.floor_char_boundary(MAX_TRAP_MESSAGE));
    TaskError { kind, message }
}

/// `error` and each of its causes, one per line.
pub(super) fn error_chain(error: &wasmtime::Error) -> String {
    let causes: Vec<String> = error.chain().map(ToString::to_string).collect();
    causes.join("\n")
}

/// Which of the manifest's limits stopped a component's start-up, when one
/// did: both are accepted in their bounds, but a component may need more
/// than the value given before it runs at all.
pub(super) fn manifest_limit_hint(e: &wasmtime::Error, limits: &Limits, manifest: &Path) -> String {
    let manifest = manifest.display();
    if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::OutOfFuel)
        && let Some(fuel) = limits.fuel
    {
        return format!(
            " (its start-up needs more than the `fuel = {fuel}` of {manifest}: raise it)"
        );
    }
    if format!("{e:#}").contains("exceeds memory limits") {
        return format!(
            " (its memory starts larger than the {} MiB it may use: raise `memory_mb` in {manifest})",
            limits.memory_bytes >> 20
        );
    }
    String::new()
}

/// What a crashed guest raised, as its stderr says it, when it can be told:
/// a Python traceback's exception line, the exception componentize-py's
/// runtime or componentize-js's glue found escaping `run` (with a word
/// when it is a model call's error the agent did not catch), or a Rust
/// panic's message.
fn raised(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr.lines().collect();
    // Python: the line after the traceback's indented frames.
    if let Some(start) = lines
        .iter()
        .position(|l| l.starts_with("Traceback (most recent call last)"))
    {
        let exception = lines[start + 1..]
            .iter()
            .find(|l| !l.starts_with(' ') && !l.trim().is_empty())?;
        return Some(format!("raised {}", exception.trim()));
    }
    let between = |text: &str, open: &str, close: &str| -> Option<String> {
        let from = text.find(open)? + open.len();
        let to = text[from..].find(close)?;
        Some(text[from..from + to].to_string())
    };
    let model_error = |what: &str| {
        const MODEL_ERRORS: [&str; 5] = [
            "not-granted",
            "budget-exceeded",
            "rate-limited",
            "unavailable",
            "invalid-request",
        ];
        let named = what.contains("ModelError_")
            || MODEL_ERRORS
                .iter()
                .any(|e| what.contains(&format!("`\"{e}\"`")));
        match named {
            true => " (a model call's error the agent did not catch: see its model_call events)",
            false => "",
        }
    };
    // componentize-py: an exception escaping `run`, or a wrong return.
    if let Some(value) = stderr
        .find("PyErr { type: ")
        .and_then(|at| between(&stderr[at..], ", value: ", ", traceback:"))
    {
        return Some(format!("raised {value}{}", model_error(&value)));
    }
    // componentize-js: what was thrown, where a `Failure` was expected.
    if let Some(line) = lines
        .iter()
        .find(|l| l.starts_with("invalid variant tag value"))
    {
        let thrown = between(line, "(received `", "`)").unwrap_or_else(|| line.to_string());
        return Some(format!("threw {thrown}{}", model_error(line)));
    }
    // Rust: the panic's message, on the line after "panicked at FILE:".
    let at = lines.iter().position(|l| l.contains("panicked at"))?;
    let message = lines.get(at + 1)?.trim();
    (!message.is_empty()).then(|| message.to_string())
}

#[cfg(test)]
mod tests {
    use super::raised;

    #[test]
    fn what_a_guest_raised_comes_first() {
        let python = "Traceback (most recent call last):\n  File \"/0/app.py\", line 24, in run\n  [Previous line repeated 996 more times]\nRuntimeError: boom from python\n\nthread '<unnamed>' (1) panicked at runtime/src/lib.rs:1293:29:\nPython function threw an unexpected exception";
        assert_eq!(
            raised(python).unwrap(),
            "raised RuntimeError: boom from python"
        );
        let pyerr = "thread '<unnamed>' (1) panicked at runtime/src/lib.rs:1640:18:\ncalled `Result::unwrap()` on an `Err` value: PyErr { type: <class 'KeyError'>, value: KeyError(<class 'wit_world.imports.model.ModelError_NotGranted'>), traceback: None }";
        let said = raised(pyerr).unwrap();
        assert!(
            said.starts_with(
                "raised KeyError(<class 'wit_world.imports.model.ModelError_NotGranted'>) (a model"
            ),
            "{said}"
        );
        assert!(
            said.contains("a model call's error the agent did not catch"),
            "{said}"
        );
        let js = "invalid variant tag value `undefined` (received `Error: boom from js`) specified for `Failure`\nStack:\n  export_handler_0_2_0$run@initializer.js:7926:17";
        assert_eq!(raised(js).unwrap(), "threw Error: boom from js");
        let js_model = "invalid variant tag value `\"not-granted\"` (received `[object Object]`) specified for `Failure`";
        assert!(
            raised(js_model)
                .unwrap()
                .starts_with("threw [object Object] (a model call's error")
        );
        let rust = "thread '<unnamed>' panicked at src/lib.rs:10:5:\nfixture panic: boom\nnote: run with `RUST_BACKTRACE=1`";
        assert_eq!(raised(rust).unwrap(), "fixture panic: boom");
        assert_eq!(raised("some other complaint"), None);
    }
}
