//! Regression tests for the queue's hardening (issue 9): nothing is stored
//! that cannot be read back, one unreadable row never hides the others, a
//! refused late result is on the audit trail, and errors that retrying
//! cannot fix are told apart from transient ones.
//!
//! Each test runs on both drivers (`name::sqlite`, `name::postgres`), but
//! the classification of SQLite's own error codes, which has PostgreSQL
//! counterparts of its own at the end.

mod common;
use common::{TestDb, on_both_drivers};

use std::time::Duration;

use colony::queue::{Applied, ListFilter, Queue, QueueError, QueueOptions, all_readable};
use colony::task::{NewTask, NextSpec, RunOutcome, SpawnSpec, State};
use serde_json::json;

fn task_count(q: &Queue) -> usize {
    q.list(&ListFilter::default()).unwrap().len()
}

/// Documents serde_json can skip over but not read into a value (they used
/// to be stored and then made every listing fail), or that an agent's JSON
/// reader cannot (a number past a 64-bit float's range).
const UNREADABLE_JSON: &[(&str, &str)] = &[
    ("huge number", "1e999"),
    ("lone surrogate", r#"{"a":"\ud800"}"#),
    ("129-deep array", "129"),
];

fn document(spec: &str) -> String {
    match spec.parse::<usize>() {
        Ok(depth) => format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        Err(_) => spec.to_string(),
    }
}

on_both_drivers! {
    fn payloads_that_cannot_be_read_back_are_refused_naming_the_field(db) {
        let mut q = db.open();
        for (what, spec) in UNREADABLE_JSON {
            let err = q.submit(&NewTask::new("noop", document(spec))).unwrap_err();
            assert!(err.is_bad_input(), "{what}: {err}");
            assert!(err.to_string().contains("invalid payload"), "{what}: {err}");
            let err = q
                .submit_batch(&[
                    NewTask::new("noop", "{}"),
                    NewTask::new("noop", document(spec)),
                ])
                .unwrap_err();
            assert!(
                err.to_string().starts_with("task #2 of the batch"),
                "{what}: {err}"
            );
        }
        // 127 deep is the most serde_json reads, so it is accepted and reads back.
        q.submit(&NewTask::new("noop", document("127"))).unwrap();
        assert_eq!(task_count(&q), 1, "only the readable payload was stored");
        all_readable(q.list(&ListFilter::default()).unwrap()).unwrap();
    }

    fn a_chain_nested_too_deep_to_read_back_is_refused(db) {
        let mut q = db.open();
        // Each chain level adds two levels of nesting to the stored `next_tasks`.
        let payload: serde_json::Value = serde_json::from_str(&document("100")).unwrap();
        let mut next = Vec::new();
        for _ in 0..20 {
            next = vec![NextSpec {
                agent: "noop".into(),
                payload: payload.clone(),
                priority: 0,
                review: false,
                next,
            }];
        }
        let mut new = NewTask::new("noop", "{}");
        new.next = next;
        let err = q.submit(&new).unwrap_err();
        assert!(err.to_string().contains("invalid next"), "{err}");
        assert!(err.to_string().contains("nested too deeply"), "{err}");
        assert_eq!(task_count(&q), 0);
        // In a batch of plain tasks (many rows per statement on PostgreSQL)
        // it is named by its place, and nothing of the batch is stored.
        let plain = NewTask::new("noop", "{}");
        let err = q
            .submit_batch(&[plain.clone(), plain.clone(), new, plain])
            .unwrap_err();
        assert!(err.to_string().starts_with("task #3 of the batch"), "{err}");
        assert!(err.to_string().contains("nested too deeply"), "{err}");
        assert_eq!(task_count(&q), 0);
    }

    fn an_output_or_spawn_that_cannot_be_read_back_fails_the_run_as_invalid_output(db) {
        let mut q = db.open();
        for (what, spec) in UNREADABLE_JSON {
            let id = q.submit(&NewTask::new("noop", "{}")).unwrap().id;
            let lease = q.claim("noop", 1).unwrap()[0].lease;
            let outcome = RunOutcome::Success {
                output: document(spec),
                spawn: vec![],
                needs_review: false,
            };
            assert_eq!(
                q.finish(lease, outcome, "").unwrap(),
                Applied::Moved(State::Failed)
            );
            let task = q.get(id).unwrap();
            assert_eq!(
                task.error.unwrap().kind.as_str(),
                "invalid_output",
                "{what}"
            );

            let id = q.submit(&NewTask::new("noop", "{}")).unwrap().id;
            let lease = q.claim("noop", 1).unwrap()[0].lease;
            let outcome = RunOutcome::Success {
                output: "{}".into(),
                spawn: vec![SpawnSpec {
                    agent: "noop".into(),
                    payload: document(spec),
                    priority: 0,
                    review: false,
                }],
                needs_review: false,
            };
            assert_eq!(
                q.finish(lease, outcome, "").unwrap(),
                Applied::Moved(State::Failed)
            );
            assert_eq!(
                q.get(id).unwrap().error.unwrap().kind.as_str(),
                "invalid_output"
            );
        }
        all_readable(q.list(&ListFilter::default()).unwrap()).unwrap();
    }

    fn an_unreadable_row_is_listed_with_its_reason_and_hides_nothing(db) {
        let mut q = db.open();
        let good = q.submit(&NewTask::new("noop", r#"{"n":1}"#)).unwrap().id;
        let bad = q.submit(&NewTask::new("noop", r#"{"n":2}"#)).unwrap().id;
        let after = q.submit(&NewTask::new("noop", r#"{"n":3}"#)).unwrap().id;
        // What an older build could store: a payload serde_json cannot read.
        db.raw().execute(&format!(
            r#"UPDATE tasks SET payload = '{{"a":"\ud800"}}' WHERE id = {bad}"#
        ));

        let rows = q.list(&ListFilter::default()).unwrap();
        let ids: Vec<i64> = rows
            .iter()
            .map(|r| r.as_ref().map_or_else(|u| u.id, |t| t.id))
            .collect();
        assert_eq!(ids, vec![after, bad, good]);
        let unreadable = rows[1].as_ref().unwrap_err();
        assert!(
            unreadable.reason.contains("payload"),
            "{}",
            unreadable.reason
        );
        assert!(rows[0].is_ok() && rows[2].is_ok());
        assert!(matches!(q.get(bad), Err(QueueError::Corrupt(_))));
        // The row can still be dealt with: cancelled, and its events read.
        assert_eq!(q.cancel(bad, "unreadable").unwrap(), vec![bad]);
        assert!(!q.events(Some(bad), 0, 100).unwrap().is_empty());
    }

    fn a_late_result_after_a_lost_lease_is_refused_on_the_audit_trail(db) {
        let mut q = db.open();
        let id = q.submit(&NewTask::new("noop", "{}")).unwrap().id;
        let old = q.claim("noop", 1).unwrap()[0].lease;
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(
            q.reset_stale_leases(std::time::Duration::ZERO)
                .unwrap()
                .len(),
            1
        );
        let new = q.claim("noop", 1).unwrap()[0].lease;
        let late = RunOutcome::Success {
            output: "{}".into(),
            spawn: vec![],
            needs_review: false,
        };
        assert_eq!(q.finish(old, late, "").unwrap(), Applied::LeaseLost);
        let events = q.events(Some(id), 0, 100).unwrap();
        let refused = events.last().unwrap();
        assert_eq!(refused.event, "result_refused");
        assert_eq!(
            (refused.from, refused.to),
            (Some(State::InProgress), State::InProgress)
        );
        assert_eq!(refused.detail["refused_lease"], json!(old.token));
        assert_eq!(refused.detail["outcome"], json!("success"));
        assert!(
            refused.detail["current_holder"].is_string(),
            "{}",
            refused.detail
        );
        // The newer life of the task is untouched and finishes normally.
        let done = RunOutcome::Success {
            output: "{}".into(),
            spawn: vec![],
            needs_review: false,
        };
        assert_eq!(
            q.finish(new, done, "").unwrap(),
            Applied::Moved(State::Complete)
        );
    }
}

// SQLite only: it classifies SQLite's own error codes (a read-only file,
// SQLITE_BUSY); the PostgreSQL equivalents follow.
#[test]
fn a_read_only_database_is_a_permanent_error_not_a_transient_one() {
    let db = TestDb::sqlite();
    let path = db.path();
    db.open().submit(&NewTask::new("noop", "{}")).unwrap();
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let conn = rusqlite::Connection::open_with_flags(path, flags).unwrap();
    let err: QueueError = conn
        .execute("UPDATE tasks SET priority = 1", [])
        .unwrap_err()
        .into();
    assert!(err.is_permanent(), "{err}");
    assert!(!err.is_transient(), "{err}");
    let busy: QueueError =
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None)
            .into();
    assert!(busy.is_transient() && !busy.is_permanent());
}

// PostgreSQL only: a server that only allows reads (a standby, or
// `default_transaction_read_only`) refuses every write, and retrying
// cannot help.
#[test]
fn a_read_only_postgres_database_is_a_permanent_error_not_a_transient_one() {
    let Some(db) = TestDb::postgres() else { return };
    let id = db.open().submit(&NewTask::new("noop", "{}")).unwrap().id;
    let name = db.url().rsplit('/').next().unwrap().to_string();
    db.raw().execute(&format!(
        "ALTER DATABASE {name} SET default_transaction_read_only = on"
    ));
    // The setting holds for sessions started from now on.
    let mut q = db.open();
    assert_eq!(q.get(id).unwrap().state, State::Ready, "reads still work");
    let err = q.submit(&NewTask::new("noop", "{}")).unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(!err.is_transient(), "{err}");
    assert!(!err.is_bad_input(), "{err}");
}

// PostgreSQL only: SQLite's SQLITE_BUSY, here a row lock held past the
// queue's `busy_timeout` (`lock_timeout`): transient, the write can be
// retried, and nothing was stored.
#[test]
fn a_postgres_row_locked_past_the_busy_timeout_is_a_transient_error() {
    let Some(db) = TestDb::postgres() else { return };
    let id = db.open().submit(&NewTask::new("noop", "{}")).unwrap().id;
    let common::Raw::Postgres(mut other) = db.raw() else {
        unreachable!()
    };
    let mut holder = other.transaction().unwrap();
    holder
        .execute(
            &format!("SELECT id FROM tasks WHERE id = {id} FOR UPDATE"),
            &[],
        )
        .unwrap();
    let opts = QueueOptions {
        busy_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let mut q = db.try_open(opts).unwrap();
    let err = q.cancel(id, "while locked").unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(!err.is_permanent() && !err.is_bad_input(), "{err}");
    holder.rollback().unwrap();
    // Once the lock is gone, the same write goes through.
    assert_eq!(q.cancel(id, "unlocked").unwrap(), vec![id]);
}

// SQLite only (PostgreSQL's CHECK refuses the write): a state written into
// the file by hand that colony does not know is reported as unreadable,
// naming it, and the row is never claimed; the other tasks still run.
#[test]
fn a_sqlite_row_edited_to_an_unknown_state_is_reported_and_never_claimed() {
    let db = TestDb::sqlite();
    let mut q = db.open();
    let good = q.submit(&NewTask::new("noop", "{}")).unwrap().id;
    let bad = q.submit(&NewTask::new("noop", "{}")).unwrap().id;
    db.raw().execute(&format!(
        "UPDATE tasks SET state = 'paused' WHERE id = {bad}"
    ));

    let claimed: Vec<i64> = q
        .claim("noop", 10)
        .unwrap()
        .iter()
        .map(|t| t.lease.task_id)
        .collect();
    assert_eq!(claimed, vec![good]);
    let err = q.get(bad).unwrap_err();
    assert!(
        matches!(err, QueueError::Corrupt(_)) && err.to_string().contains("\"paused\""),
        "{err}"
    );
    let rows = q.list(&ListFilter::default()).unwrap();
    let unreadable: Vec<_> = rows.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(unreadable.len(), 1);
    assert_eq!(unreadable[0].id, bad);
    assert!(
        unreadable[0].reason.contains("paused"),
        "{}",
        unreadable[0].reason
    );
}

/// Processes starting together on a fresh file (a daemon and a submit, say)
/// all open it: switching it to WAL upgrades a read lock, which SQLite
/// refuses at once rather than wait, and one in a hundred failed 'database
/// is locked'. Threads contend for the file's locks as processes do.
#[test]
fn queues_opened_at_once_on_a_fresh_file_all_open() {
    use std::sync::{Arc, Barrier};
    for round in 0..40 {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().join("fresh.db"));
        let barrier = Arc::new(Barrier::new(6));
        let openers: Vec<_> = (0..6)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    Queue::open(path.as_path()).map(drop)
                })
            })
            .collect();
        for opener in openers {
            if let Err(e) = opener.join().unwrap() {
                panic!("round {round}: {e}");
            }
        }
    }
}
