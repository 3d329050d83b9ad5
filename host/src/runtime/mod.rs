//! The WebAssembly sandbox: one wasmtime `Engine`, components loaded and
//! validated once, and one fresh `Store` per task.
//!
//! Every run gets a deny-all WASI context, a memory cap, optional fuel, and a
//! wall-clock deadline. Guests yield to the executor on every epoch tick, so
//! a spinning guest neither blocks other runs nor outlives its deadline.
//! Every way a run can end becomes a [`RunOutcome`]; traps are classified
//! (`outcome.rs`).

mod cache;
mod effects;
mod engine;
pub mod http;
mod model;
mod outcome;
mod registry;
mod sandbox;
mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Store};

use crate::models::Providers;
use crate::task::{ClaimedTask, ErrorKind, Lease, RunOutcome, SpawnSpec, TaskError};

use engine::Flavor;
pub use engine::LARGE_COMPONENT;
pub use http::{HttpGrant, check_url};
use model::ModelSession;
pub use outcome::MAX_FAILURE_MESSAGE;
use outcome::{
    bounded_failure_message, charge_budget_refusal, classify_trap, crash, error_chain,
    manifest_limit_hint, report,
};
pub use registry::{AgentDir, AgentEntry, AgentStatus, FileStamp, Manifest, ScanReport};
pub(crate) use sandbox::truncate;
pub use sandbox::{NoHooks, RunHooks};
use sandbox::{RunState, TaskLog};
/// The attribute [`RunHooks`]' implementations need, as the trait is async.
pub use wasmtime_wasi::async_trait;

/// The current contract, `colony:agent@0.2.0` (`wit/agent.wit`).
mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "agent",
        imports: {
            "colony:agent/model": async,
            "colony:agent/state.get": async | trappable,
            "colony:agent/state.scan": async | trappable,
        },
        exports: { default: async },
        // `wasi:http/outgoing-handler` is wasmtime-wasi-http's.
        with: {
            "wasi:http": wasmtime_wasi_http::p2::bindings::http,
            "wasi:io": wasmtime_wasi::p2::bindings::io,
            "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
        },
    });
}

/// The released `colony:agent@0.1.0` (`wit/v0.1.0/agent.wit`): components
/// built against it keep loading and running unchanged.
mod bindings_v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "agent",
        exports: { default: async },
    });
}

/// The WIT `task` of either contract version, from the claimed task.
macro_rules! guest_task {
    ($version:ident, $task:expr) => {
        $version::colony::agent::types::Task {
            id: $task.lease.task_id as u64,
            agent: $task.agent.clone(),
            payload: $task.payload.clone(),
            attempt: $task.attempt,
            max_attempts: $task.max_attempts,
            parent_result: $task.parent_result.clone(),
            feedback: $task.feedback.clone(),
        }
    };
}

/// What the guest answered (either contract version), as the queue needs it.
macro_rules! outcome_from_guest {
    ($version:ident, $answer:expr) => {{
        use $version::colony::agent::types::Failure;
        match $answer {
            Ok(outcome) => RunOutcome::Success {
                output: outcome.output,
                spawn: outcome
                    .spawn
                    .into_iter()
                    .map(|s| SpawnSpec {
                        agent: s.agent,
                        payload: s.payload,
                        priority: s.priority,
                        review: s.review,
                    })
                    .collect(),
                needs_review: outcome.needs_review,
            },
            Err(Failure::Retryable(message)) => RunOutcome::Failure(TaskError {
                kind: ErrorKind::Retryable,
                message: bounded_failure_message(message),
            }),
            Err(Failure::Permanent(message)) => RunOutcome::Failure(TaskError {
                kind: ErrorKind::Permanent,
                message: bounded_failure_message(message),
            }),
        }
    }};
}

