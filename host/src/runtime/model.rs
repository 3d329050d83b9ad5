//! The host side of `colony:agent/model`: a run's model calls, checked
//! against the agent's grants and the task's token budget, replayed from the
//! journal after an interruption, and recorded in it.
//!
//! The session knows neither SQL nor keys: it reaches the journal through
//! [`RunHooks`] (the daemon's side) and providers through
//! [`Providers`], which hold the keys outside every `Store`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::models::{
    Budget, ChatReply, ChatRequest, ModelCall, ModelContext, ModelError, Providers, Usage,
    request_hash,
};
use crate::task::Lease;

use super::sandbox::RunHooks;

/// What the session learned from the journal before its first call.
struct Loaded {
    /// Replies of the interrupted previous run, not replayed yet.
    replay: VecDeque<ModelCall>,
}

/// One run's model access.
pub struct ModelSession {
    providers: Option<Arc<Providers>>,
    granted: Arc<[String]>,
    manifest_budget: Option<u64>,
    hooks: Arc<dyn RunHooks>,
    lease: Lease,
    attempt: u32,
    loaded: Option<Loaded>,
    seq: u32,
    /// Set once a call was refused for want of tokens: the run's failure is
    /// then recorded as `budget_exceeded` and not retried.
    pub(super) budget_exceeded: bool,
    /// Calls this host refused before any provider saw them (not granted,
    /// over budget, its own rate limit), each journaled (see
    /// [`MAX_REFUSED_CALLS`]).
    refused_calls: usize,
    /// The last of them: past the cap, calls are refused as it was, so the
    /// agent still learns why (not granted, over budget).
    last_refusal: Option<ModelError>,
    /// The run's deadline: a call whose turn under its alias's rate limit
    /// would come later is refused at once, saying so (it waited, and the
    /// run ended as a bare timeout).
    run_deadline: Option<Instant>,
}

/// What [`ModelSession::answer`] came to.
struct Answer {
    outcome: Result<ChatReply, ModelError>,
    replayed: bool,
    charged: Usage,
    cost: Option<f64>,
    sent: bool,
}

/// Most calls of one run this host refuses and journals: a guest calling
/// an alias it is not granted in a loop wrote 421,000 journal rows (and
/// with long prompts 4.5 GB) in 20 s. Past it, calls are refused at once,
/// unrecorded. (Calls that reach a provider are bounded by its answers, the
/// alias's timeout and the budget.)
pub const MAX_REFUSED_CALLS: usize = 100;

impl ModelSession {
    pub fn new(
        providers: Option<Arc<Providers>>,
        granted: Arc<[String]>,
        manifest_budget: Option<u64>,
        hooks: Arc<dyn RunHooks>,
        lease: Lease,
        attempt: u32,
    ) -> ModelSession {
        ModelSession {
            providers,
            granted,
            manifest_budget,
            hooks,
            lease,
            attempt,
            loaded: None,
            seq: 0,
            budget_exceeded: false,
            refused_calls: 0,
            last_refusal: None,
            run_deadline: None,
        }
    }

    /// Sets the run's deadline (see `run_deadline`).
    pub fn end_waits_by(&mut self, deadline: Instant) {
        self.run_deadline = Some(deadline);
    }

    /// Reads the replayable calls on first use, so runs that never call a
    /// model cost nothing.
    async fn load(&mut self) -> Result<&mut Loaded, ModelError> {
        if self.loaded.is_none() {
            let context: ModelContext =
                self.hooks.model_context(self.lease).await.map_err(|e| {
                    ModelError::Unavailable(format!(
                        "the task's model journal could not be read: {e}"
                    ))
                })?;
            self.loaded = Some(Loaded {
                replay: context.replay.into(),
            });
        }
        Ok(self.loaded.as_mut().expect("just loaded"))
    }

    /// Sets `need` tokens aside for the current call against the task's and
    /// the chain's budgets (the daemon counts what other live runs of the
    /// chain have set aside).
    async fn reserve(&self, need: u64) -> Result<Budget, ModelError> {
        self.hooks
            .reserve_tokens(self.lease, self.seq, need, self.manifest_budget)
            .await
            .map_err(|e| {
                ModelError::Unavailable(format!("the task's budget could not be read: {e}"))
            })
    }

    /// Whether the budgets could cover `need` tokens now (a read; the
    /// reservation decides). Yes when that cannot be read.
    async fn affords(&self, need: u64) -> bool {
        match self.reserve(0).await {
            Ok(Budget::Reserved { left }) => need <= left,
            _ => true,
        }
    }

