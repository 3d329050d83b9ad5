//! Token budgets against a real queue file: runs of one chain running at
//! once cannot together spend past the chain's budget, because each call
//! reserves its tokens first and live reservations count for everyone.
//! Each test runs on both drivers (`name::sqlite`, `name::postgres`).

mod common;
use common::{TestDb, on_both_drivers};

use std::time::Duration;

use colony::models::{Budget, BudgetOf, ChatReply, ChatRequest, Finish, ModelCall, Usage};
use colony::queue::{Applied, Lease, Queue};
use colony::task::{NewTask, NextSpec};
use serde_json::json;

fn call(charged: Usage) -> ModelCall {
    ModelCall {
        seq: 1,
        alias: "fast".into(),
        request_hash: "h".into(),
        request: ChatRequest::default(),
        outcome: Ok(ChatReply {
            content: "ok".into(),
            tool_calls: vec![],
            finish: Finish::Stop,
            usage: charged,
            model: "m".into(),
        }),
        charged,
        cost_usd: None,
        ms: 1,
        replayed: false,
        sent: true,
    }
}

/// A task of agent `a` with attempts to spare for interrupted runs.
fn retried_task() -> NewTask {
    let mut task = NewTask::new("a", "{}");
    task.max_attempts = 4;
    task.backoff_ms = 1;
    task
}

/// Interrupts the one running task of agent `a` (its lease reset as stale)
/// and claims it again: the next run's lease.
fn interrupt(q: &mut Queue) -> Lease {
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        q.reset_stale_leases(Duration::from_millis(200))
            .unwrap()
            .len(),
        1
    );
    std::thread::sleep(Duration::from_millis(20));
    q.claim("a", 1).unwrap()[0].lease
}

/// Call `seq` asking the question `hash`, answered and charged 10 tokens.
fn paid(seq: u32, hash: &str) -> ModelCall {
    let mut paid = call(Usage::new(5, 5));
    (paid.seq, paid.request_hash) = (seq, hash.to_string());
    paid
}

/// A root with a chain budget of `budget` whose two children are claimed
/// at once; returns their leases.
fn two_children_running(q: &mut Queue, budget: u64) -> (Lease, Lease) {
    let leases = children_running(q, budget, &["a", "b"]);
    (leases[0], leases[1])
}

/// A root with a chain budget of `budget` and a child of each agent, all
/// claimed at once; returns their leases.
fn children_running(q: &mut Queue, budget: u64, agents: &[&str]) -> Vec<Lease> {
    let child = |agent: &str| NextSpec {
        agent: agent.into(),
        payload: json!({}),
        priority: 0,
        review: false,
        next: vec![],
    };
    let mut root = NewTask::new("root", "{}");
    root.token_budget = Some(budget);
    root.next = agents.iter().map(|a| child(a)).collect();
    q.submit(&root).unwrap();
    let lease = q.claim("root", 1).unwrap()[0].lease;
    q.finish(
        lease,
        colony::task::RunOutcome::Success {
            output: "{}".into(),
            spawn: vec![],
            needs_review: false,
        },
        "",
    )
    .unwrap();
    agents
        .iter()
        .map(|agent| q.claim(agent, 1).unwrap()[0].lease)
        .collect()
}

