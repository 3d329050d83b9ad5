//! The queue against real databases, each test on both drivers (SQLite
//! and PostgreSQL: `name::sqlite`, `name::postgres`): every legal
//! transition, a sample of illegal ones, chains, dependencies, review,
//! fencing and idempotency.

mod common;
use common::{TestDb, on_both_drivers};

use std::time::Duration;

use colony::queue::{Applied, Lease, ListFilter, Queue, QueueError, all_readable};
use colony::task::{ErrorKind, NewTask, NextSpec, RunOutcome, SpawnSpec, State, Task, TaskError};
use serde_json::json;

fn ok(output: serde_json::Value) -> RunOutcome {
    RunOutcome::Success {
        output: output.to_string(),
        spawn: vec![],
        needs_review: false,
    }
}

fn failure(kind: ErrorKind, message: &str) -> RunOutcome {
    RunOutcome::Failure(TaskError {
        kind,
        message: message.into(),
    })
}

/// Submits a task with a tiny backoff so retries become due at once.
/// What the daemon hands the writer after `task`'s run returned `output`.
fn completed(
    task: &colony::queue::ClaimedTask,
    output: serde_json::Value,
) -> colony::queue::FinishedRun {
    colony::queue::FinishedRun {
        lease: task.lease,
        outcome: ok(output),
        log: String::new(),
        state: vec![],
        effects: vec![],
        claimed: Some(colony::queue::ClaimFacts::of(task)),
    }
}

/// `n` fresh tasks of `agent`, all claimed.
fn submit_and_claim(q: &mut Queue, agent: &str, n: usize) -> Vec<colony::queue::ClaimedTask> {
    for _ in 0..n {
        submit(q, agent, json!({}));
    }
    q.claim(agent, n).unwrap()
}

/// A POST to a loopback port nothing listens on.
/// Submits a task of agent `a`, claims it and completes it with `effect`
/// queued; returns the run's lease.
fn complete_with_effect(q: &mut Queue, effect: colony::effects::Effect) -> Lease {
    submit(q, "a", json!({}));
    let lease = claim_one(q, "a");
    let run = colony::queue::FinishedRun {
        lease,
        outcome: ok(json!({})),
        log: String::new(),
        state: vec![],
        effects: vec![effect],
        claimed: None,
    };
    q.finish_batch(&[run]).unwrap();
    lease
}

fn hook_effect() -> colony::effects::Effect {
    colony::effects::Effect {
        seq: 1,
        method: "POST".into(),
        url: "http://127.0.0.1:9/hook".into(),
        headers: vec![],
        body: None,
        max_attempts: colony::effects::DEFAULT_DELIVERY_ATTEMPTS,
    }
}

/// An unconditional write of an agent-scope key.
fn set(key: &str, value: &str) -> colony::state::Write {
    colony::state::Write {
        scope: colony::state::Scope::Agent,
        key: key.into(),
        value: Some(value.into()),
        if_version: None,
    }
}

fn submit(q: &mut Queue, agent: &str, payload: serde_json::Value) -> i64 {
    let mut new = NewTask::new(agent, payload.to_string());
    new.backoff_ms = 1;
    q.submit(&new).unwrap().id
}

fn claim_one(q: &mut Queue, agent: &str) -> Lease {
    let claimed = q.claim(agent, 1).unwrap();
    assert_eq!(claimed.len(), 1, "expected one {agent} task to claim");
    claimed[0].lease
}

fn events_of(q: &Queue, id: i64) -> Vec<(String, Option<State>, State)> {
    q.events(Some(id), 0, 1000)
        .unwrap()
        .into_iter()
        .map(|e| (e.event, e.from, e.to))
        .collect()
}

fn wait_and_promote(q: &mut Queue) {
    std::thread::sleep(Duration::from_millis(5));
    q.promote_due().unwrap();
}

