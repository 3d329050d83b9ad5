//! `/tasks`: every task, newest first, filtered and paginated.

use axum::extract::{Extension, Query, State};
use maud::html;

use super::{PageError, PageResult, layout, short, state_badge, time};
use crate::queue::TEXT_SEARCH_WINDOW;
use crate::task::State as TaskState;
use crate::web::Shared;
use crate::web::api::{ListParams, query_error};
use crate::web::auth::Caller;

pub async fn page(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> PageResult {
    let Query(params) = params.map_err(|e| PageError::from(query_error(e)))?;
    let query = params.query(50)?;
    let page_query = query.clone();
    let page = app
        .store
        .run(None, move |queue| queue.task_page(&page_query))
        .await?;
    let value = |v: &Option<String>| v.clone().unwrap_or_default();
    // A limit the reader chose carries to the next page.
    let chosen_limit = params
        .limit
        .as_deref()
        .is_some_and(|l| !l.trim().is_empty());
    let older = page.next_before.map(|before| {
        format!(
            "/tasks?{}",
            super::super::api::next_page_query(&query, before, chosen_limit)
        )
    });
    Ok(layout(
        "Tasks",
        &caller,
        html! {
            main data-live="poll" {
                h1 { "Tasks" }
                form.filters method="get" action="/tasks" {
                    label { "State "
                        select name="state" {
                            option value="" { "any" }
                            @for state in TaskState::ALL {
                                option value=(state.as_str()) selected[query.state == Some(state)] { (state.as_str()) }
                            }
                        }
                    }
                    label { "Agent " input type="text" name="agent" value=(value(&params.agent)); }
                    label { "Text " input type="search" name="q" value=(value(&params.q)) placeholder="in payload, result or error"; }
                    button type="submit" { "Filter" }
                }
                @if query.text.is_some() {
                    p.muted { "A search looks through " (TEXT_SEARCH_WINDOW) " tasks at a time, newest first; " em { "Older" } " searches the next ones." }
                }
                table.tasks {
                    thead { tr { th.num { "id" } th { "agent" } th { "state" } th.num { "attempts" } th { "updated" } th { "error" } } }
                    tbody {
                        @for row in &page.tasks {
                            @match row {
                                Ok(t) => tr {
                                    td.num { a href={ "/tasks/" (t.id) } { "#" (t.id) } }
                                    td { (t.agent) }
                                    td { (state_badge(t.state)) }
                                    td.num { (t.attempts) "/" (t.max_attempts) }
                                    td { (time(t.updated_at)) }
                                    td { @if let Some(e) = &t.error { span.kind { (e.kind) } " " (short(&e.message, 80)) } }
                                },
                                Err(bad) => tr {
                                    td.num { a href={ "/tasks/" (bad.id) } { "#" (bad.id) } }
                                    td colspan="5" { "unreadable: " (short(&bad.reason, 160)) }
                                },
                            }
                        }
                    }
                }
                @if page.tasks.is_empty() { p.muted { "No task matches." } }
                @if let Some(older) = older { p { a.older href=(older) { "Older →" } } }
            }
        },
    ))
}
