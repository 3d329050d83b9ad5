//! `colony bench`: an end-to-end throughput run on a fresh database with a
//! real no-op component per task. Prints one JSON object per round. A
//! benchmark, not a test: it reports figures and asserts nothing.

use super::args::Whole;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::orchestrator::{Daemon, DaemonConfig, DaemonSummary};
use crate::queue::{Queue, QueueOptions};
use crate::runtime::{AgentDir, NoHooks, Runtime, RuntimeConfig};
use crate::task::NewTask;
use crate::task::{ClaimedTask, Lease, TaskError};

/// The no-op guest (tests/guests/noop), built and embedded by build.rs.
pub const NOOP_COMPONENT: &[u8] = include_bytes!(env!("COLONY_GUEST_NOOP"));

/// The most tasks a round enqueues (and rows `--history` seeds): far more
/// than a useful run, few enough that a round's rows fit in memory.
const MAX_TASKS: u64 = 10_000_000;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Tasks to enqueue and drain (1 to 10,000,000).
    #[arg(long, default_value_t = 20_000, value_parser = Whole::<usize>::new(1, MAX_TASKS as i64), allow_negative_numbers = true)]
    pub tasks: usize,
    /// Runs in flight at once (1 to 4096).
    #[arg(long, default_value_t = 8, value_parser = Whole::<u32>::new(1, super::MAX_CONCURRENCY), allow_negative_numbers = true)]
    pub concurrency: u32,
    /// Most tasks claimed per claim transaction (1 to 4096; default 64, as
    /// for the daemon).
    #[arg(long, value_parser = Whole::<usize>::new(1, super::MAX_CLAIM_BATCH as i64), allow_negative_numbers = true)]
    pub batch: Option<usize>,
    /// Also run a round with this many completed tasks already in the table,
    /// to show claiming does not slow down as history grows, and on SQLite a
    /// second fresh round after it: the history round's line says
    /// `history_ratio`, its rate over the mean of the fresh rounds around it
    /// (0 to 10,000,000; 0 runs one round).
    #[arg(long, default_value_t = 0, value_parser = Whole::<usize>::new(0, MAX_TASKS as i64), allow_negative_numbers = true)]
    pub history: usize,
    /// Where to put the database (default: a fresh temp directory, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also measure the capabilities: the drain with one state get + set per
    /// task against the same guest writing nothing (three alternating pairs
    /// of rounds; the median pair's ratio), and the host's cost per
    /// model call and per replayed call against a loopback provider.
    #[arg(long)]
    pub capabilities: bool,
    /// Instead of the drain: the per-run cost of this component (any
    /// language), one run at a time: load time (compiling, then from the
    /// compile cache) and instantiate + run + tear down, p50/p99.
    #[arg(long, value_name = "PATH.wasm")]
    pub agent: Option<PathBuf>,
    /// With --agent: the payload of every run.
    #[arg(long, default_value = "{}", requires = "agent")]
    pub payload: String,
    /// With --agent: runs measured (after 10% more to warm up).
    #[arg(long, default_value_t = 1000, value_parser = Whole::<u32>::new(1, 1_000_000), allow_negative_numbers = true, requires = "agent")]
    pub runs: u32,
}

