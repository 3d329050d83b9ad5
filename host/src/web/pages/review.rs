//! `/review`: tasks waiting for a person, with what they would commit.

use axum::extract::{Extension, State};
use maud::html;

use super::{PageResult, csrf_field, layout, pretty, short, time};
use crate::queue::{EffectRow, TaskRow};
use crate::state::Write;
use crate::task::NextSpec;
use crate::task::State as TaskState;
use crate::web::Shared;
use crate::web::auth::Caller;

/// Most tasks the page lists (oldest first).
const MAX_LISTED: u32 = 50;
/// Longest result shown in full on this page (the task page has all of it).
const MAX_RESULT_CHARS: usize = 4_000;

/// What approving a task would release, beside its result.
#[derive(Default)]
struct Held {
    effects: Vec<EffectRow>,
    writes: Vec<Write>,
    children: Vec<NextSpec>,
    /// The round of review all this is of: the form decides on it.
    round: Option<i64>,
}

pub async fn page(State(app): State<Shared>, Extension(caller): Extension<Caller>) -> PageResult {
    let (waiting, in_review): (Vec<(TaskRow, Held)>, u64) = app
        .store
        .run(None, |queue| {
            let mut out = Vec::new();
            for (row, round) in queue.in_review(MAX_LISTED)? {
                let held = match &row {
                    // Read after the round (with the row): should the task
                    // move on meanwhile, a decision on it is refused.
                    Ok(task) => Held {
                        round,
                        effects: queue.effects(Some(task.id), Some("proposed"), 20)?,
                        writes: queue.held_writes(task.id)?,
                        children: queue.held_children(task.id)?,
                    },
                    Err(_) => Held::default(),
                };
                out.push((row, held));
            }
            let in_review = queue
                .counts()?
                .iter()
                .filter(|(_, state, _)| *state == TaskState::Review)
                .map(|(_, _, n)| n)
                .sum();
            Ok((out, in_review))
        })
        .await?;
    Ok(layout(
        "Review",
        &caller,
        html! {
            main data-live="poll" {
                h1 { "Waiting for review" }
                @if waiting.is_empty() { p.muted { "Nothing waits for review." } }
                // Said, or a reviewer takes the page for the whole queue.
                @if in_review > waiting.len() as u64 {
                    p.muted {
                        "The oldest " (waiting.len()) " of " (in_review) " tasks in review; the rest show as these are answered, and all are listed at "
                        a href="/tasks?state=review" { "tasks in review" } "."
                    }
                }
                @if !waiting.is_empty() && caller.session().is_none() {
                    p.muted { a href="/login?next=/review" { "Sign in" } " to approve or reject." }
                }
                @for (row, held) in &waiting {
                    @match row {
                        Err(bad) => article.review { h2 { a href={ "/tasks/" (bad.id) } { "#" (bad.id) } } p { "unreadable: " (bad.reason) } },
                        Ok(task) => article.review id={ "review-" (task.id) } {
                            h2 { a href={ "/tasks/" (task.id) } { "#" (task.id) } " " small { (task.agent) } }
                            p.muted { "since " (time(task.updated_at)) ", revision " (task.revisions) " of " (task.max_revisions) }
                            @if let Some(result) = &task.result {
                                pre.json.result { (short(&pretty(result), MAX_RESULT_CHARS)) }
                            }
                            @if !held.effects.is_empty() {
                                h3 { "Proposed effects (sent on approval)" }
                                ul { @for e in &held.effects { li { code { (e.method) " " (e.url) } (super::effect_request(e)) } } }
                            }
                            @if !held.writes.is_empty() {
                                h3 { "State writes (made on approval, in this order)" }
                                ul { @for w in &held.writes { li {
                                    (w.scope.as_str()) " " code { (w.key) }
                                    @match &w.value { Some(value) => { " set to " code { (short(value, 200)) } }, None => { " deleted" } }
                                } } }
                            }
                            @if !held.children.is_empty() {
                                h3 { "Tasks spawned (created on approval)" }
                                ul { @for child in &held.children { li {
                                    (child.agent) " " code { (short(&child.payload.to_string(), 200)) }
                                } } }
                            }
                            @if caller.session().is_some() {
                                form.review method="post" action={ "/tasks/" (task.id) "/review" } {
                                    (csrf_field(&caller))
                                    input type="hidden" name="next" value="/review";
                                    (super::round_field(held.round))
                                    label { "Note for the agent " textarea name="note" rows="2" {} }
                                    button type="submit" name="verdict" value="approve" { "Approve" }
                                    button.danger type="submit" name="verdict" value="reject" { "Reject" }
                                }
                            }
                        },
                    }
                }
            }
        },
    ))
}
