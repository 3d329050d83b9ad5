//! End-to-end: the real `colony` binary against a real database and real
//! components (fixtures from `tests/guests`). The tests that exercise the
//! queue run on both drivers (`name::sqlite`, `name::postgres`, the
//! PostgreSQL database passed as a `--db` URL); those about the SQLite file
//! itself say so.

mod common;
use common::{Daemon, Env, TestDb, on_both_drivers, signal, wait_for};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use colony::queue::{Queue, all_readable};
use colony::task::State;
use serde_json::Value;

/// Per task, its claims that led to a run: a claim given back unstarted
/// (claimed ahead, then released: its `release` event says `started:
/// false`) ran nothing.
fn claims_per_task(db: &Path) -> std::collections::HashMap<i64, usize> {
    let q = Queue::open(db).unwrap();
    let mut claims = std::collections::HashMap::new();
    for e in events_named(&q, "claim") {
        *claims.entry(e.task_id).or_insert(0) += 1;
    }
    for e in events_named(&q, "release") {
        if e.detail["started"] == false {
            *claims.entry(e.task_id).or_insert(0) -= 1;
        }
    }
    claims
}

/// Every audit event named `name`, oldest first.
fn events_named(q: &Queue, name: &str) -> Vec<colony::queue::AuditEvent> {
    let all = q.events(None, 0, u32::MAX).unwrap();
    all.into_iter().filter(|e| e.event == name).collect()
}

/// Runs `colony torture` on `db` with 3 daemons, one killed every ~300 ms, in
/// `mode` (none, `--state` or `--effects`) over `tasks` tasks; checks that
/// every check of the verdict passed and a daemon was killed, and returns it.
fn torture_verdict(db: TestDb, mode: &[&str], tasks: u32) -> Value {
    let env = Env::on(db, &[]);
    let dir = env.data.path().join("torture");
    let tasks = tasks.to_string();
    let mut args = vec!["torture"];
    args.extend_from_slice(mode);
    args.extend_from_slice(&["--daemons", "3", "--tasks", &tasks, "--kill-every", "300ms"]);
    args.extend_from_slice(&["--dir", dir.to_str().unwrap()]);
    // --agents on the command line is not used, and says so (as a SQLite
    // --db would; COLONY_DB and COLONY_AGENTS, set here, are not worth it).
    let agents = "no-such-agents-folder";
    let out = env.run(&[&["--agents", agents][..], &args].concat());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let own = match env.database {
        TestDb::Sqlite { .. } => "its own SQLite database and built-in agents",
        TestDb::Postgres { .. } => "the PostgreSQL --db and built-in agents",
    };
    assert!(said.contains(&format!("torture runs on {own}")), "{said}");
    assert!(
        said.contains(&format!("--agents {agents} is not used")),
        "{said}"
    );
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["ok"], true, "{verdict}");
    let checks = verdict["checks"].as_object().unwrap();
    assert!(checks.values().all(|v| v == true), "{verdict}");
    assert!(
        verdict["kills"].as_u64().unwrap() >= 1,
        "at least one daemon was killed: {verdict}"
    );
    verdict
}

/// Daemon settings under which a dead daemon's leases are reset within
/// about a second.
const QUICK_LEASES: [&str; 6] = [
    "--heartbeat",
    "200ms",
    "--stale-after",
    "1s",
    "--poll",
    "100ms",
];

/// An environment whose `thinker` agent may call the alias `fast` (its
/// colony.toml lines plus `alias_extra`), answered by a loopback provider,
/// and daemons started with that configuration and key.
struct ThinkerWithModel {
    env: Env,
    server: colony_tests::model_server::ModelServer,
    config: String,
}

impl ThinkerWithModel {
    fn new(db: TestDb, alias_extra: &str) -> ThinkerWithModel {
        let env = Env::on(db, &["thinker"]);
        std::fs::write(
            env.agents.path().join("thinker.toml"),
            "models = [\"fast\"]\n",
        )
        .unwrap();
        let server = colony_tests::model_server::ModelServer::start();
        let config = env.file(
            "colony.toml",
            format!(
                "[models.fast]\napi = \"openai\"\nbase_url = \"{}\"\nmodel = \"m\"\napi_key_env = \"FAST_KEY\"\n{alias_extra}",
                server.openai_url()
            ),
        );
        ThinkerWithModel {
            env,
            server,
            config,
        }
    }

    /// A daemon (heartbeat 200 ms, stale after 1 s, polling every 100 ms)
    /// with `extra` arguments; its stderr is piped.
    fn daemon(&self, extra: &[&str]) -> Daemon {
        Daemon::new(
            self.env
                .cmd()
                .env("COLONY_CONFIG", &self.config)
                .env("FAST_KEY", "sk-fast")
                .arg("daemon")
                .args(QUICK_LEASES)
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }
}

/// An outage of `lasting` (no connection can write) while `holder` is
/// stopped; the holder stays stopped after it (the caller resumes it).
fn outage_with_holder_stopped(env: &Env, holder: &Daemon, lasting: Duration) {
    let mut raw = refuse_every_write(&env.database);
    signal(holder, "-STOP");
    std::thread::sleep(lasting);
    raw.execute("ROLLBACK");
}

/// No lease of task `id` was reset (a live holder kept its run).
fn assert_no_lease_reset(env: &Env, id: i64) {
    let events = env.queue().events(Some(id), 0, 100).unwrap();
    assert!(
        events.iter().all(|e| e.event != "lease_expired"),
        "a live lease was reset: {events:?}"
    );
}

/// A connection holding the database so that no other can write (nor, on
/// PostgreSQL, read `tasks`) until it rolls back: an outage, as daemons see it.
fn refuse_every_write(db: &TestDb) -> common::Raw {
    let mut raw = db.raw();
    match db {
        TestDb::Sqlite { .. } => raw.execute("BEGIN EXCLUSIVE"),
        TestDb::Postgres { .. } => {
            raw.execute("BEGIN");
            raw.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        }
    };
    raw
}

/// A small HTML structure check: a doctype, and every non-void element closed
/// in order. Enough to catch broken or unescaped markup in generated pages.
fn assert_well_formed_html(html: &str) {
    assert!(
        html.trim_start()
            .to_ascii_lowercase()
            .starts_with("<!doctype html>"),
        "no doctype"
    );
    const VOID: [&str; 8] = ["meta", "link", "br", "img", "hr", "input", "source", "wbr"];
    let mut stack: Vec<String> = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        rest = &rest[start + 1..];
        let end = rest.find('>').expect("an unterminated tag");
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if tag.starts_with('!') {
            continue;
        }
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        let name = name.to_ascii_lowercase();
        if tag.starts_with('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.as_str()),
                "mismatched </{name}>"
            );
        } else if !VOID.contains(&name.as_str()) && !tag.ends_with('/') {
            stack.push(name.clone());
            if name == "style" || name == "script" {
                let close = format!("</{name}>");
                let at = rest.find(&close).expect("raw text element closed");
                rest = &rest[at..];
            }
        }
    }
    assert!(stack.is_empty(), "unclosed elements: {stack:?}");
}

