//! Printing: text tables for people, JSON for scripts. Task JSON uses the
//! queue's snake_case field names; times are RFC 3339 strings.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};

use super::usage::{model_calls_json, print_model_calls, print_spend, spend_json, usage_json};
use crate::orchestrator::DaemonSummary;
use crate::queue::{
    AuditEvent, EffectRow, ModelCallRow, Queue, QueueError, RunLog, SpendRow, Submitted, TaskRow,
    TaskUsage, UnreadableTask,
};
use crate::runtime::{AgentDir, AgentStatus};
use crate::task::{State, Task};

/// A stored time (ms since the Unix epoch) as RFC 3339; any value prints.
pub fn time(ms: i64) -> String {
    super::rfc3339::format(ms)
}

fn opt_time(ms: Option<i64>) -> Value {
    ms.map(|ms| Value::String(time(ms))).unwrap_or(Value::Null)
}

/// A task as the CLI's JSON shows it.
pub fn task_json(task: &Task) -> Value {
    json!({
        "id": task.id,
        "agent": task.agent,
        "state": task.state,
        "payload": task.payload,
        "priority": task.priority,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "revisions": task.revisions,
        "max_revisions": task.max_revisions,
        "review": task.review,
        "reviews": task.reviews,
        "reviewer": task.reviewer,
        "parent_id": task.parent_id,
        "depends_on": task.depends_on,
        "next_tasks": task.next_tasks,
        "result": task.result,
        "error": task.error,
        "feedback": task.feedback,
        "progress": task.progress,
        "key": task.idempotency_key,
        "timeout_ms": task.timeout_ms,
        "backoff_ms": task.backoff_ms,
        "run_at": time(task.run_at),
        "claimed_by": task.claimed_by,
        "created_at": time(task.created_at),
        "updated_at": time(task.updated_at),
        "finished_at": opt_time(task.finished_at),
    })
}

pub fn event_json(event: &AuditEvent) -> Value {
    json!({
        "id": event.id,
        "at": time(event.at),
        "task_id": event.task_id,
        "event": event.event,
        "from": event.from,
        "to": event.to,
        "actor": event.actor,
        "detail": event.detail,
    })
}

pub fn print_json(value: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// `text` safe to print to a terminal: control characters (an escape
/// sequence that would recolour or clear the screen, a newline that would
/// fake a row of a table) written as escapes, `\u{1b}`, `\n`. Keys,
/// progress and messages come from agents, which are not trusted.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    escape_controls(text, |c| c.is_control())
}

/// As [`printable`], for text shown over several lines (a trap's message and
/// its backtrace, a reviewer's note): newlines and tabs stay.
fn printable_lines(text: &str) -> std::borrow::Cow<'_, str> {
    escape_controls(text, |c| c.is_control() && c != '\n' && c != '\t')
}

