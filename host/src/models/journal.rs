//! The model-call journal's records: what a run asked and what came back.
//! The queue stores them (durably, before the reply reaches the agent); a
//! retry after an interruption replays them instead of paying again. Plain
//! data: the runtime produces and consumes it, knowing no SQL.

use serde::{Deserialize, Serialize};

use super::{ChatReply, ChatRequest, ModelError, Usage};

/// One model call of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelCall {
    /// 1 for the run's first call, 2 for the next, ...
    pub seq: u32,
    /// The alias the agent asked for.
    pub alias: String,
    /// [`super::request_hash`] of the request: replay matches on it.
    pub request_hash: String,
    /// The request as the agent sent it (kept in the journal, never in events).
    pub request: ChatRequest,
    /// The reply, or why there was none.
    pub outcome: Result<ChatReply, ModelError>,
    /// Tokens the provider charged; zero for a replayed or refused call.
    pub charged: Usage,
    /// What the charged tokens cost, when the alias has prices.
    pub cost_usd: Option<f64>,
    /// Wall-clock time of the call, retries included.
    pub ms: u64,
    /// True when the reply came from the journal of an interrupted run.
    pub replayed: bool,
    /// False for a call this host refused before any provider saw it: the
    /// journal keeps no prompt for it and a later run does not replay it.
    pub sent: bool,
}

impl ModelCall {
    /// `ok`, or the error kind (`budget_exceeded`, `rate_limited`, ...).
    pub fn status(&self) -> &'static str {
        match &self.outcome {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        }
    }
}

/// What a run replays: the calls of the previous run, in order, when that
/// run was interrupted (crash, lost lease, shutdown, deadline, trap).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelContext {
    pub replay: Vec<ModelCall>,
}

/// The answer to a reservation of tokens for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// No budget applies to the task.
    Unlimited,
    /// Set aside; this many tokens remain after it.
    Reserved { left: u64 },
    /// Not enough left: only this many tokens remain of the budget that
    /// refused (the tighter one, when both apply).
    Refused { left: u64, by: BudgetOf },
}

/// Which budget a call met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetOf {
    /// The agent's manifest `token_budget`: this many tokens per task.
    Manifest(u64),
    /// The chain's `--token-budget`, set on its root task.
    Chain { root: i64, budget: u64 },
}

impl BudgetOf {
    /// What a person reads in a `budget_exceeded` error of task `task`:
    /// which budget, and what raises it.
    pub fn describe(&self, left: u64, task: i64) -> String {
        match self {
            BudgetOf::Manifest(budget) => format!(
                "the task has {left} left of the {budget} tokens its agent's manifest allows a task \
                 (`token_budget`; a retry's --token-budget cannot raise it, only the manifest can)"
            ),
            BudgetOf::Chain { root, budget } => format!(
                "the chain (root task {root}) has {left} left of its budget of {budget} tokens \
                 (`colony retry {task} --token-budget N` gives it N in all)"
            ),
        }
    }
}
