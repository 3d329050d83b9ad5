//! `/metrics` and the overview's chart. The counters and histograms are
//! read off the audit trail and the model journal as they grow: the
//! server keeps a cursor in each and reads only the rows past it (by
//! primary key), so a scrape costs the same with a million tasks stored.
//! The gauges are read fresh at every scrape through the partial indexes.
//!
//! Counters start when the server starts, with the last hour's events
//! (Prometheus's `rate()` takes a restart as a counter reset).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::queue::{AgentEvent, ModelCharge, Queue, QueueError, TrailCursor};
use crate::task::{ErrorKind, Event, State};

/// Hands the rows a cursor moves over to `each`, a page at a time, up to
/// [`MAX_PER_CATCH_UP`]. A page that could not be read is read again next
/// time: the cursor moves only over pages handed on.
fn follow<T>(
    cursor: &mut TrailCursor,
    queue: &Queue,
    read: impl Fn(&Queue, i64, i64) -> Result<Vec<T>, QueueError>,
    mut each: impl FnMut(&[T]),
) -> Result<(), QueueError> {
    let mut moved = 0;
    loop {
        let before = cursor.clone();
        let page = cursor
            .advance(queue, PAGE)
            .and_then(|(from, to)| Ok((to - from, read(queue, from, to)?)));
        let (ids, rows) = match page {
            Ok(page) => page,
            Err(e) => {
                *cursor = before;
                return Err(e);
            }
        };
        each(&rows);
        moved += ids as usize;
        if (ids as usize) < PAGE as usize || moved >= MAX_PER_CATCH_UP {
            return Ok(());
        }
    }
}

/// The outbox's states (the `effects` table's CHECK), each a series of
/// `colony_effects` even when none is in it.
const EFFECT_STATES: [&str; 5] = ["proposed", "pending", "sending", "sent", "failed"];

/// Minutes of history the chart and the success rates cover.
pub const WINDOW_MINUTES: i64 = 60;
/// Rows read per query while catching up, and at most per catch-up (the
/// rest waits for the next one: a scrape never stalls on a huge backlog).
const PAGE: u32 = 5_000;
const MAX_PER_CATCH_UP: usize = 100_000;
/// Most events of the last hour read at start (a busy hour holds millions;
/// the chart then starts part way into it).
const MAX_BACKFILL: i64 = 300_000;
/// Tasks whose ready or claim time is remembered for the histograms; past
/// this (a backlog of millions) the oldest are not timed.
const MAX_TIMED_TASKS: usize = 200_000;

/// Most distinct agent names the metrics carry as labels. Agents name the
/// tasks they spawn, and a run spawning tasks for made-up agents would
/// otherwise add series to every per-agent family for as long as the
/// server runs (a scraper's memory and a dashboard's legend growing
/// without bound); names past these are counted under [`OTHER_AGENTS`].
const MAX_AGENT_LABELS: usize = 200;
const OTHER_AGENTS: &str = "_other";

/// Most distinct model aliases the metrics carry as labels, and the
/// longest. A call is recorded under the alias its agent asked for, also
/// when this host refused it for naming no alias configured here, so a
/// guest asking for made-up names (of any length) would otherwise add
/// series for as long as the server runs; the host's own aliases are at
/// most 64 characters. The rest count under [`OTHER_MODELS`].
const MAX_MODEL_LABELS: usize = 50;
const MAX_MODEL_LABEL_CHARS: usize = 64;
const OTHER_MODELS: &str = "_other";

/// The values admitted as one label's, in the order first seen: at most
/// `max` of them, each at most `longest` characters; the rest are `other`.
struct LabelValues {
    seen: std::collections::HashSet<String>,
    max: usize,
    longest: usize,
    other: &'static str,
}

impl LabelValues {
    fn new(max: usize, longest: usize, other: &'static str) -> LabelValues {
        LabelValues {
            seen: Default::default(),
            max,
            longest,
            other,
        }
    }

