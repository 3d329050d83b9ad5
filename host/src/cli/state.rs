//! `colony state`: operators see and fix agents' durable state. Writes are
//! applied at once and audited (`state_write` events) with the operator as
//! actor; bad JSON exits 2 and changes nothing.

use super::args::Whole;
use std::io::Write as _;
use std::path::Path;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::output::{printable, printable_json};
use super::{Cli, bad, identity, open_existing_queue, open_queue};
use crate::state::{Entry, Scope};

#[derive(Subcommand, Debug)]
pub enum StateCommand {
    /// Entries of one agent's or one chain's state, in key order.
    List {
        #[command(flatten)]
        owner: Owner,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many entries (1 to 10,000); a full page says so on
        /// stderr.
        #[arg(long, default_value_t = 100, value_parser = Whole::<u32>::new(1, MAX_LIST as i64), allow_negative_numbers = true)]
        limit: u32,
    },
    /// One entry: its JSON value and version.
    Get {
        #[command(flatten)]
        owner: Owner,
        /// The key (up to 512 bytes).
        key: String,
    },
    /// Write a JSON value (audited; the version goes up by one).
    Set {
        #[command(flatten)]
        owner: Owner,
        /// The key (up to 512 bytes).
        key: String,
        /// The value, as JSON (a string needs its quotes: '"text"'), or
        /// `@FILE` to read it from a file, `-` from stdin (for values too
        /// long for a command line: up to 256 KiB).
        value: String,
    },
    /// Remove an entry (audited).
    Delete {
        #[command(flatten)]
        owner: Owner,
        /// The key (up to 512 bytes).
        key: String,
    },
}

/// Whose state: exactly one of `--agent NAME` and `--chain ID`.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct Owner {
    /// An agent's state (shared by all its tasks).
    #[arg(long)]
    agent: Option<String>,
    /// A chain's state, named by its root task's id.
    #[arg(long, value_name = "ROOT_ID", value_parser = Whole::<i64>::new(1, i64::MAX), allow_negative_numbers = true)]
    chain: Option<i64>,
}

impl Owner {
    fn scope_and_name(&self) -> Result<(Scope, String)> {
        match (&self.agent, self.chain) {
            (Some(agent), None) => {
                crate::queue::validate_agent_name("--agent", agent)
                    .map_err(|e| bad(e.to_string()))?;
                Ok((Scope::Agent, agent.clone()))
            }
            (None, Some(root)) => Ok((Scope::Chain, root.to_string())),
            _ => Err(bad("name exactly one of --agent NAME and --chain ID")),
        }
    }

    /// A chain is named by its first task: reading a later task's id, or
    /// one that does not exist, would find nothing and say so as if the
    /// chain had no state.
    fn check_chain(&self, queue: &crate::queue::Queue) -> Result<()> {
        match self.chain {
            Some(root) => Ok(queue.check_chain_root(root)?),
            None => Ok(()),
        }
    }
}

/// Most entries `state list` shows at once.
const MAX_LIST: u32 = 10_000;

/// An entry as `--json` shows it: the value exactly as stored (parsed and
/// printed again, a number past 2^53 or a repeated key would change).
#[derive(serde::Serialize)]
struct EntryJson<'a> {
    key: &'a str,
    value: Box<RawValue>,
    version: u64,
}

fn entry_json(e: &Entry) -> EntryJson<'_> {
    let value = RawValue::from_string(e.value.clone()).unwrap_or_else(|_| {
        // Stored values are checked JSON; show a damaged one as a string.
        RawValue::from_string(Value::String(e.value.clone()).to_string())
            .expect("a JSON string is JSON")
    });
    EntryJson {
        key: &e.key,
        value,
        version: e.version,
    }
}

/// The value a `state set` names: JSON, `@FILE` or `-` (stdin). Neither
/// `@` nor a lone `-` begins a JSON text, so the forms cannot be confused.
/// A file's or stdin's byte-order mark and trailing line break (editors add
/// both; JSON means neither) are not stored.
fn value_text(value: &str) -> Result<String> {
    let (file, what) = match value.strip_prefix('@') {
        _ if value == "-" => ("-", "value from stdin".to_string()),
        Some(file) => (file, format!("value @{file}")),
        None => return Ok(value.to_string()),
    };
    let limit = crate::state::MAX_VALUE_BYTES;
    let read = super::input::read_text(Path::new(file), &what, limit, "a state value's")?;
    let text = super::without_bom(read);
    Ok(text.trim_end_matches([' ', '\t', '\n', '\r']).to_string())
}

