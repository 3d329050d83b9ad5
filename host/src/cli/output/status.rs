//! `colony status` and the daemon's closing summary.

use super::*;

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

/// Why no daemon on this agents folder serves `agent`'s waiting tasks, if
/// none does: its component is missing here or does not load (ready tasks
/// of such an agent looked merely slow). Nothing when there is no agents
/// folder here at all (an operator's machine reading a shared database).
pub(crate) fn unserved(
    agents: &AgentDir,
    agent: &str,
    counts: &[(String, State, u64)],
) -> Option<Unserved> {
    let waiting: u64 = counts
        .iter()
        .filter(|(a, state, _)| a == agent && matches!(state, State::Ready | State::Pending))
        .map(|c| c.2)
        .sum();
    if waiting == 0 || agents.loaded(agent).is_some() || !agents.dir().is_dir() {
        return None;
    }
    Some(Unserved {
        component: agents.dir().join(format!("{agent}.wasm")),
        broken: agents.entries().any(|e| e.name == agent),
    })
}

/// An agent whose waiting tasks no component here serves.
pub(crate) struct Unserved {
    pub component: std::path::PathBuf,
    /// There, but it does not load (else missing).
    pub broken: bool,
}

impl std::fmt::Display for Unserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let component = self.component.display();
        match self.broken {
            true => write!(f, "{component} does not load: see below"),
            false => write!(
                f,
                "no {component}: its tasks wait for a daemon that has one"
            ),
        }
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
    let unserved: serde_json::Map<String, Value> = by_agent
        .keys()
        .filter_map(|agent| {
            let why = unserved(agents, agent, &report.counts)?;
            let reason = if why.broken { "broken" } else { "missing" };
            Some((
                agent.clone(),
                json!({"reason": reason, "component": why.component}),
            ))
        })
        .collect();
    json!({
        "by_state": by_state,
        "by_agent": by_agent,
        "unserved_agents": unserved,
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
        match unserved(agents, name, counts) {
            Some(why) => writeln!(out, "  {:<12} {} ({why})", name, parts.join(", "))?,
            None => writeln!(out, "  {:<12} {}", name, parts.join(", "))?,
        }
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

/// What a daemon did; with `--json` one object, on one line when `line`.
pub fn print_daemon_summary(summary: &DaemonSummary, json: bool, line: bool) -> Result<()> {
    if json {
        let summary = json!({
            "runs": summary.runs,
            "completed": summary.completed,
            "to_review": summary.to_review,
            "retried": summary.retried,
            "failed": summary.failed,
            "lost": summary.lost,
            "released": summary.released,
            "given_back": summary.given_back,
            "leases_reset": summary.leases_reset,
            "leases_reset_failed": summary.leases_reset_failed,
            "unstored": summary.unstored,
            "effects_sent": summary.effects_sent,
            "effects_failed": summary.effects_failed,
            "effects_released": summary.effects_released,
            "left_for_missing_agents": summary.left_for_missing_agents.iter().map(|(a, n)| json!({"agent": a, "tasks": n})).collect::<Vec<_>>(),
            "left_blocked_on_dependencies": summary.left_blocked.iter().map(|(a, n)| json!({"agent": a, "tasks": n})).collect::<Vec<_>>(),
            "effects_left_for_missing_agents": summary.effects_left_for_missing_agents.iter().map(|(a, n)| json!({"agent": a, "effects": n})).collect::<Vec<_>>(),
        });
        if line {
            writeln!(std::io::stdout(), "{summary}")?;
            return Ok(());
        }
        return print_json(&summary);
    }
    say!(
        "daemon done: {} runs, {} complete, {} sent to review, {} retried, {} failed, {} stopped (cancelled, or their lease reset), {} released",
        summary.runs,
        summary.completed,
        summary.to_review,
        summary.retried,
        summary.failed,
        summary.lost,
        summary.released
    );
    if summary.given_back > 0 {
        say!(
            "  {} task(s) claimed ahead were given back unstarted while it ran, their attempts returned (their agent's runs grew long, or it was unloaded)",
            summary.given_back
        );
    }
    if summary.leases_reset > 0 {
        say!(
            "  reset {} expired lease(s) of other runs (a daemon that crashed or stalled): {} of those tasks failed for good, no attempt left; the rest wait to run again",
            summary.leases_reset,
            summary.leases_reset_failed
        );
    }
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
