//! The command line's shape: every command, its flags and their parsers
//! (durations, times, task ids), with the limits they enforce.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use super::{bench, demo, effects, new, rfc3339, serve, state, torture};
use crate::task::State;

/// Parses the command line, exiting 2 on bad arguments as clap does; for
/// arguments that are not UTF-8 it also says which (clap does not).
pub fn parse_args() -> Cli {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    Cli::try_parse_from(&args).unwrap_or_else(|err| {
        use clap::error::ErrorKind;
        let asked_for_json = args.iter().any(|arg| arg == "--json");
        let from_env = value_from_environment(&err, &args);
        if asked_for_json && err.use_stderr() {
            // The one error shape a script reading --json knows.
            let text = err.render().to_string();
            let text = text.trim().trim_start_matches("error: ");
            let text = text.split("\n\n").next().unwrap_or(text);
            let text = match &from_env {
                Some(note) => format!("{text} ({note})"),
                None => text.to_string(),
            };
            say!("{}", super::bad_input_json(&text));
            std::process::exit(2)
        }
        if let Some(note) = from_env {
            let _ = err.print();
            say!("note: {note}");
            std::process::exit(2)
        }
        if err.kind() != ErrorKind::InvalidUtf8 {
            err.exit()
        }
        let _ = err.print();
        for line in non_utf8_args(&args) {
            say!("note: {line}");
        }
        std::process::exit(2)
    })
}

/// Where an invalid value came from when it was not the command line but
/// the option's environment variable: clap names the option alone
/// (`COLONY_SYNC=bogus colony list` said "invalid value 'bogus' for
/// '--sync <SYNC>'", a flag nobody had typed).
fn value_from_environment(err: &clap::Error, args: &[std::ffi::OsString]) -> Option<String> {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(invalid)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = invalid.split([' ', '=']).next()?.strip_prefix("--")?;
    let flag = format!("--{long}");
    let typed = args.iter().filter_map(|a| a.to_str()).any(|a| {
        a == flag
            || a.strip_prefix(&flag)
                .is_some_and(|rest| rest.starts_with('='))
    });
    if typed {
        return None;
    }
    let var = env_of(&Cli::command(), long)?;
    std::env::var_os(&var)?;
    Some(format!(
        "the value came from the environment variable {var}, not the command line"
    ))
}

/// The environment variable of option `--long`, in `cmd` or a subcommand.
fn env_of(cmd: &clap::Command, long: &str) -> Option<String> {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|var| var.to_string_lossy().into_owned())
        .or_else(|| cmd.get_subcommands().find_map(|sub| env_of(sub, long)))
}

