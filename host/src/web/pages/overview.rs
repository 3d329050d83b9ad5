//! `/`: the fleet at a glance.

use axum::extract::{Extension, State};
use maud::{Markup, html};

use super::{PageResult, age, layout, short, state_badge, time};
use crate::cli::output::StatusReport;
use crate::queue::TaskRow;
use crate::task::State as TaskState;
use crate::web::Shared;
use crate::web::auth::Caller;
use crate::web::metrics::{Activity, Minute};

struct Overview {
    report: StatusReport,
    failures: Vec<TaskRow>,
    now: i64,
    /// Agents with waiting tasks that no component here serves, and why
    /// (as `colony status` says it): their tasks looked merely slow.
    unserved: Vec<(String, String)>,
}

pub async fn page(State(app): State<Shared>, Extension(caller): Extension<Caller>) -> PageResult {
    // The chart is as current as the background reader of the audit trail
    // (a few seconds): the page does not wait for it.
    let mut overview = app
        .store
        .run(None, move |queue| {
            let failures = queue.recent_failures(8)?;
            Ok(Overview {
                report: StatusReport::load(queue)?,
                failures,
                now: queue.now()?,
                unserved: Vec::new(),
            })
        })
        .await?;
    let mut agents = app.agents.lock().await;
    agents.rescan(&app.runtime).await;
    let counts = &overview.report.counts;
    let mut named: Vec<&String> = counts.iter().map(|c| &c.0).collect();
    named.dedup();
    overview.unserved = named
        .into_iter()
        .filter_map(|agent| {
            let why = crate::cli::output::unserved(&agents, agent, counts)?;
            let why = match why.broken {
                true => format!("{} does not load: see Agents", why.component.display()),
                false => why.to_string(),
            };
            Some((agent.clone(), why))
        })
        .collect();
    drop(agents);
    let activity = app.metrics.activity(overview.now);
    Ok(layout("Overview", &caller, render(&overview, &activity)))
}

