//! The `colony` command line: argument parsing and printing only. Every
//! command opens the queue (and, where it needs agents, the runtime) and
//! calls their public API.
//!
//! This file dispatches the commands and holds the small ones (list, show,
//! status, events, review, retry, cancel); `args` is the command line's
//! shape, `database` finds and opens the queue `--db` names, and the larger
//! commands have a module each (`submit`, `daemon`, `serve`, `bench`, ...).

/// `eprintln!` that cannot panic. With stderr gone (a pipe whose reader
/// quit: `colony daemon 2>&1 | head`), `eprintln!` panics; a lost message
/// is better than a lost command, let alone a daemon holding leases.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod args;
mod bench;
mod bench_capabilities;
mod builtin;
mod daemon;
mod database;
mod demo;
mod effects;
mod input;
mod loopback;
mod new;
pub(crate) mod output;
mod rfc3339;
mod serve;
mod state;
mod submit;
mod torture;
pub(crate) mod usage;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::models::{ModelsConfig, Providers};
use crate::queue::{ListFilter, QueueError};
use crate::runtime::{Agent, AgentDir, Runtime, RuntimeConfig};
use crate::task::State;

pub use args::{
    Cli, Command, DaemonArgs, MigrateArgs, SubmitArgs, SyncArg, Verdict,
    log_filter_silences_colony, parse_args,
};
use args::{MAX_CLAIM_BATCH, MAX_CONCURRENCY, parse_duration};
use daemon::{daemon, wait_for_signal};
use database::{
    SQLITE_SYNC, explain_read_only, migrate, note_own_database, postgres_db, sqlite_sync,
};
pub use database::{cache_dir, identity, open_existing_queue, open_queue, redacted};
pub use submit::parse_batch_line;
pub(crate) use submit::{missing_agent_warnings, parse_naming_field};
use submit::{shell_word, submit, without_bom};

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

