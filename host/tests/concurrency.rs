//! Many claimers on one database — threads in this process and separate
//! OS processes — and every task is claimed exactly once, on both drivers
//! (`name::sqlite`, `name::postgres`).

mod common;
use common::on_both_drivers;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use colony::queue::{ClaimFacts, FinishedRun, Queue, QueueOptions};
use colony::task::{NewTask, RunOutcome, State};

const WORKER_ENV: &str = "COLONY_TEST_CLAIM_WORKER_DB";

fn seed(path: &Path, agent: &str, n: usize) {
    let mut q = Queue::open(path).unwrap();
    let tasks: Vec<NewTask> = (0..n)
        .map(|i| NewTask::new(agent, format!(r#"{{"i":{i}}}"#)))
        .collect();
    q.submit_batch(&tasks).unwrap();
}

/// Claims and completes `agent` tasks until none are left; returns the ids claimed.
fn drain(path: &Path, actor: &str, agent: &str, batch: usize) -> Vec<i64> {
    let opts = QueueOptions {
        actor: actor.to_string(),
        ..Default::default()
    };
    let mut q = Queue::open_with(path, opts).unwrap();
    let mut claimed_ids = Vec::new();
    loop {
        let claimed = q.claim(agent, batch).unwrap();
        if claimed.is_empty() {
            return claimed_ids;
        }
        let runs: Vec<FinishedRun> = claimed
            .iter()
            .map(|c| FinishedRun {
                lease: c.lease,
                outcome: RunOutcome::Success {
                    output: c.payload.clone(),
                    spawn: vec![],
                    needs_review: false,
                },
                log: String::new(),
                state: Vec::new(),
                effects: Vec::new(),
                claimed: Some(ClaimFacts::of(c)),
            })
            .collect();
        q.finish_batch(&runs).unwrap();
        claimed_ids.extend(claimed.iter().map(|c| c.lease.task_id));
    }
}

fn assert_each_claimed_once(path: &Path, n: usize, claimed: &[i64]) {
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for id in claimed {
        *seen.entry(*id).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "claimed more than once: {twice:?}");
    assert_eq!(seen.len(), n, "every task claimed");

    let q = Queue::open(path).unwrap();
    let counts = q.counts().unwrap();
    assert_eq!(
        counts
            .iter()
            .filter(|c| c.1 == State::Complete)
            .map(|c| c.2)
            .sum::<u64>(),
        n as u64
    );
    let events = q.events(None, 0, u32::MAX).unwrap();
    let mut claims: HashMap<i64, usize> = HashMap::new();
    for e in events.iter().filter(|e| e.event == "claim") {
        *claims.entry(e.task_id).or_default() += 1;
    }
    assert_eq!(claims.len(), n);
    assert!(claims.values().all(|c| *c == 1), "one claim event per task");
}

on_both_drivers! {
    fn threads_claim_each_task_exactly_once(db) {
        let path = db.location();
        let n = 2000;
        seed(&path, "work", n);
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || drain(&path, &format!("thread-{t}"), "work", 1 + t * 5))
            })
            .collect();
        let claimed: Vec<i64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_each_claimed_once(&path, n, &claimed);
    }

    fn processes_claim_each_task_exactly_once(db) {
        let path = db.location();
        let n = 2000;
        seed(&path, "work", n);
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..3)
            .map(|_| {
                Command::new(&exe)
                    .args([
                        "--exact",
                        "claim_worker_process",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env(WORKER_ENV, &path)
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut claimed = Vec::new();
        let mut per_process = Vec::new();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success());
            let ids: Vec<i64> = String::from_utf8_lossy(&out.stdout)
                .lines()
                // libtest prints "test claim_worker_process ... " before the first line.
                .filter_map(|l| l.rsplit_once("CLAIMED ").map(|(_, id)| id))
                .map(|id| id.parse().unwrap())
                .collect();
            per_process.push(ids.len());
            claimed.extend(ids);
        }
        assert_each_claimed_once(&path, n, &claimed);
        assert_eq!(per_process.len(), 3);
    }
}

/// Not a test on its own: the body of each worker process spawned by
/// `processes_claim_each_task_exactly_once` (does nothing without its env
/// var, which holds the database: a file or a PostgreSQL URL).
#[test]
fn claim_worker_process() {
    let Some(path) = std::env::var_os(WORKER_ENV) else {
        return;
    };
    let actor = format!("process-{}", std::process::id());
    for id in drain(Path::new(&path), &actor, "work", 8) {
        println!("CLAIMED {id}");
    }
}