on_both_drivers! {
    fn submit_run_and_show(db) {
        let env = Env::on(db, &["echo"]);
        let id = env.submit(&["echo", r#"{"product":"lamp"}"#]);
        env.until_idle(&[]);
        let task = env.show(id);
        assert_eq!(task["state"], "complete");
        assert_eq!(task["result"]["echo"]["product"], "lamp");
        assert_eq!(
            task["payload"]["product"], "lamp",
            "payload is a JSON value, not a string"
        );
        let events: Vec<&str> = task["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(events, vec!["submit", "claim", "complete"]);
        assert!(
            task["log"][0]["text"]
                .as_str()
                .unwrap()
                .contains("echo got task")
        );

        let list = env.json(&["list", "--state", "complete"]);
        assert_eq!(list.as_array().unwrap().len(), 1);
        let text = env.ok(&["show", &id.to_string()]);
        assert!(
            text.contains("state complete") && text.contains("events:"),
            "{text}"
        );
        // The audit trail as JSON Lines.
        let lines = env.ok(&["events", "--task", &id.to_string()]);
        let first: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
        for key in ["id", "at", "task_id", "from", "to", "actor", "detail"] {
            assert!(first.get(key).is_some(), "event lacks {key}: {first}");
        }
    }

    fn a_chain_of_three_agents_via_next(db) {
        let env = Env::on(db, &["echo", "heartbeat", "sleeper"]);
        let next = r#"[{"agent": "heartbeat", "payload": {}, "next": [{"agent": "sleeper", "payload": {"ms": 1}}]}]"#;
        let root = env.submit(&["echo", r#"{"step":1}"#, "--next", next]);
        env.until_idle(&[]);
        let q = env.queue();
        let second = all_readable(q.children(root).unwrap()).unwrap();
        assert_eq!(
            (second.len(), second[0].agent.as_str(), second[0].state),
            (1, "heartbeat", State::Complete)
        );
        let third = all_readable(q.children(second[0].id).unwrap()).unwrap();
        assert_eq!(
            (third.len(), third[0].agent.as_str(), third[0].state),
            (1, "sleeper", State::Complete)
        );
        assert_eq!(third[0].result, Some(serde_json::json!({"slept_ms": 1})));
    }

    fn review_reject_then_approve(db) {
        let env = Env::on(db, &["echo"]);
        let id = env.submit(&["echo", "{}", "--review"]);
        env.until_idle(&[]);
        assert_eq!(env.show(id)["state"], "review");

        env.ok(&[
            "review",
            &id.to_string(),
            "reject",
            "--note",
            "make it shorter",
        ]);
        assert_eq!(env.show(id)["state"], "ready");
        env.until_idle(&[]);
        let task = env.show(id);
        assert_eq!(task["state"], "review");
        assert_eq!(
            task["result"]["feedback"], "make it shorter",
            "the next run saw the note"
        );

        env.ok(&["review", &id.to_string(), "approve"]);
        assert_eq!(env.show(id)["state"], "complete");
        // Approving twice is bad input.
        assert_eq!(
            env.run(&["review", &id.to_string(), "approve"])
                .status
                .code(),
            Some(2)
        );
    }

    /// An approval whose held set-if went stale (another approval wrote the
    /// key first) sends the task round again: the command says so, and
    /// does not exit 0 (`review N approve && deploy` went on). A decision
    /// naming the round it was made on is refused in a later round: it
    /// would release a result, writes and effects nobody had read.
    fn a_stale_approval_says_it_did_not_take(db) {
        let env = Env::on(db, &["stateful"]);
        let first = env.submit(&["stateful", r#"{"increment":"k"}"#, "--review"]);
        let second = env.submit(&["stateful", r#"{"increment":"k"}"#, "--review"]);
        env.until_idle(&[]);
        let read = env.show(second)["review_round"].as_i64().expect("a round while in review");
        env.ok(&["review", &first.to_string(), "approve"]);
        let out = env.run(&["review", &second.to_string(), "approve", "--round", &read.to_string()]);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stdout.contains("ready"), "{stdout}");
        assert!(
            stderr.contains(&format!("the approval of task {second} did not take"))
                && stderr.contains("stale")
                && stderr.contains("revision 1 of"),
            "{stderr}"
        );
        // It runs again on the new version, in a new round.
        env.until_idle(&[]);
        let again = env.show(second);
        let round = again["review_round"].as_i64().unwrap();
        assert!(round != read, "{again}");
        let before = env.snapshot();
        for verdict in ["approve", "reject"] {
            let out = env.run(&["--json", "review", &second.to_string(), verdict, "--round", &read.to_string()]);
            let error: Value = serde_json::from_slice(&out.stderr).unwrap();
            assert_eq!((out.status.code(), error["kind"].as_str()), (Some(2), Some("conflict")), "{error}");
            assert!(error["error"].as_str().unwrap().contains(&format!("since review round {read}")), "{error}");
        }
        assert_eq!(env.snapshot(), before, "a decision on an old round changed something");
        // A number that was never a round of the task says so.
        let out = env.run(&["--json", "review", &second.to_string(), "approve", "--round", "999999"]);
        let error: Value = serde_json::from_slice(&out.stderr).unwrap();
        assert!(error["error"].as_str().unwrap().contains("999999 is not a review round of task"), "{error}");
        // An operator's write to the chain's state while the task waits is
        // an audit event on it, not a new round.
        env.ok(&["state", "set", "--chain", &second.to_string(), "note", "1"]);
        assert_eq!(env.show(second)["review_round"].as_i64(), Some(round));
        env.ok(&["review", &second.to_string(), "approve", "--round", &round.to_string()]);
        assert_eq!(env.show(second)["state"], "complete");
        assert_eq!(env.show(second)["review_round"], Value::Null, "none once out of review");
    }

    /// `--json submit --batch` prints an array whatever the number of
    /// lines (one line printed a bare object); a single submit one object.
    fn a_json_batch_is_an_array_even_of_one(db) {
        let env = Env::on(db, &["echo"]);
        let file = env.data.path().join("one.jsonl");
        std::fs::write(&file, "{\"agent\":\"echo\"}\n").unwrap();
        let batch = env.json(&["submit", "--batch", file.to_str().unwrap()]);
        assert_eq!(batch.as_array().map(Vec::len), Some(1), "{batch}");
        assert_eq!(batch[0]["agent"], "echo");
        let single = env.json(&["submit", "echo", "{}"]);
        assert!(single["id"].is_i64(), "{single}");
    }

    /// A payload keeps every digit of its numbers and the order of its
    /// keys, however it comes in: `submit --batch` (and so the API) and
    /// `--next` read it as JSON and wrote it back, a number past 17
    /// digits rounded (123456789012345678901234567890 stored as
    /// 1.2345678901234568e+29) and the keys sorted.
    fn payloads_keep_their_numbers_and_key_order(db) {
        let env = Env::on(db, &["echo"]);
        let payload = r#"{"z":1,"a":123456789012345678901234567890,"c":0.1000000000000000055511151231257827}"#;
        let file = env.data.path().join("exact.jsonl");
        std::fs::write(&file, format!("{{\"agent\":\"echo\",\"payload\":{payload}}}\n")).unwrap();
        let batch: i64 = env.ok(&["submit", "--batch", file.to_str().unwrap()]).trim().parse().unwrap();
        let next = format!(r#"[{{"agent":"echo","payload":{payload}}}]"#);
        let parent = env.submit(&["echo", "{}", "--next", &next]);
        env.until_idle(&[]);
        let child = parent + 1;
        assert_eq!(env.show(child)["parent_id"], parent);
        for id in [batch, child] {
            // Read back by a serde_json that keeps digits and key order too.
            let shown = env.show(id)["payload"].to_string();
            assert_eq!(shown, payload, "task {id}");
        }
    }

    fn max_revisions_is_set_per_task(db) {
        let env = Env::on(db, &["echo"]);
        let once = env.submit(&["echo", "{}", "--review", "--max-revisions", "0"]);
        let file = env.data.path().join("tasks.jsonl");
        std::fs::write(&file, "{\"agent\":\"echo\",\"review\":true,\"max_revisions\":1}\n").unwrap();
        let twice: i64 = env.ok(&["submit", "--batch", file.to_str().unwrap()]).trim().parse().unwrap();
        env.until_idle(&[]);
        assert_eq!((env.show(once)["max_revisions"].as_u64(), env.show(twice)["max_revisions"].as_u64()), (Some(0), Some(1)));

        // No revision left: the first rejection fails the task.
        env.ok(&["review", &once.to_string(), "reject", "--note", "no"]);
        let failed = env.show(once);
        assert_eq!((failed["state"].as_str(), failed["error"]["kind"].as_str()), (Some("failed"), Some("rejected")), "{failed}");
        // One revision: the first rejection runs it again, the second fails it.
        env.ok(&["review", &twice.to_string(), "reject", "--note", "again"]);
        env.until_idle(&[]);
        assert_eq!(env.show(twice)["state"], "review");
        env.ok(&["review", &twice.to_string(), "reject", "--note", "no"]);
        assert_eq!(env.show(twice)["state"], "failed");

        // Out of range: refused, naming the flag or the field, nothing stored.
        let before = env.task_count();
        let out = env.run(&["submit", "echo", "{}", "--max-revisions", "101"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--max-revisions"));
        std::fs::write(&file, "{\"agent\":\"echo\",\"max_revisions\":101}\n").unwrap();
        let out = env.run(&["submit", "--batch", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("invalid max_revisions: must be at most 100"), "{stderr}");
        assert_eq!(env.task_count(), before);
    }

    fn a_reviewer_agent_approves_automatically(db) {
        let env = Env::on(db, &["echo", "reviewer"]);
        let id = env.submit(&["echo", r#"{"x":1}"#, "--reviewer", "reviewer"]);
        env.until_idle(&[]);
        let task = env.show(id);
        assert_eq!(task["state"], "complete");
        let approve = task["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event"] == "approve")
            .unwrap();
        assert_eq!(approve["detail"]["note"], "looks good");
    }

    /// A result nested near the limit is reviewed, shown as null where one
    /// level deeper would not fit (the reviewed task failed `invalid_output`,
    /// its valid result lost).
    fn a_deeply_nested_result_is_reviewed_not_failed(db) {
        let env = Env::on(db, &["echo", "reviewer"]);
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(125), "]".repeat(125));
        let id = env.submit(&["echo", &deep, "--reviewer", "reviewer"]);
        env.until_idle(&[]);
        // Read from the queue: `show --json` nests them deeper still.
        let queue = env.queue();
        let task = queue.get(id).unwrap();
        assert_eq!(task.state, State::Complete, "{:?}", task.error);
        let reviewer = queue.children(id).unwrap().remove(0).unwrap();
        let review = reviewer.payload;
        assert!(review["payload"]["x"].is_array(), "the payload fits");
        assert_eq!(review["output"], serde_json::Value::Null, "the output does not");
        let output_bytes = task.result.unwrap().to_string().len();
        assert_eq!(review["output_bytes"], output_bytes, "its size says so");
        assert_eq!(review["payload_bytes"], deep.len());
    }

    /// A reviewer agent that fails for good leaves the task to a person:
    /// `show` says so (it listed the reviewer among the children alone).
    fn a_failed_reviewer_is_said_on_the_reviewed_task(db) {
        let env = Env::on(db, &["echo", "panic"]);
        let id = env.submit(&["echo", "{}", "--reviewer", "panic", "--max-attempts", "1"]);
        env.until_idle(&[]);
        let shown = env.ok(&["show", &id.to_string()]);
        assert!(
            shown.contains("state review")
                && shown.contains("(panic, failed)")
                && shown.contains("its reviewer, task")
                && shown.contains(&format!("a person decides (colony review {id} approve|reject)")),
            "{shown}"
        );
        env.ok(&["review", &id.to_string(), "approve"]);
        let shown = env.ok(&["show", &id.to_string()]);
        assert!(!shown.contains("its reviewer, task"), "{shown}");
    }

    fn retry_revives_a_failed_task(db) {
        let env = Env::on(db, &["permanent"]);
        let id = env.submit(&["permanent"]);
        env.until_idle(&[]);
        let task = env.show(id);
        assert_eq!(
            (task["state"].as_str(), task["error"]["kind"].as_str()),
            (Some("failed"), Some("permanent"))
        );
        env.ok(&["retry", &id.to_string()]);
        let task = env.show(id);
        assert_eq!(
            (task["state"].as_str(), task["attempts"].as_u64()),
            (Some("ready"), Some(0))
        );
        env.until_idle(&[]);
        let task = env.show(id);
        let claims = task["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "claim")
            .count();
        assert_eq!((task["state"].as_str(), claims), (Some("failed"), 2));
    }

    fn cancel_cascades_to_dependents(db) {
        let env = Env::on(db, &[]);
        let a = env.submit(&["design"]);
        let b = env.submit(&["code", "--after", &a.to_string()]);
        let c = env.submit(&["ops", "--after", &b.to_string()]);
        let d = env.submit(&["ops", "--after", &a.to_string(), "--after", &b.to_string()]);
        // A listing says what each task waits for, as show does (it said []).
        let listed = env.json(&["list"]);
        let depends_on = |id: i64| {
            let task = listed.as_array().unwrap().iter().find(|t| t["id"] == id).unwrap();
            task["depends_on"].clone()
        };
        assert_eq!(depends_on(d), serde_json::json!([a, b]), "{listed}");
        assert_eq!(depends_on(c), env.show(c)["depends_on"]);
        assert_eq!(depends_on(a), serde_json::json!([]));
        let out = env.json(&["cancel", &a.to_string()]);
        let mut cancelled: Vec<i64> = serde_json::from_value(out["cancelled"].clone()).unwrap();
        cancelled.sort();
        assert_eq!(cancelled, [a, b, c, d]);
        for id in [a, b, c, d] {
            assert_eq!(env.show(id)["state"], "cancelled");
        }
        assert!(
            env.show(c)["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("task {b}"))
        );
    }

    fn bad_input_exits_2_and_stores_nothing(db) {
        let env = Env::on(db, &["echo"]);
        // A queue that exists, holding no task: readers refuse a missing
        // file before they could say a task does not exist.
        env.ok(&["state", "set", "--agent", "echo", "k", "1"]);
        let folder = env.data.path().to_str().unwrap().to_string();
        let cases: &[(&[&str], &str)] = &[
            (&["submit", "echo", "{not json"], "payload"),
            // SQLite said "unable to open database file", as if busy.
            (&["--db", &folder, "list"], "that is a directory; give the path of a database file"),
            (
                &["submit", "echo", "{}", "--next", "[{\"agnt\": \"x\"}]"],
                "--next",
            ),
            (&["submit", "echo", "{}", "--next", "not json"], "--next"),
            (&["submit", "echo", "{}", "--next", "{}"], "--next: missing field `agent`"),
            (&["submit", "echo", "{}", "--token-budget", "-1"], "\"-1\" is not a number of tokens"),
            (
                &["submit", "echo", "{}", "--max-attempts", "0"],
                "--max-attempts",
            ),
            (&["submit", "echo", "{}", "--after", "12345"], "invalid after: task 12345 does not exist"),
            (&["submit", "echo", "{}", "--in", "soon"], "--in"),
            (&["show", "999"], "task 999 does not exist"),
            (&["show", "abc"], "\"abc\" is not a task id (a whole number from 1"),
            (&["cancel", "0"], "\"0\" is not a task id"),
            (&["retry", "999"], "task 999 does not exist"),
            (&["review", "999", "approve"], "task 999 does not exist"),
        ];
        for (args, mentions) in cases {
            let out = env.run(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "colony {args:?}: {stderr}");
            assert!(
                stderr.contains(mentions),
                "colony {args:?} should mention {mentions}: {stderr}"
            );
        }
        assert_eq!(env.task_count(), 0);

        // With --json, each error is one JSON line naming its kind.
        let id = env.submit(&["echo", "{}"]).to_string();
        let cases: &[(&[&str], &str, i32)] = &[
            (&["submit", "echo", "{not json"], "bad_input", 2),
            (&["show", "999"], "not_found", 2),
            (&["retry", &id], "conflict", 2),
            (&["effects", "retry", "999"], "not_found", 2),
            (&["state", "get", "--agent", "echo", "nokey"], "not_found", 2),
            // The command line itself, refused before any command ran.
            (&["show", "abc"], "bad_input", 2),
            (&["submit", "echo", "{}", "--max-attempts", "0"], "bad_input", 2),
            (&["bogus"], "bad_input", 2),
        ];
        for (args, kind, code) in cases {
            let out = env.run(&[&["--json"], *args].concat());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(*code), "colony --json {args:?}: {stderr}");
            let error: Value = serde_json::from_str(stderr.trim())
                .unwrap_or_else(|e| panic!("colony --json {args:?}: not one JSON line ({e}): {stderr}"));
            assert_eq!(error["kind"], *kind, "{error}");
            assert_eq!(error["exit_code"], *code, "{error}");
            assert!(error["error"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
        }
        assert_eq!(env.task_count(), 1);
    }

    fn batch_submit_is_all_or_nothing_with_line_numbers(db) {
        let env = Env::on(db, &["echo"]);
        let file = env.data.path().join("tasks.jsonl");
        // A refused batch: exit 2, nothing stored; what it said.
        let refused = |contents: &str| -> String {
            std::fs::write(&file, contents).unwrap();
            let out = env.run(&["submit", "--batch", file.to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            assert_eq!(out.status.code(), Some(2), "{stderr}");
            assert_eq!(env.task_count(), 0);
            stderr
        };
        let said = refused("{\"agent\":\"echo\",\"payload\":{\"i\":1}}\n{\"agent\":\"echo\",\"priority\":\"high\"}\n");
        assert!(said.contains("tasks.jsonl line 2: ") && said.contains("priority"), "{said}");
        // One key on two lines: both lines named.
        let said = refused("{\"agent\":\"echo\",\"key\":\"k\"}\n\n{\"agent\":\"echo\",\"key\":\"k\"}\n");
        assert!(said.contains("tasks.jsonl line 3: invalid key: \"k\" is also the key on line 1"), "{said}");
        // A refusal of the queue names the file's line, blank lines counted.
        let said = refused("\n{\"agent\":\"echo\"}\n\n{\"agent\":\"echo\",\"after\":[999999]}\n");
        assert!(said.contains("tasks.jsonl line 4: ") && said.contains("task 999999 does not exist"), "{said}");
        // The first bad line is named, whatever is wrong with it, and a
        // position is said within its line.
        let said = refused("{\"agent\":\"echo\"}\n{\"agent\":\"echo\",\"max_attempts\":0}\n{\"agent\":\"echo\",\"colour\":1}\n");
        assert!(said.contains("tasks.jsonl line 2: invalid max_attempts: must be at least 1"), "{said}");
        let said = refused("{\"agent\":\"echo\",\"colour\":1}\n");
        assert!(said.contains("unknown field `colour`") && said.contains(" at column 24") && !said.contains("line 1 column"), "{said}");
        // A reviewer beside "review": false contradicts itself (it was
        // stored held for review).
        let said = refused("{\"agent\":\"echo\",\"reviewer\":\"echo\",\"review\":false}\n");
        assert!(said.contains("line 1: field review: false, beside a reviewer"), "{said}");
        // A line that is JSON but not one object says what a task is.
        let said = refused("[{\"agent\":\"echo\"}]\n");
        assert!(said.contains("line 1: a task is one JSON object") && said.contains("not an array"), "{said}");
        // A per-task flag beside --batch (ignored before: --review held
        // nothing back, --after waited for nothing): each line says its own.
        std::fs::write(&file, "{\"agent\":\"echo\"}\n").unwrap();
        for flag in [
            &["--review"][..], &["--priority", "9"], &["--max-attempts", "7"], &["--max-revisions", "1"],
            &["--reviewer", "echo"], &["--next", "[]"], &["--after", "1"], &["--key", "k"], &["--in", "5m"],
            &["--at", "2030-01-01T00:00:00Z"], &["--timeout", "9s"], &["--backoff", "3s"], &["--token-budget", "5"],
        ] {
            let mut args = vec!["submit", "--batch", file.to_str().unwrap()];
            args.extend_from_slice(flag);
            let out = env.run(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{flag:?}: {stderr}");
            assert!(stderr.contains("cannot be used with"), "{flag:?}: {stderr}");
            assert_eq!(env.task_count(), 0, "{flag:?}");
        }

        std::fs::write(
            &file,
            "{\"agent\":\"echo\",\"payload\":{\"i\":1}}\n\n{\"agent\":\"echo\",\"key\":\"k\"}\n",
        )
        .unwrap();
        let ids: Vec<i64> = env
            .ok(&["submit", "--batch", file.to_str().unwrap()])
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert_eq!(ids.len(), 2);
        assert_eq!(env.task_count(), 2);
        // A byte-order mark first (some editors write one) is no error.
        let marked = env.data.path().join("marked.jsonl");
        std::fs::write(&marked, "\u{feff}{\"agent\":\"echo\"}\n").unwrap();
        env.ok(&["submit", "--batch", marked.to_str().unwrap()]);
        std::fs::write(&marked, "\u{feff}{\"from\":\"a file\"}").unwrap();
        let id = env.submit(&["echo", "--payload-file", marked.to_str().unwrap()]);
        assert_eq!(env.show(id)["payload"], serde_json::json!({"from": "a file"}));
    }

    fn submitting_for_a_missing_agent_warns_but_stores(db) {
        let env = Env::on(db, &[]);
        let out = env.run(&["submit", "later", "{}"]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("warning: no agent \"later\""));
        assert_eq!(env.task_count(), 1);
        // A component that cannot be one (judged from its first bytes, no
        // compile): said at submit, not only when a daemon starts.
        std::fs::write(env.agents.path().join("text.wasm"), "hello, world").unwrap();
        std::fs::write(env.agents.path().join("core.wasm"), b"\0asm\x01\0\0\0").unwrap();
        // A manifest a daemon refuses, read as it reads it.
        std::fs::copy(colony_tests::guest_path("echo"), env.agents.path().join("typo.wasm")).unwrap();
        std::fs::write(env.agents.path().join("typo.toml"), "timout = \"5s\"\n").unwrap();
        for (agent, says) in [
            ("text", "not a WebAssembly file"),
            ("core", "core wasm module"),
            ("typo", "typo.toml:1:1: unknown field `timout`"),
        ] {
            let out = env.run(&["submit", agent, "{}"]);
            assert!(out.status.success());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains(&format!("warning: agent \"{agent}\" cannot run")) && stderr.contains(says), "{stderr}");
        }
        assert_eq!(env.task_count(), 4);
    }

    fn two_daemons_complete_2000_tasks_each_claimed_once(db) {
        // Each task sleeps 5 ms, so one daemon alone would need over a second:
        // long enough that both are sure to start and take work.
        let env = Env::on(db, &["sleeper"]);
        let lines: String = (0..2000)
            .map(|_| "{\"agent\":\"sleeper\",\"payload\":{\"ms\":5}}\n")
            .collect();
        let file = env.data.path().join("tasks.jsonl");
        std::fs::write(&file, lines).unwrap();
        env.ok(&["submit", "--batch", file.to_str().unwrap()]);
        let args = ["--until-idle", "--poll", "100ms", "--concurrency", "8"];
        let (mut a, mut b) = (env.daemon(&args), env.daemon(&args));
        assert!(a.wait().unwrap().success() && b.wait().unwrap().success());

        let q = env.queue();
        let complete: u64 = q
            .counts()
            .unwrap()
            .iter()
            .filter(|c| c.1 == State::Complete)
            .map(|c| c.2)
            .sum();
        assert_eq!(complete, 2000);
        let claims = claims_per_task(&env.db());
        assert_eq!(claims.len(), 2000);
        let twice: Vec<_> = claims.iter().filter(|(_, n)| **n != 1).map(|(id, _)| q.events(Some(*id), 0, 100).unwrap()).collect();
        assert!(twice.is_empty(), "tasks claimed more than once: {twice:#?}");
        let holders: std::collections::HashSet<String> =
            events_named(&q, "claim").into_iter().map(|e| e.actor).collect();
        assert_eq!(holders.len(), 2, "both daemons took work: {holders:?}");
    }

    fn a_killed_daemons_tasks_are_recovered_by_another(db) {
        let env = Env::on(db, &["sleeper"]);
        let id = env.submit(&["sleeper", r#"{"ms": 30000}"#]);
        let mut victim = env.daemon(&QUICK_LEASES);
        wait_for("the task to be claimed", Duration::from_secs(20), || {
            env.queue().get(id).unwrap().state == State::InProgress
        });
        let holder = env.queue().get(id).unwrap().claimed_by.unwrap();
        victim.kill().unwrap(); // SIGKILL: no chance to release anything
        victim.wait().unwrap();

        // Make the second run short: swap the payload is impossible, so use a
        // rescuer with a timeout; what matters is that it reclaims the task.
        let mut rescuer = env.daemon(&[&QUICK_LEASES[..], &["--concurrency", "1"]].concat());
        wait_for(
            "the lease to be reset and the task reclaimed",
            Duration::from_secs(20),
            || {
                let task = env.queue().get(id).unwrap();
                task.state == State::InProgress && task.claimed_by.as_deref() != Some(holder.as_str())
            },
        );
        signal(&rescuer, "-KILL");
        rescuer.wait().unwrap();
        let events = env.queue().events(Some(id), 0, 100).unwrap();
        let expired = events
            .iter()
            .find(|e| e.event == "lease_expired")
            .expect("a lease_expired event");
        assert_eq!(
            expired.detail["holder"],
            holder.as_str(),
            "the event names the dead holder"
        );
        assert_eq!(
            env.queue().get(id).unwrap().attempts,
            2,
            "the lost attempt stays counted"
        );
    }

    /// A task cancelled while it waits in a daemon's claim-ahead buffer is never
    /// started: the daemon checks its buffer whenever another connection has
    /// committed. It was started after the cancel had returned (up to a
    /// heartbeat later, 10 s by default), its run's result then refused; on
    /// PostgreSQL, whose commits by other connections the daemon cannot see,
    /// always.
    fn a_task_cancelled_while_claimed_ahead_is_never_started(db) {
        let env = Env::on(db, &["sleeper"]);
        std::fs::write(env.agents.path().join("sleeper.toml"), "concurrency = 1\n").unwrap();
        let lines: String = (0..80)
            .map(|_| "{\"agent\":\"sleeper\",\"payload\":{\"ms\":100}}\n")
            .collect();
        let batch = env.file("tasks.jsonl", lines);
        env.ok(&["submit", "--batch", &batch]);
        let last = 80;
        // An explicit claim batch claims ahead whatever the runs' pace (left
        // to itself, only for runs averaging under 50 ms). 100 ms a task
        // leaves the cancel (a process, then a watch tick: on PostgreSQL a
        // round trip each) time to land before the last task's turn.
        let mut daemon = env.daemon(&["--poll", "200ms", "--claim-batch", "64"]);
        wait_for(
            "the last task to be claimed ahead",
            Duration::from_secs(30),
            || env.queue().get(last).unwrap().state == State::InProgress,
        );
        env.ok(&["cancel", &last.to_string()]);
        wait_for("the others to complete", Duration::from_secs(60), || {
            env.queue().get(last - 1).unwrap().state == State::Complete
        });
        std::thread::sleep(Duration::from_millis(300));
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        let events: Vec<String> = env
            .queue()
            .events(Some(last), 0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert_eq!(
            events,
            ["submit", "claim", "cancel"],
            "it ran after its cancel"
        );
    }

    /// The daemon that resets a crashed daemon's leases says so when it is
    /// done, and how many of those tasks failed for good: its closing line
    /// said "0 failed" while `status` counted the failures it had made.
    fn a_daemon_counts_the_expired_leases_it_reset(db) {
        let env = Env::on(db, &["sleeper"]);
        let last_chance = env.submit(&["sleeper", r#"{"ms": 2000}"#, "--max-attempts", "1"]);
        let again = env.submit(&["sleeper", r#"{"ms": 2000}"#]);
        let mut victim = env.daemon(&QUICK_LEASES);
        wait_for("both tasks to be claimed", Duration::from_secs(20), || {
            [last_chance, again].iter().all(|&id| env.queue().get(id).unwrap().state == State::InProgress)
        });
        victim.kill().unwrap();
        victim.wait().unwrap();
        let out = env.ok_with_env(&[&["--json", "daemon", "--until-idle"][..], &QUICK_LEASES].concat(), &[]);
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!((&summary["leases_reset"], &summary["leases_reset_failed"]), (&serde_json::json!(2), &serde_json::json!(1)), "{summary}");
        assert_eq!((&summary["completed"], &summary["released"], &summary["given_back"]), (&serde_json::json!(1), &serde_json::json!(0), &serde_json::json!(0)), "{summary}");
        assert_eq!(env.queue().get(last_chance).unwrap().state, State::Failed);
        let out = env.ok_with_env(&[&["daemon", "--until-idle"][..], &QUICK_LEASES].concat(), &[]);
        assert!(!String::from_utf8_lossy(&out.stderr).contains("expired lease"), "nothing left to reset");
    }

    /// A database outage longer than `stale_after`: no host could renew its
    /// leases, so the first daemon back must not reset those of a live
    /// daemon that reconnects a moment later; a dead one's it still resets.
    fn after_an_outage_live_daemons_get_to_renew_their_leases_first(db) {
        let env = Env::on(db, &["sleeper"]);
        let ids = [
            env.submit(&["sleeper", r#"{"ms": 60000}"#]),
            env.submit(&["sleeper", r#"{"ms": 60000}"#]),
        ];
        let lease_args = ["--stale-after", "4s", "--poll", "100ms"];
        let mut holder = env.daemon(&[&lease_args[..], &["--heartbeat", "500ms", "--concurrency", "2"]].concat());
        wait_for("both tasks to be claimed", Duration::from_secs(20), || {
            ids.iter().all(|&id| env.queue().get(id).unwrap().state == State::InProgress)
        });
        let holder_name = env.queue().get(ids[0]).unwrap().claimed_by.unwrap();
        let log = env.data.path().join("reaper.log");
        let mut reaper = Daemon::new(
            env.cmd()
                .args(["daemon", "--heartbeat", "100ms"])
                .args(lease_args)
                .env("COLONY_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        let reaper_log = || std::fs::read_to_string(&log).unwrap();
        wait_for("the reaper to start", Duration::from_secs(20), || reaper_log().contains("daemon started"));

        // The outage: the database refuses every write for longer than
        // twice the busy timeout (5 s), so that a reaper's write may both
        // fail and then wait, and than stale_after. The holder is slower to
        // come back: it stays stopped 1.5 s past the outage.
        outage_with_holder_stopped(&env, &holder, Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1500));
        signal(&holder, "-CONT");
        // Past the reaper's wait (stale_after from the outage's end).
        std::thread::sleep(Duration::from_secs(5));
        let expired = events_named(&env.queue(), "lease_expired");
        assert!(expired.is_empty(), "live leases were reset: {expired:?}");
        for id in ids {
            let task = env.queue().get(id).unwrap();
            assert_eq!((task.state, task.claimed_by.as_deref()), (State::InProgress, Some(holder_name.as_str())));
        }
        assert!(reaper_log().contains("other hosts' leases are not reset until"), "{}", reaper_log());
        // The outage is logged once, and its end.
        let said = reaper_log();
        assert!(said.contains("heartbeats go through again: the database answers"), "{said}");
        assert!(said.matches("heartbeat failed, will retry").count() <= 1, "{said}");

        // A holder that does not come back loses them, as ever.
        holder.kill().unwrap();
        holder.wait().unwrap();
        wait_for("the dead holder's leases to be reset", Duration::from_secs(20), || {
            ids.iter().all(|&id| {
                env.queue()
                    .events(Some(id), 0, 100)
                    .unwrap()
                    .iter()
                    .any(|e| e.event == "lease_expired" && e.detail["holder"] == holder_name.as_str())
            })
        });
        signal(&reaper, "-KILL");
        reaper.wait().unwrap();
    }

    /// A daemon started as an outage ends cannot tell it from none: it
    /// waits stale_after from its start before resetting other daemons'
    /// leases, so a live holder that reconnects a moment later keeps its
    /// runs (it reset them at its first heartbeat, failing a task with one
    /// attempt as lease_expired).
    fn a_daemon_just_started_lets_live_holders_renew_first(db) {
        let env = Env::on(db, &["sleeper"]);
        let id = env.submit(&["sleeper", "--max-attempts", "1", r#"{"ms": 20000}"#]);
        let lease_args = ["--stale-after", "4s", "--poll", "100ms"];
        let mut holder = env.daemon(&[&lease_args[..], &["--heartbeat", "500ms"]].concat());
        wait_for("the task to be claimed", Duration::from_secs(20), || {
            env.queue().get(id).unwrap().state == State::InProgress
        });
        outage_with_holder_stopped(&env, &holder, Duration::from_secs(6));
        let mut newcomer = env.daemon(&[&lease_args[..], &["--heartbeat", "100ms"]].concat());
        std::thread::sleep(Duration::from_millis(1500));
        signal(&holder, "-CONT");
        std::thread::sleep(Duration::from_secs(4));
        assert_no_lease_reset(&env, id);
        assert_eq!(env.queue().get(id).unwrap().attempts, 1);
        signal(&newcomer, "-KILL");
        newcomer.wait().unwrap();
        holder.kill().unwrap();
        holder.wait().unwrap();
    }

    /// After an outage a holder has its own stale_after to renew, counted
    /// from the outage's end, even when its reaper's is shorter.
    fn after_an_outage_a_holder_gets_its_own_longer_stale_after(db) {
        let env = Env::on(db, &["sleeper"]);
        let id = env.submit(&["sleeper", r#"{"ms": 60000}"#]);
        let mut holder = env.daemon(&["--stale-after", "8s", "--heartbeat", "3s", "--poll", "100ms"]);
        wait_for("the task to be claimed", Duration::from_secs(20), || {
            env.queue().get(id).unwrap().state == State::InProgress
        });
        let mut reaper = env.daemon(&["--stale-after", "4s", "--heartbeat", "100ms", "--poll", "100ms"]);
        std::thread::sleep(Duration::from_secs(2)); // the reaper is up

        // A 10 s outage; the holder comes back 5 s after it: past the
        // reaper's 4 s, within its own 8 s.
        outage_with_holder_stopped(&env, &holder, Duration::from_secs(10));
        std::thread::sleep(Duration::from_secs(5));
        signal(&holder, "-CONT");
        std::thread::sleep(Duration::from_secs(5));
        assert_no_lease_reset(&env, id);
        assert_eq!(env.queue().get(id).unwrap().state, State::InProgress);
        signal(&reaper, "-KILL");
        reaper.wait().unwrap();
        holder.kill().unwrap();
        holder.wait().unwrap();
    }

    /// Tasks claimed ahead while an agent's runs were short are given back
    /// once its runs grow long: they waited leased in one daemon behind its
    /// two slots while another daemon stood idle (and a SIGKILL would have
    /// failed the ones with one attempt that never ran).
    fn tasks_claimed_ahead_are_given_back_when_runs_grow_long(db) {
        let env = Env::on(db, &["sleeper"]);
        let line = |ms: u64| format!("{{\"agent\":\"sleeper\",\"payload\":{{\"ms\":{ms}}},\"max_attempts\":1}}\n");
        let batch: String = (0..20).map(|_| line(1)).chain((0..10).map(|_| line(2500))).collect();
        let file = env.data.path().join("tasks.jsonl");
        std::fs::write(&file, batch).unwrap();
        env.ok(&["submit", "--batch", file.to_str().unwrap()]);
        let mut hoarder = env.daemon(&["--concurrency", "2", "--heartbeat", "300ms", "--poll", "100ms"]);
        let in_progress = || env.json(&["list", "--state", "in_progress"]).as_array().unwrap().len();
        wait_for("the slow tasks to start", Duration::from_secs(30), || {
            env.json(&["list", "--state", "complete"]).as_array().unwrap().len() >= 20 && in_progress() > 0
        });
        wait_for("the tasks claimed ahead to be given back", Duration::from_secs(5), || in_progress() <= 2);
        assert!(!events_named(&env.queue(), "release").is_empty(), "tasks were given back");
        // Another daemon takes them; none fails.
        let helper = env.cmd().args(["daemon", "--concurrency", "8", "--until-idle"]).output().unwrap();
        assert!(helper.status.success(), "{}", String::from_utf8_lossy(&helper.stderr));
        hoarder.kill().unwrap();
        hoarder.wait().unwrap();
        assert_eq!(env.json(&["list", "--state", "failed"]), serde_json::json!([]));
        let holders: std::collections::HashSet<String> =
            events_named(&env.queue(), "claim").into_iter().map(|e| e.actor).collect();
        assert_eq!(holders.len(), 2, "both daemons ran tasks");
    }

    /// A claimed task waiting in the buffer is not started once its lease
    /// may have been reset elsewhere (not renewed for stale_after, the
    /// database out): it waits for a heartbeat to renew it.
    fn a_buffered_task_whose_lease_may_be_gone_is_not_started(db) {
        let env = Env::on(db, &["sleeper"]);
        let first = env.submit(&["sleeper", r#"{"ms": 2500}"#]);
        let second = env.submit(&["sleeper", r#"{"ms": 10}"#]);
        let log = env.data.path().join("daemon.log");
        let mut daemon = Daemon::new(
            env.cmd()
                .args(["daemon", "--heartbeat", "200ms", "--stale-after", "2s", "--poll", "100ms"])
                .args(["--concurrency", "1", "--claim-batch", "2"])
                .env("COLONY_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        let started = |id: i64| {
            std::fs::read_to_string(&log)
                .unwrap()
                .lines()
                .any(|l| l.contains("started") && l.contains(&format!("task={id} ")))
        };
        wait_for("both tasks to be claimed", Duration::from_secs(20), || {
            [first, second].iter().all(|&id| env.queue().get(id).unwrap().state == State::InProgress)
        });
        // Its start is logged a moment after the claim commits.
        wait_for("the first run to start", Duration::from_secs(20), || started(first));
        assert!(!started(second));

        // The first run ends during the outage, after its lease went unrenewed
        // for stale_after (and a heartbeat failed after the 5 s busy timeout).
        let mut raw = refuse_every_write(&env.database);
        std::thread::sleep(Duration::from_millis(7500));
        assert!(!started(second), "a buffered task started on a lease not renewed for stale_after");
        raw.execute("ROLLBACK");
        wait_for("both tasks to complete", Duration::from_secs(30), || {
            [first, second].iter().all(|&id| env.queue().get(id).unwrap().state == State::Complete)
        });
        assert!(started(second));
        signal(&daemon, "-KILL");
        daemon.wait().unwrap();
    }

    /// Slow tasks are claimed for free slots only, shared by the slow
    /// agents: the rest stay in the queue for any daemon, and a daemon
    /// killed mid-run costs an attempt only of the task it had started.
    fn a_daemon_claims_slow_tasks_only_for_its_free_slots(db) {
        let env = Env::on(db, &["sleeper"]);
        // A second slow agent: the same component under another name.
        std::fs::copy(env.agents.path().join("sleeper.wasm"), env.agents.path().join("nap.wasm")).unwrap();
        let ids: Vec<i64> = ["sleeper", "nap", "sleeper", "nap"]
            .iter()
            .map(|agent| env.submit(&[agent, r#"{"ms": 6000}"#, "--max-attempts", "1"]))
            .collect();
        let in_state = |state: State| {
            ids.iter()
                .filter(|&&id| env.queue().get(id).unwrap().state == state)
                .count()
        };
        let mut first = env.daemon(&["--concurrency", "1", "--heartbeat", "200ms", "--stale-after", "1s", "--poll", "100ms"]);
        wait_for("a task to start", Duration::from_secs(20), || in_state(State::InProgress) == 1);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!((in_state(State::InProgress), in_state(State::Ready)), (1, 3), "one slot, one task leased");

        signal(&first, "-KILL");
        first.wait().unwrap();
        env.until_idle(&["--stale-after", "1s", "--concurrency", "4"]);
        let tasks: Vec<_> = ids.iter().map(|&id| env.queue().get(id).unwrap()).collect();
        let failed: Vec<_> = tasks.iter().filter(|t| t.state == State::Failed).collect();
        assert_eq!(failed.len(), 1, "only the killed daemon's started task: {tasks:?}");
        let error = failed[0].error.as_ref().unwrap();
        assert_eq!(error.kind.as_str(), "lease_expired");
        assert!(error.message.contains("an attempt counts at claim") && error.message.contains(&format!("colony retry {}", failed[0].id)), "{error:?}");
        let mut complete = tasks.iter().filter(|t| t.state == State::Complete);
        assert!(complete.clone().count() == 3 && complete.all(|t| t.attempts == 1), "{tasks:?}");
    }

    fn sigterm_releases_runs_without_burning_attempts(db) {
        let env = Env::on(db, &["sleeper"]);
        let id = env.submit(&["sleeper", r#"{"ms": 30000}"#]);
        let daemon = env.daemon(&["--grace", "300ms", "--poll", "100ms"]);
        wait_for("the task to be claimed", Duration::from_secs(20), || {
            env.queue().get(id).unwrap().state == State::InProgress
        });
        signal(&daemon, "-TERM");
        let status = daemon.wait_with_output().unwrap().status;
        assert!(status.success(), "graceful shutdown exits 0: {status}");
        let task = env.queue().get(id).unwrap();
        assert_eq!((task.state, task.attempts), (State::Ready, 0));
        let events = env.queue().events(Some(id), 0, 100).unwrap();
        assert_eq!(events.last().unwrap().event, "release");
    }

    /// A hangup (a closed terminal or ssh session) stops a daemon as
    /// gracefully as SIGTERM: its default killed it on the spot, the task
    /// left to wait out its lease. Under `nohup` (SIGHUP ignored) it is
    /// ignored still.
    fn sighup_releases_runs_unless_ignored(db) {
        use std::os::unix::process::CommandExt;
        let env = Env::on(db, &["sleeper"]);
        let id = env.submit(&["sleeper", r#"{"ms": 30000}"#]);
        let daemon = |ignore_hangup: bool| {
            let mut cmd = env.cmd();
            cmd.args(["daemon", "--grace", "300ms", "--poll", "100ms"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // Set either way: the test runner's own (ignored under nohup)
            // would otherwise be inherited.
            let action = if ignore_hangup { libc::SIG_IGN } else { libc::SIG_DFL };
            // SAFETY: signal(2) is async-signal-safe, as pre_exec asks.
            unsafe {
                cmd.pre_exec(move || {
                    libc::signal(libc::SIGHUP, action);
                    Ok(())
                });
            }
            Daemon::new(cmd.spawn().unwrap())
        };
        let claimed = || env.queue().get(id).unwrap().state == State::InProgress;

        let mut nohup = daemon(true);
        wait_for("the task to be claimed", Duration::from_secs(20), claimed);
        signal(&nohup, "-HUP");
        std::thread::sleep(Duration::from_millis(500));
        assert!(nohup.try_wait().unwrap().is_none(), "a daemon under nohup stopped at a hangup");
        assert!(claimed());
        signal(&nohup, "-TERM");
        assert!(nohup.wait_with_output().unwrap().status.success());
        assert_eq!(env.queue().get(id).unwrap().state, State::Ready);

        let mut hung_up = daemon(false);
        wait_for("the task to be claimed again", Duration::from_secs(20), claimed);
        signal(&hung_up, "-HUP");
        // A second hangup (a dropped ssh session sends two) is no
        // "second signal": the stop stays graceful. (The zombie of a
        // daemon that stopped already takes it too.)
        std::thread::sleep(Duration::from_millis(100));
        signal(&hung_up, "-HUP");
        wait_for("the daemon to stop", Duration::from_secs(30), || hung_up.try_wait().unwrap().is_some());
        let status = hung_up.wait_with_output().unwrap().status;
        assert!(status.success(), "a hangup stops gracefully and exits 0: {status}");
        let task = env.queue().get(id).unwrap();
        assert_eq!((task.state, task.attempts), (State::Ready, 0), "released, no attempt spent");
        let events = env.queue().events(Some(id), 0, 100).unwrap();
        assert_eq!(events.last().unwrap().event, "release");
    }

    /// A task cancelled and retried while its run goes on here is claimed
    /// again before a heartbeat notices: the old run is stopped, said, and
    /// counted as lost in the daemon's summary (it vanished unaccounted).
    fn a_run_replaced_by_a_new_claim_of_its_task_is_counted_lost(db) {
        let env = Env::on(db, &["sleeper"]);
        let id = env.submit(&["sleeper", r#"{"ms": 5000}"#]);
        let daemon = Daemon::new(
            env.cmd()
                .args(["--json", "daemon", "--heartbeat", "30s", "--poll", "100ms", "--grace", "5s"])
                .env("COLONY_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        wait_for("the task to be claimed", Duration::from_secs(20), || {
            env.queue().get(id).unwrap().state == State::InProgress
        });
        env.ok(&["cancel", &id.to_string()]);
        env.ok(&["retry", &id.to_string()]);
        wait_for("the retry to complete", Duration::from_secs(20), || {
            env.queue().get(id).unwrap().state == State::Complete
        });
        signal(&daemon, "-TERM");
        let out = daemon.wait_with_output().unwrap();
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!((&summary["completed"], &summary["lost"]), (&serde_json::json!(1), &serde_json::json!(1)), "{summary}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("stopping the run of its older claim"), "{said}");
    }

    fn torture_small_kills_daemons_and_loses_nothing(db) {
        let verdict = torture_verdict(db, &[], 800);
        assert_eq!(verdict["tasks"], 800);
    }

    fn cancelling_a_running_task_stops_its_run(db) {
        let env = Env::on(db, &["sleeper"]);
        let id = env.submit(&["sleeper", r#"{"ms": 30000}"#]);
        let daemon = env.daemon(&["--until-idle", "--heartbeat", "200ms", "--poll", "100ms"]);
        wait_for("the task to be claimed", Duration::from_secs(20), || {
            env.queue().get(id).unwrap().state == State::InProgress
        });
        let started = Instant::now();
        env.ok(&["cancel", &id.to_string(), "--reason", "no longer needed"]);
        let out = daemon.wait_with_output().unwrap();
        assert!(out.status.success());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the 30 s run was stopped, not waited for"
        );
        let task = env.queue().get(id).unwrap();
        assert_eq!(task.state, State::Cancelled);
        assert_eq!(task.error.unwrap().message, "no longer needed");
        let events = env.queue().events(Some(id), 0, 100).unwrap();
        assert!(events.iter().all(|e| e.event != "complete"));
    }

    fn a_run_finishing_during_the_shutdown_grace_is_stored_at_once(db) {
        let env = Env::on(db, &["sleeper"]);
        let quick = env.submit(&["sleeper", r#"{"ms": 1500}"#]);
        let slow = env.submit(&["sleeper", r#"{"ms": 120000}"#]);
        let mut daemon = env.daemon(&["--grace", "60s", "--poll", "100ms", "--heartbeat", "200ms"]);
        wait_for("both tasks to be claimed", Duration::from_secs(20), || {
            [quick, slow]
                .iter()
                .all(|id| env.queue().get(*id).unwrap().state == State::InProgress)
        });
        signal(&daemon, "-TERM");
        // The slow run keeps the daemon in its grace; the quick one finishes
        // meanwhile and must be stored then, not when the grace ends.
        wait_for(
            "the quick run to be stored during the grace",
            Duration::from_secs(20),
            || env.queue().get(quick).unwrap().state == State::Complete,
        );
        assert!(daemon.try_wait().unwrap().is_none(), "still in its grace");
        signal(&daemon, "-KILL");
        daemon.wait().unwrap();
        let task = env.queue().get(quick).unwrap();
        assert_eq!((task.state, task.attempts), (State::Complete, 1));
    }

    /// Tokens reserved by a call with no recorded answer are shown with the
    /// task: "or still running" only while a run of it may still be calling.
    fn show_explains_tokens_reserved_by_unanswered_calls(db) {
        let env = Env::on(db, &["thinker"]);
        let id = env.submit(&["thinker", "{}"]);
        let mut q = env.queue();
        q.set_claim_lease(Duration::from_millis(100));
        let lease = q.claim("thinker", 1).unwrap().remove(0).lease;
        q.reserve_model_tokens(lease, 1, 700, None).unwrap();
        let note = "700 more tokens reserved by calls with no recorded answer";
        let shown = env.ok(&["show", &id.to_string()]);
        assert!(shown.contains(note) && shown.contains("or still running"), "{shown}");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(q.reset_stale_leases(Duration::from_millis(100)).unwrap().len(), 1);
        let shown = env.ok(&["show", &id.to_string()]);
        assert!(shown.contains(note) && !shown.contains("or still running"), "{shown}");
        assert_eq!(env.json(&["show", &id.to_string()])["usage"]["reserved_tokens"], 700);
    }

    /// A call this host refused (here: larger than the alias's tokens per
    /// minute, never sent) is no reason to pay again for the calls after it:
    /// replay matches calls by their place in the run, not by their order
    /// among the calls a provider saw.
    fn a_call_the_host_refused_does_not_end_the_replay_after_it(db) {
        use colony_tests::model_server::Scripted;
        let t = ThinkerWithModel::new(db, "tokens_per_minute = 150\n");
        let (env, server) = (&t.env, &t.server);
        for text in ["one", "three"] {
            server.push(Scripted::answer_with_usage(text, 1, 1));
        }
        let daemon = |extra: &[&str]| t.daemon(extra);
        let payload = serde_json::json!({
            "prompts": ["a", "x".repeat(2000), "c"],
            "max_tokens": 10,
            "on_error": "continue",
            "sleep_after": [3, 60000],
        });
        let id = env.submit(&["thinker", &payload.to_string()]);
        let mut first = daemon(&[]);
        wait_for("three model calls", Duration::from_secs(30), || {
            env.queue().model_calls(id).unwrap().len() == 3
        });
        signal(&first, "-KILL");
        first.wait().unwrap();
        assert_eq!(server.count(), 2, "the second call was refused by the host");

        let second = daemon(&["--until-idle"]).wait_with_output().unwrap();
        assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
        let task = env.queue().get(id).unwrap();
        assert_eq!(task.state, State::Complete, "{:?}", task.error);
        assert_eq!(server.count(), 2, "the first and third calls were replayed, not paid again");
        let result = task.result.unwrap();
        let replayed = colony_tests::model_server::replayed(&result);
        assert_eq!(replayed, [true, true], "{result}");
        // The refused calls are said apart, with no cost of their own.
        let shown = env.json(&["show", &id.to_string()]);
        let sent: Vec<bool> = shown["model_calls"].as_array().unwrap().iter().map(|c| c["sent"].as_bool().unwrap()).collect();
        assert_eq!(sent, [true, false, true, true, false, true], "{shown}");
        let runs: Vec<u64> = shown["model_calls"].as_array().unwrap().iter().map(|c| c["run"].as_u64().unwrap()).collect();
        assert_eq!(runs, [1, 1, 1, 2, 2, 2], "each call says which run made it: {shown}");
        let text = env.ok(&["show", &id.to_string()]);
        assert!(text.contains("run attempt  seq"), "{text}");
        assert!(text.contains("total: 2 calls sent, 2 refused before the provider, 2 replayed"), "{text}");
    }

    /// A call waiting for its turn under the alias's rate limit has set no
    /// tokens aside: a host killed then leaves no reservation behind (none
    /// could release it; it counted against the budget for good). A call
    /// its budget cannot cover is refused at once, not after its wait.
    fn a_call_waiting_for_the_rate_limit_holds_no_reservation(db) {
        use colony_tests::model_server::Scripted;
        let t = ThinkerWithModel::new(db, "requests_per_minute = 1\ntimeout = \"5m\"\n");
        let (env, server) = (&t.env, &t.server);
        server.push(Scripted::answer_with_usage("one", 10, 5));
        let id = env.submit(&["thinker", "--token-budget", "1000", r#"{"prompts": ["a", "b"], "max_tokens": 50}"#]);
        let mut first = t.daemon(&[]);
        wait_for("the first model call", Duration::from_secs(30), || {
            env.queue().model_calls(id).unwrap().len() == 1
        });
        // The second call waits a minute for its turn: long enough for a
        // reservation written before the wait to be in.
        std::thread::sleep(Duration::from_millis(1500));
        signal(&first, "-KILL");
        first.wait().unwrap();
        assert_eq!(server.count(), 1, "the second call was waiting for its turn");
        let usage = env.queue().usage(id).unwrap();
        assert_eq!(usage.reserved_tokens, 0, "{usage:?}");
        assert_eq!(env.queue().chain_budget(id).unwrap().spent, 15, "the first call's charge alone");

        let second = t.daemon(&["--until-idle"]).wait_with_output().unwrap();
        assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
        let task = env.queue().get(id).unwrap();
        assert_eq!(task.state, State::Complete, "{:?}", task.error);
        assert_eq!(server.count(), 2, "the first call replayed, the second sent");

        // 60 of 100 tokens charged by the first call: the second (50 plus
        // the prompt) cannot be covered, and is refused without waiting the
        // minute for its turn.
        server.push(Scripted::answer_with_usage("big", 40, 20));
        let poor = env.submit(&["thinker", "--token-budget", "100", r#"{"prompts": ["c", "d"], "max_tokens": 50}"#]);
        let mut third = t.daemon(&[]);
        wait_for("the over-budget call's refusal", Duration::from_secs(30), || {
            env.queue().get(poor).unwrap().state == State::Failed
        });
        signal(&third, "-KILL");
        third.wait().unwrap();
        let shown = env.json(&["show", &poor.to_string()]);
        assert_eq!(shown["error"]["kind"], "budget_exceeded", "{shown}");
        assert_eq!(server.count(), 3);
        assert_eq!(shown["usage"]["reserved_tokens"], 0, "{shown}");
    }

    fn a_killed_daemons_model_calls_are_replayed_not_paid_again(db) {
        use colony_tests::model_server::Scripted;
        let t = ThinkerWithModel::new(db, "");
        let (env, server) = (&t.env, &t.server);
        for text in ["one", "two", "three"] {
            server.push(Scripted::answer_with_usage(text, 100, 20));
        }
        let daemon = |extra: &[&str]| t.daemon(extra);
        // The first run sleeps for a minute after its second call.
        let id = env.submit(&[
            "thinker",
            r#"{"prompts": ["a", "b", "c"], "sleep_after": [2, 60000]}"#,
        ]);
        let mut first = daemon(&[]);
        wait_for("two model calls", Duration::from_secs(30), || {
            env.queue().model_calls(id).unwrap().len() == 2
        });
        signal(&first, "-KILL");
        first.wait().unwrap();
        assert_eq!(server.count(), 2);

        let second = daemon(&["--until-idle"]).wait_with_output().unwrap();
        assert!(
            second.status.success(),
            "{}",
            String::from_utf8_lossy(&second.stderr)
        );
        let task = env.queue().get(id).unwrap();
        assert_eq!(task.state, State::Complete, "{:?}", task.error);
        assert_eq!(server.count(), 3, "only the third call was made again");
        let replayed = colony_tests::model_server::replayed(&task.result.unwrap());
        assert_eq!(replayed, [true, true, false]);
        let shown = env.json(&["show", &id.to_string()]);
        assert_eq!(shown["usage"]["replayed"], 2);
        assert_eq!(shown["usage"]["calls"], 3);
        assert_eq!(shown["usage"]["input_tokens"], 300);
        assert_eq!(
            shown["usage"]["cost_usd"],
            Value::Null,
            "no prices configured"
        );
        let calls = shown["model_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 5, "2 paid, then 2 replayed and 1 paid");
        let listed = env.json(&["list"]);
        assert_eq!(listed[0]["usage"]["calls"], 3);
        let text = env.ok(&["show", &id.to_string()]);
        assert!(
            text.contains("model calls:") && text.contains("total: 3 calls sent, 2 replayed from the journal"),
            "{text}"
        );

        // A task that fails on its budget: a plain retry says it will most
        // likely fail again and how to give it more; --token-budget does.
        let poor = env.submit(&["thinker", "--token-budget", "20", r#"{"prompts": ["d"], "max_tokens": 100}"#]);
        let third = daemon(&["--until-idle"]).wait_with_output().unwrap();
        assert!(third.status.success());
        assert_eq!(env.json(&["show", &poor.to_string()])["error"]["kind"], "budget_exceeded");
        let shown = env.ok(&["show", &poor.to_string()]);
        // Refused by this host: no call was sent (it said "1 calls made").
        assert!(shown.contains("total: 0 calls sent, 1 refused before the provider"), "{shown}");
        let usage = &env.json(&["show", &poor.to_string()])["usage"];
        assert_eq!((usage["calls"].as_u64(), usage["refused"].as_u64()), (Some(0), Some(1)), "{usage}");
        let plain = env.ok_with_env(&["retry", &poor.to_string()], &[]);
        let said = String::from_utf8_lossy(&plain.stderr);
        assert!(said.contains(&format!("colony retry {poor} --token-budget N")), "{said}");
        env.ok(&["cancel", &poor.to_string()]);
        env.ok(&["retry", &poor.to_string(), "--token-budget", "5000"]);
        daemon(&["--until-idle"]).wait_with_output().unwrap();
        assert_eq!(env.queue().get(poor).unwrap().state, State::Complete);
        // The root says what its chain spent of the budget.
        let shown = env.json(&["show", &poor.to_string()]);
        let spent = shown["usage"]["input_tokens"].as_u64().unwrap() + shown["usage"]["output_tokens"].as_u64().unwrap();
        assert!(spent > 0);
        assert_eq!(shown["chain"], serde_json::json!({"root_id": poor, "token_budget": 5000, "spent_tokens": spent}));
        let text = env.ok(&["show", &poor.to_string()]);
        assert!(text.contains(&format!("spent {spent}, {} left", 5000 - spent)), "{text}");

        // The error names the budget that refused and what raises it.
        let poor = env.submit(&["thinker", "--token-budget", "20", r#"{"prompts": ["e"], "max_tokens": 100}"#]);
        std::fs::write(
            env.agents.path().join("thinker.toml"),
            "models = [\"fast\"]\ntoken_budget = 60\n",
        )
        .unwrap();
        let capped = env.submit(&["thinker", "--token-budget", "5000", r#"{"prompts": ["f"], "max_tokens": 100}"#]);
        daemon(&["--until-idle"]).wait_with_output().unwrap();
        let message = |id: i64| env.json(&["show", &id.to_string()])["error"]["message"].as_str().unwrap().to_string();
        let said = message(poor);
        assert!(said.contains(&format!("the chain (root task {poor}) has 20 left of its budget of 20 tokens")), "{said}");
        assert!(said.contains(&format!("`colony retry {poor} --token-budget N` gives it N in all")), "{said}");
        let said = message(capped);
        assert!(said.contains("the task has 60 left of the 60 tokens its agent's manifest allows a task"), "{said}");
        assert!(said.contains("--token-budget cannot raise it"), "{said}");
    }

    fn operators_see_and_fix_state_from_the_cli(db) {
        let env = Env::on(db, &["echo"]);
        env.queue(); // the database is there: the refusals below store nothing in it
        let bad = env.run(&["state", "set", "--agent", "ops", "stock", "{not json"]);
        assert_eq!(bad.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&bad.stderr).contains("\"stock\" is not valid JSON"));
        // So is a number no agent's JSON reader takes.
        let huge = env.run(&["state", "set", "--agent", "ops", "stock", "[1e999]"]);
        assert_eq!(huge.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&huge.stderr).contains("is past the largest an agent's JSON reader takes"));
        assert_eq!(
            env.json(&["state", "list", "--agent", "ops"]),
            serde_json::json!([])
        );
        let neither = env.run(&["state", "list"]);
        assert_eq!(neither.status.code(), Some(2));

        assert_eq!(
            env.ok(&["state", "set", "--agent", "ops", "stock/mug", "120"])
                .trim(),
            "stock/mug: version 1"
        );
        env.ok(&["state", "set", "--agent", "ops", "stock/mug", "119"]);
        env.ok(&["state", "set", "--agent", "ops", "other", r#""x""#]);
        assert_eq!(
            env.ok(&["state", "get", "--agent", "ops", "stock/mug"])
                .trim(),
            "119"
        );
        let listed = env.json(&["state", "list", "--agent", "ops", "--prefix", "stock/"]);
        assert_eq!(
            listed,
            serde_json::json!([{"key": "stock/mug", "value": 119, "version": 2}])
        );
        assert_eq!(
            env.ok(&["state", "list", "--agent", "ops", "--prefix", "none/"]).trim(),
            "no agent state for ops under the prefix \"none/\""
        );
        env.ok(&["state", "delete", "--agent", "ops", "stock/mug"]);
        let missing = env.run(&["state", "get", "--agent", "ops", "stock/mug"]);
        assert_eq!(missing.status.code(), Some(2));
        // A missing key is not deleted (nor is the delete recorded); a
        // chain that does not exist yet, or a task inside a chain, is not a
        // chain to write for.
        let missing = env.run(&["--json", "state", "delete", "--agent", "ops", "stock/mug"]);
        assert_eq!(missing.status.code(), Some(2));
        let said = String::from_utf8_lossy(&missing.stderr);
        assert!(said.contains("nothing to delete") && said.contains("\"kind\":\"not_found\""), "{said}");
        let root = env.submit(&["echo", "{}", "--next", r#"[{"agent": "echo"}]"#]);
        let refused = [
            (root + 100, format!("task {} does not exist", root + 100)),
            (root + 1, format!("task {} is in the chain of task {root}", root + 1)),
        ];
        env.until_idle(&[]);
        assert_eq!(env.show(root + 1)["parent_id"], root, "the chained task");
        for (chain, says) in refused {
            let out = env.run(&["state", "set", "--chain", &chain.to_string(), "k", "1"]);
            assert_eq!(out.status.code(), Some(2), "--chain {chain}");
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(said.contains(&says), "--chain {chain}: {said}");
        }
        env.ok(&["state", "set", "--chain", &root.to_string(), "note", r#"{"a":1}"#]);
        assert_eq!(
            env.json(&["state", "get", "--chain", &root.to_string(), "note"])["value"]["a"],
            1
        );

        let writes: Vec<Value> = env
            .queue()
            .events(None, 0, 100)
            .unwrap()
            .into_iter()
            .filter(|e| e.event == "state_write")
            .map(|e| {
                assert!(e.actor.starts_with("cli"), "{}", e.actor);
                e.detail
            })
            .collect();
        assert_eq!(writes.len(), 5);
        assert_eq!(writes[3]["new_version"], 0, "the delete");

        // A name with no component is stored, with a warning (ops has none
        // here; echo has).
        let warned = String::from_utf8_lossy(&env.ok_with_env(&["state", "set", "--agent", "ops", "w", "1"], &[]).stderr).to_string();
        assert!(warned.contains("warning: no agent \"ops\" in ") && warned.contains("check the spelling"), "{warned}");
        let quiet = env.ok_with_env(&["state", "set", "--agent", "echo", "w", "1"], &[]);
        assert!(quiet.stderr.is_empty(), "{}", String::from_utf8_lossy(&quiet.stderr));
        env.ok(&["state", "delete", "--agent", "ops", "w"]);
    }

    /// What a walkthrough of `colony state` found: values shown exactly as
    /// stored, keys from agents unable to drive the terminal, a full page
    /// said, long values from a file or stdin, chain reads checked like
    /// writes, operator writes findable, held writes shown for review, and
    /// a run's delete of a missing key recording nothing.
    fn operators_state_views_are_faithful_safe_and_complete(db) {
        let env = Env::on(db, &["stateful"]);
        fn state<'a>(args: &[&'a str]) -> Vec<&'a str> {
            [&["state"], args].concat()
        }

        // Values exactly as stored, in --json too.
        let big = "123456789012345678901234567890";
        env.ok(&state(&["set", "--agent", "stateful", "big", big]));
        env.ok(&state(&["set", "--agent", "stateful", "dup", r#"{"a":1,"a":2}"#]));
        let got = env.ok(&state(&["--json", "get", "--agent", "stateful", "big"]));
        assert!(got.contains(&format!(r#""value": {big}"#)), "{got}");
        let got = env.ok(&state(&["--json", "get", "--agent", "stateful", "dup"]));
        assert!(got.contains(r#""value": {"a":1,"a":2}"#), "{got}");

        // A key holding an escape sequence and a newline prints as escapes.
        let hostile = "esc\u{1b}[2J\nfake v99";
        let said = env.ok(&state(&["set", "--agent", "stateful", hostile, "1"]));
        assert!(!said.contains('\u{1b}') && said.contains(r"esc\u{1b}[2J\nfake v99: version 1"), "{said:?}");
        let listed = env.ok(&state(&["list", "--agent", "stateful"]));
        assert!(!listed.contains('\u{1b}') && listed.lines().count() == 3, "{listed:?}");

        // A full page says so; an empty one is refused.
        let out = env.run(&state(&["list", "--agent", "stateful", "--limit", "2"]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.contains("showing the first 2 entries"), "{stderr}");
        let out = env.run(&state(&["list", "--agent", "stateful"]));
        assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(env.run(&state(&["list", "--agent", "stateful", "--limit", "0"])).status.code(), Some(2));

        // Long values from a file or stdin (past a command line's limit).
        let long = serde_json::to_string(&"x".repeat(200 * 1024)).unwrap();
        let file = env.data.path().join("long.json");
        // An editor's byte-order mark and trailing line break are not stored.
        std::fs::write(&file, format!("\u{feff}{long}\n")).unwrap();
        env.ok(&state(&["set", "--agent", "stateful", "from-file", &format!("@{}", file.display())]));
        let mut stdin_set = env.cmd();
        stdin_set.args(state(&["set", "--agent", "stateful", "from-stdin", "-"])).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        let mut child = stdin_set.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), format!("{long}\r\n").as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
        for key in ["from-file", "from-stdin"] {
            assert_eq!(env.ok(&state(&["get", "--agent", "stateful", key])).trim(), long, "{key}");
            let stored = env.database.raw().value(&format!("SELECT length(value) FROM state WHERE key = '{key}'"));
            assert_eq!(stored.int(), Some(long.len() as i64), "{key}");
        }
        let out = env.run(&state(&["set", "--agent", "stateful", "k", "@/no/such/file"]));
        assert_eq!(out.status.code(), Some(2));

        // Chain reads are checked as writes are: a later task's id names the first.
        let root = env.submit(&["stateful", "{}", "--next", r#"[{"agent": "stateful"}]"#]);
        env.until_idle(&[]);
        for args in [["list", "--chain"].as_slice(), ["get", "--chain"].as_slice()] {
            let mut args = args.to_vec();
            let child = (root + 1).to_string();
            args.push(&child);
            if args[0] == "get" {
                args.push("k");
            }
            let out = env.run(&state(&args));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains(&format!("use {root}")), "{args:?}: {stderr}");
        }

        // Operators' agent-state writes are task 0's events.
        let events = env.ok(&["events", "--task", "0"]);
        assert!(events.lines().count() >= 5 && events.contains("state_write"), "{events}");

        // Held writes are shown while the task waits in review.
        let ops = serde_json::json!({"ops": [
            ["set", "agent", "held", "7"], ["set_if", "agent", "big", "8", 1], ["delete", "agent", "nothere"],
        ]});
        let held = env.submit(&["stateful", &ops.to_string(), "--review"]);
        env.until_idle(&[]);
        let shown = env.show(held);
        assert_eq!(shown["state"], "review", "{shown}");
        assert_eq!(
            shown["held_state"],
            serde_json::json!([
                {"scope": "agent", "key": "held", "value": 7, "delete": false, "if_version": null},
                {"scope": "agent", "key": "big", "value": 8, "delete": false, "if_version": 1},
                {"scope": "agent", "key": "nothere", "value": null, "delete": true, "if_version": null},
            ])
        );
        let text = env.ok(&["show", &held.to_string()]);
        assert!(text.contains("state writes held for review") && text.contains("agent big = 8 (set-if: only at version 1)") && text.contains("agent nothere deleted"), "{text}");
        env.ok(&["review", &held.to_string(), "approve"]);
        assert_eq!(env.show(held)["held_state"], serde_json::json!([]));
        // The delete of a key that was never there recorded nothing.
        let writes: Vec<String> = env.queue().events(Some(held), 0, 100).unwrap().into_iter()
            .filter(|e| e.event == "state_write").map(|e| e.detail["key"].as_str().unwrap().to_string()).collect();
        assert_eq!(writes, ["held", "big"]);
    }

    fn torture_state_counts_every_committed_increment_exactly_once(db) {
        let verdict = torture_verdict(db, &["--state"], 200);
        assert_eq!(verdict["checks"]["counter_equals_completed"], true);
        assert_eq!(verdict["counter"], 200);
        assert!(
            verdict["conflicts_retried"].as_u64().unwrap() >= 1,
            "three daemons raced: {verdict}"
        );
    }

    fn torture_effects_delivers_every_completed_tasks_key_and_no_other(db) {
        let verdict = torture_verdict(db, &["--effects"], 500);
        for check in [
            "every_completed_tasks_effect_arrived",
            "no_effect_of_another_task_arrived",
            "every_effect_sent",
        ] {
            assert_eq!(verdict["checks"][check], true, "{check}: {verdict}");
        }
        assert_eq!(verdict["effects"]["distinct_keys"], 500);
    }

    /// A proposed effect's body is shown with its control characters
    /// escaped (a carriage return let one request show as another), with
    /// the agent's headers, its first lines saying what they leave out, and
    /// whole in JSON; an unknown task or an empty page is refused; a retried
    /// effect keeps its last status and error until its next attempt.
    fn effects_are_shown_safely_and_retried_cleanly(db) {
        use colony_tests::model_server::ModelServer;
        let env = Env::on(db, &["stateful"]);
        let server = ModelServer::start();
        std::fs::write(env.agents.path().join("stateful.toml"), format!("allowed_hosts = [{:?}]\n", server.url())).unwrap();
        let url = format!("{}/pay", server.url());
        let body = "{\"amount\": 1000000}\r{\"amount\": 1}\n\u{1b}[31mred";
        let payload = serde_json::json!({"ops": [["effect", "POST", url, body]], "review": true});
        let id = env.submit(&["stateful", &payload.to_string()]);
        env.until_idle(&[]);
        let id_text = id.to_string();
        for args in [vec!["show", id_text.as_str()], vec!["effects"]] {
            let shown = env.ok(&args);
            assert!(!shown.contains('\r') && !shown.contains('\u{1b}'), "{args:?}: {shown:?}");
            assert!(shown.contains(r#"{"amount": 1000000}\r{"amount": 1}"#) && shown.contains(r"\u{1b}[31mred"), "{args:?}: {shown}");
        }
        for args in [["effects", "--task", "999"], ["effects", "--limit", "0"]] {
            assert_eq!(env.run(&args).status.code(), Some(2), "{args:?}");
        }
        let long = "{\n  \"to\": \"acct-123\",\n  \"memo\": \"refund\",\n  \"amount_cents\": 99999900\n}";
        let payload = serde_json::json!({"ops": [["effect", "POST", url, long, {"X-Request": "r-7"}]], "review": true});
        let held = env.submit(&["stateful", &payload.to_string()]).to_string();
        env.until_idle(&[]);
        let shown = env.ok(&["effects", "--task", &held]);
        assert!(
            shown.contains("X-Request: r-7")
                && shown.contains("\"memo\": \"refund\",")
                && !shown.contains("amount_cents")
                && shown.contains(&format!("… 28 more bytes (`colony effects --task {held} --json` shows the whole body)")),
            "{shown}"
        );
        let effect = &env.json(&["effects", "--task", &held])[0];
        assert_eq!(effect["body"], long, "{effect}");
        assert_eq!(effect["headers"], serde_json::json!([["content-type", "application/json"], ["X-Request", "r-7"]]), "{effect}");
        env.ok(&["cancel", &held]);

        // Refused by the receiver (a 400 fails at once), then retried.
        server.push_plain(400);
        env.ok(&["review", &id.to_string(), "approve"]);
        env.until_idle(&[]);
        let effect = &env.json(&["effects", "--task", &id.to_string()])[0];
        assert_eq!((effect["state"].as_str(), effect["status"].as_u64()), (Some("failed"), Some(400)), "{effect}");
        // As `colony effects` shows it: #ID.
        env.ok(&["effects", "retry", &format!("#{}", effect["id"])]);
        let effect = &env.json(&["effects", "--task", &id.to_string()])[0];
        assert_eq!((effect["state"].as_str(), effect["status"].as_u64(), effect["attempts"].as_u64()), (Some("pending"), Some(400), Some(0)), "{effect}");
        assert!(effect["error"].as_str().is_some_and(|e| e.contains("400")) && effect["next_at"].is_string(), "{effect}");
    }

    /// An until-idle daemon that waits for an effect's next try says so,
    /// as it does for a task scheduled later: silent, it looked hung.
    fn an_until_idle_daemon_says_it_waits_for_an_effects_next_try(db) {
        use colony_tests::model_server::ModelServer;
        let env = Env::on(db, &["stateful"]);
        let server = ModelServer::start();
        std::fs::write(env.agents.path().join("stateful.toml"), format!("allowed_hosts = [{:?}]\n", server.url())).unwrap();
        let payload = serde_json::json!({"ops": [["effect", "POST", format!("{}/later", server.url()), "1"]], "review": true});
        let id = env.submit(&["stateful", &payload.to_string()]);
        env.until_idle(&[]);
        env.ok(&["review", &id.to_string(), "approve"]);
        // Its next try a minute away, as after a few failed ones.
        env.database.raw().execute("UPDATE effects SET next_at = next_at + 60000");
        let log = env.data.path().join("daemon.log");
        let _daemon = Daemon::new(
            env.cmd()
                .args(["daemon", "--until-idle", "--poll", "100ms", "--heartbeat", "200ms"])
                .env("COLONY_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        wait_for("the daemon to say what it waits for", Duration::from_secs(20), || {
            std::fs::read_to_string(&log).unwrap().contains("waiting for 1 effect(s) to be delivered; the next try is due in")
        });
        assert_eq!(server.count(), 0);
    }

    fn effects_wait_for_review_in_show_and_are_listed_and_sent_after_approval(db) {
        use colony_tests::model_server::ModelServer;
        let env = Env::on(db, &["stateful"]);
        let server = ModelServer::start();
        let manifest = format!("allowed_hosts = [{:?}]\n", server.url());
        std::fs::write(env.agents.path().join("stateful.toml"), manifest).unwrap();
        let url = format!("{}/orders", server.url());
        let payload = serde_json::json!({"ops": [["effect", "POST", url, "{\"sku\":\"mug\",\"qty\":2}\nsecond line"]], "review": true});
        let id = env.submit(&["stateful", &payload.to_string()]);
        env.until_idle(&[]);
        let shown = env.ok(&["show", &id.to_string()]);
        assert!(
            shown.contains("effects:")
                && shown.contains("proposed  POST")
                && shown.contains("{\"sku\":\"mug\",\"qty\":2}"),
            "{shown}"
        );
        let agents = env.json(&["agents"]);
        assert_eq!(agents[0]["grants"]["allowed_hosts"], serde_json::json!([server.url()]), "{agents}");
        let listed = env.json(&["effects", "--state", "proposed"]);
        assert_eq!(listed[0]["task_id"], id);
        assert_eq!(server.count(), 0);
        let not_failed = env.run(&["--json", "effects", "retry", &listed[0]["id"].to_string()]);
        assert_eq!(not_failed.status.code(), Some(2));
        let said: Value = serde_json::from_slice(&not_failed.stderr).unwrap();
        assert!(said["error"].as_str().unwrap().contains("only a failed effect can be retried"), "{said}");
        assert_eq!(said["kind"], "conflict", "{said}");

        env.ok(&["review", &id.to_string(), "approve"]);
        // Delivered straight to the granted origin even with a proxy in the
        // environment: a proxy would get the agent's secrets and answer for
        // a target the address check never saw.
        let proxy = ModelServer::start();
        let daemon = ["daemon", "--until-idle", "--poll", "100ms", "--heartbeat", "200ms"];
        let out = env.ok_with_env(&daemon, &[("HTTP_PROXY", &proxy.url()), ("http_proxy", &proxy.url()), ("ALL_PROXY", &proxy.url())]);
        assert_eq!(proxy.count(), 0, "the effect went through the proxy");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("effects: 1 sent, 0 failed for good"), "{said}");
        let status = env.ok(&["status"]);
        assert!(status.contains("effects: 1 sent\n"), "{status}");
        assert_eq!(env.json(&["status"])["effects_by_state"], serde_json::json!({"sent": 1}));
        let sent = env.json(&["show", &id.to_string()]);
        assert_eq!(sent["effects"][0]["state"], "sent", "{sent}");
        assert_eq!(
            server.last_request().header("idempotency-key"),
            Some(format!("colony-{id}-1").as_str())
        );
    }
}

/// A run whose spawns would take its chain past the cap fails as invalid
/// output through a daemon (the batch that held it is stored run by run),
/// and spawns nothing.
#[test]
fn a_run_spawning_past_its_chains_cap_fails_and_spawns_nothing() {
    let env = Env::new(&["stateful"]);
    let id = env.submit(&[
        "stateful",
        r#"{"spawn": [{}, {}, {}]}"#,
        "--max-attempts",
        "1",
    ]);
    let cap = colony::queue::MAX_CHAIN_TASKS;
    env.database.raw().execute(&format!(
        "UPDATE tasks SET chain_tasks = {} WHERE id = {id}",
        cap - 2
    ));
    env.until_idle(&[]);
    let shown = env.json(&["show", &id.to_string()]);
    assert_eq!(shown["state"], "failed", "{shown}");
    assert_eq!(shown["error"]["kind"], "invalid_output", "{shown}");
    assert!(
        shown["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("would hold {} tasks", cap + 1)),
        "{shown}"
    );
    assert!(env.queue().children(id).unwrap().is_empty());
}

/// A guest logging in a loop cannot flood the daemon's own log (16 KiB of
/// each run's lines are copied there; the task log keeps its own cap), nor
/// forge a host line with an embedded line break.
#[test]
fn a_guests_log_lines_reach_the_hosts_log_bounded_and_escaped() {
    let env = Env::new(&["loud"]);
    let id = env.submit(&["loud", "{}"]);
    let out = env.ok_with_env(
        &["daemon", "--until-idle", "--poll", "100ms"],
        &[("COLONY_LOG", "info")],
    );
    assert_eq!(env.queue().get(id).unwrap().state, State::Complete);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.len() < 64 << 10,
        "the daemon logged {} bytes",
        said.len()
    );
    assert!(
        said.contains("this run's further log lines are in its task log only"),
        "{said}"
    );
    assert!(
        said.contains("\\n2026-01-01T00:00:00Z ERROR"),
        "the break is escaped"
    );
    assert!(
        !said.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "a forged line"
    );
    // In the task's log each line of a message carries its level.
    let shown = env.ok(&["show", &id.to_string()]);
    assert!(
        shown.contains("  [info] 2026-01-01T00:00:00Z ERROR"),
        "{shown}"
    );
    assert!(
        !shown
            .lines()
            .any(|l| l.trim_start().starts_with("2026-01-01T00:00:00Z")),
        "a forged line: {shown}"
    );
}

/// A component dropped into a running daemon's folder is picked up within
/// seconds (the folder is looked at every 2 s, compiled beside the loop),
/// not at the next poll, 60 s by default; the agents already loaded keep
/// running meanwhile.
#[test]
fn a_component_added_to_a_running_daemon_is_picked_up_within_seconds() {
    let env = Env::new(&["echo"]);
    let daemon = env
        .cmd()
        .args(["daemon", "--heartbeat", "500ms"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(env.data.path().join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let waiting = env.submit(&["permanent", "{}"]);
    let echoed = env.submit(&["echo", "{}"]);
    let log = || std::fs::read_to_string(env.data.path().join("daemon.log")).unwrap_or_default();
    wait_for("the loaded agent ran", Duration::from_secs(20), || {
        env.queue().get(echoed).unwrap().state == State::Complete
    });
    std::fs::copy(
        colony_tests::guest_path("permanent"),
        env.agents.path().join("permanent.wasm"),
    )
    .unwrap();
    let added = Instant::now();
    wait_for(
        "the added agent ran its task",
        Duration::from_secs(20),
        || env.queue().get(waiting).unwrap().state == State::Failed,
    );
    assert!(added.elapsed() < Duration::from_secs(20));
    assert!(!log().contains("ERROR"), "{}", log());
    signal(&daemon, "-TERM");
    let mut daemon = daemon;
    daemon.wait().unwrap();
}

/// The configuration is read at start: a daemon says when the file
/// changes under it (and whether the change would load) rather than
/// ignoring it without a word, and a manifest changed later that grants an
/// alias the configuration lacks is warned about as at start.
#[test]
fn a_daemon_says_when_its_configuration_changes_and_what_a_new_grant_lacks() {
    let env = Env::new(&["echo"]);
    let model = |alias: &str| {
        format!(
            "[models.{alias}]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\napi_key_env = \"FAST_KEY\"\n"
        )
    };
    let config = env.file("colony.toml", model("fast"));
    let log = env.data.path().join("daemon.log");
    let mut daemon = Daemon::new(
        env.cmd()
            .env("COLONY_CONFIG", &config)
            .env("FAST_KEY", "sk-test")
            .args(["daemon", "--heartbeat", "500ms"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let said = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(what)
    };
    let echoed = env.submit(&["echo", "{}"]);
    wait_for("the daemon to run a task", Duration::from_secs(20), || {
        env.queue().get(echoed).unwrap().state == State::Complete
    });

    std::fs::write(&config, model("fast") + &model("smart")).unwrap();
    wait_for("the change to be noticed", Duration::from_secs(20), || {
        said(
            "colony.toml changed; this daemon goes on with what it read at start: restart it to apply the change",
        )
    });
    std::fs::write(&config, "[models.fast]\napi = \"cohere\"\n").unwrap();
    wait_for(
        "the broken change to be noticed",
        Duration::from_secs(20),
        || {
            said("colony.toml changed and does not load")
                && said("will refuse to start again until the file is fixed")
        },
    );

    std::fs::write(
        env.agents.path().join("echo.toml"),
        "models = [\"fast\", \"smart\"]\n",
    )
    .unwrap();
    wait_for(
        "the reloaded grant to be warned about",
        Duration::from_secs(20),
        || {
            said(
                "granted the model alias \"smart\", which this host's configuration (read at start) does not declare",
            )
        },
    );
    assert!(
        !said("alias \"fast\", which"),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    signal(&daemon, "-TERM");
    assert!(daemon.wait().unwrap().success());
}

/// An until-idle daemon waits for a task scheduled for later (as for a
/// retry's backoff), and says what it waits for rather than looking hung.
#[test]
fn an_until_idle_daemon_says_it_waits_for_a_scheduled_task() {
    use std::io::{BufRead, BufReader};
    let env = Env::new(&["echo"]);
    let id = env.submit(&["echo", "{}", "--in", "1h"]);
    let mut daemon = env
        .cmd()
        .args(["daemon", "--until-idle", "--poll", "100ms"])
        .env("COLONY_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stderr = daemon.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let _ = lines_tx.send(line.unwrap());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let said = loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the daemon said what it waits for");
        if line.contains("waiting for") {
            break line;
        }
    };
    assert!(
        said.contains("waiting for 1 task(s) scheduled for later; the next is due in 59m"),
        "{said}"
    );
    assert!(daemon.try_wait().unwrap().is_none(), "it waits");
    signal(&daemon, "-TERM");
    assert!(daemon.wait().unwrap().success());
    assert_eq!(env.queue().get(id).unwrap().state, State::Pending);
}

/// An until-idle daemon cannot send the effects of an agent it has not
/// loaded (their allow-list and secrets are that agent's): it leaves them,
/// and says so, as it does for tasks.
#[test]
fn an_until_idle_daemon_names_effects_left_for_an_agent_it_has_not_loaded() {
    let env = Env::new(&["stateful"]);
    let agents = env.agents.path();
    std::fs::write(
        agents.join("stateful.toml"),
        "allowed_hosts = [\"http://127.0.0.1:9\"]\n",
    )
    .unwrap();
    let payload = r#"{"ops": [["effect", "POST", "http://127.0.0.1:9/x", "1"]], "review": true}"#;
    let id = env.submit(&["stateful", payload]);
    env.until_idle(&[]);
    assert_eq!(env.show(id)["state"], "review");
    std::fs::remove_file(agents.join("stateful.wasm")).unwrap();
    env.ok(&["review", &id.to_string(), "approve"]);
    let out = env.ok_with_env(&["daemon", "--until-idle", "--poll", "100ms"], &[]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("1 effect(s) left undelivered for agent \"stateful\""),
        "{said}"
    );
    let effects = env.queue().effects(Some(id), None, 10).unwrap();
    assert_eq!(effects[0].state, "pending", "left, not lost");
}

// Not about the driver: the demo runs on a SQLite file of its own in --dir.
#[test]
fn the_demo_runs_the_store_pipeline_and_writes_pages() {
    let env = Env::new(&[]);
    let agents = concat!(env!("CARGO_MANIFEST_DIR"), "/../agents");
    let out_dir = env.data.path().join("demo");
    let stdout = env.ok(&[
        "--agents",
        agents,
        "demo",
        "--dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(stdout.contains("Every task ended as expected"), "{stdout}");
    // The flaky supplier refuses twice (a set-if race on ops' listing count
    // may add an attempt); the state still counts each listing once.
    // Only the flaky product's ops is said to be retried with backoff; one
    // that lost the race says so (both were "retried with backoff").
    assert_eq!(
        stdout.matches("attempts (retried with backoff)").count(),
        1,
        "{stdout}"
    );
    assert!(
        stdout.contains("listed_count                     v3  3"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Marketing copy uses the built-in templates"),
        "{stdout}"
    );
    assert!(stdout.contains("1 revision(s) after review"), "{stdout}");
    assert!(stdout.contains("The shop received 3 listings"), "{stdout}");
    assert!(
        stdout.contains("The flaky supplier (a loopback API ops asks over HTTP) was asked"),
        "{stdout}"
    );
    let page = std::fs::read_to_string(out_dir.join("pages/lumen-desk-lamp-co.html")).unwrap();
    assert_well_formed_html(&page);
    assert!(
        page.contains("Lumen &lt;Desk&gt; Lamp &amp; Co"),
        "the product name is escaped"
    );
    assert!(!page.contains("<Desk>"));
    for name in ["acme-travel-mug", "trail-socks"] {
        assert_well_formed_html(
            &std::fs::read_to_string(out_dir.join(format!("pages/{name}.html"))).unwrap(),
        );
    }

    // With --json the story goes to stderr, and stdout is one summary.
    let out = env
        .cmd()
        .args(["--json", "--agents", agents, "demo", "--dir"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("Every task ended as expected"), "{stderr}");
    // COLONY_DB (set by the harness) is not the demo's queue, and it says so.
    assert!(stderr.contains("COLONY_DB) "), "{stderr}");
    assert!(stderr.contains("is not used"), "{stderr}");
    assert!(!env.db().exists(), "the demo wrote to COLONY_DB");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(summary["problems"], serde_json::json!([]));
    assert_eq!(summary["pages"].as_array().unwrap().len(), 3, "{summary}");
    let tasks = summary["tasks"].as_array().unwrap();
    assert!(tasks.len() >= 12, "{summary}");
    assert!(tasks.iter().all(|t| t["state"] == "complete"), "{summary}");
}

// Not about the driver: a broken configuration is refused whatever the queue.
#[test]
fn a_broken_model_configuration_is_refused_naming_file_alias_and_key() {
    let env = Env::new(&["echo"]);
    let config = env.file(
        "colony.toml",
        "[models.fast]\napi = \"cohere\"\nbase_url = \"x\"\nmodel = \"m\"\n",
    );
    // A daemon on this configuration, refused: what it said.
    let refused_with = |vars: &[(&str, &str)]| {
        let out = env
            .cmd()
            .env("COLONY_CONFIG", &config)
            .envs(vars.iter().copied())
            .args(["daemon", "--until-idle"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        stderr
    };
    let stderr = refused_with(&[]);
    assert!(
        stderr.contains("colony.toml")
            && stderr.contains("[models.fast]")
            && stderr.contains("`api`"),
        "{stderr}"
    );
    assert!(
        !env.db().exists(),
        "a daemon refusing to start created the database"
    );
    std::fs::write(&config, "[models.fast]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\napi_key_env = \"NOT_SET_ANYWHERE\"\n").unwrap();
    let stderr = refused_with(&[]);
    assert!(stderr.contains("NOT_SET_ANYWHERE"), "{stderr}");
    // The commands an operator checks a host with say so too, and go on
    // (they found nothing wrong; the daemon then refused to start).
    for command in ["status", "agents"] {
        let out = env
            .cmd()
            .env("COLONY_CONFIG", &config)
            .arg(command)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{command}: {said}");
        assert!(
            said.contains("NOT_SET_ANYWHERE")
                && said.contains("`colony daemon` refuses to start until it is fixed"),
            "{command}: {said}"
        );
    }
    // A key a header cannot carry (a second line pasted with it) went out
    // empty: refused at start, the key itself not said.
    let stderr = refused_with(&[("NOT_SET_ANYWHERE", "sk-SECRET\nsecond-line")]);
    assert!(
        stderr.contains("[models.fast]")
            && stderr.contains("cannot be sent in an HTTP header: character 10 is a line break")
            && !stderr.contains("SECRET"),
        "{stderr}"
    );

    // Not TOML at all: where.
    std::fs::write(&config, "[models.fast]\napi = \"openai\n").unwrap();
    let refused = |how: &[&str], vars: &[(&str, &str)]| {
        let args = [how, &["daemon", "--until-idle"][..]].concat();
        let out = env
            .cmd()
            .args(&args)
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = refused(&["--config", &config], &[]);
    assert!(
        said.contains("not valid TOML") && said.contains("line 2"),
        "{said}"
    );
    // A file named on purpose that is not there is not "no models".
    let missing = env.data.path().join("typo.toml");
    let missing = missing.to_str().unwrap();
    for said in [
        refused(&["--config", missing], &[]),
        refused(&[], &[("COLONY_CONFIG", missing)]),
    ] {
        assert!(
            said.contains(&format!(
                "--config {missing} (or COLONY_CONFIG): no such file"
            )),
            "{said}"
        );
    }
    // Also by the commands that load no models (they ignored it).
    for command in [&["list"][..], &["submit", "echo", "{}"], &["status"]] {
        let out = env.run(&[&["--config", missing][..], command].concat());
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {said}");
        assert!(said.contains("(or COLONY_CONFIG): no such file"), "{said}");
    }
}

// SQLite only: it is about the file (made immutable with chattr, or stamped
// with a newer `user_version`); the PostgreSQL counterpart follows.
#[test]
fn a_daemon_on_a_database_it_cannot_write_stops_with_one_message() {
    let env = Env::new(&["echo"]);
    env.submit(&["echo", "{}"]);
    // Root ignores file modes, so make the file immutable; where chattr is
    // not allowed, a schema newer than this build is the permanent error.
    let immutable = Command::new("chattr")
        .args(["+i", env.database.path().to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success());
    if !immutable {
        env.database.set_schema_version(99);
    }
    let started = Instant::now();
    let out = env
        .cmd()
        .args(["daemon", "--poll", "100ms"])
        .output()
        .unwrap();
    if immutable {
        Command::new("chattr")
            .args(["-i", env.database.path().to_str().unwrap()])
            .status()
            .unwrap();
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = if immutable {
        "readonly database"
    } else {
        "newer than this colony knows"
    };
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it stopped instead of spinning"
    );
    assert!(stderr.contains(expected), "{stderr}");
    assert!(!stderr.contains("will retry"), "no retry loop: {stderr}");
}

// PostgreSQL only: the counterpart of the test above. A schema from a newer
// colony (`colony_schema`), or a database that only allows reads, stops the
// daemon with exit 1 and one message instead of a retry loop.
#[test]
fn a_daemon_on_a_postgres_database_it_cannot_use_exits_1_with_one_message() {
    for (case, expected) in [
        ("a newer schema", "newer than this colony knows"),
        ("a read-only database", "read-only transaction"),
    ] {
        let Some(db) = TestDb::postgres() else { return };
        let env = Env::on(db, &["echo"]);
        env.submit(&["echo", "{}"]);
        if case == "a newer schema" {
            env.database.set_schema_version(99);
        } else {
            let name = env.database.url().rsplit('/').next().unwrap().to_string();
            env.database.raw().execute(&format!(
                "ALTER DATABASE {name} SET default_transaction_read_only = on"
            ));
        }
        let started = Instant::now();
        let out = env
            .cmd()
            .args(["daemon", "--poll", "100ms"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{case}: {stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{case}: it stopped instead of spinning"
        );
        assert!(stderr.contains(expected), "{case}: {stderr}");
        assert!(
            !stderr.contains("will retry"),
            "{case}: no retry loop: {stderr}"
        );
    }
}

// Needs no PostgreSQL: nothing listens on port 1. Every command fails at
// once with exit 1, naming the host and the database, never the password.
#[test]
fn an_unreachable_postgres_server_fails_with_1_naming_host_and_database() {
    let env = Env::new(&["echo"]);
    let url = "postgres://nobody@127.0.0.1:1/x";
    let with_password = "postgres://nobody:hunter2@127.0.0.1:1/x";
    let cases: &[&[&str]] = &[
        &["--db", url, "list"],
        &["--db", url, "submit", "echo", "{}"],
        &["--db", url, "daemon", "--until-idle", "--poll", "100ms"],
        &["--db", with_password, "show", "1"],
    ];
    for args in cases {
        let started = Instant::now();
        let out = env.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "colony {args:?}: {stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "colony {args:?} gave up instead of waiting"
        );
        assert!(
            stderr.contains("127.0.0.1:1") && stderr.contains("database x"),
            "colony {args:?} should name the host and the database: {stderr}"
        );
        assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
    }
    // --help, where COLONY_DB is what the README has an operator export.
    for help in [&["--help"][..], &["events", "--help"], &["daemon", "-h"]] {
        let out = env.ok_with_env(help, &[("COLONY_DB", with_password)]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("[env: COLONY_DB]"), "{help:?}: {said}");
        assert!(
            !said.contains("hunter2"),
            "{help:?}: the password leaked: {said}"
        );
    }
}

/// Every file under `dir`, as paths relative to it, sorted.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    files.sort();
    files
}

#[test]
fn wit_writes_exactly_the_wit_of_the_repository() {
    let env = Env::new(&[]);
    let out = env.data.path().join("wit");
    env.ok(&["wit", "--out", out.to_str().unwrap()]);
    let repo_wit = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../wit"));
    assert_eq!(files_under(&out), files_under(repo_wit), "the same files");
    for file in files_under(repo_wit) {
        assert_eq!(
            std::fs::read(out.join(&file)).unwrap(),
            std::fs::read(repo_wit.join(&file)).unwrap(),
            "{} differs",
            file.display()
        );
    }
    // --json lists what it wrote.
    let again: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "wit", "--out", out.to_str().unwrap()])).unwrap();
    assert_eq!(
        again["wrote"].as_array().unwrap().len(),
        files_under(repo_wit).len(),
        "{again}"
    );
    // A file where the folder should be: bad input, left as it was.
    let file = env.file("afile", "mine");
    let refused = env.run(&["wit", "--out", &file]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains("that is a file; give a directory"), "{said}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    // So are init's and bench's (they said "Not a directory (os error 20)", exit 1).
    for args in [
        &["init", &file][..],
        &["bench", "--tasks", "5", "--dir", &file],
    ] {
        let refused = env.run(args);
        let said = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{args:?}: {said}");
        assert!(
            said.contains("that is a file; give a directory"),
            "{args:?}: {said}"
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
}

#[test]
fn init_sets_up_a_folder_that_runs_and_never_overwrites() {
    let env = Env::new(&[]);
    let dir = env.data.path().join("shop");
    // The default agents directory (the test environment names another).
    let init = |args: &[&str]| env.ok_with_env(args, &[("COLONY_AGENTS", "agents")]).stdout;
    let stdout = String::from_utf8(init(&["init", dir.to_str().unwrap()])).unwrap();
    assert!(stdout.contains("colony daemon --until-idle"), "{stdout}");
    for file in [
        "agents/design.wasm",
        "agents/code.wasm",
        "agents/marketing.wasm",
        "agents/marketing.toml",
        "agents/ops.wasm",
        "colony.toml",
    ] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    // What it wrote runs: the folder's agents load, and a task completes.
    let agents = dir.join("agents");
    let db = dir.join("colony.db");
    let config = dir.join("colony.toml");
    let (agents, db, config) = (
        agents.to_str().unwrap(),
        db.to_str().unwrap(),
        config.to_str().unwrap(),
    );
    let vars = [
        ("COLONY_AGENTS", agents),
        ("COLONY_DB", db),
        ("COLONY_CONFIG", config),
    ];
    let run = |args: &[&str]| String::from_utf8(env.ok_with_env(args, &vars).stdout).unwrap();
    let listed: serde_json::Value = serde_json::from_str(&run(&["--json", "agents"])).unwrap();
    let loaded: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["loaded"] == true)
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(loaded, ["code", "design", "marketing", "ops"]);
    // What each may reach is listed with it (never a secret's value).
    let marketing = &listed.as_array().unwrap()[2];
    assert_eq!(marketing["grants"]["models"], serde_json::json!(["copy"]));
    assert_eq!(marketing["grants"]["token_budget"], 20000);
    assert_eq!(marketing["grants"]["allowed_hosts"], serde_json::json!([]));
    assert!(
        run(&["agents"]).contains("; models copy (budget 20000 tokens)"),
        "{}",
        run(&["agents"])
    );
    run(&[
        "submit",
        "design",
        r#"{"name":"Mug","audience":"commuters","features":["hot"],"price_cents":900,"currency":"USD"}"#,
    ]);
    run(&["daemon", "--until-idle", "--poll", "100ms"]);
    let tasks: serde_json::Value = serde_json::from_str(&run(&["--json", "list"])).unwrap();
    assert!(
        tasks
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["state"] == "complete"),
        "{tasks}"
    );

    // A second init refuses, names the files, and changes nothing.
    std::fs::write(dir.join("colony.toml"), "# mine\n").unwrap();
    let again = env
        .cmd()
        .args(["init", dir.to_str().unwrap()])
        .env("COLONY_AGENTS", "agents")
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("colony.toml") && stderr.contains("design.wasm"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("colony.toml")).unwrap(),
        "# mine\n"
    );

    // The agents directory and configuration the global options name are
    // where init writes (a user with COLONY_AGENTS set found the daemon
    // loading none of the agents init had written into agents/).
    let other = env.data.path().join("other");
    let listed = init(&[
        "--json",
        "--agents",
        "fleet",
        "--config",
        "conf/colony.toml",
        "init",
        other.to_str().unwrap(),
    ]);
    let listed: serde_json::Value = serde_json::from_slice(&listed).unwrap();
    let wrote: Vec<&str> = listed["wrote"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(wrote.len(), 6, "{listed}");
    for file in [
        "fleet/design.wasm",
        "fleet/marketing.toml",
        "conf/colony.toml",
    ] {
        let path = other.join(file);
        assert!(path.is_file(), "{file}");
        assert!(wrote.contains(&path.to_str().unwrap()), "{file}: {listed}");
    }
    assert!(!other.join("agents").exists() && !other.join("colony.toml").exists());

    // The next steps it prints name those folders, and work as printed
    // from the folder (they said plain `colony daemon`, which found none
    // of the agents and left the task waiting).
    let third = env.data.path().join("third");
    let printed = init(&[
        "--agents",
        "fleet",
        "--config",
        "conf/colony.toml",
        "init",
        third.to_str().unwrap(),
    ]);
    let printed = String::from_utf8(printed).unwrap();
    let colony = "colony --agents fleet --config conf/colony.toml";
    for next in [" submit design ", " daemon --until-idle", " serve"] {
        assert!(
            printed.contains(&format!("{colony}{next}")),
            "{next}: {printed}"
        );
    }
    let listed = env
        .cmd()
        .current_dir(&third)
        .env_remove("COLONY_AGENTS")
        .args([
            "--json",
            "--agents",
            "fleet",
            "--config",
            "conf/colony.toml",
            "agents",
        ])
        .output()
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["loaded"] == true)
            .count(),
        4,
        "{listed}"
    );
}

/// From an empty folder, and again in the same `--dir` (a second run
/// appended a second `allowed_hosts` to its copy of ops's manifest).
#[test]
fn the_demo_runs_from_an_empty_folder_and_again() {
    let env = Env::new(&[]);
    let empty = env.data.path().join("nothing-here");
    std::fs::create_dir(&empty).unwrap();
    let out_dir = env.data.path().join("demo");
    for run in 1..=2 {
        let stdout = env.ok(&[
            "--agents",
            empty.to_str().unwrap(),
            "demo",
            "--dir",
            out_dir.to_str().unwrap(),
        ]);
        assert!(
            stdout.contains("Every task ended as expected"),
            "run {run}: {stdout}"
        );
    }
    assert!(
        std::fs::read_dir(&empty).unwrap().next().is_none(),
        "the demo wrote into the agents folder"
    );
}

/// `demo --dir .` in a project: the demo deletes its folder's colony.db and
/// writes its agents into its agents/ (which truncated the project's own
/// components to nothing and deleted its queue). Refused, nothing touched.
#[test]
fn the_demo_refuses_a_folder_holding_a_queue_or_the_agents_it_copies() {
    let env = Env::new(&["echo"]);
    let project = env.data.path().join("project");
    let agents = project.join("agents");
    std::fs::create_dir_all(&agents).unwrap();
    let echo = std::fs::read(env.agents.path().join("echo.wasm")).unwrap();
    std::fs::write(agents.join("design.wasm"), &echo).unwrap();
    let db = project.join("colony.db");
    let id: i64 = env
        .ok(&["--db", db.to_str().unwrap(), "submit", "echo", "{}"])
        .trim()
        .parse()
        .unwrap();

    let code_and_err = |args: &[&str]| {
        let out = env.cmd().args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let demo_in = |agents: &Path, dir: &Path| {
        code_and_err(&[
            "--agents",
            agents.to_str().unwrap(),
            "demo",
            "--dir",
            dir.to_str().unwrap(),
        ])
    };
    let (code, err) = code_and_err(&["demo", "--dir", project.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("colony.db exists and was not made by `colony demo`"),
        "{err}"
    );
    let kept = env.json(&["--db", db.to_str().unwrap(), "show", &id.to_string()]);
    assert_eq!(kept["id"], id, "the project's queue is kept");
    // A file where the folder should be is named (it said "File exists").
    let (code, err) = code_and_err(&["demo", "--dir", db.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("that is a file, not a folder"), "{err}");

    std::fs::remove_file(&db).unwrap();
    let (code, err) = demo_in(&agents, &project);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("which is the --agents folder"), "{err}");
    assert_eq!(
        std::fs::read(agents.join("design.wasm")).unwrap(),
        echo,
        "the component is untouched"
    );
    assert!(!project.join("colony.db").exists() && !project.join(".colony-demo").exists());

    // With the agents from elsewhere: the project's own agents/ is not the
    // demo's to write over.
    let elsewhere = env.data.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let (code, err) = demo_in(&elsewhere, &project);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("holds files the demo did not write"), "{err}");
    assert_eq!(std::fs::read(agents.join("design.wasm")).unwrap(), echo);

    // Nor is the agents folder itself the demo's folder.
    let (code, err) = demo_in(&agents, &agents);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("is the --agents folder: the demo would write its queue"),
        "{err}"
    );
    assert!(!agents.join("colony.db").exists() && !agents.join("pages").exists());

    // A folder the demo made is the demo's, until a queue of the user's
    // takes the place of the demo's database.
    let demo_dir = env.data.path().join("demo-here");
    let demo = |dir: &Path| demo_in(&elsewhere, dir);
    assert_eq!(demo(&demo_dir).0, Some(0));
    assert_eq!(demo(&demo_dir).0, Some(0), "again in its own folder");
    // A folder an older build's demo made (no mark) is still the demo's.
    std::fs::remove_file(demo_dir.join(".colony-demo")).unwrap();
    assert_eq!(demo(&demo_dir).0, Some(0), "a folder of an older demo");
    let demo_db = demo_dir.join("colony.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", demo_db.display()));
    }
    let mine: i64 = env
        .ok(&["--db", demo_db.to_str().unwrap(), "submit", "echo", "{}"])
        .trim()
        .parse()
        .unwrap();
    let (code, err) = demo(&demo_dir);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("colony.db exists and was not made by `colony demo`"),
        "{err}"
    );
    assert_eq!(
        env.json(&["--db", demo_db.to_str().unwrap(), "show", &mine.to_string()])["id"],
        mine
    );
}

/// Runs `colony bench` with `args` in a directory of its own; answers the
/// JSON line of each round and the whole output, for messages.
fn bench_rounds(args: &[&str]) -> (Vec<serde_json::Value>, String) {
    let env = Env::new(&[]);
    let dir = env.data.path().join("bench");
    let mut all = vec!["bench", "--dir", dir.to_str().unwrap()];
    all.extend(args);
    let out = env.ok(&all);
    let rounds = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    (rounds, out)
}

/// `bench --history`: a fresh round, the round over stored history, and a
/// fresh round again; the history round is judged against the two around it.
#[test]
fn bench_with_history_brackets_it_with_fresh_rounds() {
    let (rounds, out) = bench_rounds(&["--tasks", "100", "--history", "500"]);
    let history: Vec<u64> = rounds
        .iter()
        .map(|r| r["history_rows"].as_u64().unwrap())
        .collect();
    assert_eq!(history, [0, 500, 0], "{out}");
    assert!(rounds.iter().all(|r| r["completed"] == 100), "{out}");
    let rate = |r: &serde_json::Value| r["tasks_per_second"].as_f64().unwrap();
    let around = [rate(&rounds[0]), rate(&rounds[2])];
    assert_eq!(
        rounds[1]["fresh_tasks_per_second_around"],
        serde_json::json!(around)
    );
    let ratio = rounds[1]["history_ratio"].as_f64().unwrap();
    assert!((ratio - rate(&rounds[1]) / ((around[0] + around[1]) / 2.0)).abs() < 1e-9);
}

/// The global `--sync` (or COLONY_SYNC) is what the queue opens with; bench
/// reports it.
#[test]
fn sync_full_is_asked_for_by_flag_or_environment() {
    let (rounds, out) = bench_rounds(&["--tasks", "20", "--sync", "full"]);
    assert_eq!(rounds[0]["sync"], "full", "{out}");
    let (rounds, out) = bench_rounds(&["--tasks", "20"]);
    assert_eq!(rounds[0]["sync"], "normal", "{out}");
    let env = Env::new(&["echo"]);
    let said = env.ok_with_env(
        &["--json", "bench", "--tasks", "20"],
        &[("COLONY_SYNC", "full")],
    );
    let report: serde_json::Value = serde_json::from_slice(&said.stdout).unwrap();
    assert_eq!(report["sync"], "full", "{report}");
}

/// `bench --capabilities` on a small drain: the state rounds complete every
/// task (the bench checks their keys were written) and say what a get and
/// a set cost; the model figures come from a loopback provider.
#[test]
fn bench_measures_what_the_capabilities_cost() {
    let (rounds, out) = bench_rounds(&["--tasks", "200", "--capabilities", "--json"]);
    let report = rounds
        .into_iter()
        .find(|r| r.get("state_get_set_ratio").is_some())
        .unwrap_or_else(|| panic!("no capability figures in {out}"));
    let ratios = report["state_get_set_ratios"].as_array().unwrap();
    assert_eq!(ratios.len(), 3, "{report}");
    assert!(ratios.iter().all(|r| r.as_f64().unwrap() > 0.0), "{report}");
    for rate in [
        "state_drain_without_per_second",
        "state_drain_get_set_per_second",
    ] {
        assert!(report[rate].as_f64().unwrap() > 0.0, "{rate}: {report}");
    }
    assert!(
        report["state_per_task_us"]["get_set"]["writer_sql"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(report["model_calls_measured"], 299, "{report}");
}

/// `colony agents` lists the files of the folder that are meant for it but
/// are no agent, with why: a manifest with no component beside it, a
/// component named `.WASM`. It said nothing of them.
#[test]
fn agents_lists_the_files_it_ignores() {
    let env = Env::new(&["echo"]);
    std::fs::write(env.agents.path().join("orphan.toml"), "timeout = \"1s\"\n").unwrap();
    std::fs::copy(
        env.agents.path().join("echo.wasm"),
        env.agents.path().join("upper.WASM"),
    )
    .unwrap();
    let text = env.ok(&["agents"]);
    assert!(
        text.contains("orphan.toml    IGNORED  no agent's manifest")
            && text
                .contains("upper.WASM     IGNORED  not loaded: an agent's file name ends in .wasm"),
        "{text}"
    );
    let listed = env.json(&["agents"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "orphan.toml", "upper.WASM"], "{listed}");
    assert_eq!(listed[1]["stray"], true, "{listed}");
    assert_eq!(listed[1]["loaded"], false, "{listed}");
}

/// The oldest ready task's wait counts from when it became ready, not from
/// its creation: a task retried, or delayed with --in, has waited since.
#[test]
fn a_ready_tasks_wait_counts_from_when_it_became_ready() {
    let env = Env::new(&[]);
    let id = env.submit(&["echo", "{}"]);
    // Created an hour ago (say, retried just now).
    env.database.raw().execute(&format!(
        "UPDATE tasks SET created_at = created_at - 3600000 WHERE id = {id}"
    ));
    let status = env.json(&["status"]);
    let age = status["oldest_ready_age_ms"].as_i64().unwrap();
    assert!((0..60_000).contains(&age), "{status}");
}

/// `status` says which agents' waiting tasks no daemon on this agents
/// folder can serve: no component here, or one that does not load (their
/// ready tasks looked merely slow).
#[test]
fn status_names_agents_whose_tasks_no_component_here_serves() {
    let env = Env::new(&["echo"]);
    env.submit(&["echo", "{}"]);
    env.submit(&["nowhere", "{}"]);
    std::fs::write(env.agents.path().join("broken.wasm"), b"not a component").unwrap();
    env.submit(&["broken", "{}"]);
    let text = env.ok(&["status"]);
    let line = |agent: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{agent} ")))
            .unwrap_or_else(|| panic!("{agent} in\n{text}"))
            .to_string()
    };
    assert!(!line("echo").contains('('), "{text}");
    assert!(
        line("nowhere").contains("nowhere.wasm: its tasks wait for a daemon that has one"),
        "{text}"
    );
    assert!(
        line("broken").contains("broken.wasm does not load: see below"),
        "{text}"
    );
    let json = env.json(&["status"]);
    let unserved = &json["unserved_agents"];
    assert_eq!(unserved.as_object().unwrap().len(), 2, "{json}");
    assert_eq!(unserved["broken"]["reason"], "broken", "{json}");
    assert_eq!(unserved["nowhere"]["reason"], "missing", "{json}");
    assert!(
        unserved["nowhere"]["component"]
            .as_str()
            .unwrap()
            .ends_with("nowhere.wasm"),
        "{json}"
    );
    // Where there is no agents folder (an operator's machine), nothing is said.
    let elsewhere = env.ok_with_env(
        &["--json", "--agents", "/nonexistent-agents", "status"],
        &[],
    );
    let elsewhere: serde_json::Value = serde_json::from_slice(&elsewhere.stdout).unwrap();
    assert_eq!(
        elsewhere["unserved_agents"],
        serde_json::json!({}),
        "{elsewhere}"
    );
}

/// An agent whose HTTP secret names a provider key of colony.toml is
/// refused by every command that loads agents, not only by those that load
/// the models too: `bench --agent` ran it, sending the key to the server its
/// manifest chose, and `status` listed it as loaded.
#[test]
fn an_agent_naming_a_provider_key_as_its_secret_is_refused_everywhere() {
    let env = Env::new(&["fetcher"]);
    let config = env.file(
        "colony.toml",
        "[models.fast]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\napi_key_env = \"CLI_TEST_PROVIDER_KEY\"\n",
    );
    let manifest = env.agents.path().join("fetcher.toml");
    std::fs::write(
        &manifest,
        "allowed_hosts = [\"http://127.0.0.1:9\"]\n[secrets.\"http://127.0.0.1:9\"]\nheader = \"Authorization\"\nenv = \"CLI_TEST_PROVIDER_KEY\"\n",
    )
    .unwrap();
    let with_key = |args: &[&str]| {
        env.cmd()
            .env("COLONY_CONFIG", &config)
            .env("CLI_TEST_PROVIDER_KEY", "sk-provider")
            .args(args)
            .output()
            .unwrap()
    };
    let refusal = "holds one of this host's own credentials";

    let status = with_key(&["--json", "status"]);
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let fetcher = &status["agents"][0];
    assert_eq!(fetcher["name"], "fetcher", "{status}");
    assert_eq!(fetcher["loaded"], false, "{status}");
    assert!(
        fetcher["reason"].as_str().unwrap().contains(refusal),
        "{status}"
    );

    let fetcher_wasm = env.agents.path().join("fetcher.wasm");
    let bench = with_key(&[
        "bench",
        "--agent",
        fetcher_wasm.to_str().unwrap(),
        "--runs",
        "1",
    ]);
    let said = String::from_utf8_lossy(&bench.stderr);
    assert_eq!(bench.status.code(), Some(2), "{said}");
    assert!(said.contains(refusal), "{said}");
}

#[test]
fn bench_measures_any_component_per_run() {
    let env = Env::new(&[]);
    let echo = colony_tests::guest_path("echo");
    let out = env.ok(&[
        "bench",
        "--agent",
        echo.to_str().unwrap(),
        "--runs",
        "30",
        "--payload",
        r#"{"x":1}"#,
    ]);
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["runs"], 30, "{report}");
    assert_eq!(
        report["outcomes"],
        serde_json::json!({"ok": 30}),
        "{report}"
    );
    assert!(report["run_us_p50"].as_f64().unwrap() > 0.0);
    assert!(report["run_us_p99"].as_f64().unwrap() >= report["run_us_p50"].as_f64().unwrap());
    assert!(report["bytes"].as_u64().unwrap() > 1000);

    let missing = env.run(&["bench", "--agent", "/nonexistent.wasm"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent.wasm"));
    let not_a_component = env.file("junk.wasm", "not wasm");
    let broken = env.run(&["bench", "--agent", &not_a_component]);
    assert_eq!(broken.status.code(), Some(2));
    // The error names the user's file, not the copy the bench measures.
    let said = String::from_utf8_lossy(&broken.stderr);
    let error = said
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        error.contains("did not load: ")
            && error.contains(&format!("{not_a_component}: it is not a WebAssembly file")),
        "{said}"
    );
    assert!(!error.contains("agent-under-test"), "{said}");
    // Said once, naming the user's file: no load warnings about the copy.
    assert_eq!(said.matches("did not load").count(), 1, "{said}");
    assert!(!said.contains("agent-under-test"), "{said}");
}

/// `bench --agent` counts each run as a daemon would record it: an output
/// the queue refuses is `invalid_output`, not "ok", and the first failure
/// is said; the manifest beside the component (PATH.toml) applies, so a
/// loop is stopped at its timeout; a payload that is not JSON is refused.
#[test]
fn bench_of_a_component_classifies_runs_as_a_daemon_and_keeps_its_manifest() {
    let env = Env::new(&[]);
    let garbage = colony_tests::guest_path("garbage");
    let out = env.run(&["bench", "--agent", garbage.to_str().unwrap(), "--runs", "5"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["outcomes"],
        serde_json::json!({"invalid_output": 5}),
        "{report}"
    );
    assert!(
        said.contains("5 of 5 runs failed")
            && said.contains("invalid_output: the agent's invalid output: not valid JSON"),
        "{said}"
    );

    let spin = env.data.path().join("spin.wasm");
    std::fs::copy(colony_tests::guest_path("spin"), &spin).unwrap();
    env.file("spin.toml", "timeout = \"300ms\"\n");
    let report: Value = serde_json::from_str(
        env.ok(&["bench", "--agent", spin.to_str().unwrap(), "--runs", "1"])
            .trim(),
    )
    .unwrap();
    assert_eq!(
        report["outcomes"],
        serde_json::json!({"timeout": 1}),
        "{report}"
    );

    let bad_manifest = env.file("spin.toml", "timeuot = \"1s\"\n");
    let refused = env.run(&["bench", "--agent", spin.to_str().unwrap(), "--runs", "1"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(
        said.contains(&bad_manifest) && said.contains("timeuot"),
        "{said}"
    );

    let echo = colony_tests::guest_path("echo");
    let refused = env.run(&[
        "bench",
        "--agent",
        echo.to_str().unwrap(),
        "--payload",
        "notjson",
    ]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains("--payload: not valid JSON"), "{said}");
}

/// What a new user's walkthrough stumbled on, each now said: a listing cut
/// at its limit, a manifest that limits nothing (misnamed) or has a value
/// of the wrong type, a payload file that is not JSON, the schedule and key
/// of a task, and dependents a retry leaves cancelled.
#[test]
fn a_new_users_stumbles_are_explained() {
    let env = Env::new(&["echo"]);
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).to_string();

    for _ in 0..3 {
        env.submit(&["echo", "{}"]);
    }
    let out = env.run(&["list", "--limit", "2"]);
    assert!(
        out.status.success()
            && stderr(&out)
                .contains("showing 2 tasks; there may be more: the next page with --before 2,"),
        "{}",
        stderr(&out)
    );
    // The next page, as the note says.
    let next = env.json(&["list", "--limit", "2", "--before", "2"]);
    let ids: Vec<i64> = next
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [1]);
    assert!(env.run(&["list"]).stderr.is_empty());
    assert_eq!(env.run(&["list", "--limit", "0"]).status.code(), Some(2));

    // A manifest beside no component is named; a wrong type names its key.
    let agents = env.agents.path();
    std::fs::write(agents.join("echo.wasm.toml"), "timeout = \"1s\"\n").unwrap();
    let out = env.ok_with_env(&["agents"], &[("COLONY_LOG", "warn")]);
    assert!(
        stderr(&out).contains("echo.wasm.toml is no agent's manifest"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_file(agents.join("echo.wasm.toml")).unwrap();
    std::fs::write(agents.join("echo.toml"), "models = \"fast\"\n").unwrap();
    let listed = env.json(&["agents"]);
    let reason = listed[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("echo.toml:1:10: key `models`: invalid type"),
        "{listed}"
    );
    std::fs::remove_file(agents.join("echo.toml")).unwrap();

    // A payload file that is not JSON is named.
    let file = env.data.path().join("brief.json");
    std::fs::write(&file, "{a: 1}").unwrap();
    let out = env.run(&["submit", "echo", &format!("@{}", file.display())]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("brief.json: not valid JSON"),
        "{}",
        stderr(&out)
    );

    // show says when a pending task runs, and its key.
    let later = env
        .submit(&["echo", "{}", "--in", "1h", "--key", "brief-7"])
        .to_string();
    let shown = env.ok(&["show", &later]);
    assert!(
        shown.contains("runs at ")
            && shown.contains("key          brief-7")
            && shown.contains("backoff"),
        "{shown}"
    );
    // The same key again stores nothing, and says so in --json too.
    let again = env.json(&["submit", "echo", "{\"other\":1}", "--key", "brief-7"]);
    assert_eq!(
        (again["id"].to_string(), &again["existed"]),
        (later.clone(), &serde_json::json!(true)),
        "{again}"
    );
    let fresh = env.json(&["submit", "echo", "{}", "--key", "brief-8"]);
    assert!(fresh.get("existed").is_none(), "{fresh}");

    // A retry says which dependents its cancel took down and left so.
    let after = env.submit(&["echo", "{}", "--after", &later]).to_string();
    env.ok(&["cancel", &later]);
    let out = env.run(&["retry", &later]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "task(s) {after} depend on task {later} and stay cancelled"
        )),
        "{}",
        stderr(&out)
    );
}

/// What bounds a task is on show and list: its timeout and backoff, and its
/// chain's token budget, which a child spends from with its root (only a
/// retry's event said it).
#[test]
fn show_and_list_say_a_tasks_timeout_backoff_and_chain_budget() {
    let env = Env::new(&["echo"]);
    let (root, child) = env.budgeted_chain();
    let shown = env.show(root);
    assert_eq!(
        (shown["timeout_ms"].as_u64(), shown["backoff_ms"].as_u64()),
        (Some(9000), Some(3000)),
        "{shown}"
    );
    assert_eq!(
        shown["chain"],
        serde_json::json!({"root_id": root, "token_budget": 500, "spent_tokens": 0})
    );
    assert_eq!(
        env.show(child)["chain"],
        serde_json::json!({"root_id": root, "token_budget": 500, "spent_tokens": 0})
    );
    let listed = env.json(&["list"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.get("timeout_ms").is_some() && t["backoff_ms"].is_u64()),
        "{listed}"
    );
    let text = env.ok(&["show", &child.to_string()]);
    assert!(
        text.contains(&format!(
            "budget       500 tokens for the chain of task {root}, this task among them\n               spent 0, 500 left"
        )),
        "{text}"
    );
    let plain = env.submit(&["echo", "{}"]);
    assert_eq!(
        env.show(plain)["chain"],
        serde_json::json!({"root_id": plain, "token_budget": null, "spent_tokens": 0})
    );
    assert!(!env.ok(&["show", &plain.to_string()]).contains("budget "));
}

/// `submit AGENT -` (or `--payload-file -`) reads the payload from stdin,
/// as `state set` and `--batch -` do (it said "EOF while parsing a value").
#[test]
fn a_payload_comes_from_stdin_with_a_dash() {
    let env = Env::new(&["echo"]);
    let submit = |args: &[&str], input: &str| env.run_with_stdin(args, input.as_bytes());
    for args in [
        &["submit", "echo", "-"][..],
        &["submit", "echo", "--payload-file", "-"],
    ] {
        let out = submit(args, r#"{"from": "stdin"}"#);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(
            env.show(id)["payload"],
            serde_json::json!({"from": "stdin"})
        );
    }
    let out = submit(&["submit", "echo", "-"], "not json");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the payload on stdin: not valid JSON"));
    assert_eq!(env.task_count(), 2);
}

/// `--agents` naming a file is refused, naming it (it said the directory
/// does not exist; then a daemon ran on, an agents folder that could never
/// hold an agent, and exited 0 with --until-idle).
#[test]
fn an_agents_folder_that_is_a_file_is_refused_as_such() {
    let env = Env::new(&["echo"]);
    let file = env.data.path().join("s.db");
    std::fs::write(&file, "").unwrap();
    for command in [&["agents"][..], &["daemon", "--until-idle"], &["status"]] {
        let out = env
            .cmd()
            .args(["--agents", file.to_str().unwrap()])
            .args(command)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {said}");
        assert!(
            said.contains("s.db (or COLONY_AGENTS): that is a file"),
            "{command:?}: {said}"
        );
    }
    // A submit stores the task (its agents may be deployed elsewhere) but
    // says no component can appear there (it said "waits until
    // .../s.db/echo.wasm appears").
    let out = env
        .cmd()
        .args(["--agents", file.to_str().unwrap(), "submit", "echo", "{}"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("s.db (--agents, or COLONY_AGENTS) is a file"),
        "{said}"
    );
    // A folder that does not exist is said to be missing, not empty.
    let missing = env.data.path().join("no-such-folder");
    let out = env
        .cmd()
        .args(["--agents", missing.to_str().unwrap(), "agents"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("no-such-folder does not exist"), "{listed}");
}

/// Run as another user (root's tests act as `nobody`): a database file it
/// may only read is read (a check before opening refused it), and one it
/// may not read at all is named as such, exit 2, not "unable to open
/// database file" with kind unavailable.
#[test]
fn a_database_this_user_may_only_read_is_read_and_an_unreadable_one_is_named() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let env = Env::new(&["echo"]);
    let root = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    if root.trim() != "0" {
        return; // acting as another user needs root
    }
    let dir = tempfile::Builder::new()
        .prefix("colony-ro-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let readable = dir.path().join("readable.db");
    let id = env.ok(&["--db", readable.to_str().unwrap(), "submit", "echo", "{}"]);
    let unreadable = dir.path().join("unreadable.db");
    std::fs::copy(&readable, &unreadable).unwrap();
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A copy of the binary where nobody may run it (the build's own folder
    // may be under a home only root can enter), run from that folder.
    let binary = dir.path().join("colony");
    std::fs::copy(env!("CARGO_BIN_EXE_colony"), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new(&binary)
            .args(args)
            .current_dir(dir.path())
            .env("COLONY_LOG", "warn")
            .env_remove("COLONY_DB")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let listed = as_nobody(&["--db", readable.to_str().unwrap(), "list"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("echo"));
    let refused = as_nobody(&["--db", unreadable.to_str().unwrap(), "list"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains("this user may not read the file"), "{said}");
    assert!(!id.is_empty());
    // A write to the file it may only read: bad input naming why, not
    // SQLite's "attempt to write a readonly database" with exit 1.
    let refused = as_nobody(&["--db", readable.to_str().unwrap(), "submit", "echo", "{}"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(
        said.contains(&format!(
            "this user may not write to {} (owned by uid 0)",
            readable.display()
        )),
        "{said}"
    );
    let listed = as_nobody(&["--db", readable.to_str().unwrap(), "--json", "list"]);
    let tasks: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        tasks.as_array().map(Vec::len),
        Some(1),
        "nothing added: {tasks}"
    );
}

/// A database on a file system mounted read-only: SQLite cannot open it
/// even to read (its -wal and -shm files cannot be created), which said
/// "unable to open database file" as kind unavailable, as if a retry could
/// pass. Mounting needs root.
#[test]
fn a_database_on_a_read_only_mount_is_named_as_such() {
    let env = Env::new(&["echo"]);
    let dir = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: mounting a file system needs root");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(dir.path());
    let db = dir.path().join("q.db");
    let db = db.to_str().unwrap();
    env.ok(&["--db", db, "submit", "echo", "{}"]);
    let remounted = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(remounted.success());
    for args in [&["list"][..], &["--json", "submit", "echo", "{}"]] {
        let out = env.run(&[&["--db", db][..], args].concat());
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{said}");
        assert!(said.contains("mounted read-only"), "{said}");
    }
}

/// A command that reads the queue, or changes what is already in it,
/// refuses a SQLite file that does not exist, naming it (exit 2, kind
/// not_found), and leaves no file behind: created, a mistyped `--db`
/// listed an empty queue. A command that adds to the queue creates it.
#[test]
fn a_missing_database_file_is_named_by_readers_and_created_by_writers() {
    let env = Env::new(&["echo"]);
    let missing = env.data.path().join("colony-typo.db");
    let db = missing.to_str().unwrap();
    let readers: &[&[&str]] = &[
        &["list"],
        &["show", "1"],
        &["events"],
        &["review", "1", "approve"],
        &["retry", "1"],
        &["cancel", "1"],
        &["effects"],
        &["state", "list", "--agent", "echo"],
        &["state", "get", "--agent", "echo", "k"],
        &["state", "delete", "--agent", "echo", "k"],
        // A chain's state names a task, which a new file cannot hold.
        &["state", "set", "--chain", "3", "k", "1"],
    ];
    for args in readers {
        let out = env.run(&[&["--json", "--db", db], *args].concat());
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "colony {args:?}: {said}");
        let error: Value = serde_json::from_str(said.trim())
            .unwrap_or_else(|e| panic!("colony {args:?}: not one JSON line ({e}): {said}"));
        assert_eq!(error["kind"], "not_found", "colony {args:?}: {error}");
        assert!(
            error["error"]
                .as_str()
                .is_some_and(|m| m.contains("colony-typo.db: no such file")),
            "colony {args:?}: {error}"
        );
        assert!(!missing.exists(), "colony {args:?} created {db}");
    }
    // status shows an empty queue, saying why, and creates nothing.
    let status = env.ok_with_env(&["--json", "--db", db, "status"], &[]);
    let report: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(report["by_state"], serde_json::json!({}), "{report}");
    // The JSON says so too: a script must not read a typo as a healthy queue.
    assert!(
        report["missing_database"]
            .as_str()
            .is_some_and(|why| why.contains("colony-typo.db: no such file")),
        "{report}"
    );
    let said = String::from_utf8_lossy(&status.stderr);
    assert!(
        said.contains("colony-typo.db: no such file")
            && said.contains("the counts below are of an empty queue"),
        "{said}"
    );
    assert!(!missing.exists(), "status created {db}");

    // A writer refusing its input creates nothing either (it left an empty
    // database behind: "nothing was stored" but a file).
    let batch = env.file("bad.jsonl", "{\"agent\":\"echo\"}\n{\"agent\":\"e cho\"}\n");
    let refused: &[&[&str]] = &[
        &["submit", "echo", "{bad"],
        &["submit", "echo", "{}", "--timeout", "0s"],
        &["submit", "--batch", &batch],
        &["state", "set", "--agent", "echo", "k", "notjson"],
        &["state", "set", "--chain", "1", "", "1"],
    ];
    for args in refused {
        let out = env.run(&[&["--db", db], *args].concat());
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "colony {args:?}: {said}");
        assert!(said.contains("invalid"), "colony {args:?}: {said}");
        assert!(!missing.exists(), "colony {args:?} created {db}");
    }
    // A task waiting for another: a new database holds none (it said task
    // 5 does not exist, and left the new file behind).
    let after = env.file("after.jsonl", "{\"agent\":\"echo\",\"after\":[5]}\n");
    for args in [
        &["submit", "echo", "{}", "--after", "5"][..],
        &["submit", "--batch", &after],
    ] {
        let out = env.run(&[&["--db", db], args].concat());
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "colony {args:?}: {said}");
        assert!(
            said.contains("task 5 does not exist: there is no database at")
                && said.contains("colony-typo.db yet"),
            "colony {args:?}: {said}"
        );
        assert!(!missing.exists(), "colony {args:?} created {db}");
    }

    env.ok(&["--db", db, "state", "set", "--agent", "echo", "k", "1"]);
    let listed = env.json(&["--db", db, "state", "list", "--agent", "echo"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let id = env.ok(&["--db", db, "submit", "echo", "{}"]);
    let shown = env.json(&["--db", db, "show", id.trim()]);
    assert_eq!(shown["state"], "ready", "{shown}");
}

/// The tasks a run spawned, held while its task waits in review, are
/// shown to the person deciding (show listed the held state writes and
/// effects, not them: an approval created tasks nobody had seen).
#[test]
fn a_task_in_review_shows_the_tasks_its_run_spawned() {
    let env = Env::new(&["spawner", "echo"]);
    let payload = r#"{"children":[{"agent":"echo","payload":{"k":1}}]}"#;
    let id = env.submit(&["spawner", payload, "--review"]);
    env.until_idle(&[]);
    let shown = env.show(id);
    assert_eq!(shown["state"], "review", "{shown}");
    assert_eq!(shown["held_children"][0]["agent"], "echo", "{shown}");
    assert_eq!(
        shown["held_children"][0]["payload"],
        serde_json::json!({"k": 1})
    );
    assert_eq!(shown["children"], serde_json::json!([]), "none created yet");
    let text = env.ok(&["show", &id.to_string()]);
    assert!(
        text.contains("tasks spawned, held for review (created if approved):")
            && text.contains(r#"echo  priority 0  {"k":1}"#),
        "{text}"
    );
    env.ok(&["review", &id.to_string(), "approve"]);
    let shown = env.show(id);
    assert_eq!(shown["held_children"], serde_json::json!([]), "{shown}");
    assert_eq!(
        shown["children"].as_array().map(Vec::len),
        Some(1),
        "{shown}"
    );
    // Cancelled in review, its spawned tasks will never exist: not shown.
    let cancelled = env.submit(&["spawner", payload, "--review"]);
    env.until_idle(&[]);
    env.ok(&["cancel", &cancelled.to_string()]);
    let shown = env.show(cancelled);
    assert_eq!(shown["held_children"], serde_json::json!([]), "{shown}");
}

/// A run whose output the queue refuses is logged by the daemon with where
/// to read why (it said only "refused by the queue"), and the task says it.
#[test]
fn a_refused_output_is_logged_with_where_to_read_why() {
    let env = Env::new(&["garbage"]);
    let id = env.submit(&["garbage", "{}", "--max-attempts", "1"]);
    let out = env.ok_with_env(&["daemon", "--until-idle", "--poll", "100ms"], &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!(
            "refused by the queue (`colony show {id}` says why)"
        )),
        "{log}"
    );
    let task = env.show(id);
    assert_eq!(task["error"]["kind"], "invalid_output", "{task}");
}

/// Input from a file or stdin is refused once past its limit, not read
/// whole first: `yes | colony submit echo -` or a payload `@/dev/zero`
/// grew to gigabytes before the refusal at 1 MiB.
#[test]
fn endless_input_is_refused_at_its_limit_and_stores_nothing() {
    let env = Env::new(&["echo"]);
    env.submit(&["echo", "{}"]);
    let before = env.snapshot();
    let from_files: [&[&str]; 4] = [
        &["submit", "echo", "@/dev/zero"],
        &["submit", "echo", "{}", "--next", "@/dev/zero"],
        &["submit", "--batch", "/dev/zero"],
        &["state", "set", "--agent", "echo", "k", "@/dev/zero"],
    ];
    let from_stdin: [&[&str]; 3] = [
        &["submit", "echo", "-"],
        &["submit", "--batch", "-"],
        &["state", "set", "--agent", "echo", "k", "-"],
    ];
    let runs = from_files
        .iter()
        .map(|args| (args, env.run(args)))
        .chain(from_stdin.iter().map(|args| {
            let zero = std::fs::File::open("/dev/zero").unwrap();
            (args, env.cmd().args(*args).stdin(zero).output().unwrap())
        }));
    for (args, out) in runs {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("limit of") && stderr.contains("nothing was read further"),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(env.snapshot(), before);
}

/// A manifest granting a model alias the configuration does not declare
/// (a typo) is said by `agents` and `status`, as by the daemon at start:
/// the listings showed the agent plainly loaded, its calls all refused.
#[test]
fn a_granted_alias_the_configuration_lacks_is_said_wherever_agents_are_listed() {
    let env = Env::new(&["echo"]);
    std::fs::write(env.agents.path().join("echo.toml"), "models = [\"fsat\"]\n").unwrap();
    let config = env.file(
        "colony.toml",
        "[models.fast]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\napi_key_env = \"FAST_KEY\"\n",
    );
    let vars = [("COLONY_CONFIG", config.as_str()), ("FAST_KEY", "sk-test")];
    for args in [&["agents"][..], &["status"], &["daemon", "--until-idle"]] {
        let out = env.ok_with_env(args, &vars);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("agent echo is granted the model alias \"fsat\"")
                && said.contains("does not configure; its calls will be refused"),
            "{args:?}: {said}"
        );
    }
    // A granted alias that is declared is not warned of.
    std::fs::write(env.agents.path().join("echo.toml"), "models = [\"fast\"]\n").unwrap();
    let out = env.ok_with_env(&["agents"], &vars);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("granted"),
        "{out:?}"
    );
}

/// A bad value from an option's environment variable is said to come from
/// there: clap named the option alone, which nobody had typed.
#[test]
fn a_bad_value_from_the_environment_names_its_variable() {
    let env = Env::new(&["echo"]);
    let out = env
        .cmd()
        .env("COLONY_SYNC", "bogus")
        .arg("list")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("the value came from the environment variable COLONY_SYNC"),
        "{said}"
    );
    // Typed on the command line, it is the flag's own.
    let out = env
        .cmd()
        .args(["--sync", "worse", "list"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("'worse'") && !said.contains("environment variable"),
        "{said}"
    );
}
