//! The daemon's writer alone: the hot path's transactions
//! (`Queue::finish_and_claim`: store the last batch's completions, claim
//! the next batch) on a fresh SQLite file, with no component and no other
//! thread, so that a change to the queue's SQL can be judged apart from
//! scheduling noise. Run natively it prints µs per task; run under
//! `valgrind --tool=cachegrind --cache-sim=no` it gives an instruction
//! count that does not depend on the machine's load (run it once with
//! `--submit-only` to subtract what enqueueing costs).
//!
//!     cargo run --release --example writer_bench -- 20000 18
//!
//! Arguments: tasks (20000), tasks per transaction (18, what the daemon's
//! drain averages at concurrency 8), then optionally `--submit-only`, and
//! `--state` (each run also sets one new agent state key, as in
//! `bench --capabilities`) or `--state-one-key` (every run sets the same
//! key).

use std::time::Instant;

use colony::queue::{ClaimedTask, FinishedRun, Queue};
use colony::state::{Scope, Write};
use colony::task::NewTask;

mod common;
use common::completion;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tasks: usize = args.first().map_or(Ok(20_000), |a| a.parse())?;
    let per_transaction: usize = args.get(1).map_or(Ok(18), |a| a.parse())?;
    let submit_only = args.iter().any(|a| a == "--submit-only");
    let with_state = match () {
        _ if args.iter().any(|a| a == "--state") => Some(false),
        _ if args.iter().any(|a| a == "--state-one-key") => Some(true),
        _ => None,
    };

    let dir = std::env::temp_dir().join(format!("colony-writer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut queue = Queue::open(dir.join("queue.db"))?;
    let new: Vec<NewTask> = (0..tasks).map(|_| NewTask::new("ops", "{}")).collect();
    queue.submit_batch(&new)?;
    if submit_only {
        return Ok(std::fs::remove_dir_all(&dir)?);
    }

    let started = Instant::now();
    let mut claimed: Vec<ClaimedTask> = Vec::new();
    let mut completed = 0;
    loop {
        let runs: Vec<FinishedRun> = claimed
            .drain(..)
            .map(|task| completion(&task, writes(&task, with_state)))
            .collect();
        completed += runs.len();
        let done = queue.finish_and_claim(&runs, &[("ops".into(), per_transaction)])?;
        claimed = done.claimed.into_iter().flatten().collect();
        if claimed.is_empty() && runs.is_empty() {
            break;
        }
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "completed={completed} seconds={took:.3} per_task_us={:.2}",
        took * 1e6 / completed as f64
    );
    Ok(std::fs::remove_dir_all(&dir)?)
}

/// The writes of a no-op run of `task`: none, or it set a key, one of its
/// own or (`Some(true)`) the same key as every run.
fn writes(task: &ClaimedTask, with_state: Option<bool>) -> Vec<Write> {
    let id = task.lease.task_id;
    match with_state {
        None => vec![],
        Some(one_key) => vec![Write {
            scope: Scope::Agent,
            key: if one_key {
                "k".into()
            } else {
                format!("k{id}")
            },
            value: Some(id.to_string()),
            if_version: None,
        }],
    }
}
