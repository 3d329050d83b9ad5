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
    // `colony agents` loads it as the daemon does (its pool is sized for one
    // run; a Python component alone needs more than 8 core instances).
    let started = std::time::Instant::now();
    let loaded = env.ok_with_env(&["--json", "agents"], &[]);
    let took = started.elapsed();
    let listed: Value = serde_json::from_slice(&loaded.stdout).unwrap();
    assert_eq!(listed[0]["loaded"], true, "{listed}");
    // Its first load compiles for seconds, and says so rather than go quiet
    // (from 2 s on: a fast machine may finish first; 5 s leaves room for
    // the process's own start on a loaded one).
    if took > std::time::Duration::from_secs(5) {
        let said = String::from_utf8_lossy(&loaded.stderr);
        assert!(said.contains("note: compiling the components in"), "{said}");
    }
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
    env.ok_with_env(&["daemon", "--until-idle", "--poll", "100ms"], &[]);

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
    // On its first line, which `colony list` shows the start of (it began
    // "Traceback (most recent call last):" or with the runtime's complaint).
    let first = message.lines().next().unwrap_or_default();
    assert!(
        first.contains("asked to raise"),
        "{language}: what was raised comes first: {message}"
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

/// `colony new NAME --lang LANG`, built with the command its README gives
/// (offline: the toolchains are already here), then one task through the
/// daemon. Says "skipped" in one line when the language's toolchain is
/// missing.
fn new_project_runs(lang: &str, needs: Result<(), String>) {
    if let Err(needs) = needs {
        eprintln!("skipped: `colony new --lang {lang}` needs {needs}");
        return;
    }
    let env = Env::new(&[]);
    let name = format!("hello-{lang}");
    let dir = env.data.path().join(&name);
    let stdout = env.ok(&["new", &name, "--lang", lang, "--dir", dir.to_str().unwrap()]);
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    // The README's one build command, as printed.
    let build_line = readme
        .lines()
        .skip_while(|l| !l.starts_with("Build (one command)"))
        .find(|l| l.starts_with("    "))
        .unwrap()
        .trim()
        .to_string();
    assert!(stdout.contains(&build_line), "{stdout}");
    // The sources say the same build command (no `npm ci` without a lockfile).
    if lang == "js" {
        let app = std::fs::read_to_string(dir.join("app.js")).unwrap();
        assert!(
            app.contains(&format!(
                "Build (componentize-js, pinned in package.json): {build_line}"
            )),
            "{app}"
        );
        assert!(!dir.join("package-lock.json").exists());
    }
    let component = match lang {
        "rust" => {
            let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/colony-new-test");
            let mut command = Command::new("cargo");
            command
                .current_dir(&dir)
                .args(build_line.split_whitespace().skip(1))
                .arg("--offline")
                .env("CARGO_TARGET_DIR", &target)
                .env_remove("RUSTFLAGS");
            build(command, &build_line);
            target.join("wasm32-wasip2/release/hello_rust.wasm")
        }
        "python" => {
            let mut command = Command::new("componentize-py");
            command
                .current_dir(&dir)
                .args(build_line.split_whitespace().skip(1));
            build(command, &build_line);
            dir.join("hello-python.wasm")
        }
        _ => {
            // `npm install` would reach the registry: the example's
            // installed toolchain stands in for it.
            std::os::unix::fs::symlink(
                examples().join("js/node_modules"),
                dir.join("node_modules"),
            )
            .unwrap();
            let mut command = Command::new("npm");
            command.current_dir(&dir).args(["run", "build"]);
            build(command, "npm run build");
            dir.join("hello-js.wasm")
        }
    };
    std::fs::copy(&component, env.agents.path().join(format!("{name}.wasm"))).unwrap();
    let id = env.submit(&[&name, r#"{"text":"one two three"}"#]);
    env.until_idle(&[]);
    let task = env.show(id);
    assert_eq!(task["state"], "complete", "{task}");
    assert_eq!(task["result"]["words"], 3, "{task}");
    // Its WIT is this binary's.
    assert_eq!(
        std::fs::read_to_string(dir.join("wit/agent.wit")).unwrap(),
        std::fs::read_to_string(wit().join("agent.wit")).unwrap()
    );
}

#[test]
fn colony_new_rust() {
    new_project_runs("rust", Ok(()));
}

#[test]
fn colony_new_python() {
    new_project_runs("python", python_component().map(|_| ()));
}

#[test]
fn colony_new_js() {
    new_project_runs("js", js_component().map(|_| ()));
}

#[test]
fn colony_new_refuses_a_bad_name_and_a_full_directory() {
    let env = Env::new(&[]);
    let bad = env.run(&["new", "no/slash", "--lang", "python"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("may only contain"));
    // Names a Rust crate cannot have: refused before anything is written.
    for (name, says) in [
        ("1st", "must start with a letter"),
        ("test", "cargo refuses"),
    ] {
        let out = env.run(&["new", name, "--lang", "rust"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(says), "{name}: {stderr}");
        assert!(!env.data.path().join(name).exists(), "{name} was written");
    }
    let dir = env.data.path().join("taken");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "mine").unwrap();
    // --json names the project and its build command.
    let made: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "new", "y", "--lang", "js"])).unwrap();
    assert!(made["created"].as_str().unwrap().ends_with("y"), "{made}");
    assert!(made["build"].as_str().unwrap().contains("npm"), "{made}");
    // Whether the toolchain is here, said in the JSON too.
    assert!(
        made.as_object().unwrap().contains_key("toolchain_missing"),
        "{made}"
    );
    // A --dir that is a file: bad input naming it, the file as it was.
    let file = env.data.path().join("afile");
    std::fs::write(&file, "mine").unwrap();
    let out = env.run(&[
        "new",
        "z",
        "--lang",
        "python",
        "--dir",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("afile is a file"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    assert!(env.data.path().join("y/package.json").is_file());
    let full = env.run(&["new", "x", "--lang", "js", "--dir", dir.to_str().unwrap()]);
    assert_eq!(full.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&full.stderr).contains("not empty"));
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "nothing was written"
    );
}