    /// Tokens this run may still spend: none for an agent granted no
    /// model, without asking the queue (a guest calling this in a loop
    /// would otherwise be a write transaction each time).
    pub async fn remaining(&mut self) -> Result<Option<u64>, ModelError> {
        if self.granted.is_empty() || self.providers.is_none() {
            return Ok(Some(0));
        }
        Ok(match self.reserve(0).await? {
            Budget::Unlimited => None,
            Budget::Reserved { left } | Budget::Refused { left, .. } => Some(left),
        })
    }

    /// One call: granted? replayable? affordable? Then the provider. Every
    /// call, refused ones included, is recorded before its answer returns.
    pub async fn complete(
        &mut self,
        request: ChatRequest,
    ) -> Result<(ChatReply, bool), ModelError> {
        if self.refused_calls >= MAX_REFUSED_CALLS {
            let last = self.last_refusal.as_ref();
            let why = format!(
                "this host refused {MAX_REFUSED_CALLS} of this run's model calls (the last: {}); \
                 further calls are refused unrecorded",
                last.map_or("", ModelError::message)
            );
            return Err(match last {
                Some(refusal) => refusal.same_kind(why),
                None => ModelError::RateLimited(why),
            });
        }
        self.seq += 1;
        let started = Instant::now();
        let hash = request_hash(&request);
        // Shared with the call's guard, which records it should the run
        // end while the provider has it (a prompt may be megabytes).
        let request = Arc::new(request);
        let Answer {
            outcome,
            replayed,
            charged,
            cost,
            sent,
        } = self.answer(&request, &hash).await;
        if !sent {
            self.refused_calls += 1;
            self.last_refusal = outcome.as_ref().err().cloned();
        }
        if matches!(outcome, Err(ModelError::BudgetExceeded(_))) {
            self.budget_exceeded = true;
        }
        let call = ModelCall {
            seq: self.seq,
            alias: request.model.clone(),
            request_hash: hash,
            // The guard is gone by now: no copy.
            request: Arc::try_unwrap(request).unwrap_or_else(|shared| (*shared).clone()),
            outcome,
            charged,
            cost_usd: cost,
            ms: started.elapsed().as_millis() as u64,
            replayed,
            sent,
        };
        if let Err(e) = self
            .hooks
            .record_model_call(self.lease, self.attempt, &call)
            .await
        {
            // The reply is real and paid for: the agent gets it even if the
            // journal could not keep it (a retry would then pay again).
            tracing::warn!(
                task = self.lease.task_id,
                seq = call.seq,
                "could not journal a model call: {e}"
            );
        }
        call.outcome.map(|reply| (reply, replayed))
    }

    /// The call's reply or error, whether it was replayed, what it was
    /// charged and cost, and whether it reached a provider (or the
    /// journal): false for a call this host refused.
    async fn answer(&mut self, request: &Arc<ChatRequest>, hash: &str) -> Answer {
        let refused = |e| Answer {
            outcome: Err(e),
            replayed: false,
            charged: Usage::default(),
            cost: None,
            sent: false,
        };
        let providers = match &self.providers {
            Some(p) if self.granted.contains(&request.model) && p.has_alias(&request.model) => {
                p.clone()
            }
            _ => return refused(self.not_granted(&request.model)),
        };
        let seq = self.seq;
        let loaded = match self.load().await {
            Ok(loaded) => loaded,
            Err(e) => return refused(e),
        };
        if let Some(recorded) = take_replay(&mut loaded.replay, seq, hash) {
            return Answer {
                outcome: Ok(recorded),
                replayed: true,
                charged: Usage::default(),
                cost: None,
                sent: true,
            };
        }
        let turn = match providers.take_turn(request) {
            Ok(turn) => turn,
            Err(failure) => return refused(failure.error),
        };
        if let Some(deadline) = self.run_deadline
            && let Err(e) = turn.comes_by(deadline)
        {
            return refused(e);
        }
        let need = turn.tokens();
        // Tokens are set aside once the call's turn has come: a host killed
        // while the call waits for its alias's rate limit leaves no
        // reservation behind (nothing could release it then, and it would
        // count against the budgets for good). A call its budget cannot
        // cover does not wait first: it would hold up the alias's other
        // calls only to be refused (the reservation below refuses it).
        if turn.waits() && self.affords(need).await {
            turn.come().await;
        }
        // Armed before the reservation is written: a run dropped while it
        // waits for that write gives it back too.
        let mut unsent = UnsentReservation::new(self.hooks.clone(), self.lease, self.seq);
        match self.reserve(need).await {
            Err(e) => return refused(e),
            Ok(Budget::Refused { left, by }) => {
                unsent.disarm(); // nothing was set aside
                return refused(ModelError::BudgetExceeded(format!(
                    "this call may take up to {need} tokens (prompt estimate plus max-tokens) and {}",
                    by.describe(left, self.lease.task_id)
                )));
            }
            Ok(Budget::Unlimited | Budget::Reserved { .. }) => {}
        }
        // Last, after any other wait: the reservation proved the lease held
        // when it was written, not that nobody else holds it now.
        self.hooks.wait_while_lease_in_doubt(self.lease).await;
        unsent.record_if_cut_off(self.attempt, request, hash);
        let called = providers.send(turn, request, &unsent.on_wire).await;
        unsent.disarm(); // the call's record, which follows, settles it
        let (outcome, charged, sent) = match called {
            Ok(reply) => {
                let usage = reply.usage;
                (Ok(reply), usage, true)
            }
            // A reply the provider sent but the host could not read still
            // counts against the budget.
            Err(failure) => (Err(failure.error), failure.charged, failure.sent),
        };
        let cost = providers.cost_usd(&request.model, &charged);
        Answer {
            outcome,
            replayed: false,
            charged,
            cost,
            sent,
        }
    }