/// One line for each argument that is not UTF-8, naming its flag.
pub(super) fn non_utf8_args(args: &[std::ffi::OsString]) -> Vec<String> {
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

#[derive(Parser, Debug)]
#[command(
    name = "colony",
    version,
    about = "A durable work queue that runs AI agents as sandboxed WebAssembly components",
    long_about = "Colony keeps a durable task queue in a SQLite file and runs each task in a fresh \
                  WebAssembly sandbox of the agent it names (agents/<name>.wasm). Submit tasks with \
                  `colony submit`, run them with `colony daemon`, and inspect everything with \
                  `colony list`, `show`, `status` and `events`.\n\n\
                  Exit status: 0 on success; 2 on bad input (nothing was stored), a task or key not \
                  found, or a state that does not allow the change; 1 on any other error (a database \
                  busy or unreachable, say: worth trying again). With --json an error is one JSON \
                  line on stderr, its `kind` saying which."
)]
pub struct Cli {
    /// Where the queue lives: a SQLite file (`sqlite:PATH` also works;
    /// created by submit, daemon, serve and state set if missing, while
    /// commands that read a queue refuse a missing or empty file, and every
    /// command refuses a file that holds something else) or a PostgreSQL URL
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
    #[arg(
        long,
        global = true,
        env = "COLONY_AGENTS",
        hide_env_values = true,
        default_value = "agents"
    )]
    pub agents: PathBuf,
    /// The operator's configuration: model providers (`[models.<alias>]`).
    /// Default: colony.toml, where a missing file means no models; a file
    /// named here (or in COLONY_CONFIG) must exist.
    #[arg(long, global = true, env = "COLONY_CONFIG", hide_env_values = true)]
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
        hide_env_values = true,
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
        #[arg(long, default_value_t = 50, allow_negative_numbers = true, value_parser = Whole::<u32>::new(1, u32::MAX as i64))]
        limit: u32,
        /// Only tasks older than this id: the last id of a page, to list the
        /// next (as the API's `before=`).
        #[arg(long, value_name = "ID", value_parser = task_id, allow_negative_numbers = true)]
        before: Option<i64>,
    },
    /// Show one task: its fields, audit events, run logs and result.
    Show {
        /// The task's id (as `submit` printed it).
        #[arg(value_parser = task_id, allow_negative_numbers = true)]
        id: i64,
    },
    /// Counts by state and agent, the oldest ready task, leases held, agents.
    Status,
    /// The audit trail as JSON Lines: id, at, task_id, event, from, to, actor, detail.
    Events {
        /// Only events of this task; 0: operators' writes to agents' state
        /// (`colony state set/delete --agent`), which belong to no task.
        #[arg(long, value_parser = Whole::<i64>::new(0, i64::MAX), allow_negative_numbers = true)]
        task: Option<i64>,
        /// Only events after this event id.
        #[arg(long, default_value_t = 0, value_parser = Whole::<i64>::new(0, i64::MAX), allow_negative_numbers = true)]
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
        #[arg(value_parser = task_id, allow_negative_numbers = true)]
        id: i64,
        /// approve or reject
        verdict: Verdict,
        /// A note for the agent (passed as `feedback` to the next run on reject).
        #[arg(long)]
        note: Option<String>,
        /// The review round the decision was made on, as `colony show`
        /// gives it: refused if the task has since been decided and run
        /// again (a new result, new held writes and effects), so that an
        /// approval never releases what its approver did not read.
        #[arg(long, value_name = "ROUND", value_parser = Whole::<i64>::new(1, i64::MAX), allow_negative_numbers = true)]
        round: Option<i64>,
    },
    /// Revive a failed or cancelled task (attempts reset).
    Retry {
        /// The id of the failed or cancelled task.
        #[arg(value_parser = task_id, allow_negative_numbers = true)]
        id: i64,
        /// Give the task's chain this many tokens in all (more than it has
        /// spent, which still counts): a task that failed on its budget
        /// would fail on it again. A manifest's token_budget still caps each
        /// of the agent's tasks.
        #[arg(long, value_name = "TOKENS", value_parser = token_count)]
        token_budget: Option<u64>,
    },
    /// Cancel a task that has not finished, and every task depending on it.
    Cancel {
        /// The id of the task to cancel.
        #[arg(value_parser = task_id, allow_negative_numbers = true)]
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
    /// With --json the story goes to stderr and stdout gets one JSON summary
    /// (ok, problems, db, pages, tasks).
    Demo(demo::DemoArgs),
    /// Several daemons on one database, one SIGKILLed and restarted every
    /// ~500 ms (every third time frozen with SIGSTOP past its lease
    /// instead); then checks from the audit trail that nothing was lost or run
    /// twice. Prints a JSON verdict; exits 1 when a check fails. With
    /// `--db postgres://...` (an empty database) the daemons share PostgreSQL.
    Torture(torture::TortureArgs),
    /// Set up a folder to run Colony in: agents/ with the four store agents
    /// (design, code, marketing, ops) and marketing's manifest (the others
    /// run on the default limits), and a commented
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
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = Whole::<i32>::new(i32::MIN as i64, i32::MAX as i64))]
    pub priority: i32,
    /// Runs before the task fails for good: 1 to 1000.
    #[arg(long, default_value_t = crate::task::DEFAULT_MAX_ATTEMPTS, value_parser = Whole::<u32>::new(1, 1000), allow_negative_numbers = true)]
    pub max_attempts: u32,
    /// Hold the result in `review` until approved.
    #[arg(long)]
    pub review: bool,
    /// Rejections that send the task back for a revision before one more
    /// fails it: 0 to 100. Each revision runs the task again, with the
    /// rejection's note (or "rejected without a note") as its `feedback`
    /// and its attempts back.
    #[arg(long, default_value_t = crate::task::DEFAULT_MAX_REVISIONS, value_parser = Whole::<u32>::new(0, crate::task::MAX_REVISIONS as i64), allow_negative_numbers = true)]
    pub max_revisions: u32,
    /// An agent that reviews the result automatically (implies --review).
    #[arg(long)]
    pub reviewer: Option<String>,
    /// Tasks to create when this one completes: a JSON list of
    /// {agent, payload, priority?, review?, next?}, or @FILE to read it from a file.
    /// They run with the defaults (3 attempts, 10s backoff, the agent's
    /// timeout, 3 revisions), not this task's settings.
    #[arg(long)]
    pub next: Option<String>,
    /// Wait for this task to complete first (repeatable).
    #[arg(long = "after", value_name = "ID", value_parser = task_id, allow_negative_numbers = true)]
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
    #[arg(long, value_name = "TOKENS", value_parser = token_count, allow_negative_numbers = true)]
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
    #[arg(long, default_value_t = 16, value_parser = Whole::<u32>::new(1, MAX_CONCURRENCY), allow_negative_numbers = true)]
    pub concurrency: u32,
    /// How often to renew this daemon's leases (and reap stale ones).
    #[arg(long, default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub heartbeat: Duration,
    /// Reset a lease that has not been renewed for this long. This daemon's
    /// claims record it, and no daemon resets them sooner, whatever its own
    /// setting; another daemon's lease is reset only when stale by both.
    #[arg(long, default_value = "60s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub stale_after: Duration,
    /// On SIGINT, SIGTERM or SIGHUP, how long to let runs finish before
    /// releasing them.
    #[arg(long, default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub grace: Duration,
    /// Most tasks taken per claim transaction; those beyond the free slots
    /// wait in the daemon, leased. Larger is faster under load. Default: 64,
    /// claimed ahead only for agents whose recent runs took under 50 ms
    /// (for the others, and agents not seen running yet, just the free
    /// slots, so that slow tasks stay in the queue for any daemon and a
    /// crash costs no attempt of a task that never started). Named here,
    /// the batch is claimed ahead for every agent.
    #[arg(long, value_parser = Whole::<usize>::new(1, MAX_CLAIM_BATCH as i64), allow_negative_numbers = true)]
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
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub http: Option<std::net::SocketAddr>,
    /// With --http: the token changes need (see `colony serve --help`);
    /// without --http it is not used.
    #[arg(long, env = "COLONY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Upper bounds of the daemon's counts: far above any useful setting, low