/// `server`: a PostgreSQL database to measure instead of fresh SQLite files
/// (it must hold no tasks: a round drains everything runnable).
pub async fn bench(args: &BenchArgs, server: Option<&Path>) -> Result<()> {
    let temp = tempfile::tempdir()?;
    let root = args
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    super::builtin::refuse_a_file(&root, "--dir")?;
    if let Some(component) = &args.agent {
        return agent_cost(args, component, &root).await;
    }
    let agents = root.join("agents");
    std::fs::create_dir_all(&agents).with_context(|| format!("creating {}", agents.display()))?;
    std::fs::write(agents.join("noop.wasm"), NOOP_COMPONENT)?;
    std::fs::write(
        agents.join("noop.toml"),
        format!("concurrency = {}\n", args.concurrency),
    )?;

    let runtime = Arc::new(Runtime::new(RuntimeConfig {
        cache_dir: Some(root.join(".colony-cache")),
        max_concurrent_runs: args.concurrency * 2 + 8,
        pooling: true,
    })?);
    let overhead = host_overhead(&runtime, &agents).await?;
    let (cold_load, cached_load) = load_times(&root).await?;

    // With history on SQLite, a fresh round on each side of the history
    // round: this machine's speed drifts within minutes, and the history
    // round is judged against the mean of the two rounds around it.
    let mut rounds = vec![0];
    if args.history > 0 {
        rounds.push(args.history);
        if server.is_none() {
            rounds.push(0);
        }
    }
    let mut reports = Vec::with_capacity(rounds.len());
    for (i, &history) in rounds.iter().enumerate() {
        let db = match server {
            Some(url) => url.to_path_buf(),
            None => root.join(format!("bench-{i}-{history}.db")),
        };
        let mut report = round(args, &runtime, &agents, &db, history, &overhead).await?;
        report["load_4_agents_cold_ms"] = json!(cold_load.as_secs_f64() * 1e3);
        report["load_4_agents_cached_ms"] = json!(cached_load.as_secs_f64() * 1e3);
        if i == 0 && args.capabilities && server.is_none() {
            let state = super::bench_capabilities::state_rounds(args, &runtime, &root).await?;
            let models = super::bench_capabilities::model_figures(args, &root).await?;
            for (key, value) in state
                .as_object()
                .into_iter()
                .chain(models.as_object())
                .flatten()
            {
                report[key] = value.clone();
            }
        }
        if rounds.len() == 1 {
            print_line(&report)?; // no need to hold it back
        } else {
            reports.push(report);
        }
    }
    if let [before, history, after] = reports.as_mut_slice() {
        let rate = |r: &serde_json::Value| r["tasks_per_second"].as_f64().unwrap_or(0.0);
        let fresh = [rate(before), rate(after)];
        history["fresh_tasks_per_second_around"] = json!(fresh);
        history["history_ratio"] = json!(rate(history) / ((fresh[0] + fresh[1]) / 2.0));
    }
    for report in &reports {
        print_line(report)?;
    }
    Ok(())
}

/// One JSON object per line. Through `?`: a reader that went away
/// (`colony bench | head -1`) ends the run quietly instead of a panic.
fn print_line(report: &serde_json::Value) -> Result<()> {
    writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string(report)?
    )?;
    Ok(())
}

/// Time to load the four store agents: compiling them (cold), then with a
/// fresh runtime from the compile cache, as a restarted daemon does.
async fn load_times(root: &Path) -> Result<(Duration, Duration)> {
    let dir = root.join("store-agents");
    std::fs::create_dir_all(&dir)?;
    for (name, bytes, _) in super::builtin::STORE_AGENTS {
        std::fs::write(dir.join(format!("{name}.wasm")), bytes)?;
    }
    let cache = root.join(".colony-cache-load");
    let mut times = Vec::new();
    for _ in 0..2 {
        let config = RuntimeConfig {
            cache_dir: Some(cache.clone()),
            max_concurrent_runs: 8,
            pooling: true,
        };
        let started = Instant::now();
        let runtime = Runtime::new(config)?;
        let mut agents = AgentDir::new(&dir);
        let report = agents.rescan(&runtime).await;
        times.push(started.elapsed());
        anyhow::ensure!(
            report.loaded.len() == 4,
            "the store agents did not all load: {report:?}"
        );
    }
    Ok((times[0], times[1]))
}

/// Per-task host overhead: instantiate + call the no-op agent + tear down,
/// measured one run at a time.
async fn host_overhead(runtime: &Runtime, agents: &Path) -> Result<Vec<Duration>> {
    Ok(run_times(runtime, agents, "noop", "{}", 2000).await?.0)
}