    fn not_granted(&self, alias: &str) -> ModelError {
        let known = self.providers.as_ref().is_some_and(|p| p.has_alias(alias));
        ModelError::NotGranted(match (known, self.granted.is_empty()) {
            (false, _) => format!("no model alias {alias:?} is configured on this host"),
            (true, true) => {
                format!("this agent's manifest grants no models (add models = [{alias:?}])")
            }
            (true, false) => {
                format!("this agent's manifest does not grant the model alias {alias:?}")
            }
        })
    }
}

/// A call's reservation while the call is under way. A reservation counts
/// against the budgets until the call's record settles it, also after its
/// run ended (see `Queue::reserve_model_tokens`): a call cut off while its
/// request was out with the provider may have been charged, and is
/// recorded here as made, its reservation kept. One dropped before any
/// request went out, or between retries (the run's deadline passed, it was
/// cancelled, the daemon stopped) was not, and its reservation is released
/// here.
struct UnsentReservation {
    hooks: Arc<dyn RunHooks>,
    lease: Lease,
    seq: u32,
    on_wire: AtomicBool,
    armed: bool,
    /// What to record of the call should it be cut off on the wire.
    cut_off: Option<CutOff>,
}

/// What a call's guard keeps to record it should it be cut off on the wire.
struct CutOff {
    attempt: u32,
    hash: String,
    request: Arc<ChatRequest>,
    started: Instant,
}

/// What a call cut off on the wire says in the journal.
const CUT_OFF: &str = "cut off: the run ended (its deadline, a cancel or a shutdown) while this request was out with the provider, which may bill it; its reserved tokens stay counted against the budgets";

impl UnsentReservation {
    fn new(hooks: Arc<dyn RunHooks>, lease: Lease, seq: u32) -> UnsentReservation {
        UnsentReservation {
            hooks,
            lease,
            seq,
            on_wire: AtomicBool::new(false),
            armed: true,
            cut_off: None,
        }
    }

    /// Keeps what to record of the call should its run end while the
    /// provider has its request.
    fn record_if_cut_off(&mut self, attempt: u32, request: &Arc<ChatRequest>, hash: &str) {
        self.cut_off = Some(CutOff {
            attempt,
            hash: hash.to_string(),
            request: request.clone(),
            started: Instant::now(),
        });
    }

    /// Leaves the reservation be: none was made, or the call came back
    /// and its record settles it.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for UnsentReservation {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if !self.on_wire.load(Ordering::Acquire) {
            self.hooks.release_reservation_later(self.lease, self.seq);
        } else if let Some(cut) = self.cut_off.take() {
            let call = ModelCall {
                seq: self.seq,
                alias: cut.request.model.clone(),
                request_hash: cut.hash,
                request: (*cut.request).clone(),
                outcome: Err(ModelError::Unavailable(CUT_OFF.into())),
                charged: Usage::default(),
                cost_usd: None,
                ms: cut.started.elapsed().as_millis() as u64,
                replayed: false,
                sent: true,
            };
            self.hooks
                .record_cut_off_call_later(self.lease, cut.attempt, call);
        }
    }
}

