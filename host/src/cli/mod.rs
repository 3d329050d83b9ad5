//! The `colony` command line: argument parsing and printing only. Every
//! command opens the queue (and, where it needs agents, the runtime) and
//! calls their public API.

/// `eprintln!` that cannot panic. With stderr gone (a pipe whose reader
/// quit: `colony daemon 2>&1 | head`), `eprintln!` panics; a lost message
/// is better than a lost command, let alone a daemon holding leases.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod bench;
mod bench_capabilities;
mod builtin;
mod demo;
mod effects;
mod loopback;
mod new;
pub(crate) mod output;
mod rfc3339;
mod serve;
mod state;
mod torture;
pub(crate) mod usage;

use std::io::{BufRead, Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::models::{ModelsConfig, Providers};
use crate::orchestrator::{Daemon, DaemonConfig};
use crate::queue::{ListFilter, Queue, QueueError, QueueOptions};
use crate::runtime::{AgentDir, Runtime, RuntimeConfig, not_a_component};
use crate::task::{NewTask, NextSpec, State};

/// Bad input from the user: exit status 2, nothing was stored.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

fn bad(message: impl Into<String>) -> anyhow::Error {
    BadInput(message.into()).into()
}

/// Exit status for an error: 2 when the input was at fault, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    let bad_input = err.chain().any(|cause| {
        cause.downcast_ref::<BadInput>().is_some()
            || cause
                .downcast_ref::<QueueError>()
                .is_some_and(QueueError::is_bad_input)
    });
    if bad_input { 2 } else { 1 }
}

/// An error as `--json` prints it on stderr: a script reads what went
/// wrong without parsing prose. `kind` is `not_found`, `conflict` (the
/// task is not in a state that allows it), `bad_input`, `unavailable`
/// (busy or unreachable: worth trying again), `commit_unknown` (the change
/// may have been stored: look before repeating it) or `error`.
pub fn error_json(err: &anyhow::Error) -> serde_json::Value {
    let queue_error = err.chain().find_map(|c| c.downcast_ref::<QueueError>());
    let kind = match queue_error {
        Some(QueueError::NotFound(_) | QueueError::Missing(_)) => "not_found",
        Some(
            QueueError::Illegal { .. }
            | QueueError::NotNow(_)
            | QueueError::DependencyFinished { .. },
        ) => "conflict",
        Some(QueueError::CommitUnknown { .. }) => "commit_unknown",
        Some(e) if e.is_bad_input() => "bad_input",
        Some(e) if e.is_transient() => "unavailable",
        _ if exit_code(err) == 2 => "bad_input",
        _ => "error",
    };
    serde_json::json!({
        "error": format!("{err:#}"),
        "kind": kind,
        "exit_code": exit_code(err),
    })
}

/// Parses the command line, exiting 2 on bad arguments as clap does; for
/// arguments that are not UTF-8 it also says which (clap does not).
pub fn parse_args() -> Cli {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    Cli::try_parse_from(&args).unwrap_or_else(|err| {
        if err.kind() != clap::error::ErrorKind::InvalidUtf8 {
            err.exit()
        }
        let _ = err.print();
        for line in non_utf8_args(&args) {
            say!("note: {line}");
        }
        std::process::exit(2)
    })
}

/// One line for each argument that is not UTF-8, naming its flag.
fn non_utf8_args(args: &[std::ffi::OsString]) -> Vec<String> {
    let mut lines = Vec::new();
    for (i, arg) in args.iter().enumerate().skip(1) {
        if arg.to_str().is_some() {
            continue;
        }
        let lossy = arg.to_string_lossy();
        let flag = match lossy.split_once('=') {
            Some((flag, _)) if flag.starts_with("--") => Some(flag.to_string()),
            _ => args[i - 1]
                .to_str()
                .filter(|prev| prev.starts_with('-'))
                .map(String::from),
        };
        lines.push(match flag {
            Some(flag) => format!("the value of {flag} is not valid UTF-8: {arg:?}"),
            None => format!("argument {i} is not valid UTF-8: {arg:?}"),
        });
    }
    lines
}

/// Whether the error is only that the reader of stdout went away (`colony
/// list | head -1`), after which conventional tools exit 0 without a word.
pub fn is_closed_stdout(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        let kind = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => Some(io.kind()),
            None => cause
                .downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind),
        };
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}

#[derive(Parser, Debug)]
#[command(
    name = "colony",
    version,
    about = "A durable work queue that runs AI agents as sandboxed WebAssembly components",
    long_about = "Colony keeps a durable task queue in a SQLite file and runs each task in a fresh \
                  WebAssembly sandbox of the agent it names (agents/<name>.wasm). Submit tasks with \
                  `colony submit`, run them with `colony daemon`, and inspect everything with \
                  `colony list`, `show`, `status` and `events`.\n\n\
                  Exit status: 0 on success, 2 on bad input (nothing was stored), 1 on any other error."
)]
pub struct Cli {
    /// Where the queue lives: a SQLite file (`sqlite:PATH` also works;
    /// created by submit, daemon, serve and state set if missing, while
    /// commands that read a queue refuse a missing file) or a PostgreSQL URL
    /// (`postgres://user@host:5432/colony`, migrated on first use) shared by
    /// daemons on several machines.
    // COLONY_DB's value stays out of --help: a URL may hold a password.
    #[arg(
        long,
        global = true,
        env = "COLONY_DB",
        hide_env_values = true,
        default_value = "colony.db"
    )]
    pub db: PathBuf,
    /// The directory of agent components (`<name>.wasm`, optional `<name>.toml`).
    #[arg(long, global = true, env = "COLONY_AGENTS", default_value = "agents")]
    pub agents: PathBuf,
    /// The operator's configuration: model providers (`[models.<alias>]`).
    /// Default: colony.toml, where a missing file means no models; a file
    /// named here (or in COLONY_CONFIG) must exist.
    #[arg(long, global = true, env = "COLONY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// How hard a SQLite database works to keep each commit: normal (WAL
    /// with synchronous=NORMAL: a power cut may lose the last commits, never
    /// corrupt the file) or full (each commit is on disk before it returns,
    /// an fsync each). PostgreSQL keeps its server's synchronous_commit.
    #[arg(
        long,
        global = true,
        env = "COLONY_SYNC",
        value_enum,
        default_value = "normal"
    )]
    pub sync: SyncArg,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum SyncArg {
    Normal,
    Full,
}

impl From<SyncArg> for crate::queue::Sync {
    fn from(sync: SyncArg) -> Self {
        match sync {
            SyncArg::Normal => crate::queue::Sync::Normal,
            SyncArg::Full => crate::queue::Sync::Full,
        }
    }
}

/// The `--sync` of this process, for every queue it opens ([`open_queue`]
/// is called from every command, most of which know nothing else of it).
static SQLITE_SYNC: std::sync::OnceLock<crate::queue::Sync> = std::sync::OnceLock::new();