fn render(o: &Overview, activity: &Activity) -> Markup {
    let total = |state: TaskState| -> u64 {
        o.report
            .counts
            .iter()
            .filter(|c| c.1 == state)
            .map(|c| c.2)
            .sum()
    };
    let mut agents: Vec<&String> = o.report.counts.iter().map(|c| &c.0).collect();
    agents.dedup();
    let hour = activity
        .minutes
        .iter()
        .fold(Minute::default(), |mut sum, (_, m)| {
            sum.succeeded += m.succeeded;
            sum.failed += m.failed;
            sum.retried += m.retried;
            sum
        });
    html! {
        main data-live="poll" {
            h1 { "Overview" }
            section.cards {
                @for state in TaskState::ALL {
                    a.card href={ "/tasks?state=" (state.as_str()) } {
                        span.count { (total(state)) }
                        (state_badge(state))
                    }
                }
            }
            section {
                h2 { "The last hour" }
                p.muted {
                    (hour.succeeded) " runs succeeded, " (hour.failed) " failed for good, "
                    (hour.retried) " will be retried. "
                    @match o.report.oldest_ready {
                        Some(at) => { "The oldest ready task has waited " (age(o.now - at)) "." }
                        None => { "No task is waiting to be claimed." }
                    }
                }
                (chart(activity))
            }
            div.columns {
                section {
                    h2 { "Tasks by agent" }
                    table {
                        thead { tr { th { "agent" } @for state in TaskState::ALL { th.num { (state.as_str()) } } } }
                        tbody {
                            @for agent in &agents {
                                tr {
                                    td {
                                        a href={ "/tasks?agent=" (agent) } { (agent) }
                                        @if let Some((_, why)) = o.unserved.iter().find(|u| &u.0 == *agent) {
                                            br; small.unserved { (why) }
                                        }
                                    }
                                    @for state in TaskState::ALL {
                                        td.num { (o.report.counts.iter().find(|c| &c.0 == *agent && c.1 == state).map(|c| c.2).unwrap_or(0)) }
                                    }
                                }
                            }
                        }
                    }
                    @if agents.is_empty() { p.muted { "No tasks yet: " code { "colony submit AGENT '{}'" } } }
                }
                section {
                    h2 { "Leases" }
                    @if o.report.leases.is_empty() { p.muted { "No task is in progress." } }
                    @else {
                        table { thead { tr { th { "host" } th.num { "leases" } th { "last heartbeat" } th.num { "stale" } } }
                            tbody { @for held in &o.report.leases {
                                tr class=[(held.stale > 0).then_some("stale")] {
                                    td { (held.holder) }
                                    td.num { (held.count) }
                                    td { @match held.last_heartbeat_at { Some(at) => { (super::age(o.report.at - at)) " ago" } None => { "none yet" } } }
                                    td.num title="not renewed within the holder's --stale-after: most likely a stopped daemon's; any running daemon resets them" { (held.stale) }
                                }
                            } } }
                    }
                    h2 { "Model spend, last 24 hours" }
                    @if o.report.spend.is_empty() { p.muted { "No model calls." } }
                    @else {
                        table {
                            thead { tr { th { "agent" } th { "model" } th.num { "calls" } th.num { "refused" } th.num { "tokens in" } th.num { "tokens out" } th.num { "cost" } } }
                            tbody {
                                @for row in &o.report.spend {
                                    tr {
                                        td { (row.agent) } td { (row.model) } td.num { (row.usage.calls) } td.num { (row.usage.refused) }
                                        td.num { (row.usage.input_tokens) } td.num { (row.usage.output_tokens) }
                                        td.num { @match row.usage.cost_usd { Some(c) => { (crate::cli::usage::format_usd(c)) } None => { "—" } } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Recent failures" }
                @if o.failures.is_empty() { p.muted { "None." } }
                ul.failures {
                    @for row in &o.failures {
                        @match row {
                            Ok(task) => li {
                                a href={ "/tasks/" (task.id) } { "#" (task.id) } " " (task.agent) " "
                                @if let Some(e) = &task.error { span.kind { (e.kind) } " " span.muted { (short(&e.message, 120)) } }
                                " " span.muted { (time(task.updated_at)) }
                            },
                            Err(bad) => li { a href={ "/tasks/" (bad.id) } { "#" (bad.id) } " (unreadable)" },
                        }
                    }
                }
            }
        }
    }
}

/// Runs per minute over the last hour, as bars (succeeded below, retried
/// and failed stacked on top), in inline SVG.
fn chart(activity: &Activity) -> Markup {
    const W: f64 = 720.0;
    const H: f64 = 140.0;
    let peak = activity
        .minutes
        .iter()
        .map(|(_, m)| m.succeeded + m.failed + m.retried)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let bar = W / activity.minutes.len().max(1) as f64;
    let height = |n: u64| n as f64 / peak * (H - 20.0);
    html! {
        figure.chart {
            svg viewBox={ "0 0 " (W) " " (H) } preserveAspectRatio="none" role="img" aria-label="Runs per minute over the last hour" {
                line x1="0" y1=(H - 0.5) x2=(W) y2=(H - 0.5) class="axis" {}
                @for (i, (start, m)) in activity.minutes.iter().enumerate() {
                    @let x = i as f64 * bar;
                    @let ok = height(m.succeeded);
                    @let retried = height(m.retried);
                    @let failed = height(m.failed);
                    g {
                        title { (time(*start)) ": " (m.succeeded) " succeeded, " (m.retried) " retried, " (m.failed) " failed" }
                        rect.ok x=(x) y=(H - ok) width=(bar - 1.0) height=(ok) {}
                        rect.retried x=(x) y=(H - ok - retried) width=(bar - 1.0) height=(retried) {}
                        rect.failed x=(x) y=(H - ok - retried - failed) width=(bar - 1.0) height=(failed) {}
                    }
                }
            }
            figcaption {
                span.key.ok { "succeeded" } " " span.key.retried { "retried" } " " span.key.failed { "failed" }
                " — runs per minute over the last 60 minutes (peak " (peak as u64) ")"
            }
        }
    }
}
