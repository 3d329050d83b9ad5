//! What a run's `state.get` costs the run's thread on SQLite: reads of one
//! key each through a connection of their own (as the daemon's state
//! readers do), between the writer's transactions, which each store a
//! batch of completions with one state write per task and claim the next
//! batch (so the log moves between every batch of reads, as in a drain).
//! Prints µs per read; half of the reads find their key, half do not.
//!
//!     cargo run --release --example state_read_bench -- 20000 34
//!
//! Arguments: tasks (20000), tasks per transaction (34, what the daemon's
//! drain averages at concurrency 8).

use std::time::{Duration, Instant};

use colony::queue::{ClaimedTask, FinishedRun, Queue};
use colony::state::{Scope, Write};
use colony::task::NewTask;

mod common;
use common::completion;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tasks: usize = args.first().map_or(Ok(20_000), |a| a.parse())?;
    let per_transaction: usize = args.get(1).map_or(Ok(34), |a| a.parse())?;

    let dir = std::env::temp_dir().join(format!("colony-read-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut queue = Queue::open(dir.join("queue.db"))?;
    let reader = Queue::open(dir.join("queue.db"))?;
    let new: Vec<NewTask> = (0..tasks).map(|_| NewTask::new("ops", "{}")).collect();
    queue.submit_batch(&new)?;

    let (mut reading, mut reads, mut found) = (Duration::ZERO, 0, 0);
    let mut claimed: Vec<ClaimedTask> = Vec::new();
    loop {
        let started = Instant::now();
        for (i, task) in claimed.iter().enumerate() {
            // Every other read asks for a key an earlier batch wrote.
            let id = task.lease.task_id - (i % 2) as i64 * per_transaction as i64 * 2;
            found += reader
                .state_get(Scope::Agent, "ops", &format!("k{id}"))?
                .is_some() as usize;
            reads += 1;
        }
        reading += started.elapsed();
        let runs: Vec<FinishedRun> = claimed.drain(..).map(|task| with_own_key(&task)).collect();
        let done = queue.finish_and_claim(&runs, &[("ops".into(), per_transaction)])?;
        claimed = done.claimed.into_iter().flatten().collect();
        if claimed.is_empty() && runs.is_empty() {
            break;
        }
    }
    println!(
        "reads={reads} found={found} per_read_us={:.2}",
        reading.as_secs_f64() * 1e6 / reads as f64
    );
    Ok(std::fs::remove_dir_all(&dir)?)
}

/// A no-op run of `task` that set its own key.
fn with_own_key(task: &ClaimedTask) -> FinishedRun {
    let key = format!("k{}", task.lease.task_id);
    let write = Write {
        scope: Scope::Agent,
        key,
        value: Some("1".into()),
        if_version: None,
    };
    completion(task, vec![write])
}
