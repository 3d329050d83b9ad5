//! `colony bench --capabilities`: what the capabilities cost.
//! - State: the drain of tasks doing one `get` and one `set` each, against
//!   the same guest writing nothing, in the same run.
//! - Models: each call as the guest sees it (WIT boundary, grant and budget
//!   checks, hashing, the provider round trip, the journal write) against the
//!   bare provider round trip, both on one loopback provider; and replayed
//!   calls (journal read, journal write, no provider).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::bench::{BenchArgs, drain, split_per_task};
use crate::models::{ChatRequest, Message, ModelsConfig, Providers};
use crate::queue::Queue;
use crate::runtime::{Runtime, RuntimeConfig};
use crate::state::Scope;
use crate::task::NewTask;

const STATEFUL: &[u8] = include_bytes!(env!("COLONY_GUEST_STATEFUL"));
const THINKER: &[u8] = include_bytes!(env!("COLONY_GUEST_THINKER"));

/// Calls per model measurement.
const CALLS: usize = 300;

/// Pairs of state rounds: the machine's speed drifts within seconds, so one
/// round of each would measure the drift as much as the state.
const STATE_PAIRS: usize = 3;

/// The drain of tasks doing one state `get` and one `set` each, against the
/// same guest doing nothing, in alternating rounds (ABBA..., so a steady
/// drift favours neither); the ratio is the median pair's.
pub async fn state_rounds(args: &BenchArgs, runtime: &Arc<Runtime>, root: &Path) -> Result<Value> {
    let agents = root.join("state-agents");
    std::fs::create_dir_all(&agents)?;
    std::fs::write(agents.join("stateful.wasm"), STATEFUL)?;
    std::fs::write(
        agents.join("stateful.toml"),
        format!("concurrency = {}\n", args.concurrency),
    )?;
    let mut pairs = Vec::with_capacity(STATE_PAIRS);
    for pair in 0..STATE_PAIRS {
        let (without, with) = if pair % 2 == 0 {
            let without = state_round(args, runtime, root, &agents, pair, false).await?;
            (
                without,
                state_round(args, runtime, root, &agents, pair, true).await?,
            )
        } else {
            let with = state_round(args, runtime, root, &agents, pair, true).await?;
            (
                state_round(args, runtime, root, &agents, pair, false).await?,
                with,
            )
        };
        pairs.push((without, with));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratio = median(pairs.iter().map(|(a, b)| b.0 / a.0).collect());
    // The splits of the pair whose ratio is the median.
    let (without, with) = pairs
        .iter()
        .find(|(a, b)| b.0 / a.0 == ratio)
        .expect("the median is one of the pairs");
    Ok(json!({
        "state_drain_without_per_second": without.0.round(),
        "state_drain_get_set_per_second": with.0.round(),
        "state_get_set_ratio": ratio,
        "state_get_set_ratios": pairs.iter().map(|(a, b)| b.0 / a.0).collect::<Vec<_>>(),
        // All of the median pair.
        "state_per_task_us": { "without": without.1, "get_set": with.1 },
    }))
}

/// One state round on a fresh database: its rate and where its time went.
async fn state_round(
    args: &BenchArgs,
    runtime: &Arc<Runtime>,
    root: &Path,
    agents: &Path,
    pair: usize,
    with_state: bool,
) -> Result<(f64, Value)> {
    let db = root.join(format!("bench-state-{pair}-{with_state}.db"));
    let mut queue = Queue::open(&db)?;
    let tasks: Vec<NewTask> = (0..args.tasks)
        .map(|i| {
            // The same guest and nearly the same payload either way, so the
            // rounds differ only in the two calls and what they cost the host.
            let key = with_state.then(|| format!("k{i}"));
            NewTask::new("stateful", json!({ "touch": key }).to_string())
        })
        .collect();
    queue.submit_batch(&tasks)?;
    let drained = drain(args, runtime, agents, Queue::open(&db)?).await?;
    let (took, summary) = (drained.took, &drained.summary);
    anyhow::ensure!(
        summary.completed == args.tasks as u64,
        "the state round completed {} of {} tasks",
        summary.completed,
        args.tasks
    );
    if with_state {
        // Every task's write landed: the first and the last key.
        for i in [0, args.tasks - 1] {
            let key = format!("k{i}");
            let entry = queue.state_get(Scope::Agent, "stateful", &key)?;
            anyhow::ensure!(
                entry.is_some_and(|e| e.version == 1),
                "the state round's task {i} did not write its key {key:?}"
            );
        }
    }
    Ok((
        args.tasks as f64 / took.as_secs_f64(),
        split_per_task(&drained, args.tasks),
    ))
}

pub async fn model_figures(args: &BenchArgs, root: &Path) -> Result<Value> {
    // An OpenAI-compatible endpoint answering every call at once.
    const REPLY: &str = r#"{"id":"bench","object":"chat.completion","model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
    let (addr, _) = super::loopback::serve(REPLY).await?;
    let config = ModelsConfig::from_toml(
        &format!(
            "[models.fast]\napi = \"openai\"\nbase_url = \"http://{addr}/v1\"\nmodel = \"bench\"\n"
        ),
        Path::new("(bench)"),
    )?;
    let providers = Arc::new(Providers::new(&config)?);

    // The bare round trip, for reference.
    let mut bare = Vec::with_capacity(CALLS);
    for i in 0..CALLS + 20 {
        let request = ChatRequest {
            model: "fast".into(),
            messages: vec![Message::user(format!("question {i}"))],
            max_tokens: Some(16),
            ..ChatRequest::default()
        };
        let started = Instant::now();
        providers.complete(&request).await?;
        if i >= 20 {
            bare.push(started.elapsed());
        }
    }

    // The same calls through a guest: one task that calls CALLS times, and
    // one that traps after CALLS calls and whose retry replays them.
    let agents = root.join("model-agents");
    std::fs::create_dir_all(&agents)?;
    std::fs::write(agents.join("thinker.wasm"), THINKER)?;
    std::fs::write(agents.join("thinker.toml"), "models = [\"fast\"]\n")?;
    let mut runtime = Runtime::new(RuntimeConfig {
        cache_dir: Some(root.join(".colony-cache")),
        max_concurrent_runs: 8,
        pooling: true,
    })?;
    runtime.set_models(providers);
    let runtime = Arc::new(runtime);
    let db = root.join("bench-models.db");
    let mut queue = Queue::open(&db)?;
    let prompts: Vec<String> = (0..CALLS).map(|i| format!("question {i}")).collect();
    let real = queue
        .submit(&NewTask::new(
            "thinker",
            json!({"prompts": prompts, "max_tokens": 16, "timings": true}).to_string(),
        ))?
        .id;
    let mut replayed = NewTask::new(
        "thinker",
        json!({"prompts": prompts, "max_tokens": 16, "timings": true, "panic_after": CALLS})
            .to_string(),
    );
    replayed.backoff_ms = 1;
    let replayed = queue.submit(&replayed)?.id;
    drain(args, &runtime, &agents, Queue::open(&db)?).await?;

    let guest_us = |id: i64| -> Result<Vec<Duration>> {
        let task = queue.get(id)?;
        let result = task
            .result
            .with_context(|| format!("bench task {id} did not complete: {:?}", task.error))?;
        let mut us: Vec<Duration> = result["call_us"]
            .as_array()
            .context("no call timings")?
            .iter()
            .skip(1) // the first call also reads the task's budget and journal
            .filter_map(Value::as_u64)
            .map(Duration::from_micros)
            .collect();
        us.sort();
        Ok(us)
    };
    let (through_host, replay) = (guest_us(real)?, guest_us(replayed)?);
    bare.sort();
    let us = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e6);
    let p = |v: &[Duration], q| us(super::bench::percentile(v, q));
    let overhead = |q| Some(p(&through_host, q)? - p(&bare, q)?);
    Ok(json!({
        "model_calls_measured": CALLS - 1,
        "model_call_provider_only_us_p50": p(&bare, 0.5),
        "model_call_through_host_us_p50": p(&through_host, 0.5),
        "model_call_through_host_us_p99": p(&through_host, 0.99),
        "model_call_host_overhead_us_p50": overhead(0.5),
        "model_call_host_overhead_us_p99": overhead(0.99),
        "model_call_replay_us_p50": p(&replay, 0.5),
        "model_call_replay_us_p99": p(&replay, 0.99),
    }))
}
