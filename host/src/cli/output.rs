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

pub fn print_submitted(queue: &Queue, submitted: &[Submitted], json: bool) -> Result<()> {
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
        return print_json(&if tasks.len() == 1 {
            tasks[0].clone()
        } else {
            Value::Array(tasks)
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

/// Everything `colony show` prints about one task.
pub struct TaskDetail {
    pub task: Task,
    pub events: Vec<AuditEvent>,
    pub logs: Vec<RunLog>,
    pub children: Vec<TaskRow>,
    pub usage: TaskUsage,
    pub model_calls: Vec<ModelCallRow>,
    /// Its outbox, oldest first.
    pub effects: Vec<EffectRow>,
    /// The state writes it holds while in review.
    pub held_writes: Vec<crate::state::Write>,
    /// Its chain's root, token budget and spend.
    pub chain_budget: crate::queue::ChainBudget,
}

impl TaskDetail {
    pub fn load(queue: &Queue, id: i64) -> Result<TaskDetail, QueueError> {
        Ok(TaskDetail {
            task: queue.get(id)?,
            events: queue.events(Some(id), 0, u32::MAX)?,
            logs: queue.logs(id)?,
            children: queue.children(id)?,
            usage: queue.usage(id)?,
            model_calls: queue.model_calls(id)?,
            effects: queue.effects(Some(id), None, u32::MAX)?,
            held_writes: queue.held_writes(id)?,
            chain_budget: queue.chain_budget(id)?,
        })
    }
}

/// `colony show --json`.
pub fn task_detail_json(detail: &TaskDetail) -> Value {
    let mut value = task_json(&detail.task);
    value["usage"] = usage_json(&detail.usage);
    let chain = detail.chain_budget;
    value["chain"] =
        json!({"root_id": chain.root, "token_budget": chain.budget, "spent_tokens": chain.spent});
    value["model_calls"] = model_calls_json(&detail.model_calls);
    value["held_state"] = detail.held_writes.iter().map(held_write_json).collect();
    value["effects"] = Value::Array(
        detail
            .effects
            .iter()
            .map(super::effects::effect_json)
            .collect(),
    );
    value["events"] = Value::Array(detail.events.iter().map(event_json).collect());
    value["log"] = Value::Array(
        detail
            .logs
            .iter()
            .map(|l| json!({"attempt": l.attempt, "at": time(l.at), "text": l.text}))
            .collect(),
    );
    value["children"] = Value::Array(detail.children.iter().map(|c| json!(row_id(c))).collect());
    value
}

pub fn print_task_detail(detail: &TaskDetail, json: bool) -> Result<()> {
    if json {
        return print_json(&task_detail_json(detail));
    }
    let TaskDetail {
        task,
        events,
        logs,
        children,
        usage,
        model_calls,
        effects,
        held_writes,
        chain_budget,
    } = detail;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "task {}  agent {}  state {}",
        task.id, task.agent, task.state
    )?;
    writeln!(
        out,
        "  attempts     {}/{}  (revisions {}/{})",
        task.attempts, task.max_attempts, task.revisions, task.max_revisions
    )?;
    writeln!(out, "  priority     {}", task.priority)?;
    let created = time(task.created_at);
    match task.finished_at {
        Some(at) => writeln!(out, "  created      {created}  finished {}", time(at))?,
        None => writeln!(out, "  created      {created}")?,
    }
    if task.state == State::Pending {
        writeln!(out, "  runs at      {} at the earliest", time(task.run_at))?;
    }
    let timeout = task.timeout_ms.map_or_else(
        || "the agent's".to_string(),
        |ms| humantime::format_duration(Duration::from_millis(ms)).to_string(),
    );
    let backoff = humantime::format_duration(Duration::from_millis(task.backoff_ms));
    writeln!(out, "  timeout      {timeout}  backoff {backoff}")?;
    if let Some(budget) = chain_budget.budget {
        let whose = match chain_budget.root == task.id {
            true => "this task and every task chained or spawned from it".to_string(),
            false => format!(
                "the chain of task {}, this task among them",
                chain_budget.root
            ),
        };
        writeln!(out, "  budget       {budget} tokens for {whose}")?;
        writeln!(
            out,
            "               {}",
            budget_spent(budget, chain_budget.spent)
        )?;
    }
    if let Some(key) = &task.idempotency_key {
        writeln!(out, "  key          {}", printable(key))?;
    }
    writeln!(
        out,
        "  payload      {}",
        short(&task.payload.to_string(), 200)
    )?;
    if let Some(parent) = task.parent_id {
        writeln!(out, "  parent       {parent}")?;
    }
    if !task.depends_on.is_empty() {
        writeln!(out, "  depends on   {:?}", task.depends_on)?;
    }
    if !task.next_tasks.is_empty() {
        let names: Vec<&str> = task.next_tasks.iter().map(|n| n.agent.as_str()).collect();
        writeln!(out, "  next         {}", names.join(", "))?;
    }
    if !children.is_empty() {
        let ids: Vec<String> = children
            .iter()
            .map(|c| match c {
                Ok(c) => format!("{} ({}, {})", c.id, c.agent, c.state),
                Err(bad) => format!("{} (unreadable)", bad.id),
            })
            .collect();
        writeln!(out, "  children     {}", ids.join(", "))?;
    }
    if let Some(reviewer) = failed_reviewer(task, children) {
        writeln!(
            out,
            "  review       its reviewer, task {} ({}), failed: a person decides (colony review {} approve|reject)",
            reviewer.id, reviewer.agent, task.id
        )?;
    }
    if let Some(holder) = &task.claimed_by {
        writeln!(out, "  claimed by   {holder}")?;
    }
    if let Some(progress) = &task.progress {
        writeln!(out, "  progress     {}", printable(progress))?;
    }
    if let Some(feedback) = &task.feedback {
        writeln!(out, "  feedback     {}", printable_lines(feedback))?;
    }
    if let Some(error) = &task.error {
        // A trap's message runs over several lines (its backtrace): each
        // indented under the first.
        let message = printable_lines(&error.message).replace('\n', "\n               ");
        writeln!(out, "  error        {}: {message}", error.kind)?;
    }
    if let Some(result) = &task.result {
        writeln!(out, "  result       {}", short(&result.to_string(), 400))?;
    }
    writeln!(out, "events:")?;
    for e in events {
        let from = e.from.map(State::as_str).unwrap_or("(new)");
        writeln!(
            out,
            "  #{:<6} {}  {:<13} {:>11} -> {:<11} by {}  {}",
            e.id,
            time(e.at),
            e.event,
            from,
            e.to.as_str(),
            e.actor,
            printable_json(&e.detail.to_string())
        )?;
    }
    if !held_writes.is_empty() {
        writeln!(out, "state writes held for review (committed if approved):")?;
        for write in held_writes {
            let key = printable(&write.key);
            let what = match &write.value {
                Some(value) => format!("= {}", short(value, 200)),
                None => "deleted".to_string(),
            };
            let condition = match write.if_version {
                Some(0) => " (set-if: only if absent)".to_string(),
                Some(version) => format!(" (set-if: only at version {version})"),
                None => String::new(),
            };
            writeln!(out, "  {} {key} {what}{condition}", write.scope.as_str())?;
        }
    }
    print_model_calls(
        &mut out,
        usage,
        model_calls,
        task.state == State::InProgress,
    )?;
    if !effects.is_empty() {
        writeln!(out, "effects:")?;
        super::effects::print_effect_lines(&mut out, effects)?;
    }
    for log in logs {
        writeln!(out, "log of attempt {} ({}):", log.attempt, time(log.at))?;
        // The agent's own output: printed, never interpreted.
        for line in log.text.lines() {
            writeln!(out, "  {}", printable(line))?;
        }
    }
    Ok(())
}

/// A held state write in `show --json`: `value` is the JSON written, null
/// for a delete; `if_version` the set-if's version, null for none.
fn held_write_json(write: &crate::state::Write) -> Value {
    let value = write
        .value
        .as_deref()
        .map(|v| serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_string())));
    json!({
        "scope": write.scope.as_str(),
        "key": write.key,
        "value": value,
        "if_version": write.if_version,
    })
}

