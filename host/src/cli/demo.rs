//! `colony demo`: an AI-operated store's launch pipeline, end to end, on the
//! four built-in agents. Each product launches as `design` (which spawns
//! `code`), then `marketing` (held for review) and `ops` after `design`. One
//! product has a flaky supplier, so `ops` retries with backoff. The demo
//! rejects one piece of copy with a note, lets the agent revise it, approves
//! everything, saves the generated pages and prints what happened.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::orchestrator::{Daemon, DaemonConfig};
use crate::queue::{ListFilter, Queue, all_readable};
use crate::runtime::AgentDir;
use crate::state::Scope;
use crate::task::{NewTask, State, Task};

const AGENTS: [&str; 4] = ["design", "code", "marketing", "ops"];
const REJECTION_NOTE: &str = "Make it shorter and speak to the audience directly.";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where to put the demo's database, agents and generated pages
    /// (recreated each run). A folder holding a colony.db the demo did not
    /// make, or whose agents/ is the --agents folder, is refused.
    #[arg(long, default_value = "colony-demo")]
    pub dir: PathBuf,
}

fn briefs() -> Vec<Value> {
    vec![
        json!({
            "name": "Acme Travel Mug",
            "audience": "busy commuters",
            "features": ["Keeps coffee hot for 6 hours", "Leak-proof lid", "Fits car cup holders"],
            "price_cents": 2900, "currency": "USD", "cost_cents": 900, "stock": 120
        }),
        json!({
            "name": "Lumen <Desk> Lamp & Co",
            "audience": "people who work late",
            "features": ["Warm light after sunset", "USB-C charging port"],
            "price_cents": 5900, "currency": "EUR", "cost_cents": 2100, "stock": 8,
            "supplier": "flaky"
        }),
        json!({
            "name": "Trail Socks",
            "audience": "weekend hikers",
            "features": ["Merino wool", "Blister-free heel"],
            "price_cents": 1800, "currency": "GBP", "cost_cents": 600, "stock": 300
        }),
    ]
}

/// The tasks of one product launch.
struct Launch {
    name: String,
    design: i64,
    marketing: i64,
    ops: i64,
    flaky: bool,
}

/// Where the demo tells its story: stdout, or stderr when `--json` keeps
/// stdout for the one JSON summary at the end.
fn narrative(json: bool) -> Box<dyn std::io::Write> {
    match json {
        true => Box::new(std::io::stderr().lock()),
        false => Box::new(std::io::stdout().lock()),
    }
}