/// What `--sync` asked for (normal where nothing set it: a library caller).
fn sqlite_sync() -> crate::queue::Sync {
    SQLITE_SYNC
        .get()
        .copied()
        .unwrap_or(crate::queue::Sync::Normal)
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Add a task (or a batch of tasks) to the queue; prints the new id(s).
    Submit(Box<SubmitArgs>),
    /// List tasks, newest first.
    List {
        /// Only tasks in this state (pending, ready, in_progress, review, complete, failed, cancelled).
        #[arg(long)]
        state: Option<State>,
        /// Only tasks for this agent.
        #[arg(long)]
        agent: Option<String>,
        /// At most this many tasks (a full page says so on stderr).
        #[arg(long, default_value_t = 50, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Show one task: its fields, audit events, run logs and result.
    Show {
        /// The task's id (as `submit` printed it).
        #[arg(value_parser = task_id(), allow_negative_numbers = true)]
        id: i64,
    },
    /// Counts by state and agent, the oldest ready task, leases held, agents.
    Status,
    /// The audit trail as JSON Lines: id, at, task_id, event, from, to, actor, detail.
    Events {
        /// Only events of this task; 0: operators' writes to agents' state
        /// (`colony state set/delete --agent`), which belong to no task.
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..), allow_negative_numbers = true)]
        task: Option<i64>,
        /// Only events after this event id.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..), allow_negative_numbers = true)]
        since: i64,
        /// Keep printing new events as they happen (Ctrl-C to stop). On
        /// PostgreSQL an event whose transaction has not committed yet is
        /// waited for (up to 10 s), never skipped.
        #[arg(long)]
        follow: bool,
    },
    /// Approve or reject a task waiting in review.
    Review {
        /// The id of the task in review.
        #[arg(value_parser = task_id(), allow_negative_numbers = true)]
        id: i64,
        /// approve or reject
        verdict: Verdict,
        /// A note for the agent (passed as `feedback` to the next run on reject).
        #[arg(long)]
        note: Option<String>,
    },
    /// Revive a failed or cancelled task (attempts reset).
    Retry {
        /// The id of the failed or cancelled task.
        #[arg(value_parser = task_id(), allow_negative_numbers = true)]
        id: i64,
        /// Give the task's chain this many tokens in all (more than it has
        /// spent, which still counts): a task that failed on its budget
        /// would fail on it again. A manifest's token_budget still caps each
        /// of the agent's tasks.
        #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..=i64::MAX as u64))]
        token_budget: Option<u64>,
    },
    /// Cancel a task that has not finished, and every task depending on it.
    Cancel {
        /// The id of the task to cancel.
        #[arg(value_parser = task_id(), allow_negative_numbers = true)]
        id: i64,
        /// Why (recorded on the task and its dependents).
        #[arg(long, default_value = "cancelled by a user")]
        reason: String,
    },
    /// Every file in the agents directory: loaded, or why not, and its limits.
    Agents,
    /// The outbox: effects tasks queued, and whether they were sent
    /// (`colony effects retry ID` sends a failed one again).
    Effects(effects::EffectsArgs),
    /// See and fix agents' durable state: `colony state list --agent NAME`
    /// (or `--chain ROOT_ID`), then `get`, `set` or `delete` a key.
    #[command(subcommand)]
    State(state::StateCommand),
    /// Run the orchestrator: claim tasks and run them in their agents.
    Daemon(DaemonArgs),
    /// Serve the web dashboard, the JSON API (/api) and Prometheus metrics
    /// (/metrics) for the queue, on 127.0.0.1:7070 by default. It reads the
    /// same database as the daemons and runs no tasks. Reading needs no
    /// token on loopback; submitting, reviewing, retrying and cancelling
    /// need the token (--token, COLONY_TOKEN, or the one printed at start).
    Serve(serve::ServeArgs),
    /// Measure throughput and latency end to end with a real no-op component
    /// per task, on a fresh database; prints one JSON object per round.
    Bench(bench::BenchArgs),
    /// Run an online store's launch pipeline on the four built-in agents and
    /// show the queue at work (chains, review, retries); writes product pages.
    Demo(demo::DemoArgs),
    /// Several daemons on one database, one SIGKILLed and restarted every
    /// ~500 ms; then checks from the audit trail that nothing was lost or run
    /// twice. Prints a JSON verdict; exits 1 when a check fails. With
    /// `--db postgres://...` (an empty database) the daemons share PostgreSQL.
    Torture(torture::TortureArgs),
    /// Set up a folder to run Colony in: agents/ with the four store agents
    /// (design, code, marketing, ops) and their manifests, and a commented
    /// colony.toml (or the --agents directory and --config file, taken
    /// relative to the folder). Writes nothing over existing files.
    Init {
        /// The folder (created if missing).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Start an agent project in Rust, Python or JavaScript: a handler that
    /// reads its payload, logs, heartbeats, writes state and (guarded) calls
    /// a model, with its unit tests, the WIT and a README with the one
    /// build command.
    New(new::NewArgs),
    /// Write the WIT this binary speaks (colony:agent@0.2.0, the released
    /// 0.1.0, and the WASI packages they use) for building agents against.
    Wit {
        /// The directory to write into (files of the same name are replaced).
        #[arg(long, default_value = "wit")]
        out: PathBuf,
    },
    /// Copy a whole queue (tasks, dependencies, events, logs, state, the
    /// model journal, effects) into a new, empty database: for a team that
    /// outgrows one machine, `colony migrate --from colony.db --to
    /// postgres://user@host/colony`. Stop the daemons first; the copy is
    /// one transaction of the target, all or nothing.
    Migrate(MigrateArgs),
}

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The queue to copy: a SQLite file, `sqlite:PATH`, or a PostgreSQL URL.
    #[arg(long)]
    pub from: PathBuf,
    /// The empty database to copy into (refused when colony's tables in it
    /// hold anything).
    #[arg(long)]
    pub to: PathBuf,
    /// Copy even though daemons renewed leases on the source within their
    /// --stale-after: their runs' results would go to the source, and the
    /// copy would run those tasks again.
    #[arg(long)]
    pub force: bool,
}

impl Command {
    /// How much the command logs unless `COLONY_LOG` says otherwise: the
    /// daemon narrates every transition; commands that print their own
    /// report (and would drown it in per-task lines) only warn.
    pub fn default_log_level(&self) -> &'static str {
        match self {
            Command::Bench(_) | Command::Torture(_) | Command::Demo(_) => "warn",
            _ => "info",
        }
    }
}

/// Whether a valid `COLONY_LOG` filter leaves colony's own messages off: no
/// bare level (`info`) and no directive for a `colony` target. `bogus` is
/// a valid filter (everything from a target named bogus), and it silences
/// everything else, errors included.
pub fn log_filter_silences_colony(spec: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    !spec.split(',').map(str::trim).any(|directive| {
        let target = directive
            .split(['=', '['])
            .next()
            .unwrap_or_default()
            .trim();
        let bare_level = !directive.contains('=')
            && (LEVELS.contains(&target.to_ascii_lowercase().as_str())
                || target.parse::<u8>().is_ok());
        bare_level || target == "colony" || target.starts_with("colony::")
    })
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Approve,
    Reject,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The agent to run the task (the file stem of agents/<name>.wasm).
    #[arg(required_unless_present = "batch")]
    pub agent: Option<String>,
    /// The task's input as JSON (default `{}`), @FILE to read it from a
    /// file, or - to read it from stdin.
    #[arg(conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload JSON from this file (- for stdin).
    #[arg(long)]
    pub payload_file: Option<PathBuf>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Runs before the task fails for good: 1 to 1000.
    #[arg(long, default_value_t = crate::task::DEFAULT_MAX_ATTEMPTS, value_parser = clap::value_parser!(u32).range(1..=1000), allow_negative_numbers = true)]
    pub max_attempts: u32,
    /// Hold the result in `review` until approved.
    #[arg(long)]
    pub review: bool,
    /// Rejections with a note before a rejection fails the task: 0 to 100.
    /// Each revision runs the task again, with the note as its
    /// `feedback` and its attempts back.
    #[arg(long, default_value_t = crate::task::DEFAULT_MAX_REVISIONS, value_parser = clap::value_parser!(u32).range(0..=crate::task::MAX_REVISIONS as i64), allow_negative_numbers = true)]
    pub max_revisions: u32,
    /// An agent that reviews the result automatically (implies --review).
    #[arg(long)]
    pub reviewer: Option<String>,
    /// Tasks to create when this one completes: a JSON list of
    /// {agent, payload, priority?, review?, next?}, or @FILE to read it from a file.
    #[arg(long)]
    pub next: Option<String>,
    /// Wait for this task to complete first (repeatable).
    #[arg(long = "after", value_name = "ID", value_parser = task_id(), allow_negative_numbers = true)]
    pub after: Vec<i64>,
    /// Idempotency key: submitting the same key again returns the first task.
    #[arg(long)]
    pub key: Option<String>,
    /// Run no earlier than this long from now (e.g. 10s, 5m).
    #[arg(long = "in", value_name = "DURATION", conflicts_with = "at", value_parser = parse_delay, allow_hyphen_values = true)]
    pub in_: Option<Duration>,
    /// Run no earlier than this time (RFC 3339, e.g. 2026-11-27T18:00:00Z or
    /// 2026-11-27T18:00:00+01:00; UTC when the offset is left out).
    #[arg(long, value_parser = parse_time)]
    pub at: Option<i64>,
    /// Wall-clock budget per run, at most a year (default: the agent's, 5m
    /// unless its manifest says otherwise).
    #[arg(long, value_parser = parse_timeout, allow_hyphen_values = true)]
    pub timeout: Option<Duration>,
    /// Base of the exponential retry backoff, at most 10m (default 10s).
    #[arg(long, value_parser = parse_backoff, allow_hyphen_values = true)]
    pub backoff: Option<Duration>,
    /// Tokens this task and every task chained or spawned from it may spend
    /// on model calls together (default: no chain budget). An agent's
    /// manifest `token_budget` still caps each of its tasks: the tighter of
    /// the two applies.
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..=i64::MAX as u64), allow_negative_numbers = true)]
    pub token_budget: Option<u64>,
    /// Submit many tasks from a JSON Lines file (`-` for stdin), all or none.
    /// Each line: {"agent": .., "payload": .., and any of priority, max_attempts,
    /// review, max_revisions, reviewer, next, after, key, timeout, backoff, run_at, token_budget}.
    /// The per-task flags are refused beside it: each line says its own.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "agent", "payload", "payload_file", "priority", "max_attempts", "review", "max_revisions",
        "reviewer", "next", "after", "key", "in_", "at", "timeout", "backoff", "token_budget",
    ])]
    pub batch: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// How often to look for work when nothing wakes the daemon. The agents
    /// folder is looked at every 2 s, or this often if shorter.
    #[arg(long, default_value = "60s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub poll: Duration,
    /// Most runs in flight at once, across all agents (1 to 4096).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=MAX_CONCURRENCY), allow_negative_numbers = true)]
    pub concurrency: u32,
    /// How often to renew this daemon's leases (and reap stale ones).
    #[arg(long, default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub heartbeat: Duration,
    /// Reset a lease that has not been renewed for this long. This daemon's
    /// claims record it, and no daemon resets them sooner, whatever its own
    /// setting; another daemon's lease is reset only when stale by both.
    #[arg(long, default_value = "60s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub stale_after: Duration,
    /// On SIGINT/SIGTERM, how long to let runs finish before releasing them.
    #[arg(long, default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub grace: Duration,
    /// Most tasks taken per claim transaction; those beyond the free slots
    /// wait in the daemon, leased. Larger is faster under load. Default: 64,
    /// claimed ahead only for agents whose recent runs took under 50 ms
    /// (for the others, and agents not seen running yet, just the free
    /// slots, so that slow tasks stay in the queue for any daemon and a
    /// crash costs no attempt of a task that never started). Named here,
    /// the batch is claimed ahead for every agent.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_CLAIM_BATCH), allow_negative_numbers = true)]
    pub claim_batch: Option<usize>,
    /// Exit 0 once no runnable task remains for the loaded agents (and the
    /// effects of completed tasks are delivered or failed). Tasks scheduled
    /// for later (--in, --at, a retry's backoff) are waited for; the daemon
    /// says when the next is due.
    #[arg(long)]
    pub until_idle: bool,
    /// How long one delivery of an effect may take; a daemon that dies while
    /// sending leaves the effect to another daemon after twice this.
    #[arg(long, default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub effect_timeout: Duration,
    /// Also serve the web dashboard, JSON API and /metrics on this address
    /// (as `colony serve` does), for as long as the daemon runs.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<std::net::SocketAddr>,
    /// With --http: the token changes need (see `colony serve --help`);
    /// without --http it is not used.
    #[arg(long, env = "COLONY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Upper bounds of the daemon's counts: far above any useful setting, low
