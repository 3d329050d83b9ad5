//! `/tasks/{id}`: everything about one task, and the forms that act on it
//! (the same queue operations as `colony review`, `retry` and `cancel`).

use std::collections::BTreeMap;

use axum::extract::{Extension, Form, Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::{PageError, PageResult, csrf_field, layout, local_path, pretty, state_badge, time};
use crate::cli::output::TaskDetail;
use crate::queue::{ChainNode, MAX_CHAIN_NODES, StateWriteRow};
use crate::task::{State as TaskState, Task};
use crate::web::Shared;
use crate::web::api::{self, Verdict};
use crate::web::auth::Caller;

struct TaskPage {
    detail: TaskDetail,
    chain: Vec<ChainNode>,
    state_writes: Vec<StateWriteRow>,
    /// How many state writes it made in all (the page lists the first).
    state_writes_made: u64,
    last_event: i64,
}

pub async fn page(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> PageResult {
    let id = api::task_id(&id)?;
    let page = app
        .store
        .run(None, move |queue| {
            let detail = TaskDetail::load(queue, id)?;
            let (state_writes, state_writes_made) = queue.state_written_by(id, 100)?;
            Ok(TaskPage {
                last_event: detail.events.last().map_or(0, |e| e.id),
                chain: queue.chain_of(id)?,
                detail,
                state_writes,
                state_writes_made,
            })
        })
        .await?;
    let title = format!("Task {id}");
    Ok(layout(&title, &caller, render(&page, &caller)))
}

fn render(page: &TaskPage, caller: &Caller) -> Markup {
    let d = &page.detail;
    let t = &d.task;
    html! {
        main data-live="events" data-task=(t.id) data-since=(page.last_event) {
            h1 { "Task #" (t.id) " " small { (t.agent) } " " (state_badge(t.state)) }
            @if let Some(reviewer) = crate::cli::output::failed_reviewer(t, &d.children) {
                p.error-box { "Its reviewer, " a href={ "/tasks/" (reviewer.id) } { "task #" (reviewer.id) } " (" (reviewer.agent) "), failed: a person approves or rejects it." }
            }
            (actions(t, d.review_round, caller))
            @if let Some(e) = &t.error {
                section.error-box {
                    h2 { "Error: " span.kind { (e.kind) } }
                    pre.error-message { (e.message) }
                }
            }
            table.fields {
                tr { th { "attempts" } td { (t.attempts) " of " (t.max_attempts) } }
                tr { th { "revisions" } td { (t.revisions) " of " (t.max_revisions) } }
                tr { th { "priority" } td { (t.priority) } }
                tr { th { "created" } td { (time(t.created_at)) } }
                tr { th { "updated" } td { (time(t.updated_at)) } }
                @if let Some(at) = t.finished_at { tr { th { "finished" } td { (time(at)) } } }
                tr { th { "runs no earlier than" } td { (time(t.run_at)) } }
                tr { th { "timeout" } td { @match t.timeout_ms { Some(ms) => (humantime::format_duration(std::time::Duration::from_millis(ms))), None => "the agent's" } } }
                tr { th { "backoff" } td { (humantime::format_duration(std::time::Duration::from_millis(t.backoff_ms))) } }
                @if let Some(budget) = d.chain_budget.budget {
                    @let root = d.chain_budget.root;
                    tr { th { "token budget" } td {
                        (budget) " tokens for "
                        @if root == t.id { "this task and every task chained or spawned from it" }
                        @else { "the chain of " a href={ "/tasks/" (root) } { "#" (root) } ", this task among them" }
                        ": " (crate::cli::output::budget_spent(budget, d.chain_budget.spent))
                    } }
                }
                @if let Some(holder) = &t.claimed_by { tr { th { "claimed by" } td { (holder) } } }
                @if let Some(progress) = &t.progress { tr { th { "progress" } td { (progress) } } }
                @if let Some(feedback) = &t.feedback { tr { th { "feedback" } td { (feedback) } } }
                @if let Some(key) = &t.idempotency_key { tr { th { "key" } td { code { (key) } } } }
                @if let Some(reviewer) = &t.reviewer { tr { th { "reviewer" } td { (reviewer) } } }
                @if !t.depends_on.is_empty() {
                    tr { th { "depends on" } td { @for dep in &t.depends_on { a href={ "/tasks/" (dep) } { "#" (dep) } " " } } }
                }
            }
            div.columns {
                section { h2 { "Payload" } pre.json { (pretty(&t.payload)) } }
                section {
                    h2 { "Result" }
                    @match &t.result { Some(result) => pre.json.result { (pretty(result)) }, None => p.muted { "No result yet." } }
                }
            }
            (chain(&page.chain, t.id))
            section {
                h2 { "Events" }
                table.events {
                    thead { tr { th.num { "#" } th { "at" } th { "event" } th { "from → to" } th { "actor" } th { "detail" } } }
                    tbody {
                        @for e in &d.events {
                            tr {
                                td.num { (e.id) } td { (time(e.at)) } td { (e.event) }
                                td { (e.from.map(TaskState::as_str).unwrap_or("(new)")) " → " (e.to.as_str()) }
                                td { (e.actor) }
                                td { @if !e.detail.is_null() && e.detail != serde_json::json!({}) { code { (e.detail.to_string()) } } }
                            }
                        }
                    }
                }
            }
            (model_calls(d))
            (state_writes(page))
            (held_children(page))
            (next_tasks(page))
            @if !d.effects.is_empty() {
                section {
                    h2 { "Effects" }
                    table {
                        thead { tr { th.num { "#" } th { "request" } th { "state" } th.num { "attempts" } th { "status" } th { "headers and body" } } }
                        tbody {
                            @for e in &d.effects {
                                tr {
                                    td.num { (e.seq) } td { code { (e.method) " " (e.url) } } td { (e.state) }
                                    td.num { (e.attempts) }
                                    td { @if let Some(s) = e.status { (s) } @if let Some(err) = &e.error { " " span.muted { (err) } } }
                                    td { (super::effect_request(e)) }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Logs" }
                @if d.logs.is_empty() { p.muted { "No run has left a log." } }
                // Numbered: a run after a review's rejection, or a claim
                // given back, has the attempt number of the run before it.
                @for (n, log) in d.logs.iter().enumerate() {
                    h3 { "Log " (n + 1) " · attempt " (log.attempt) " " small.muted { (time(log.at)) } }
                    pre.log { (log.text) }
                }
            }
        }
    }
}

/// The forms for what can be done to the task now.
fn actions(t: &Task, round: Option<i64>, caller: &Caller) -> Markup {
    let here = format!("/tasks/{}", t.id);
    let unfinished = matches!(
        t.state,
        TaskState::Pending | TaskState::Ready | TaskState::InProgress | TaskState::Review
    );
    let revivable = matches!(t.state, TaskState::Failed | TaskState::Cancelled);
    html! {
        @if caller.session().is_none() {
            @if unfinished || revivable { p.muted { a href={ "/login?next=" (here) } { "Sign in" } " to review, retry or cancel." } }
        } @else {
            div.actions {
                @if t.state == TaskState::Review {
                    form.review method="post" action={ (here) "/review" } {
                        (csrf_field(caller))
                        input type="hidden" name="next" value=(here);
                        (super::round_field(round))
                        label { "Note for the agent " textarea name="note" rows="2" {} }
                        button type="submit" name="verdict" value="approve" { "Approve" }
                        button.danger type="submit" name="verdict" value="reject" { "Reject" }
                    }
                }
                @if revivable {
                    form.inline method="post" action={ (here) "/retry" } {
                        (csrf_field(caller))
                        button type="submit" { "Retry" }
                    }
                }
                @if unfinished {
                    form.inline method="post" action={ (here) "/cancel" } {
                        (csrf_field(caller))
                        input type="text" name="reason" placeholder="why (optional)";
                        button.danger type="submit" { "Cancel" }
                    }
                }
            }
        }
    }
}

/// The chain as a tree from its root, this task marked.
fn chain(nodes: &[ChainNode], current: i64) -> Markup {
    if nodes.len() <= 1 {
        return html! {};
    }
    let mut children: BTreeMap<Option<i64>, Vec<&ChainNode>> = BTreeMap::new();
    for node in nodes {
        children.entry(node.parent_id).or_default().push(node);
    }
    fn branch(
        node: &ChainNode,
        children: &BTreeMap<Option<i64>, Vec<&ChainNode>>,
        current: i64,
    ) -> Markup {
        html! {
            li {
                a href={ "/tasks/" (node.id) } class=[(node.id == current).then_some("current")] { "#" (node.id) }
                " " (node.agent) " " (state_badge(node.state))
                @if let Some(kids) = children.get(&Some(node.id)) {
                    ul { @for kid in kids { (branch(kid, children, current)) } }
                }
            }
        }
    }
    html! {
        section {
            h2 { "Chain" }
            ul.tree { (branch(&nodes[0], &children, current)) }
            @if nodes.len() >= MAX_CHAIN_NODES { p.muted { "The first " (MAX_CHAIN_NODES) " tasks of the chain." } }
        }
    }
}

fn model_calls(d: &TaskDetail) -> Markup {
    let u = &d.usage;
    if d.model_calls.is_empty() && u.reserved_tokens == 0 {
        return html! {};
    }
    html! {
        section {
            h2 { "Model calls" }
            p.muted {
                (crate::cli::usage::count_calls(u.calls)) " sent, "
                @if u.refused > 0 { (u.refused) " refused before the provider, " }
                (u.replayed) " replayed from the journal; "
                (u.input_tokens) " tokens in, " (u.output_tokens) " out"
                @if let Some(cost) = u.cost_usd { ", " (crate::cli::usage::format_usd(cost)) }
            }
            @if u.reserved_tokens > 0 { p.muted { (crate::cli::usage::reserved_note(u.reserved_tokens, d.task.state == TaskState::InProgress)) } }
            table {
                thead { tr { th.num { "run" } th.num { "attempt" } th.num { "#" } th { "model" } th { "status" } th.num { "in" } th.num { "out" } th.num { "cost" } th.num { "ms" } th { "" } } }
                tbody {
                    @for c in &d.model_calls {
                        tr {
                            td.num { (c.run) } td.num { (c.attempt) } td.num { (c.seq) } td { (c.model) } td { (c.status) }
                            td.num { (c.input_tokens) } td.num { (c.output_tokens) }
                            td.num { @if let Some(cost) = c.cost_usd.filter(|_| c.sent) { (crate::cli::usage::format_usd(cost)) } }
                            td.num { (c.ms) } td { @if c.replayed { "replayed" } }
                        }
                    }
                }
            }
        }
    }
}

/// The tasks its completion creates (`--next`), while it has not completed:
/// then they are its children, in the chain above.
fn next_tasks(page: &TaskPage) -> Markup {
    let task = &page.detail.task;
    if task.next_tasks.is_empty() || task.state == crate::task::State::Complete {
        return html! {};
    }
    html! {
        section {
            h2 { "Next tasks" }
            p.muted { "Created when it completes:" }
            pre.json { (serde_json::to_string_pretty(&task.next_tasks).unwrap_or_default()) }
        }
    }
}

/// What the run spawned, created only if the review approves.
fn held_children(page: &TaskPage) -> Markup {
    let children = &page.detail.held_children;
    if children.is_empty() {
        return html! {};
    }
    html! {
        section {
            h2 { "Spawned tasks" }
            p.muted { "Held until the review approves: created then." }
            pre.json { (serde_json::to_string_pretty(children).unwrap_or_default()) }
        }
    }
}

fn state_writes(page: &TaskPage) -> Markup {
    let held = &page.detail.held_writes;
    if page.state_writes.is_empty() && held.is_empty() {
        return html! {};
    }
    let more = page
        .state_writes_made
        .saturating_sub(page.state_writes.len() as u64);
    html! {
        section {
            h2 { "State writes" }
            @if !held.is_empty() {
                p.muted { "Held until the review approves, then made in this order:" }
                table {
                    thead { tr { th { "scope" } th { "key" } th { "write" } th { "only if" } } }
                    tbody {
                        @for w in held {
                            tr {
                                td { (w.scope.as_str()) }
                                td { code { (w.key) } }
                                td { @match &w.value { Some(value) => { "set to " code { (value) } }, None => { "delete" } } }
                                td { @match w.if_version { Some(0) => { "absent" }, Some(v) => { "at version " (v) }, None => { "" } } }
                            }
                        }
                    }
                }
            }
            @if !page.state_writes.is_empty() {
                table {
                    thead { tr { th { "scope" } th { "owner" } th { "key" } th.num { "version" } th { "value" } } }
                    tbody {
                        @for w in &page.state_writes {
                            tr {
                                td { (w.scope) } td { (w.owner) } td { code { (w.key) } } td.num { (w.version) }
                                td { @match (&w.value, w.version) {
                                    (_, 0) => { span.muted { "deleted" } },
                                    (Some(value), _) => { code { (value) } },
                                    (None, _) => { span.muted { "written over since" } },
                                } }
                            }
                        }
                    }
                }
                @if more > 0 {
                    p.muted { "And " (more) " more: its state_write events (under Events) list every one." }
                }
            }
        }
    }
}

#[derive(Deserialize)]
pub struct ActionForm {
    csrf: Option<String>,
    verdict: Option<String>,
    note: Option<String>,
    reason: Option<String>,
    next: Option<String>,
    /// The review round the page showed (see `Queue::review_round`).
    round: Option<i64>,
}

/// Checks the session and its CSRF token, then runs `act` as the operator
/// and goes back to the task (or the form's `next`).
async fn act(
    app: Shared,
    caller: Caller,
    id: String,
    form: ActionForm,
    act: impl FnOnce(&mut crate::queue::Queue, i64, &ActionForm) -> Result<(), crate::queue::QueueError>
    + Send
    + 'static,
) -> Response {
    if let Err(denied) = app.auth.may_change(&caller, form.csrf.as_deref()) {
        return PageError::from(api::ApiError::from(denied)).into_response();
    }
    let id = match api::task_id(&id) {
        Ok(id) => id,
        Err(e) => return PageError::from(e).into_response(),
    };
    let back = local_path(form.next.as_deref(), &format!("/tasks/{id}"));
    let result = app
        .store
        .run(caller.actor(), move |queue| act(queue, id, &form))
        .await;
    match result {
        Ok(()) => Redirect::to(&back).into_response(),
        Err(e) => PageError::from(e).into_response(),
    }
}

pub async fn review(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    let verdict = match form.verdict.as_deref() {
        Some("approve") => Verdict::Approve,
        Some("reject") => Verdict::Reject,
        other => {
            return PageError::from(api::ApiError::bad(format!(
                "invalid verdict {other:?}: approve or reject"
            )))
            .into_response();
        }
    };
    act(app, caller, id, form, move |queue, id, form| {
        api::apply_review(queue, id, verdict, form.note.as_deref(), form.round).map(|_| ())
    })
    .await
}

pub async fn retry(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    act(app, caller, id, form, |queue, id, _| {
        queue.retry(id).map(|_| ())
    })
    .await
}

pub async fn cancel(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    act(app, caller, id, form, |queue, id, form| {
        let reason = form
            .reason
            .as_deref()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .unwrap_or("cancelled by a user");
        queue.cancel(id, reason).map(|_| ())
    })
    .await
}
