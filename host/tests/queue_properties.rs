//! Random operation sequences against a real queue, checking the
//! invariants after every step: no task under two live leases, attempts never
//! above max_attempts, terminal states left only through retry, and every
//! state change recorded by an event chain that ends in the current state.
//!
//! On both drivers: `invariants_hold_after_every_operation::sqlite` (48
//! cases) and `::postgres` (16, on one database emptied between cases).

mod common;
use common::{Raw, TestDb, check_property};

use std::collections::HashMap;
use std::time::Duration;

use colony::queue::{Applied, Lease, QueueError};
use colony::task::{ErrorKind, NewTask, RunOutcome, State, TaskError};
use proptest::prelude::*;

const AGENTS: [&str; 2] = ["alpha", "beta"];

#[derive(Clone, Debug)]
enum Op {
    Submit {
        agent: usize,
        review: bool,
        max_attempts: u32,
        depend: Option<usize>,
    },
    Claim {
        agent: usize,
        n: usize,
    },
    Finish {
        lease: usize,
        how: u8,
    },
    Heartbeat,
    ResetAll,
    Release {
        lease: usize,
    },
    Approve {
        task: usize,
    },
    Reject {
        task: usize,
    },
    Retry {
        task: usize,
    },
    Cancel {
        task: usize,
    },
    Promote,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, any::<bool>(), 1..4u32, proptest::option::of(0..8usize))
            .prop_map(|(agent, review, max_attempts, depend)| Op::Submit { agent, review, max_attempts, depend }),
        3 => (0..2usize, 1..4usize).prop_map(|(agent, n)| Op::Claim { agent, n }),
        4 => (0..8usize, 0..5u8).prop_map(|(lease, how)| Op::Finish { lease, how }),
        1 => Just(Op::Heartbeat),
        1 => Just(Op::ResetAll),
        1 => (0..8usize).prop_map(|lease| Op::Release { lease }),
        1 => (0..8usize).prop_map(|task| Op::Approve { task }),
        1 => (0..8usize).prop_map(|task| Op::Reject { task }),
        1 => (0..8usize).prop_map(|task| Op::Retry { task }),
        1 => (0..8usize).prop_map(|task| Op::Cancel { task }),
        1 => Just(Op::Promote),
    ]
}

fn outcome(how: u8) -> RunOutcome {
    let fail = |kind: ErrorKind| {
        RunOutcome::Failure(TaskError {
            kind,
            message: "x".into(),
        })
    };
    match how {
        0 => RunOutcome::Success {
            output: "{}".into(),
            spawn: vec![],
            needs_review: false,
        },
        1 => RunOutcome::Success {
            output: "{}".into(),
            spawn: vec![],
            needs_review: true,
        },
        2 => fail(ErrorKind::Retryable),
        3 => fail(ErrorKind::Crash),
        _ => fail(ErrorKind::Permanent),
    }
}

/// Errors an operation may legitimately return for a random target.
fn allowed(result: Result<impl Sized, QueueError>) {
    match result {
        Ok(_)
        | Err(QueueError::Illegal { .. })
        | Err(QueueError::DependencyFinished { .. })
        | Err(QueueError::NotFound(_))
        | Err(QueueError::Invalid { .. }) => {}
        Err(e) => panic!("unexpected error: {e}"),
    }
}

struct Model {
    ids: Vec<i64>,
    /// Every lease ever handed out, live or not: stale ones exercise fencing.
    leases: Vec<Lease>,
    states: HashMap<i64, State>,
}