pub async fn demo(
    args: &DemoArgs,
    agents_dir: &Path,
    models: Option<Arc<crate::models::Providers>>,
    json: bool,
) -> Result<bool> {
    let copy_model = models.as_ref().is_some_and(|m| m.has_alias("copy"));
    refuse_a_folder_not_the_demos(&args.dir, agents_dir)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let db = args.dir.join("colony.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let actor = super::identity("demo");
    let mut queue = super::open_queue(&db, &actor)?;
    mark_as_the_demos(&args.dir)?;
    // The shop ops publishes listings to: a loopback server counting them.
    let (shop_addr, shop_keys) = super::loopback::serve(r#"{"listed":true}"#).await?;
    let shop = format!("http://{shop_addr}");
    // The suppliers ops asks over HTTP: "flaky" refuses its first two calls.
    let flaky_calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = flaky_calls.clone();
    let status_of: super::loopback::StatusOf = Arc::new(move |path: &str| {
        let flaky = path.ends_with("/flaky");
        match flaky && counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
            true => 503,
            false => 200,
        }
    });
    let (supplier_addr, _) =
        super::loopback::serve_with(r#"{"available":true}"#, status_of).await?;
    let suppliers = format!("http://{supplier_addr}");
    let agents_dir = &demo_agents(agents_dir, &args.dir.join("agents"), &[&shop, &suppliers])?;
    let (runtime, agents) = super::load_agents(&db, agents_dir, 16, models).await?;
    for agent in AGENTS {
        if agents.loaded(agent).is_none() {
            bail!(
                "agent {agent} did not load; see `colony --agents {} agents`",
                agents_dir.display()
            );
        }
    }

    // Everything goes through `?` to a locked stdout, taken only between
    // awaits: a reader that went away (`colony demo | head -1`) ends the demo
    // quietly instead of a panic.
    {
        let mut out = narrative(json);
        writeln!(
            out,
            "Launching {} products through design → code, marketing (reviewed) and ops…",
            briefs().len()
        )?;
        if copy_model {
            writeln!(
                out,
                "Marketing copy is written by the model alias `copy` from the configuration."
            )?;
        } else {
            writeln!(
                out,
                "Marketing copy uses the built-in templates (no model alias `copy` is configured; \
                 run `colony demo --config FILE` with a [models.copy] section to use a real model)."
            )?;
        }
    }
    let launches: Vec<Launch> = briefs()
        .iter()
        .map(|brief| submit_launch(&mut queue, brief, &shop, &suppliers))
        .collect::<Result<_>>()?;

    let until_idle = || run_until_idle(&db, &actor, &runtime, agents_dir);
    until_idle().await?;

    // Review round: reject the first product's copy once, approve the rest.
    let first = &launches[0];
    {
        let mut out = narrative(json);
        writeln!(out, "\nReviewing marketing copy:")?;
        writeln!(
            out,
            "  task {} ({}): rejected — \"{REJECTION_NOTE}\"",
            first.marketing, first.name
        )?;
        queue.reject(first.marketing, REJECTION_NOTE)?;
        for launch in &launches[1..] {
            queue.approve(launch.marketing, Some("approved by the demo"))?;
            writeln!(
                out,
                "  task {} ({}): approved",
                launch.marketing, launch.name
            )?;
        }
    }
    until_idle().await?;
    let revised = queue.get(first.marketing)?;
    if let Some(tagline) = revised.result.as_ref().and_then(|r| r["tagline"].as_str()) {
        writeln!(
            narrative(json),
            "  task {} ({}): revised tagline \"{tagline}\" — approved",
            first.marketing,
            first.name
        )?;
    }
    if revised.state == State::Review {
        queue.approve(first.marketing, Some("the revision addresses the note"))?;
    }
    until_idle().await?;

    let tasks = all_readable(queue.list(&ListFilter::default())?)?;
    let pages = save_pages(&queue, &launches, &args.dir.join("pages"))?;
    let mut out = narrative(json);
    print_table(&mut out, &queue, &tasks)?;
    print_tree(&mut out, &queue, &launches)?;
    print_state(&mut out, &queue)?;
    print_shop(&mut out, &shop_keys)?;
    writeln!(
        out,
        "The flaky supplier (a loopback API ops asks over HTTP) was asked {} times: 503 twice, then 200.",
        flaky_calls.load(std::sync::atomic::Ordering::SeqCst)
    )?;
    writeln!(out, "\nGenerated product pages (open them in a browser):")?;
    for (name, path) in &pages {
        writeln!(out, "  {name}: {}", path.display())?;
    }
    let mut problems = check_expectations(&queue, &launches, &tasks, pages.len())?;
    let listings = shop_keys.lock().unwrap().len();
    if listings != launches.len() {
        problems.push(format!(
            "the shop should have received {} listings, got {listings}",
            launches.len()
        ));
    }
    if problems.is_empty() {
        writeln!(
            out,
            "\nEvery task ended as expected. Database: {}",
            db.display()
        )?;
    } else {
        writeln!(out, "\nSome tasks did not end as expected:")?;
        for p in &problems {
            writeln!(out, "  - {p}")?;
        }
    }
    drop(out);
    if json {
        super::output::print_json(&json!({
            "ok": problems.is_empty(),
            "problems": problems,
            "db": db,
            "pages": pages.iter().map(|(name, path)| json!({"product": name, "path": path})).collect::<Vec<_>>(),
            "tasks": tasks.iter().map(super::output::task_json).collect::<Vec<_>>(),
        }))?;
    }
    Ok(problems.is_empty())
}

fn submit_launch(queue: &mut Queue, brief: &Value, shop: &str, suppliers: &str) -> Result<Launch> {
    let payload = brief.to_string();
    let design = queue.submit(&NewTask::new("design", payload.clone()))?.id;
    let mut marketing = NewTask::new("marketing", payload.clone());
    marketing.depends_on = vec![design];
    marketing.review = true;
    let marketing = queue.submit(&marketing)?.id;
    // ops publishes the listing to the shop as an effect.
    let mut ops_brief = brief.clone();
    ops_brief["shop"] = json!(shop);
    // ... and asks its supplier over HTTP.
    let supplier = brief["supplier"].as_str().unwrap_or("default");
    ops_brief["supplier_url"] = json!(format!("{suppliers}/suppliers/{supplier}"));
    let mut ops = NewTask::new("ops", ops_brief.to_string());
    ops.depends_on = vec![design];
    // Short backoff so the flaky supplier's retries fit in a demo.
    ops.backoff_ms = 300;
    let ops = queue.submit(&ops)?.id;
    Ok(Launch {
        name: brief["name"].as_str().unwrap_or("?").to_string(),
        design,
        marketing,
        ops,
        flaky: brief["supplier"] == "flaky",
    })
}

async fn run_until_idle(
    db: &Path,
    actor: &str,
    runtime: &Arc<crate::runtime::Runtime>,
    agents_dir: &Path,
) -> Result<()> {
    let queue = super::open_queue(db, actor)?;
    let mut agents = AgentDir::new(agents_dir);
    agents.rescan(runtime).await;
    let cfg = DaemonConfig {
        poll: Duration::from_millis(100),
        heartbeat: Duration::from_millis(500),
        until_idle: true,
        ..DaemonConfig::default()
    };
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    Daemon::new(queue, runtime.clone(), agents, cfg)
        .run(stop_rx)
        .await?;
    Ok(())
}

/// The file that says a folder is the demo's own, to recreate at will.
const DEMO_MARKER: &str = ".colony-demo";

/// The demo deletes `dir/colony.db` and writes its agents into
/// `dir/agents`: refused where those are the user's own (`--dir .` in a
/// project: its queue, or the `--agents` folder whose components the copy
/// truncated to nothing).
fn refuse_a_folder_not_the_demos(dir: &Path, agents: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!(super::BadInput(format!(
            "--dir {}: that is a file, not a folder; the demo needs a folder of its own (default colony-demo)",
            dir.display()
        )));
    }
    let db = dir.join("colony.db");
    let demos_db = db.exists() && made_by_the_demo(&db);
    // A folder an older build's demo made has its database but no mark.
    let marked = dir.join(DEMO_MARKER).is_file() || demos_db;
    if db.exists() && !demos_db {
        bail!(super::BadInput(format!(
            "{} exists and was not made by `colony demo`, which starts from an empty queue and would delete it; run the demo in a folder of its own (--dir, default colony-demo)",
            db.display()
        )));
    }
    let copy = dir.join("agents");
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(dir, agents) {
        bail!(super::BadInput(format!(
            "--dir {} is the --agents folder: the demo would write its queue, pages and agents among its components; run the demo in a folder of its own (--dir, default colony-demo)",
            dir.display()
        )));
    }
    if same(&copy, agents) {
        bail!(super::BadInput(format!(
            "the demo writes its own copy of the agents into {}, which is the --agents folder {}; run the demo in a folder of its own (--dir, default colony-demo)",
            copy.display(),
            agents.display()
        )));
    }
    let holds_files = std::fs::read_dir(&copy).is_ok_and(|mut entries| entries.next().is_some());
    if !marked && holds_files {
        bail!(super::BadInput(format!(
            "{} holds files the demo did not write, and it writes its own agents there; run the demo in a folder of its own (--dir, default colony-demo)",
            copy.display()
        )));
    }
    Ok(())
}

/// Marks `dir` as the demo's: its agents/ is the demo's to write.
fn mark_as_the_demos(dir: &Path) -> Result<()> {
    let mark = dir.join(DEMO_MARKER);
    std::fs::write(
        &mark,
        "made by colony demo, which recreates this folder's colony.db and agents/ at each run\n",
    )
    .with_context(|| format!("writing {}", mark.display()))
}

/// Whether the queue at `db` is one the demo made: its first event is the
/// demo's. (A mark beside it said so of any database put there since, the
/// user's included: a deleted file's inode is handed out again at once.)
fn made_by_the_demo(db: &Path) -> bool {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return false;
    };
    conn.query_row("SELECT actor FROM events ORDER BY id LIMIT 1", [], |r| {
        r.get::<_, String>(0)
    })
    .is_ok_and(|actor| actor.starts_with("demo@"))
}