/// enough that the instance pool sized from them cannot overflow.
pub(super) const MAX_CONCURRENCY: i64 = 4096;
pub(super) const MAX_CLAIM_BATCH: u64 = 4096;

/// A whole number from `min` to `max` (as a `T`), said in words when it is
/// not one: clap's own parsers said "invalid digit found in string",
/// "number too large to fit in target type" or "-1 is not in
/// 0..9223372036854775807".
#[derive(Clone, Copy)]
pub(crate) struct Whole<T> {
    min: i64,
    max: i64,
    of: std::marker::PhantomData<fn() -> T>,
}

impl<T> Whole<T> {
    pub(crate) const fn new(min: i64, max: i64) -> Whole<T> {
        Whole {
            min,
            max,
            of: std::marker::PhantomData,
        }
    }
}

impl<T: TryFrom<i64> + Clone + Send + Sync + 'static> clap::builder::TypedValueParser for Whole<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let text = value.to_string_lossy();
        let parsed = text.trim().parse::<i64>().ok();
        if let Some(n) = parsed.filter(|n| (self.min..=self.max).contains(n))
            && let Ok(value) = T::try_from(n)
        {
            return Ok(value);
        }
        let arg = arg.map_or_else(|| "the value".to_string(), |a| format!("'{a}'"));
        let (min, max) = (self.min, self.max);
        let range = match max {
            i64::MAX => format!("a whole number from {min}"),
            _ => format!("a whole number from {min} to {max}"),
        };
        let message = format!("invalid value '{text}' for {arg}: {range} is needed\n");
        Err(clap::Error::raw(clap::error::ErrorKind::ValueValidation, message).with_cmd(cmd))
    }
}

/// A task id: a whole number from 1, as `colony list` shows it (`#3`
/// is taken too, as effect ids are). It said "invalid digit found in
/// string" of `abc`, and "not in 1..9223372036854775807" of 0.
pub(super) fn task_id(text: &str) -> Result<i64, String> {
    match text.strip_prefix('#').unwrap_or(text).parse::<i64>() {
        Ok(id) if id >= 1 => Ok(id),
        _ => Err(format!(
            "{text:?} is not a task id (a whole number from 1, as `colony list` shows it)"
        )),
    }
}

/// A token budget: a whole number from 1 ("-1" said "invalid digit
/// found in string").
pub(super) fn token_count(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if (1..=i64::MAX as u64).contains(&n) => Ok(n),
        _ => Err(format!(
            "{text:?} is not a number of tokens (a whole number from 1 to {})",
            i64::MAX
        )),
    }
}

/// An address to listen on: `IP:PORT`, or `HOST:PORT` with a name this
/// machine resolves (`localhost:7070`, as the README's links read), taken
/// as its first IPv4 address if it has one.
pub(super) fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let hint = "give IP:PORT or HOST:PORT, e.g. 127.0.0.1:7070 or localhost:7070";
    let Some((_, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} has no port: {hint}"));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("{port:?} is not a port (0 to 65535): {hint}"));
    }
    let addrs: Vec<std::net::SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?} does not resolve here ({e}): {hint}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?} resolves to no address: {hint}"))
}

