//! Agents in three languages, built from source (agents/examples) and run
//! through the real host and daemon: Rust (built by host/build.rs), Python
//! (componentize-py) and JavaScript (componentize-js). Each does the same
//! job, and each must behave the same way to the queue: a good task
//! completes (its stdout in the task's log, its state write committed), bad
//! input fails permanently with the agent's message, an exception is a
//! `crash` with its message, a spin hits `timeout`, and a model call with
//! no model configured is refused and survived.
//!
//! Without componentize-py (`pip install componentize-py==0.25.1`) or the
//! JavaScript toolchain (`npm ci --prefix agents/examples/js`) that
//! language's test says "skipped" in one line; `.ci/run` installs both.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use colony::state::Scope;
use common::*;
use serde_json::Value;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../agents/examples")
}

fn wit() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit")
}

/// Where this test binary keeps the components it built.
fn build_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// Runs a build command; panics with its output when it fails.
fn build(mut command: Command, what: &str) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Python example built with componentize-py, or why it cannot be.
fn python_component() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let probe = Command::new("componentize-py").arg("--version").output();
            if !probe.is_ok_and(|o| o.status.success()) {
                return Err(
                    "componentize-py (pip install componentize-py==0.25.1, as agents/examples/python/requirements.txt pins)".into(),
                );
            }
            let out = build_dir().join("wordcount-python.wasm");
            let mut command = Command::new("componentize-py");
            command
                .current_dir(examples().join("python"))
                .arg("-d")
                .arg(wit())
                .args(["-w", "agent", "componentize", "app", "-o"])
                .arg(&out);
            build(command, "componentize-py");
            Ok(out)
        })
        .clone()
}

/// The JavaScript example built with componentize-js, or why it cannot be.
fn js_component() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = examples().join("js");
            if !dir
                .join("node_modules/@bytecodealliance/componentize-js")
                .is_dir()
            {
                return Err("componentize-js (npm ci --prefix agents/examples/js)".into());
            }
            let out = build_dir().join("wordcount-js.wasm");
            let mut command = Command::new("node");
            command
                .current_dir(&dir)
                .arg("build.mjs")
                .env("WIT_DIR", wit())
                .env("OUT", &out);
            build(command, "componentize-js (node build.mjs)");
            Ok(out)
        })
        .clone()
}

fn rust_component() -> Result<PathBuf, String> {
    Ok(PathBuf::from(env!("COLONY_EXAMPLE_WORDCOUNT")))
}

/// The same five tasks through a daemon, and the same answers, whatever
/// the language.
fn behaves_like_every_other_language(language: &str, component: Result<PathBuf, String>) {
    let component = match component {
        Ok(path) => path,
        Err(needs) => {
            eprintln!("skipped: the {language} example needs {needs}");
            return;
        }
    };
    let env = Env::new(&[]);
    std::fs::copy(&component, env.agents.path().join("wordcount.wasm")).unwrap();
    let good = env.submit(&["wordcount", r#"{"text":"the quick brown fox"}"#]);
    let bad = env.submit(&["wordcount", r#"{"words":"no text here"}"#]);
    let raises = env.submit(&[
        "wordcount",
        r#"{"text":"x","raise":true}"#,
        "--max-attempts",
        "1",
    ]);
    let spins = env.submit(&[
        "wordcount",
        r#"{"text":"x","spin":true}"#,
        "--timeout",
        "2s",
        "--max-attempts",
        "1",
    ]);
    let summarizes = env.submit(&[
        "wordcount",
        r#"{"text":"one two three four","summarize":true}"#,
    ]);
    // Not `env.until_idle`, which refuses any output naming a panic: the
    // daemon's log quotes the guests' own.
    let out = env
        .cmd()
        .args(["daemon", "--until-idle", "--poll", "100ms"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let task = env.show(good);
    assert_eq!(task["state"], "complete", "{language}: {task}");
    let result = &task["result"];
    assert_eq!(result["words"], 4, "{language}: {result}");
    assert_eq!(result["longest"], "quick", "{language}: {result}");
    assert_eq!(result["language"], language, "{language}: {result}");
    let log = log_text(&task);
    assert!(
        log.contains("counted 4 words"),
        "{language}: stdout is in the log: {log}"
    );
    assert!(
        log.contains(&format!("task {good}: 4 words")),
        "{language}: {log}"
    );
    // Both completed tasks counted 4 words; failed runs wrote nothing.
    let last = env
        .queue()
        .state_get(Scope::Agent, "wordcount", "last_count")
        .unwrap()
        .expect("the state write was committed");
    assert_eq!(last.value, "4", "{language}");
    assert_eq!(last.version, 2, "{language}: one write per completed task");

    let task = env.show(bad);
    assert_eq!(task["state"], "failed", "{language}: {task}");
    assert_eq!(
        task["attempts"], 1,
        "{language}: a permanent failure is not retried"
    );
    assert_eq!(task["error"]["kind"], "permanent", "{language}: {task}");
    assert_eq!(
        task["error"]["message"], "payload field \"text\" is missing; it must be a string",
        "{language}"
    );

    let task = env.show(raises);
    assert_eq!(task["error"]["kind"], "crash", "{language}: {task}");
    let message = task["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("asked to raise"),
        "{language}: the crash says why: {message}"
    );

    let task = env.show(spins);
    assert_eq!(task["error"]["kind"], "timeout", "{language}: {task}");

    let task = env.show(summarizes);
    assert_eq!(task["state"], "complete", "{language}: {task}");
    assert_eq!(task["result"]["summary"], Value::Null, "{language}");
    assert!(
        log_text(&task).contains("no summary"),
        "{language}: {}",
        log_text(&task)
    );
}

fn log_text(task: &Value) -> String {
    task["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_rust_example() {
    behaves_like_every_other_language("rust", rust_component());
}

#[test]
fn the_python_example() {
    behaves_like_every_other_language("python", python_component());
}

#[test]
fn the_javascript_example() {
    behaves_like_every_other_language("javascript", js_component());
}