/// enough that the instance pool sized from them cannot overflow.
const MAX_CONCURRENCY: i64 = 4096;
const MAX_CLAIM_BATCH: u64 = 4096;
/// The longest `--timeout`: no run needs more, and a year of ms fits every
/// integer the queue stores it in.
const MAX_TIMEOUT: Duration = Duration::from_secs(31_557_600); // 365.25 days

/// A positive task id.
fn task_id() -> clap::builder::RangedI64ValueParser<i64> {
    clap::value_parser!(i64).range(1..)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 500ms, 10s, 5m)"))
}

/// A duration no longer than `max`, whose name is `what` in the message.
fn duration_at_most(s: &str, max: Duration, what: &str) -> Result<Duration, String> {
    let value = parse_duration(s)?;
    if value > max {
        // humantime writes a year as "1year".
        let shown = match humantime::format_duration(max).to_string().as_str() {
            "1year" => "a year".to_string(),
            other => other.to_string(),
        };
        return Err(format!("{s} is too long: {what} is at most {shown}"));
    }
    Ok(value)
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    duration_at_most(s, MAX_TIMEOUT, "a run's wall-clock budget")
}

fn parse_backoff(s: &str) -> Result<Duration, String> {
    duration_at_most(s, crate::retry::MAX_BACKOFF, "the wait between retries")
}

/// `--in`: a delay that lands no later than the latest time `--at` takes.
fn parse_delay(s: &str) -> Result<Duration, String> {
    let delay = parse_duration(s)?;
    let fits = i64::try_from(delay.as_millis())
        .ok()
        .and_then(|ms| crate::queue::now_ms().checked_add(ms))
        .is_some_and(|at| at <= rfc3339::MAX_MS);
    if !fits {
        return Err(format!(
            "{s} from now is after 9999-12-31T23:59:59.999Z, the latest time accepted (as by --at)"
        ));
    }
    Ok(delay)
}

/// An RFC 3339 time as ms since the Unix epoch.
fn parse_time(s: &str) -> Result<i64, String> {
    rfc3339::parse(s).map_err(|e| {
        format!("{e} (use RFC 3339, e.g. 2026-11-27T18:00:00Z or 2026-11-27T18:00:00+01:00)")
    })
}

/// When a task delayed by `delay` from now may run, in ms since the epoch.
fn run_at_after(delay: Duration) -> i64 {
    let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    crate::queue::now_ms()
        .saturating_add(ms)
        .min(rfc3339::MAX_MS)
}

/// This process's identity as a queue actor: host, pid and start time.
pub fn identity(role: &str) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    format!(
        "{role}@{host}:{}:{}",
        std::process::id(),
        crate::queue::now_ms()
    )
}

/// Opens the queue at `db` for a command that adds to it (`submit`, a
/// daemon, `state set`): a SQLite file is created if missing.
pub fn open_queue(db: &Path, actor: &str) -> Result<Queue> {
    open_queue_with(db, actor, false)
}

/// Opens the queue at `db` for a command that reads or changes what is
/// already in it (`list`, `show`, `status`, `events`, `review`, ...): a
/// SQLite file that does not exist is refused, naming it. Created, a
/// mistyped `--db` listed an empty queue and left a stray file behind.
pub fn open_existing_queue(db: &Path, actor: &str) -> Result<Queue> {
    open_queue_with(db, actor, true)
}

fn open_queue_with(db: &Path, actor: &str, must_exist: bool) -> Result<Queue> {
    let sqlite = match crate::queue::Location::of(db) {
        crate::queue::Location::Sqlite(path) => {
            check_sqlite_location(db, &path)?;
            if must_exist && !path.exists() {
                bail!(QueueError::Missing(format!(
                    "database {}: no such file, so no task was ever submitted there; check --db (or COLONY_DB), which defaults to colony.db in the current directory (`colony submit` and `colony daemon` create it)",
                    hide_userinfo(&db.to_string_lossy())
                )));
            }
            Some(path)
        }
        crate::queue::Location::Postgres(url) => {
            check_postgres_url(&url)?;
            None
        }
    };
    let opts = QueueOptions {
        actor: actor.to_string(),
        sync: sqlite_sync(),
        must_exist: must_exist && sqlite.is_some(),
        ..Default::default()
    };
    Queue::open_with(db, opts).map_err(|e| match sqlite.as_deref().and_then(why_unopenable) {
        Some(why) => BadInput(format!(
            "database {}: {why}; check its permissions (ls -l), or give another --db ({e})",
            hide_userinfo(&db.to_string_lossy())
        ))
        .into(),
        None => {
            anyhow::Error::new(e).context(format!("opening the queue database {}", redacted(db)))
        }
    })
}