/// `bench --agent`: what one component costs per run.
async fn agent_cost(args: &BenchArgs, component: &Path, root: &Path) -> Result<()> {
    use tracing::instrument::WithSubscriber as _;
    serde_json::from_str::<serde::de::IgnoredAny>(&args.payload).map_err(|e| {
        super::BadInput(format!(
            "--payload: not valid JSON ({e}); a task's payload is JSON"
        ))
    })?;
    let bytes = std::fs::read(component)
        .map_err(|e| super::BadInput(format!("--agent {}: {e}", component.display())))?;
    // The component is measured as a copy in a folder of its own, with its
    // manifest (PATH.toml) when it has one: its limits (timeout, memory,
    // fuel) apply as in a daemon.
    let agents = root.join("agent-under-test");
    std::fs::create_dir_all(&agents)?;
    let mut copies = vec![(agents.join("agent.wasm"), component.to_path_buf())];
    std::fs::write(&copies[0].0, &bytes)?;
    let manifest = component.with_extension("toml");
    if manifest.is_file() {
        std::fs::copy(&manifest, agents.join("agent.toml"))
            .map_err(|e| super::BadInput(format!("{}: {e}", manifest.display())))?;
        copies.push((agents.join("agent.toml"), manifest));
    }
    // Said of the copies, in a temporary folder: named as the user's files.
    let as_users = |why: String| {
        copies.iter().fold(why, |why, (copy, users)| {
            why.replace(&copy.display().to_string(), &users.display().to_string())
        })
    };
    let cache = root.join(".colony-cache-agent");
    let mut loads = Vec::new();
    let mut runtime = None;
    for _ in 0..2 {
        let started = Instant::now();
        let fresh = Runtime::new(RuntimeConfig {
            cache_dir: Some(cache.clone()),
            max_concurrent_runs: 8,
            pooling: true,
        })?;
        let mut dir = AgentDir::new(&agents);
        // Whether it loaded is said once, below, naming the user's files.
        dir.rescan(&fresh)
            .with_subscriber(tracing::subscriber::NoSubscriber::default())
            .await;
        loads.push(started.elapsed());
        if let Some(why) = dir.entries().find_map(|e| match &e.status {
            crate::runtime::AgentStatus::Broken(why) => Some(why.clone()),
            _ => None,
        }) {
            bail!(super::BadInput(as_users(format!(
                "the component did not load: {why}"
            ))));
        }
        runtime = Some(fresh);
    }
    let runtime = runtime.expect("loaded twice");
    let (samples, outcomes, first_failure) = run_times(
        &runtime,
        &agents,
        "agent",
        &args.payload,
        args.runs as usize,
    )
    .await?;
    if let Some(failure) = first_failure {
        let failed: u64 = outcomes
            .iter()
            .filter(|(kind, _)| kind.as_str() != "ok")
            .filter_map(|(_, n)| n.as_u64())
            .sum();
        say!(
            "note: {failed} of {} runs failed, as a daemon would record them; the first: {}: {}",
            samples.len(),
            failure.kind,
            as_users(failure.message)
        );
    }
    let us = |p: f64| percentile(&samples, p).map(|d| d.as_secs_f64() * 1e6);
    let report = json!({
        "agent": component.display().to_string(),
        "bytes": bytes.len(),
        "load_cold_ms": loads[0].as_secs_f64() * 1e3,
        "load_cached_ms": loads[1].as_secs_f64() * 1e3,
        "runs": samples.len(),
        "run_us_p50": us(0.50),
        "run_us_p99": us(0.99),
        "outcomes": outcomes,
    });
    print_line(&report)
}

/// How many runs ended each way: "ok", or the kind of failure a daemon
/// would record (the queue's checks of a successful run's output and
/// spawned tasks included).
type Outcomes = serde_json::Map<String, serde_json::Value>;

/// Runs `agent` `runs` times one at a time (after `runs / 10` to warm caches
/// and the instance pool); returns the sorted times of the measured runs,
/// how many ended each way and the first measured run's failure.
async fn run_times(
    runtime: &Runtime,
    agents: &Path,
    name: &str,
    payload: &str,
    runs: usize,
) -> Result<(Vec<Duration>, Outcomes, Option<TaskError>)> {
    let mut dir = AgentDir::new(agents);
    dir.rescan(runtime).await;
    let agent = match dir.loaded(name) {
        Some(agent) => agent,
        None => {
            let why = dir
                .entries()
                .find_map(|e| match &e.status {
                    crate::runtime::AgentStatus::Broken(why) => Some(why.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| "not found".into());
            anyhow::bail!(super::BadInput(format!(
                "the component did not load: {why}"
            )));
        }
    };
    let warm_up = runs / 10;
    let mut samples = Vec::with_capacity(runs);
    let mut outcomes = serde_json::Map::new();
    let mut first_failure = None;
    let hooks: Arc<NoHooks> = Arc::new(NoHooks);
    for i in 0..(warm_up + runs) as i64 {
        let task = ClaimedTask {
            lease: Lease {
                task_id: i,
                token: 1,
            },
            agent: name.into(),
            chain: i,
            payload: payload.into(),
            attempt: 1,
            max_attempts: 3,
            parent_result: None,
            feedback: None,
            timeout_ms: None,
        };
        let report = runtime.run(&agent, &task, hooks.clone()).await;
        if i >= warm_up as i64 {
            samples.push(report.elapsed); // the first runs warm caches and the pool
            let outcome = match crate::queue::outcome_failure(&report.outcome) {
                Some(failure) => {
                    let kind = failure.kind.to_string();
                    first_failure.get_or_insert(failure);
                    kind
                }
                None => "ok".into(),
            };
            let n = outcomes.entry(outcome).or_insert(json!(0));
            *n = json!(n.as_u64().unwrap_or(0) + 1);
        }
    }
    samples.sort();
    Ok((samples, outcomes, first_failure))
}

pub(super) fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i])
}