fn row_id(row: &TaskRow) -> i64 {
    match row {
        Ok(task) => task.id,
        Err(bad) => bad.id,
    }
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

/// `colony agents --json`.
pub fn agents_json(agents: &AgentDir) -> Value {
    Value::Array(
        agents
            .entries()
            .map(|e| match &e.status {
                AgentStatus::Loaded(agent) => json!({
                    "name": e.name,
                    "path": e.path.to_string_lossy(),
                    "loaded": true,
                    "limits": {
                        "timeout": humantime::format_duration(agent.limits.timeout).to_string(),
                        "memory_bytes": agent.limits.memory_bytes,
                        "fuel": agent.limits.fuel,
                        "concurrency": agent.limits.concurrency,
                        "log_bytes": agent.limits.log_bytes,
                        "read_only_dir": agent.limits.read_only_dir.as_deref().map(Path::to_string_lossy),
                    },
                    "grants": grants_json(&agent.limits),
                }),
                AgentStatus::Broken(reason) => {
                    json!({"name": e.name, "path": e.path.to_string_lossy(), "loaded": false, "reason": reason})
                }
            })
            .chain(agents.stray_files().into_iter().map(|(path, why)| {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                json!({"name": name, "path": path.to_string_lossy(), "loaded": false, "stray": true, "reason": why})
            }))
            .collect(),
    )
}

/// What a loaded agent may reach beyond its sandbox: models and budget,
/// hosts, the origins its secrets go to (never their values), HTTP limits.
fn grants_json(limits: &crate::runtime::Limits) -> Value {
    let http = &limits.http;
    json!({
        "models": limits.models.to_vec(),
        "token_budget": limits.token_budget,
        "allowed_hosts": http.allowed.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "secrets": http.secrets.iter().map(|s| {
            let (origin, header) = s.target();
            json!({"origin": origin, "header": header})
        }).collect::<Vec<_>>(),
        "http_timeout": humantime::format_duration(http.timeout).to_string(),
        "http_max_response_bytes": http.max_response_bytes,
        "http_max_requests": http.max_requests,
        "effect_attempts": limits.effect_attempts,
    })
}

/// The grants of a loaded agent in a few words for its row (`colony agents`).
fn grants_text(limits: &crate::runtime::Limits) -> String {
    let mut parts = Vec::new();
    if !limits.models.is_empty() {
        let budget = limits
            .token_budget
            .map(|b| format!(" (budget {b} tokens)"))
            .unwrap_or_default();
        parts.push(format!("models {}{budget}", limits.models.join(", ")));
    }
    let http = &limits.http;
    if !http.allowed.is_empty() {
        let hosts: Vec<String> = http.allowed.iter().map(ToString::to_string).collect();
        let secrets = match http.secrets.len() {
            0 => String::new(),
            n => format!(" (secrets for {n} origin{})", if n == 1 { "" } else { "s" }),
        };
        parts.push(format!("http {}{secrets}", hosts.join(", ")));
        if limits.effect_attempts != crate::effects::DEFAULT_DELIVERY_ATTEMPTS {
            parts.push(format!("effects tried {} times", limits.effect_attempts));
        }
    }
    match parts.is_empty() {
        true => String::new(),
        false => format!("; {}", parts.join("; ")),
    }
}

/// The first line of a message, shortened, with a pointer to the rest: a
/// table row stays one row (the full text is in `--json`).
fn one_line(text: &str, max: usize) -> String {
    let mut lines = text.trim().lines();
    let first = lines.next().unwrap_or_default().trim_end();
    let mut line = short(first, max);
    if lines.next().is_some() || first.chars().count() > max {
        line.push_str(" (more with --json)");
    }
    line
}

pub fn print_agents(agents: &AgentDir, json: bool) -> Result<()> {
    if json {
        return print_json(&agents_json(agents));
    }
    let mut out = std::io::stdout().lock();
    let stray = agents.stray_files();
    if agents.entries().next().is_none() && stray.is_empty() {
        writeln!(out, "no agents in {}", agents.dir().display())?;
    }
    // One column for the names, as wide as the longest (at least 14).
    let names: Vec<String> = stray
        .iter()
        .map(|(path, _)| {
            path.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let width = agents
        .entries()
        .map(|e| e.name.chars().count())
        .chain(names.iter().map(|n| n.chars().count()))
        .fold(14, usize::max);
    for e in agents.entries() {
        match &e.status {
            AgentStatus::Loaded(agent) => writeln!(
                out,
                "{:<width$} loaded   timeout {}, memory {} MiB, fuel {}, concurrency {}, log {} KiB{}{}",
                e.name,
                humantime::format_duration(agent.limits.timeout),
                agent.limits.memory_bytes >> 20,
                agent
                    .limits
                    .fuel
                    .map(|f| f.to_string())
                    .unwrap_or_else(|| "unmetered".into()),
                agent.limits.concurrency,
                agent.limits.log_bytes >> 10,
                agent
                    .limits
                    .read_only_dir
                    .as_ref()
                    .map(|d| format!(", reads {}", d.display()))
                    .unwrap_or_default(),
                grants_text(&agent.limits)
            )?,
            AgentStatus::Broken(reason) => {
                writeln!(out, "{:<width$} BROKEN   {}", e.name, one_line(reason, 120))?
            }
        }
    }
    for (name, (_, why)) in names.iter().zip(&stray) {
        writeln!(out, "{name:<width$} IGNORED  {why}")?;
    }
    Ok(())
}

/// What `colony status` reports.
pub struct StatusReport {
    pub counts: Vec<(String, State, u64)>,
    pub oldest_ready: Option<i64>,
    pub leases: Vec<crate::queue::HeldLeases>,
    /// When it was read (queue clock, ms): the heartbeats' ages count from it.
    pub at: i64,
    pub spend: Vec<SpendRow>,
    /// The outbox by state (`pending`, `sending`, `sent`, `failed`, ...).
    pub effects: Vec<(String, u64)>,
    /// Why there is no queue to count, when the database does not exist
    /// (yet): said in the JSON too, where a script would otherwise read a
    /// mistyped --db as an empty, healthy queue.
    pub missing: Option<String>,
}

impl StatusReport {
    /// The report of a queue whose database does not exist: `why`.
    pub fn missing(why: String) -> StatusReport {
        StatusReport {
            counts: Vec::new(),
            oldest_ready: None,
            leases: Vec::new(),
            at: crate::queue::now_ms(),
            spend: Vec::new(),
            effects: Vec::new(),
            missing: Some(why),
        }
    }

    /// Reads it; spend covers the last 24 hours.
    pub fn load(queue: &Queue) -> Result<StatusReport, QueueError> {
        let at = queue.now()?;
        Ok(StatusReport {
            counts: queue.counts()?,
            oldest_ready: queue.oldest_ready_at()?,
            leases: queue.leases_by_holder()?,
            at,
            spend: queue.spend_since(at - 24 * 3600 * 1000)?,
            effects: queue.effect_counts()?,
            missing: None,
        })
    }
}

/// The reviewer agent's task of a task waiting in review, when the latest
/// one failed for good: the verdict is then a person's, which `show` says
/// (it listed the reviewer among the children and nothing more).
pub fn failed_reviewer<'a>(task: &Task, children: &'a [TaskRow]) -> Option<&'a Task> {
    let reviewer = task
        .reviewer
        .as_deref()
        .filter(|_| task.state == State::Review)?;
    children
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .filter(|c| c.agent == reviewer)
        .max_by_key(|c| c.id)
        .filter(|c| c.state == State::Failed)
}

/// Why an approval did not take (its task went back for another revision,
/// or failed), said after "the approval ... did not take": the task's held
/// state writes had gone stale while it waited.
pub fn approval_did_not_take(task: &Task) -> String {
    match task.state {
        State::Failed => format!(
            " and the task failed: {}",
            task.error
                .as_ref()
                .map_or("its held state writes had gone stale", |e| &e.message)
        ),
        _ => format!(
            ": {} (revision {} of {})",
            task.feedback
                .as_deref()
                .unwrap_or("its held state writes had gone stale"),
            task.revisions,
            task.max_revisions
        ),
    }
}

/// What a chain has spent of its budget: "spent 1800: 800 over", with why
/// a budget can end over.
pub fn budget_spent(budget: u64, spent: u64) -> String {
    match spent.checked_sub(budget) {
        None => format!("spent {spent}, {} left", budget - spent),
        Some(0) => format!("spent {spent}, none left"),
        Some(over) => format!(
            "spent {spent}: {over} over (providers counted more than the host estimated before the calls)"
        ),
    }
}

/// How many leases a host holds and whether it still renews them: "2
/// (last heartbeat 3s ago)", with the stale ones named.
pub fn lease_health(held: &crate::queue::HeldLeases, now: i64) -> String {
    let heartbeat = match held.last_heartbeat_at {
        Some(at) => format!(
            "last heartbeat {} ago",
            humantime::format_duration(Duration::from_secs(((now - at).max(0) / 1000) as u64))
        ),
        None => "no heartbeat yet".to_string(),
    };
    match held.stale {
        0 => format!("{} ({heartbeat})", held.count),
        stale => format!(
            "{} ({heartbeat}; {stale} stale: not renewed within the holder's --stale-after, most likely a stopped daemon's, and reset by any running daemon)",
            held.count
        ),
    }
}

/// `colony status --json`.
pub fn status_json(report: &StatusReport, agents: &AgentDir) -> Value {
    let age_ms = report.oldest_ready.map(|t| (report.at - t).max(0));
    let mut by_state = serde_json::Map::new();
    let mut by_agent = serde_json::Map::new();
    for (agent, state, n) in &report.counts {
        let total = by_state.entry(state.as_str()).or_insert(json!(0));
        *total = json!(total.as_u64().unwrap_or(0) + n);
        by_agent.entry(agent.clone()).or_insert(json!({}))[state.as_str()] = json!(n);
    }
    json!({
        "by_state": by_state,
        "by_agent": by_agent,
        "oldest_ready_age_ms": age_ms,
        "leases": report.leases.iter().map(|h| json!({
            "holder": h.holder,
            "count": h.count,
            "last_heartbeat_at": h.last_heartbeat_at,
            "stale": h.stale,
        })).collect::<Vec<_>>(),
        "model_spend_24h": spend_json(&report.spend),
        "effects_by_state": report.effects.iter().map(|(state, n)| (state.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "agents": agents_json(agents),
        "missing_database": report.missing,
    })
}

pub fn print_status(report: &StatusReport, agents: &AgentDir, json: bool) -> Result<()> {
    if json {
        return print_json(&status_json(report, agents));
    }
    let StatusReport {
        counts,
        oldest_ready,
        leases,
        at,
        spend,
        effects,
        missing: _, // said on stderr before the counts
    } = report;
    let age_ms = oldest_ready.map(|t| (at - t).max(0));
    let mut out = std::io::stdout().lock();
    writeln!(out, "tasks by state:")?;
    for state in State::ALL {
        let n: u64 = counts.iter().filter(|c| c.1 == state).map(|c| c.2).sum();
        writeln!(out, "  {:<12} {n}", state.as_str())?;
    }
    writeln!(out, "tasks by agent:")?;
    let mut names: Vec<&String> = counts.iter().map(|c| &c.0).collect();
    names.dedup();
    for name in names {
        let parts: Vec<String> = counts
            .iter()
            .filter(|c| &c.0 == name)
            .map(|c| format!("{} {}", c.1, c.2))
            .collect();
        writeln!(out, "  {:<12} {}", name, parts.join(", "))?;
    }
    match age_ms {
        Some(ms) => writeln!(
            out,
            "oldest ready task waiting {}",
            humantime::format_duration(Duration::from_secs((ms / 1000) as u64))
        )?,
        None => writeln!(out, "no task is waiting to be claimed")?,
    }
    if leases.is_empty() {
        writeln!(out, "no leases held")?;
    }
    for held in leases {
        writeln!(
            out,
            "leases held by {}: {}",
            held.holder,
            lease_health(held, *at)
        )?;
    }
    if !effects.is_empty() {
        let parts: Vec<String> = effects
            .iter()
            .map(|(state, n)| format!("{n} {state}"))
            .collect();
        write!(out, "effects: {}", parts.join(", "))?;
        if effects.iter().any(|(state, _)| state == "failed") {
            write!(
                out,
                " (see `colony effects --state failed`; `colony effects retry ID` sends one again)"
            )?;
        }
        writeln!(out)?;
    }
    print_spend(&mut out, spend)?;
    drop(out);
    print_agents(agents, false)
}

pub fn print_daemon_summary(summary: &DaemonSummary, json: bool) -> Result<()> {
    if json {
        return print_json(&json!({
            "runs": summary.runs,
            "completed": summary.completed,
            "to_review": summary.to_review,
            "retried": summary.retried,
            "failed": summary.failed,
            "lost": summary.lost,
            "released": summary.released,
            "unstored": summary.unstored,
            "effects_sent": summary.effects_sent,
            "effects_failed": summary.effects_failed,
            "effects_released": summary.effects_released,
            "left_for_missing_agents": summary.left_for_missing_agents.iter().map(|(a, n)| json!({"agent": a, "tasks": n})).collect::<Vec<_>>(),
            "left_blocked_on_dependencies": summary.left_blocked.iter().map(|(a, n)| json!({"agent": a, "tasks": n})).collect::<Vec<_>>(),
            "effects_left_for_missing_agents": summary.effects_left_for_missing_agents.iter().map(|(a, n)| json!({"agent": a, "effects": n})).collect::<Vec<_>>(),
        }));
    }
    say!(
        "daemon done: {} runs, {} complete, {} to review, {} retried, {} failed, {} lost, {} released",
        summary.runs,
        summary.completed,
        summary.to_review,
        summary.retried,
        summary.failed,
        summary.lost,
        summary.released
    );
    if summary.unstored > 0 {
        say!(
            "  {} finished run(s) could not be stored (the database failed at shutdown): their leases expire and those tasks run again",
            summary.unstored
        );
    }
    if summary.effects_sent + summary.effects_failed + summary.effects_released > 0 {
        say!(
            "  effects: {} sent, {} failed for good{}{}",
            summary.effects_sent,
            summary.effects_failed,
            match summary.effects_failed {
                0 => "",
                _ => " (see `colony effects --state failed`)",
            },
            match summary.effects_released {
                0 => String::new(),
                n => format!(
                    ", {n} given back unanswered at shutdown (sent again by the next daemon)"
                ),
            }
        );
    }
    for (agent, n) in &summary.left_for_missing_agents {
        say!("  {n} task(s) left waiting for agent {agent:?}, which is not loaded");
    }
    for (agent, n) in &summary.left_blocked {
        say!(
            "  {n} task(s) of agent {agent:?} left waiting for dependencies that have not completed (in review, say, or waiting themselves; see `colony list --state pending`)"
        );
    }
    for (agent, n) in &summary.effects_left_for_missing_agents {
        say!(
            "  {n} effect(s) left undelivered for agent {agent:?}, which is not loaded (a daemon that loads it sends them: its allow-list and secrets are needed)"
        );
    }
    Ok(())
}

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