/// The demo's own copy of the agents (components and manifests), with ops
/// granted the demo shop's origin, so the demo changes nothing in `from`.
/// An agent missing from `from` (an installed binary run in an empty
/// folder) is the copy the binary carries.
fn demo_agents(from: &Path, to: &Path, origins: &[&str]) -> Result<PathBuf> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for agent in AGENTS {
        super::builtin::copy_store_agent(agent, from, to)?;
    }
    // Added to the hosts ops's own manifest allows, if it has one: as a
    // key of the table, since a second `allowed_hosts` line is a TOML error.
    let manifest = to.join("ops.toml");
    let mut table: toml::Table = match std::fs::read_to_string(&manifest) {
        Ok(text) => text
            .parse()
            .with_context(|| format!("reading {}", manifest.display()))?,
        Err(_) => toml::Table::new(),
    };
    let hosts = table
        .entry("allowed_hosts")
        .or_insert_with(|| toml::Value::Array(Vec::new()));
    let toml::Value::Array(hosts) = hosts else {
        bail!("{}: allowed_hosts must be a list", manifest.display());
    };
    for origin in origins {
        let origin = toml::Value::String(origin.to_string());
        if !hosts.contains(&origin) {
            hosts.push(origin);
        }
    }
    let text = format!(
        "# ops's manifest, with the demo's shop and suppliers allowed (written by colony demo)\n{}",
        toml::to_string(&table)?
    );
    std::fs::write(&manifest, text).with_context(|| format!("writing {}", manifest.display()))?;
    Ok(to.to_path_buf())
}

