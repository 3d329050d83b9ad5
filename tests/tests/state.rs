//! Durable state through the host (issue 11): the `stateful` fixture reads
//! and writes through the real runtime and daemon; writes commit only with
//! the task's completion (or approval), never otherwise.

mod common;

use colony::queue::Queue;
use colony::state::{Entry, Scope};
use colony::task::{NewTask, State};
use colony_tests::agents_dir_with;
use common::Harness;
use serde_json::{Value, json};

fn harness() -> Harness {
    Harness::with_shared_cache(agents_dir_with(&["stateful"]))
}

fn submit(h: &Harness, script: Value, max_attempts: u32) -> i64 {
    let mut task = NewTask::new("stateful", script.to_string());
    task.max_attempts = max_attempts;
    task.backoff_ms = 1;
    h.submit(task)
}

fn agent_entry(q: &Queue, key: &str) -> Option<Entry> {
    q.state_get(Scope::Agent, "stateful", key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reads_its_own_writes_and_they_commit_with_completion() {
    let h = harness();
    let id = submit(
        &h,
        json!({"ops": [
            ["set", "agent", "k", "1"], ["get", "agent", "k"],
            ["set", "agent", "k", "2"], ["set", "agent", "p/a", "\"x\""], ["set", "agent", "p/b", "\"y\""],
            ["delete", "agent", "p/a"], ["scan", "agent", "p/", 10], ["get", "agent", "missing"]
        ]}),
        1,
    );
    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!(task.state, State::Complete, "{:?}", task.error);
    let reads = &task.result.unwrap()["reads"];
    assert_eq!(reads[0], json!({"key": "k", "value": 1, "version": 1}));
    assert_eq!(
        reads[1],
        json!([{"key": "p/b", "value": "y", "version": 1}])
    );
    assert_eq!(reads[2], Value::Null);
    let q = h.queue();
    assert_eq!(agent_entry(&q, "k").unwrap().value, "2");
    assert_eq!(
        agent_entry(&q, "k").unwrap().version,
        2,
        "two writes, two versions"
    );
    assert!(agent_entry(&q, "p/a").is_none());
    let writes = h.events(id, "state_write");
    assert_eq!(writes.len(), 5);
    assert_eq!(writes[0].detail["key"], "k");
    assert_eq!(
        (
            writes[1].detail["old_version"].clone(),
            writes[1].detail["new_version"].clone()
        ),
        (json!(1), json!(2))
    );
    assert!(
        !writes
            .iter()
            .any(|w| w.detail.to_string().contains("\"y\"")),
        "no values on the trail"
    );

    // A second task sees the committed value.
    let next = submit(
        &h,
        json!({"ops": [["get", "agent", "k"], ["scan", "agent", "", 10]]}),
        1,
    );
    h.run_until_idle().await;
    let reads = &h.task(next).result.unwrap()["reads"];
    assert_eq!(reads[0]["value"], 2);
    assert_eq!(reads[1].as_array().unwrap().len(), 2, "k and p/b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_trapped_run_leaves_no_trace_in_state() {
    let h = harness();
    let failed = submit(
        &h,
        json!({"ops": [["set", "agent", "a", "1"]], "end": "retryable"}),
        1,
    );
    let trapped = submit(
        &h,
        json!({"ops": [["set", "agent", "b", "1"]], "end": "trap"}),
        1,
    );
    h.run_until_idle().await;
    assert_eq!(h.task(failed).state, State::Failed);
    assert_eq!(h.task(trapped).state, State::Failed);
    let q = h.queue();
    assert!(agent_entry(&q, "a").is_none() && agent_entry(&q, "b").is_none());
    assert!(h.events(failed, "state_write").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_holds_the_writes_approval_commits_and_rejection_discards() {
    let h = harness();
    let approved = submit(
        &h,
        json!({"ops": [["set", "agent", "approved", "1"]], "review": true}),
        1,
    );
    let rejected = submit(
        &h,
        json!({"ops": [["set", "agent", "rejected", "1"]], "review": true}),
        1,
    );
    h.run_until_idle().await;
    let mut q = h.queue();
    assert_eq!(h.task(approved).state, State::Review);
    assert!(
        agent_entry(&q, "approved").is_none(),
        "held while in review"
    );
    q.approve(approved, None).unwrap();
    assert_eq!(agent_entry(&q, "approved").unwrap().version, 1);
    q.reject(rejected, "no").unwrap();
    assert!(agent_entry(&q, "rejected").is_none());
    assert_eq!(h.task(rejected).state, State::Ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_state_is_shared_along_a_chain_and_isolated_between_chains() {
    let h = harness();
    let child = json!({"ops": [["get", "chain", "c"], ["set", "chain", "c", "\"child\""]]});
    let root = submit(
        &h,
        json!({"ops": [["set", "chain", "c", "\"root\""]], "spawn": [child]}),
        1,
    );
    let other = submit(&h, json!({"ops": [["get", "chain", "c"]]}), 1);
    h.run_until_idle().await;
    let q = h.queue();
    let child = q.children(root).unwrap().remove(0).unwrap();
    assert_eq!(child.state, State::Complete, "{:?}", child.error);
    assert_eq!(child.result.unwrap()["reads"][0]["value"], "root");
    assert_eq!(h.task(other).result.unwrap()["reads"][0], Value::Null);
    let chain = q
        .state_get(Scope::Chain, &root.to_string(), "c")
        .unwrap()
        .unwrap();
    assert_eq!((chain.value.as_str(), chain.version), ("\"child\"", 2));
}

/// A run that failed on its own keeps its failure when its state writes
/// were invalid too: they are discarded with it. They made a retryable
/// failure a permanent invalid_output, its attempts left unused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_runs_invalid_state_writes_do_not_replace_its_failure() {
    let h = harness();
    let script = json!({"ops": [["set", "agent", "bad", "{not json"]], "end": "retryable"});
    let id = submit(&h, script, 2);
    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!(
        (task.state, task.attempts),
        (State::Failed, 2),
        "retried: {task:?}"
    );
    let error = task.error.unwrap();
    assert_eq!(error.kind.as_str(), "retryable", "{error:?}");
    assert!(
        error.message.contains("scripted failure after writing")
            && error
                .message
                .contains("were invalid too: the value of state key \"bad\" is not valid JSON"),
        "{}",
        error.message
    );
    assert!(agent_entry(&h.queue(), "bad").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_state_use_is_the_runs_invalid_output_naming_the_key() {
    let h = harness();
    let long_key = "k".repeat(513);
    let cases = [
        (
            json!({"ops": [["set", "agent", long_key, "1"]]}),
            "must be 1 to 512 bytes",
        ),
        (
            json!({"ops": [["set", "agent", "bad", "{not json"]]}),
            "\"bad\" is not valid JSON",
        ),
        (
            json!({"ops": [["set", "agent", "big", format!("\"{}\"", "x".repeat(256 * 1024))]]}),
            "\"big\" is 262146 bytes",
        ),
        (
            json!({"ops": (0..1001).map(|i| json!(["set", "agent", format!("n{i}"), "1"])).collect::<Vec<_>>()}),
            "more than 1000 state writes in one run (at key \"n1000\")",
        ),
    ];
    let ids: Vec<i64> = cases
        .iter()
        .map(|(script, _)| submit(&h, script.clone(), 1))
        .collect();
    h.run_until_idle().await;
    for (id, (_, expected)) in ids.iter().zip(&cases) {
        let task = h.task(*id);
        assert_eq!(task.state, State::Failed);
        let error = task.error.unwrap();
        assert_eq!(error.kind.as_str(), "invalid_output");
        assert!(error.message.contains(expected), "{}", error.message);
    }
    assert!(
        h.queue()
            .state_scan(Scope::Agent, "stateful", "", 10)
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_with_set_if_end_exactly_right() {
    let h = harness();
    let ids: Vec<i64> = (0..40)
        .map(|_| submit(&h, json!({"increment": "counter"}), 50))
        .collect();
    h.run_until_idle().await;
    let q = h.queue();
    let completed = ids
        .iter()
        .filter(|id| h.task(**id).state == State::Complete)
        .count();
    assert_eq!(completed, 40);
    let counter = agent_entry(&q, "counter").unwrap();
    assert_eq!(counter.value, "40");
    assert_eq!(counter.version, 40);
    let conflicts = ids
        .iter()
        .flat_map(|id| h.events(*id, "retry_later"))
        .filter(|e| e.detail["kind"] == "conflict")
        .count();
    println!("{conflicts} conflicts retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_if_on_the_version_a_run_read_after_its_own_writes_commits() {
    let h = harness();
    h.queue()
        .state_write_by_operator(Scope::Agent, "stateful", "k", Some("0"))
        .unwrap();
    // Committed v1; this run writes v2 and v3, reads v3, then sets if v3.
    let id = submit(
        &h,
        json!({"ops": [
            ["set", "agent", "k", "1"], ["set", "agent", "k", "2"], ["get", "agent", "k"],
            ["set_if", "agent", "k", "3", 3],
            ["delete", "agent", "gone"], ["set", "agent", "gone", "\"back\""], ["get", "agent", "gone"]
        ]}),
        1,
    );
    h.run_until_idle().await;
    let task = h.task(id);
    assert_eq!(task.state, State::Complete, "{:?}", task.error);
    let reads = &task.result.unwrap()["reads"];
    assert_eq!(reads[0]["version"], 3);
    assert_eq!(
        reads[1],
        json!({"key": "gone", "value": "back", "version": 1})
    );
    let q = h.queue();
    assert_eq!(
        agent_entry(&q, "k").unwrap(),
        Entry {
            key: "k".into(),
            value: "3".into(),
            version: 4
        }
    );
    assert_eq!(agent_entry(&q, "gone").unwrap().version, 1);
}

/// A set-if that its own run's earlier write of the key contradicts fails
/// for good, saying so: it said "expected version 0, found 1" as if another
/// writer had been there, and every retry failed the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_if_contradicted_by_its_own_runs_write_fails_for_good_saying_so() {
    let h = harness();
    let id = submit(
        &h,
        json!({"ops": [["set_if", "agent", "j", "1", 0], ["set_if", "agent", "j", "2", 0]]}),
        3,
    );
    // A plain set makes the version at least 1: a set-if of 0 after it
    // never holds either.
    let after_set = submit(
        &h,
        json!({"ops": [["set", "agent", "s", "1"], ["set_if", "agent", "s", "2", 0]]}),
        3,
    );
    // But one of 2 after a plain set holds once another task has written
    // the key: a conflict, retried.
    let may_hold = submit(
        &h,
        json!({"ops": [["set", "agent", "m", "1"], ["set_if", "agent", "m", "2", 2]]}),
        2,
    );
    h.run_until_idle().await;
    let task = h.task(after_set);
    assert_eq!((task.state, task.attempts), (State::Failed, 1));
    assert_eq!(task.error.unwrap().kind.as_str(), "invalid_output");
    let task = h.task(may_hold);
    assert_eq!((task.state, task.attempts), (State::Failed, 2));
    assert_eq!(task.error.unwrap().kind.as_str(), "conflict");
    let task = h.task(id);
    assert_eq!((task.state, task.attempts), (State::Failed, 1));
    let error = task.error.unwrap();
    assert_eq!(error.kind.as_str(), "invalid_output");
    assert!(
        error
            .message
            .contains("expected version 0, but this run's own earlier writes of the key make it 1"),
        "{}",
        error.message
    );
    assert!(agent_entry(&h.queue(), "j").is_none());
}

/// An approved result whose `set-if` no longer holds runs again, as a
/// revision: while revisions remain it goes back to `ready` with the
/// conflict as feedback; with none left it fails (`conflict`) and its
/// dependents are cancelled, so a key that never stays still cannot keep a
/// task running for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_whose_set_if_went_stale_sends_the_task_round_again_as_a_revision() {
    let h = harness();
    let mut task = NewTask::new(
        "stateful",
        // Reads the counter and writes it + 1, set-if on the version read.
        json!({"increment": "slot", "review": true}).to_string(),
    );
    task.max_attempts = 1;
    task.max_revisions = 1;
    let id = h.submit(task);
    let mut dependent = NewTask::new("stateful", "{}");
    dependent.depends_on = vec![id];
    let dependent = h.submit(dependent);
    let mut q = h.queue();
    for round in 1..=2 {
        h.run_until_idle().await;
        assert_eq!(h.task(id).state, State::Review, "round {round}");
        // Someone else writes the slot while the task waits for approval.
        q.state_write_by_operator(Scope::Agent, "stateful", "slot", Some(&format!("{round}")))
            .unwrap();
        let answer = q.approve(id, None).unwrap();
        let task = h.task(id);
        assert_eq!(task.revisions, 1, "round {round}");
        assert_eq!(h.events(id, "approve_stale").len(), round as usize);
        assert_eq!(agent_entry(&q, "slot").unwrap().value, format!("{round}"));
        if round == 1 {
            assert_eq!(answer, State::Ready);
            assert!(task.feedback.unwrap().contains("approved, but stale"));
        } else {
            assert_eq!(answer, State::Failed);
            let error = task.error.unwrap();
            assert_eq!(error.kind, colony::task::ErrorKind::Conflict);
            assert!(
                error.message.contains("gone stale 2 times"),
                "{}",
                error.message
            );
            assert_eq!(h.task(dependent).state, State::Cancelled);
        }
    }
}
