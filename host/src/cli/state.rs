//! `colony state`: operators see and fix agents' durable state. Writes are
//! applied at once and audited (`state_write` events) with the operator as
//! actor; bad JSON exits 2 and changes nothing.

use std::io::Write as _;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{Cli, bad, identity, open_queue};
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
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One entry: its JSON value and version.
    Get {
        #[command(flatten)]
        owner: Owner,
        key: String,
    },
    /// Write a JSON value (audited; the version goes up by one).
    Set {
        #[command(flatten)]
        owner: Owner,
        key: String,
        /// The value, as JSON (a string needs its quotes: '"text"').
        value: String,
    },
    /// Remove an entry (audited).
    Delete {
        #[command(flatten)]
        owner: Owner,
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
    #[arg(long, value_name = "ROOT_ID", value_parser = clap::value_parser!(i64).range(1..))]
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
}

fn entry_json(e: &Entry) -> Value {
    let value = serde_json::from_str(&e.value).unwrap_or(Value::String(e.value.clone()));
    json!({"key": e.key, "value": value, "version": e.version})
}

pub fn run(cli: &Cli, command: &StateCommand) -> Result<()> {
    let mut queue = open_queue(&cli.db, &identity("cli"))?;
    let mut out = std::io::stdout().lock();
    match command {
        StateCommand::List {
            owner,
            prefix,
            limit,
        } => {
            let (scope, name) = owner.scope_and_name()?;
            let entries = queue.state_scan(scope, &name, prefix, *limit)?;
            if cli.json {
                let list: Vec<Value> = entries.iter().map(entry_json).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else if entries.is_empty() {
                let under = match prefix.is_empty() {
                    true => String::new(),
                    false => format!(" under the prefix {prefix:?}"),
                };
                writeln!(out, "no {} state for {name}{under}", scope.as_str())?;
            } else {
                for e in &entries {
                    writeln!(out, "{:<40} v{:<6} {}", e.key, e.version, e.value)?;
                }
            }
        }
        StateCommand::Get { owner, key } => {
            let (scope, name) = owner.scope_and_name()?;
            let Some(entry) = queue.state_get(scope, &name, key)? else {
                return Err(bad(format!(
                    "no {} state key {key:?} for {name}",
                    scope.as_str()
                )));
            };
            if cli.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&entry_json(&entry))?
                )?;
            } else {
                writeln!(out, "{}", entry.value)?;
            }
        }
        StateCommand::Set { owner, key, value } => {
            let (scope, name) = owner.scope_and_name()?;
            let version = queue.state_write_by_operator(scope, &name, key, Some(value))?;
            // Stored all the same (state may be seeded before its agent is
            // deployed), but a misspelt name would leave it unread.
            if scope == Scope::Agent && !cli.agents.join(format!("{name}.wasm")).is_file() {
                say!(
                    "warning: no agent {name:?} in {}; the state is kept under that name for when it appears (check the spelling)",
                    cli.agents.display()
                );
            }
            print_written(&mut out, cli.json, key, version)?;
        }
        StateCommand::Delete { owner, key } => {
            let (scope, name) = owner.scope_and_name()?;
            let version = queue.state_write_by_operator(scope, &name, key, None)?;
            print_written(&mut out, cli.json, key, version)?;
        }
    }
    Ok(())
}

fn print_written(out: &mut impl std::io::Write, json: bool, key: &str, version: u64) -> Result<()> {
    if json {
        writeln!(out, "{}", json!({"key": key, "version": version}))?;
    } else if version == 0 {
        writeln!(out, "{key}: deleted")?;
    } else {
        writeln!(out, "{key}: version {version}")?;
    }
    Ok(())
}
