//! Hostile input, end to end: the real `colony` binary given what a careless
//! script or an attacker would pass. Bad input exits 2, names the flag or
//! field at fault and stores nothing; extreme but valid values are stored and
//! every command still prints them; nothing panics; a closed stdout ends a
//! command quietly; `colony agents` reports every `*.wasm` entry.

mod common;
use common::{Env, shown};

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One hostile command: its arguments, the exit status it must end with and
/// what its stderr must mention (the flag or field at fault).
struct Case {
    args: Vec<OsString>,
    code: i32,
    says: String,
}

fn case(args: &[&str], code: i32, says: &str) -> Case {
    Case {
        args: args.iter().map(OsString::from).collect(),
        code,
        says: says.to_string(),
    }
}

/// `colony submit noop {} <extra>`, which must exit 2 mentioning `says`.
fn bad_submit(extra: &[&str], says: &str) -> Case {
    case(&[&["submit", "noop", "{}"], extra].concat(), 2, says)
}

/// `colony bench <args>`, which must exit 2 mentioning `says`.
fn bench(args: &[&str], says: &str) -> Case {
    case(&[&["bench"], args].concat(), 2, says)
}

/// `colony torture <args>` on a tiny run, which must exit 2 mentioning `says`.
fn torture(args: &[&str], says: &str) -> Case {
    let tiny = ["--tasks", "1", "--daemons", "1", "--deadline", "20s"];
    case(&[&["torture"], &tiny[..], args].concat(), 2, says)
}

fn bad_payload(payload: &str, says: &str) -> Case {
    case(&["submit", "noop", payload], 2, says)
}

fn nested(depth: usize) -> String {
    "[".repeat(depth) + &"]".repeat(depth)
}

fn non_utf8(args: &[&[u8]], says: &str) -> Case {
    Case {
        args: args
            .iter()
            .map(|a| OsStr::from_bytes(a).to_os_string())
            .collect(),
        code: 2,
        says: says.to_string(),
    }
}

