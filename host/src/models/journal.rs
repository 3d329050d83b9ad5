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

/// What a run needs to know before its first model call: how much it may
/// still spend and which replies it may replay. Loaded lazily, so runs that
/// never call a model never pay for it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelContext {
    /// The budget of the task's chain, when its root task set one
    /// (`colony submit --token-budget`): every task of the chain spends from it.
    pub chain_budget: Option<u64>,
    /// Tokens charged so far to the whole chain.
    pub chain_spent: u64,
    /// Tokens charged so far to this task, over all its runs.
    pub task_spent: u64,
    /// The calls of the previous run, in order, when that run was
    /// interrupted (crash, lost lease, shutdown, deadline, trap).
    pub replay: Vec<ModelCall>,
}

impl ModelContext {
    /// Tokens left for this run: the tighter of what is left of the chain's
    /// budget (when its root set one) and of the agent's per-task budget
    /// (`token_budget` in its manifest).
    pub fn remaining(&self, manifest_budget: Option<u64>) -> Option<u64> {
        let chain = self
            .chain_budget
            .map(|b| b.saturating_sub(self.chain_spent));
        let task = manifest_budget.map(|b| b.saturating_sub(self.task_spent));
        match (chain, task) {
            (Some(c), Some(t)) => Some(c.min(t)),
            (c, t) => c.or(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tighter_of_the_chain_and_the_task_budget_applies() {
        let context = |chain_budget, chain_spent, task_spent| ModelContext {
            chain_budget,
            chain_spent,
            task_spent,
            replay: Vec::new(),
        };
        assert_eq!(context(None, 0, 0).remaining(None), None);
        assert_eq!(context(None, 0, 300).remaining(Some(1000)), Some(700));
        assert_eq!(context(Some(500), 200, 0).remaining(None), Some(300));
        assert_eq!(
            context(Some(5000), 200, 900).remaining(Some(1000)),
            Some(100)
        );
        assert_eq!(context(Some(500), 450, 0).remaining(Some(1000)), Some(50));
        assert_eq!(context(Some(100), 900, 0).remaining(None), Some(0));
    }
}