/// The recorded reply of the previous run's call `seq`, if it asked the
/// same question there. Calls are matched by their place in the run (`seq`
/// counts every call, refused ones too), not by their order in the
/// journal: a call this host refused is not in it, and a call refused in
/// this run never gets here, so counting entries would pair each later
/// call with the wrong record and end replay (paying again). A recorded
/// error is not replayed (the call is made for real) but replay goes on
/// after it; the first different question ends replay for the rest of the
/// run: the agent is on a new path.
fn take_replay(replay: &mut VecDeque<ModelCall>, seq: u32, hash: &str) -> Option<ChatReply> {
    while replay.front().is_some_and(|call| call.seq < seq) {
        replay.pop_front();
    }
    if replay.front()?.seq > seq {
        return None; // the previous run's call here was refused: nothing to replay
    }
    let recorded = replay.pop_front()?;
    if recorded.request_hash != hash {
        replay.clear();
        return None;
    }
    recorded.outcome.ok()
}

// ----- the WIT interface ---------------------------------------------------------

use super::bindings::colony::agent::model as wit;
use super::sandbox::RunState;
use crate::models::{Finish, Message, Role, Tool, ToolCall};

impl wit::Host for RunState {
    async fn complete(&mut self, req: wit::Request) -> Result<wit::Reply, wit::ModelError> {
        let (reply, replayed) = self
            .model
            .complete(request_from_wit(req))
            .await
            .map_err(error_to_wit)?;
        Ok(reply_to_wit(reply, replayed))
    }

    async fn remaining(&mut self) -> Option<u64> {
        // An unreadable journal leaves the budget unknown: say "none left"
        // rather than "unlimited", so the agent does not plan on tokens it
        // may not have; its calls will say why.
        self.model.remaining().await.unwrap_or(Some(0))
    }
}

/// Longest model alias kept of a guest's request: a host's aliases are at
/// most 64 characters, so a longer one names none, and it is kept cut (it
/// goes into the refusal, the journal and the trail, where a guest asking
/// for 20 MB names filled gigabytes).
const MAX_ALIAS_BYTES: usize = 64;

fn request_from_wit(req: wit::Request) -> ChatRequest {
    ChatRequest {
        model: super::sandbox::truncate(req.model, MAX_ALIAS_BYTES),
        messages: req.messages.into_iter().map(message_from_wit).collect(),
        tools: req
            .tools
            .into_iter()
            .map(|t| Tool {
                name: t.name,
                description: t.description,
                parameters: t.parameters,
            })
            .collect(),
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        json: req.json,
    }
}

fn message_from_wit(m: wit::Message) -> Message {
    Message {
        role: match m.role {
            wit::Role::System => Role::System,
            wit::Role::User => Role::User,
            wit::Role::Assistant => Role::Assistant,
            wit::Role::Tool => Role::Tool,
        },
        content: m.content,
        tool_calls: m.tool_calls.into_iter().map(tool_call_from_wit).collect(),
        tool_call_id: m.tool_call_id,
    }
}

fn tool_call_from_wit(c: wit::ToolCall) -> ToolCall {
    ToolCall {
        id: c.id,
        name: c.name,
        arguments: c.arguments,
    }
}

fn reply_to_wit(reply: ChatReply, replayed: bool) -> wit::Reply {
    wit::Reply {
        content: reply.content,
        tool_calls: reply
            .tool_calls
            .into_iter()
            .map(|c| wit::ToolCall {
                id: c.id,
                name: c.name,
                arguments: c.arguments,
            })
            .collect(),
        finish: match reply.finish {
            Finish::Stop => wit::Finish::Stop,
            Finish::Length => wit::Finish::Length,
            Finish::ToolCalls => wit::Finish::ToolCalls,
            Finish::Other => wit::Finish::Other,
        },
        usage: wit::Usage {
            input_tokens: reply.usage.input_tokens,
            output_tokens: reply.usage.output_tokens,
        },
        model: reply.model,
        replayed,
    }
}

fn error_to_wit(e: ModelError) -> wit::ModelError {
    match e {
        ModelError::NotGranted(m) => wit::ModelError::NotGranted(m),
        ModelError::BudgetExceeded(m) => wit::ModelError::BudgetExceeded(m),
        ModelError::RateLimited(m) => wit::ModelError::RateLimited(m),
        ModelError::Unavailable(m) => wit::ModelError::Unavailable(m),
        ModelError::InvalidRequest(m) => wit::ModelError::InvalidRequest(m),
    }
}
