//! `colony torture`: several daemon processes on one database, one of them
//! SIGKILLed and restarted (or, every third time, frozen with SIGSTOP past its
//! lease and then resumed) every ~500 ms for the whole run, then a verdict
//! from the database and the audit trail: nothing lost, nothing completed
//! twice, no overlapping leases, attempts matching claims, every reset lease
//! naming its expired holder. Exits non-zero when any check fails.

use super::args::Whole;
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{Value, json};

use crate::queue::{AuditEvent, ListFilter, Queue};
use crate::task::{NewTask, State};

/// The sleeping guest (tests/guests/sleeper), built and embedded by build.rs.
const SLEEPER_COMPONENT: &[u8] = include_bytes!(env!("COLONY_GUEST_SLEEPER"));
/// The state-using guest (tests/guests/stateful), for `--state`.
const STATEFUL_COMPONENT: &[u8] = include_bytes!(env!("COLONY_GUEST_STATEFUL"));
/// The agent-scoped keys the tasks increment in `--state` mode, task i the
/// key `counter-{i % COUNTERS}`. One key for all made every completion race
/// every other: on PostgreSQL with three daemons, tasks lost twenty races
/// in a row, and their backoff (doubling to ten minutes) outlasted the run.
const COUNTERS: usize = 8;

fn counter_key(i: usize) -> String {
    format!("counter-{}", i % COUNTERS)
}

/// Bounds of the settings: enough for any useful run, and nothing that
/// hangs (no daemon, or kills too frequent for a daemon to start and take
/// work) or overflows the clock arithmetic.
const MAX_DAEMONS: u64 = 64;
const MAX_TASKS: u64 = 10_000_000;
const MIN_KILL_EVERY: Duration = Duration::from_millis(100);
const MAX_KILL_EVERY: Duration = Duration::from_secs(3600);
const MIN_DEADLINE: Duration = Duration::from_secs(1);
const MAX_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Args, Debug)]
pub struct TortureArgs {
    /// Daemon processes sharing the database (1 to 64).
    #[arg(long, default_value_t = 4, value_parser = Whole::<usize>::new(1, MAX_DAEMONS as i64), allow_negative_numbers = true)]
    pub daemons: usize,
    /// Tasks to run; each sleeps a random 0–20 ms (1 to 10,000,000).
    #[arg(long, default_value_t = 5000, value_parser = Whole::<usize>::new(1, MAX_TASKS as i64), allow_negative_numbers = true)]
    pub tasks: usize,
    /// Kill (SIGKILL) and restart a random daemon about this often (100ms to 1h).
    #[arg(long, default_value = "500ms", value_parser = parse_kill_every, allow_hyphen_values = true)]
    pub kill_every: Duration,
    /// Give up (and fail) if the tasks are not all finished by then (1s to 7 days).
    #[arg(long, default_value = "10m", value_parser = parse_deadline, allow_hyphen_values = true)]
    pub deadline: Duration,
    /// Where to keep the database and daemon logs (default: a temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Exactly-once state under fire: every task increments one of 8 shared
    /// counters with set-if, and the verdict checks that each counter equals
    /// the number of completed tasks that increment it (conflicts are
    /// retried and counted).
    #[arg(long, conflicts_with = "effects")]
    pub state: bool,
    /// Exactly-once effects under fire: every task queues one effect to a
    /// loopback server; the verdict checks that the server got the
    /// idempotency key of every completed task (at least once) and of no
    /// other task, and counts the repeats.
    #[arg(long)]
    pub effects: bool,
}

fn parse_kill_every(s: &str) -> Result<Duration, String> {
    duration_between(s, MIN_KILL_EVERY, MAX_KILL_EVERY)
}

fn parse_deadline(s: &str) -> Result<Duration, String> {
    duration_between(s, MIN_DEADLINE, MAX_DEADLINE)
}

