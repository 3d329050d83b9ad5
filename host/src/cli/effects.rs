//! `colony effects`: the outbox — what completed (or proposed) tasks asked
//! to send, whether it was sent, and a way to send a failed one again.

use super::args::Whole;
use std::io::Write as _;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::printable;
use super::{Cli, identity, open_existing_queue};
use crate::queue::EffectRow;

#[derive(Args, Debug)]
pub struct EffectsArgs {
    #[command(subcommand)]
    action: Option<EffectsAction>,
    /// Only effects in this state: proposed (waiting for review), pending,
    /// sending, sent or failed.
    #[arg(long, value_parser = ["proposed", "pending", "sending", "sent", "failed"])]
    state: Option<String>,
    /// Only this task's effects, in the order its run queued them.
    #[arg(long, value_parser = Whole::<i64>::new(1, i64::MAX), allow_negative_numbers = true)]
    task: Option<i64>,
    /// At most this many (1 to 10,000), newest first (one task's: its first).
    #[arg(long, default_value_t = 100, value_parser = Whole::<u32>::new(1, 10_000), allow_negative_numbers = true)]
    limit: u32,
}

#[derive(Subcommand, Debug)]
enum EffectsAction {
    /// Send a failed effect again (its attempts start over; same idempotency key).
    Retry {
        /// The effect's id, as `colony effects` lists it: 17 or #17.
        #[arg(value_parser = effect_id)]
        id: i64,
    },
}

/// An effect id as `colony effects` shows it, `#17`, or plain `17`.
fn effect_id(text: &str) -> Result<i64, String> {
    match text.strip_prefix('#').unwrap_or(text).parse::<i64>() {
        Ok(id) if id >= 1 => Ok(id),
        _ => Err(format!(
            "{text:?} is not an effect id (a number from 1, as `colony effects` lists it: 17 or #17)"
        )),
    }
}

pub fn effect_json(e: &EffectRow) -> serde_json::Value {
    json!({
        "id": e.id,
        "task_id": e.task_id,
        "seq": e.seq,
        "method": e.method,
        "url": e.url,
        "state": e.state,
        "attempts": e.attempts,
        "status": e.status,
        "error": e.error,
        "headers": e.headers,
        "body_bytes": e.body_bytes(),
        // The body as text when it is UTF-8 (JSON strings hold nothing else).
        "body": e.body.as_deref().and_then(|b| std::str::from_utf8(b).ok()),
        "body_is_text": e.body.as_deref().is_none_or(|b| std::str::from_utf8(b).is_ok()),
        "created_at": super::output::time(e.created_at),
        "updated_at": super::output::time(e.updated_at),
        "next_at": (e.state == "pending").then(|| super::output::time(e.next_at)),
    })
}

/// One line per effect; a proposed one also shows the start of its body,
/// so a reviewer approves actions, not just text.
pub fn print_effect_lines(out: &mut impl std::io::Write, effects: &[EffectRow]) -> Result<()> {
    for e in effects {
        let status = e.status.map_or_else(|| "-".to_string(), |s| s.to_string());
        writeln!(
            out,
            "  #{:<5} task {:<6} seq {:<3} {:<9} {:<6} {} (attempts {}, last status {status}{})",
            e.id,
            e.task_id,
            e.seq,
            e.state,
            e.method,
            printable(&e.url),
            e.attempts,
            e.error
                .as_deref()
                .map(|err| format!(", {}", printable(err)))
                .unwrap_or_default()
        )?;
        // The body comes from the agent: a carriage return or an escape
        // sequence in it would let one request show as another.
        if e.state == "proposed" {
            for (name, value) in &e.headers {
                writeln!(out, "         {}: {}", printable(name), printable(value))?;
            }
            if let Some((head, left)) = e.body_head() {
                writeln!(out, "         body ({} bytes):", e.body_bytes())?;
                for line in head.lines() {
                    writeln!(out, "           {}", printable(line))?;
                }
                if left > 0 {
                    writeln!(
                        out,
                        "           … {left} more bytes (`colony effects --task {} --json` shows the whole body)",
                        e.task_id
                    )?;
                }
            }
        }
    }
    Ok(())
}

pub fn run(cli: &Cli, args: &EffectsArgs) -> Result<()> {
    let mut queue = open_existing_queue(&cli.db, &identity("cli"))?;
    let mut out = std::io::stdout().lock();
    if let Some(EffectsAction::Retry { id }) = &args.action {
        queue.retry_effect(*id)?;
        if cli.json {
            writeln!(out, "{}", json!({"id": id, "state": "pending"}))?;
        } else {
            writeln!(out, "effect {id}: pending (it will be sent again)")?;
        }
        return Ok(());
    }
    if let Some(task) = args.task {
        queue.get(task)?; // an unknown id is bad input, not an empty outbox
    }
    let effects = queue.effects(args.task, args.state.as_deref(), args.limit)?;
    if cli.json {
        let list: Vec<_> = effects.iter().map(effect_json).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
    } else if effects.is_empty() {
        writeln!(out, "no effects")?;
    } else {
        print_effect_lines(&mut out, &effects)?;
    }
    // After the listing, where a person reading it looks last.
    if effects.len() == args.limit as usize {
        out.flush()?;
        say!(
            "note: showing {} {}; there may be more: raise --limit or filter by --state or --task",
            args.limit,
            if args.limit == 1 { "effect" } else { "effects" }
        );
    }
    Ok(())
}