fn hostile_cases(env: &Env) -> Vec<Case> {
    let huge = env.file("huge.json", format!("\"{}\"", "x".repeat(1024 * 1024)));
    let deep = env.file("deep.json", nested(200));
    let inf = env.file("inf.json", "1e999");
    let surrogate = env.file("surrogate.json", r#"{"a":"\ud800"}"#);
    let deep_chain = (0..40).fold(String::from(r#"{"agent":"noop"}"#), |inner, _| {
        format!(r#"{{"agent":"noop","next":[{inner}]}}"#)
    });
    let batch_inf = env.file("inf.jsonl", "{\"agent\":\"noop\",\"payload\":1e999}\n");
    let batch_big_timeout = env.file("timeout.jsonl", "{\"agent\":\"noop\",\"timeout\":\"2y\"}\n");
    let batch_far_run_at = env.file(
        "run_at.jsonl",
        "{\"agent\":\"noop\",\"run_at\":\"10000-01-01T00:00:00Z\"}\n",
    );
    vec![
        // Numbers: negative, zero, beyond the maximum, beyond the type.
        bad_submit(&["--priority", "2147483648"], "--priority"),
        bad_submit(&["--priority", "-2147483649"], "--priority"),
        bad_submit(&["--max-attempts", "-1"], "from 1 to 1000"),
        bad_submit(&["--max-attempts", "0"], "from 1 to 1000"),
        bad_submit(&["--max-attempts", "1001"], "from 1 to 1000"),
        bad_submit(&["--max-attempts", "4294967296"], "--max-attempts"),
        bad_submit(&["--after", "0"], "--after"),
        bad_submit(&["--after", "-1"], "--after"),
        bad_submit(
            &["--after", "9223372036854775807"],
            "invalid after: task 9223372036854775807 does not exist",
        ),
        bad_submit(&["--after", "9223372036854775808"], "--after"),
        case(&["list", "--limit", "-1"], 2, "--limit"),
        case(&["list", "--limit", "0"], 2, "--limit"),
        case(&["list", "--limit", "4294967296"], 2, "--limit"),
        case(&["events", "--since", "-1"], 2, "--since"),
        case(&["events", "--since", "9223372036854775808"], 2, "--since"),
        case(&["events", "--task", "-1"], 2, "--task"),
        case(&["show", "-1"], 2, "<ID>"),
        case(&["show", "9223372036854775808"], 2, "<ID>"),
        case(&["show", "9223372036854775807"], 2, "does not exist"),
        case(&["retry", "0"], 2, "<ID>"),
        case(&["cancel", "-5"], 2, "<ID>"),
        case(&["review", "-5", "approve"], 2, "<ID>"),
        // Durations: negative, zero, too long, beyond what a number holds.
        bad_submit(&["--timeout", "0s"], "timeout"),
        bad_submit(&["--timeout", "-1s"], "--timeout"),
        bad_submit(&["--timeout", "2y"], "--timeout"),
        bad_submit(&["--timeout", "99999999999999999999s"], "--timeout"),
        bad_submit(&["--backoff", "-1s"], "--backoff"),
        bad_submit(&["--backoff", "11m"], "--backoff"),
        bad_submit(&["--backoff", "584942417355y"], "--backoff"),
        bad_submit(&["--in", "8000y"], "--in"),
        bad_submit(&["--in", "99999999999d"], "--in"),
        bad_submit(&["--in", "999999999999999999999d"], "--in"),
        bad_submit(&["--in", "-5s"], "--in"),
        bad_submit(&["--in", "soon"], "--in"),
        // Times: past year 9999 (also through an offset), before 1970,
        // impossible dates and offsets, not RFC 3339 at all.
        bad_submit(&["--at", "10000-01-01T00:00:00Z"], "--at"),
        bad_submit(&["--at", "9999-12-31T23:59:59-01:00"], "--at"),
        bad_submit(&["--at", "1969-12-31T23:59:59Z"], "--at"),
        bad_submit(&["--at", "2026-02-29T12:00:00Z"], "--at"),
        bad_submit(&["--at", "2026-11-27T18:00:00+24:00"], "--at"),
        bad_submit(&["--at", "2026-11-27T18:00:00 CET"], "--at"),
        bad_submit(&["--at", "tomorrow"], "--at"),
        bad_submit(&["--at", "2026-11-27T18:00:00Z", "--in", "5m"], "--in"),
        case(&["submit", "--batch", &batch_big_timeout], 2, "timeout"),
        case(&["submit", "--batch", &batch_far_run_at], 2, "run_at"),
        // The daemon's settings (each would exit once idle if accepted).
        case(
            &["daemon", "--until-idle", "--concurrency", "0"],
            2,
            "--concurrency",
        ),
        case(
            &["daemon", "--until-idle", "--concurrency", "-1"],
            2,
            "--concurrency",
        ),
        case(
            &["daemon", "--until-idle", "--concurrency", "4294967295"],
            2,
            "--concurrency",
        ),
        case(
            &["daemon", "--until-idle", "--claim-batch", "0"],
            2,
            "--claim-batch",
        ),
        case(
            &[
                "daemon",
                "--until-idle",
                "--claim-batch",
                "18446744073709551616",
            ],
            2,
            "--claim-batch",
        ),
        case(&["daemon", "--until-idle", "--poll", "0s"], 2, "--poll"),
        case(&["daemon", "--until-idle", "--poll", "-1s"], 2, "--poll"),
        case(&["daemon", "--until-idle", "--poll", "2y"], 2, "--poll"),
        case(
            &["daemon", "--until-idle", "--grace", "99999999999999999999s"],
            2,
            "--grace",
        ),
        case(
            &[
                "daemon",
                "--until-idle",
                "--heartbeat",
                "1m",
                "--stale-after",
                "1m",
            ],
            2,
            "--heartbeat",
        ),
        // --token-budget: zero, negative, beyond what the queue stores,
        // beyond the type.
        bad_submit(&["--token-budget", "0"], "--token-budget"),
        bad_submit(&["--token-budget", "-1"], "--token-budget"),
        bad_submit(&["--token-budget", "9223372036854775808"], "--token-budget"),
        bad_submit(
            &["--token-budget", "18446744073709551616"],
            "--token-budget",
        ),
        // bench and torture: zero, negative, beyond the maximum, beyond the
        // type (each with a tiny run, should a bound be missed).
        bench(&["--tasks", "0"], "--tasks"),
        bench(&["--tasks", "-1"], "--tasks"),
        bench(&["--tasks", "10000001"], "--tasks"),
        bench(&["--tasks", "18446744073709551616"], "--tasks"),
        bench(&["--tasks", "1", "--concurrency", "0"], "--concurrency"),
        bench(&["--tasks", "1", "--concurrency", "-1"], "--concurrency"),
        bench(&["--tasks", "1", "--concurrency", "4097"], "--concurrency"),
        bench(
            &["--tasks", "1", "--concurrency", "4294967295"],
            "--concurrency",
        ),
        bench(&["--tasks", "1", "--batch", "0"], "--batch"),
        bench(&["--tasks", "1", "--batch", "-1"], "--batch"),
        bench(&["--tasks", "1", "--batch", "4097"], "--batch"),
        bench(
            &["--tasks", "1", "--batch", "18446744073709551616"],
            "--batch",
        ),
        bench(&["--tasks", "1", "--history", "-1"], "--history"),
        bench(&["--tasks", "1", "--history", "10000001"], "--history"),
        bench(
            &["--tasks", "1", "--history", "18446744073709551616"],
            "--history",
        ),
        bench(&["--tasks", "1", "--sync", "none"], "--sync"),
        torture(&["--daemons", "0"], "--daemons"),
        torture(&["--daemons", "-1"], "--daemons"),
        torture(&["--daemons", "65"], "--daemons"),
        torture(&["--daemons", "18446744073709551616"], "--daemons"),
        torture(&["--tasks", "0"], "--tasks"),
        torture(&["--tasks", "-1"], "--tasks"),
        torture(&["--tasks", "10000001"], "--tasks"),
        torture(&["--kill-every", "0s"], "--kill-every"),
        torture(&["--kill-every", "-1s"], "--kill-every"),
        torture(&["--kill-every", "99ms"], "--kill-every"),
        torture(&["--kill-every", "2h"], "--kill-every"),
        torture(&["--kill-every", "584942417355y"], "--kill-every"),
        torture(&["--kill-every", "99999999999999999999s"], "--kill-every"),
        torture(&["--deadline", "0s"], "--deadline"),
        torture(&["--deadline", "-1s"], "--deadline"),
        torture(&["--deadline", "8d"], "--deadline"),
        torture(&["--deadline", "99999999999999999999s"], "--deadline"),
        // Payloads that parse but could not be read back, and too much.
        bad_payload("1e999", "payload"),
        bad_payload(r#"{"a":"\ud800"}"#, "payload"),
        bad_payload(&nested(200), "payload"),
        bad_payload(&format!("@{inf}"), "payload"),
        bad_payload(&format!("@{huge}"), "payload"),
        bad_payload("{not json", "payload"),
        case(
            &["submit", "noop", "--payload-file", &surrogate],
            2,
            "payload",
        ),
        case(&["submit", "noop", "--payload-file", &deep], 2, "payload"),
        case(&["submit", "noop", "--payload-file", &huge], 2, "payload"),
        case(&["submit", "--batch", &batch_inf], 2, "line 1"),
        // --next: not JSON, the wrong shape, bad names, bad values, too deep.
        bad_submit(&["--next", "not json"], "--next"),
        bad_submit(&["--next", "[1]"], "--next"),
        bad_submit(&["--next", r#"[{"agnt":"noop"}]"#], "--next"),
        bad_submit(
            &["--next", r#"[{"agent":"no such/agent"}]"#],
            "next[0].agent",
        ),
        bad_submit(
            &["--next", r#"[{"agent":"noop","payload":1e999}]"#],
            "next[0].payload",
        ),
        bad_submit(
            &["--next", r#"[{"agent":"noop","priority":2147483648}]"#],
            "[0].priority: invalid value: integer `2147483648`, expected i32",
        ),
        bad_submit(&["--next", &nested(200)], "--next"),
        bad_submit(&["--next", &deep_chain], "next"),
        bad_submit(&["--next", "@/no/such/file"], "--next"),
        // Strings: empty, too long, not UTF-8.
        bad_submit(&["--key", ""], "key"),
        bad_submit(&["--key", &"k".repeat(257)], "key"),
        case(&["submit", &"a".repeat(65)], 2, "agent"),
        case(&["submit", "../noop"], 2, "agent"),
        bad_submit(&["--reviewer", "no/such"], "reviewer"),
        non_utf8(&[b"submit", b"no\xffop"], "argument 2"),
        non_utf8(&[b"submit", b"noop", b"{\"a\":\"\xff\"}"], "argument 3"),
        non_utf8(&[b"submit", b"noop", b"{}", b"--key", b"\xff"], "--key"),
        non_utf8(&[b"submit", b"noop", b"{}", b"--next=\xff"], "--next"),
    ]
}

#[test]
fn hostile_input_exits_2_names_the_flag_and_stores_nothing() {
    let env = Env::new(&["noop"]);
    env.submit(&["noop", r#"{"keep":"me"}"#]);
    let mut before = env.snapshot();
    let mut failures = Vec::new();
    for Case { args, code, says } in hostile_cases(&env) {
        let out = env.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let args = shown(&args);
        if out.status.code() != Some(code) {
            failures.push(format!(
                "colony {args:?} exited {}, not {code}: {stderr}",
                out.status
            ));
        } else if !stderr.contains(&says) {
            failures.push(format!("colony {args:?} should mention {says}: {stderr}"));
        }
        let after = env.snapshot();
        if after != before {
            failures.push(format!("colony {args:?} changed the database"));
            before = after;
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Submits the extreme values every flag accepts; then every command that
/// reads them back must succeed.
#[test]
fn extreme_but_valid_values_are_stored_and_every_command_prints_them() {
    let env = Env::new(&["noop"]);
    let first = env.submit(&["noop"]).to_string();
    let key = "k".repeat(256);
    let extremes: &[&[&str]] = &[
        &["--priority", "2147483647"],
        &["--priority", "-2147483648"],
        &["--max-attempts", "1"],
        &["--max-attempts", "1000"],
        &["--timeout", "1ms"],
        &["--timeout", "1y"],
        &["--backoff", "0s"],
        &["--backoff", "10m"],
        &["--in", "0s"],
        &["--in", "7900y"],
        &["--at", "1970-01-01T00:00:00Z"],
        &["--at", "9999-12-31T23:59:59.999Z"],
        &["--at", "9999-12-31T23:59:59.999999999+00:00"],
        &["--at", "2026-11-27T18:00:00.123456-05:30"],
        &["--after", &first],
        &["--after", &first, "--key", &key],
        &[
            "--next",
            r#"{"agent":"noop","priority":-2147483648,"payload":1.7976931348623157e308}"#,
        ],
        &["--token-budget", "1"],
        &["--token-budget", "9223372036854775807"],
    ];
    let mut ids = vec![first.clone()];
    for extra in extremes {
        ids.push(env.submit(&[&["noop", "{}"], *extra].concat()).to_string());
    }
    ids.push(env.submit(&["noop", "1.7976931348623157e308"]).to_string());
    ids.push(env.submit(&["noop", &nested(100)]).to_string());

    for id in &ids {
        env.ok(&["show", id]);
        env.json(&["show", id]);
        env.ok(&["events", "--task", id]);
    }
    for args in [
        &["list", "--limit", "4294967295"][..],
        &["list", "--limit", "1"],
        &["status"],
        &["agents"],
    ] {
        env.ok(args);
        env.json(args);
    }
    for line in env.ok(&["events"]).lines() {
        serde_json::from_str::<Value>(line).unwrap();
    }
    assert_eq!(env.ok(&["events", "--since", "9223372036854775807"]), "");
    let latest = env.json(&["show", &ids[12]]);
    assert_eq!(latest["run_at"], "9999-12-31T23:59:59.999Z");
}

#[test]
fn at_takes_any_rfc_3339_offset() {
    let env = Env::new(&[]);
    for (at, stored) in [
        ("2026-11-27T18:00:00+01:00", "2026-11-27T17:00:00.000Z"),
        ("2026-11-27T18:00:00-05:30", "2026-11-27T23:30:00.000Z"),
        ("2026-11-27T18:00:00Z", "2026-11-27T18:00:00.000Z"),
        ("2026-11-27T18:00:00.25z", "2026-11-27T18:00:00.250Z"),
        (
            "2026-11-27T18:00:00.123456789+00:00",
            "2026-11-27T18:00:00.123Z",
        ),
    ] {
        let id = env.submit(&["later", "{}", "--at", at]);
        assert_eq!(
            env.json(&["show", &id.to_string()])["run_at"],
            stored,
            "--at {at}"
        );
    }
    let batch = env.file(
        "at.jsonl",
        "{\"agent\":\"later\",\"run_at\":\"2026-11-27T18:00:00+01:00\"}\n",
    );
    let id = env.ok(&["submit", "--batch", &batch]);
    assert_eq!(
        env.json(&["show", id.trim()])["run_at"],
        "2026-11-27T17:00:00.000Z"
    );
}

/// A file that is not a colony queue is refused by every command, which
/// leaves it as it was: another program's SQLite database (even `list`
/// added colony's tables to it; one with a schema version of its own was
/// switched to WAL and failed mid-migration), a file that is not SQLite,
/// and colony's tables without their schema version (a restore through
/// `sqlite3 .dump`), said as such. A file that holds no queue yet is
/// "not found" to a command that reads (status shows it empty) and made a
/// queue by one that adds tasks.
#[test]
fn a_file_that_is_not_a_queue_is_refused_and_left_as_it_was() {
    let env = Env::new(&["echo"]);
    let foreign = |name: &str, version: u32| {
        let path = env.data.path().join(name);
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE foo (x); INSERT INTO foo VALUES (1);")
            .unwrap();
        conn.pragma_update(None, "user_version", version).unwrap();
        path.to_str().unwrap().to_string()
    };
    let other = foreign("other.db", 0);
    let versioned = foreign("versioned.db", 5);
    let junk = env.file("junk.db", "not SQLite at all ".repeat(300));
    // A colony queue restored through `sqlite3 .dump`: no user_version.
    let queue = env.data.path().join("queue.db");
    env.ok(&["--db", queue.to_str().unwrap(), "submit", "echo", "{}"]);
    let dumped = env.data.path().join("dumped.db");
    rusqlite::Connection::open(&queue)
        .unwrap()
        .execute("VACUUM INTO ?1", [dumped.to_str().unwrap()])
        .unwrap();
    rusqlite::Connection::open(&dumped)
        .unwrap()
        .pragma_update(None, "user_version", 0)
        .unwrap();
    let dumped = dumped.to_str().unwrap();
    let something_else = "a SQLite database of something else (tables foo; schema version";
    let cases: [(&str, &[&str], &str); 7] = [
        (&other, &["list"], something_else),
        (&other, &["submit", "echo", "{}"], something_else),
        (&other, &["--json", "status"], something_else),
        (
            &versioned,
            &["list"],
            "schema version 5, no colony tasks table",
        ),
        (&junk, &["show", "1"], "not a SQLite database"),
        (&junk, &["submit", "echo", "{}"], "not a SQLite database"),
        (dumped, &["list"], "colony's tables but no schema version"),
    ];
    for (db, args, says) in cases {
        let out = env.run(&[&["--db", db][..], args].concat());
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        assert!(
            said.contains(&format!("{db} is not a colony queue: ")) && said.contains(says),
            "{args:?}: {said}"
        );
    }
    for db in [&other, &versioned] {
        let conn = rusqlite::Connection::open(db).unwrap();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(tables, ["foo"], "{db}: only its own table");
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete", "{db} was switched to WAL");
    }
    assert_eq!(
        std::fs::read_to_string(&junk).unwrap(),
        "not SQLite at all ".repeat(300)
    );

    let empty = env.file("empty.db", "");
    let out = env.run(&["--db", &empty, "list"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("holds no queue yet"), "{said}");
    let status = env.json(&["--db", &empty, "status"]);
    assert!(
        status["missing_database"]
            .as_str()
            .is_some_and(|w| w.contains("holds no queue yet")),
        "{status}"
    );
    env.ok(&["--db", &empty, "submit", "echo", "{}"]);
    assert_eq!(env.ok(&["--db", &empty, "list"]).lines().count(), 2);
}

/// `--db` takes a path or `sqlite:PATH`, absolute or not; a directory that
/// does not exist and a URL colony does not speak are refused by name, the
/// URL's password left out.
#[test]
fn database_locations_are_opened_or_refused_by_name() {
    let env = Env::new(&["echo"]);
    let absolute = env.data.path().join("absolute.db");
    let location = format!("sqlite:{}", absolute.display());
    assert!(location.starts_with("sqlite:/"));
    env.ok(&["--db", &location, "submit", "noop", "{}"]);
    assert!(
        absolute.is_file(),
        "sqlite:/... opened {}",
        absolute.display()
    );
    // Compiled components are cached beside the file, as for a plain path.
    env.ok(&["--db", &location, "agents"]);
    assert!(env.data.path().join(".colony-cache").is_dir());
    assert!(!env.data.path().join("sqlite:").exists());
    env.ok(&["--db", "sqlite:relative.db", "submit", "noop", "{}"]);
    assert!(env.data.path().join("relative.db").is_file());
    for (db, says) in [
        (
            "sqlite:/no/such/dir/q.db",
            "the directory /no/such/dir does not exist",
        ),
        (
            "/no/such/dir/q.db",
            "the directory /no/such/dir does not exist",
        ),
        (
            "mysql://root:hunter2@db.example/shop",
            "mysql:// is not a database colony speaks",
        ),
        ("sqlite:", "the path is empty"),
        (":memory:", "an in-memory database lasts one command"),
        ("sqlite::memory:", "an in-memory database lasts one command"),
        (
            "host=127.0.0.1 user=colony password=hunter2 dbname=q",
            "looks like a PostgreSQL key=value connection string",
        ),
        (
            "host=db1 password='hunter2 pw' dbname=q",
            "looks like a PostgreSQL key=value connection string",
        ),
    ] {
        let out = env.run(&["--db", db, "list"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--db {db}: {stderr}");
        assert!(
            stderr.contains(says),
            "--db {db} should say {says:?}: {stderr}"
        );
        assert!(!stderr.contains("hunter2"), "--db {db}: {stderr}");
    }
    // Nothing was created for any of them (the key=value string was a file
    // named after it before, password and all).
    let created: Vec<_> = std::fs::read_dir(env.data.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("hunter2") || name.contains("memory"))
        .collect();
    assert!(created.is_empty(), "{created:?}");
}

#[test]
fn a_missing_reviewer_is_warned_about_like_a_missing_agent() {
    let env = Env::new(&["noop"]);
    let out = env.run(&["submit", "noop", "{}", "--reviewer", "nonexist"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: no agent \"nonexist\"") && stderr.contains("review"),
        "{stderr}"
    );
    let out = env.run(&["submit", "noop", "{}", "--next", r#"{"agent":"chained"}"#]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning: no agent \"chained\""), "{stderr}");
    let out = env.run(&["submit", "noop", "{}", "--reviewer", "noop"]);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `colony <args>` with stdout piped, reads one line, closes the pipe
/// and runs `meanwhile`; the command must then exit 0 without a word.
fn closing_stdout_after_one_line(env: &Env, args: &[&str], meanwhile: impl FnOnce()) {
    let mut cmd = env.cmd();
    cmd.args(args);
    closing_stdout_after(cmd, 1, Duration::from_secs(20), meanwhile);
}

/// Starts `cmd` with stdout piped, reads `lines` lines (none: the pipe is
/// closed before the command writes a byte), closes the pipe and runs
/// `meanwhile`; the command must then exit 0 within `within`, without a word.
fn closing_stdout_after(
    mut cmd: Command,
    lines: usize,
    within: Duration,
    meanwhile: impl FnOnce(),
) {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    for _ in 0..lines {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "{what} printed too little");
    }
    drop(stdout);
    meanwhile();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > within {
            child.kill().unwrap();
            panic!("{what} kept running for {within:?} after its stdout was closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{what}: {stderr}");
    assert!(stderr.is_empty(), "{what}: {stderr}");
}

#[test]
fn a_closed_stdout_ends_a_command_quietly_with_0() {
    let env = Env::new(&[]);
    // More output than a pipe buffers, so writes go on after it closes.
    let lines: String = (0..3000).map(|_| "{\"agent\":\"later\"}\n").collect();
    let batch = env.file("tasks.jsonl", lines);
    env.ok(&["submit", "--batch", &batch]);
    closing_stdout_after_one_line(&env, &["list", "--limit", "3000"], || {});
    closing_stdout_after_one_line(&env, &["--json", "list", "--limit", "3000"], || {});
    closing_stdout_after_one_line(&env, &["events"], || {});
    closing_stdout_after_one_line(&env, &["events", "--follow"], || {
        env.submit(&["later"]); // a new event for the follower to print
    });
}

/// `bench` and `torture` print only when their run is over: with the reader
/// gone by then, the report meets a closed pipe and the run ends quietly.
#[test]
fn bench_with_a_closed_stdout_ends_quietly_with_0() {
    let env = Env::new(&[]);
    let mut cmd = env.cmd();
    cmd.args(["bench", "--tasks", "50", "--dir"])
        .arg(env.data.path().join("bench"));
    closing_stdout_after(cmd, 0, Duration::from_secs(60), || {});
}

#[test]
fn torture_with_a_closed_stdout_ends_quietly_with_0() {
    let env = Env::new(&[]);
    let mut cmd = env.cmd();
    cmd.args(["torture", "--tasks", "20", "--daemons", "1", "--dir"])
        .arg(env.data.path().join("torture"));
    closing_stdout_after(cmd, 0, Duration::from_secs(60), || {});
}

/// `colony demo | head -1`: the demo goes on writing after the reader left.
#[test]
fn the_demo_with_a_closed_stdout_ends_quietly_with_0() {
    let env = Env::new(&[]);
    let mut cmd = env.cmd();
    // The demo's agents warn by design (a flaky supplier, markup escaped).
    cmd.env("COLONY_LOG", "error")
        .arg("--agents")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../agents"))
        .arg("--config")
        .arg(env.file("no-models.toml", "# no model providers\n"))
        .args(["demo", "--dir"])
        .arg(env.data.path().join("demo"));
    closing_stdout_after(cmd, 1, Duration::from_secs(120), || {});
}

/// A trapped run's error spans lines (the summary, the guest's backtrace):
/// `list` keeps it on its task's row, and with `RUST_BACKTRACE` set the
/// stored error still holds the guest's frames, not the host's.
#[test]
fn a_trapped_runs_error_keeps_to_its_row_and_to_the_guest() {
    let env = Env::new(&["recurse"]);
    let id = env.submit(&["recurse", "{}", "--max-attempts", "1"]);
    let daemon = ["daemon", "--until-idle", "--poll", "100ms"];
    env.ok_with_env(&daemon, &[("RUST_BACKTRACE", "1")]);
    let error = &env.show(id)["error"];
    assert_eq!(error["kind"], "stack_overflow", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.lines().count() > 1,
        "a summary and a backtrace: {message}"
    );
    for host_frame in ["tokio::", "std::rt", "Stack backtrace"] {
        assert!(!message.contains(host_frame), "{host_frame} in {message}");
    }
    let listed = env.ok(&["list"]);
    let rows: Vec<&str> = listed.lines().collect();
    assert_eq!(rows.len(), 2, "a header and one row:\n{listed}");
    assert!(
        rows[1].contains("stack_overflow: the guest overflowed"),
        "{listed}"
    );
}

/// `RUST_BACKTRACE=1` in the daemon's environment (as on many machines)
/// must not hand the host's stack to a guest: an error the guest reads
/// (here a response body cut off at http_max_response_kb) says what
/// happened, not which host frames it happened in.
#[test]
fn with_rust_backtrace_set_a_guest_sees_no_host_frames() {
    use colony_tests::model_server::{ModelServer, Scripted};
    let server = ModelServer::start();
    server.push(Scripted::answer("x".repeat(5000)));
    let env = Env::new(&["fetcher"]);
    let manifest = format!(
        "allowed_hosts = [{:?}]\nhttp_max_response_kb = 1\n",
        server.url()
    );
    std::fs::write(env.agents.path().join("fetcher.toml"), manifest).unwrap();
    // The scripted answer goes to the first chat completion.
    let url = format!("{}/chat/completions", server.openai_url());
    let request = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
    let payload = serde_json::json!({"requests": [
        {"url": url, "method": "POST", "body": request.to_string(),
         "headers": [["content-type", "application/json"]]}
    ]});
    let id = env.submit(&["fetcher", &payload.to_string()]);
    let daemon = ["daemon", "--until-idle", "--poll", "100ms"];
    env.ok_with_env(&daemon, &[("RUST_BACKTRACE", "1")]);
    let result = &env.show(id)["result"];
    let error = result["results"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("body size"), "{result}");
    assert!(!error.contains("backtrace"), "{error}");
}

#[test]
fn agents_reports_every_wasm_entry_in_one_line_each() {
    let env = Env::new(&["noop"]);
    let dir = env.agents.path();
    std::os::unix::fs::symlink("/no/such/target.wasm", dir.join("dangling.wasm")).unwrap();
    std::fs::create_dir(dir.join("dir.wasm")).unwrap();
    std::fs::copy(dir.join("noop.wasm"), dir.join("fuelless.wasm")).unwrap();
    std::fs::write(dir.join("fuelless.toml"), "fuel = 0\n").unwrap();
    std::fs::copy(dir.join("noop.wasm"), dir.join("misspelt.wasm")).unwrap();
    std::fs::write(dir.join("misspelt.toml"), "fuel = 10\ntimout = \"5s\"\n").unwrap();
    // One unit of fuel: instantiating traps.
    std::fs::copy(dir.join("noop.wasm"), dir.join("starved.wasm")).unwrap();
    std::fs::write(dir.join("starved.toml"), "fuel = 1\n").unwrap();
    std::fs::write(dir.join(OsStr::from_bytes(b"bad\xffname.wasm")), b"").unwrap();

    // With backtraces on, as the report that found the broken table had
    // them: a start-up trap's reason then held the host's backtrace.
    let agents = |json: &[&str]| {
        let args = [json, &["agents"]].concat();
        let out = env.ok_with_env(&args, &[("RUST_BACKTRACE", "1")]);
        String::from_utf8(out.stdout).unwrap()
    };
    let text = agents(&[]);
    let lines: Vec<&str> = text.lines().collect();
    let names = [
        "bad\u{fffd}name",
        "dangling",
        "dir",
        "fuelless",
        "misspelt",
        "noop",
        "starved",
    ];
    assert_eq!(lines.len(), names.len(), "one line per entry:\n{text}");
    for (line, name) in lines.iter().zip(names) {
        assert!(line.starts_with(name), "{name} in {line:?}");
        assert!(line.chars().count() < 220, "a long line: {line}");
    }
    let reason = |name: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(name))
            .unwrap()
            .to_string()
    };
    assert!(
        reason("dangling").contains("symbolic link to /no/such/target.wasm"),
        "{text}"
    );
    assert!(reason("dir ").contains("a directory"), "{text}");
    assert!(
        reason("fuelless").contains("fuelless.toml") && reason("fuelless").contains("`fuel`"),
        "{text}"
    );
    assert!(reason("fuelless").contains("at least 1"), "{text}");
    // A key we do not know: named, with where it is, on the row itself.
    assert!(
        reason("misspelt").contains("misspelt.toml:2:1: unknown field `timout`"),
        "{text}"
    );
    assert!(reason("starved").contains("all fuel consumed"), "{text}");

    let json: Value = serde_json::from_str(&agents(&["--json"])).unwrap();
    let entries = json.as_array().unwrap();
    assert_eq!(entries.len(), names.len(), "{json}");
    let starved = entries.iter().find(|e| e["name"] == "starved").unwrap();
    // The trap, without the host's backtrace that RUST_BACKTRACE asks for.
    let why = starved["reason"].as_str().unwrap();
    assert!(why.contains("all fuel consumed"), "{starved}");
    assert!(!why.contains("Stack backtrace"), "{starved}");
    let misspelt = entries.iter().find(|e| e["name"] == "misspelt").unwrap();
    assert!(
        misspelt["reason"].as_str().unwrap().contains("2 | timout"),
        "the full text, TOML's excerpt too, is in --json: {misspelt}"
    );
    assert!(env.ok(&["status"]).lines().all(|l| l.chars().count() < 220));
}

/// A run's memory goes back when the run ends: memory bombs one after
/// another (each stopped at its 64 MiB cap) leave the daemon no larger than
/// a few of them. Freed slots were decommitted 64 at a time, so 24 bombs
/// kept ~1.5 GiB resident, and 64 bombs of a 4 GiB cap would have kept
/// 256 GiB.
#[test]
fn memory_bombs_leave_no_memory_behind() {
    let env = Env::new(&["membomb"]);
    std::fs::write(
        env.agents.path().join("membomb.toml"),
        "memory_mb = 64\nconcurrency = 1\n",
    )
    .unwrap();
    let batch: String = (0..24)
        .map(|_| "{\"agent\":\"membomb\",\"payload\":{},\"max_attempts\":1}\n")
        .collect();
    let batch = env.file("bombs.jsonl", batch);
    env.ok(&["submit", "--batch", &batch]);
    let daemon = env.daemon(&["--poll", "100ms"]);
    common::wait_for("every bomb to fail", Duration::from_secs(120), || {
        env.queue()
            .counts()
            .unwrap()
            .iter()
            .all(|c| c.1 == colony::task::State::Failed)
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.id())).unwrap();
    let resident_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let failed = env.json(&["list", "--state", "failed"]);
    assert_eq!(failed.as_array().unwrap().len(), 24);
    assert!(
        failed
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["error"]["kind"] == "out_of_memory"),
        "{failed}"
    );
    assert!(
        resident_kib < 512 << 10,
        "the daemon keeps {} MiB after 24 runs of 64 MiB, one at a time",
        resident_kib >> 10
    );
}

/// A queue of four spinning tasks, all started by a daemon with this
/// `--grace` (its stderr piped).
fn four_spinners_under_a_daemon(grace: &str) -> (Env, common::Daemon) {
    let env = Env::new(&["spin"]);
    std::fs::write(
        env.agents.path().join("spin.toml"),
        "timeout = \"300s\"\nconcurrency = 4\n",
    )
    .unwrap();
    for _ in 0..4 {
        env.submit(&["spin", "{}"]);
    }
    let child = env
        .cmd()
        .args(["daemon", "--grace", grace, "--poll", "100ms"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let daemon = common::Daemon::new(child);
    common::wait_for("the spinners to start", Duration::from_secs(60), || {
        env.queue()
            .counts()
            .unwrap()
            .iter()
            .any(|c| c.1 == colony::task::State::InProgress && c.2 == 4)
    });
    (env, daemon)
}

/// A second SIGINT exits at once, however busy the daemon is: two signals
/// the runtime had not yet got round to were one wake-up (its workers busy
/// with spinning guests), and the daemon waited out its whole grace. The
/// same Ctrl-C delivered twice within a few ms (the terminal's and a
/// wrapper's) is one signal: the graceful stop.
#[test]
fn a_second_signal_exits_at_once_while_guests_spin() {
    let (_env, mut daemon) = four_spinners_under_a_daemon("300s");
    std::thread::sleep(Duration::from_millis(300));
    common::signal(&daemon, "-INT");
    std::thread::sleep(Duration::from_millis(150));
    common::signal(&daemon, "-INT");
    common::wait_for("the daemon to exit", Duration::from_secs(30), || {
        daemon.try_wait().unwrap().is_some()
    });
    let out = daemon.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{said}");
    assert!(said.contains("second signal: exiting now"), "{said}");

    // One Ctrl-C delivered twice at once: the graceful stop, its grace
    // waited out (1 s here), the spinners released. (A queue of its own:
    // the first daemon's leases are still held.)
    let (env, mut daemon) = four_spinners_under_a_daemon("1s");
    // 2 ms apart: the kernel would merge two signals sent at once, and
    // the further apart, the likelier this thread is held up past the
    // 50 ms window on a loaded machine.
    let pid = daemon.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    common::wait_for("the daemon to stop", Duration::from_secs(60), || {
        daemon.try_wait().unwrap().is_some()
    });
    let out = daemon.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("second signal"), "{said}");
    assert_eq!(out.status.code(), Some(0), "{said}");
    let ready = env.json(&["list", "--state", "ready"]);
    assert_eq!(ready.as_array().unwrap().len(), 4, "released: {ready}");
}

/// Bytes that are not UTF-8 on stdin are bad input, as in a file: exit 2,
/// kind bad_input, nothing stored (it was exit 1, "error").
#[test]
fn stdin_that_is_not_utf8_is_bad_input() {
    let env = Env::new(&["echo"]);
    for args in [
        &["--json", "submit", "echo", "-"][..],
        &["--json", "submit", "echo", "--payload-file", "-"],
        &["--json", "submit", "--batch", "-"],
    ] {
        let out = env.run_with_stdin(args, b"{\"agent\":\"echo\",\"s\":\"\xff\xfe\"}\n");
        let said: Value = serde_json::from_slice(&out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        assert_eq!(said["kind"], "bad_input", "{args:?}: {said}");
        assert!(
            said["error"].as_str().unwrap().contains("not UTF-8"),
            "{said}"
        );
    }
    assert!(!env.db().exists() || env.task_count() == 0);
}

/// `colony agents` keeps its columns for names of any length (a name of 15
/// characters or more ran into its state).
#[test]
fn agent_listing_columns_fit_long_names() {
    let env = Env::new(&["echo"]);
    let agents = env.agents.path();
    std::fs::copy(
        agents.join("echo.wasm"),
        agents.join("a-rather-long-agent-name.wasm"),
    )
    .unwrap();
    std::fs::write(
        agents.join("orphan-manifest-of-nobody.toml"),
        "timeout = \"1s\"\n",
    )
    .unwrap();
    let listed = env.ok(&["agents"]);
    let columns: Vec<usize> = listed
        .lines()
        .map(|line| {
            line.find(" loaded ")
                .or_else(|| line.find(" IGNORED "))
                .unwrap_or_else(|| panic!("{listed}"))
        })
        .collect();
    assert_eq!(columns.len(), 3, "{listed}");
    assert!(columns.iter().all(|&c| c == columns[0]), "{listed}");
    // What a command prints is not logged besides, line by line (every
    // `colony status` said "INFO agent loaded" once per agent).
    let status = env.ok_with_env(&["status"], &[("COLONY_LOG", "info")]);
    let said = String::from_utf8_lossy(&status.stderr);
    assert!(!said.contains("agent loaded"), "{said}");
}

/// libfaketime's library, or why the clock-step test cannot run here
/// (`COLONY_REQUIRE_FAKETIME`, set by CI, makes that a failure).
fn faketime_library() -> Option<std::path::PathBuf> {
    let found = [
        "/usr/lib/x86_64-linux-gnu/faketime",
        "/usr/lib/aarch64-linux-gnu/faketime",
        "/usr/lib/faketime",
    ]
    .iter()
    .map(|dir| std::path::Path::new(dir).join("libfaketimeMT.so.1"))
    .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("COLONY_REQUIRE_FAKETIME").is_none(),
            "COLONY_REQUIRE_FAKETIME is set, and libfaketime is not installed (apt install libfaketime)"
        );
        eprintln!("skipped: the clock-step test needs libfaketime (apt install libfaketime)");
    }
    found
}

/// The machine's clock steps forward an hour while one daemon runs tasks
/// and another watches the same SQLite queue: the watcher does not take
/// the runner's live leases (timed by the hosts' clocks, they all looked an
/// hour old), so no task runs twice or fails `lease_expired` for nothing.
#[test]
fn a_clock_step_forward_resets_no_live_lease() {
    let Some(faketime) = faketime_library() else {
        return;
    };
    let env = Env::new(&["sleeper"]);
    let batch = env.data.path().join("sleepers.jsonl");
    let line = r#"{"agent":"sleeper","payload":{"ms":9000},"max_attempts":1}"#;
    std::fs::write(&batch, format!("{line}\n").repeat(4)).unwrap();
    env.ok(&["submit", "--batch", batch.to_str().unwrap()]);
    let offset = env.data.path().join("clock-offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let daemon = || {
        env.cmd()
            .args([
                "daemon",
                "--until-idle",
                "--heartbeat",
                "300ms",
                "--stale-after",
                "2s",
                "--poll",
                "100ms",
            ])
            .env("LD_PRELOAD", &faketime)
            .env("FAKETIME_TIMESTAMP_FILE", &offset)
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let runner = daemon();
    common::wait_for(
        "the runner to claim all four",
        Duration::from_secs(30),
        || {
            env.json(&["list", "--state", "in_progress"])
                .as_array()
                .unwrap()
                .len()
                == 4
        },
    );
    // The watcher, past its own wait before it may reset leases.
    let watcher = daemon();
    std::thread::sleep(Duration::from_millis(3000));
    std::fs::write(&offset, "+1h\n").unwrap();
    for child in [runner, watcher] {
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
    }
    let tasks = env.json(&["list"]);
    for task in tasks.as_array().unwrap() {
        assert_eq!(task["state"], "complete", "{task}");
    }
    let events: Vec<Value> = env
        .ok(&["events"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        !events.iter().any(|e| e["event"] == "lease_expired"),
        "{events:?}"
    );
}

/// A file-size limit (`ulimit -f`) passed while writing the queue is an
/// I/O error, said with where to look: it killed the process by SIGXFSZ,
/// silently (a daemon holding leases). The queue is left as it was before
/// the refused write.
#[test]
fn a_file_size_limit_is_an_error_said_not_a_silent_death() {
    use std::os::unix::process::CommandExt;
    let env = Env::new(&["echo"]);
    env.submit(&["echo", "{}"]);
    let batch = env.data.path().join("big.jsonl");
    let line = format!(
        "{{\"agent\":\"echo\",\"payload\":{{\"pad\":\"{}\"}}}}\n",
        "x".repeat(50_000)
    );
    std::fs::write(&batch, line.repeat(40)).unwrap();
    let limit = std::fs::metadata(env.db()).unwrap().len() + 256 * 1024;
    let mut submit = env.cmd();
    submit.args(["submit", "--batch", batch.to_str().unwrap()]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        submit.pre_exec(move || {
            let cap = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            match libc::setrlimit(libc::RLIMIT_FSIZE, &cap) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let out = submit.output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}: {said}", out.status);
    assert!(said.contains("file-size limit"), "{said}");
    assert_eq!(
        env.json(&["list"]).as_array().unwrap().len(),
        1,
        "nothing of the batch stored"
    );
}

/// The `-wal` and `-shm` files deleted under a running daemon (the main
/// file left): the daemon stops at its next heartbeat saying so. It went
/// on silently, its commits in a deleted file, and a submit acknowledged
/// meanwhile was later lost.
#[test]
fn a_deleted_wal_file_stops_the_daemon_saying_so() {
    let env = Env::new(&["echo"]);
    env.submit(&["echo", "{}"]);
    let mut daemon = env
        .cmd()
        .args(["daemon", "--heartbeat", "100ms", "--poll", "100ms"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let db = env.db();
    common::wait_for("the task to complete", Duration::from_secs(30), || {
        env.show(1)["state"] == "complete"
    });
    for suffix in ["-wal", "-shm"] {
        std::fs::remove_file(format!("{}{suffix}", db.display())).unwrap();
    }
    common::wait_for("the daemon to stop", Duration::from_secs(30), || {
        daemon.try_wait().unwrap().is_some()
    });
    let out = daemon.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("cut off from its -wal file"), "{said}");
}