fn duration_between(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let value = super::parse_duration(s)?;
    if value < min || value > max {
        return Err(format!(
            "{s} is out of range: use {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(value)
}

/// `server`: an empty PostgreSQL database to torture instead of a fresh
/// SQLite file.
pub async fn torture(args: &TortureArgs, server: Option<&Path>) -> Result<bool> {
    let temp = tempfile::tempdir()?;
    let root = args
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let agents = root.join("agents");
    std::fs::create_dir_all(&agents)?;
    let stateful = args.state || args.effects;
    let agent = if stateful { "stateful" } else { "sleeper" };
    let component = if stateful {
        STATEFUL_COMPONENT
    } else {
        SLEEPER_COMPONENT
    };
    let receiver = match args.effects {
        true => Some(super::loopback::serve(r#"{"ok":true}"#).await?),
        false => None,
    };
    std::fs::write(agents.join(format!("{agent}.wasm")), component)?;
    if let Some((addr, _)) = &receiver {
        // Effects use the outbound-HTTP allow-list: grant the receiver.
        std::fs::write(
            agents.join(format!("{agent}.toml")),
            format!("allowed_hosts = [\"http://{addr}\"]\n"),
        )?;
    }
    let db = match server {
        Some(url) => url.to_path_buf(),
        None => root.join("torture.db"),
    };
    if server.is_none() {
        // A previous run's write-ahead log must not be replayed into the new database.
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
    }

    let mut queue = super::open_queue(&db, &super::identity("torture"))?;
    if !queue.counts()?.is_empty() {
        anyhow::bail!(super::BadInput(format!(
            "--db {}: torture needs an empty database (its verdict counts every task)",
            queue.location()
        )));
    }
    let tasks: Vec<NewTask> = (0..args.tasks)
        .map(|i| {
            let mut task = if args.state {
                // Conflicts cost attempts too: every task must be able to
                // lose many races and still finish.
                let key = counter_key(i);
                let mut task = NewTask::new(agent, format!(r#"{{"increment":"{key}"}}"#));
                task.max_attempts = 1000;
                task.backoff_ms = 5;
                task
            } else if let Some((addr, _)) = &receiver {
                let effect = json!(["effect", "POST", format!("http://{addr}/listing"), "{}"]);
                NewTask::new(agent, json!({ "ops": [effect] }).to_string())
            } else {
                NewTask::new(agent, format!(r#"{{"ms":{}}}"#, fastrand::u32(0..=20)))
            };
            // Kills cost attempts; give enough that every task can finish.
            task.max_attempts = task.max_attempts.max(20);
            task.backoff_ms = task.backoff_ms.min(50);
            task
        })
        .collect();
    queue.submit_batch(&tasks)?;

    let exe = std::env::current_exe().context("finding the colony binary")?;
    let spawn = |i: usize, generation: usize| -> Result<Child> {
        let log = std::fs::File::create(root.join(format!("daemon-{i}-{generation}.log")))?;
        // Paths as they are: a --dir that is not UTF-8 works too.
        Ok(Command::new(&exe)
            .arg("--db")
            .arg(&db)
            .arg("--agents")
            .arg(&agents)
            .arg("daemon")
            .args([
                "--heartbeat",
                "200ms",
                "--stale-after",
                "1s",
                "--poll",
                "100ms",
                "--concurrency",
                "8",
                // A killed sender's effects go to another daemon quickly.
                "--effect-timeout",
                "1s",
            ])
            .env("COLONY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?)
    };
    let mut daemons: Vec<Child> = (0..args.daemons)
        .map(|i| spawn(i, 0))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let (mut kills, mut pauses) = (0usize, 0usize);
    let mut next_kill = Instant::now() + jittered(args.kill_every);
    // A paused daemon (SIGSTOP) wakes after its leases were reset and tries
    // to report its runs late: that is what the fencing must refuse.
    let mut paused: Option<(usize, Instant)> = None;
    let finished = loop {
        if unfinished(&queue)? == 0 && queue.effects_outstanding(&[agent.to_string()])? == 0 {
            break true;
        }
        if started.elapsed() > args.deadline {
            break false;
        }
        if let Some((i, resume_at)) = paused
            && Instant::now() >= resume_at
        {
            send_signal(&daemons[i], "-CONT");
            paused = None;
        }
        if Instant::now() >= next_kill && !daemons.is_empty() {
            let i = fastrand::usize(..daemons.len());
            if paused.is_none() && (kills + pauses) % 3 == 2 {
                send_signal(&daemons[i], "-STOP");
                paused = Some((i, Instant::now() + Duration::from_millis(1500)));
                pauses += 1;
            } else if paused.is_none_or(|(p, _)| p != i) {
                daemons[i].kill()?; // SIGKILL
                daemons[i].wait()?;
                kills += 1;
                daemons[i] = spawn(i, kills)?;
            }
            next_kill = Instant::now() + jittered(args.kill_every);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if let Some((i, _)) = paused {
        send_signal(&daemons[i], "-CONT");
    }
    let elapsed = started.elapsed();
    for daemon in &mut daemons {
        let _ = Command::new("kill")
            .args(["-TERM", &daemon.id().to_string()])
            .status();
    }
    for daemon in &mut daemons {
        let _ = daemon.wait();
    }

    let mut verdict = verify(&queue, args.tasks)?;
    if args.state {
        verify_counter(&queue, &mut verdict)?;
    }
    if let Some((_, keys)) = &receiver {
        let keys = keys.lock().unwrap().clone();
        verify_effects(&queue, &keys, &mut verdict)?;
    }
    let ok = finished && verdict["ok"] == true;
    verdict["ok"] = json!(ok);
    verdict["finished_before_deadline"] = json!(finished);
    verdict["daemons"] = json!(args.daemons);
    verdict["kills"] = json!(kills);
    verdict["pauses"] = json!(pauses);
    verdict["seconds"] = json!(elapsed.as_secs_f64());
    verdict["dir"] = json!(root);
    // Keep the evidence of a failed run, even if the verdict finds no reader.
    let kept = (args.dir.is_none() && !ok).then(|| temp.keep());
    // Through `?`: a reader that went away (`colony torture | head -1`) ends
    // the run quietly instead of a panic.
    writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string_pretty(&verdict)?
    )?;
    if let Some(kept) = kept {
        say!(
            "the database and daemon logs are kept in {}",
            kept.display()
        );
    }
    Ok(ok)
}

fn send_signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
}

fn jittered(every: Duration) -> Duration {
    every.mul_f64(0.5 + fastrand::f64())
}

fn unfinished(queue: &Queue) -> Result<u64> {
    Ok(queue
        .counts()?
        .iter()
        .filter(|c| !c.1.is_terminal())
        .map(|c| c.2)
        .sum())
}

/// The checks, from the database and the audit trail alone.
/// `--state`: each counter must equal the completed tasks that increment
/// it (its version too: one write per increment) — every committed
/// increment applied once, none from a failed, killed or refused run.
fn verify_counter(queue: &Queue, verdict: &mut Value) -> Result<()> {
    let tasks = crate::queue::all_readable(queue.list(&ListFilter::default())?)?;
    let mut completed_by_key: HashMap<String, u64> = HashMap::new();
    for task in tasks.iter().filter(|t| t.state == State::Complete) {
        let key = task.payload["increment"].as_str().unwrap_or_default();
        *completed_by_key.entry(key.to_string()).or_default() += 1;
    }
    let completed: u64 = completed_by_key.values().sum();
    let (mut equal, mut total) = (true, 0);
    for i in 0..COUNTERS {
        let key = counter_key(i);
        let counter = queue
            .state_get(crate::state::Scope::Agent, "stateful", &key)?
            .map(|e| (e.value.parse::<u64>().ok(), e.version));
        let expected = completed_by_key.get(&key).copied().unwrap_or(0);
        total += counter.and_then(|c| c.0).unwrap_or(0);
        equal &=
            counter == Some((Some(expected), expected)) || (expected == 0 && counter.is_none());
    }
    let conflicts = queue
        .events(None, 0, u32::MAX)?
        .iter()
        .filter(|e| e.event == "retry_later" && e.detail["kind"] == "conflict")
        .count();
    verdict["checks"]["counter_equals_completed"] = json!(equal);
    verdict["counter"] = json!(total);
    verdict["completed"] = json!(completed);
    verdict["conflicts_retried"] = json!(conflicts);
    if !equal {
        verdict["ok"] = json!(false);
    }
    Ok(())
}

/// `--effects`: every completed task's key arrived, no other task's did.
fn verify_effects(queue: &Queue, keys: &HashMap<String, u32>, verdict: &mut Value) -> Result<()> {
    let tasks = crate::queue::all_readable(queue.list(&ListFilter::default())?)?;
    let expected: std::collections::HashSet<String> = tasks
        .iter()
        .filter(|t| t.state == State::Complete)
        .map(|t| crate::effects::Effect::idempotency_key(t.id, 1))
        .collect();
    let missing = expected.iter().filter(|k| !keys.contains_key(*k)).count();
    let unexpected = keys.keys().filter(|k| !expected.contains(*k)).count();
    let repeats: u32 = keys.values().map(|n| n - 1).sum();
    let unsent = queue
        .effects(None, None, u32::MAX)?
        .iter()
        .filter(|e| e.state != "sent")
        .count();
    verdict["checks"]["every_completed_tasks_effect_arrived"] = json!(missing == 0);
    verdict["checks"]["no_effect_of_another_task_arrived"] = json!(unexpected == 0);
    verdict["checks"]["every_effect_sent"] = json!(unsent == 0);
    verdict["effects"] = json!({
        "distinct_keys": keys.len(),
        "completed_tasks": expected.len(),
        "missing": missing,
        "unexpected": unexpected,
        "repeats": repeats,
        "not_sent": unsent,
    });
    if missing + unexpected + unsent > 0 {
        verdict["ok"] = json!(false);
    }
    Ok(())
}

fn verify(queue: &Queue, expected: usize) -> Result<Value> {
    let tasks = crate::queue::all_readable(queue.list(&ListFilter::default())?)?;
    let events = queue.events(None, 0, u32::MAX)?;
    let mut by_task: HashMap<i64, Vec<&AuditEvent>> = HashMap::new();
    for e in &events {
        by_task.entry(e.task_id).or_default().push(e);
    }

    let not_complete: Vec<i64> = tasks
        .iter()
        .filter(|t| t.state != State::Complete)
        .map(|t| t.id)
        .collect();
    let mut completed_twice = Vec::new();
    let mut overlapping_leases = Vec::new();
    let mut attempts_mismatch = Vec::new();
    let mut over_max_attempts = Vec::new();
    let mut unnamed_resets = Vec::new();
    let mut resets = 0;
    for task in &tasks {
        let trail = by_task.get(&task.id).map(Vec::as_slice).unwrap_or(&[]);
        if trail.iter().filter(|e| e.event == "complete").count() > 1 {
            completed_twice.push(task.id);
        }
        // Each claim's lease must end (by an event out of in_progress; one
        // that stays in progress, a late result refused, leaves it as it is)
        // before the next claim: no two live leases at once.
        let mut holder: Option<&str> = None;
        let (mut claims, mut releases) = (0u32, 0u32);
        for e in trail {
            if e.event == "claim" {
                if holder.is_some() {
                    overlapping_leases.push(task.id);
                }
                holder = Some(e.actor.as_str());
                claims += 1;
            } else if e.from == Some(State::InProgress) && e.to != State::InProgress {
                if e.event == "lease_expired" {
                    resets += 1;
                    if e.detail["holder"].as_str() != holder {
                        unnamed_resets.push(e.id);
                    }
                }
                if e.event == "release" {
                    releases += 1;
                }
                holder = None;
            }
        }
        if claims.checked_sub(releases) != Some(task.attempts) {
            attempts_mismatch.push(task.id);
        }
        if task.attempts > task.max_attempts {
            over_max_attempts.push(task.id);
        }
    }
    let checks = json!({
        "all_tasks_present": tasks.len() == expected,
        "every_task_complete": not_complete.is_empty(),
        "none_completed_twice": completed_twice.is_empty(),
        "no_overlapping_leases": overlapping_leases.is_empty(),
        "attempts_equal_claims": attempts_mismatch.is_empty(),
        "attempts_within_max": over_max_attempts.is_empty(),
        "every_reset_names_its_holder": unnamed_resets.is_empty(),
    });
    let ok = checks.as_object().unwrap().values().all(|v| v == true);
    let sample = |ids: &[i64]| ids.iter().take(10).copied().collect::<Vec<_>>();
    Ok(json!({
        "ok": ok,
        "tasks": tasks.len(),
        "checks": checks,
        "claims": events.iter().filter(|e| e.event == "claim").count(),
        "lease_resets": resets,
        "failures": {
            "not_complete": sample(&not_complete),
            "completed_twice": sample(&completed_twice),
            "overlapping_leases": sample(&overlapping_leases),
            "attempts_mismatch": sample(&attempts_mismatch),
            "over_max_attempts": sample(&over_max_attempts),
            "unnamed_resets": sample(&unnamed_resets),
        },
    }))
}
