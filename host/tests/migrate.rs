//! `colony migrate`: a SQLite queue with history of every kind (chains,
//! review, failures, cancellations, dependencies, logs, state, effects)
//! copied into an empty PostgreSQL database reads back the same through
//! every command, and the copy goes on working.

mod common;

use colony_tests::model_server::ModelServer;
use common::{Env, TestDb};
use serde_json::{Value, json};

/// Everything the CLI shows about the queue, as JSON.
fn everything(env: &Env) -> Value {
    let list = env.json(&["list"]);
    let shown: Vec<Value> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| env.show(t["id"].as_i64().unwrap()))
        .collect();
    json!({
        "list": list,
        "shown": shown,
        "state": env.json(&["state", "list", "--agent", "echo"]),
        "effects": env.json(&["effects"]),
    })
}

#[test]
fn a_sqlite_queue_moves_to_postgres_whole_and_keeps_working() {
    let Some(target) = TestDb::postgres() else {
        return;
    };
    let source = Env::new(&["echo", "stateful"]);
    let server = ModelServer::start();
    std::fs::write(
        source.agents.path().join("stateful.toml"),
        format!("allowed_hosts = [{:?}]\n", server.url()),
    )
    .unwrap();
    // History of every kind: a chain, a task held in review with a proposed
    // effect, a sent effect, a failure, a cancellation cascading to a
    // dependent, operator state.
    source.submit(&[
        "echo",
        "{}",
        "--next",
        r#"[{"agent": "echo", "payload": {"step": 2}}]"#,
    ]);
    let effect = |review: bool| {
        json!({"ops": [["effect", "POST", format!("{}/orders", server.url()), "{}"]], "review": review})
            .to_string()
    };
    let reviewed = source.submit(&["stateful", &effect(true)]);
    source.submit(&["stateful", &effect(false)]);
    let failing = source.submit(&["stateful", r#"{"ops": [["no such op"]]}"#]);
    let blocker = source.submit(&["echo", "{}", "--at", "2099-01-01T00:00:00Z"]);
    source.submit(&["echo", "{}", "--after", &blocker.to_string()]);
    source.ok(&["cancel", &blocker.to_string()]);
    source.until_idle(&[]);
    source.ok(&["state", "set", "--agent", "echo", "greeting", r#""hello""#]);
    let before = everything(&source);
    assert_eq!(before["shown"].as_array().unwrap().len(), 7, "{before}");
    assert_eq!(
        source.show(failing)["state"],
        "failed",
        "the fixture failed as asked"
    );

    let to = target.location();
    let out = source.run(&[
        "--json".as_ref(),
        "migrate".as_ref(),
        "--from".as_ref(),
        source.db().as_os_str(),
        "--to".as_ref(),
        to.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["copied"]["tasks"], 7, "{report}");
    assert_eq!(report["copied"]["state"], 1, "{report}");
    assert_eq!(report["copied"]["effects"], 2, "{report}");
    assert!(
        report["copied"]["events"].as_u64().unwrap() > 10,
        "{report}"
    );
    assert!(
        report["copied"]["task_logs"].as_u64().unwrap() >= 2,
        "{report}"
    );

    // The same queue, read through every command, on PostgreSQL.
    let copy = Env::on(target, &["echo", "stateful"]);
    std::fs::copy(
        source.agents.path().join("stateful.toml"),
        copy.agents.path().join("stateful.toml"),
    )
    .unwrap();
    assert_eq!(everything(&copy), before);

    // A second copy into the now non-empty database is refused, naming
    // what is there, and changes nothing.
    let again = source.run(&[
        "migrate".as_ref(),
        "--from".as_ref(),
        source.db().as_os_str(),
        "--to".as_ref(),
        to.as_os_str(),
    ]);
    assert_eq!(again.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("not empty") && stderr.contains("tasks has 7 rows"),
        "{stderr}"
    );
    assert_eq!(everything(&copy), before);

    // The copy keeps working: new ids follow the copied ones, the held
    // review completes and sends its effect.
    let fresh = copy.submit(&["echo", "{}"]);
    assert_eq!(fresh, 8);
    copy.ok(&["review", &reviewed.to_string(), "approve"]);
    copy.until_idle(&[]);
    assert_eq!(copy.show(fresh)["state"], "complete");
    let approved = copy.show(reviewed);
    assert_eq!(approved["state"], "complete");
    assert_eq!(approved["effects"][0]["state"], "sent", "{approved}");
}

#[test]
fn migrate_refuses_a_missing_source_and_the_same_database() {
    let env = Env::new(&["echo"]);
    let missing = env.run(&[
        "migrate",
        "--from",
        "/nonexistent/colony.db",
        "--to",
        "x.db",
    ]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such database file"));
    env.submit(&["echo", "{}"]);
    let db = env.db();
    let same = env.run(&[
        "migrate".as_ref(),
        "--from".as_ref(),
        db.as_os_str(),
        "--to".as_ref(),
        db.as_os_str(),
    ]);
    assert_eq!(same.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&same.stderr).contains("the same database"));
}

/// The source is read, never written: one of an older schema is read
/// through an upgraded copy and left on its schema (upgraded in place, the
/// older build, the way back, refused it), and a file that is not a colony
/// queue is refused as it is (it got colony's tables added to it).
#[test]
fn migrate_leaves_its_source_as_it_was() {
    let env = Env::new(&["echo"]);
    let id = env.submit(&["echo", "{}"]);
    let db = env.db().to_str().unwrap().to_string();
    // The schema before this build's newest migration (11, an index).
    let schema = |path: &str| -> (u32, i64) {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.query_row(
            "SELECT (SELECT user_version FROM pragma_user_version),
                    (SELECT COUNT(*) FROM sqlite_master WHERE name = 'tasks_failed_recently')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    let newest = schema(&db).0;
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(&format!(
            "DROP INDEX tasks_failed_recently; PRAGMA user_version = {};",
            newest - 1
        ))
        .unwrap();
    let to = env.data.path().join("copy.db");
    let to = to.to_str().unwrap();
    let out = env.run(&["migrate", "--from", &db, "--to", to]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("it is read through an upgraded copy and left as it is"),
        "{said}"
    );
    assert_eq!(
        schema(&db),
        (newest - 1, 0),
        "the source is on its schema still"
    );
    assert!(
        !said.contains("upgraded from schema"),
        "the copy's upgrade is said once: {said}"
    );
    assert_eq!(schema(to), (newest, 1));
    assert_eq!(env.json(&["--db", to, "show", &id.to_string()])["id"], id);
    // Any command opening an older database upgrades it, and says so (it
    // did so silently: an older build could not open it after).
    let listed = env.run(&["--db", &db, "list"]);
    let said = String::from_utf8_lossy(&listed.stderr);
    assert!(listed.status.success(), "{said}");
    let upgrade = format!("upgraded from schema version {} to {newest}", newest - 1);
    assert!(said.contains(&upgrade), "{said}");
    assert_eq!(schema(&db), (newest, 1));
    let again = env.run(&["--db", &db, "list"]);
    assert!(
        !String::from_utf8_lossy(&again.stderr).contains("upgraded"),
        "once"
    );

    // Not a colony queue: another program's database, an empty file.
    let other = env.data.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE foo (x);")
        .unwrap();
    let empty = env.file("empty.db", "");
    for (from, says) in [
        (
            other.to_str().unwrap(),
            "is not a colony queue: it is a SQLite database of something else",
        ),
        (&empty, "holds no queue yet"),
    ] {
        let out = env.run(&["migrate", "--from", from, "--to", &format!("{to}.2")]);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{said}");
        assert!(
            said.contains("nothing was copied") && said.contains(says),
            "{said}"
        );
        assert!(!said.contains("--db"), "its file is its --from: {said}");
    }
    let tables: i64 = rusqlite::Connection::open(&other)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tables, 1, "only its own table");
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
}

/// A source whose daemon is still running (leases renewed within the last
/// minute) is refused, naming the holder, and nothing is written; --force
/// copies it. A PostgreSQL URL naming no database, or with its :// mistyped,
/// is refused without showing the password.
#[test]
fn migrate_refuses_a_source_with_a_running_daemon_and_urls_are_checked() {
    let env = Env::new(&["echo"]);
    env.submit(&["echo", "{}"]);
    let mut q = env.queue();
    q.set_actor("daemon@elsewhere");
    assert_eq!(q.claim("echo", 1).unwrap().len(), 1);
    let target = env.data.path().join("copy.db");
    let copy = |extra: &[&str]| {
        let mut args = vec!["migrate", "--to", target.to_str().unwrap()];
        args.extend_from_slice(extra);
        let from = env.db();
        args.extend(["--from", from.to_str().unwrap()]);
        env.run(&args)
    };
    let refused = copy(&[]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(
        said.contains("daemon@elsewhere (1)") && said.contains("--force"),
        "{said}"
    );
    assert!(
        !target.exists(),
        "nothing is written, not even the target's schema"
    );
    let forced = copy(&["--force"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );

    for url in [
        "postgres://bob:hunter2@127.0.0.1:1",
        "postgresql:bob:hunter2@127.0.0.1:1/colony",
        "postgres//bob:hunter2@127.0.0.1:1/colony",
    ] {
        let out = env.run(&["--db", url, "status"]);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {said}");
        assert!(!said.contains("hunter2"), "{url}: {said}");
        assert!(
            !std::path::Path::new(env.data.path()).join(url).exists(),
            "{url} became a file"
        );
    }
}