/// How long a component's start-up may take when it is loaded.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the engine's epoch advances: the granularity at which running
/// guests yield to the executor (and so at which deadlines are noticed).
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Errors while setting up the runtime or loading a component.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine, linker or epoch thread could not be set up; the message
    /// keeps the whole cause chain.
    #[error("could not start the wasm engine: {0:#}")]
    Engine(wasmtime::Error),
    #[error("{path}: {reason}")]
    Load { path: PathBuf, reason: String },
}

/// The longest wall-clock budget of a run (`--timeout`, a manifest's
/// `timeout`): no run needs more, and a year of ms fits every integer the
/// queue stores it in.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(31_557_600); // 365.25 days

/// Per-run limits. Defaults, raised or lowered per agent by its manifest and
/// per task by its `timeout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget for one run (instantiation included).
    pub timeout: Duration,
    /// Linear memory cap, in bytes.
    pub memory_bytes: usize,
    /// Fuel for one run (roughly, wasm instructions); `None` is unmetered.
    pub fuel: Option<u64>,
    /// How many runs of this agent may be in flight at once.
    pub concurrency: u32,
    /// Bytes of each of log lines, stdout and stderr kept per run.
    pub log_bytes: usize,
    /// A host directory the agent may read, mounted at `/data`.
    pub read_only_dir: Option<PathBuf>,
    /// Model aliases the agent may call (`models = [...]` in its manifest).
    pub models: Arc<[String]>,
    /// Tokens one task may spend on model calls; `None` is unlimited.
    pub token_budget: Option<u64>,
    /// Outbound HTTP: allowed origins, secrets, bounds (default: none).
    pub http: Arc<HttpGrant>,
    /// Delivery attempts of each effect the agent queues (default 5).
    pub effect_attempts: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(300),
            memory_bytes: 128 << 20,
            fuel: None,
            concurrency: 4,
            log_bytes: 64 << 10,
            read_only_dir: None,
            models: Arc::from([]),
            token_budget: None,
            http: Arc::default(),
            effect_attempts: crate::effects::DEFAULT_DELIVERY_ATTEMPTS,
        }
    }
}

/// Runtime-wide settings.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Where compiled components are cached (by content and engine hash).
    /// `None` compiles on every load.
    pub cache_dir: Option<PathBuf>,
    /// Most runs in flight at once across all agents: sizes the instance pool.
    pub max_concurrent_runs: u32,
    /// Whether to try the pooling allocator (falls back when unavailable).
    pub pooling: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cache_dir: None,
            max_concurrent_runs: 64,
            pooling: true,
        }
    }
}

/// How a run ended, with what it printed and the state it wrote.
#[derive(Debug)]
pub struct RunReport {
    pub outcome: RunOutcome,
    pub log: String,
    pub elapsed: Duration,
    /// Buffered state writes, to commit with a successful completion.
    pub state_writes: Vec<crate::state::Write>,
    /// Queued effects, to store with a successful completion.
    pub effects: Vec<crate::effects::Effect>,
}

/// A loaded, validated agent component, ready to instantiate.
pub struct Agent {
    pub name: String,
    pub path: PathBuf,
    /// SHA-256 of the component bytes, hex.
    pub hash: String,
    pub limits: Limits,
    pre: AgentPre,
    /// The engine it was compiled for (see [`LARGE_COMPONENT`]).
    engine: Engine,
}

/// A component ready to instantiate, by the contract version it was built against.
enum AgentPre {
    Current(bindings::AgentPre<RunState>),
    V0_1(bindings_v0_1::AgentPre<RunState>),
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish()
    }
}