on_both_drivers! {
    fn live_reservations_of_a_chain_count_for_every_run_of_it(db) {
        let mut q = db.open();
        let (a, b) = two_children_running(&mut q, 200);
        assert_eq!(
            q.reserve_model_tokens(a, 1, 110, None).unwrap(),
            Budget::Reserved { left: 90 }
        );
        // While a's call is in flight, b cannot reserve past what is left.
        assert!(matches!(
            q.reserve_model_tokens(b, 1, 110, None).unwrap(),
            Budget::Refused { left: 90, by: BudgetOf::Chain { budget: 200, .. } }
        ));
        // a's call settles at 50 tokens: its reservation gives way to its charge.
        let charged = Usage::new(30, 20);
        q.record_model_call(a, 1, &call(charged)).unwrap();
        assert_eq!(
            q.reserve_model_tokens(b, 1, 110, None).unwrap(),
            Budget::Reserved { left: 40 }
        );
        // Asking with need 0 only reads what is left.
        assert_eq!(
            q.reserve_model_tokens(a, 1, 0, None).unwrap(),
            Budget::Reserved { left: 40 }
        );
    }

    /// Asking what is left sets nothing aside: a read, which goes on while
    /// another connection holds the writer (a guest may ask in a loop; as a
    /// write each ask waited for the lock, then failed).
    fn asking_what_is_left_reads_without_the_writer(db) {
        let mut q = db.open();
        let (a, _) = two_children_running(&mut q, 200);
        let mut raw = db.raw();
        match db {
            TestDb::Sqlite { .. } => raw.execute("BEGIN IMMEDIATE"),
            TestDb::Postgres { .. } => {
                raw.execute("BEGIN");
                raw.execute("LOCK TABLE tasks IN EXCLUSIVE MODE")
            }
        };
        assert_eq!(q.reserve_model_tokens(a, 1, 0, None).unwrap(), Budget::Reserved { left: 200 });
        raw.execute("ROLLBACK");
    }

    /// A call in flight when its host died may have been answered and
    /// charged: its reservation keeps counting against the chain's budget
    /// after the lease reset, and the reset's event says so.
    fn a_reservation_cut_off_by_a_lease_reset_keeps_counting(db) {
        let mut q = db.open();
        let (a, b) = two_children_running(&mut q, 200);
        assert_eq!(
            q.reserve_model_tokens(a, 1, 150, None).unwrap(),
            Budget::Reserved { left: 50 }
        );
        std::thread::sleep(Duration::from_millis(300));
        q.heartbeat(&[b]).unwrap();
        let reset = q.reset_stale_leases(Duration::from_millis(200)).unwrap();
        assert_eq!(
            reset.iter().map(|r| r.task_id).collect::<Vec<_>>(),
            vec![a.task_id]
        );
        assert!(matches!(
            q.reserve_model_tokens(b, 1, 51, None).unwrap(),
            Budget::Refused { left: 50, by: BudgetOf::Chain { budget: 200, .. } }
        ));
        assert!(
            q.reserve_model_tokens(a, 1, 1, None).is_err(),
            "a lost lease reserves nothing"
        );
        // a's next attempt shares what is left with b.
        let a2 = q.claim("a", 1).unwrap()[0].lease;
        assert_eq!(
            q.reserve_model_tokens(a2, 1, 50, None).unwrap(),
            Budget::Reserved { left: 0 }
        );
        // `show` says what is set aside beside what was charged.
        let usage = q.usage(a.task_id).unwrap();
        assert_eq!((usage.input_tokens, usage.reserved_tokens), (0, 200));
        let expired = q.events(Some(a.task_id), 0, 100).unwrap();
        let expired = expired.iter().find(|e| e.event == "lease_expired").unwrap();
        assert_eq!(
            expired.detail["model_calls_cut_off"],
            serde_json::json!({"calls": 1, "tokens_reserved": 150})
        );
        // An operator reviving the chain must give it more than the calls
        // cut off reserved (a2's call too, when a2 fails in its turn).
        let budget_exceeded = colony::task::TaskError {
            kind: colony::task::ErrorKind::BudgetExceeded,
            message: "no tokens left".into(),
        };
        q.finish(a2, colony::task::RunOutcome::Failure(budget_exceeded), "").unwrap();
        let err = q.retry_with_token_budget(a.task_id, Some(200)).unwrap_err().to_string();
        assert!(
            err.contains("spent 0 tokens already and 200 more reserved") && err.contains("more than 200"),
            "{err}"
        );
        q.retry_with_token_budget(a.task_id, Some(201)).unwrap();
    }

    /// A run that ended while its call was in flight (its deadline, a
    /// cancellation) leaves its reservation counting too; an answer that
    /// came back after the lease was lost and charged nothing settles it.
    fn a_reservation_is_settled_only_by_its_calls_record(db) {
        let mut q = db.open();
        let leases = children_running(&mut q, 300, &["a", "b", "c"]);
        let (a, b, c) = (leases[0], leases[1], leases[2]);
        q.reserve_model_tokens(a, 1, 100, None).unwrap();
        q.reserve_model_tokens(b, 1, 100, None).unwrap();
        // a's run hit its deadline mid-call, on its last attempt.
        let timeout = colony::task::TaskError {
            kind: colony::task::ErrorKind::Timeout,
            message: "the run exceeded its deadline".into(),
        };
        q.finish(a, colony::task::RunOutcome::Failure(timeout), "").unwrap();
        // b was cancelled; its call came back with nothing charged.
        q.cancel(b.task_id, "by an operator").unwrap();
        assert_eq!(
            q.record_model_call(b, 1, &call(Usage::default())).unwrap(),
            Applied::LeaseLost
        );
        assert_eq!(
            q.reserve_model_tokens(c, 1, 0, None).unwrap(),
            Budget::Reserved { left: 200 },
            "a's reservation counts, b's was settled at nothing"
        );
    }

    /// A call's record settles its own reservation and no other: one whose
    /// record was lost (a database error) keeps counting, as the charge it
    /// may stand for, through the run's later calls and releases.
    fn a_record_or_release_settles_only_its_own_calls_reservation(db) {
        let mut q = db.open();
        let (a, b) = two_children_running(&mut q, 1000);
        q.reserve_model_tokens(a, 1, 100, None).unwrap(); // its record never came
        q.reserve_model_tokens(a, 2, 200, None).unwrap();
        q.reserve_model_tokens(a, 3, 300, None).unwrap();
        let mut second = call(Usage::new(30, 20));
        second.seq = 2;
        q.record_model_call(a, 1, &second).unwrap();
        q.release_model_reservation(a, 3).unwrap(); // cut off before it was sent
        assert_eq!(
            q.reserve_model_tokens(b, 1, 0, None).unwrap(),
            Budget::Reserved { left: 1000 - 100 - 50 },
            "call 1's reservation counts beside call 2's charge"
        );
        assert_eq!(q.usage(a.task_id).unwrap().reserved_tokens, 100);
    }

    /// Without any budget too, a call in flight when its host died is
    /// counted by the reset (its reservation), and one settled is not.
    fn a_reset_counts_calls_cut_off_without_a_budget(db) {
        let mut q = db.open();
        for _ in 0..2 {
            q.submit(&NewTask::new("free", "{}")).unwrap();
        }
        let leases: Vec<Lease> = q.claim("free", 2).unwrap().iter().map(|c| c.lease).collect();
        for lease in &leases {
            assert_eq!(q.reserve_model_tokens(*lease, 1, 500, None).unwrap(), Budget::Unlimited);
        }
        // The second run's call came back and was recorded: settled.
        let settled = q.record_model_call(leases[1], 1, &call(Usage::new(7, 3)));
        assert_eq!(settled.unwrap(), Applied::Moved(colony::task::State::InProgress));
        std::thread::sleep(Duration::from_millis(300));
        q.reset_stale_leases(Duration::from_millis(200)).unwrap();
        let cut_off = |lease: Lease| {
            let events = q.events(Some(lease.task_id), 0, 100).unwrap();
            let expired = events.iter().find(|e| e.event == "lease_expired").unwrap();
            expired.detail.get("model_calls_cut_off").cloned()
        };
        assert_eq!(cut_off(leases[0]), Some(json!({"calls": 1, "tokens_reserved": 500})));
        assert_eq!(cut_off(leases[1]), None);
    }

    fn the_tighter_of_the_chain_and_the_task_budget_applies(db) {
        let mut q = db.open();
        let (a, _) = two_children_running(&mut q, 1000);
        assert_eq!(
            q.reserve_model_tokens(a, 1, 100, Some(120)).unwrap(),
            Budget::Reserved { left: 20 }
        );
        q.record_model_call(
            a,
            1,
            &call(Usage::new(60, 40)),
        )
        .unwrap();
        assert_eq!(
            q.reserve_model_tokens(a, 1, 30, Some(120)).unwrap(),
            Budget::Refused { left: 20, by: BudgetOf::Manifest(120) }
        );
        let unlimited = q.submit(&NewTask::new("solo", "{}")).unwrap().id;
        let solo = q.claim("solo", 1).unwrap()[0].lease;
        assert_eq!(solo.task_id, unlimited);
        assert_eq!(
            q.reserve_model_tokens(solo, 1, 1_000_000, None).unwrap(),
            Budget::Unlimited
        );
    }

    /// A call the provider charged for, answered after the run lost its
    /// lease (the task cancelled meanwhile), is stored for its spend: it
    /// counts against the chain's budget and in the task's usage, and its
    /// event says so. A call charged nothing is not stored.
    fn a_paid_call_of_a_run_that_lost_its_lease_still_counts(db) {
        let mut q = db.open();
        let (a, b) = two_children_running(&mut q, 200);
        assert_eq!(
            q.reserve_model_tokens(a, 1, 100, None).unwrap(),
            Budget::Reserved { left: 100 }
        );
        q.cancel(a.task_id, "no longer wanted").unwrap();
        let free = call(Usage::default());
        assert_eq!(q.record_model_call(a, 1, &free).unwrap(), Applied::LeaseLost);
        assert!(q.model_calls(a.task_id).unwrap().is_empty(), "nothing paid, nothing stored");
        let charged = Usage::new(30, 50);
        assert_eq!(q.record_model_call(a, 1, &call(charged)).unwrap(), Applied::LeaseLost);
        let calls = q.model_calls(a.task_id).unwrap();
        assert_eq!(
            (calls.len(), calls[0].input_tokens, calls[0].output_tokens),
            (1, 30, 50)
        );
        let usage = q.usage(a.task_id).unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (30, 50));
        // The chain's other run sees the spend.
        assert_eq!(
            q.reserve_model_tokens(b, 1, 0, None).unwrap(),
            Budget::Reserved { left: 120 }
        );
        let events = q.events(Some(a.task_id), 0, 100).unwrap();
        let recorded = events.iter().find(|e| e.event == "model_call").unwrap();
        assert_eq!(recorded.detail["lease_lost"], json!(true), "{recorded:?}");
        assert_eq!(recorded.to.as_str(), "cancelled");
    }

    /// A call refused before any provider saw it keeps no prompt in the
    /// journal (its hash stays): refused in a loop, prompts filled gigabytes.
    fn a_refused_calls_prompt_is_not_kept(db) {
        let mut q = db.open();
        let (a, _) = two_children_running(&mut q, 200);
        let mut refused = call(Usage::default());
        refused.request.messages = vec![colony::models::Message::user("a secret prompt")];
        refused.outcome = Err(colony::models::ModelError::NotGranted("not granted".into()));
        refused.sent = false;
        q.record_model_call(a, 1, &refused).unwrap();
        let mut sent = call(Usage::new(1, 1));
        sent.seq = 2;
        sent.request.messages = vec![colony::models::Message::user("a sent prompt")];
        q.record_model_call(a, 1, &sent).unwrap();
        let rows = db.raw().query("SELECT seq, request, request_hash FROM model_calls ORDER BY seq");
        assert_eq!(rows[0][1].text(), Some("null"));
        assert_eq!(rows[0][2].text(), Some("h"));
        assert!(rows[1][1].text().unwrap().contains("a sent prompt"));
        // The run is interrupted (its lease reset): the next run's replay
        // reads both rows, the one without its prompt included.
        std::thread::sleep(Duration::from_millis(300));
        let reset = q.reset_stale_leases(Duration::from_millis(200)).unwrap();
        assert!(reset.iter().any(|r| r.task_id == a.task_id), "{reset:?}");
        let again = q.claim("a", 1).unwrap()[0].lease;
        // Only the call that reached a provider is replayed: the refused one
        // is asked (and refused) again, and the next question meets the
        // recorded answer instead of ending replay.
        let context = q.model_context(again).unwrap();
        assert_eq!(context.replay.len(), 1);
        assert_eq!(context.replay[0].seq, 2);
    }

    /// A call this host refused in one run (no request kept) that the
    /// next run had answered before it too was cut off is replayed from
    /// that answer by the third, with the first run's calls around it: paid
    /// once, not twice.
    fn a_refused_call_answered_by_a_later_run_is_replayed_from_that_answer(db) {
        let mut q = db.open();
        q.submit(&retried_task()).unwrap();
        let paid = |seq: u32, hash: &str, text: &str| {
            let mut paid = paid(seq, hash);
            if let Ok(reply) = &mut paid.outcome {
                reply.content = text.into();
            }
            paid
        };
        let first = q.claim("a", 1).unwrap()[0].lease;
        let mut refused = paid(2, "h2", "");
        (refused.sent, refused.charged) = (false, Usage::default());
        refused.outcome = Err(colony::models::ModelError::RateLimited("this host's rate limit".into()));
        for recorded in [paid(1, "h1", "one"), refused, paid(3, "h3", "three")] {
            q.record_model_call(first, 1, &recorded).unwrap();
        }
        let second = interrupt(&mut q);
        let mut replayed = paid(1, "h1", "one");
        (replayed.replayed, replayed.charged) = (true, Usage::default());
        q.record_model_call(second, 2, &replayed).unwrap();
        q.record_model_call(second, 2, &paid(2, "h2", "two")).unwrap();
        let third = interrupt(&mut q);
        let replay = q.model_context(third).unwrap().replay;
        let answers: Vec<(u32, String)> = replay
            .iter()
            .map(|c| (c.seq, c.outcome.as_ref().map(|r| r.content.clone()).unwrap_or_default()))
            .collect();
        assert_eq!(answers, [(1, "one".into()), (2, "two".into()), (3, "three".into())]);
    }

    /// A call that failed in the run to replay is not filled in with the
    /// answer an earlier run got to the same question: that run ended in
    /// the agent's own failure, after which calls are asked afresh (the
    /// answer the agent had turned down came back).
    fn an_answer_from_before_the_agents_own_failure_is_not_replayed(db) {
        let mut q = db.open();
        q.submit(&retried_task()).unwrap();
        let first = q.claim("a", 1).unwrap()[0].lease;
        q.record_model_call(first, 1, &paid(1, "h1")).unwrap();
        let own_failure = colony::task::TaskError {
            kind: colony::task::ErrorKind::Retryable,
            message: "the agent did not like the answer".into(),
        };
        q.finish(first, colony::task::RunOutcome::Failure(own_failure), "").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        q.promote_due().unwrap();
        let second = q.claim("a", 1).unwrap()[0].lease;
        assert!(q.model_context(second).unwrap().replay.is_empty(), "asked afresh");
        let mut failed = paid(1, "h1");
        failed.outcome = Err(colony::models::ModelError::Unavailable("HTTP 503".into()));
        failed.charged = Usage::default();
        q.record_model_call(second, 2, &failed).unwrap();
        // The second run is interrupted: the third replays it, its failed
        // call asked again rather than answered with the first run's reply.
        let third = interrupt(&mut q);
        let replay = q.model_context(third).unwrap().replay;
        assert_eq!(replay.len(), 1, "{replay:?}");
        assert!(replay[0].outcome.is_err(), "{:?}", replay[0].outcome);
    }

    /// A run cut off while it replayed an older run's calls leaves that
    /// journal in place: the next run replays all of it, not just the part
    /// the cut-off run got through (it paid for the rest again).
    fn a_run_cut_off_while_replaying_leaves_the_whole_journal_to_replay(db) {
        let mut q = db.open();
        q.submit(&retried_task()).unwrap();
        // The first run's second call failed at the provider.
        let first = q.claim("a", 1).unwrap()[0].lease;
        let mut failed = paid(2, "h2");
        failed.outcome = Err(colony::models::ModelError::Unavailable("HTTP 503".into()));
        for recorded in [paid(1, "h1"), failed, paid(3, "h3")] {
            q.record_model_call(first, 1, &recorded).unwrap();
        }
        // The second replays the first call, asks the failed one again (a
        // recorded error is not replayed) and is cut off before the third.
        let second = interrupt(&mut q);
        assert_eq!(q.model_context(second).unwrap().replay.len(), 3);
        let mut replayed = paid(1, "h1");
        (replayed.replayed, replayed.charged) = (true, Usage::default());
        q.record_model_call(second, 2, &replayed).unwrap();
        q.record_model_call(second, 2, &paid(2, "h2")).unwrap();
        // A call this host refused (no provider saw it) is no call of its own.
        let mut refused = paid(3, "h3");
        (refused.sent, refused.charged) = (false, Usage::default());
        refused.outcome = Err(colony::models::ModelError::NotGranted("not granted".into()));
        q.record_model_call(second, 2, &refused).unwrap();
        // The third replays the whole first journal, the failed call with
        // the answer the second got to the same question.
        let third = interrupt(&mut q);
        let replay = q.model_context(third).unwrap().replay;
        let seqs: Vec<(u32, bool)> = replay.iter().map(|c| (c.seq, c.outcome.is_ok())).collect();
        assert_eq!(seqs, [(1, true), (2, true), (3, true)]);
        // A run that went another way (a question of its own that reached
        // the provider) is the one the next run replays.
        q.record_model_call(third, 3, &replayed).unwrap();
        q.record_model_call(third, 3, &paid(2, "another question")).unwrap();
        let fourth = interrupt(&mut q);
        let replay = q.model_context(fourth).unwrap().replay;
        assert_eq!(replay.iter().map(|c| (c.seq, c.replayed)).collect::<Vec<_>>(), [(1, true), (2, false)]);
    }
    /// A call its run was stopped for while the provider had it (here a
    /// cancel) is journaled as made, charged nothing, its reservation kept
    /// against the budgets, though the run lost its lease: it was counted
    /// nowhere, and `show` said 0 calls sent while the provider had one.
    fn a_call_cut_off_by_a_cancel_is_journaled_and_stays_reserved(db) {
        let mut q = db.open();
        let id = q.submit(&retried_task()).unwrap().id;
        let run = q.claim("a", 1).unwrap()[0].lease;
        q.reserve_model_tokens(run, 1, 120, None).unwrap();
        q.cancel(id, "wrong brief").unwrap();
        let mut cut = paid(1, "h1");
        cut.charged = Usage::default();
        cut.outcome = Err(colony::models::ModelError::Unavailable("cut off".into()));
        assert_eq!(q.record_cut_off_call(run, 1, &cut).unwrap(), Applied::LeaseLost);
        let usage = q.usage(id).unwrap();
        assert_eq!(
            (usage.calls, usage.input_tokens + usage.output_tokens, usage.reserved_tokens),
            (1, 0, 120),
            "{usage:?}"
        );
        let said = q.events(Some(id), 0, 100).unwrap().into_iter().find(|e| e.event == "model_call").unwrap().detail;
        assert_eq!((&said["cut_off"], &said["lease_lost"], &said["tokens_reserved"]), (&json!(true), &json!(true), &json!(120)), "{said}");
    }

    /// A call a run was cut off in has no answer to replay: it does not
    /// make that run's journal the one to replay in place of a longer one
    /// kept (whether its record is in when the run ends is a race). Here
    /// the second run replayed the first call, asked a new question and
    /// was cut off in it: the third replays the first run's three calls,
    /// not the second's one.
    fn a_call_cut_off_does_not_replace_the_journal_kept(db) {
        let mut q = db.open();
        q.submit(&retried_task()).unwrap();
        let first = q.claim("a", 1).unwrap()[0].lease;
        for (seq, hash) in [(1, "h1"), (2, "h2"), (3, "h3")] {
            q.record_model_call(first, 1, &paid(seq, hash)).unwrap();
        }
        let second = interrupt(&mut q);
        let mut replayed = paid(1, "h1");
        (replayed.replayed, replayed.charged) = (true, Usage::default());
        q.record_model_call(second, 2, &replayed).unwrap();
        q.reserve_model_tokens(second, 2, 50, None).unwrap();
        let mut cut = paid(2, "another question");
        cut.charged = Usage::default();
        cut.outcome = Err(colony::models::ModelError::Unavailable("cut off".into()));
        q.record_cut_off_call(second, 2, &cut).unwrap();
        let third = interrupt(&mut q);
        let replay = q.model_context(third).unwrap().replay;
        let hashes: Vec<&str> = replay.iter().map(|c| c.request_hash.as_str()).collect();
        assert_eq!(hashes, ["h1", "h2", "h3"]);
        // Its lease's reset does not count it again as cut off: it has
        // its own event.
        let reset = q.events(None, 0, 1000).unwrap().into_iter().rfind(|e| e.event == "lease_expired").unwrap();
        assert_eq!(reset.detail.get("model_calls_cut_off"), None, "{}", reset.detail);
    }

    /// A run cancelled mid-way is interrupted, not answered: a retry
    /// replays its calls, the ones it replayed itself included. It kept
    /// the older journal (or none), and the retry paid again for what the
    /// cancelled run had been charged.
    fn a_cancelled_runs_calls_are_replayed_by_its_retry(db) {
        let mut q = db.open();
        let id = q.submit(&retried_task()).unwrap().id;
        let first = q.claim("a", 1).unwrap()[0].lease;
        q.record_model_call(first, 1, &paid(1, "h1")).unwrap();
        let second = interrupt(&mut q);
        let mut replayed = paid(1, "h1");
        (replayed.replayed, replayed.charged) = (true, Usage::default());
        q.record_model_call(second, 2, &replayed).unwrap();
        q.record_model_call(second, 2, &paid(2, "h2")).unwrap();
        q.cancel(id, "wrong brief").unwrap();
        q.retry(id).unwrap();
        let third = q.claim("a", 1).unwrap()[0].lease;
        let replay = q.model_context(third).unwrap().replay;
        let seqs: Vec<(u32, &str)> = replay.iter().map(|c| (c.seq, c.request_hash.as_str())).collect();
        assert_eq!(seqs, [(1, "h1"), (2, "h2")]);
    }
}

