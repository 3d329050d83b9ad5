//! `colony show`: everything about one task, and the review and budget
//! wording the web pages share.

use super::*;

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
    /// The tasks its run spawned, held while in review.
    pub held_children: Vec<crate::task::NextSpec>,
    /// Its chain's root, token budget and spend.
    pub chain_budget: crate::queue::ChainBudget,
    /// The round of review it waits in (see [`Queue::review_round`]).
    pub review_round: Option<i64>,
}

impl TaskDetail {
    pub fn load(queue: &Queue, id: i64) -> Result<TaskDetail, QueueError> {
        // First: a task decided and back in review between these reads
        // shows the new round's content with the old round's number, so
        // a decision on it is refused rather than applied unread.
        let review_round = queue.review_round(id)?;
        Ok(TaskDetail {
            task: queue.get(id)?,
            events: queue.events(Some(id), 0, u32::MAX)?,
            logs: queue.logs(id)?,
            children: queue.children(id)?,
            usage: queue.usage(id)?,
            model_calls: queue.model_calls(id)?,
            effects: queue.effects(Some(id), None, u32::MAX)?,
            held_writes: queue.held_writes(id)?,
            held_children: queue.held_children(id)?,
            chain_budget: queue.chain_budget(id)?,
            review_round,
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
    value["held_children"] = json!(detail.held_children);
    value["review_round"] = json!(detail.review_round);
    value["effects"] = Value::Array(
        detail
            .effects
            .iter()
            .map(crate::cli::effects::effect_json)
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
        held_children,
        chain_budget,
        review_round,
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
    if let Some(round) = review_round {
        writeln!(
            out,
            "  review round {round}  (colony review {} approve|reject --round {round} decides on what is shown here, refused if it ran again since)",
            task.id
        )?;
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
    if !held_children.is_empty() {
        writeln!(out, "tasks spawned, held for review (created if approved):")?;
        for child in held_children {
            let chained = match child.next.len() {
                0 => String::new(),
                n => format!("  then {n} chained"),
            };
            writeln!(
                out,
                "  {}  priority {}{}  {}{chained}",
                printable(&child.agent),
                child.priority,
                if child.review { "  review" } else { "" },
                short(&child.payload.to_string(), 200)
            )?;
        }
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
        crate::cli::effects::print_effect_lines(&mut out, effects)?;
    }
    // Numbered: a run after a review's rejection, or a claim given back,
    // has the attempt number of the run before it.
    for (n, log) in logs.iter().enumerate() {
        writeln!(
            out,
            "log {} (attempt {}, {}):",
            n + 1,
            log.attempt,
            time(log.at)
        )?;
        // The agent's own output: printed, never interpreted.
        for line in log.text.lines() {
            writeln!(out, "  {}", printable(line))?;
        }
    }
    Ok(())
}

/// A held state write in `show --json`: `value` is the JSON written (null
/// for a delete, which `delete` tells from a set to JSON null);
/// `if_version` the set-if's version, null for none.
fn held_write_json(write: &crate::state::Write) -> Value {
    let value = write
        .value
        .as_deref()
        .map(|v| serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_string())));
    json!({
        "scope": write.scope.as_str(),
        "key": write.key,
        "value": value,
        "delete": write.value.is_none(),
        "if_version": write.if_version,
    })
}

fn row_id(row: &TaskRow) -> i64 {
    match row {
        Ok(task) => task.id,
        Err(bad) => bad.id,
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