/// Refuses, naming it, a database `db` (SQLite at `path`) that would not
/// keep the queue: an empty path or an in-memory database, a libpq
/// key=value string or a URL of a database colony does not speak, or a
/// file in a directory that does not exist.
fn check_sqlite_location(db: &Path, path: &Path) -> Result<()> {
    let text = path.to_string_lossy();
    // SQLite opens both, and both vanish with the command: a submit there
    // would print an id and be lost (`COLONY_DB=sqlite:$UNSET`).
    if text.is_empty() || text == ":memory:" || text.starts_with("file::memory:") {
        bail!(BadInput(format!(
            "database {:?}: {}; give the path of a database file",
            db.display().to_string(),
            match text.is_empty() {
                true => "the path is empty",
                false => "an in-memory database lasts one command",
            }
        )));
    }
    // libpq's `host=... dbname=...` form would become a file named after
    // it, password and all.
    // (A quoted value may hold spaces: `password='a b'`.)
    let words: Vec<&str> = text.split_whitespace().collect();
    let settings = words.iter().filter(|w| w.contains('=')).count();
    if words.len() > 1 && settings >= 2 && words[0].contains('=') {
        bail!(BadInput(
            "--db: that looks like a PostgreSQL key=value connection string (not shown: it \
             may hold a password); colony takes a postgres:// URL \
             (postgres://USER:PASSWORD@HOST:PORT/DATABASE)"
                .to_string()
        ));
    }
    // `postgresql:user:pw@host`, `postgres//user:pw@host`, `postgres:/...`:
    // a URL missing part of its `://` would become a file named after the
    // password.
    let lower = text.to_ascii_lowercase();
    if ["postgres:", "postgresql:", "postgres//", "postgresql//"]
        .iter()
        .any(|start| lower.starts_with(start))
    {
        bail!(BadInput(format!(
            "database {}: that looks like a PostgreSQL URL with its :// mistyped; \
             write postgres://USER:PASSWORD@HOST:PORT/DATABASE",
            hide_userinfo(&text)
        )));
    }
    if let Some((scheme, _)) = text.split_once("://")
        && !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
    {
        bail!(BadInput(format!(
            "database {}: {scheme}:// is not a database colony speaks; \
             give a SQLite file (a path or sqlite:PATH) or a postgres:// URL",
            crate::queue::redact_url(&text)
        )));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        bail!(BadInput(format!(
            "database {}: the directory {} does not exist",
            hide_userinfo(&db.to_string_lossy()),
            hide_userinfo(&dir.to_string_lossy())
        )));
    }
    // SQLite says only "unable to open database file" of these (or, for a
    // file it may only read, "attempt to write a readonly database"), which
    // reads as a busy database worth trying again.
    if path.is_dir() {
        bail!(BadInput(format!(
            "database {}: that is a directory; give the path of a database file, such as {}",
            hide_userinfo(&db.to_string_lossy()),
            hide_userinfo(&path.join("colony.db").to_string_lossy())
        )));
    }
    Ok(())
}

/// Why this user cannot open the SQLite database at `path`, when the
/// permissions say: asked only once SQLite failed to open it, which it says
/// as "unable to open database file", read as a busy database worth trying
/// again. (Asked before, it refused what SQLite opens: a file it may only
/// read, opened read-only; a folder it may not write while the -wal and
/// -shm files exist.)
fn why_unopenable(path: &Path) -> Option<&'static str> {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if path.exists() {
        return (!may_access(&path, libc::R_OK)).then_some("this user may not read the file");
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    (!may_access(dir, libc::W_OK | libc::X_OK)).then_some(
        "this user may not create files in its directory (a new database, and its -wal and -shm files beside it)",
    )
}

/// Whether this process may access `path` in `mode` (access(2)'s R_OK,
/// W_OK, X_OK), as the kernel would decide for it.
fn may_access(path: &Path, mode: libc::c_int) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return true; // a NUL in the path: SQLite names that itself
    };
    // SAFETY: access() reads the NUL-terminated path and nothing else.
    unsafe { libc::access(c_path.as_ptr(), mode) == 0 }
}

/// Refuses a PostgreSQL URL that names no database: the server would pick
/// one after the user (often `postgres`, the maintenance database), and the
/// queue's tables would land there unasked.
fn check_postgres_url(url: &str) -> Result<()> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (_, rest) = crate::queue::split_url_credentials(rest);
    let before_query = rest.split(['?', '#']).next().unwrap_or_default();
    let database = before_query.split_once('/').map_or("", |(_, db)| db);
    let named_in_query = rest.split_once('?').is_some_and(|(_, q)| {
        q.split('&')
            .any(|kv| kv.to_ascii_lowercase().starts_with("dbname="))
    });
    if database.is_empty() && !named_in_query {
        bail!(BadInput(format!(
            "database {}: the URL names no database; add it: postgres://USER:PASSWORD@HOST:PORT/DATABASE",
            crate::queue::redact_url(url)
        )));
    }
    Ok(())
}

/// `text` with anything before an `@` hidden: in what was meant as a URL
/// it holds a user and password (a file path rarely has an `@`).
fn hide_userinfo(text: &str) -> String {
    match text.rsplit_once('@') {
        Some((_, host)) => format!("…@{host}"),
        None => text.to_string(),
    }
}

/// The queue `migrate` copies from, opened without writing to it. A SQLite
/// file of an older schema is read through an upgraded copy in `scratch`:
/// upgraded in place, it was left on a schema the older build (the way
/// back) refuses, also when the copy then failed. A file without colony's
/// schema is refused (it got colony's tables added to it).
fn open_source(from: &Path, actor: &str, scratch: &Path) -> Result<Queue> {
    let crate::queue::Location::Sqlite(path) = crate::queue::Location::of(from) else {
        return open_queue(from, actor);
    };
    let conn =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("--from {}: opening it to read", path.display()))?;
    let (version, has_tasks): (u32, bool) = conn
        .query_row(
            "SELECT (SELECT user_version FROM pragma_user_version),
                    EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tasks')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .with_context(|| format!("--from {}: reading its schema", path.display()))?;
    if version == 0 || !has_tasks {
        bail!(BadInput(format!(
            "--from {}: not a colony queue (it has no colony schema); nothing was copied, and it is left as it was",
            path.display()
        )));
    }
    if version >= crate::queue::sqlite_schema_version() {
        drop(conn);
        return open_queue(from, actor); // a newer one is refused there, naming both
    }
    let copy = scratch.join("source.db");
    conn.execute("VACUUM INTO ?1", [copy.to_string_lossy()])
        .with_context(|| format!("--from {}: copying it to upgrade the copy", path.display()))?;
    say!(
        "note: {} has schema version {version} (this build's is {}); it is read through an upgraded copy and left as it is",
        path.display(),
        crate::queue::sqlite_schema_version()
    );
    // The copy VACUUM INTO made, and only it: an empty queue made in its
    // place would be copied as "0 rows".
    let opts = QueueOptions {
        actor: actor.to_string(),
        must_exist: true,
        ..Default::default()
    };
    Queue::open_with(&copy, opts)
        .with_context(|| format!("--from {}: opening its upgraded copy", path.display()))
}

fn migrate(cli: &Cli, args: &MigrateArgs) -> Result<()> {
    if let crate::queue::Location::Sqlite(path) = crate::queue::Location::of(&args.from)
        && !path.is_file()
    {
        bail!(BadInput(format!(
            "--from {}: no such database file",
            path.display()
        )));
    }
    if redacted(&args.from) == redacted(&args.to) {
        bail!(BadInput("--from and --to name the same database".into()));
    }
    let actor = identity("migrate");
    let snapshot_dir = tempfile::tempdir()?;
    let source = open_source(&args.from, &actor, snapshot_dir.path())?;
    // A daemon still running on the source: what it finishes is stored
    // there, and the copy's daemons run the same tasks again.
    let live = source.live_leases(source.now()?)?;
    if !live.is_empty() && !args.force {
        let holders: Vec<String> = live.iter().map(|(h, n)| format!("{h} ({n})")).collect();
        bail!(BadInput(format!(
            "--from {}: daemons renewed leases within their --stale-after, so they are most likely running: {}; stop them first (their runs are released), or pass --force",
            redacted(&args.from),
            holders.join(", ")
        )));
    }
    let mut target = open_queue(&args.to, &actor)?;
    let report = tokio::task::block_in_place(|| source.copy_into(&mut target))
        .map_err(|e| match e.is_bad_input() {
            true => anyhow::Error::new(BadInput(e.to_string())),
            false => anyhow::Error::new(e),
        })
        .with_context(|| {
            format!(
                "copying {} into {}",
                redacted(&args.from),
                redacted(&args.to)
            )
        })?;
    let mut out = std::io::stdout().lock();
    if cli.json {
        let tables: serde_json::Map<String, serde_json::Value> = report
            .tables
            .iter()
            .map(|(t, n)| (t.clone(), serde_json::json!(n)))
            .collect();
        writeln!(out, "{}", serde_json::json!({"copied": tables}))?;
    } else {
        writeln!(
            out,
            "copied {} into {}:",
            redacted(&args.from),
            redacted(&args.to)
        )?;
        for (table, n) in &report.tables {
            writeln!(out, "  {table:<20} {n:>10} rows")?;
        }
    }
    Ok(())
}

/// `bench` and `torture` make their own queue: a SQLite `--db` or an
/// `--agents` given to them on the command line is not used, which they
/// say rather than silently measure or torture somewhere else than the
/// user expects. (COLONY_DB and COLONY_AGENTS, set for everyday work, are
/// not worth a note each time.)
fn note_own_database(cli: &Cli, command: &str, own: &str) {
    let given = |value: &Path, default: &str, var: &str| {
        value != Path::new(default) && std::env::var_os(var).is_none_or(|v| Path::new(&v) != value)
    };
    let sqlite_db = postgres_db(&cli.db).is_none() && given(&cli.db, "colony.db", "COLONY_DB");
    let agents = given(&cli.agents, "agents", "COLONY_AGENTS");
    if sqlite_db || agents {
        let mut unused = Vec::new();
        if sqlite_db {
            unused.push(format!("--db {}", cli.db.display()));
        }
        if agents {
            unused.push(format!("--agents {}", cli.agents.display()));
        }
        say!(
            "note: {command} runs on {own}; {} is not used (--db is, when it is a postgres:// URL of an empty database)",
            unused.join(" and ")
        );
    }
}