pub fn run(cli: &Cli, command: &StateCommand) -> Result<()> {
    // State may be seeded before any task ran; the rest reads or changes
    // what is there.
    if let StateCommand::Set { owner, key, value } = command {
        return set(cli, owner, key, value);
    }
    let mut queue = open_existing_queue(&cli.db, &identity("cli"))?;
    let mut out = std::io::stdout().lock();
    match command {
        StateCommand::List {
            owner,
            prefix,
            limit,
        } => {
            let (scope, name) = owner.scope_and_name()?;
            owner.check_chain(&queue)?;
            let entries = queue.state_scan(scope, &name, prefix, *limit)?;
            if cli.json {
                let list: Vec<EntryJson> = entries.iter().map(entry_json).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else if entries.is_empty() {
                let under = match prefix.is_empty() {
                    true => String::new(),
                    false => format!(" under the prefix {prefix:?}"),
                };
                writeln!(out, "no {} state for {name}{under}", scope.as_str())?;
            } else {
                for e in &entries {
                    let key = printable(&e.key);
                    let value = printable_json(&e.value);
                    writeln!(out, "{key:<40} v{:<6} {value}", e.version)?;
                }
            }
            // After the listing, where a person reading it looks last.
            if entries.len() == *limit as usize {
                out.flush()?;
                say!(
                    "note: showing the first {limit} entries; there may be more: raise --limit (at most {MAX_LIST}) or narrow --prefix"
                );
            }
        }
        StateCommand::Get { owner, key } => {
            let (scope, name) = owner.scope_and_name()?;
            owner.check_chain(&queue)?;
            let Some(entry) = queue.state_get(scope, &name, key)? else {
                return Err(crate::queue::QueueError::Missing(format!(
                    "no {} state key {key:?} for {name}",
                    scope.as_str()
                ))
                .into());
            };
            if cli.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&entry_json(&entry))?
                )?;
            } else {
                writeln!(out, "{}", printable_json(&entry.value))?;
            }
        }
        StateCommand::Set { .. } => unreachable!("set returned above"),
        StateCommand::Delete { owner, key } => {
            let (scope, name) = owner.scope_and_name()?;
            let version = queue.state_write_by_operator(scope, &name, key, None)?;
            print_written(&mut out, cli.json, key, version)?;
        }
    }
    Ok(())
}

/// `state set`: the one state command that may create the database, so
/// its input is checked before it is opened. Only for an agent's state
/// (seeded before any task): a chain's names a task, which a database yet
/// to be created cannot hold (a mistyped --db was created, then refused).
fn set(cli: &Cli, owner: &Owner, key: &str, value: &str) -> Result<()> {
    let (scope, name) = owner.scope_and_name()?;
    let value = value_text(value)?;
    crate::queue::check_operator_write(scope, &name, key, Some(&value))?;
    let mut queue = match scope {
        Scope::Agent => open_queue(&cli.db, &identity("cli"))?,
        Scope::Chain => open_existing_queue(&cli.db, &identity("cli"))?,
    };
    let version = queue.state_write_by_operator(scope, &name, key, Some(&value))?;
    // Stored all the same (state may be seeded before its agent is
    // deployed), but a misspelt name would leave it unread.
    if scope == Scope::Agent && !cli.agents.join(format!("{name}.wasm")).is_file() {
        say!(
            "warning: no agent {name:?} in {}; the state is kept under that name for when it appears (check the spelling)",
            cli.agents.display()
        );
    }
    print_written(&mut std::io::stdout().lock(), cli.json, key, version)
}

fn print_written(out: &mut impl std::io::Write, json: bool, key: &str, version: u64) -> Result<()> {
    if json {
        writeln!(out, "{:#}", json!({"key": key, "version": version}))?;
    } else if version == 0 {
        writeln!(out, "{}: deleted", printable(key))?;
    } else {
        writeln!(out, "{}: version {version}", printable(key))?;
    }
    Ok(())
}
