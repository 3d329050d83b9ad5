//! `/review`: tasks waiting for a person, with what they would commit.

use axum::extract::{Extension, State};
use maud::html;

use super::{PageResult, csrf_field, layout, pretty, short, time};
use crate::queue::{EffectRow, TaskRow};
use crate::task::State as TaskState;
use crate::web::Shared;
use crate::web::auth::Caller;

/// Most tasks the page lists (oldest first).
const MAX_LISTED: u32 = 50;
/// Longest result shown in full on this page (the task page has all of it).
const MAX_RESULT_CHARS: usize = 4_000;

pub async fn page(State(app): State<Shared>, Extension(caller): Extension<Caller>) -> PageResult {
    let (waiting, in_review): (Vec<(TaskRow, Vec<EffectRow>)>, u64) = app
        .store
        .run(None, |queue| {
            let mut out = Vec::new();
            for row in queue.in_review(MAX_LISTED)? {
                let effects = match &row {
                    Ok(task) => queue.effects(Some(task.id), Some("proposed"), 20)?,
                    Err(_) => Vec::new(),
                };
                out.push((row, effects));
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
                @for (row, effects) in &waiting {
                    @match row {
                        Err(bad) => article.review { h2 { a href={ "/tasks/" (bad.id) } { "#" (bad.id) } } p { "unreadable: " (bad.reason) } },
                        Ok(task) => article.review id={ "review-" (task.id) } {
                            h2 { a href={ "/tasks/" (task.id) } { "#" (task.id) } " " small { (task.agent) } }
                            p.muted { "since " (time(task.updated_at)) ", revision " (task.revisions) " of " (task.max_revisions) }
                            @if let Some(result) = &task.result {
                                pre.json.result { (short(&pretty(result), MAX_RESULT_CHARS)) }
                            }
                            @if !effects.is_empty() {
                                h3 { "Proposed effects (sent on approval)" }
                                ul { @for e in effects { li { code { (e.method) " " (e.url) } (super::effect_request(e)) } } }
                            }
                            @if caller.session().is_some() {
                                form.review method="post" action={ "/tasks/" (task.id) "/review" } {
                                    (csrf_field(&caller))
                                    input type="hidden" name="next" value="/review";
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