/// The `--json` error of input refused before any command ran (the command
/// line itself): kind `bad_input`, exit status 2.
pub(crate) fn bad_input_json(message: &str) -> serde_json::Value {
    serde_json::json!({"error": message, "kind": "bad_input", "exit_code": 2})
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

pub async fn run(cli: Cli) -> Result<()> {
    let _ = SQLITE_SYNC.set(cli.sync.into());
    refuse_a_missing_config(&cli)?;
    crate::models::remember_provider_keys_of(cli.config_path());
    run_command(&cli)
        .await
        .map_err(|e| explain_read_only(&cli.db, e))
}

async fn run_command(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Submit(args) => submit(cli, args).await,
        Command::List {
            state,
            agent,
            limit,
            before,
        } => {
            let queue = open_existing_queue(&cli.db, &identity("cli"))?;
            let tasks = queue.list(&ListFilter {
                state: *state,
                agent: agent.clone(),
                limit: Some(*limit),
                before: *before,
            })?;
            let usages = output::usages_of(&queue, &tasks)?;
            output::print_tasks(&tasks, &usages, cli.json)?;
            // After the listing, where a person reading it looks last.
            if let Some(last) = tasks.last().filter(|_| tasks.len() == *limit as usize) {
                let last = match last {
                    Ok(task) => task.id,
                    Err(unreadable) => unreadable.id,
                };
                let tasks = if *limit == 1 { "task" } else { "tasks" };
                say!(
                    "note: showing {limit} {tasks}; there may be more: the next page with --before {last}, or raise --limit, or filter by --state or --agent"
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
        Command::Review {
            id,
            verdict,
            note,
            round,
        } => {
            let mut queue = open_existing_queue(&cli.db, &identity("cli"))?;
            let to = match verdict {
                Verdict::Approve => queue.approve_round(*id, note.as_deref(), *round)?,
                Verdict::Reject => queue.reject_round(
                    *id,
                    note.as_deref().unwrap_or("rejected without a note"),
                    *round,
                )?,
            };
            output::print_moved(*id, to, cli.json)?;
            if matches!(verdict, Verdict::Approve) && to != State::Complete {
                // Not 0: `colony review N approve && deploy` must not go on.
                let task = queue.get(*id)?;
                bail!(QueueError::NotNow(format!(
                    "the approval of task {id} did not take{}",
                    output::approval_did_not_take(&task)
                )));
            }
            Ok(())
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
            let agents = load_agents_to_list(cli).await?;
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
            let missing = new::missing_toolchain(args.lang);
            if cli.json {
                return output::print_json(&serde_json::json!({
                    "created": dir,
                    "build": build,
                    "toolchain_missing": missing,
                }));
            }
            println!("created {}", dir.display());
            println!("\nNext:");
            println!("  cd {}", dir.display());
            println!("  {build}");
            println!(
                "  (then copy the component to your colony's {} folder; see README.md)",
                cli.agents.display()
            );
            if let Some(missing) = missing {
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
            // The demo recreates a queue of its own at each run: it must not
            // be pointed at one that holds work.
            if cli.db != Path::new("colony.db") {
                tracing::warn!(
                    "the demo keeps its own queue in {}; --db (or COLONY_DB) {} is not used",
                    args.dir.join("colony.db").display(),
                    cli.db.display()
                );
            }
            if demo::demo(args, &cli.agents, load_models(cli)?, cli.json).await? {
                Ok(())
            } else {
                bail!("the demo did not end as expected (see above)")
            }
        }
    }
}

/// A manifest that grants an alias the configuration lacks: its calls will
/// be refused as not granted, which the operator should hear about now.
fn warn_about_ungranted_models(agent: &Agent, runtime: &Runtime, config: &Path) {
    for alias in runtime.unconfigured_models(&agent.limits.models) {
        say!(
            "warning: agent {} is granted the model alias {alias:?}, which {} does not configure; its calls will be refused",
            agent.name,
            config.display()
        );
    }
}

impl Cli {
    /// The operator's configuration file: `--config`, else `colony.toml`.
    pub fn config_path(&self) -> &Path {
        self.config.as_deref().unwrap_or(Path::new("colony.toml"))
    }
}

/// A configuration named by `--config` or COLONY_CONFIG must exist, for
/// every command that could read it (all but `init`, which writes it): a
/// mistyped name was ignored by the commands that load no models, which
/// then said nothing of it.
fn refuse_a_missing_config(cli: &Cli) -> Result<()> {
    match &cli.config {
        Some(config) if !config.exists() && !matches!(cli.command, Command::Init { .. }) => {
            Err(bad(format!(
                "--config {} (or COLONY_CONFIG): no such file",
                config.display()
            )))
        }
        _ => Ok(()),
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
    models_of(config)
}

/// For the commands an operator checks a host with (`status`, `agents`):
/// a configuration a daemon would refuse to start with is said there (it
/// was found only when the daemon failed to start).
fn warn_about_a_broken_config(cli: &Cli) {
    if let Err(e) = load_models(cli) {
        say!("warning: {e:#}; `colony daemon` refuses to start until it is fixed");
    }
}

/// The model providers the configuration at `config` declares: `None`
/// when it declares none or does not exist.
fn models_of(config: &Path) -> Result<Option<Arc<Providers>>> {
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
    if dir.exists() && !dir.is_dir() {
        // A folder that does not exist yet may appear (a daemon loads
        // what comes); a file in its place will not become one.
        return Err(bad(format!(
            "--agents {} (or COLONY_AGENTS): that is a file; give the folder that holds the agents' components",
            dir.display()
        )));
    }
    let mut agents = AgentDir::new(dir);
    if !dir.exists() {
        tracing::warn!(
            "the agents directory {} does not exist; no agent is loaded until it does",
            dir.display()
        );
    }
    // A first load compiles each component (an interpreted one for 10-15
    // s): said when it takes a while, rather than a silent minute before
    // a daemon says it started.
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
    agents.rescan(&runtime).await;
    slow_note.abort();
    Ok((Arc::new(runtime), agents))
}

/// How long loading the agents may take before a note says why.
const SLOW_LOAD_NOTE_AFTER: Duration = Duration::from_secs(2);

// ----- status, events ------------------------------------------------------------

async fn status(cli: &Cli) -> Result<()> {
    // Also before anything was submitted (just after `colony init`): the
    // counts of an empty queue, said so, with no file created there.
    let report = match open_existing_queue(&cli.db, &identity("cli")) {
        Ok(queue) => output::StatusReport::load(&queue)?,
        Err(e) if matches!(e.downcast_ref::<QueueError>(), Some(QueueError::Missing(_))) => {
            say!("note: {e:#}; the counts below are of an empty queue");
            output::StatusReport::missing(format!("{e:#}"))
        }
        Err(e) => return Err(e),
    };
    let agents = load_agents_to_list(cli).await?;
    output::print_status(&report, &agents, cli.json)
}

/// The agents folder as `agents` and `status` list it, with what a daemon
/// would warn of at start: a configuration it would refuse, and model
/// aliases a manifest grants that the configuration does not declare (a
/// typo there was said by the daemon only, the listing showing the agent
/// plainly loaded).
async fn load_agents_to_list(cli: &Cli) -> Result<AgentDir> {
    let models = load_models(cli).ok().flatten();
    let (runtime, agents) = load_agents(&cli.db, &cli.agents, 1, models).await?;
    warn_about_a_broken_config(cli);
    for entry in agents.entries() {
        if let crate::runtime::AgentStatus::Loaded(agent) = &entry.status {
            warn_about_ungranted_models(agent, &runtime, cli.config_path());
        }
    }
    Ok(agents)
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

#[cfg(test)]
mod tests {
    use super::log_filter_silences_colony;

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