/// `--db` when it names a PostgreSQL database: `bench` and `torture` then
/// run against it instead of SQLite files of their own.
fn postgres_db(db: &Path) -> Option<&Path> {
    matches!(
        crate::queue::Location::of(db),
        crate::queue::Location::Postgres(_)
    )
    .then_some(db)
}

/// `--db` as it may be printed: a PostgreSQL URL loses its password.
pub fn redacted(db: &Path) -> String {
    match crate::queue::Location::of(db) {
        crate::queue::Location::Postgres(url) => crate::queue::redact_url(&url),
        crate::queue::Location::Sqlite(path) => hide_userinfo(&path.to_string_lossy()),
    }
}

/// Where compiled components are cached: beside the database, or in the
/// working directory when the database is a server.
pub fn cache_dir(db: &Path) -> PathBuf {
    let crate::queue::Location::Sqlite(path) = crate::queue::Location::of(db) else {
        return PathBuf::from(".colony-cache");
    };
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(".colony-cache")
}

pub async fn run(cli: Cli) -> Result<()> {
    let _ = SQLITE_SYNC.set(cli.sync.into());
    run_command(&cli)
        .await
        .map_err(|e| explain_read_only(&cli.db, e))
}

/// SQLite's "attempt to write a readonly database" and, for a file that
/// exists, "unable to open database file" (exit 1, as if a retry might
/// pass), said as what they are: bad input, this user may not write there,
/// or the file system is mounted read-only.
fn explain_read_only(db: &Path, e: anyhow::Error) -> anyhow::Error {
    let code = e
        .chain()
        .find_map(|cause| match cause.downcast_ref::<QueueError>() {
            Some(QueueError::Sqlite(rusqlite::Error::SqliteFailure(f, _))) => Some(f.code),
            _ => None,
        });
    let shown = hide_userinfo(&db.to_string_lossy());
    match code {
        Some(rusqlite::ErrorCode::ReadOnly) => bad(format!(
            "database {shown}: this user may not write to it (the file, or the folder its -wal and -shm files go in, is read-only to it); check the permissions (ls -l), or give another --db ({e:#})"
        )),
        Some(rusqlite::ErrorCode::CannotOpen) if on_read_only_mount(db) => bad(format!(
            "database {shown}: the file system it is on is mounted read-only, and SQLite cannot open it even to read (a read creates the -wal and -shm files beside it); remount it read-write (findmnt -T {shown} shows the mount), or copy the file elsewhere and give that --db ({e:#})"
        )),
        _ => e,
    }
}

/// Whether the file `db` exists on a file system mounted read-only.
fn on_read_only_mount(db: &Path) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open(db)
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ReadOnlyFilesystem)
}

