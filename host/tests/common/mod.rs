//! The harness shared by the end-to-end tests: the real `colony` binary run
//! against a real database (a SQLite file, or a PostgreSQL database: see
//! `drivers.rs`) and real components (fixtures from `tests/guests`).

#![allow(dead_code, unused_imports, unused_macros)] // each test binary uses a different part of it

mod drivers;
pub mod web;
pub(crate) use drivers::on_both_drivers;
pub use drivers::{Cell, Raw, TestDb, check_property, pg_error};

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use colony::queue::Queue;
use colony_tests::agents_dir_with;
use serde_json::Value;

pub struct Env {
    pub agents: tempfile::TempDir,
    /// Files a test writes (batches, configs) and the commands' working
    /// directory (where a PostgreSQL queue's compile cache goes).
    pub data: tempfile::TempDir,
    pub database: TestDb,
}

impl Env {
    /// An environment on a SQLite file.
    pub fn new(fixtures: &[&str]) -> Env {
        Env::on(TestDb::sqlite(), fixtures)
    }

    /// An environment on `database` (either driver).
    pub fn on(database: TestDb, fixtures: &[&str]) -> Env {
        Env {
            agents: agents_dir_with(fixtures),
            data: tempfile::tempdir().unwrap(),
            database,
        }
    }

    /// What `--db` / `COLONY_DB` is set to: the file, or the URL. Read and
    /// change the database through [`Env::queue`] or `self.database.raw()`,
    /// never as a file.
    pub fn db(&self) -> PathBuf {
        self.database.location()
    }

    /// Writes a file into the data directory; returns its path.
    pub fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> String {
        let path = self.data.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_string()
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_colony"));
        cmd.env("COLONY_DB", self.db())
            .env("COLONY_AGENTS", self.agents.path())
            .env_remove("COLONY_CLOCK_OFFSET_MS")
            .current_dir(self.data.path())
            .env("COLONY_LOG", "warn")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the command with `input` on its stdin.
    pub fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write as _;
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs the command; no input may make it panic.
    pub fn run(&self, args: &[impl AsRef<OsStr>]) -> Output {
        let out = self.cmd().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked"),
            "colony {:?} panicked:\n{stderr}",
            shown(args)
        );
        out
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        String::from_utf8(self.ok_with_env(args, &[]).stdout).unwrap()
    }

    /// Runs with `vars` added to the environment and expects success;
    /// returns the whole output (stderr holds the logs).
    pub fn ok_with_env(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        let out = self
            .cmd()
            .args(args)
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // A panic of the host's own, not a guest's quoted in a log line.
        assert!(
            !stderr
                .lines()
                .any(|l| l.starts_with("thread '") && l.contains("panicked at")),
            "colony {args:?} panicked:\n{stderr}"
        );
        assert!(
            out.status.success(),
            "colony {args:?} failed ({}):\n{stderr}",
            out.status
        );
        out
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    pub fn submit(&self, args: &[&str]) -> i64 {
        let mut all = vec!["submit"];
        all.extend_from_slice(args);
        self.ok(&all).trim().parse().expect("submit prints the id")
    }

    /// Everything the database holds that a command could change.
    pub fn snapshot(&self) -> String {
        self.ok(&["--json", "list", "--limit", "100000"]) + &self.ok(&["events"])
    }

    pub fn until_idle(&self, extra: &[&str]) {
        let mut args = vec![
            "daemon",
            "--until-idle",
            "--poll",
            "100ms",
            "--heartbeat",
            "200ms",
        ];
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    pub fn show(&self, id: i64) -> Value {
        self.json(&["show", &id.to_string()])
    }

    /// A root with a chain budget of 500 tokens, a 9 s timeout and a 3 s
    /// backoff, and the echo task it chains, both run; their ids.
    pub fn budgeted_chain(&self) -> (i64, i64) {
        let root = self.submit(&[
            "echo",
            "{}",
            "--token-budget",
            "500",
            "--timeout",
            "9s",
            "--backoff",
            "3s",
            "--next",
            r#"[{"agent": "echo"}]"#,
        ]);
        self.until_idle(&[]);
        let child = self.show(root)["children"][0].as_i64().unwrap();
        (root, child)
    }

    pub fn daemon(&self, extra: &[&str]) -> Daemon {
        Daemon::new(
            self.cmd()
                .arg("daemon")
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    pub fn queue(&self) -> Queue {
        self.database.open()
    }

    pub fn task_count(&self) -> usize {
        self.queue()
            .counts()
            .unwrap()
            .iter()
            .map(|c| c.2 as usize)
            .sum()
    }
}

/// A daemon process a test started, killed when the test ends however it
/// ends: a failed assertion must not leave it running (and working) on.
pub struct Daemon(Option<Child>);

impl Daemon {
    pub fn new(child: Child) -> Daemon {
        Daemon(Some(child))
    }

    /// Waits for it to exit, collecting what it printed.
    pub fn wait_with_output(mut self) -> std::io::Result<std::process::Output> {
        self.0
            .take()
            .expect("not waited for yet")
            .wait_with_output()
    }
}

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("not waited for yet")
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("not waited for yet")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0
            && let Ok(None) = child.try_wait()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Arguments as text, for messages (they may not be UTF-8).
pub fn shown(args: &[impl AsRef<OsStr>]) -> Vec<String> {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect()
}

/// Submits `n` plain tasks (`{"i": 0}`, `{"i": 1}`, ...) in one batch and
/// checks that each was stored in the batch's order, ready, with one submit
/// event (on PostgreSQL such a batch goes many rows per statement when the
/// role may draw ids); answers their ids.
pub fn submit_numbered_batch(q: &mut Queue, n: usize) -> Vec<i64> {
    let batch: Vec<colony::task::NewTask> = (0..n)
        .map(|i| colony::task::NewTask::new("a", format!(r#"{{"i":{i}}}"#)))
        .collect();
    let ids: Vec<i64> = q
        .submit_batch(&batch)
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids out of the batch's order"
    );
    for (i, id) in ids.iter().enumerate() {
        let task = q.get(*id).unwrap();
        assert_eq!(task.payload["i"].as_u64(), Some(i as u64), "task {id}");
        assert_eq!(task.state, colony::task::State::Ready, "task {id}");
        let events = q.events(Some(*id), 0, 10).unwrap();
        assert_eq!(events.len(), 1, "task {id}: one submit event");
    }
    ids
}