    fn label(&mut self, value: &str) -> String {
        if self.seen.contains(value) {
            return value.to_string();
        }
        if self.seen.len() < self.max && value.chars().count() <= self.longest {
            self.seen.insert(value.to_string());
            return value.to_string();
        }
        self.other.to_string()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    agent: String,
    outcome: String,
    error_kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    agent: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    agent: String,
    model: String,
    direction: String,
}

/// A model alias an agent's manifest grants and this host's configuration
/// declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelGrant {
    pub agent: String,
    pub alias: String,
    /// Whether the alias has prices, and so a cost counter.
    pub priced: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    agent: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HolderLabels {
    holder: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

type Seconds = Family<AgentLabels, Histogram, fn() -> Histogram>;

/// Runs finished in one minute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Minute {
    /// Completed, or sent to review.
    pub succeeded: u64,
    /// Failed for good.
    pub failed: u64,
    /// Failed with attempts left (retried after a backoff), or lost their lease.
    pub retried: u64,
}

/// What the overview shows of the last hour.
#[derive(Clone, Debug, Default)]
pub struct Activity {
    /// One entry per minute, oldest first: (the minute's start in ms, its runs).
    pub minutes: Vec<(i64, Minute)>,
    /// Per agent, its runs over the window.
    pub by_agent: BTreeMap<String, Minute>,
}

/// Where the tailer is in the trail, and what it remembers of tasks in flight.
#[derive(Default)]
struct Tail {
    trail: Option<TrailCursor>,
    /// The last event before the server started: the hour read back before
    /// it feeds the chart, not the Prometheus counters and histograms, which
    /// start at zero with the process (a restart is a counter reset to
    /// Prometheus; a counter that came back with the last hour's runs in it
    /// would count them twice).
    history_until: i64,
    calls: Option<TrailCursor>,
    ready_at: HashMap<i64, i64>,
    claimed_at: HashMap<i64, i64>,
    minutes: BTreeMap<i64, Minute>,
    agent_minutes: BTreeMap<(String, i64), Minute>,
}

pub struct Metrics {
    registry: Registry,
    runs: Family<RunLabels, Counter>,
    run_seconds: Seconds,
    wait_seconds: Seconds,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<ModelLabels, Counter<f64, AtomicU64>>,
    tasks: Family<TaskLabels, Gauge>,
    ready: Family<AgentLabels, Gauge>,
    leases: Family<HolderLabels, Gauge>,
    effects: Family<StateLabels, Gauge>,
    tail: Mutex<Tail>,
    agent_names: Mutex<LabelValues>,
    model_names: Mutex<LabelValues>,
    /// One catch-up at a time (the background reader, scrapes, pages).
    catching_up: Mutex<()>,
    /// One scrape at a time: each clears and refills the gauges.
    rendering: Mutex<()>,
}

fn seconds_histogram() -> Histogram {
    // 1 ms to ~9 h.
    Histogram::new(exponential_buckets(0.001, 4.0, 13))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("colony");
        let metrics = Metrics {
            runs: Family::default(),
            run_seconds: Family::new_with_constructor(seconds_histogram),
            wait_seconds: Family::new_with_constructor(seconds_histogram),
            tokens: Family::default(),
            cost: Family::default(),
            tasks: Family::default(),
            ready: Family::default(),
            leases: Family::default(),
            effects: Family::default(),
            tail: Mutex::new(Tail::default()),
            agent_names: Mutex::new(LabelValues::new(MAX_AGENT_LABELS, usize::MAX, OTHER_AGENTS)),
            model_names: Mutex::new(LabelValues::new(
                MAX_MODEL_LABELS,
                MAX_MODEL_LABEL_CHARS,
                OTHER_MODELS,
            )),
            catching_up: Mutex::new(()),
            rendering: Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "runs_finished",
            "Runs finished, by agent, outcome (the audit event: complete, await_review, retry_later, fail, lease_expired, release, cancel) and error kind",
            metrics.runs.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "From a task's claim to its run's outcome being stored",
            metrics.run_seconds.clone(),
        );
        registry.register(
            "claim_wait_seconds",
            "From a task becoming ready to its claim",
            metrics.wait_seconds.clone(),
        );
        registry.register(
            "model_tokens",
            "Model tokens charged, by agent, model alias and direction (input, output)",
            metrics.tokens.clone(),
        );
        registry.register(
            "model_cost_usd",
            "Model spend in US dollars, by agent and model alias",
            metrics.cost.clone(),
        );
        registry.register(
            "tasks",
            "Tasks stored, by agent and state",
            metrics.tasks.clone(),
        );
        registry.register(
            "ready_tasks",
            "Tasks ready to be claimed, by agent",
            metrics.ready.clone(),
        );
        registry.register(
            "leases",
            "Tasks in progress, by the host holding the lease",
            metrics.leases.clone(),
        );
        registry.register(
            "effects",
            "Effects in the outbox, by state",
            metrics.effects.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Reads the trail and the journal past the cursors. The first call
    /// starts an hour back (for the chart) and at the journal's end. The
    /// tail's lock is held only to count rows already read, never across a
    /// query: [`Metrics::activity`] takes it on the async runtime.
    pub fn catch_up(&self, queue: &Queue) -> Result<(), QueueError> {
        let _one_at_a_time = self.catching_up.lock().unwrap();
        let now = queue.now()?;
        let trail = self.tail.lock().unwrap().trail.take();
        let mut trail = match trail {
            Some(trail) => trail,
            None => {
                let last = queue.last_event_id()?;
                self.tail.lock().unwrap().history_until = last;
                TrailCursor::new(
                    queue
                        .event_id_before(now - WINDOW_MINUTES * 60_000)?
                        .max(last - MAX_BACKFILL),
                )
            }
        };
        let caught_up = follow(&mut trail, queue, Queue::events_with_agent, |events| {
            let mut tail = self.tail.lock().unwrap();
            for event in events {
                self.count(&mut tail, event);
            }
        });
        // The cursor stays where it got to, even when a read failed.
        self.tail.lock().unwrap().trail = Some(trail);
        caught_up?;
        // Taken only now: a failed read of the trail above must not lose it.
        let calls = self.tail.lock().unwrap().calls.take();
        let mut calls = match calls {
            Some(calls) => calls,
            None => TrailCursor::over_model_calls(queue.last_model_call_id()?),
        };
        let caught_up = follow(&mut calls, queue, Queue::model_charges_between, |charges| {
            charges.iter().for_each(|c| self.charge(c))
        });
        self.tail.lock().unwrap().calls = Some(calls);
        caught_up?;
        let cutoff = (now / 60_000) - WINDOW_MINUTES;
        let mut tail = self.tail.lock().unwrap();
        tail.minutes.retain(|minute, _| *minute > cutoff);
        tail.agent_minutes.retain(|(_, minute), _| *minute > cutoff);
        Ok(())
    }

    /// `agent` as a label (see [`MAX_AGENT_LABELS`]).
    fn agent_label(&self, agent: &str) -> String {
        self.agent_names.lock().unwrap().label(agent)
    }

    fn charge(&self, c: &ModelCharge) {
        // A call that charged nothing (refused, replayed) adds nothing, and
        // makes no series: a refused call is recorded under whatever alias
        // its agent asked for, and made-up ones would take the label slots
        // of the host's own (only those reach a provider and charge).
        if c.input_tokens == 0 && c.output_tokens == 0 && c.cost_usd.is_none_or(|usd| usd == 0.0) {
            return;
        }
        let agent = self.agent_label(&c.agent);
        let alias = self.model_names.lock().unwrap().label(&c.model);
        let model = |direction: &str| TokenLabels {
            agent: agent.clone(),
            model: alias.clone(),
            direction: direction.into(),
        };
        self.tokens
            .get_or_create(&model("input"))
            .inc_by(c.input_tokens);
        self.tokens
            .get_or_create(&model("output"))
            .inc_by(c.output_tokens);
        if let Some(cost) = c.cost_usd {
            let labels = ModelLabels {
                agent: agent.clone(),
                model: alias,
            };
            self.cost.get_or_create(&labels).inc_by(cost);
        }
    }

    fn count(&self, tail: &mut Tail, e: &AgentEvent) {
        let (event, agent) = (&e.event, &self.agent_label(&e.agent));
        let seconds = |from: i64| (event.at - from).max(0) as f64 / 1000.0;
        let live = event.id > tail.history_until;
        if event.event == "claim" {
            if let Some(ready) = tail.ready_at.remove(&event.task_id)
                && live
            {
                let labels = AgentLabels {
                    agent: agent.clone(),
                };
                self.wait_seconds
                    .get_or_create(&labels)
                    .observe(seconds(ready));
            }
            if tail.claimed_at.len() < MAX_TIMED_TASKS {
                tail.claimed_at.insert(event.task_id, event.at);
            }
            return;
        }
        if event.from == Some(State::Ready) {
            // Left ready without a claim (cancelled): no longer timed.
            tail.ready_at.remove(&event.task_id);
        }
        if event.to == State::Ready && tail.ready_at.len() < MAX_TIMED_TASKS {
            tail.ready_at.insert(event.task_id, event.at);
        }
        // A run ends when its task leaves in_progress; the events a run
        // records while it goes on (`model_call`, `http_request`) stay there.
        if event.from != Some(State::InProgress) || event.to == State::InProgress {
            return;
        }
        // A task claimed ahead and given back unstarted was no run.
        if event.detail.get("started") == Some(&serde_json::Value::Bool(false)) {
            tail.claimed_at.remove(&event.task_id);
            return;
        }
        let error_kind = event
            .detail
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("");
        let labels = RunLabels {
            agent: agent.clone(),
            outcome: event.event.clone(),
            error_kind: error_kind.to_string(),
        };
        if live {
            self.runs.get_or_create(&labels).inc();
        }
        if let Some(claimed) = tail.claimed_at.remove(&event.task_id)
            && live
        {
            let labels = AgentLabels {
                agent: agent.clone(),
            };
            self.run_seconds
                .get_or_create(&labels)
                .observe(seconds(claimed));
        }
        let minute = event.at / 60_000;
        let tally = |m: &mut Minute| match event.to {
            State::Complete | State::Review => m.succeeded += 1,
            State::Failed => m.failed += 1,
            State::Ready | State::Pending => m.retried += 1,
            _ => {}
        };
        tally(tail.minutes.entry(minute).or_default());
        tally(
            tail.agent_minutes
                .entry((e.agent.clone(), minute))
                .or_default(),
        );
    }

    /// An agent's completions, its runs' failures of every kind (retried
    /// and final), its lost leases, and its run and wait times read 0
    /// before their first count rather than appearing with it: Prometheus'
    /// increase() and rate() see nothing in a series' first sample, so the
    /// first batch of runs after a start went unseen, and so did the first
    /// crash (an alert on failures stayed quiet until a second one).
    fn start_at_zero(&self, agent: &str) {
        let run_failures = ErrorKind::ALL.into_iter().filter(|kind| {
            // Not a run's own failure: recorded by lease_expired, cancel
            // and reject events.
            !matches!(
                kind,
                ErrorKind::LeaseExpired | ErrorKind::Cancelled | ErrorKind::Rejected
            )
        });
        let retried = ErrorKind::ALL
            .into_iter()
            .filter(|kind| kind.is_retryable());
        let outcomes = [
            (Event::Complete.as_str(), ""),
            (Event::LeaseExpired.as_str(), ""),
        ]
        .into_iter()
        .chain(run_failures.map(|kind| (Event::Fail.as_str(), kind.as_str())))
        .chain(retried.map(|kind| (Event::RetryLater.as_str(), kind.as_str())));
        for (outcome, error_kind) in outcomes {
            let _ = self.runs.get_or_create(&RunLabels {
                agent: agent.to_string(),
                outcome: outcome.into(),
                error_kind: error_kind.into(),
            });
        }
        let labels = AgentLabels {
            agent: agent.to_string(),
        };
        let _ = self.run_seconds.get_or_create(&labels);
        let _ = self.wait_seconds.get_or_create(&labels);
    }

    /// The token (and, for a priced alias, cost) counters of each agent and
    /// model alias it is granted read 0 before the first call, for the
    /// reason [`Metrics::start_at_zero`] gives: the first call after a start
    /// went unseen by increase(), however much it spent.
    pub fn start_grants_at_zero(&self, grants: &[ModelGrant]) {
        for grant in grants {
            let agent = self.agent_label(&grant.agent);
            let alias = self.model_names.lock().unwrap().label(&grant.alias);
            for direction in ["input", "output"] {
                let _ = self.tokens.get_or_create(&TokenLabels {
                    agent: agent.clone(),
                    model: alias.clone(),
                    direction: direction.into(),
                });
            }
            if grant.priced {
                let _ = self.cost.get_or_create(&ModelLabels {
                    agent,
                    model: alias,
                });
            }
        }
    }

    /// Refreshes the gauges from the database and writes every metric in
    /// the Prometheus text format.
    pub fn render(&self, queue: &Queue) -> Result<String, QueueError> {
        self.catch_up(queue)?;
        let _one_at_a_time = self.rendering.lock().unwrap();
        // Added up: agents past the label cap share one series. Every state
        // of an agent with tasks, and its ready backlog, reads 0 rather than
        // vanishing when empty: a query or an alert on a missing series
        // sees nothing at all.
        self.tasks.clear();
        self.ready.clear();
        let counts = queue.counts()?;
        let agents: std::collections::BTreeSet<String> = counts
            .iter()
            .map(|(agent, _, _)| self.agent_label(agent))
            .collect();
        for agent in &agents {
            self.start_at_zero(agent);
            for state in State::ALL {
                let labels = TaskLabels {
                    agent: agent.clone(),
                    state: state.as_str().into(),
                };
                self.tasks.get_or_create(&labels).set(0);
            }
            self.ready
                .get_or_create(&AgentLabels {
                    agent: agent.clone(),
                })
                .set(0);
        }
        for (agent, state, n) in counts {
            let labels = TaskLabels {
                agent: self.agent_label(&agent),
                state: state.as_str().into(),
            };
            self.tasks.get_or_create(&labels).inc_by(n as i64);
        }
        for (agent, backlog) in queue.backlog()? {
            let labels = AgentLabels {
                agent: self.agent_label(&agent),
            };
            self.ready
                .get_or_create(&labels)
                .inc_by(backlog.ready as i64);
        }
        self.leases.clear();
        for held in queue.leases_by_holder()? {
            self.leases
                .get_or_create(&HolderLabels {
                    holder: held.holder,
                })
                .set(held.count as i64);
        }
        self.effects.clear();
        for state in EFFECT_STATES {
            self.effects
                .get_or_create(&StateLabels {
                    state: state.into(),
                })
                .set(0);
        }
        for (state, n) in queue.effect_counts()? {
            self.effects
                .get_or_create(&StateLabels { state })
                .set(n as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        Ok(out)
    }

    /// The last hour, minute by minute (minutes without runs included).
    pub fn activity(&self, now: i64) -> Activity {
        let tail = self.tail.lock().unwrap();
        let last = now / 60_000;
        let minutes = (last - WINDOW_MINUTES + 1..=last)
            .map(|m| {
                (
                    m * 60_000,
                    tail.minutes.get(&m).copied().unwrap_or_default(),
                )
            })
            .collect();
        let mut by_agent: BTreeMap<String, Minute> = BTreeMap::new();
        for ((agent, _), m) in &tail.agent_minutes {
            let total = by_agent.entry(agent.clone()).or_default();
            total.succeeded += m.succeeded;
            total.failed += m.failed;
            total.retried += m.retried;
        }
        Activity { minutes, by_agent }
    }
}

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::AuditEvent;

    fn event(id: i64, at: i64, name: &str, from: Option<State>, to: State) -> AgentEvent {
        AgentEvent {
            event: AuditEvent {
                id,
                at,
                task_id: 7,
                event: name.into(),
                from,
                to,
                actor: "test".into(),
                detail: serde_json::json!({}),
            },
            agent: "writer".into(),
        }
    }

    #[test]
    fn calls_during_a_run_do_not_end_it() {
        use State::*;
        let metrics = Metrics::new();
        let mut tail = Tail::default();
        let trail = [
            event(1, 1_000, "submit", None, Ready),
            event(2, 1_500, "claim", Some(Ready), InProgress),
            event(3, 2_000, "model_call", Some(InProgress), InProgress),
            event(4, 2_200, "http_request", Some(InProgress), InProgress),
            event(5, 4_500, "complete", Some(InProgress), Complete),
        ];
        for e in &trail {
            metrics.count(&mut tail, e);
        }
        let complete = RunLabels {
            agent: "writer".into(),
            outcome: "complete".into(),
            error_kind: String::new(),
        };
        assert_eq!(metrics.runs.get_or_create(&complete).get(), 1);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &metrics.registry).unwrap();
        assert!(!text.contains("model_call"), "{text}");
        assert!(!text.contains("http_request"), "{text}");
        // Claimed at 1.5 s, finished at 4.5 s: the whole run, not up to the first call.
        assert!(
            text.contains("colony_run_duration_seconds_sum{agent=\"writer\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("colony_claim_wait_seconds_sum{agent=\"writer\"} 0.5"),
            "{text}"
        );
        assert!(tail.ready_at.is_empty() && tail.claimed_at.is_empty());
    }

    #[test]
    fn a_release_of_a_task_that_never_started_is_no_run() {
        use State::*;
        let metrics = Metrics::new();
        let mut tail = Tail::default();
        let mut unstarted = event(3, 2_000, "release", Some(InProgress), Ready);
        unstarted.event.detail = serde_json::json!({"reason": "...", "started": false});
        let trail = [
            event(1, 1_000, "claim", Some(Ready), InProgress),
            unstarted,
            event(4, 3_000, "claim", Some(Ready), InProgress),
            event(5, 4_000, "release", Some(InProgress), Ready),
        ];
        for e in &trail {
            metrics.count(&mut tail, e);
        }
        let release = RunLabels {
            agent: "writer".into(),
            outcome: "release".into(),
            error_kind: String::new(),
        };
        assert_eq!(
            metrics.runs.get_or_create(&release).get(),
            1,
            "the interrupted run only"
        );
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &metrics.registry).unwrap();
        assert!(
            text.contains("colony_run_duration_seconds_count{agent=\"writer\"} 1"),
            "{text}"
        );
        assert!(tail.claimed_at.is_empty());
    }

    /// A counter that came back after a restart holding the last hour's
    /// runs would count them twice in Prometheus, which takes a restart as
    /// a reset to zero: the hour before the start feeds the chart only.
    #[test]
    fn the_hour_before_the_start_feeds_the_chart_not_the_counters() {
        use State::*;
        let metrics = Metrics::new();
        let mut tail = Tail {
            history_until: 3,
            ..Tail::default()
        };
        let trail = [
            event(1, 60_000, "claim", Some(Ready), InProgress),
            event(2, 61_000, "fail", Some(InProgress), Failed),
            event(3, 62_000, "claim", Some(Ready), InProgress),
            // The server starts here.
            event(4, 63_000, "fail", Some(InProgress), Failed),
        ];
        for e in &trail {
            metrics.count(&mut tail, e);
        }
        let failed = RunLabels {
            agent: "writer".into(),
            outcome: "fail".into(),
            error_kind: String::new(),
        };
        assert_eq!(metrics.runs.get_or_create(&failed).get(), 1);
        assert_eq!(tail.minutes[&1].failed, 2, "the chart has both");
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &metrics.registry).unwrap();
        assert!(
            text.contains("colony_run_duration_seconds_count{agent=\"writer\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn a_task_cancelled_while_ready_is_forgotten() {
        let metrics = Metrics::new();
        let mut tail = Tail::default();
        metrics.count(&mut tail, &event(1, 0, "submit", None, State::Ready));
        metrics.count(
            &mut tail,
            &event(2, 5, "cancel", Some(State::Ready), State::Cancelled),
        );
        assert!(tail.ready_at.is_empty());
    }

    /// Records a model call of agent `writer` straight into the journal:
    /// call `seq` to `alias`, charged `tokens` input tokens.
    fn journal_call(raw: &rusqlite::Connection, seq: usize, alias: &str, tokens: i64) {
        raw.execute(
            "INSERT INTO model_calls (at, task_id, root_id, agent, token, attempt, seq, alias,
                 request_hash, request, status, input_tokens, output_tokens, ms, replayed)
             VALUES (0, 1, 1, 'writer', 1, 1, ?1, ?2, 'h', 'null', 'ok', ?3, 0, 1, 0)",
            rusqlite::params![seq as i64, alias, tokens],
        )
        .unwrap();
    }

    /// A catch-up that fails reading the trail keeps its place in the model
    /// journal: the calls made meanwhile are counted by the next one.
    #[test]
    fn a_failed_catch_up_loses_no_model_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let queue = Queue::open(&path).unwrap();
        let metrics = Metrics::new();
        metrics.render(&queue).unwrap();
        let raw = rusqlite::Connection::open(&path).unwrap();
        journal_call(&raw, 1, "fast", 321);
        raw.execute_batch("ALTER TABLE events RENAME TO events_away;")
            .unwrap();
        assert!(metrics.render(&queue).is_err(), "the trail cannot be read");
        raw.execute_batch("ALTER TABLE events_away RENAME TO events;")
            .unwrap();
        let text = metrics.render(&queue).unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("colony_model_tokens_total{")
                    && l.contains("direction=\"input\"")
                    && l.ends_with(" 321")),
            "{text}"
        );
    }

    /// A granted alias's counters, started at 0, are the ones its first
    /// call counts into.
    #[test]
    fn a_first_call_counts_into_the_series_started_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let queue = Queue::open(&path).unwrap();
        let metrics = Metrics::new();
        metrics.start_grants_at_zero(&[ModelGrant {
            agent: "writer".into(),
            alias: "fast".into(),
            priced: false,
        }]);
        let input = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.starts_with("colony_model_tokens_total{") && l.contains("\"input\""))
                .map(String::from)
                .collect()
        };
        let text = metrics.render(&queue).unwrap();
        assert_eq!(
            input(&text),
            [r#"colony_model_tokens_total{agent="writer",model="fast",direction="input"} 0"#],
            "{text}"
        );
        assert!(
            !text.contains("colony_model_cost_usd_total{"),
            "not priced: {text}"
        );
        journal_call(&rusqlite::Connection::open(&path).unwrap(), 1, "fast", 321);
        let text = metrics.render(&queue).unwrap();
        assert_eq!(
            input(&text),
            [r#"colony_model_tokens_total{agent="writer",model="fast",direction="input"} 321"#],
            "{text}"
        );
    }

    /// Aliases an agent made up (refused calls are recorded under them)
    /// past the cap, or longer than any alias a host configures, share one
    /// label.
    #[test]
    fn model_aliases_past_the_cap_or_too_long_share_one_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let queue = Queue::open(&path).unwrap();
        let metrics = Metrics::new();
        metrics.render(&queue).unwrap(); // counts from here
        let raw = rusqlite::Connection::open(&path).unwrap();
        let long = "m".repeat(5000);
        let call = |seq: usize, alias: &str, tokens: i64| journal_call(&raw, seq, alias, tokens);
        // Refused first: charging nothing, they take no label.
        for i in 0..MAX_MODEL_LABELS {
            call(1000 + i, &format!("refused-{i}"), 0);
        }
        let aliases: Vec<String> = (0..MAX_MODEL_LABELS + 10)
            .map(|i| format!("made-up-{i:03}"))
            .chain([long.clone()])
            .collect();
        for (seq, alias) in aliases.iter().enumerate() {
            call(seq, alias, 1);
        }
        let text = metrics.render(&queue).unwrap();
        let inputs: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("colony_model_tokens_total{") && l.contains("\"input\""))
            .collect();
        assert_eq!(inputs.len(), MAX_MODEL_LABELS + 1, "{text}");
        assert!(!text.contains("refused-"), "{text}");
        assert!(!text.contains(&long), "a 5,000-character label");
        let other = inputs
            .iter()
            .find(|l| l.contains(&format!("model=\"{OTHER_MODELS}\"")))
            .expect("the rest under one label");
        assert!(other.ends_with(" 11"), "{other}");
    }

    /// An agent's completions and run times read 0 before its first run,
    /// so that a rate over the first runs after a start sees them.
    #[test]
    fn an_agents_counters_start_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(dir.path().join("q.db")).unwrap();
        queue
            .submit(&crate::task::NewTask::new("writer", "{}"))
            .unwrap();
        let text = Metrics::new().render(&queue).unwrap();
        for series in [
            r#"colony_runs_finished_total{agent="writer",outcome="complete",error_kind=""} 0"#,
            r#"colony_runs_finished_total{agent="writer",outcome="fail",error_kind="crash"} 0"#,
            r#"colony_runs_finished_total{agent="writer",outcome="fail",error_kind="budget_exceeded"} 0"#,
            r#"colony_runs_finished_total{agent="writer",outcome="retry_later",error_kind="timeout"} 0"#,
            r#"colony_runs_finished_total{agent="writer",outcome="lease_expired",error_kind=""} 0"#,
            r#"colony_run_duration_seconds_count{agent="writer"} 0"#,
            r#"colony_claim_wait_seconds_count{agent="writer"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == series), "{series} in\n{text}");
        }

        // A real run's crash counts into that very series (one, not two).
        let metrics = Metrics::new();
        metrics.render(&queue).unwrap();
        let claimed = queue.claim("writer", 1).unwrap();
        let crash = crate::task::TaskError {
            kind: ErrorKind::Crash,
            message: "wasm trap: unreachable".into(),
        };
        queue
            .finish(
                claimed[0].lease,
                crate::task::RunOutcome::Failure(crash),
                "",
            )
            .unwrap();
        let text = metrics.render(&queue).unwrap();
        let mut crashes: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(r#"error_kind="crash""#))
            .collect();
        crashes.sort();
        assert_eq!(
            crashes,
            [
                r#"colony_runs_finished_total{agent="writer",outcome="fail",error_kind="crash"} 0"#,
                r#"colony_runs_finished_total{agent="writer",outcome="retry_later",error_kind="crash"} 1"#,
            ],
            "{text}"
        );
    }

    #[test]
    fn agent_names_past_the_cap_share_one_label() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(dir.path().join("q.db")).unwrap();
        let extra = 50;
        for i in 0..MAX_AGENT_LABELS + extra {
            let new = crate::task::NewTask::new(format!("made-up-{i:04}"), "{}");
            queue.submit(&new).unwrap();
        }
        let metrics = Metrics::new();
        let text = metrics.render(&queue).unwrap();
        let ready: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("colony_ready_tasks{"))
            .collect();
        assert_eq!(ready.len(), MAX_AGENT_LABELS + 1, "{text}");
        let other = format!("colony_ready_tasks{{agent=\"{OTHER_AGENTS}\"}} {extra}");
        assert!(ready.contains(&other.as_str()), "{ready:?}");
        let tasks = text
            .lines()
            .filter(|l| l.starts_with("colony_tasks{"))
            .count();
        // Every state of each, empty ones at 0.
        assert_eq!(tasks, (MAX_AGENT_LABELS + 1) * State::ALL.len(), "{text}");
    }
}