async fn run_command(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Submit(args) => submit(cli, args).await,
        Command::List {
            state,
            agent,
            limit,
        } => {
            let queue = open_existing_queue(&cli.db, &identity("cli"))?;
            let tasks = queue.list(&ListFilter {
                state: *state,
                agent: agent.clone(),
                limit: Some(*limit),
            })?;
            let usages = output::usages_of(&queue, &tasks)?;
            output::print_tasks(&tasks, &usages, cli.json)?;
            // After the listing, where a person reading it looks last.
            if tasks.len() == *limit as usize {
                say!(
                    "note: showing the newest {limit} tasks; there may be more: raise --limit or filter by --state or --agent"
                );
            }
            Ok(())
        }
        Command::Show { id } => {
            let queue = open_existing_queue(&cli.db, &identity("cli"))?;
            output::print_task_detail(&output::TaskDetail::load(&queue, *id)?, cli.json)
        }
        Command::Status => status(cli).await,
        Command::Events {
            task,
            since,
            follow,
        } => events(cli, *task, *since, *follow).await,
        Command::Review { id, verdict, note } => {
            let mut queue = open_existing_queue(&cli.db, &identity("cli"))?;
            let to = match verdict {
                Verdict::Approve => queue.approve(*id, note.as_deref())?,
                Verdict::Reject => {
                    queue.reject(*id, note.as_deref().unwrap_or("rejected without a note"))?
                }
            };
            if matches!(verdict, Verdict::Approve) && to != State::Complete {
                say_approval_went_stale(&queue, *id)?;
            }
            output::print_moved(*id, to, cli.json)
        }
        Command::Retry { id, token_budget } => {
            let mut queue = open_existing_queue(&cli.db, &identity("cli"))?;
            let failed_on_budget = queue
                .get(*id)?
                .error
                .is_some_and(|e| e.kind == crate::task::ErrorKind::BudgetExceeded);
            let to = queue.retry_with_token_budget(*id, *token_budget)?;
            let stay_cancelled = queue.cancelled_dependents(*id)?;
            if !stay_cancelled.is_empty() {
                let ids: Vec<String> = stay_cancelled.iter().map(i64::to_string).collect();
                say!(
                    "note: task(s) {} depend on task {id} and stay cancelled (a retry revives only the task named); retry each that should run: colony retry {}",
                    ids.join(", "),
                    ids[0]
                );
            }
            if failed_on_budget && token_budget.is_none() {
                say!(
                    "note: task {id} failed on its token budget, and what it spent (and what calls cut off reserved, see `colony show {id}`) still counts: it will most likely fail on it again. Give its chain more with `colony retry {id} --token-budget N`, or raise token_budget in its agent's manifest (a chain budget cannot lift a manifest's)"
                );
            }
            output::print_moved(*id, to, cli.json)
        }
        Command::Cancel { id, reason } => {
            let mut queue = open_existing_queue(&cli.db, &identity("cli"))?;
            let ids = queue.cancel(*id, reason)?;
            output::print_cancelled(&ids, cli.json)
        }
        Command::Agents => {
            // Read for its provider-key variables, which an agent's secrets
            // may not name: the agents listed as a daemon would load them.
            // (A configuration with errors is the model commands' to report.)
            let _ = load_models(cli);
            let (_runtime, agents) = load_agents_saying_so(&cli.db, &cli.agents).await?;
            output::print_agents(&agents, cli.json)
        }
        Command::State(command) => state::run(cli, command),
        Command::Effects(args) => effects::run(cli, args),
        Command::Daemon(args) => daemon(cli, args).await,
        Command::Serve(args) => serve::serve(cli, args).await,
        Command::Init { dir } => {
            let written = builtin::init(dir, &cli.agents, cli.config_path())?;
            if cli.json {
                return output::print_json(&serde_json::json!({ "wrote": written }));
            }
            for path in &written {
                println!("wrote {}", path.display());
            }
            let cd = match dir.to_str() {
                Some(".") => String::new(),
                _ => format!("cd {} && ", shell_word(&dir.display().to_string())),
            };
            // The folders init wrote to, where they are not the defaults
            // the next commands would look in.
            let mut colony = String::from("colony");
            if cli.agents != Path::new("agents") {
                colony += &format!(
                    " --agents {}",
                    shell_word(&cli.agents.display().to_string())
                );
            }
            if cli.config_path() != Path::new("colony.toml") {
                colony += &format!(
                    " --config {}",
                    shell_word(&cli.config_path().display().to_string())
                );
            }
            println!("\nNext:");
            println!(
                "  {cd}{colony} submit design '{{\"name\":\"Mug\",\"audience\":\"commuters\",\"features\":[\"keeps coffee hot\"],\"price_cents\":1900,\"currency\":\"USD\"}}'"
            );
            println!("  {colony} daemon --until-idle      # run it (and the code task it chains)");
            println!("  {colony} serve                    # watch it at http://127.0.0.1:7070/");
            Ok(())
        }
        Command::New(args) => {
            let (dir, build) = new::scaffold(args)?;
            if cli.json {
                return output::print_json(&serde_json::json!({ "created": dir, "build": build }));
            }
            println!("created {}", dir.display());
            println!("\nNext:");
            println!("  cd {}", dir.display());
            println!("  {build}");
            println!(
                "  (then copy the component to your colony's {} folder; see README.md)",
                cli.agents.display()
            );
            if let Some(missing) = new::missing_toolchain(args.lang) {
                say!("note: building it needs {missing}");
            }
            Ok(())
        }
        Command::Wit { out } => {
            let written = builtin::write_wit(out)?;
            if cli.json {
                return output::print_json(&serde_json::json!({ "wrote": written }));
            }
            for path in written {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Bench(args) => {
            let own = match postgres_db(&cli.db) {
                Some(_) => "the PostgreSQL --db and a built-in no-op agent",
                None => "a fresh SQLite database in a temporary folder and a built-in no-op agent",
            };
            note_own_database(cli, "bench", own);
            bench::bench(args, postgres_db(&cli.db)).await
        }
        Command::Migrate(args) => migrate(cli, args),
        Command::Torture(args) => {
            let own = match postgres_db(&cli.db) {
                Some(_) => "the PostgreSQL --db and built-in agents",
                None => {
                    "its own SQLite database and built-in agents, in --dir (or a temporary folder)"
                }
            };
            note_own_database(cli, "torture", own);
            if torture::torture(args, postgres_db(&cli.db)).await? {
                Ok(())
            } else {
                bail!("the torture run failed a check (see the verdict above)")
            }
        }
        Command::Demo(args) => {
            if demo::demo(args, &cli.agents, load_models(cli)?).await? {
                Ok(())
            } else {
                bail!("the demo did not end as expected (see above)")
            }
        }
    }
}

/// A manifest that grants an alias the configuration lacks: its calls will
/// be refused as not granted, which the operator should hear about now.
fn warn_about_ungranted_models(
    agent: &str,
    granted: &[String],
    models: Option<&Providers>,
    config: &Path,
) {
    // Without any configured model, agents fall back by design (the store
    // agents use templates): nothing to warn about.
    let Some(models) = models else { return };
    for alias in granted {
        if !models.has_alias(alias) {
            say!(
                "warning: agent {agent} is granted the model alias {alias:?}, which {} does not configure; its calls will be refused",
                config.display()
            );
        }
    }
}

impl Cli {
    /// The operator's configuration file: `--config`, else `colony.toml`.
    pub fn config_path(&self) -> &Path {
        self.config.as_deref().unwrap_or(Path::new("colony.toml"))
    }
}

/// The model providers of the operator's configuration, or `None` when it
/// declares none (or the default file does not exist). A broken file, or
/// one named by `--config` that is not there, is bad input naming the
/// file, the alias and the key.
pub fn load_models(cli: &Cli) -> Result<Option<Arc<Providers>>> {
    let config = cli.config_path();
    if cli.config.is_some() && !config.exists() {
        return Err(bad(format!(
            "--config {} (or COLONY_CONFIG): no such file",
            config.display()
        )));
    }
    // Through anyhow for its `{:#}`: the causes too (TOML's line and column).
    let models = ModelsConfig::load_optional(config)
        .map_err(|e| bad(format!("{:#}", anyhow::Error::from(e))))?;
    if models.is_empty() {
        return Ok(None);
    }
    let providers = Providers::new(&models).map_err(|e| bad(format!("{e:#}")))?;
    Ok(Some(Arc::new(providers)))
}

async fn load_agents(
    db: &Path,
    dir: &Path,
    max_runs: u32,
    models: Option<Arc<Providers>>,
) -> Result<(Arc<Runtime>, AgentDir)> {
    let mut runtime = Runtime::new(RuntimeConfig {
        cache_dir: Some(cache_dir(db)),
        max_concurrent_runs: max_runs,
        pooling: true,
    })?;
    if let Some(models) = models {
        runtime.set_models(models);
    }
    let mut agents = AgentDir::new(dir);
    if !dir.is_dir() {
        let what = match dir.exists() {
            true => "is not a directory (it names a file)",
            false => "does not exist",
        };
        tracing::warn!(
            "the agents directory {} {what}; no agent is loaded",
            dir.display()
        );
    }
    agents.rescan(&runtime).await;
    Ok((Arc::new(runtime), agents))
}

/// The agents, for a command a person waits on (`status`, `agents`): a
/// first load compiles each component (an interpreted one for 10-15 s),
/// said when it takes a while rather than a silent minute.
async fn load_agents_saying_so(db: &Path, dir: &Path) -> Result<(Arc<Runtime>, AgentDir)> {
    let slow_note = {
        let (dir, cache) = (dir.display().to_string(), cache_dir(db));
        tokio::spawn(async move {
            tokio::time::sleep(SLOW_LOAD_NOTE_AFTER).await;
            say!(
                "note: compiling the components in {dir} (a Python or JavaScript one takes 10-15 s the first time; the compiled code is kept in {} for the next load)...",
                cache.display()
            );
        })
    };
    let loaded = load_agents(db, dir, 1, None).await;
    slow_note.abort();
    loaded
}

/// How long loading the agents may take before a note says why.
const SLOW_LOAD_NOTE_AFTER: Duration = Duration::from_secs(2);

// ----- submit ------------------------------------------------------------------

async fn submit(cli: &Cli, args: &SubmitArgs) -> Result<()> {
    let (tasks, lines) = match &args.batch {
        Some(file) => read_batch(file)?,
        None => (vec![task_from_args(args)?], vec![]),
    };
    let mut queue = open_queue(&cli.db, &identity("cli"))?;
    let submitted = if let Some(file) = &args.batch {
        queue.submit_batch(&tasks).map_err(|e| match e {
            QueueError::InvalidInBatch { index, source } => bad(format!(
                "{} line {}: {source}",
                batch_name(file),
                lines[index]
            )),
            QueueError::KeyTwiceInBatch { index, first, key } => bad(format!(
                "{} line {}: invalid key: {key:?} is also the key on line {}; a key names one task",
                batch_name(file),
                lines[index],
                lines[first]
            )),
            other => other.into(),
        })?
    } else {
        vec![queue.submit(&tasks[0])?]
    };
    warn_about_missing_agents(&cli.agents, &tasks);
    output::print_submitted(&queue, &submitted, cli.json)
}

/// Warns about every agent the tasks name (to run them, to review them,
/// or to run their `--next` chain) that has no component yet.
fn warn_about_missing_agents(dir: &Path, tasks: &[NewTask]) {
    for warning in missing_agent_warnings(dir, tasks) {
        say!("warning: {warning}");
    }
}

/// What [`warn_about_missing_agents`] says, one line per agent (the API
/// answers them with the submitted task's id).
pub(crate) fn missing_agent_warnings(dir: &Path, tasks: &[NewTask]) -> Vec<String> {
    let mut named = Vec::new();
    for task in tasks {
        named.push((task.agent.as_str(), "the task waits"));
        if let Some(reviewer) = &task.reviewer {
            named.push((reviewer.as_str(), "its review waits"));
        }
        chain_agents(&task.next, &mut named);
    }
    let mut warned = std::collections::HashSet::new();
    let mut warnings = Vec::new();
    for (agent, waits) in named {
        let file = dir.join(format!("{agent}.wasm"));
        if !file.is_file() && warned.insert(agent) {
            warnings.push(format!(
                "no agent {agent:?} in {} yet; {waits} until {}/{agent}.wasm appears",
                dir.display(),
                dir.display()
            ));
        } else if let Some(not) = component_start(&file).as_deref().and_then(not_a_component)
            && warned.insert(agent)
        {
            warnings.push(format!(
                "agent {agent:?} cannot run: {}: {}; {waits} until it is replaced",
                file.display(),
                not.reason()
            ));
        } else if let Some(why) = manifest_problem(dir, agent)
            && warned.insert(agent)
        {
            warnings.push(format!(
                "agent {agent:?} cannot run: {why}; {waits} until its manifest is fixed"
            ));
        }
    }
    warnings
}

/// What is wrong with the manifest `dir/<agent>.toml`, if it exists and is
/// wrong: read as a daemon would, without loading the component.
fn manifest_problem(dir: &Path, agent: &str) -> Option<String> {
    let path = dir.join(format!("{agent}.toml"));
    if !path.is_file() {
        return None;
    }
    crate::runtime::Manifest::load(&path)
        .and_then(|manifest| manifest.limits(&path, dir))
        .err()
}

/// The first bytes of a component file, enough for [`not_a_component`].
fn component_start(file: &Path) -> Option<Vec<u8>> {
    let mut start = Vec::with_capacity(8);
    std::fs::File::open(file)
        .ok()?
        .take(8)
        .read_to_end(&mut start)
        .ok()?;
    Some(start)
}

/// `text` as one word of a POSIX shell command line: as it is when it
/// holds nothing the shell would split or expand, else single-quoted.
fn shell_word(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c));
    match plain {
        true => text.to_string(),
        false => format!("'{}'", text.replace('\'', r"'\''")),
    }
}