async fn round(
    args: &BenchArgs,
    runtime: &Arc<Runtime>,
    agents: &Path,
    db: &Path,
    history: usize,
    overhead: &[Duration],
) -> Result<serde_json::Value> {
    let sync = super::sqlite_sync();
    let opts = QueueOptions {
        sync,
        actor: super::identity("bench"),
        ..Default::default()
    };
    let mut queue = Queue::open_with(db, opts.clone())?;
    if queue.is_postgres() && history == 0 {
        let held: u64 = queue.counts()?.iter().map(|(_, _, n)| n).sum();
        if held > 0 {
            bail!(super::BadInput(format!(
                "--db {}: bench needs an empty database (it holds {held} tasks, and a round drains everything runnable)",
                queue.location()
            )));
        }
    }
    if history > 0 {
        crate::queue::bench::seed_completed_history(&mut queue, history)?;
    }

    let tasks: Vec<NewTask> = (0..args.tasks)
        .map(|i| NewTask::new("noop", format!(r#"{{"i":{i}}}"#)))
        .collect();
    let started = Instant::now();
    queue.submit_batch(&tasks)?;
    let enqueue = started.elapsed();
    let newest = crate::queue::all_readable(queue.list(&crate::queue::ListFilter {
        limit: Some(1),
        ..Default::default()
    })?)?;
    let newest = newest
        .first()
        .context("the tasks just submitted are not in the queue")?;
    let first_id = newest.id - args.tasks as i64 + 1;

    let drained = drain(args, runtime, agents, Queue::open_with(db, opts)?).await?;
    let (drain, summary) = (drained.took, &drained.summary);

    let mut latencies = crate::queue::bench::claim_to_finish_ms(&queue, first_id)?;
    latencies.sort();
    let db_bytes: u64 = ["", "-wal"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", db.display())).ok())
        .map(|m| m.len())
        .sum();
    let db_bytes_per_task = match queue.is_postgres() {
        true => None,
        false => Some(db_bytes as f64 / (args.tasks + history) as f64),
    };
    Ok(json!({
        "tasks": args.tasks,
        "completed": summary.completed,
        "concurrency": args.concurrency,
        "batch": claim_batch(args),
        "sync": format!("{sync:?}").to_lowercase(),
        "history_rows": history,
        "enqueue_seconds": enqueue.as_secs_f64(),
        "enqueue_per_second": (args.tasks as f64 / enqueue.as_secs_f64()).round(),
        "drain_seconds": drain.as_secs_f64(),
        "tasks_per_second": (args.tasks as f64 / drain.as_secs_f64()).round(),
        "claim_to_complete_ms_p50": percentile(&latencies, 0.50),
        "claim_to_complete_ms_p99": percentile(&latencies, 0.99),
        "host_overhead_us_p50": percentile(overhead, 0.50).map(|d| d.as_secs_f64() * 1e6),
        "host_overhead_us_p99": percentile(overhead, 0.99).map(|d| d.as_secs_f64() * 1e6),
        "pooling_allocator": runtime.is_pooling(),
        "peak_rss_bytes": peak_rss_bytes(),
        "db_bytes_per_task": db_bytes_per_task,
        "per_task_us": split_per_task(&drained, args.tasks),
        "database": if queue.is_postgres() { "postgres" } else { "sqlite" },
    }))
}

/// Where a drain's time went, in µs per task: the hot path's transactions
/// (stores and claims, on the writer's thread), the daemon loop's busy time
/// (dispatching, bookkeeping, channel hops) and its waits, and the runs
/// themselves, on the runtime's worker threads. The three threads share
/// the machine's cores, so the parts add up to more than the drain. And
/// the CPU time the whole process used: steadier than the rates on a
/// machine whose speed drifts, it is the figure to compare builds by.
pub(super) fn split_per_task(drained: &Drained, tasks: usize) -> serde_json::Value {
    let (time, drain) = (&drained.summary.time, drained.took);
    let per_task = |d: Duration| (d.as_secs_f64() * 1e6 / tasks as f64 * 10.0).round() / 10.0;
    json!({
        "process_cpu": drained.cpu.map(per_task),
        "writer_sql": per_task(time.writing),
        "loop_busy": per_task(drain.saturating_sub(time.waiting)),
        "loop_waiting": per_task(time.waiting),
        "runs_on_workers": per_task(time.running),
        "in_flight": per_task(time.in_flight),
        "slot_idle": per_task(time.idle_slots),
        "slot_idle_no_claimed_task": per_task(time.idle_slots_starved),
        "tasks_per_transaction": (tasks as f64 / time.transactions.max(1) as f64 * 10.0).round() / 10.0,
    })
}

/// Tasks per claim transaction: the flag, or the daemon's default.
fn claim_batch(args: &BenchArgs) -> usize {
    args.batch
        .unwrap_or(crate::orchestrator::DEFAULT_CLAIM_BATCH)
}

/// What a drain took.
pub(super) struct Drained {
    pub took: Duration,
    /// The CPU time of the whole process meanwhile (Linux only).
    pub cpu: Option<Duration>,
    pub summary: DaemonSummary,
}

/// Runs a daemon over `queue` until nothing runnable remains; returns how
/// long that took.
pub(super) async fn drain(
    args: &BenchArgs,
    runtime: &Arc<Runtime>,
    agents: &Path,
    queue: Queue,
) -> Result<Drained> {
    let mut dir = AgentDir::new(agents);
    dir.rescan(runtime).await;
    let cfg = DaemonConfig {
        concurrency: args.concurrency,
        claim_batch: claim_batch(args),
        // As the daemon: --batch claims ahead for every agent.
        prefetch: match args.batch {
            Some(_) => crate::orchestrator::Prefetch::Always,
            None => crate::orchestrator::Prefetch::Adaptive,
        },
        until_idle: true,
        poll: Duration::from_secs(60),
        ..DaemonConfig::default()
    };
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let daemon = Daemon::new(queue, runtime.clone(), dir, cfg);
    let (started, cpu_before) = (Instant::now(), process_cpu());
    let summary = daemon.run(stop_rx).await?;
    let took = started.elapsed();
    let cpu = match (cpu_before, process_cpu()) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    Ok(Drained { took, cpu, summary })
}

/// The CPU time (user + system) this process has used, all its threads,
/// those gone included: `/proc/self/stat`'s `utime` and `stime`, in the
/// kernel's fixed 100 ticks a second.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses: count from its end.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // Fields 14 and 15 of the line; the state, field 3, is fields[0] here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The process's peak resident set size (Linux `VmHWM`).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::process_cpu;
    use std::time::{Duration, Instant};

    /// The figure bench compares builds by must follow the CPU this
    /// process burns: spinning adds to it (within seconds, however loaded
    /// the machine), and it never goes back.
    #[test]
    fn process_cpu_grows_with_the_work_done() {
        let before = process_cpu().expect("/proc/self/stat is readable");
        let started = Instant::now();
        let mut spins = 0_u64;
        loop {
            spins = std::hint::black_box(spins.wrapping_add(1));
            let now = process_cpu().expect("/proc/self/stat is readable");
            assert!(now >= before, "CPU time went back: {before:?} -> {now:?}");
            if now >= before + Duration::from_millis(50) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "30 s of spinning ({spins} rounds) added less than 50 ms of CPU: {before:?} -> {now:?}"
            );
        }
    }
}