/// The wasm engines and everything shared between runs.
pub struct Runtime {
    /// For components under [`LARGE_COMPONENT`].
    small: Flavor,
    /// For larger ones; made when the first is loaded.
    large: Arc<std::sync::OnceLock<Result<Flavor, String>>>,
    config: RuntimeConfig,
    /// The operator's model providers (keys stay here, never in a `Store`).
    models: Option<Arc<Providers>>,
    pooling: bool,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Builds the engine for small components (see [`Flavor::new`]); the
    /// one for large components is made when the first is loaded.
    pub fn new(config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let (small, pooling) = Flavor::new(&config, false)?;
        let large: Arc<std::sync::OnceLock<Result<Flavor, String>>> = Default::default();
        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (ticker_engine, ticker_large, stop) =
            (small.engine.clone(), large.clone(), stop_ticker.clone());
        std::thread::Builder::new()
            .name("colony-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                    if let Some(Ok(large)) = ticker_large.get() {
                        large.engine.increment_epoch();
                    }
                }
            })
            .map_err(|e| {
                RuntimeError::Engine(wasmtime::Error::new(e).context("starting the epoch thread"))
            })?;
        Ok(Runtime {
            small,
            large,
            config,
            models: None,
            pooling,
            stop_ticker,
        })
    }

    /// The flavor for a component of `len` bytes.
    fn flavor(&self, len: usize) -> Result<&Flavor, String> {
        if len < LARGE_COMPONENT {
            return Ok(&self.small);
        }
        self.large
            .get_or_init(|| {
                Flavor::new(&self.config, true)
                    .map(|(flavor, _)| flavor)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Lets agents call the operator's models (each within its manifest's grants).
    pub fn set_models(&mut self, providers: Arc<Providers>) {
        self.models = Some(providers);
    }

    /// The aliases of `granted` that the operator's configuration does not
    /// declare: calls to them will be refused. None when it declares no
    /// models at all: agents then fall back by design (the store agents use
    /// templates).
    pub fn unconfigured_models<'a>(&self, granted: &'a [String]) -> Vec<&'a str> {
        let Some(models) = &self.models else {
            return Vec::new();
        };
        granted
            .iter()
            .filter(|alias| !models.has_alias(alias))
            .map(String::as_str)
            .collect()
    }

    /// Whether the operator's configuration declares the model alias
    /// `alias` (None if not), and with prices (so its calls have a cost).
    pub fn model_priced(&self, alias: &str) -> Option<bool> {
        let config = self.models.as_ref()?.config(alias)?;
        Some(config.input_usd_per_mtok.is_some() || config.output_usd_per_mtok.is_some())
    }

    /// Whether runs use the pooling allocator.
    pub fn is_pooling(&self) -> bool {
        self.pooling
    }

    /// Compiles (or loads from the cache) and validates a component: it must
    /// be a component, its imports must be ones the host provides, it must
    /// export `colony:agent/handler`, and it must instantiate without trapping.
    pub async fn load_agent(
        &self,
        name: &str,
        path: &Path,
        bytes: &[u8],
        limits: Limits,
    ) -> Result<Agent, RuntimeError> {
        let fail = |reason: String| RuntimeError::Load {
            path: path.to_path_buf(),
            reason,
        };
        let hash = hex(&Sha256::digest(bytes));
        let flavor = self.flavor(bytes.len()).map_err(fail)?;
        // Compiling takes CPU for a while: keep other tasks on this executor moving.
        let component = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.compile(&flavor.engine, bytes, &hash))
            }
            _ => self.compile(&flavor.engine, bytes, &hash),
        }
        .map_err(fail)?;
        let instance_pre = flavor
            .linker
            .instantiate_pre(&component)
            // `{:#}`: the causes say which function does not match.
            .map_err(|e| fail(format!("its imports do not all match what the host provides (WASI 0.2, wasi:http's outgoing-handler, and colony:agent@0.2.0's host, model, state and effects or @0.1.0's host, as released; `colony wit --out DIR` writes them to build against): {e:#}")))?;
        let pre = match bindings::AgentPre::new(instance_pre.clone()) {
            Ok(pre) => AgentPre::Current(pre),
            Err(current) => bindings_v0_1::AgentPre::new(instance_pre)
                .map(AgentPre::V0_1)
                .map_err(|_| fail(format!("it is not a colony:agent/agent component (it must export colony:agent/handler@0.2.0 or @0.1.0, as released; `colony wit --out DIR` writes them to build against): {current:#}")))?,
        };
        let agent = Agent {
            name: name.to_string(),
            path: path.to_path_buf(),
            hash,
            limits,
            pre,
            engine: flavor.engine.clone(),
        };
        // A trial instantiation catches components whose start-up traps.
        let trial_lease = Lease {
            task_id: 0,
            token: 0,
        };
        let mut store = self
            .new_store(
                &agent,
                trial_lease,
                0,
                0,
                TaskLog::new(4096),
                Arc::new(NoHooks),
            )
            .map_err(|e| fail(error_chain(&e)))?;
        let trial = tokio::time::timeout(TRIAL_TIMEOUT, async {
            match &agent.pre {
                AgentPre::Current(pre) => pre.instantiate_async(&mut store).await.map(drop),
                AgentPre::V0_1(pre) => pre.instantiate_async(&mut store).await.map(drop),
            }
        })
        .await;
        match trial {
            Ok(Ok(_)) => Ok(agent),
            Ok(Err(e)) => Err(fail(format!(
                "instantiating it failed: {}{}",
                error_chain(&e),
                manifest_limit_hint(&e, &agent.limits, &path.with_extension("toml"))
            ))),
            Err(_) => Err(fail(format!(
                "instantiating it did not finish within {}",
                humantime::format_duration(TRIAL_TIMEOUT)
            ))),
        }
    }

    /// Compiles a component, going through the on-disk cache when configured
    /// (see `cache.rs`).
    fn compile(&self, engine: &Engine, bytes: &[u8], hash: &str) -> Result<Component, String> {
        let describe = |e: wasmtime::Error| {
            let text = format!("{e:#}");
            match not_a_component(bytes) {
                Some(NotAComponent::CoreModule(why)) => format!("{why}: {text}"),
                // wasmtime's text here is a multi-line dump of the magic bytes.
                Some(NotAComponent::NotWasm(why)) => why,
                None => format!("it is not a valid component: {text}"),
            }
        };
        let Some(dir) = &self.config.cache_dir else {
            return Component::new(engine, bytes).map_err(describe);
        };
        cache::load_or_compile(engine, bytes, hash, dir, describe)
    }

    fn new_store(
        &self,
        agent: &Agent,
        lease: Lease,
        attempt: u32,
        chain: i64,
        log: TaskLog,
        hooks: Arc<dyn RunHooks>,
    ) -> wasmtime::Result<Store<RunState>> {
        let model = ModelSession::new(
            self.models.clone(),
            agent.limits.models.clone(),
            agent.limits.token_budget,
            hooks.clone(),
            lease,
            attempt,
        );
        let http =
            http::HttpSession::new(agent.limits.http.clone(), hooks.clone(), lease, log.clone());
        let state = RunState::new(
            lease,
            chain,
            Arc::from(agent.name.as_str()),
            agent.limits.memory_bytes,
            log,
            hooks,
            model,
            http,
            agent.limits.read_only_dir.as_deref(),
        )?;
        let mut store = Store::new(&agent.engine, state);
        store.data_mut().effects.max_attempts = agent.limits.effect_attempts;
        store.limiter(|state| &mut state.limiter);
        store.set_fuel(agent.limits.fuel.unwrap_or(u64::MAX))?;
        // Yield to the executor at every tick: the deadline is enforced by
        // the executor's timer, which a spinning guest must not starve.
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        Ok(store)
    }

    /// Runs one claimed task in a fresh instance of `agent`, within its
    /// limits (the task's `timeout_ms` overrides the agent's deadline).
    pub async fn run(
        &self,
        agent: &Agent,
        task: &ClaimedTask,
        hooks: Arc<dyn RunHooks>,
    ) -> RunReport {
        let started = Instant::now();
        let log = TaskLog::new(agent.limits.log_bytes);
        let deadline = task
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(agent.limits.timeout);
        let mut store = match self.new_store(
            agent,
            task.lease,
            task.attempt,
            task.chain,
            log.clone(),
            hooks,
        ) {
            Ok(store) => store,
            Err(e) => {
                return report(
                    crash(format!("could not set up the sandbox: {}", error_chain(&e))),
                    &log,
                    started,
                );
            }
        };
        store
            .data_mut()
            .model
            .end_waits_by(Instant::now() + deadline);
        let call = async {
            match &agent.pre {
                AgentPre::Current(pre) => {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let task = guest_task!(bindings, task);
                    let answer = instance
                        .colony_agent_handler()
                        .call_run(&mut store, &task)
                        .await?;
                    Ok(outcome_from_guest!(bindings, answer))
                }
                AgentPre::V0_1(pre) => {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let task = guest_task!(bindings_v0_1, task);
                    let answer = instance
                        .colony_agent_handler()
                        .call_run(&mut store, &task)
                        .await?;
                    Ok(outcome_from_guest!(bindings_v0_1, answer))
                }
            }
        };
        let result: Result<wasmtime::Result<RunOutcome>, _> =
            tokio::time::timeout(deadline, call).await;
        let outcome = match result {
            Err(_) => RunOutcome::Failure(TaskError {
                kind: ErrorKind::Timeout,
                message: format!(
                    "the run exceeded its {} deadline",
                    humantime::format_duration(deadline)
                ),
            }),
            Ok(Ok(outcome)) => outcome,
            Ok(Err(trap)) => RunOutcome::Failure(classify_trap(
                &trap,
                store.data().limiter.denied,
                agent,
                &log,
            )),
        };
        // The run's `http_request` events are stored before its result.
        store.data_mut().http.finish().await;
        let data = store.data_mut();
        let mut outcome = charge_budget_refusal(outcome, data.model.budget_exceeded);
        if let Some(why) = data.state.invalid.take() {
            outcome = match outcome {
                // A failed run's writes go with it, unchecked: its own
                // failure stands (a retryable one was made a permanent
                // invalid_output, its attempts left unused).
                RunOutcome::Failure(mut error) => {
                    error.message = format!(
                        "{} (its state writes, discarded with the run, were invalid too: {why})",
                        error.message
                    );
                    RunOutcome::Failure(error)
                }
                RunOutcome::Success { .. } => RunOutcome::Failure(TaskError {
                    kind: ErrorKind::InvalidOutput,
                    message: format!("invalid use of state: {why}"),
                }),
            };
        }
        let mut report = report(outcome, &log, started);
        report.state_writes = std::mem::take(&mut data.state.writes);
        report.effects = std::mem::take(&mut data.effects.queued);
        report
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a file cannot be a component, judged from its first eight bytes:
/// cheap enough for `submit` to warn about before any compile.
pub enum NotAComponent {
    /// Not WebAssembly at all (the reason names its first bytes).
    NotWasm(String),
    /// A core module: wasm, but not a component.
    CoreModule(String),
}

impl NotAComponent {
    /// The reason, as a sentence.
    pub fn reason(self) -> String {
        match self {
            NotAComponent::NotWasm(why) | NotAComponent::CoreModule(why) => why,
        }
    }
}

pub fn not_a_component(start: &[u8]) -> Option<NotAComponent> {
    if start.is_empty() {
        return Some(NotAComponent::NotWasm("the file is empty".into()));
    }
    if start.len() < 4 || start[..4] != *b"\0asm" {
        let first: Vec<String> = start.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Some(NotAComponent::NotWasm(format!(
            "it is not a WebAssembly file (it starts with the bytes {}, not 00 61 73 6d, \"\\0asm\")",
            first.join(" ")
        )));
    }
    if start.len() >= 8 && start[4..8] == [1, 0, 0, 0] {
        return Some(NotAComponent::CoreModule(
            "it is a core wasm module, not a component (build it for wasm32-wasip2 or wrap it with `wasm-tools component new`)".into(),
        ));
    }
    None
}
