//! `/agents`: every component in the agents directory, loaded or why not,
//! its limits and grants, and how its runs went over the last hour.

use axum::extract::{Extension, State};
use maud::html;

use super::{PageResult, layout};
use crate::runtime::AgentStatus;
use crate::web::Shared;
use crate::web::auth::Caller;

pub async fn page(State(app): State<Shared>, Extension(caller): Extension<Caller>) -> PageResult {
    let now = app.store.run(None, |queue| queue.now()).await?;
    let activity = app.metrics.activity(now);
    let mut agents = app.agents.lock().await;
    agents.rescan(&app.runtime).await;
    Ok(layout(
        "Agents",
        &caller,
        html! {
            main {
                h1 { "Agents" }
                p.muted { "Components in " code { (agents.dir().display()) } "; a changed file is loaded again when this page is read." }
                @if agents.entries().next().is_none() { p { "No agents: put " code { "NAME.wasm" } " files in the directory." } }
                table.agents {
                    thead { tr { th { "agent" } th { "status" } th { "limits" } th { "grants" } th { "last hour" } } }
                    tbody {
                        @for entry in agents.entries() {
                            tr {
                                td { a href={ "/tasks?agent=" (entry.name) } { (entry.name) } }
                                @match &entry.status {
                                    AgentStatus::Loaded(agent) => {
                                        td { span.state.complete { "loaded" } }
                                        td {
                                            "timeout " (humantime::format_duration(agent.limits.timeout)) ", "
                                            "memory " (agent.limits.memory_bytes >> 20) " MiB, "
                                            "fuel " (agent.limits.fuel.map(|f| f.to_string()).unwrap_or_else(|| "unmetered".into())) ", "
                                            "concurrency " (agent.limits.concurrency)
                                        }
                                        td {
                                            @if agent.limits.models.is_empty() && agent.limits.http.allowed.is_empty() { span.muted { "none" } }
                                            @if !agent.limits.models.is_empty() {
                                                "models: " (agent.limits.models.join(", "))
                                                @if let Some(budget) = agent.limits.token_budget { " (budget " (budget) " tokens)" }
                                                br;
                                            }
                                            @if !agent.limits.http.allowed.is_empty() {
                                                "http: " (agent.limits.http.allowed.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(", "))
                                            }
                                        }
                                    }
                                    AgentStatus::Broken(reason) => {
                                        td { span.state.failed { "broken" } }
                                        td colspan="2" { pre.error-message { (reason) } }
                                    }
                                }
                                td {
                                    @match activity.by_agent.get(&entry.name) {
                                        Some(m) if m.succeeded + m.failed + m.retried > 0 => {
                                            @let total = m.succeeded + m.failed + m.retried;
                                            (m.succeeded * 100 / total) "% of " (total) " runs succeeded"
                                        }
                                        _ => span.muted { "no runs" },
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    ))
}