/// A budget given with a retry is checked with the chain's root row locked
/// (PostgreSQL), as a reservation locks it: a reservation committed while
/// the retry waits for the root counts, and the retry refuses a budget
/// below it. (On SQLite the write lock serialises the two anyway.)
#[test]
fn a_retrys_budget_counts_a_reservation_committed_while_it_waits() {
    let Some(db) = TestDb::postgres() else { return };
    let mut q = db.open();
    let a = children_running(&mut q, 100, &["a"])[0];
    let exceeded = colony::task::TaskError {
        kind: colony::task::ErrorKind::BudgetExceeded,
        message: "no tokens left".into(),
    };
    q.finish(a, colony::task::RunOutcome::Failure(exceeded), "")
        .unwrap();
    // Another run of the chain reserving: the root locked, the
    // reservation written, not committed yet.
    let common::Raw::Postgres(mut other) = db.raw() else {
        unreachable!()
    };
    let mut reserving = other.transaction().unwrap();
    let root: i64 = reserving
        .query_one("SELECT root_id FROM tasks WHERE id = $1", &[&a.task_id])
        .unwrap()
        .get(0);
    reserving
        .execute("SELECT id FROM tasks WHERE id = $1 FOR UPDATE", &[&root])
        .unwrap();
    reserving
        .execute(
            "INSERT INTO model_reservations (task_id, root_id, token, seq, tokens)
             VALUES ($1, $2, 0, 1, 2000)",
            &[&a.task_id, &root],
        )
        .unwrap();
    let retry = std::thread::spawn(move || q.retry_with_token_budget(a.task_id, Some(1500)));
    // The retry reaches the root and waits for it (if this sleep ends
    // first, it reads the committed reservation anyway).
    std::thread::sleep(Duration::from_millis(300));
    reserving.commit().unwrap();
    let err = retry.join().unwrap().unwrap_err().to_string();
    assert!(
        err.contains("2000 more reserved") && err.contains("more than 2000"),
        "{err}"
    );
}
