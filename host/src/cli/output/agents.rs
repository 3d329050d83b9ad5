//! `colony agents`: each loaded agent, what it may reach, and what the
//! agents folder holds that did not load.

use super::*;

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
        match agents.dir().exists() {
            true => writeln!(out, "no agents in {}", agents.dir().display())?,
            false => writeln!(
                out,
                "no agents: {} does not exist (--agents, or COLONY_AGENTS; ./agents by default)",
                agents.dir().display()
            )?,
        }
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