/// JSON text safe to print to a terminal, and still the same JSON: the
/// control characters JSON lets a string hold raw (DEL and U+0080 to
/// U+009F, among them a one-byte escape sequence start) written as `\u00XX`.
pub fn printable_json(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| ('\u{7f}'..='\u{9f}').contains(&c)) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match ('\u{7f}'..='\u{9f}').contains(&c) {
            true => out.push_str(&format!("\\u{:04x}", c as u32)),
            false => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

fn escape_controls(text: &str, escaped: impl Fn(char) -> bool) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(&escaped) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match escaped(c) {
            true => out.extend(c.escape_default()),
            false => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `text` as one table cell: on one line (a trap's message spans several:
/// the summary, then the guest's backtrace), at most `max` characters,
/// printable.
fn short(text: &str, max: usize) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let text = printable(&text).into_owned();
    if text.chars().count() <= max {
        text
    } else {
        let cut: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// What a submit stored: with `--json` one object, or for a `--batch` an
/// array whatever its number of lines (a script reads one shape).
pub fn print_submitted(
    queue: &Queue,
    submitted: &[Submitted],
    batch: bool,
    json: bool,
) -> Result<()> {
    if json {
        // A known key stored nothing: said as the API says it.
        let tasks: Vec<Value> = submitted
            .iter()
            .map(|s| {
                let mut task = task_json(&queue.get(s.id)?);
                if s.existed {
                    task["existed"] = Value::Bool(true);
                }
                Ok::<_, crate::queue::QueueError>(task)
            })
            .collect::<Result<_, _>>()?;
        return print_json(&match (batch, tasks.as_slice()) {
            (false, [task]) => task.clone(),
            _ => Value::Array(tasks),
        });
    }
    let mut out = std::io::stdout().lock();
    for s in submitted {
        writeln!(out, "{}", s.id)?;
        if s.existed {
            say!(
                "note: task {} already existed with this idempotency key; nothing new was stored",
                s.id
            );
        }
    }
    Ok(())
}

/// A row that cannot be decoded, as JSON: its id and why.
fn unreadable_json(row: &UnreadableTask) -> Value {
    json!({"id": row.id, "unreadable": row.reason})
}

/// A listing as JSON: each row with its model usage (`usages[i]` belongs to `tasks[i]`).
pub fn tasks_json(tasks: &[TaskRow], usages: &[TaskUsage]) -> Value {
    let rows = tasks.iter().zip(usages).map(|(row, usage)| match row {
        Ok(task) => {
            let mut value = task_json(task);
            value["usage"] = usage_json(usage);
            value
        }
        Err(unreadable) => unreadable_json(unreadable),
    });
    Value::Array(rows.collect())
}

/// The model usage of each row of a listing.
pub fn usages_of(queue: &Queue, tasks: &[TaskRow]) -> Result<Vec<TaskUsage>, QueueError> {
    tasks
        .iter()
        .map(|row| match row {
            Ok(task) => queue.usage(task.id),
            Err(_) => Ok(Default::default()),
        })
        .collect()
}

/// A listing: each row with its model usage (`usages[i]` belongs to `tasks[i]`).
pub fn print_tasks(tasks: &[TaskRow], usages: &[TaskUsage], json: bool) -> Result<()> {
    if json {
        return print_json(&tasks_json(tasks, usages));
    }
    let mut out = std::io::stdout().lock();
    if tasks.is_empty() {
        // A header over nothing read like a listing cut short.
        say!("no tasks (of the filters given, if any)");
        return Ok(());
    }
    writeln!(
        out,
        "{:>6}  {:<12} {:<11} {:>8}  {:<24} error",
        "id", "agent", "state", "attempts", "updated"
    )?;
    for row in tasks {
        let t = match row {
            Ok(task) => task,
            Err(bad) => {
                writeln!(
                    out,
                    "{:>6}  (unreadable: {})",
                    bad.id,
                    short(&bad.reason, 100)
                )?;
                continue;
            }
        };
        let error = t
            .error
            .as_ref()
            .map(|e| format!("{}: {}", e.kind, short(&e.message, 60)))
            .unwrap_or_default();
        writeln!(
            out,
            "{:>6}  {:<12} {:<11} {:>8}  {:<24} {}",
            t.id,
            short(&t.agent, 12),
            t.state.as_str(),
            format!("{}/{}", t.attempts, t.max_attempts),
            time(t.updated_at),
            error
        )?;
    }
    Ok(())
}

pub fn moved_json(id: i64, to: State) -> Value {
    json!({"id": id, "state": to})
}

pub fn print_moved(id: i64, to: State, json: bool) -> Result<()> {
    if json {
        return print_json(&moved_json(id, to));
    }
    writeln!(std::io::stdout(), "task {id} is now {to}")?;
    Ok(())
}

pub fn print_cancelled(ids: &[i64], json: bool) -> Result<()> {
    if json {
        return print_json(&json!({"cancelled": ids}));
    }
    writeln!(
        std::io::stdout(),
        "cancelled {} task(s): {ids:?}",
        ids.len()
    )?;
    Ok(())
}

pub fn print_event_line(event: &AuditEvent) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let line = event_json(event).to_string();
    writeln!(out, "{}", printable_json(&line))?;
    Ok(())
}

mod agents;
mod show;
mod status;
pub use agents::*;
pub use show::*;
pub use status::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_agents_prints_without_driving_the_terminal() {
        assert_eq!(printable("plain ünï"), "plain ünï");
        assert_eq!(printable("a\u{1b}[2J\r\nb"), r"a\u{1b}[2J\r\nb");
        assert_eq!(printable_lines("one\n\ttwo\u{9b}"), "one\n\ttwo\\u{9b}");
        // JSON stays the same JSON: DEL and C1 inside strings as \u00XX.
        let json = "{\"k\":\"a\u{9b}31mb\u{7f}\"}";
        let shown = printable_json(json);
        assert_eq!(shown, r#"{"k":"a\u009b31mb\u007f"}"#);
        let back: Value = serde_json::from_str(&shown).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(json).unwrap());
    }
}