/// A duration, `500ms`, `10s`, `5m`, `2h 30m`. The parser's own words
/// ("expected number at 0", "unknown time unit ... (and few variations)")
/// are left out: they said little of what to write instead.
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|_| {
        let why = match s.trim() {
            t if t.starts_with('-') => "a duration cannot be negative",
            t if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) => "it has no unit",
            _ => "it is not a duration",
        };
        format!("{s:?}: {why}; write a number and a unit, e.g. 500ms, 10s, 5m, 2h 30m (units: ms, s, m, h, d)")
    })
}

/// A duration no longer than `max`, whose name is `what` in the message.
pub(super) fn duration_at_most(s: &str, max: Duration, what: &str) -> Result<Duration, String> {
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

pub(super) fn parse_timeout(s: &str) -> Result<Duration, String> {
    duration_at_most(s, crate::runtime::MAX_TIMEOUT, "a run's wall-clock budget")
}

pub(super) fn parse_backoff(s: &str) -> Result<Duration, String> {
    duration_at_most(s, crate::retry::MAX_BACKOFF, "the wait between retries")
}

/// `--in`: a delay that lands no later than the latest time `--at` takes.
pub(super) fn parse_delay(s: &str) -> Result<Duration, String> {
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
pub(super) fn parse_time(s: &str) -> Result<i64, String> {
    rfc3339::parse(s).map_err(|e| {
        format!("{e} (use RFC 3339, e.g. 2026-11-27T18:00:00Z or 2026-11-27T18:00:00+01:00)")
    })
}

/// When a task delayed by `delay` from `now` (the queue's clock, ms since
/// the epoch) may run.
pub(super) fn run_at_after(now: i64, delay: Duration) -> i64 {
    let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    now.saturating_add(ms).min(rfc3339::MAX_MS)
}

#[cfg(test)]
mod tests {
    use super::parse_listen;
    use clap::Parser;

    /// Numbers out of range or not numbers at all are said in words, not
    /// as Rust's parse errors or range syntax.
    #[test]
    fn numbers_are_refused_in_words() {
        let refused = |args: &[&str]| {
            let err = super::Cli::try_parse_from(args).unwrap_err().to_string();
            assert!(!err.contains("digit") && !err.contains(".."), "{err}");
            err
        };
        let err = refused(&["colony", "submit", "echo", "{}", "--priority", "abc"]);
        assert!(err.contains("'abc' for '--priority <PRIORITY>': a whole number from -2147483648 to 2147483647 is needed"), "{err}");
        let err = refused(&[
            "colony",
            "submit",
            "echo",
            "{}",
            "--priority",
            "99999999999",
        ]);
        assert!(err.contains("a whole number from -2147483648"), "{err}");
        let err = refused(&["colony", "events", "--task", "-1"]);
        assert!(err.contains("a whole number from 0 is needed"), "{err}");
        for (given, why) in [
            ("-1s", "cannot be negative"),
            ("5", "it has no unit"),
            ("1x", "it is not a duration"),
        ] {
            let err = refused(&["colony", "submit", "echo", "{}", "--backoff", given]);
            assert!(
                err.contains(why) && err.contains("e.g. 500ms, 10s, 5m"),
                "{err}"
            );
        }
        let err = refused(&["colony", "submit", "echo", "{}", "--max-attempts", "1001"]);
        assert!(
            err.contains("a whole number from 1 to 1000 is needed"),
            "{err}"
        );
        let cli =
            super::Cli::try_parse_from(["colony", "submit", "echo", "{}", "--priority", "-5"])
                .unwrap();
        assert!(format!("{cli:?}").contains("priority: -5"));
    }

    /// `--listen localhost:7070` was refused with the standard library's
    /// "invalid socket address syntax", the README browsing localhost.
    #[test]
    fn listen_addresses_take_names_and_say_what_is_wrong() {
        assert_eq!(
            parse_listen("127.0.0.1:7070").unwrap().to_string(),
            "127.0.0.1:7070"
        );
        assert_eq!(
            parse_listen("[::1]:7070").unwrap().to_string(),
            "[::1]:7070"
        );
        let local = parse_listen("localhost:7070").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 7070, "{local}");
        let no_port = parse_listen("localhost").unwrap_err();
        assert!(
            no_port.contains("has no port") && no_port.contains("e.g. 127.0.0.1:7070"),
            "{no_port}"
        );
        let bad_port = parse_listen("127.0.0.1:80000").unwrap_err();
        assert!(bad_port.contains("\"80000\" is not a port"), "{bad_port}");
    }
}