/// What the shop (a loopback server the demo runs) received: each listing
/// once per product, though the flaky listing's run was attempted three times.
fn print_shop(out: &mut impl std::io::Write, keys: &super::loopback::KeyCounts) -> Result<()> {
    let keys = keys.lock().unwrap().clone();
    let mut keys: Vec<(String, u32)> = keys.into_iter().collect();
    keys.sort();
    writeln!(
        out,
        "\nThe shop received {} listings (effects sent after commit):",
        keys.len()
    )?;
    for (key, times) in &keys {
        writeln!(out, "  Idempotency-Key {key}: {times} request(s)")?;
    }
    Ok(())
}

/// The agents' durable state after the launch: what survived retries and
/// review exactly once.
fn print_state(out: &mut impl std::io::Write, queue: &Queue) -> Result<()> {
    writeln!(
        out,
        "\nAgent state (committed only with completed or approved tasks):"
    )?;
    for (agent, prefix) in [("ops", ""), ("marketing", "published/")] {
        for entry in queue.state_scan(Scope::Agent, agent, prefix, 100)? {
            writeln!(
                out,
                "  {agent:<10} {:<32} v{}  {}",
                entry.key, entry.version, entry.value
            )?;
        }
    }
    writeln!(
        out,
        "  (the flaky listing ran three times and the rejected copy was rewritten, yet each counted once)"
    )?;
    Ok(())
}

/// Writes each `code` task's HTML to `<dir>/<slug>.html`.
fn save_pages(queue: &Queue, launches: &[Launch], dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    std::fs::create_dir_all(dir)?;
    let mut pages = Vec::new();
    for launch in launches {
        let Some(code) = queue
            .children(launch.design)?
            .into_iter()
            .flatten()
            .find(|c| c.agent == "code")
        else {
            continue;
        };
        let Some(html) = code.result.as_ref().and_then(|r| r["html"].as_str()) else {
            continue;
        };
        let slug: String = launch
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .split('-')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("-");
        let path = dir.join(format!("{slug}.html"));
        std::fs::write(&path, html).with_context(|| format!("writing {}", path.display()))?;
        pages.push((
            launch.name.clone(),
            std::fs::canonicalize(&path).unwrap_or(path),
        ));
    }
    Ok(pages)
}

/// From the first claim to the end, from the audit trail.
fn duration(queue: &Queue, task: &Task) -> Result<String> {
    let events = queue.events(Some(task.id), 0, 1000)?;
    let start = events.iter().find(|e| e.event == "claim").map(|e| e.at);
    Ok(match (start, task.finished_at) {
        (Some(start), Some(end)) => format!("{} ms", end - start),
        _ => "-".into(),
    })
}

fn print_table(out: &mut impl std::io::Write, queue: &Queue, tasks: &[Task]) -> Result<()> {
    writeln!(
        out,
        "\n{:>4}  {:<10} {:<10} {:>8} {:>9}  error (last)",
        "id", "agent", "state", "attempts", "duration"
    )?;
    for task in tasks.iter().rev() {
        let error = task
            .error
            .as_ref()
            .map(|e| format!("{}: {}", e.kind, e.message))
            .unwrap_or_default();
        writeln!(
            out,
            "{:>4}  {:<10} {:<10} {:>8} {:>9}  {}",
            task.id,
            task.agent,
            task.state.as_str(),
            format!("{}/{}", task.attempts, task.max_attempts),
            duration(queue, task)?,
            error
        )?;
    }
    Ok(())
}