/// The agents of a `--next` chain, with what waits for them.
fn chain_agents<'a>(specs: &'a [NextSpec], named: &mut Vec<(&'a str, &'static str)>) {
    for spec in specs {
        named.push((spec.agent.as_str(), "the chained task waits"));
        chain_agents(&spec.next, named);
    }
}

fn task_from_args(args: &SubmitArgs) -> Result<NewTask> {
    let agent = args
        .agent
        .clone()
        .ok_or_else(|| bad("name the agent to run the task"))?;
    // A payload from a file is checked here, so that its error names the file.
    let from_file = |text: String, shown: String| -> Result<String> {
        let text = without_bom(text);
        match serde_json::from_str::<serde::de::IgnoredAny>(&text) {
            Ok(_) => Ok(text),
            Err(e) => Err(bad(format!("{shown}: not valid JSON: {e}"))),
        }
    };
    let from_stdin = || -> Result<String> {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the payload from stdin")?;
        from_file(text, "the payload on stdin".to_string())
    };
    let payload = match (&args.payload, &args.payload_file) {
        (Some(p), _) if p == "-" => from_stdin()?,
        (None, Some(file)) if file == Path::new("-") => from_stdin()?,
        (Some(p), _) => match p.strip_prefix('@') {
            Some(file) => from_file(
                std::fs::read_to_string(file).map_err(|e| bad(format!("payload @{file}: {e}")))?,
                format!("payload @{file}"),
            )?,
            None => p.clone(),
        },
        (None, Some(file)) => from_file(
            std::fs::read_to_string(file)
                .map_err(|e| bad(format!("--payload-file {}: {e}", file.display())))?,
            format!("--payload-file {}", file.display()),
        )?,
        (None, None) => "{}".to_string(),
    };
    let mut task = NewTask::new(agent, payload);
    task.priority = args.priority;
    task.max_attempts = args.max_attempts;
    task.review = args.review;
    task.max_revisions = args.max_revisions;
    task.reviewer = args.reviewer.clone();
    task.depends_on = args.after.clone();
    task.key = args.key.clone();
    if let Some(next) = &args.next {
        task.next = parse_next(next)?;
    }
    task.run_at = match (args.in_, args.at) {
        (Some(delay), _) => Some(run_at_after(delay)),
        (None, at) => at,
    };
    task.timeout_ms = args.timeout.map(|t| t.as_millis() as u64);
    task.token_budget = args.token_budget;
    if let Some(backoff) = args.backoff {
        task.backoff_ms = backoff.as_millis() as u64;
    }
    Ok(task)
}

/// `--next` takes JSON or `@FILE`.
fn parse_next(text: &str) -> Result<Vec<NextSpec>> {
    let json = match text.strip_prefix('@') {
        Some(file) => {
            std::fs::read_to_string(file).map_err(|e| bad(format!("--next @{file}: {e}")))?
        }
        None => text.to_string(),
    };
    let value: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| bad(format!("--next: not valid JSON: {e}")))?;
    // A single spec is accepted as a list of one.
    let list = if value.is_object() {
        serde_json::Value::Array(vec![value])
    } else {
        value
    };
    serde_path_to_error::deserialize::<_, Vec<NextSpec>>(list).map_err(|e| {
        bad(format!(
            "--next: field {}: {} (expected a list of {{\"agent\": .., \"payload\": .., \"priority\"?, \"review\"?, \"next\"?}})",
            e.path(),
            e.inner()
        ))
    })
}

/// Parses JSON into `T`, naming the offending field in the error
/// (`priority: invalid type ...` rather than just `invalid type ...`).
/// `text` as one JSON value of type `T`, an error naming the field at fault;
/// text after the value is refused (`{"verdict":"reject"} {"verdict":"approve"}`
/// is not a reject).
pub(crate) fn parse_naming_field<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match path.as_str() {
            // Broken JSON has no field to name (the path would read `?`).
            _ if inner.is_syntax() || inner.is_eof() => format!("not valid JSON: {inner}"),
            "." => inner.to_string(),
            path => format!("field {path}: {inner}"),
        }
    })?;
    de.end()
        .map_err(|e| format!("not valid JSON: text after the value ({e})"))?;
    Ok(value)
}

/// One line of `submit --batch`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    agent: String,
    #[serde(default)]
    payload: Option<serde_json::Value>,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    review: bool,
    #[serde(default)]
    max_revisions: Option<u32>,
    #[serde(default)]
    reviewer: Option<String>,
    #[serde(default)]
    next: Vec<NextSpec>,
    #[serde(default)]
    after: Vec<i64>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    backoff: Option<String>,
    #[serde(default)]
    run_at: Option<String>,
    #[serde(default)]
    token_budget: Option<u64>,
}

/// One line of `submit --batch` (also the body of `POST /api/tasks`), or
/// what is wrong with it, naming the field.
pub fn parse_batch_line(line: &str) -> Result<NewTask, String> {
    // serde reads a struct from an array too, by position: `[{...}]` said
    // "field [0]: invalid type: map, expected a string".
    if !line.trim_start().starts_with('{')
        && let Ok(value) = serde_json::from_str::<serde_json::Value>(line)
    {
        let what = match value {
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::Bool(_) => "a boolean",
            _ => "null",
        };
        return Err(format!(
            "a task is one JSON object, {{\"agent\": ..., \"payload\": ...}}, not {what} (one task per line)"
        ));
    }
    let parsed: BatchLine = parse_naming_field(line)?;
    let payload = parsed.payload.unwrap_or_else(|| serde_json::json!({}));
    let mut task = NewTask::new(parsed.agent, payload.to_string());
    task.priority = parsed.priority;
    if let Some(n) = parsed.max_attempts {
        task.max_attempts = n;
    }
    task.review = parsed.review;
    if let Some(n) = parsed.max_revisions {
        task.max_revisions = n;
    }
    task.reviewer = parsed.reviewer;
    task.next = parsed.next;
    task.depends_on = parsed.after;
    task.key = parsed.key;
    task.token_budget = parsed.token_budget;
    if let Some(t) = parsed.timeout {
        let timeout = parse_timeout(&t).map_err(|e| format!("invalid timeout: {e}"))?;
        task.timeout_ms = Some(timeout.as_millis() as u64);
    }
    if let Some(b) = parsed.backoff {
        let backoff = parse_backoff(&b).map_err(|e| format!("invalid backoff: {e}"))?;
        task.backoff_ms = backoff.as_millis() as u64;
    }
    if let Some(r) = parsed.run_at {
        task.run_at = Some(parse_time(&r).map_err(|e| format!("invalid run_at: {e}"))?);
    }
    Ok(task)
}

/// How errors name a `--batch` file.
fn batch_name(file: &Path) -> String {
    match file == Path::new("-") {
        true => "--batch - (stdin)".to_string(),
        false => file.display().to_string(),
    }
}

/// `text` without the byte-order mark some editors put first, which JSON
/// parsers may ignore (RFC 8259) and serde_json refuses ("expected value at
/// line 1 column 1", the file looking fine).
fn without_bom(text: String) -> String {
    match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    }
}

/// The tasks of a `--batch` file, one JSON object per line, and the line
/// each came from (blank lines are skipped, so errors name the file's line).
fn read_batch(file: &Path) -> Result<(Vec<NewTask>, Vec<usize>)> {
    let mut text = String::new();
    if file == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading tasks from stdin")?;
    } else {
        text = std::fs::read_to_string(file)
            .map_err(|e| bad(format!("--batch {}: {e}", file.display())))?;
    }
    let text = without_bom(text);
    let (mut tasks, mut lines) = (Vec::new(), Vec::new());
    for (i, line) in text.as_bytes().lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let task = parse_batch_line(&line)
            .map_err(|e| bad(format!("{} line {}: {e}", batch_name(file), i + 1)))?;
        tasks.push(task);
        lines.push(i + 1);
    }
    if tasks.is_empty() {
        bail!(BadInput(format!(
            "--batch {}: no tasks in the file",
            file.display()
        )));
    }
    Ok((tasks, lines))
}

// ----- status, events ------------------------------------------------------------

async fn status(cli: &Cli) -> Result<()> {
    // Also before anything was submitted (just after `colony init`): the
    // counts of an empty queue, said so, with no file created there.
    let report = match open_existing_queue(&cli.db, &identity("cli")) {
        Ok(queue) => output::StatusReport::load(&queue)?,
        Err(e) if matches!(e.downcast_ref::<QueueError>(), Some(QueueError::Missing(_))) => {
            say!("note: {e}; the counts below are of an empty queue");
            output::StatusReport::empty()
        }
        Err(e) => return Err(e),
    };
    let (_runtime, agents) = load_agents_saying_so(&cli.db, &cli.agents).await?;
    output::print_status(&report, &agents, cli.json)
}

