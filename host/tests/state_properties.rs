//! Random interleavings of completions (with state writes, `set-if`
//! included, several runs per batch as the daemon hands them over),
//! failures, lease resets, approvals and rejections against a real queue:
//! after every step the stored state equals the writes of the completed
//! (or approved) tasks applied in commit order, and nothing else —
//! exactly-once effects under at-least-once execution.
//!
//! On both drivers: `state_equals_the_writes_of_completed_tasks_in_commit_order::sqlite`
//! (128 cases) and `::postgres` (48, on one database emptied between cases).

mod common;
use common::{TestDb, check_property};

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use colony::queue::{Applied, ClaimFacts, FinishedRun, Lease, Queue};
use colony::state::{Scope, Write};
use colony::task::{ErrorKind, NewTask, RunOutcome, State, TaskError};
use proptest::prelude::*;

const KEYS: [&str; 3] = ["a", "b", "c"];

/// One run of a batch: which lease (see `run`), whether it succeeds, and
/// its writes as (key index, value seed, `set-if`: `Some(0)` the version
/// the key will have if the batch's earlier runs complete, `Some(v)` the
/// version `v - 1`).
type RunScript = (usize, bool, Vec<(usize, u8, Option<u64>)>);

#[derive(Clone, Debug)]
enum Op {
    Submit {
        review: bool,
    },
    Claim {
        n: usize,
    },
    /// Runs handed to the queue in one batch, as the daemon does.
    Finish {
        runs: Vec<RunScript>,
    },
    ResetAll,
    Approve {
        task: usize,
    },
    Reject {
        task: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let write = (
        0..3usize,
        any::<u8>(),
        proptest::option::weighted(0.4, 0..3u64),
    );
    prop_oneof![
        3 => prop::bool::weighted(0.2).prop_map(|review| Op::Submit { review }),
        3 => (1..5usize).prop_map(|n| Op::Claim { n }),
        4 => prop::collection::vec(
                (0..5usize, prop::bool::weighted(0.8), prop::collection::vec(write, 0..4)),
                1..5,
            )
            .prop_map(|runs| Op::Finish { runs }),
        1 => Just(Op::ResetAll),
        1 => (0..8usize).prop_map(|task| Op::Approve { task }),
        1 => (0..8usize).prop_map(|task| Op::Reject { task }),
    ]
}

/// What state should hold: key → (JSON value, version).
type Model = BTreeMap<String, (String, u64)>;

/// Applies writes to the model the way a commit must: all or nothing.
fn commit(model: &mut Model, writes: &[Write]) -> bool {
    let mut next = model.clone();
    for w in writes {
        let current = next.get(&w.key).map_or(0, |e| e.1);
        if w.if_version.is_some_and(|v| v != current) {
            return false;
        }
        match &w.value {
            Some(v) => {
                next.insert(w.key.clone(), (v.clone(), current + 1));
            }
            None => {
                next.remove(&w.key);
            }
        }
    }
    *model = next;
    true
}

fn stored(q: &Queue) -> Model {
    q.state_scan(Scope::Agent, "alpha", "", 1000)
        .unwrap()
        .into_iter()
        .map(|e| (e.key, (e.value, e.version)))
        .collect()
}

fn run(db: &TestDb, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut q = db.open();
    let mut model = Model::new();
    let mut tasks: Vec<i64> = Vec::new();
    // Tasks submitted with review: their runs never take the plain path.
    let mut reviewed: std::collections::HashSet<i64> = Default::default();
    // Each lease with what its claim said; every other run hands the facts
    // back, as the daemon does, the rest leave the queue to read them.
    let mut leases: Vec<(Lease, Option<ClaimFacts>)> = Vec::new();
    // Leases already handed back: finishing one again must change nothing.
    let mut used: Vec<(Lease, Option<ClaimFacts>)> = Vec::new();
    // What each lease's first store answered: storing its run again (as
    // the daemon does after a commit whose answer was lost) answers the
    // same and changes nothing. A lease reset before its run was stored
    // answers LeaseLost.
    let mut first_applied: HashMap<Lease, Applied> = HashMap::new();
    let mut held: HashMap<i64, Vec<Write>> = HashMap::new();
    for op in ops {
        match op {
            Op::Submit { review } => {
                let mut new = NewTask::new("alpha", "{}");
                new.review = review;
                new.max_attempts = 5;
                new.backoff_ms = 1;
                let id = q.submit(&new).unwrap().id;
                if review {
                    reviewed.insert(id);
                }
                tasks.push(id);
            }
            Op::Claim { n } => {
                std::thread::sleep(Duration::from_millis(2));
                q.promote_due().unwrap();
                for c in q.claim("alpha", n).unwrap() {
                    let facts = leases.len().is_multiple_of(2).then(|| ClaimFacts::of(&c));
                    leases.push((c.lease, facts));
                }
            }
            Op::Finish { runs } => {
                // Each run, whether it succeeds, and whether its lease is live.
                let mut batch: Vec<(FinishedRun, bool, bool)> = Vec::new();
                // The state if every earlier run of the batch completes.
                let mut predicted = model.clone();
                for (lease, ok, writes) in runs {
                    // Mostly a live lease; now and then one handed back.
                    let free: Vec<_> = leases
                        .iter()
                        .filter(|(l, _)| batch.iter().all(|(r, _, _)| r.lease != *l))
                        .collect();
                    let (pick, live) = match lease {
                        4 => (used.last(), false),
                        _ if free.is_empty() => (used.iter().rev().nth(lease), false),
                        _ => (Some(free[lease % free.len()]), true),
                    };
                    let Some((lease, claimed)) = pick.cloned() else {
                        continue;
                    };
                    if batch.iter().any(|(r, _, _)| r.lease == lease) {
                        continue;
                    }
                    let mut ahead = predicted.clone();
                    let writes: Vec<Write> = writes
                        .into_iter()
                        .map(|(k, v, set_if)| {
                            let current = ahead.get(KEYS[k]).map_or(0, |e| e.1);
                            let write = Write {
                                scope: Scope::Agent,
                                key: KEYS[k].to_string(),
                                value: (v % 5 != 0).then(|| v.to_string()),
                                if_version: set_if.map(|g| if g == 0 { current } else { g - 1 }),
                            };
                            commit(&mut ahead, std::slice::from_ref(&write));
                            write
                        })
                        .collect();
                    if ok {
                        commit(&mut predicted, &writes);
                    }
                    let outcome = if ok {
                        RunOutcome::Success {
                            output: "{}".into(),
                            spawn: vec![],
                            needs_review: false,
                        }
                    } else {
                        RunOutcome::Failure(TaskError {
                            kind: ErrorKind::Retryable,
                            message: "x".into(),
                        })
                    };
                    let run = FinishedRun {
                        lease,
                        outcome,
                        log: String::new(),
                        state: writes,
                        effects: vec![],
                        claimed,
                    };
                    batch.push((run, ok, live));
                }
                let runs: Vec<FinishedRun> = batch.iter().map(|(r, _, _)| r.clone()).collect();
                let applied = q.finish_batch(&runs).unwrap();
                for run in &runs {
                    if let Some(at) = leases.iter().position(|(l, _)| *l == run.lease) {
                        used.push(leases.remove(at));
                    }
                }
                // The queue completes the plain runs first, in order, each
                // against the state the earlier ones left; every other run
                // (a conflict, a review) after them, in order. On PostgreSQL
                // a run with state writes is never plain: those go in order.
                let mut after_plain = Vec::new();
                for (i, applied) in applied.iter().enumerate() {
                    let (run, ok, live) = &batch[i];
                    if !live {
                        let first = *first_applied.entry(run.lease).or_insert(Applied::LeaseLost);
                        prop_assert_eq!(
                            *applied,
                            first,
                            "a run stored again answers as its first store did"
                        );
                        continue;
                    }
                    first_applied.insert(run.lease, *applied);
                    let plain = !db.is_postgres() || run.state.is_empty();
                    // On SQLite a successful run of a live lease, whose task
                    // needs no review, completes in the batch exactly when
                    // its writes hold at its place in the batch.
                    let must_complete = !db.is_postgres()
                        && *ok
                        && *live
                        && !reviewed.contains(&run.lease.task_id)
                        && commit(&mut model.clone(), &run.state);
                    match applied {
                        Applied::Moved(State::Complete)
                            if plain && commit(&mut model, &run.state) => {}
                        _ if must_complete => prop_assert!(
                            false,
                            "run {i} could complete in the batch, and ended {applied:?}"
                        ),
                        _ => after_plain.push(i),
                    }
                }
                for i in after_plain {
                    let (run, ok, _) = &batch[i];
                    let writes = &run.state;
                    match applied[i] {
                        Applied::Moved(State::Complete) => prop_assert!(commit(&mut model, writes)),
                        Applied::Moved(State::Review) => {
                            // Conflicts are checked at completion even when held.
                            prop_assert!(commit(&mut model.clone(), writes));
                            held.insert(run.lease.task_id, writes.clone());
                        }
                        Applied::Moved(_) if *ok => {
                            let task = q.get(run.lease.task_id).unwrap();
                            let kind = task.error.unwrap().kind;
                            prop_assert!(!commit(&mut model.clone(), writes));
                            // A run whose own writes contradict each other
                            // fails for good: on no state could they hold.
                            match kind {
                                ErrorKind::Conflict => {}
                                ErrorKind::InvalidOutput => {
                                    prop_assert!(!commit(&mut Model::new(), writes))
                                }
                                other => prop_assert!(false, "failed {other:?}"),
                            }
                        }
                        _ => {}
                    }
                }
            }
            Op::ResetAll => {
                std::thread::sleep(Duration::from_millis(2));
                q.reset_stale_leases(Duration::ZERO).unwrap();
                used.append(&mut leases);
            }
            Op::Approve { task } => {
                let Some(&id) = tasks.get(task) else { continue };
                if let Ok(to) = q.approve(id, None) {
                    let writes = held.remove(&id).unwrap_or_default();
                    match to {
                        State::Complete => prop_assert!(commit(&mut model, &writes)),
                        _ => prop_assert!(
                            !commit(&mut model.clone(), &writes),
                            "sent back only on a conflict"
                        ),
                    }
                }
            }
            Op::Reject { task } => {
                let Some(&id) = tasks.get(task) else { continue };
                if q.reject(id, "again").is_ok() {
                    held.remove(&id);
                }
            }
        }
        prop_assert_eq!(stored(&q), model.clone());
    }
    Ok(())
}

mod state_equals_the_writes_of_completed_tasks_in_commit_order {
    use super::*;

    fn strategy() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(op(), 1..60)
    }

    #[test]
    fn sqlite() {
        let db = TestDb::sqlite();
        check_property(&db, 128, file!(), strategy(), |ops| run(&db, ops));
    }

    #[test]
    fn postgres() {
        let Some(db) = TestDb::postgres() else { return };
        check_property(&db, 48, file!(), strategy(), |ops| run(&db, ops));
    }
}