fn check_invariants(db: &mut Raw, model: &mut Model, retried: Option<i64>) {
    let rows: Vec<(i64, String, u32, u32, Option<i64>)> = db
        .query("SELECT id, state, attempts, max_attempts, claim_token FROM tasks ORDER BY id")
        .iter()
        .map(|r| {
            (
                r[0].int().unwrap(),
                r[1].text().unwrap().to_string(),
                r[2].int().unwrap() as u32,
                r[3].int().unwrap() as u32,
                r[4].int(),
            )
        })
        .collect();
    let mut chains: HashMap<i64, Vec<(Option<String>, String)>> = HashMap::new();
    for r in db.query("SELECT task_id, from_state, to_state FROM events ORDER BY id") {
        chains.entry(r[0].int().unwrap()).or_default().push((
            r[1].text().map(str::to_string),
            r[2].text().unwrap().to_string(),
        ));
    }
    for (id, state, attempts, max_attempts, token) in rows {
        let state: State = state.parse().unwrap();
        assert!(
            attempts <= max_attempts,
            "task {id}: attempts {attempts} > max {max_attempts}"
        );
        assert_eq!(
            state == State::InProgress,
            token.is_some(),
            "task {id}: a claim token exactly while in progress"
        );
        let live = model
            .leases
            .iter()
            .filter(|l| l.task_id == id && Some(l.token) == token)
            .count();
        assert!(live <= 1, "task {id} has {live} live leases");
        if let Some(before) = model.states.get(&id)
            && before.is_terminal()
            && *before != state
        {
            assert_eq!(
                retried,
                Some(id),
                "task {id} left terminal {before} for {state} without a retry"
            );
        }
        // The event chain: each event starts where the last one ended, and the
        // last ends in the current state.
        let mut at: Option<String> = None;
        for (from, to) in chains.remove(&id).unwrap_or_default() {
            assert_eq!(from, at, "task {id}: event chain broken");
            at = Some(to);
        }
        assert_eq!(
            at.as_deref(),
            Some(state.as_str()),
            "task {id}: last event does not match state"
        );
        model.states.insert(id, state);
    }
}

fn pick<T: Copy>(items: &[T], i: usize) -> Option<T> {
    (!items.is_empty()).then(|| items[i % items.len()])
}

fn run(db: &TestDb, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut q = db.open();
    let mut raw = db.raw();
    let mut model = Model {
        ids: vec![],
        leases: vec![],
        states: HashMap::new(),
    };
    for op in ops {
        let mut retried = None;
        match op {
            Op::Submit {
                agent,
                review,
                max_attempts,
                depend,
            } => {
                let mut new = NewTask::new(AGENTS[agent], "{}");
                new.review = review;
                new.max_attempts = max_attempts;
                new.backoff_ms = 0;
                new.depends_on = depend
                    .and_then(|i| pick(&model.ids, i))
                    .into_iter()
                    .collect();
                match q.submit(&new) {
                    Ok(s) => model.ids.push(s.id),
                    Err(e) => allowed(Err::<(), _>(e)),
                }
            }
            Op::Claim { agent, n } => {
                let claimed = q.claim(AGENTS[agent], n).unwrap();
                model.leases.extend(claimed.iter().map(|c| c.lease));
            }
            Op::Finish { lease, how } => {
                if let Some(lease) = pick(&model.leases, lease) {
                    let before = model.states.get(&lease.task_id).copied();
                    let applied = q.finish(lease, outcome(how), "").unwrap();
                    if applied == Applied::LeaseLost {
                        let now = q.get(lease.task_id).unwrap().state;
                        prop_assert!(before != Some(State::InProgress) || now == State::InProgress);
                    }
                }
            }
            Op::Heartbeat => {
                q.heartbeat(&model.leases).unwrap();
            }
            Op::ResetAll => {
                std::thread::sleep(Duration::from_millis(2));
                q.reset_stale_leases(Duration::ZERO).unwrap();
            }
            Op::Release { lease } => {
                if let Some(lease) = pick(&model.leases, lease) {
                    q.release(lease).unwrap();
                }
            }
            Op::Approve { task } => {
                if let Some(id) = pick(&model.ids, task) {
                    allowed(q.approve(id, None));
                }
            }
            Op::Reject { task } => {
                if let Some(id) = pick(&model.ids, task) {
                    allowed(q.reject(id, "again"));
                }
            }
            Op::Retry { task } => {
                if let Some(id) = pick(&model.ids, task) {
                    retried = Some(id);
                    allowed(q.retry(id));
                }
            }
            Op::Cancel { task } => {
                if let Some(id) = pick(&model.ids, task) {
                    allowed(q.cancel(id, "test"));
                }
            }
            Op::Promote => {
                q.promote_due().unwrap();
            }
        }
        check_invariants(&mut raw, &mut model, retried);
    }
    Ok(())
}

mod invariants_hold_after_every_operation {
    use super::*;

    fn strategy() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(op(), 1..40)
    }

    #[test]
    fn sqlite() {
        let db = TestDb::sqlite();
        check_property(&db, 48, file!(), strategy(), |ops| run(&db, ops));
    }

    #[test]
    fn postgres() {
        let Some(db) = TestDb::postgres() else { return };
        check_property(&db, 16, file!(), strategy(), |ops| run(&db, ops));
    }
}