async fn events(cli: &Cli, task: Option<i64>, since: i64, follow: bool) -> Result<()> {
    let queue = open_existing_queue(&cli.db, &identity("cli"))?;
    if let Some(id) = task.filter(|&id| id != 0) {
        queue.get(id)?; // an unknown id is bad input, not an empty trail
    }
    if !follow {
        let mut since = since;
        loop {
            let batch = queue.events(task, since, 1000)?;
            for event in &batch {
                output::print_event_line(event)?;
                since = event.id;
            }
            if batch.len() < 1000 {
                return Ok(());
            }
        }
    }
    // Following waits at a hole in the ids (an event not committed yet)
    // rather than skipping past it: see `TrailCursor`.
    let mut cursor = crate::queue::TrailCursor::new(since);
    // A range the cursor moved over but whose events are not printed yet.
    let mut unprinted: Option<(i64, i64)> = None;
    let mut lost = false;
    loop {
        let step = match unprinted {
            Some(range) => Ok(range),
            None => cursor.advance(&queue, 1000),
        }
        .and_then(|(from, to)| {
            unprinted = Some((from, to));
            Ok((from, to, queue.events_between(task, from, to)?))
        });
        // A follower (a log shipper) outlives a database restart, as the
        // daemon does: it says so once and reads again every second.
        let (from, to, events) = match step {
            Ok(step) => step,
            Err(e) if e.is_transient() => {
                if !lost {
                    say!(
                        "events --follow: the database is unreachable ({e}); retrying every second"
                    );
                    lost = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if std::mem::take(&mut lost) {
            say!("events --follow: the database is back");
        }
        unprinted = None;
        for event in &events {
            output::print_event_line(event)?;
        }
        if to - from < 1000 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

// ----- daemon ----------------------------------------------------------------------

async fn daemon(cli: &Cli, args: &DaemonArgs) -> Result<()> {
    let cfg = DaemonConfig {
        poll: args.poll,
        concurrency: args.concurrency,
        heartbeat: args.heartbeat,
        stale_after: args.stale_after,
        grace: args.grace,
        claim_batch: args
            .claim_batch
            .unwrap_or(crate::orchestrator::DEFAULT_CLAIM_BATCH),
        // Named, the batch is claimed ahead for every agent.
        prefetch: match args.claim_batch {
            Some(_) => crate::orchestrator::Prefetch::Always,
            None => crate::orchestrator::Prefetch::Adaptive,
        },
        effect_timeout: args.effect_timeout,
        until_idle: args.until_idle,
        ..DaemonConfig::default()
    };
    cfg.validate().map_err(bad)?;
    for warning in cfg.warnings() {
        tracing::warn!("{warning}");
    }
    let actor = identity("daemon");
    let queue = open_queue(&cli.db, &actor)?;
    // Headroom in the instance pool for trial instantiations of new agents
    // and for runs being torn down.
    let models = load_models(cli)?;
    let (runtime, agents) = load_agents(
        &cli.db,
        &cli.agents,
        args.concurrency * 2 + 8,
        models.clone(),
    )
    .await?;
    for entry in agents.entries() {
        match &entry.status {
            crate::runtime::AgentStatus::Broken(reason) => {
                say!("warning: agent {} not loaded: {reason}", entry.name)
            }
            crate::runtime::AgentStatus::Loaded(agent) => warn_about_ungranted_models(
                &agent.name,
                &agent.limits.models,
                models.as_deref(),
                cli.config_path(),
            ),
        }
    }
    tracing::info!(identity = %actor, db = %redacted(&cli.db), agents = ?agents.loaded_names(), "daemon started");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(
            "signal received: finishing runs in flight (send another signal to exit at once)"
        );
        let _ = stop_tx.send(true);
        wait_for_signal().await;
        say!("second signal: exiting now; leases held will expire and be reset by another daemon");
        std::process::exit(130);
    });
    let progress = (args.until_idle && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| tokio::spawn(show_progress(cli.db.clone())));
    let (web_stop, web) = match args.http {
        Some(listen) => {
            let bound = serve::start(cli, listen, args.token.clone()).await?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(bound.serve(async {
                let _ = stopped.await;
            }));
            (Some(stop), Some(server))
        }
        None => (None, None),
    };
    let summary = Daemon::new(queue, runtime, agents, cfg).run(stop_rx).await;
    if let (Some(stop), Some(server)) = (web_stop, web) {
        let _ = stop.send(());
        // Open event streams would hold a graceful shutdown forever.
        if tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .is_err()
        {
            tracing::warn!("the dashboard did not stop within 2 s; leaving it");
        }
    }
    if let Some(progress) = progress {
        progress.abort();
        let _ = write!(std::io::stderr(), "\r\x1b[2K");
    }
    output::print_daemon_summary(&summary?, cli.json)
}

/// With `--until-idle` in a terminal: one status line of the work left,
/// redrawn twice a second, read through its own connection.
async fn show_progress(db: PathBuf) {
    let Ok(queue) = Queue::open(&db) else { return };
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(backlog) = queue.backlog() else {
            continue;
        };
        let sum =
            |f: fn(&crate::queue::Backlog) -> u64| backlog.iter().map(|(_, b)| f(b)).sum::<u64>();
        let (ready, running, waiting) = (
            sum(|b| b.ready),
            sum(|b| b.in_progress),
            sum(|b| b.scheduled + b.blocked),
        );
        let _ = write!(
            std::io::stderr(),
            "\r\x1b[2K{running} in progress, {ready} ready, {waiting} waiting (backoff, schedule or dependencies)"
        );
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// An approval that did not complete its task: the state writes it held
/// had gone stale (a set-if whose key changed meanwhile), so the task runs
/// again, or fails once out of revisions. Said on stderr, as a note.
fn say_approval_went_stale(queue: &Queue, id: i64) -> anyhow::Result<()> {
    let task = queue.get(id)?;
    match task.state {
        State::Failed => say!(
            "note: the approval of task {id} did not take and the task failed: {}",
            task.error.map_or_else(
                || "its held state writes had gone stale".into(),
                |e| e.message
            )
        ),
        _ => say!(
            "note: the approval of task {id} did not take: {} (revision {} of {})",
            task.feedback
                .as_deref()
                .unwrap_or("its held state writes had gone stale"),
            task.revisions,
            task.max_revisions
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{log_filter_silences_colony, shell_word};

    /// Every per-task flag of `submit` is refused beside `--batch` (each
    /// line says its own): one added later and not listed there would be
    /// ignored without a word, as --review and --after were.
    #[test]
    fn every_per_task_flag_of_submit_conflicts_with_batch() {
        use clap::{CommandFactory, Parser};
        let cli = super::Cli::command();
        let submit = cli.find_subcommand("submit").expect("a submit command");
        let mut checked = 0;
        for arg in submit.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if arg.is_global_set() || ["batch", "help"].contains(&long) {
                continue;
            }
            let mut line = vec!["colony", "submit", "--batch", "tasks.jsonl"];
            let flag = format!("--{long}");
            line.push(&flag);
            if arg.get_action().takes_values() {
                line.push(match long {
                    "at" => "2030-01-01T00:00:00Z",
                    "in" => "5m",
                    "timeout" | "backoff" => "9s",
                    "next" => "[]",
                    "reviewer" | "key" | "payload-file" => "x",
                    _ => "1",
                });
            }
            let refused = super::Cli::try_parse_from(&line).expect_err(&flag);
            assert_eq!(
                refused.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{flag}: {refused}"
            );
            checked += 1;
        }
        assert!(checked >= 12, "{checked} flags");
    }

    #[test]
    fn shell_words_are_quoted_only_when_the_shell_would_change_them() {
        assert_eq!(shell_word("conf/colony.toml"), "conf/colony.toml");
        assert_eq!(shell_word("my agents"), "'my agents'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word("$HOME"), "'$HOME'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn a_log_filter_without_a_level_for_colony_is_noticed() {
        for silencing in ["bogus", "hyper=debug", "wasmtime=info,sqlx", "colonyx=info"] {
            assert!(log_filter_silences_colony(silencing), "{silencing}");
        }
        for speaking in [
            "info",
            "WARN",
            "2",
            "colony=debug",
            "colony::orchestrator=trace",
            "hyper=debug,warn",
            "colony[run]=info",
        ] {
            assert!(!log_filter_silences_colony(speaking), "{speaking}");
        }
    }
}