fn print_tree(out: &mut impl std::io::Write, queue: &Queue, launches: &[Launch]) -> Result<()> {
    writeln!(out, "\nChains:")?;
    for launch in launches {
        let mut text = String::new();
        let design = queue.get(launch.design)?;
        writeln!(
            text,
            "  {} — design #{} [{}]",
            launch.name, design.id, design.state
        )?;
        for child in queue.children(launch.design)?.into_iter().flatten() {
            writeln!(
                text,
                "    ├─ spawned {} #{} [{}]",
                child.agent, child.id, child.state
            )?;
        }
        for (i, id) in [launch.marketing, launch.ops].iter().enumerate() {
            let task = queue.get(*id)?;
            let branch = if i == 0 { "├─" } else { "└─" };
            let note = match task.agent.as_str() {
                "marketing" if task.revisions > 0 => {
                    format!(", {} revision(s) after review", task.revisions)
                }
                "ops" if task.attempts > 1 => {
                    format!(
                        ", {} attempts ({})",
                        task.attempts,
                        why_retried(queue, task.id)?
                    )
                }
                _ => String::new(),
            };
            writeln!(
                text,
                "    {branch} after design: {} #{} [{}{note}]",
                task.agent, task.id, task.state
            )?;
        }
        out.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// Why a task ran again, from its `retry_later` events: the supplier
/// failing, or (ops runs of several products at once) a set-if lost on the
/// shared listing counter to another run, which runs the task again.
fn why_retried(queue: &Queue, id: i64) -> Result<&'static str> {
    let events = queue.events(Some(id), 0, u32::MAX)?;
    let kinds: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.event == "retry_later")
        .map(|e| &e.detail["kind"])
        .collect();
    Ok(
        match (kinds.is_empty(), kinds.iter().all(|k| *k == "conflict")) {
            (true, _) => "run again",
            (false, true) => "another run counted its listing first: retried",
            (false, false) => "retried with backoff",
        },
    )
}

fn check_expectations(
    queue: &Queue,
    launches: &[Launch],
    tasks: &[Task],
    pages: usize,
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for task in tasks {
        if task.state != State::Complete {
            problems.push(format!(
                "task {} ({}) is {}, expected complete",
                task.id, task.agent, task.state
            ));
        }
    }
    let by_id: HashMap<i64, &Task> = tasks.iter().map(|t| (t.id, t)).collect();
    for launch in launches {
        // Two refusals of the flaky supplier; a set-if race on the listing
        // count with another ops run may add one more.
        if launch.flaky && by_id.get(&launch.ops).is_some_and(|t| t.attempts < 3) {
            problems.push(format!(
                "ops for {} should have needed at least 3 attempts",
                launch.name
            ));
        }
        if queue
            .children(launch.design)?
            .into_iter()
            .flatten()
            .all(|c| c.agent != "code")
        {
            problems.push(format!("design for {} spawned no code task", launch.name));
        }
    }
    let first = queue.get(launches[0].marketing)?;
    if first.revisions != 1
        || first
            .result
            .as_ref()
            .is_none_or(|r| r["addressed_feedback"] != REJECTION_NOTE)
    {
        problems.push(format!(
            "marketing task {} should have been revised once using the note",
            first.id
        ));
    }
    // State commits with completions only: three attempts of the flaky
    // listing, one rejected revision, and still one write each.
    let listed = queue.state_get(Scope::Agent, "ops", "listed_count")?;
    if listed.as_ref().map(|e| (e.value.as_str(), e.version))
        != Some((&launches.len().to_string(), launches.len() as u64))
    {
        problems.push(format!(
            "ops state listed_count should be {} at version {}, found {listed:?}",
            launches.len(),
            launches.len()
        ));
    }
    let published = queue.state_scan(Scope::Agent, "marketing", "published/", 100)?;
    if published.len() != launches.len() || published.iter().any(|e| e.version != 1) {
        problems.push(format!(
            "marketing should have published each product's copy once, found {published:?}"
        ));
    }
    if pages != launches.len() {
        problems.push(format!(
            "expected {} product pages, wrote {pages}",
            launches.len()
        ));
    }
    Ok(problems)
}