on_both_drivers! {
    fn happy_path_ready_claim_complete_with_events(db) {
        let mut q = db.open();
        let id = submit(&mut q, "echo", json!({"n": 1}));
        assert_eq!(q.get(id).unwrap().state, State::Ready);

        let claimed = q.claim("echo", 10).unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].attempt, 1);
        assert_eq!(claimed[0].payload, r#"{"n":1}"#);
        let task = q.get(id).unwrap();
        assert_eq!((task.state, task.attempts), (State::InProgress, 1));
        assert!(task.claimed_by.is_some());

        let applied = q
            .finish(claimed[0].lease, ok(json!({"done": true})), "a log line\n")
            .unwrap();
        assert_eq!(applied, Applied::Moved(State::Complete));
        let task = q.get(id).unwrap();
        assert_eq!(task.state, State::Complete);
        assert_eq!(task.result, Some(json!({"done": true})));
        assert!(task.finished_at.is_some() && task.claimed_by.is_none());
        assert_eq!(q.logs(id).unwrap()[0].text, "a log line\n");
        assert_eq!(
            events_of(&q, id),
            vec![
                ("submit".into(), None, State::Ready),
                ("claim".into(), Some(State::Ready), State::InProgress),
                ("complete".into(), Some(State::InProgress), State::Complete),
            ]
        );
    }

    fn claims_by_priority_then_age_and_only_for_the_agent(db) {
        let mut q = db.open();
        let low = submit(&mut q, "a", json!(1));
        let mut high = NewTask::new("a", "2");
        high.priority = 5;
        let high = q.submit(&high).unwrap().id;
        let other = submit(&mut q, "b", json!(3));
        let claimed: Vec<i64> = q
            .claim("a", 1)
            .unwrap()
            .iter()
            .map(|c| c.lease.task_id)
            .collect();
        assert_eq!(claimed, vec![high]);
        let claimed: Vec<i64> = q
            .claim("a", 5)
            .unwrap()
            .iter()
            .map(|c| c.lease.task_id)
            .collect();
        assert_eq!(claimed, vec![low]);
        assert_eq!(q.get(other).unwrap().state, State::Ready);
        // Tasks claimed together come in the order they are claimed by,
        // which is the order a daemon starts them in (they came by id).
        let ids: Vec<i64> = [0, 10, 0, 5]
            .into_iter()
            .map(|priority| {
                let mut task = NewTask::new("c", "{}");
                task.priority = priority;
                q.submit(&task).unwrap().id
            })
            .collect();
        let claimed: Vec<i64> = q.claim("c", 4).unwrap().iter().map(|c| c.lease.task_id).collect();
        assert_eq!(claimed, [ids[1], ids[3], ids[0], ids[2]]);
    }

    /// A claim of more tasks than one statement writes (23 = 16 + 4 + 1 + 1
    /// + 1 on SQLite) takes each ready task once, under one token, each with
    /// its claim event, and completing them all writes each one's event.
    fn a_large_claim_takes_each_task_once_with_its_events(db) {
        use colony::queue::FinishedRun;
        let mut q = db.open();
        let ids: Vec<i64> = (0..25).map(|i| submit(&mut q, "a", json!(i))).collect();
        let claimed = q.claim("a", 23).unwrap();
        let taken: Vec<i64> = claimed.iter().map(|c| c.lease.task_id).collect();
        assert_eq!(taken, ids[..23].to_vec());
        let events = |q: &Queue, id: i64, kind: &str| {
            q.events(Some(id), 0, 100)
                .unwrap()
                .into_iter()
                .filter(|e| e.event == kind)
                .count()
        };
        // The token is in the claim event as a JSON number that JavaScript
        // (the dashboard, API clients) reads exactly: below 2^53.
        let token = claimed[0].lease.token;
        assert!(token > 0 && token < 1 << 53, "token {token}");
        let claim = q.events(Some(ids[0]), 0, 100).unwrap();
        let claim = claim.iter().find(|e| e.event == "claim").unwrap();
        assert_eq!(claim.detail["token"].as_i64(), Some(token));
        for c in &claimed {
            assert_eq!(c.lease.token, claimed[0].lease.token);
            assert_eq!(c.attempt, 1);
            assert_eq!(q.get(c.lease.task_id).unwrap().state, State::InProgress);
            assert_eq!(events(&q, c.lease.task_id, "claim"), 1);
        }
        for &id in &ids[23..] {
            assert_eq!(q.get(id).unwrap().state, State::Ready);
            assert_eq!(events(&q, id, "claim"), 0);
        }
        let runs: Vec<FinishedRun> = claimed
            .iter()
            .map(|c| completed(c, json!({ "id": c.lease.task_id })))
            .collect();
        let applied = q.finish_batch(&runs).unwrap();
        assert_eq!(applied, vec![Applied::Moved(State::Complete); 23]);
        for c in &claimed {
            let id = c.lease.task_id;
            assert_eq!(q.get(id).unwrap().result, Some(json!({ "id": id })));
            assert_eq!(events(&q, id, "complete"), 1);
        }
        assert_eq!(q.claim("a", 23).unwrap().len(), 2);
    }

    /// A batch holding two runs of one task, an old run whose claim was
    /// cancelled and the run of its new claim: each is fenced on its own
    /// token, so the new run completes the task, once, and the old one is
    /// refused (as on the per-run path), whichever comes first.
    fn a_batch_with_an_old_and_a_new_run_of_one_task_completes_it_once(db) {
        let mut q = db.open();
        for old_first in [true, false] {
            let id = submit(&mut q, "a", json!({}));
            let old = q.claim("a", 1).unwrap().remove(0);
            q.cancel(id, "changed my mind").unwrap();
            q.retry(id).unwrap();
            let new = q.claim("a", 1).unwrap().remove(0);
            assert_ne!(old.lease.token, new.lease.token);
            let (old_run, new_run) = (completed(&old, json!("old")), completed(&new, json!("new")));
            let runs = match old_first {
                true => vec![old_run, new_run],
                false => vec![new_run, old_run],
            };
            let applied = q.finish_batch(&runs).unwrap();
            let expected = match old_first {
                true => vec![Applied::LeaseLost, Applied::Moved(State::Complete)],
                false => vec![Applied::Moved(State::Complete), Applied::LeaseLost],
            };
            assert_eq!(applied, expected, "old run first: {old_first}");
            let task = q.get(id).unwrap();
            assert_eq!(task.result, Some(json!("new")));
            let events = q.events(Some(id), 0, 100).unwrap();
            let count = |kind: &str| events.iter().filter(|e| e.event == kind).count();
            assert_eq!(count("complete"), 1, "old run first: {old_first}");
            assert_eq!(count("result_refused"), 1, "old run first: {old_first}");
        }
    }

    /// A store retried after a commit whose answer was lost (the daemon
    /// keeps the runs and writes them again, `CommitUnknown`) finds its own
    /// first try stored: the retry answers what that try did and changes
    /// nothing, no state written twice and no "result_refused" on the trail,
    /// even after the task was revived and claimed again. A result whose
    /// lease another actor took away is still refused.
    fn a_store_retried_after_its_commit_went_through_changes_and_refuses_nothing(db) {
        use colony::state::{Scope, Write};
        let mut q = db.open();
        let count = |q: &Queue, id: i64, kind: &str| {
            q.events(Some(id), 0, 100).unwrap().iter().filter(|e| e.event == kind).count()
        };

        // A completion with a state write, stored twice.
        let done = submit(&mut q, "a", json!({}));
        let claimed = q.claim("a", 1).unwrap().remove(0);
        let mut run = completed(&claimed, json!("first"));
        run.state = vec![Write {
            scope: Scope::Agent,
            key: "k".into(),
            value: Some("v".into()),
            if_version: None,
        }];
        for _ in 0..2 {
            let applied = q.finish_batch(std::slice::from_ref(&run)).unwrap();
            assert_eq!(applied, vec![Applied::Moved(State::Complete)]);
        }
        assert_eq!(q.state_get(Scope::Agent, "a", "k").unwrap().unwrap().version, 1);
        assert_eq!(count(&q, done, "complete"), 1);
        assert_eq!(count(&q, done, "state_write"), 1);
        assert_eq!(count(&q, done, "result_refused"), 0);

        // A retryable failure, stored twice: one attempt used, one backoff.
        let flaky = submit(&mut q, "f", json!({}));
        let lease = claim_one(&mut q, "f");
        for _ in 0..2 {
            let applied = q.finish(lease, failure(ErrorKind::Retryable, "try again"), "").unwrap();
            assert_eq!(applied, Applied::Moved(State::Pending));
        }
        assert_eq!(q.get(flaky).unwrap().attempts, 1);
        assert_eq!(count(&q, flaky, "retry_later"), 1);
        assert_eq!(count(&q, flaky, "result_refused"), 0);

        // Claimed again after its backoff: the first run's store, retried
        // once more, is still its own and leaves the new claim alone.
        wait_and_promote(&mut q);
        let again = q.claim("f", 1).unwrap().remove(0);
        assert_eq!((again.lease.task_id, again.attempt), (flaky, 2));
        let applied = q.finish(lease, failure(ErrorKind::Retryable, "try again"), "").unwrap();
        assert_eq!(applied, Applied::Moved(State::Pending));
        assert_eq!(q.get(flaky).unwrap().state, State::InProgress);
        assert_eq!(count(&q, flaky, "result_refused"), 0);
        let applied = q.finish_batch(&[completed(&again, json!("second"))]).unwrap();
        assert_eq!(applied, vec![Applied::Moved(State::Complete)]);

        // Cancelled by someone else while it ran: the result is refused.
        let lost = submit(&mut q, "l", json!({}));
        let claimed = q.claim("l", 1).unwrap().remove(0);
        let daemon = q.actor().to_string();
        q.set_actor("operator");
        q.cancel(lost, "not needed").unwrap();
        q.set_actor(&daemon);
        let applied = q.finish_batch(&[completed(&claimed, json!("late"))]).unwrap();
        assert_eq!(applied, vec![Applied::LeaseLost]);
        assert_eq!(count(&q, lost, "result_refused"), 1);
        assert_eq!(q.get(lost).unwrap().state, State::Cancelled);
    }

    /// Claims sharing a daemon's free slots take, in order, no more than
    /// the slots among them: an agent with nothing ready leaves its share
    /// to the next; the claims before them are not counted.
    fn claims_sharing_free_slots_take_no_more_than_the_slots(db) {
        let mut q = db.open();
        for agent in ["ahead", "ahead", "b", "b", "c", "c"] {
            submit(&mut q, agent, json!({}));
        }
        let claims = [("ahead".to_string(), 2), ("none".into(), 2), ("b".into(), 2), ("c".into(), 2)];
        let claimed = q.finish_and_claim_sharing(&[], &claims, 1, 3).unwrap().claimed;
        let counts: Vec<usize> = claimed.iter().map(Vec::len).collect();
        assert_eq!(counts, [2, 0, 2, 1]);
        let none = q.finish_and_claim_sharing(&[], &[("c".into(), 1)], 0, 0).unwrap().claimed;
        assert!(none[0].is_empty(), "no slot, no claim");
    }

    fn retryable_failure_backs_off_then_fails_when_attempts_run_out(db) {
        let mut q = db.open();
        let mut new = NewTask::new("flaky", "{}");
        new.backoff_ms = 60_000;
        let id = q.submit(&new).unwrap().id;

        let lease = claim_one(&mut q, "flaky");
        let before = colony::queue::now_ms();
        assert_eq!(
            q.finish(lease, failure(ErrorKind::Retryable, "try again"), "")
                .unwrap(),
            Applied::Moved(State::Pending)
        );
        let task = q.get(id).unwrap();
        assert_eq!(task.state, State::Pending);
        assert_eq!(task.error.as_ref().unwrap().kind, ErrorKind::Retryable);
        let wait = task.run_at - before;
        assert!(
            (48_000..=72_100).contains(&wait),
            "first retry waits 60 s ± 20 %, got {wait} ms"
        );
        // Not due yet: promote does nothing and nothing can be claimed.
        assert_eq!(q.promote_due().unwrap(), 0);
        assert!(q.claim("flaky", 1).unwrap().is_empty());

        // Use up the remaining attempts with a short backoff.
        let mut new = NewTask::new("flaky2", "{}");
        new.backoff_ms = 1;
        let id = q.submit(&new).unwrap().id;
        for attempt in 1..=3 {
            let claimed = q.claim("flaky2", 1).unwrap();
            assert_eq!(claimed[0].attempt, attempt);
            let expect = if attempt < 3 {
                State::Pending
            } else {
                State::Failed
            };
            assert_eq!(
                q.finish(claimed[0].lease, failure(ErrorKind::Timeout, "slow"), "")
                    .unwrap(),
                Applied::Moved(expect)
            );
            wait_and_promote(&mut q);
        }
        let task = q.get(id).unwrap();
        assert_eq!((task.state, task.attempts), (State::Failed, 3));
        assert_eq!(task.error.unwrap().kind, ErrorKind::Timeout);
        let last = q.events(Some(id), 0, 100).unwrap().pop().unwrap();
        assert_eq!(last.detail["why"], "attempts exhausted");
    }

    fn permanent_failure_skips_remaining_attempts(db) {
        let mut q = db.open();
        let id = submit(&mut q, "p", json!({}));
        let lease = claim_one(&mut q, "p");
        assert_eq!(
            q.finish(lease, failure(ErrorKind::Permanent, "never"), "")
                .unwrap(),
            Applied::Moved(State::Failed)
        );
        let task = q.get(id).unwrap();
        assert_eq!((task.state, task.attempts), (State::Failed, 1));
        assert_eq!(
            task.error,
            Some(TaskError {
                kind: ErrorKind::Permanent,
                message: "never".into()
            })
        );
    }

    fn invalid_output_is_a_permanent_failure_and_applies_nothing(db) {
        let mut q = db.open();
        let id = submit(&mut q, "g", json!({}));
        let lease = claim_one(&mut q, "g");
        let bad_child = SpawnSpec {
            agent: "x".into(),
            payload: "{oops".into(),
            priority: 0,
            review: false,
        };
        let outcome = RunOutcome::Success {
            output: "{}".into(),
            spawn: vec![bad_child],
            needs_review: false,
        };
        assert_eq!(
            q.finish(lease, outcome, "").unwrap(),
            Applied::Moved(State::Failed)
        );
        let task = q.get(id).unwrap();
        assert_eq!(task.error.as_ref().unwrap().kind, ErrorKind::InvalidOutput);
        assert!(task.error.unwrap().message.contains("spawn[0].payload"));
        assert!(task.result.is_none());
        assert!(q.children(id).unwrap().is_empty());
    }

    fn chains_three_levels_deep_pass_parent_results(db) {
        let mut q = db.open();
        let mut new = NewTask::new("design", r#"{"brief":1}"#);
        new.next = vec![NextSpec {
            agent: "code".into(),
            payload: json!({"step": 2}),
            priority: 0,
            review: false,
            next: vec![NextSpec {
                agent: "ops".into(),
                payload: json!({"step": 3}),
                priority: 0,
                review: false,
                next: vec![],
            }],
        }];
        let root = q.submit(&new).unwrap().id;

        let lease = claim_one(&mut q, "design");
        q.finish(lease, ok(json!({"spec": "S"})), "").unwrap();
        let children = all_readable(q.children(root).unwrap()).unwrap();
        assert_eq!(children.len(), 1);
        assert_eq!(
            (children[0].agent.as_str(), children[0].state),
            ("code", State::Ready)
        );

        let claimed = q.claim("code", 1).unwrap();
        assert_eq!(claimed[0].parent_result.as_deref(), Some(r#"{"spec":"S"}"#));
        q.finish(claimed[0].lease, ok(json!({"html": "H"})), "")
            .unwrap();
        let grandchildren = all_readable(q.children(children[0].id).unwrap()).unwrap();
        assert_eq!(grandchildren.len(), 1);
        assert_eq!(grandchildren[0].payload, json!({"step": 3}));

        let claimed = q.claim("ops", 1).unwrap();
        assert_eq!(claimed[0].parent_result.as_deref(), Some(r#"{"html":"H"}"#));
        q.finish(claimed[0].lease, ok(json!("shipped")), "")
            .unwrap();
        assert_eq!(q.get(grandchildren[0].id).unwrap().state, State::Complete);
    }

    /// A spawned child's payload reaches its agent as its parent wrote it:
    /// every digit of a number, its keys in their order.
    fn a_spawned_payload_keeps_its_numbers_and_key_order(db) {
        let mut q = db.open();
        submit(&mut q, "s", json!({}));
        let lease = claim_one(&mut q, "s");
        let payload = r#"{"z":1,"a":123456789012345678901234567890,"c":0.1000000000000000055511151231257827}"#;
        let spawn = vec![SpawnSpec {
            agent: "echo".into(),
            payload: payload.into(),
            priority: 0,
            review: false,
        }];
        let done = RunOutcome::Success {
            output: "{}".into(),
            spawn,
            needs_review: false,
        };
        q.finish(lease, done, "").unwrap();
        assert_eq!(q.claim("echo", 1).unwrap()[0].payload, payload);
    }

    fn spawned_children_are_inserted_with_the_completion(db) {
        let mut q = db.open();
        let id = submit(&mut q, "s", json!({}));
        let lease = claim_one(&mut q, "s");
        let spawn = vec![
            SpawnSpec {
                agent: "echo".into(),
                payload: r#"{"i":1}"#.into(),
                priority: 3,
                review: false,
            },
            SpawnSpec {
                agent: "echo".into(),
                payload: r#"{"i":2}"#.into(),
                priority: 0,
                review: true,
            },
        ];
        q.finish(
            lease,
            RunOutcome::Success {
                output: "{}".into(),
                spawn,
                needs_review: false,
            },
            "",
        )
        .unwrap();
        let children = all_readable(q.children(id).unwrap()).unwrap();
        assert_eq!(children.len(), 2);
        assert_eq!((children[0].priority, children[0].review), (3, false));
        assert_eq!(
            (children[1].payload.clone(), children[1].review),
            (json!({"i": 2}), true)
        );
        assert!(
            children
                .iter()
                .all(|c| c.parent_id == Some(id) && c.state == State::Ready)
        );
    }

    fn dependencies_join_and_a_failed_dependency_cancels_dependents(db) {
        let mut q = db.open();
        let a = submit(&mut q, "a", json!({}));
        let b = submit(&mut q, "b", json!({}));
        let mut join = NewTask::new("join", "{}");
        join.depends_on = vec![a, b];
        let join = q.submit(&join).unwrap().id;
        let mut after_join = NewTask::new("later", "{}");
        after_join.depends_on = vec![join];
        let after_join = q.submit(&after_join).unwrap().id;
        assert_eq!(q.get(join).unwrap().state, State::Pending);
        assert_eq!(q.get(join).unwrap().depends_on, vec![a, b]);

        let lease = claim_one(&mut q, "a");
        q.finish(lease, ok(json!(1)), "").unwrap();
        assert_eq!(
            q.get(join).unwrap().state,
            State::Pending,
            "still waiting for b"
        );
        let lease = claim_one(&mut q, "b");
        q.finish(lease, ok(json!(2)), "").unwrap();
        assert_eq!(
            q.get(join).unwrap().state,
            State::Ready,
            "both dependencies complete"
        );

        let lease = claim_one(&mut q, "join");
        q.finish(lease, failure(ErrorKind::Permanent, "no"), "")
            .unwrap();
        let later = q.get(after_join).unwrap();
        assert_eq!(later.state, State::Cancelled);
        assert_eq!(later.error.as_ref().unwrap().kind, ErrorKind::Cancelled);
        assert!(
            later
                .error
                .unwrap()
                .message
                .contains(&format!("task {join}"))
        );
    }

    fn cancel_cascades_to_dependents_and_voids_a_running_claim(db) {
        let mut q = db.open();
        let root = submit(&mut q, "r", json!({}));
        let mut mid = NewTask::new("m", "{}");
        mid.depends_on = vec![root];
        let mid = q.submit(&mid).unwrap().id;
        let mut leaf = NewTask::new("l", "{}");
        leaf.depends_on = vec![mid];
        let leaf = q.submit(&leaf).unwrap().id;

        let lease = claim_one(&mut q, "r");
        let cancelled = q.cancel(root, "not needed").unwrap();
        assert_eq!(cancelled, vec![root, mid, leaf]);
        for id in [root, mid, leaf] {
            assert_eq!(q.get(id).unwrap().state, State::Cancelled);
        }
        // The run that was in flight cannot write its outcome any more.
        assert_eq!(
            q.finish(lease, ok(json!(1)), "").unwrap(),
            Applied::LeaseLost
        );
        assert_eq!(q.get(root).unwrap().result, None);
        // Finished tasks cannot be cancelled.
        assert!(matches!(
            q.cancel(root, "again"),
            Err(QueueError::Illegal { .. })
        ));
    }

    fn review_approve_inserts_children_then(db) {
        let mut q = db.open();
        let mut new = NewTask::new("marketing", "{}");
        new.next = vec![NextSpec {
            agent: "publish".into(),
            payload: json!({}),
            priority: 0,
            review: false,
            next: vec![],
        }];
        let id = q.submit(&new).unwrap().id;
        let lease = claim_one(&mut q, "marketing");
        let outcome = RunOutcome::Success {
            output: r#"{"copy":"v1"}"#.into(),
            spawn: vec![],
            needs_review: true,
        };
        assert_eq!(
            q.finish(lease, outcome, "").unwrap(),
            Applied::Moved(State::Review)
        );
        assert!(
            q.children(id).unwrap().is_empty(),
            "children wait for approval"
        );
        assert_eq!(q.approve(id, Some("ship it")).unwrap(), State::Complete);
        assert_eq!(all_readable(q.children(id).unwrap()).unwrap().len(), 1);
        assert!(matches!(
            q.approve(id, None),
            Err(QueueError::Illegal {
                state: State::Complete,
                ..
            })
        ));
    }

    fn review_reject_passes_feedback_and_fails_after_max_revisions(db) {
        let mut q = db.open();
        let mut new = NewTask::new("marketing", "{}");
        new.review = true;
        new.max_revisions = 2;
        let id = q.submit(&new).unwrap().id;
        for round in 1..=3 {
            let claimed = q.claim("marketing", 1).unwrap();
            assert_eq!(claimed[0].attempt, 1, "a revision gets its attempts back");
            if round > 1 {
                assert_eq!(
                    claimed[0].feedback.as_deref(),
                    Some(format!("note {}", round - 1).as_str())
                );
            }
            assert_eq!(
                q.finish(claimed[0].lease, ok(json!({"v": round})), "")
                    .unwrap(),
                Applied::Moved(State::Review)
            );
            let to = q.reject(id, &format!("note {round}")).unwrap();
            assert_eq!(
                to,
                if round <= 2 {
                    State::Ready
                } else {
                    State::Failed
                }
            );
        }
        let task = q.get(id).unwrap();
        assert_eq!(task.error.unwrap().kind, ErrorKind::Rejected);
        assert_eq!(task.revisions, 2);
        // Each rejection's event names the revision it starts; the final
        // one starts none, and says how many were used.
        let details: Vec<serde_json::Value> = q
            .events(Some(id), 0, 100)
            .unwrap()
            .into_iter()
            .filter(|e| e.event == "reject")
            .map(|e| e.detail)
            .collect();
        assert_eq!(
            details,
            [
                json!({"note": "note 1", "revision": 1, "max_revisions": 2}),
                json!({"note": "note 2", "revision": 2, "max_revisions": 2}),
                json!({"note": "note 3", "revisions_used": 2, "max_revisions": 2}),
            ]
        );
    }

    fn a_reviewer_agent_decides_automatically(db) {
        let mut q = db.open();
        let mut new = NewTask::new("writer", r#"{"topic":"t"}"#);
        new.reviewer = Some("critic".into());
        let id = q.submit(&new).unwrap().id;
        let lease = claim_one(&mut q, "writer");
        q.finish(lease, ok(json!({"draft": 1})), "").unwrap();
        assert_eq!(q.get(id).unwrap().state, State::Review);

        let review = q.claim("critic", 1).unwrap().remove(0);
        let payload: serde_json::Value = serde_json::from_str(&review.payload).unwrap();
        assert_eq!(
            payload,
            json!({"task_id": id, "agent": "writer", "payload": {"topic": "t"}, "payload_bytes": 13,
                   "output": {"draft": 1}, "output_bytes": 11, "effects": [], "state_writes": [],
                   "children": []})
        );
        q.finish(
            review.lease,
            ok(json!({"approve": false, "note": "more detail"})),
            "",
        )
        .unwrap();
        let task = q.get(id).unwrap();
        assert_eq!(
            (task.state, task.feedback.as_deref()),
            (State::Ready, Some("more detail"))
        );

        // The reviewer sees what approval would release: the run's effects,
        // state writes and the tasks it spawned.
        let lease = claim_one(&mut q, "writer");
        let run = colony::queue::FinishedRun {
            lease,
            outcome: RunOutcome::Success {
                output: json!({"draft": 2}).to_string(),
                spawn: vec![SpawnSpec {
                    agent: "printer".into(),
                    payload: r#"{"copies":2}"#.into(),
                    priority: 3,
                    review: false,
                }],
                needs_review: false,
            },
            log: String::new(),
            state: vec![colony::state::Write {
                scope: colony::state::Scope::Agent,
                key: "published".into(),
                value: Some("{\"draft\": 2}".into()),
                if_version: Some(0),
            }],
            effects: vec![colony::effects::Effect {
                seq: 1,
                method: "POST".into(),
                url: "https://api.example/pay".into(),
                headers: vec![("X-Request".into(), "r-7".into())],
                body: Some(b"{\"amount_cents\": 99999900}".to_vec()),
                max_attempts: 5,
            }],
            claimed: None,
        };
        q.finish_batch(&[run]).unwrap();
        let review = q.claim("critic", 1).unwrap().remove(0);
        let payload: serde_json::Value = serde_json::from_str(&review.payload).unwrap();
        assert_eq!(
            (&payload["effects"], &payload["state_writes"]),
            (
                &json!([{"method": "POST", "url": "https://api.example/pay", "headers": [["X-Request", "r-7"]],
                         "body": "{\"amount_cents\": 99999900}", "body_bytes": 26}]),
                &json!([{"scope": "agent", "key": "published", "value": {"draft": 2}, "value_bytes": 12, "delete": false, "if_version": 0}])
            ),
            "{payload}"
        );
        let held = json!([{"agent": "printer", "payload": {"copies": 2}, "priority": 3, "review": false}]);
        assert_eq!(payload["children"], held, "{payload}");
        // And a person, through `colony show`.
        assert_eq!(json!(q.held_children(id).unwrap()), held);
        assert!(q.children(id).unwrap().iter().flatten().all(|c| c.agent != "printer"));
        q.finish(review.lease, ok(json!({"approve": true})), "")
            .unwrap();
        assert_eq!(q.get(id).unwrap().state, State::Complete);
        assert!(q.held_children(id).unwrap().is_empty(), "created, no longer held");
        assert!(q.children(id).unwrap().iter().flatten().any(|c| c.agent == "printer"));

        // What a reviewer's payload shows is bounded (1 MiB of bodies and
        // values, in the run's order): one past it is null beside its size,
        // so a run's 8 MiB of bodies and 16 MiB of state cannot make a
        // payload its reviewer cannot parse.
        let mut new = NewTask::new("writer", "{}");
        new.reviewer = Some("critic".into());
        let id = q.submit(&new).unwrap().id;
        let big = |c: char| format!("\"{}\"", c.to_string().repeat(700 << 10));
        let effect = |seq: u32, body: String| colony::effects::Effect {
            seq,
            method: "POST".into(),
            url: "https://api.example/upload".into(),
            headers: vec![],
            body: Some(body.into_bytes()),
            max_attempts: 5,
        };
        let write = |key: &str, value: Option<String>| colony::state::Write {
            scope: colony::state::Scope::Agent,
            key: key.into(),
            value,
            if_version: None,
        };
        let run = colony::queue::FinishedRun {
            lease: claim_one(&mut q, "writer"),
            outcome: ok(json!({"draft": 3})),
            log: String::new(),
            state: vec![write("small", Some("[1]".into())), write("gone", None), write("large", Some(big('v')))],
            effects: vec![effect(1, big('a')), effect(2, big('b'))],
            claimed: None,
        };
        q.finish_batch(&[run]).unwrap();
        let review = q.claim("critic", 1).unwrap().remove(0);
        let payload: serde_json::Value = serde_json::from_str(&review.payload).unwrap();
        let bodies: Vec<_> = payload["effects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["body"].as_str().map(str::len), e["body_bytes"].as_u64()))
            .collect();
        let size = (700 << 10) + 2;
        assert_eq!(bodies, [(Some(size), Some(size as u64)), (None, Some(size as u64))]);
        assert_eq!(
            payload["state_writes"],
            json!([
                {"scope": "agent", "key": "small", "value": [1], "value_bytes": 3, "delete": false, "if_version": null},
                {"scope": "agent", "key": "gone", "value": null, "value_bytes": 0, "delete": true, "if_version": null},
                {"scope": "agent", "key": "large", "value": null, "value_bytes": size, "delete": false, "if_version": null},
            ])
        );
        q.finish(review.lease, ok(json!({"approve": true})), "").unwrap();
        assert_eq!(q.get(id).unwrap().state, State::Complete);

        // A reviewer whose output is not a verdict fails; the task waits for a person.
        let id = writer_in_review(&mut q, json!({}));
        let review = q.claim("critic", 1).unwrap().remove(0);
        q.finish(review.lease, ok(json!({"looks": "fine"})), "")
            .unwrap();
        assert_eq!(
            q.get(review.lease.task_id).unwrap().error.unwrap().kind,
            ErrorKind::InvalidOutput
        );
        assert_eq!(q.get(id).unwrap().state, State::Review);
    }

    fn retry_revives_failed_and_cancelled_tasks_only(db) {
        let mut q = db.open();
        let id = submit(&mut q, "p", json!({}));
        let lease = claim_one(&mut q, "p");
        q.finish(lease, failure(ErrorKind::Permanent, "no"), "")
            .unwrap();
        assert_eq!(q.retry(id).unwrap(), State::Ready);
        let task = q.get(id).unwrap();
        assert_eq!((task.attempts, task.error.is_none()), (0, true));

        let c = submit(&mut q, "p", json!({}));
        q.cancel(c, "x").unwrap();
        assert_eq!(q.retry(c).unwrap(), State::Ready);

        let err = q.retry(c).unwrap_err();
        assert!(
            err.to_string().contains("only failed or cancelled"),
            "{err}"
        );
        assert!(matches!(q.retry(9999), Err(QueueError::NotFound(9999))));
    }

    fn release_gives_the_attempt_back(db) {
        let mut q = db.open();
        let id = submit(&mut q, "a", json!({}));
        let lease = claim_one(&mut q, "a");
        assert_eq!(q.release(lease).unwrap(), Applied::Moved(State::Ready));
        let task = q.get(id).unwrap();
        assert_eq!((task.state, task.attempts), (State::Ready, 0));
        assert_eq!(q.release(lease).unwrap(), Applied::LeaseLost);
        // A task claimed ahead and never started: given back the same way,
        // its event marked as no run (the metrics count runs by it).
        let unstarted = claim_one(&mut q, "a");
        assert_eq!(q.release_unstarted(unstarted).unwrap(), Applied::Moved(State::Ready));
        assert_eq!(q.get(id).unwrap().attempts, 0);
        let releases: Vec<_> = q
            .events(Some(id), 0, 100)
            .unwrap()
            .into_iter()
            .filter(|e| e.event == "release")
            .map(|e| e.detail.get("started").cloned())
            .collect();
        assert_eq!(releases, vec![None, Some(json!(false))]);
    }

    /// A host resets a lease only when it is stale by the host's own
    /// `stale_after` and by the lease its holder promised: a daemon started
    /// with a shorter `stale_after` cannot take a live lease from one that
    /// renews less often (each daemon promises its own `stale_after`).
    fn no_host_resets_a_lease_before_its_holder_promised(db) {
        let mut holder = db.open_as("holder");
        // 3 s: far more than this test's steps take on a loaded machine.
        holder.set_claim_lease(Duration::from_millis(3000));
        let id = submit(&mut holder, "a", json!({}));
        claim_one(&mut holder, "a");
        let mut reaper = db.open_as("reaper");
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            reaper.reset_stale_leases(Duration::from_millis(10)).unwrap().is_empty(),
            "stale by the reaper's 10 ms, not by the holder's 3 s"
        );
        assert_eq!(holder.get(id).unwrap().state, State::InProgress);
        std::thread::sleep(Duration::from_millis(3000));
        assert_eq!(reaper.reset_stale_leases(Duration::from_millis(10)).unwrap().len(), 1);
        assert_eq!(holder.get(id).unwrap().state, State::Ready);
        // A claim that promised nothing (an older build) goes by the reaper's own.
        let mut unpromised = db.open_as("old");
        claim_one(&mut unpromised, "a");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(reaper.reset_stale_leases(Duration::from_millis(10)).unwrap().len(), 1);
    }

    /// A reaper whose clock stepped forward since it last trusted it
    /// resets nothing on SQLite, where leases are timed by the hosts'
    /// clocks (every lease looks that much older), even when the step
    /// comes between its own check and the reset's transaction. On
    /// PostgreSQL leases are timed by the server's clock.
    fn a_reset_by_a_clock_that_stepped_forward_resets_nothing_on_sqlite(db) {
        use colony::queue::{StaleGuard, now_ms};
        use std::time::Instant;
        let mut q = db.open();
        let id = submit(&mut q, "a", json!({}));
        claim_one(&mut q, "a");
        std::thread::sleep(Duration::from_millis(30));
        // The wall clock read 5 s less at a moment the monotonic clock
        // says was just now: it has run 5 s ahead since.
        let stepped = StaleGuard {
            clock_seen: Some((Instant::now(), now_ms() - 5_000)),
            ..StaleGuard::default()
        };
        let reset = q.reset_stale_leases_guarded(Duration::from_millis(10), stepped).unwrap();
        if db.is_postgres() {
            assert_eq!(reset.len(), 1, "the server's clock did not step");
            return;
        }
        assert!(reset.is_empty(), "reset after a step: {reset:?}");
        assert_eq!(q.get(id).unwrap().state, State::InProgress);
        let steady = StaleGuard {
            clock_seen: Some((Instant::now(), now_ms())),
            ..StaleGuard::default()
        };
        let reset = q.reset_stale_leases_guarded(Duration::from_millis(10), steady).unwrap();
        assert_eq!(reset.len(), 1, "a steady clock resets the stale lease");
    }

    fn stale_leases_reset_to_ready_then_fail_when_attempts_are_used(db) {
        let mut q = db.open_as("host-a");
        let mut new = NewTask::new("a", "{}");
        new.max_attempts = 2;
        let id = q.submit(&new).unwrap().id;

        let first = claim_one(&mut q, "a");
        // A live heartbeat keeps the lease.
        assert!(
            q.reset_stale_leases(Duration::from_secs(60))
                .unwrap()
                .is_empty()
        );
        assert!(q.heartbeat(&[first]).unwrap().is_empty());
        std::thread::sleep(Duration::from_millis(20));
        let mut reaper = db.open_as("host-b");
        let reset = reaper
            .reset_stale_leases(Duration::from_millis(10))
            .unwrap();
        assert_eq!(reset.len(), 1);
        assert_eq!(
            (reset[0].holder.as_str(), reset[0].to),
            ("host-a", State::Ready)
        );
        let event = reaper.events(Some(id), 0, 100).unwrap().pop().unwrap();
        assert_eq!(
            (event.event.as_str(), event.actor.as_str()),
            ("lease_expired", "host-b")
        );
        assert_eq!(event.detail["holder"], "host-a");
        assert_eq!(q.get(id).unwrap().attempts, 1, "the attempt stays counted");
        assert_eq!(
            q.heartbeat(&[first]).unwrap(),
            vec![first],
            "the old holder learns it lost the lease"
        );

        let _second = claim_one(&mut q, "a");
        std::thread::sleep(Duration::from_millis(20));
        let reset = reaper
            .reset_stale_leases(Duration::from_millis(10))
            .unwrap();
        assert_eq!(reset[0].to, State::Failed);
        assert_eq!(
            q.get(id).unwrap().error.unwrap().kind,
            ErrorKind::LeaseExpired
        );
    }

    fn a_stale_hosts_late_write_changes_nothing(db) {
        let mut slow = db.open_as("slow-host");
        let mut fast = db.open_as("fast-host");
        let id = submit(&mut slow, "a", json!({}));
        let old = claim_one(&mut slow, "a");
        std::thread::sleep(Duration::from_millis(20));
        fast.reset_stale_leases(Duration::from_millis(10)).unwrap();
        let new = claim_one(&mut fast, "a");
        assert_ne!(old, new);

        // The slow host wakes up and reports: every write is refused.
        assert_eq!(
            slow.finish(old, ok(json!("stale")), "stale log").unwrap(),
            Applied::LeaseLost
        );
        assert_eq!(
            slow.finish(old, failure(ErrorKind::Permanent, "stale"), "")
                .unwrap(),
            Applied::LeaseLost
        );
        assert_eq!(slow.release(old).unwrap(), Applied::LeaseLost);
        assert_eq!(
            slow.record_progress(old, Some("stale")).unwrap(),
            Applied::LeaseLost
        );
        let task = slow.get(id).unwrap();
        assert_eq!(
            (task.state, task.claimed_by.as_deref(), task.result),
            (State::InProgress, Some("fast-host"), None)
        );
        assert!(slow.logs(id).unwrap().is_empty());

        assert_eq!(
            fast.finish(new, ok(json!("fresh")), "").unwrap(),
            Applied::Moved(State::Complete)
        );
        assert_eq!(fast.get(id).unwrap().result, Some(json!("fresh")));
    }

    fn idempotency_key_returns_the_existing_task(db) {
        let mut q = db.open();
        let mut new = NewTask::new("a", r#"{"order":7}"#);
        new.key = Some("order-7".into());
        let first = q.submit(&new).unwrap();
        let second = q.submit(&new).unwrap();
        assert!(!first.existed && second.existed);
        assert_eq!(first.id, second.id);
        assert_eq!(q.list(&ListFilter::default()).unwrap().len(), 1);
    }

    fn bad_input_names_the_field_and_stores_nothing(db) {
        let mut q = db.open();
        let existing = submit(&mut q, "a", json!({}));
        let cases: Vec<(NewTask, &str)> = vec![
            (NewTask::new("a", "{not json"), "payload"),
            (NewTask::new("", "{}"), "agent"),
            (NewTask::new("../evil", "{}"), "agent"),
            (
                NewTask {
                    max_attempts: 0,
                    ..NewTask::new("a", "{}")
                },
                "max_attempts",
            ),
            (
                NewTask {
                    depends_on: vec![424242],
                    ..NewTask::new("a", "{}")
                },
                "after",
            ),
            (
                NewTask {
                    depends_on: vec![existing, existing],
                    ..NewTask::new("a", "{}")
                },
                "after",
            ),
            (
                NewTask {
                    timeout_ms: Some(0),
                    ..NewTask::new("a", "{}")
                },
                "timeout",
            ),
            (
                NewTask {
                    next: vec![NextSpec {
                        agent: "bad name".into(),
                        payload: json!({}),
                        priority: 0,
                        review: false,
                        next: vec![],
                    }],
                    ..NewTask::new("a", "{}")
                },
                "next[0].agent",
            ),
            (
                NewTask::new("a", format!("\"{}\"", "x".repeat(1024 * 1024 + 1))),
                "payload",
            ),
        ];
        for (new, field) in cases {
            match q.submit(&new) {
                Err(QueueError::Invalid { field: f, message }) => assert_eq!(f, field, "{message}"),
                other => panic!("expected a refusal naming {field}, got {other:?}"),
            }
        }
        assert_eq!(q.list(&ListFilter::default()).unwrap().len(), 1);
        assert_eq!(q.events(None, 0, 100).unwrap().len(), 1);
    }

    fn batch_submit_is_all_or_nothing(db) {
        let mut q = db.open();
        let good = NewTask::new("a", "{}");
        let bad = NewTask::new("a", "{");
        let err = q
            .submit_batch(&[good.clone(), good.clone(), bad])
            .unwrap_err();
        assert!(
            matches!(err, QueueError::InvalidInBatch { index: 2, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("task #3") && err.to_string().contains("payload"),
            "{err}"
        );
        assert!(q.list(&ListFilter::default()).unwrap().is_empty());

        // One key twice in a batch: the second task would be dropped for the
        // first's id, so the batch is refused, naming both.
        let keyed = |payload: &str| {
            let mut t = NewTask::new("a", payload);
            t.key = Some("k".into());
            t
        };
        let err = q
            .submit_batch(&[keyed(r#"{"v":1}"#), good.clone(), keyed(r#"{"v":2}"#)])
            .unwrap_err();
        assert!(
            matches!(err, QueueError::KeyTwiceInBatch { index: 2, first: 0, .. })
                && err.to_string().contains("also the key of task #1"),
            "{err}"
        );
        assert!(q.list(&ListFilter::default()).unwrap().is_empty());

        let ids = q.submit_batch(&[good.clone(), good]).unwrap();
        assert_eq!(ids.len(), 2);
    }

    fn a_batch_stores_each_task_as_submitting_it_alone_would(db) {
        // On PostgreSQL runs of tasks with no key and no dependencies go
        // many rows per statement; the others, and every task on SQLite,
        // one by one. Either way each task must be stored as `submit`
        // stores it, in the batch's order.
        let mut q = db.open();
        let dependency = q.submit(&NewTask::new("a", "{}")).unwrap().id;
        let mut keyed = NewTask::new("a", r#"{"keyed":true}"#);
        keyed.key = Some("k1".into());
        let existing = q.submit(&keyed).unwrap().id;

        let mut full = NewTask::new("a", r#"{"i":0}"#);
        full.priority = 5;
        full.max_attempts = 5;
        full.max_revisions = 2;
        full.timeout_ms = Some(1000);
        full.backoff_ms = 250;
        full.token_budget = Some(77);
        full.next = vec![NextSpec {
            agent: "b".into(),
            payload: json!({"then": 1}),
            priority: 1,
            review: true,
            next: vec![],
        }];
        let mut scheduled = NewTask::new("a", r#"{"i":1}"#);
        scheduled.run_at = Some(colony::queue::now_ms() + 3_600_000);
        let mut reviewed = NewTask::new("a", r#"{"i":2}"#);
        reviewed.reviewer = Some("judge".into());
        let mut dependent = NewTask::new("b", r#"{"i":4}"#);
        dependent.depends_on = vec![dependency];
        let batch = [
            full,
            scheduled,
            reviewed,
            keyed,
            NewTask::new("a", r#"{"i":3}"#),
            dependent,
            NewTask::new("c", r#"{"i":5}"#),
            NewTask::new("c", r#"{"i":6}"#),
        ];
        let alone: Vec<_> = batch
            .iter()
            .map(|t| {
                let mut t = t.clone();
                if let Some(key) = &mut t.key {
                    key.push_str("-alone");
                }
                q.submit(&t).unwrap()
            })
            .collect();
        let submitted = q.submit_batch(&batch).unwrap();

        assert_eq!(submitted.len(), batch.len());
        assert!(submitted[3].existed && submitted[3].id == existing, "{submitted:?}");
        let new: Vec<i64> = submitted.iter().filter(|s| !s.existed).map(|s| s.id).collect();
        assert!(new.windows(2).all(|w| w[0] < w[1]), "ids out of the batch's order: {new:?}");
        assert!(new[0] > alone.last().unwrap().id);
        let comparable = |id: i64| {
            let mut task = serde_json::to_value(q.get(id).unwrap()).unwrap();
            let fields = task.as_object_mut().unwrap();
            for field in ["id", "created_at", "updated_at", "run_at", "idempotency_key"] {
                fields.remove(field);
            }
            task
        };
        let events = |id: i64| -> Vec<_> {
            q.events(Some(id), 0, 10)
                .unwrap()
                .into_iter()
                .map(|e| (e.event, e.from, e.to, e.actor, e.detail))
                .collect()
        };
        for (i, (stored, twin)) in submitted.iter().zip(&alone).enumerate() {
            if i == 3 {
                continue;
            }
            assert_eq!(comparable(stored.id), comparable(twin.id), "task {i} of the batch");
            assert_eq!(events(stored.id), events(twin.id), "task {i}'s events");
            assert_eq!(events(stored.id).len(), 1, "task {i}: one submit event");
        }
        let states: Vec<State> = submitted.iter().map(|s| q.get(s.id).unwrap().state).collect();
        use State::{Pending, Ready};
        assert_eq!(states, [Ready, Pending, Ready, Ready, Ready, Pending, Ready, Ready]);
        assert_eq!(q.get(submitted[1].id).unwrap().run_at, batch[1].run_at.unwrap());
        // The chain's token budget, which no read of a task shows.
        let first_two = q.claim("a", 2).unwrap();
        assert_eq!(first_two[1].lease.task_id, submitted[0].id, "priority 5 first");
        for task in &first_two {
            let left = q.reserve_model_tokens(task.lease, 1, 0, None).unwrap();
            assert_eq!(left, colony::models::Budget::Reserved { left: 77 });
        }
        // What was stored is claimable as usual, in order of priority then id.
        let claimed = q.claim("c", 10).unwrap();
        let ids: Vec<i64> = claimed.iter().map(|t| t.lease.task_id).collect();
        assert_eq!(ids, [alone[6].id, alone[7].id, submitted[6].id, submitted[7].id]);
    }

    fn a_large_batch_keeps_its_order_across_statements(db) {
        // 450 plain tasks: on PostgreSQL three INSERTs (200 + 200 + 50 rows)
        // and as many for their events.
        let mut q = db.open();
        let ids = common::submit_numbered_batch(&mut q, 450);
        let events = q.events(None, 0, 1000).unwrap();
        assert_eq!(events.len(), 450);
        let mut with_events: Vec<i64> = events.iter().map(|e| e.task_id).collect();
        with_events.sort_unstable();
        assert_eq!(with_events, ids, "one submit event per task");
    }

    fn scheduled_tasks_wait_in_pending_until_due(db) {
        let mut q = db.open();
        let mut new = NewTask::new("a", "{}");
        // A minute ahead: not due however slowly this machine gets to the
        // promotion. Then it falls due (moved into the past underneath).
        new.run_at = Some(colony::queue::now_ms() + 60_000);
        let id = q.submit(&new).unwrap().id;
        assert_eq!(q.get(id).unwrap().state, State::Pending);
        assert_eq!(q.promote_due().unwrap(), 0);
        db.raw().execute(&format!("UPDATE tasks SET run_at = run_at - 120000 WHERE id = {id}"));
        assert_eq!(q.promote_due().unwrap(), 1);
        assert_eq!(q.get(id).unwrap().state, State::Ready);
    }

    fn reopening_keeps_everything_and_refuses_newer_schemas(db) {
        let id = {
            let mut q = db.open();
            submit(&mut q, "a", json!({"keep": true}))
        };
        let q = db.open();
        assert_eq!(q.get(id).unwrap().payload, json!({"keep": true}));
        drop(q);
        // What a newer colony would leave behind (SQLite's `user_version`,
        // PostgreSQL's `colony_schema`).
        db.set_schema_version(99);
        let err = Queue::open(db.location()).err().unwrap();
        assert!(
            matches!(err, QueueError::SchemaTooNew { found: 99, .. }),
            "{err}"
        );
        assert!(err.is_permanent(), "{err}");
    }

    fn retry_respects_dependencies(db) {
        let mut q = db.open();
        let a = submit(&mut q, "a", json!({}));
        let mut b = NewTask::new("b", "{}");
        b.depends_on = vec![a];
        let b = q.submit(&b).unwrap().id;
        let lease = claim_one(&mut q, "a");
        q.finish(lease, failure(ErrorKind::Permanent, "no"), "")
            .unwrap();
        assert_eq!(q.get(b).unwrap().state, State::Cancelled);

        // B cannot be revived while A is failed: it could never run.
        match q.retry(b) {
            Err(e @ QueueError::DependencyFinished { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains(&format!("task {b} depends on task {a}, which is failed"))
                        && message.contains(&format!("retry task {a} first")),
                    "{message}"
                );
                assert!(e.is_bad_input(), "{e:?}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Revive A, then B: B waits for A instead of running at once.
        assert_eq!(q.retry(a).unwrap(), State::Ready);
        assert_eq!(q.retry(b).unwrap(), State::Pending);
        assert!(q.claim("b", 1).unwrap().is_empty());
        let lease = claim_one(&mut q, "a");
        q.finish(lease, ok(json!(1)), "").unwrap();
        assert_eq!(q.get(b).unwrap().state, State::Ready);
    }

    fn a_stale_reviewers_verdict_is_ignored(db) {
        let mut q = db.open();
        let id = writer_in_review(&mut q, json!({"draft": 1}));
        let first_review = q.claim("critic", 1).unwrap().remove(0);

        // A person rejects before the first reviewer answers; the task re-runs.
        q.reject(id, "person: redo").unwrap();
        let lease = claim_one(&mut q, "writer");
        q.finish(lease, ok(json!({"draft": 2})), "").unwrap();

        // The first reviewer's approval judged draft 1: it must not decide
        // draft 2. Its run was cancelled with the person's verdict, so its
        // answer is refused.
        assert_eq!(
            q.finish(first_review.lease, ok(json!({"approve": true})), "").unwrap(),
            Applied::LeaseLost
        );
        assert_eq!(q.get(first_review.lease.task_id).unwrap().state, State::Cancelled);
        assert_eq!(q.get(id).unwrap().state, State::Review);
        let second_review = q.claim("critic", 1).unwrap().remove(0);
        assert!(second_review.payload.contains(r#""draft":2"#));
        q.finish(second_review.lease, ok(json!({"approve": true})), "")
            .unwrap();
        assert_eq!(q.get(id).unwrap().state, State::Complete);
    }

    fn a_review_decided_elsewhere_cancels_the_reviewers_still_to_answer(db) {
        let mut q = db.open();
        let reviewer_of = |q: &Queue, id: i64| -> Task {
            let mut reviewers: Vec<Task> = all_readable(q.children(id).unwrap())
                .unwrap()
                .into_iter()
                .filter(|c| c.agent == "critic")
                .collect();
            reviewers.pop().expect("the task has a reviewer task")
        };
        let reason = |q: &Queue, id: i64| q.get(id).unwrap().error.unwrap().message;

        // Approved by a person while its reviewer waits: the reviewer goes.
        let approved = writer_in_review(&mut q, json!({"draft": 1}));
        let waiting = reviewer_of(&q, approved).id;
        assert_eq!(q.approve(approved, None).unwrap(), State::Complete);
        assert_eq!(q.get(waiting).unwrap().state, State::Cancelled);
        assert!(
            reason(&q, waiting).contains(&format!("decided the review of task {approved} first")),
            "{}",
            reason(&q, waiting)
        );

        // Rejected by a person while its reviewer runs: the reviewer's claim
        // is voided, and the re-run's review gets a reviewer of its own.
        let rejected = writer_in_review(&mut q, json!({"draft": 1}));
        let running = q.claim("critic", 1).unwrap().remove(0);
        assert_eq!(q.reject(rejected, "redo").unwrap(), State::Ready);
        assert_eq!(q.get(running.lease.task_id).unwrap().state, State::Cancelled);
        let lease = claim_one(&mut q, "writer");
        q.finish(lease, ok(json!({"draft": 2})), "").unwrap();
        let fresh = reviewer_of(&q, rejected);
        assert_ne!(fresh.id, running.lease.task_id);
        assert_eq!(fresh.state, State::Ready);

        // Cancelled in review: the reviewer is cancelled with it and named.
        let cancelled = writer_in_review(&mut q, json!({"draft": 1}));
        let waiting = reviewer_of(&q, cancelled).id;
        assert_eq!(q.cancel(cancelled, "dropped").unwrap(), vec![cancelled, waiting]);
        assert!(
            reason(&q, waiting).contains(&format!("task {cancelled}, which this reviews, was cancelled")),
            "{}",
            reason(&q, waiting)
        );
        // Every cancellation is in the audit trail.
        for reviewer in [waiting, running.lease.task_id] {
            assert_eq!(
                q.events(Some(reviewer), 0, 100).unwrap().last().unwrap().event,
                "cancel"
            );
        }
    }

    /// A guest's text with a NUL character (a progress, a log line, a
    /// failure message) is stored: SQLite keeps the NUL, PostgreSQL, which
    /// refuses it in text, a U+FFFD. Refused, it failed the whole write.
    fn a_guests_text_with_a_nul_character_is_stored(db) {
        let mut q = db.open();
        let id = submit(&mut q, "a", json!({}));
        let lease = claim_one(&mut q, "a");
        assert_eq!(q.record_progress(lease, Some("half\0way")).unwrap(), Applied::Moved(State::InProgress));
        q.finish(lease, failure(ErrorKind::Permanent, "bad\0input"), "a line\0more\n").unwrap();
        let task = q.get(id).unwrap();
        let nul = |text: &str| text.replace('\0', if db.is_postgres() { "\u{FFFD}" } else { "\0" });
        assert_eq!(task.progress.as_deref(), Some(nul("half\0way").as_str()));
        assert_eq!(task.error.unwrap().message, nul("bad\0input"));
        assert_eq!(q.logs(id).unwrap()[0].text, nul("a line\0more\n"));
    }

    fn review_notes_and_cancel_reasons_are_bounded(db) {
        let mut q = db.open();
        let id = writer_in_review(&mut q, json!({}));
        let long = "x".repeat(colony::queue::MAX_NOTE_BYTES + 1);
        let before = q.events(Some(id), 0, 1000).unwrap().len();
        for refused in [
            q.reject(id, &long).unwrap_err(),
            q.approve(id, Some(&long)).unwrap_err(),
            q.cancel(id, &long).unwrap_err(),
        ] {
            assert!(
                matches!(&refused, QueueError::Invalid { field, .. } if field == "note" || field == "reason"),
                "{refused:?}"
            );
            assert!(refused.to_string().contains("at most 64 KiB"), "{refused}");
        }
        assert_eq!(q.get(id).unwrap().state, State::Review);
        assert_eq!(q.events(Some(id), 0, 1000).unwrap().len(), before);
        // A blank note reads as none, as over the API.
        assert_eq!(q.reject(id, "  ").unwrap(), State::Ready);
        assert_eq!(q.get(id).unwrap().feedback.as_deref(), Some("rejected without a note"));
    }

    fn a_reviewer_cannot_hold_its_own_verdict_for_review(db) {
        let mut q = db.open();
        let id = writer_in_review(&mut q, json!({}));
        let review = q.claim("critic", 1).unwrap().remove(0);
        let verdict = RunOutcome::Success {
            output: r#"{"approve":true}"#.into(),
            spawn: vec![],
            needs_review: true,
        };
        assert_eq!(
            q.finish(review.lease, verdict, "").unwrap(),
            Applied::Moved(State::Complete)
        );
        assert_eq!(q.get(id).unwrap().state, State::Complete);
    }

    fn a_task_in_review_can_be_cancelled_with_its_dependents(db) {
        let mut q = db.open();
        let mut new = NewTask::new("copy", "{}");
        new.review = true;
        let id = q.submit(&new).unwrap().id;
        let mut publish = NewTask::new("publish", "{}");
        publish.depends_on = vec![id];
        let publish = q.submit(&publish).unwrap().id;
        let lease = claim_one(&mut q, "copy");
        q.finish(lease, ok(json!({"v": 1})), "").unwrap();
        assert_eq!(q.get(id).unwrap().state, State::Review);
        assert_eq!(q.cancel(id, "campaign dropped").unwrap(), vec![id, publish]);
        assert_eq!(q.get(id).unwrap().state, State::Cancelled);
        assert!(matches!(
            q.approve(id, None),
            Err(QueueError::Illegal {
                state: State::Cancelled,
                ..
            })
        ));
    }
}

// SQLite only: a full disk is rehearsed by capping the file's page count
// (`PRAGMA max_page_count`); a PostgreSQL server's disk is not ours to fill.
#[test]
fn a_full_disk_fails_writes_cleanly_and_loses_nothing() {
    let db = TestDb::sqlite();
    let mut q = db.open();
    let ids: Vec<i64> = (0..20)
        .map(|i| submit(&mut q, "a", json!({"i": i})))
        .collect();
    let claimed = q.claim("a", 20).unwrap();
    assert_eq!(claimed.len(), 20);

    // Cap the file at its current size: the next growth fails like a full disk.
    let conn = rusqlite::Connection::open(db.path()).unwrap();
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    colony::queue::bench::set_max_page_count(&q, pages).unwrap();
    let big = json!({"blob": "x".repeat(64 * 1024)});
    let runs: Vec<_> = claimed
        .iter()
        .map(|c| colony::queue::FinishedRun {
            log: "y".repeat(64 * 1024),
            ..completed(c, big.clone())
        })
        .collect();
    let err = q.finish_batch(&runs).unwrap_err();
    assert!(err.to_string().contains("full"), "{err}");
    assert!(!err.is_bad_input());
    // The failed transaction left everything as it was.
    for id in &ids {
        let task = q.get(*id).unwrap();
        assert_eq!(
            (task.state, task.result.is_none()),
            (State::InProgress, true)
        );
    }
    assert!(
        q.submit(&NewTask::new("a", big.to_string())).is_err(),
        "submits fail too, storing nothing"
    );
    assert_eq!(q.list(&ListFilter::default()).unwrap().len(), 20);

    // Space comes back: the same write (as the daemon retries it) succeeds.
    colony::queue::bench::set_max_page_count(&q, 1 << 30).unwrap();
    let applied = q.finish_batch(&runs).unwrap();
    assert!(
        applied
            .iter()
            .all(|a| *a == Applied::Moved(State::Complete))
    );
    assert_eq!(q.get(ids[0]).unwrap().result, Some(big));
}

/// A claim that runs out of space half-way through one of its many-row
/// statements (SQLite writes them `OR FAIL`, keeping no statement journal)
/// takes nothing: the whole transaction rolls back, every task is still
/// ready, no claim event remains, and once space comes back the same claim
/// takes them all.
#[test]
fn a_claim_that_fills_the_disk_half_way_takes_nothing() {
    let db = TestDb::sqlite();
    let mut q = db.open();
    let ids: Vec<i64> = (0..64).map(|i| submit(&mut q, "a", json!(i))).collect();
    let conn = rusqlite::Connection::open(db.path()).unwrap();
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    colony::queue::bench::set_max_page_count(&q, pages).unwrap();
    let err = q.claim("a", 64).unwrap_err();
    assert!(err.to_string().contains("full"), "{err}");
    let claims = |q: &Queue| {
        q.events(None, 0, 1000)
            .unwrap()
            .into_iter()
            .filter(|e| e.event == "claim")
            .count()
    };
    assert_eq!(claims(&q), 0);
    for id in &ids {
        let task = q.get(*id).unwrap();
        assert_eq!((task.state, task.attempts), (State::Ready, 0), "task {id}");
    }

    colony::queue::bench::set_max_page_count(&q, 1 << 30).unwrap();
    assert_eq!(q.claim("a", 64).unwrap().len(), 64);
    assert_eq!(claims(&q), 64);
}

/// Submits a `writer` task reviewed by the agent `critic`, runs it to
/// `output`, and returns its id (it now waits in review, a critic task queued).
fn writer_in_review(q: &mut Queue, output: serde_json::Value) -> i64 {
    let mut new = NewTask::new("writer", "{}");
    new.reviewer = Some("critic".into());
    let id = q.submit(&new).unwrap().id;
    let lease = claim_one(q, "writer");
    q.finish(lease, ok(output), "").unwrap();
    assert_eq!(q.get(id).unwrap().state, State::Review);
    id
}

on_both_drivers! {
    /// A trail cursor hands on every committed event once, in order, in
    /// ranges of at most its limit, and a task's events only when asked.
    fn a_trail_cursor_reads_every_event_once(db) {
        let mut queue = db.open();
        let ids: Vec<i64> = (0..7)
            .map(|_| queue.submit(&colony::task::NewTask::new("echo", "{}")).unwrap().id)
            .collect();
        let all = queue.events(None, 0, 1000).unwrap();
        let mut cursor = colony::queue::TrailCursor::new(0);
        let mut seen = Vec::new();
        loop {
            let batch = cursor.next_events(&queue, None, 3).unwrap();
            assert!(batch.len() <= 3);
            if batch.is_empty() {
                break;
            }
            seen.extend(batch);
        }
        assert_eq!(seen, all);
        assert_eq!(cursor.last(), all.last().unwrap().id);
        let mut one = colony::queue::TrailCursor::new(0);
        let of_task = one.next_events(&queue, Some(ids[3]), 1000).unwrap();
        assert_eq!(of_task, queue.events(Some(ids[3]), 0, 1000).unwrap());
    }
}

on_both_drivers! {
    /// One store of several runs with state writes (the daemon's batch):
    /// each write is checked against the state as the runs before it in
    /// the transaction left it, a `set-if` that no longer holds fails its
    /// run as a conflict and writes nothing, and the others commit with
    /// their completions, each write with its `state_write` event.
    fn a_batch_of_runs_with_state_writes_applies_each_checked(db) {
        use colony::queue::FinishedRun;
        use colony::state::{Scope, Write};
        let mut q = db.open();
        let claimed = submit_and_claim(&mut q, "alpha", 3);
        let write = |key: &str, value: &str, if_version| Write {
            if_version,
            ..set(key, value)
        };
        let run = |i: usize, writes| FinishedRun {
            lease: claimed[i].lease,
            outcome: ok(json!({ "run": i })),
            log: String::new(),
            state: writes,
            effects: vec![],
            // Alternately as the daemon hands runs back (with what the
            // claim said) and as a caller that kept only the lease.
            claimed: i.is_multiple_of(2).then(|| colony::queue::ClaimFacts::of(&claimed[i])),
        };
        let runs = [
            run(0, vec![write("k", "1", None)]),
            // Read version 0 of k, but run 0 commits first in this batch.
            run(1, vec![write("k", "2", Some(0))]),
            run(2, vec![write("j", "3", Some(0)), write("j", "4", Some(1))]),
        ];
        let applied = q.finish_batch(&runs).unwrap();
        assert_eq!(applied[0], Applied::Moved(State::Complete));
        assert_eq!(applied[2], Applied::Moved(State::Complete));
        let loser = q.get(claimed[1].lease.task_id).unwrap();
        assert_ne!(applied[1], Applied::Moved(State::Complete));
        assert_eq!(loser.error.unwrap().kind, ErrorKind::Conflict);
        assert_eq!(loser.result, None);

        let k = q.state_get(Scope::Agent, "alpha", "k").unwrap().unwrap();
        assert_eq!((k.value.as_str(), k.version), ("1", 1));
        let j = q.state_get(Scope::Agent, "alpha", "j").unwrap().unwrap();
        assert_eq!((j.value.as_str(), j.version), ("4", 2));
        let writes_of = |i: usize| {
            q.events(Some(claimed[i].lease.task_id), 0, 100)
                .unwrap()
                .into_iter()
                .filter(|e| e.event == "state_write")
                .map(|e| (e.detail["key"].clone(), e.detail["new_version"].clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(writes_of(0), vec![(json!("k"), json!(1))]);
        assert_eq!(writes_of(1), vec![]);
        assert_eq!(writes_of(2), vec![(json!("j"), json!(1)), (json!("j"), json!(2))]);
    }
}

on_both_drivers! {
    /// A batch whose runs write 45,000 keys in all is stored in one go. On
    /// PostgreSQL each key took an advisory lock of its own, past the
    /// server's shared lock table (about 6,400 with stock settings, some
    /// 15,000 on the test cluster): "out of shared memory", and the batch
    /// was retried for ever.
    fn a_batch_writing_45_000_keys_is_stored(db) {
        use colony::state::Scope;
        let mut q = db.open();
        let claimed = submit_and_claim(&mut q, "alpha", 300);
        let runs: Vec<_> = claimed
            .iter()
            .enumerate()
            .map(|(i, c)| colony::queue::FinishedRun {
                state: (0..150).map(|j| set(&format!("t{i}k{j}"), "1")).collect(),
                ..completed(c, json!(i))
            })
            .collect();
        let applied = q.finish_batch(&runs).unwrap();
        assert_eq!(applied, vec![Applied::Moved(State::Complete); 300]);
        for key in ["t0k0", "t299k149", "t100k50"] {
            let entry = q.state_get(Scope::Agent, "alpha", key).unwrap().unwrap();
            assert_eq!((entry.value.as_str(), entry.version), ("1", 1), "{key}");
        }
        assert_eq!(q.state_scan(Scope::Agent, "alpha", "t299k", 1000).unwrap().len(), 150);
    }

    /// Two writers whose batches write the same keys in opposite orders
    /// (run by run) neither deadlock nor lose a write: each batch locks all
    /// its keys first, in one order. On PostgreSQL they deadlocked, each
    /// time costing a second (deadlock_timeout) and a whole batch's retry.
    fn batches_writing_shared_keys_in_opposite_orders_do_not_deadlock(db) {
        use colony::state::Scope;
        const ROUNDS: usize = 30;
        let mut q = db.open();
        for _ in 0..(4 * ROUNDS) {
            submit(&mut q, "alpha", json!({}));
        }
        let deadlocks = |db: &TestDb| match db.is_postgres() {
            true => db.raw().query(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            )[0][0]
                .int()
                .unwrap(),
            false => 0,
        };
        let before = deadlocks(&db);
        std::thread::scope(|threads| {
            for order in [["x", "y"], ["y", "x"]] {
                let db = &db;
                threads.spawn(move || {
                    let mut q = db.open();
                    for _ in 0..ROUNDS {
                        let claimed = q.claim("alpha", 2).unwrap();
                        let runs: Vec<_> = claimed
                            .iter()
                            .zip(order)
                            .map(|(c, key)| colony::queue::FinishedRun {
                                state: vec![set(key, "1")],
                                ..completed(c, json!(key))
                            })
                            .collect();
                        let applied = q.finish_batch(&runs).unwrap();
                        assert_eq!(applied, vec![Applied::Moved(State::Complete); 2]);
                    }
                });
            }
        });
        for key in ["x", "y"] {
            let entry = q.state_get(Scope::Agent, "alpha", key).unwrap().unwrap();
            assert_eq!(entry.version, 2 * ROUNDS as u64, "{key}: every write counted");
        }
        if db.is_postgres() {
            // The server's statistics arrive within a second or so.
            std::thread::sleep(Duration::from_millis(1500));
            assert_eq!(deadlocks(&db), before, "deadlocks detected");
        }
    }
}

on_both_drivers! {
    /// What a run says its claim was is checked, not trusted: a completion
    /// whose facts do not hold (another attempt, agent or chain) completes
    /// its task as the row says, the attempt in its event and its state
    /// written for the task's own agent and chain, and a lost lease stays
    /// lost whatever facts come with it.
    fn claim_facts_a_run_brings_are_checked_not_trusted(db) {
        use colony::queue::{ClaimFacts, FinishedRun};
        use colony::state::{Scope, Write};
        let mut q = db.open();
        for _ in 0..4 {
            submit(&mut q, "alpha", json!({}));
        }
        let claimed = q.claim("alpha", 4).unwrap();
        let facts = |i: usize| ClaimFacts::of(&claimed[i]);
        let wrong = [
            ClaimFacts { attempt: 7, ..facts(0) },
            ClaimFacts { agent: "beta".into(), ..facts(1) },
            ClaimFacts { chain: claimed[2].chain + 1000, ..facts(2) },
        ];
        let run = |i: usize, scope, given: ClaimFacts| FinishedRun {
            lease: claimed[i].lease,
            outcome: ok(json!({ "run": i })),
            log: "ran".into(),
            state: vec![Write {
                scope,
                key: format!("k{i}"),
                value: Some("v".into()),
                if_version: None,
            }],
            effects: vec![],
            claimed: Some(given),
        };
        let runs = [
            run(0, Scope::Agent, wrong[0].clone()),
            run(1, Scope::Agent, wrong[1].clone()),
            run(2, Scope::Chain, wrong[2].clone()),
        ];
        let applied = q.finish_batch(&runs).unwrap();
        assert_eq!(applied, vec![Applied::Moved(State::Complete); 3]);
        for (i, task) in claimed.iter().take(3).enumerate() {
            let events = q.events(Some(task.lease.task_id), 0, 100).unwrap();
            let complete = events.iter().find(|e| e.event == "complete").unwrap();
            assert_eq!(complete.detail["attempt"], json!(1), "run {i}");
            assert_eq!(q.get(task.lease.task_id).unwrap().result, Some(json!({ "run": i })));
        }
        let key = |q: &Queue, scope, owner: &str, key: &str| q.state_get(scope, owner, key).unwrap();
        assert!(key(&q, Scope::Agent, "alpha", "k0").is_some());
        assert!(key(&q, Scope::Agent, "alpha", "k1").is_some());
        assert!(key(&q, Scope::Agent, "beta", "k1").is_none());
        let chain = claimed[2].chain.to_string();
        assert!(key(&q, Scope::Chain, &chain, "k2").is_some());
        assert!(key(&q, Scope::Chain, &(claimed[2].chain + 1000).to_string(), "k2").is_none());

        // Task 3's lease is reset; its run's true facts do not bring it back.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(q.reset_stale_leases(Duration::from_millis(10)).unwrap().len(), 1);
        let late = run(3, Scope::Agent, facts(3));
        assert_eq!(q.finish_batch(&[late]).unwrap(), vec![Applied::LeaseLost]);
        assert!(key(&q, Scope::Agent, "alpha", "k3").is_none());
        assert_ne!(q.get(claimed[3].lease.task_id).unwrap().state, State::Complete);
    }
}

on_both_drivers! {
    /// Several runs of one batch writing the same keys: each write is
    /// checked against the writes of the runs before it and applied in
    /// that order (a `set-if` that holds at its place completes there,
    /// whatever later runs write), a `set-if` that no longer holds fails
    /// its own run only, and every write keeps its own event with its own
    /// versions.
    fn a_batch_writing_the_same_keys_applies_each_write_in_order(db) {
        use colony::queue::FinishedRun;
        use colony::state::{Scope, Write};
        let mut q = db.open();
        q.state_write_by_operator(Scope::Agent, "alpha", "gone", Some("0")).unwrap();
        for _ in 0..10 {
            submit(&mut q, "alpha", json!({}));
        }
        let claimed = q.claim("alpha", 10).unwrap();
        let write = |key: &str, value: Option<&str>, if_version| Write {
            scope: Scope::Agent,
            key: key.into(),
            value: value.map(str::to_string),
            if_version,
        };
        let in_chain = Write {
            scope: Scope::Chain,
            ..write("n", Some("\"c\""), None)
        };
        let writes = [
            vec![write("n", Some("1"), None)],
            vec![write("n", Some("2"), None)],
            vec![write("n", Some("9"), Some(1))], // run 1 got there first
            vec![write("n", Some("3"), Some(2))],
            vec![write("gone", None, None)],
            vec![write("gone", Some("\"back\""), Some(0))],
            vec![write("m", Some("1"), None), write("m", None, None)],
            // Later writes of the same keys: runs 3 and 5 held only at their
            // place in the batch, so they must have completed there.
            vec![write("n", Some("4"), None)],
            vec![write("gone", Some("\"again\""), None)],
            vec![in_chain], // another scope, another owner: another key
        ];
        let runs: Vec<FinishedRun> = claimed
            .iter()
            .zip(&writes)
            .map(|(task, writes)| FinishedRun {
                state: writes.clone(),
                ..completed(task, json!({}))
            })
            .collect();
        let applied = q.finish_batch(&runs).unwrap();
        let id = |i: usize| claimed[i].lease.task_id;
        for i in [0, 1, 3, 4, 5, 6, 7, 8, 9] {
            assert_eq!(applied[i], Applied::Moved(State::Complete), "run {i}");
        }
        let refused = q.get(id(2)).unwrap();
        assert_ne!(refused.state, State::Complete);
        assert_eq!(refused.error.unwrap().kind, colony::task::ErrorKind::Conflict);

        let entry = |key: &str| q.state_get(Scope::Agent, "alpha", key).unwrap();
        let n = entry("n").unwrap();
        assert_eq!((n.value.as_str(), n.version), ("4", 4));
        let gone = entry("gone").unwrap();
        assert_eq!((gone.value.as_str(), gone.version), ("\"again\"", 2));
        assert!(entry("m").is_none());
        let chain = claimed[9].chain.to_string();
        let n_of_chain = q.state_get(Scope::Chain, &chain, "n").unwrap().unwrap();
        assert_eq!((n_of_chain.value.as_str(), n_of_chain.version), ("\"c\"", 1));
        let (written, made) = q.state_written_by(id(7), 10).unwrap();
        assert_eq!((written.len(), made), (1, 1));
        assert_eq!((written[0].key.as_str(), written[0].version), ("n", 4));
        assert_eq!(written[0].value.as_deref(), Some("4"), "still the key's value");
        // An earlier task's writes are listed, each written over since.
        let (earlier, _) = q.state_written_by(id(3), 10).unwrap();
        assert!(!earlier.is_empty() && earlier.iter().all(|w| w.value.is_none()), "{earlier:?}");

        // Each write's own event, before its task's completion.
        let versions = |i: usize| -> Vec<(String, u64, u64)> {
            let events = q.events(Some(id(i)), 0, 100).unwrap();
            let complete = events.iter().position(|e| e.event == "complete");
            events
                .iter()
                .enumerate()
                .filter(|(_, e)| e.event == "state_write")
                .map(|(at, e)| {
                    assert!(complete.is_none_or(|c| at < c), "run {i}: written after completing");
                    let d = &e.detail;
                    (
                        d["key"].as_str().unwrap().to_string(),
                        d["old_version"].as_u64().unwrap(),
                        d["new_version"].as_u64().unwrap(),
                    )
                })
                .collect()
        };
        let v = |key: &str, old, new| (key.to_string(), old, new);
        assert_eq!(versions(0), vec![v("n", 0, 1)]);
        assert_eq!(versions(1), vec![v("n", 1, 2)]);
        assert_eq!(versions(2), vec![]);
        assert_eq!(versions(3), vec![v("n", 2, 3)]);
        assert_eq!(versions(4), vec![v("gone", 1, 0)]);
        assert_eq!(versions(5), vec![v("gone", 0, 1)]);
        assert_eq!(versions(6), vec![v("m", 0, 1), v("m", 1, 0)]);
        assert_eq!(versions(7), vec![v("n", 3, 4)]);
        assert_eq!(versions(8), vec![v("gone", 1, 2)]);
        assert_eq!(versions(9), vec![v("n", 0, 1)]);
    }
}

on_both_drivers! {
    /// One store of several completions (the daemon's batch) counts off the
    /// dependencies of exactly the tasks it completes: a join waiting on two
    /// of them becomes ready, a task waiting on one that did not finish
    /// (even one whose id lies between theirs) stays pending, whether the
    /// batch's ids lie close together or far apart.
    fn a_batch_of_completions_releases_exactly_their_dependents(db) {
        use colony::queue::FinishedRun;
        let mut q = db.open();
        let a0 = submit(&mut q, "close", json!({}));
        let b0 = submit(&mut q, "apart", json!({}));
        let a1 = submit(&mut q, "close", json!({}));
        for _ in 0..300 {
            submit(&mut q, "filler", json!({}));
        }
        let b1 = submit(&mut q, "apart", json!({}));
        let dependent = |q: &mut Queue, on: Vec<i64>| {
            let mut task = NewTask::new("next", "{}");
            task.depends_on = on;
            q.submit(&task).unwrap().id
        };
        let join_close = dependent(&mut q, vec![a0, a1]);
        let join_apart = dependent(&mut q, vec![b0, b1]);
        let waits = dependent(&mut q, vec![a0, b0]);

        let store = |q: &mut Queue, agent: &str| {
            let claimed = q.claim(agent, 2).unwrap();
            let runs: Vec<FinishedRun> = claimed
                .iter()
                .map(|t| completed(t, json!({})))
                .collect();
            let applied = q.finish_batch(&runs).unwrap();
            assert_eq!(applied, vec![Applied::Moved(State::Complete); 2]);
            claimed.iter().map(|t| t.lease.task_id).collect::<Vec<_>>()
        };
        // Ids close together, with b0 between them, not completed.
        assert_eq!(store(&mut q, "close"), vec![a0, a1]);
        assert_eq!(q.get(join_close).unwrap().state, State::Ready);
        assert_eq!(q.get(join_apart).unwrap().state, State::Pending);
        assert_eq!(q.get(waits).unwrap().state, State::Pending);
        // Ids 300 apart.
        assert_eq!(store(&mut q, "apart"), vec![b0, b1]);
        assert_eq!(q.get(join_apart).unwrap().state, State::Ready);
        assert_eq!(q.get(waits).unwrap().state, State::Ready);
        assert_eq!(q.get(join_close).unwrap().state, State::Ready);
    }

    /// The daemon looks at the outbox after a hot-path transaction only when
    /// the transaction says effects may be due: never after plain
    /// completions, always after one that queued an effect (or any other
    /// completion off the plain path).
    fn a_hot_path_write_says_when_effects_may_be_due(db) {
        use colony::effects::Effect;
        use colony::queue::FinishedRun;
        let mut q = db.open();
        for _ in 0..3 {
            submit(&mut q, "a", json!({}));
        }
        let run = |lease: Lease, effects: Vec<Effect>| FinishedRun {
            lease,
            outcome: ok(json!({})),
            log: String::new(),
            state: vec![],
            effects,
            claimed: None,
        };
        let claimed = q.finish_and_claim(&[], &[("a".into(), 3)]).unwrap().claimed;
        let leases: Vec<Lease> = claimed[0].iter().map(|t| t.lease).collect();
        assert_eq!(leases.len(), 3);

        let plain = q
            .finish_and_claim(&[run(leases[0], vec![]), run(leases[1], vec![])], &[])
            .unwrap();
        assert_eq!(plain.applied, vec![Applied::Moved(State::Complete); 2]);
        assert!(!plain.effects_may_be_due, "plain completions queue no effect");

        let effect = hook_effect();
        let with_effect = q
            .finish_and_claim(&[run(leases[2], vec![effect])], &[])
            .unwrap();
        assert_eq!(with_effect.applied, vec![Applied::Moved(State::Complete)]);
        assert!(with_effect.effects_may_be_due);
        assert!(q.next_effect_due(&["a".into()]).unwrap().is_some(), "the effect is queued");
        // Due only for a daemon that can send it: one with its agent.
        assert_eq!(q.next_effect_due(&["b".into()]).unwrap(), None);
        assert_eq!(q.next_effect_due(&[]).unwrap(), None);
    }
}

on_both_drivers! {
    /// An effect whose sender's claim ran out with no answer recorded (the
    /// daemon died mid-send) is taken over by the next sender, with an
    /// event naming the lost sender and its attempt: the trail showed the
    /// second attempt with nothing before it.
    fn an_effect_cut_off_mid_send_is_taken_over_with_an_event(db) {
        let mut q = db.open_as("first-sender");
        let lease = complete_with_effect(&mut q, hook_effect());
        let agents = ["a".to_string()];
        let first = q.claim_due_effects(4, Duration::from_millis(100), &agents).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].attempt, 1);
        // The first sender dies without an answer; its claim runs out.
        std::thread::sleep(Duration::from_millis(250));
        let mut second = db.open_as("second-sender");
        let again = second.claim_due_effects(4, Duration::from_secs(60), &agents).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].id, again[0].attempt), (first[0].id, 2));
        let events = second.events(Some(lease.task_id), 0, 100).unwrap();
        let taken: Vec<_> = events.iter().filter(|e| e.event == "effect_taken_over").collect();
        assert_eq!(taken.len(), 1, "{events:?}");
        assert_eq!(taken[0].actor, "second-sender");
        assert_eq!(taken[0].detail["sender"], "first-sender");
        assert_eq!(taken[0].detail["attempt"], 1);
        assert_eq!(taken[0].detail["effect"], first[0].id);
        // A live claim is not taken over.
        assert!(second.claim_due_effects(4, Duration::from_secs(60), &agents).unwrap().is_empty());
    }
}

on_both_drivers! {
    /// An effect cut off mid-send on its last attempt fails, saying so, and
    /// is not sent again: one whose sending kills its daemon was sent after
    /// every crash, its attempts no limit. `effects retry` sends it again.
    fn an_effect_cut_off_on_its_last_attempt_fails(db) {
        let mut q = db.open_as("first-sender");
        let lease = complete_with_effect(&mut q, colony::effects::Effect { max_attempts: 2, ..hook_effect() });
        let agents = ["a".to_string()];
        let short = Duration::from_millis(100);
        let first = q.claim_due_effects(4, short, &agents).unwrap();
        std::thread::sleep(Duration::from_millis(250));
        let second = q.claim_due_effects(4, short, &agents).unwrap();
        assert_eq!((second.len(), second[0].attempt), (1, 2), "attempt 1 was taken over");
        std::thread::sleep(Duration::from_millis(250));
        let mut other = db.open_as("second-sender");
        assert!(other.claim_due_effects(4, short, &agents).unwrap().is_empty(), "not sent a third time");
        let rows = other.effects(Some(lease.task_id), None, 10).unwrap();
        assert_eq!((rows[0].state.as_str(), rows[0].attempts), ("failed", 2));
        assert!(rows[0].error.as_deref().unwrap().contains("last attempt was cut off"), "{:?}", rows[0].error);
        let events = other.events(Some(lease.task_id), 0, 100).unwrap();
        let failed: Vec<_> = events.iter().filter(|e| e.event == "effect_failed").collect();
        assert_eq!(failed.len(), 1, "{events:?}");
        assert_eq!(failed[0].actor, "second-sender");
        assert_eq!(failed[0].detail["sender"], "first-sender");
        assert_eq!(failed[0].detail["attempt"], 2);
        assert_eq!(failed[0].detail["effect"], first[0].id);
        assert!(other.effects_outstanding(&agents).unwrap() == 0);
        // The sender was only slow (a stall, a clock step): its answer,
        // when it comes, is still recorded.
        let late = q.finish_delivery(&second[0], Some(200), None, false, None).unwrap();
        assert_eq!(late, Some("sent"));
        let rows = other.effects(Some(lease.task_id), None, 10).unwrap();
        assert_eq!(rows[0].state, "sent");
    }
}

on_both_drivers! {
    /// A receiver's `Retry-After` (on a 429 or 503) holds the effect's next
    /// attempt at least that long: retried on the fixed backoff (0.5, 1,
    /// 2, 4 s), an effect answered `429 Retry-After: 60` used up its five
    /// attempts in 7.5 s and failed for good (found by a review).
    fn a_receivers_retry_after_holds_the_next_attempt(db) {
        let mut q = db.open();
        let lease = complete_with_effect(&mut q, hook_effect());
        let agents = ["a".to_string()];
        let claimed = q.claim_due_effects(4, Duration::from_secs(60), &agents).unwrap();
        let before = colony::queue::now_ms();
        let state = q
            .finish_delivery(&claimed[0], Some(429), Some("HTTP 429"), false, Some(Duration::from_secs(60)))
            .unwrap();
        assert_eq!(state, Some("pending"));
        let row = &q.effects(Some(lease.task_id), None, 10).unwrap()[0];
        let after = colony::queue::now_ms();
        assert!(
            (before + 60_000..=after + 60_000).contains(&row.next_at),
            "due in {} ms",
            row.next_at - before
        );
    }

    /// An effect whose stored headers cannot be read fails, on the task's
    /// trail like every failed delivery (it failed with no event).
    fn an_effect_that_cannot_be_read_fails_on_the_trail(db) {
        let mut q = db.open();
        let lease = complete_with_effect(&mut q, hook_effect());
        assert_eq!(db.raw().execute("UPDATE effects SET headers = 'not json'"), 1);
        let agents = ["a".to_string()];
        assert!(q.claim_due_effects(4, Duration::from_secs(60), &agents).unwrap().is_empty());
        let events = q.events(Some(lease.task_id), 0, 100).unwrap();
        let failed: Vec<_> = events.iter().filter(|e| e.event == "effect_failed").collect();
        assert_eq!(failed.len(), 1, "{events:?}");
        assert!(failed[0].detail["error"].as_str().unwrap().contains("stored headers cannot be read"));
        assert_eq!(failed[0].detail["now"], "failed");
    }
}

/// A run's success that spawns `n` tasks of agent `b`.
fn spawning(n: usize) -> RunOutcome {
    RunOutcome::Success {
        output: "{}".into(),
        spawn: (0..n)
            .map(|_| SpawnSpec {
                agent: "b".into(),
                payload: "{}".into(),
                priority: 0,
                review: false,
            })
            .collect(),
        needs_review: false,
    }
}

on_both_drivers! {
    /// A chain is capped at MAX_CHAIN_TASKS tasks, counted on its root: a
    /// completion whose children would pass it fails as bad input and
    /// changes nothing; within it, they are inserted and counted.
    fn a_chain_at_its_cap_spawns_no_more(db) {
        let mut q = db.open();
        let root = q.submit(&NewTask::new("a", "{}")).unwrap().id;
        let lease = q.claim("a", 1).unwrap()[0].lease;
        let cap = colony::queue::MAX_CHAIN_TASKS;
        db.raw().execute(&format!("UPDATE tasks SET chain_tasks = {} WHERE id = {root}", cap - 2));
        let err = q.finish(lease, spawning(3), "").unwrap_err();
        assert!(err.is_bad_input(), "{err:?}");
        assert!(err.to_string().contains(&format!("would hold {} tasks", cap + 1)), "{err}");
        assert_eq!(q.get(root).unwrap().state, State::InProgress, "nothing changed");
        assert!(q.children(root).unwrap().is_empty());
        assert_eq!(q.finish(lease, spawning(2), "").unwrap(), Applied::Moved(State::Complete));
        assert_eq!(q.children(root).unwrap().len(), 2);
        let size = db.raw().query(&format!("SELECT chain_tasks FROM tasks WHERE id = {root}"));
        assert_eq!(size[0][0].int(), Some(cap));
    }

    /// A run entering review is held to the chain's cap too: held, its
    /// children made every approval fail (a reviewer agent's verdict
    /// failing the reviewer), the task stuck in review. With room when it
    /// entered and none once a verdict comes, the reviewer's approval
    /// leaves it to a person, whose approval is refused saying why.
    fn a_run_for_review_is_held_to_its_chains_cap(db) {
        let mut q = db.open();
        let mut task = NewTask::new("a", "{}");
        task.reviewer = Some("r".into());
        let root = q.submit(&task).unwrap().id;
        let lease = q.claim("a", 1).unwrap()[0].lease;
        let cap = colony::queue::MAX_CHAIN_TASKS;
        db.raw().execute(&format!("UPDATE tasks SET chain_tasks = {} WHERE id = {root}", cap - 1));
        let err = q.finish(lease, spawning(2), "").unwrap_err();
        assert!(err.to_string().contains(&format!("would hold {} tasks", cap + 1)), "{err}");
        assert_eq!(q.get(root).unwrap().state, State::InProgress, "nothing changed");
        // One fits: in review (its reviewer task is not counted).
        assert_eq!(q.finish(lease, spawning(1), "").unwrap(), Applied::Moved(State::Review));
        let reviewer = q.claim("r", 1).unwrap()[0].lease;
        // The chain fills up before the verdict comes.
        db.raw().execute(&format!("UPDATE tasks SET chain_tasks = {cap} WHERE id = {root}"));
        let verdict = RunOutcome::Success { output: r#"{"approve": true}"#.into(), spawn: vec![], needs_review: false };
        assert_eq!(q.finish(reviewer, verdict, "").unwrap(), Applied::Moved(State::Complete), "the reviewer's run is not failed");
        assert_eq!(q.get(root).unwrap().state, State::Review, "left to a person");
        let events = q.events(Some(root), 0, 100).unwrap();
        let deferred = events.iter().find(|e| e.event == "verdict_deferred").expect("an event says why");
        assert!(deferred.detail["why"].as_str().unwrap().contains("would hold"), "{deferred:?}");
        let round = q.review_round(root).unwrap();
        assert!(round.is_some_and(|r| r < deferred.id), "an audit event starts no round");
        let err = q.approve(root, None).unwrap_err();
        assert!(err.to_string().contains("would hold"), "{err}");
        assert_eq!(q.get(root).unwrap().state, State::Review);
    }
}
