//! The model-call journal and usage accounting: every statement about
//! `model_calls`. A call is stored fenced by its run's lease, with its
//! `model_call` audit event, before its reply reaches the agent.

use serde_json::json;

use super::sql::{Row, Sql, args};
use super::{Applied, Queue, QueueError, Result};
use crate::models::{
    Budget, BudgetOf, ChatReply, ChatRequest, ModelCall, ModelContext, ModelError, Usage,
};
use crate::task::{Lease, State};

/// What a task's model calls added up to.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TaskUsage {
    /// Tokens charged by providers (replayed calls charge nothing).
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Calls sent to a provider.
    pub calls: u64,
    /// Calls this host refused before any provider saw them (not granted,
    /// over budget, its rate limit): journaled, never sent, never charged.
    pub refused: u64,
    /// Calls answered from the journal.
    pub replayed: u64,
    /// `None` when no call had a price.
    pub cost_usd: Option<f64>,
    /// Tokens set aside by calls with no recorded answer: in flight, or cut
    /// off while their request was out with the provider (which may have
    /// charged them). They count against the budgets, not in the tokens
    /// above. Counted for one task (`Queue::usage`), 0 in sums over many.
    pub reserved_tokens: u64,
}

/// One journal row, as `colony show` lists it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelCallRow {
    /// Which of the task's runs made it: 1 for the first run that called a
    /// model, 2 for the next... (attempts do not tell a review's revisions,
    /// or a run given back, from the run before).
    pub run: u32,
    pub attempt: u32,
    pub seq: u32,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: Option<f64>,
    pub replayed: bool,
    pub status: String,
    pub ms: u64,
    pub at: i64,
    /// Whether it reached a provider (or the journal): false for a call
    /// this host refused (not granted, over a budget or a rate limit).
    pub sent: bool,
}

/// A chain's token budget and what it has spent (see
/// [`Queue::chain_budget`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainBudget {
    pub root: i64,
    pub budget: Option<u64>,
    /// Charged by its calls, and reserved by calls with no answer recorded.
    pub spent: u64,
}

/// Spend over a time window, per agent and alias (`colony status`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SpendRow {
    pub agent: String,
    pub model: String,
    pub usage: TaskUsage,
}

/// The columns [`usage_from_row`] reads. Sums are cast back to `BIGINT`
/// (PostgreSQL's `SUM` of integers is `NUMERIC`).
const USAGE_COLUMNS: &str = "CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT),
     CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT),
     CAST(COALESCE(SUM(CASE WHEN replayed = 0 AND request <> 'null' THEN 1 ELSE 0 END), 0) AS BIGINT),
     CAST(COALESCE(SUM(replayed), 0) AS BIGINT), SUM(cost_usd),
     CAST(COALESCE(SUM(CASE WHEN replayed = 0 AND request = 'null' THEN 1 ELSE 0 END), 0) AS BIGINT)";

/// A migration (SQLite's 9, PostgreSQL's 6): before it, a reservation
/// stopped counting when its run ended; reservations of runs that had
/// ended are dropped, so that an upgrade changes no budget. From then on
/// they count until settled (see [`Queue::reserve_model_tokens`]).
/// Released as a migration: never edit it (a change is a new migration).
pub(crate) const DROP_ENDED_RUNS_RESERVATIONS: &str = "
    DELETE FROM model_reservations WHERE NOT EXISTS (
        SELECT 1 FROM tasks t
        WHERE t.id = model_reservations.task_id AND t.claim_token = model_reservations.token
          AND t.state = 'in_progress');";

/// Drops the token reservation of call `seq` of the run under `lease`, and
/// only it: a call whose record failed (a database error) keeps its own
/// counted, as the charge it may stand for.
fn drop_reservation(tx: &dyn Sql, lease: Lease, seq: u32) -> Result<()> {
    tx.execute(
        "DELETE FROM model_reservations WHERE task_id = ?1 AND token = ?2 AND seq = ?3",
        args![lease.task_id, lease.token, seq],
    )
    .map(drop)
}

fn usage_from_row(r: &Row, first: usize) -> Result<TaskUsage> {
    Ok(TaskUsage {
        input_tokens: r.get(first)?,
        output_tokens: r.get(first + 1)?,
        calls: r.get(first + 2)?,
        replayed: r.get(first + 3)?,
        cost_usd: r.get(first + 4)?,
        refused: r.get(first + 5)?,
        reserved_tokens: 0,
    })
}

impl Queue {
    /// The calls a claimed task's run may replay. Fenced: a run that lost
    /// its lease learns nothing.
    pub fn model_context(&self, lease: Lease) -> Result<ModelContext> {
        self.read(|db| {
            let Some(held) = db.query_opt(
                "SELECT replay_token FROM tasks
                 WHERE id = ?1 AND state = 'in_progress' AND claim_token = ?2",
                args![lease.task_id, lease.token],
            )?
            else {
                return Err(lease_lost(lease));
            };
            let replay = match held.get::<Option<i64>>(0)? {
                Some(token) => journal_of_run(db, lease.task_id, token)?,
                None => Vec::new(),
            };
            Ok(ModelContext { replay })
        })
    }

    /// Sets `need` tokens aside for call `seq` of a claimed task's run, if the
    /// budgets allow: the chain's (its root's `token_budget`) and the task's
    /// own (`manifest_budget`), each counting what was charged and what is
    /// reserved — so runs of one chain running at once cannot together
    /// spend past it. A reservation counts until its call is recorded, which
    /// settles it at what the provider charged; a call whose run ended first
    /// (its host died, its deadline passed, it was cancelled) while its
    /// request was out may have been answered and charged all the same, so
    /// its reservation counts for good, also once that call is recorded as
    /// cut off ([`Queue::record_cut_off_call`]; one cut off before its
    /// request went out is released: [`Queue::release_model_reservation`]).
    /// `need = 0` only asks what is left.
    pub fn reserve_model_tokens(
        &mut self,
        lease: Lease,
        seq: u32,
        need: u64,
        manifest_budget: Option<u64>,
    ) -> Result<Budget> {
        // Asking what is left sets nothing aside: a read, not the writer
        // (a guest may ask in a loop).
        if need == 0 {
            let (_, tighter) = self.read(|db| budget_left(db, lease, manifest_budget, ""))?;
            return Ok(match tighter {
                Some((left, _)) => Budget::Reserved { left },
                None => Budget::Unlimited,
            });
        }
        self.write(|tx, _now| {
            // The task's and the root's rows stay locked (on PostgreSQL)
            // until the reservation is in: a lease reset cannot come in
            // between and miss it in its count of calls cut off, and the
            // runs of one chain take their turns here, so two cannot both
            // pass the check below on the same tokens.
            let (root, tighter) = budget_left(tx, lease, manifest_budget, tx.for_update())?;
            if let Some((left, by)) = tighter
                && need > left
            {
                return Ok(Budget::Refused { left, by });
            }
            // Without a budget too: a reservation still open when the lease
            // is reset is a call cut off in flight, which its event counts.
            tx.execute(
                "INSERT INTO model_reservations (task_id, root_id, token, seq, tokens)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                args![lease.task_id, root, lease.token, seq, need],
            )?;
            Ok(match tighter {
                Some((left, _)) => Budget::Reserved { left: left - need },
                None => Budget::Unlimited,
            })
        })
    }

    /// Drops the token reservation of call `seq` of the run under `lease`,
    /// cut off before any request went out: unlike a call cut off in
    /// flight, it cannot have been charged. Not fenced: the run is over.
    pub fn release_model_reservation(&mut self, lease: Lease, seq: u32) -> Result<()> {
        self.write(|tx, _| drop_reservation(tx, lease, seq))
    }

    /// Stores one call and its `model_call` event, fenced by the run's lease.
    /// A run that lost its lease (cancelled, reset) is being stopped, but a
    /// call it was charged for is still stored, for its spend: it counts
    /// against the budgets and in the task's usage, and its event says
    /// `lease_lost`. Returns `LeaseLost` then, as for a call charged nothing,
    /// which is not stored.
    pub fn record_model_call(
        &mut self,
        lease: Lease,
        attempt: u32,
        call: &ModelCall,
    ) -> Result<Applied> {
        self.store_model_call(lease, attempt, call, false)
    }

    /// Stores a call whose run was stopped while its request was out with
    /// the provider (the run's deadline, a cancel, a shutdown's release):
    /// the provider may bill it, so its reservation stays counted against
    /// the budgets (see `reserve_model_tokens`), and it is stored charged
    /// nothing, whoever holds the task now, its event saying `cut_off` and
    /// the tokens reserved. It was counted nowhere: `show` said 0 calls
    /// sent while the provider had one.
    pub fn record_cut_off_call(
        &mut self,
        lease: Lease,
        attempt: u32,
        call: &ModelCall,
    ) -> Result<Applied> {
        self.store_model_call(lease, attempt, call, true)
    }

    fn store_model_call(
        &mut self,
        lease: Lease,
        attempt: u32,
        call: &ModelCall,
        cut_off: bool,
    ) -> Result<Applied> {
        let actor = &self.opts.actor;
        // A call refused before any provider saw it keeps no prompt (a
        // guest refused in a loop with long prompts stored gigabytes), and
        // is not replayed (see `journal_of_run`).
        let request = match call.sent {
            false => "null".to_string(),
            true => serde_json::to_string(&call.request).expect("a request serializes"),
        };
        let (reply, error) = match &call.outcome {
            Ok(reply) => (
                Some(serde_json::to_string(reply).expect("a reply serializes")),
                None,
            ),
            Err(e) => (None, Some(e.message().to_string())),
        };
        // No prompt or reply text on the audit trail: the journal keeps it.
        let detail = json!({
            "attempt": attempt,
            "seq": call.seq,
            "model": call.alias,
            "input_tokens": call.charged.input_tokens,
            "output_tokens": call.charged.output_tokens,
            "cost_usd": call.cost_usd,
            "replayed": call.replayed,
            "status": call.status(),
            "ms": call.ms,
        })
        .to_string();
        let paid = call.charged.total() > 0;
        self.write(|tx, now| {
            // The task's row stays locked (on PostgreSQL) until the call is
            // stored, so the lease cannot be lost in between.
            let task = tx.query_opt(
                &format!(
                    "SELECT COALESCE(root_id, id), agent, state, claim_token FROM tasks WHERE id = ?1{}",
                    tx.for_update()
                ),
                args![lease.task_id],
            )?;
            let Some(task) = task else {
                return Ok(Applied::LeaseLost);
            };
            let root: i64 = task.get(0)?;
            let agent: String = task.get(1)?;
            let state: String = task.get(2)?;
            let held = state == State::InProgress.as_str()
                && task.get::<Option<i64>>(3)? == Some(lease.token);
            let mut detail: serde_json::Value =
                serde_json::from_str(&detail).expect("built above");
            if cut_off {
                let reserved: i64 = tx.query_value(
                    "SELECT CAST(COALESCE(SUM(tokens), 0) AS BIGINT) FROM model_reservations
                     WHERE task_id = ?1 AND token = ?2 AND seq = ?3",
                    args![lease.task_id, lease.token, call.seq],
                )?;
                detail["cut_off"] = json!(true);
                detail["tokens_reserved"] = json!(reserved);
            } else {
                // The call is settled: its charge replaces its reservation.
                drop_reservation(tx, lease, call.seq)?;
                if !held && !paid {
                    return Ok(Applied::LeaseLost);
                }
            }
            if !held {
                detail["lease_lost"] = json!(true);
            }
            let detail = detail.to_string();
            tx.execute(
                "INSERT INTO model_calls (at, task_id, root_id, agent, token, attempt, seq, alias,
                     request_hash, request, reply, status, error, input_tokens, output_tokens,
                     cost_usd, ms, replayed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
                args![
                    now,
                    lease.task_id,
                    root,
                    agent,
                    lease.token,
                    attempt,
                    call.seq,
                    call.alias,
                    call.request_hash,
                    request,
                    reply,
                    call.status(),
                    error,
                    call.charged.input_tokens,
                    call.charged.output_tokens,
                    call.cost_usd,
                    call.ms,
                    call.replayed,
                ],
            )?;
            tx.execute(
                "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
                 VALUES (?1, ?2, 'model_call', ?3, ?3, ?4, ?5)",
                args![now, lease.task_id, state, actor, detail],
            )?;
            Ok(match held {
                true => Applied::Moved(State::InProgress),
                false => Applied::LeaseLost,
            })
        })
    }

    /// Appends an audit event about a run in flight (`http_request`, say)
    /// that changes no state, fenced by the run's lease.
    pub fn record_run_event(
        &mut self,
        lease: Lease,
        event: &str,
        detail: &serde_json::Value,
    ) -> Result<Applied> {
        let actor = &self.opts.actor;
        let detail = detail.to_string();
        let state = State::InProgress.as_str();
        let n = self.write(|tx, now| {
            tx.execute(
                "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
                 SELECT ?1, id, ?2, ?3, ?3, ?4, ?5 FROM tasks
                 WHERE id = ?6 AND state = 'in_progress' AND claim_token = ?7",
                args![now, event, state, actor, detail, lease.task_id, lease.token],
            )
        })?;
        Ok(if n == 0 {
            Applied::LeaseLost
        } else {
            Applied::Moved(State::InProgress)
        })
    }

    /// A task's chain: its root, the root's token budget, and what the
    /// chain has spent against it (charged and still reserved).
    pub fn chain_budget(&self, task_id: i64) -> Result<ChainBudget> {
        self.read(|db| {
            let Some(row) = db.query_opt(
                "SELECT r.id, r.token_budget
                 FROM tasks t JOIN tasks r ON r.id = COALESCE(t.root_id, t.id)
                 WHERE t.id = ?1",
                args![task_id],
            )?
            else {
                return Err(QueueError::NotFound(task_id));
            };
            let (root, budget): (i64, Option<i64>) = (row.get(0)?, row.get(1)?);
            Ok(ChainBudget {
                root,
                budget: budget.map(|b| b as u64),
                spent: spent_by(db, "root_id", root)?,
            })
        })
    }

    /// What a task's model calls added up to, over all its runs.
    pub fn usage(&self, task_id: i64) -> Result<TaskUsage> {
        let sql = format!(
            "SELECT {USAGE_COLUMNS},
                 (SELECT CAST(COALESCE(SUM(tokens), 0) AS BIGINT) FROM model_reservations
                  WHERE task_id = ?1)
             FROM model_calls WHERE task_id = ?1"
        );
        self.read(|db| {
            let row = db.query_one(&sql, args![task_id])?;
            Ok(TaskUsage {
                reserved_tokens: row.get(6)?,
                ..usage_from_row(&row, 0)?
            })
        })
    }

    /// A task's model calls, oldest first.
    pub fn model_calls(&self, task_id: i64) -> Result<Vec<ModelCallRow>> {
        self.read(|db| {
            let mut runs: Vec<i64> = Vec::new();
            db.query(
                "SELECT attempt, seq, alias, input_tokens, output_tokens, cost_usd, replayed, status,
                        ms, at, CASE WHEN request = 'null' THEN 0 ELSE 1 END, token
                 FROM model_calls WHERE task_id = ?1 ORDER BY id",
                args![task_id],
            )?
            .iter()
            .map(|r| {
                // Runs numbered in the order of their first call: a run's
                // claim token says which run, not when.
                let token: i64 = r.get(11)?;
                let run = match runs.iter().position(|&t| t == token) {
                    Some(i) => i + 1,
                    None => {
                        runs.push(token);
                        runs.len()
                    }
                };
                Ok(ModelCallRow {
                    run: run as u32,
                    attempt: r.get(0)?,
                    seq: r.get(1)?,
                    model: r.get(2)?,
                    input_tokens: r.get(3)?,
                    output_tokens: r.get(4)?,
                    cost_usd: r.get(5)?,
                    replayed: r.get(6)?,
                    status: r.get(7)?,
                    ms: r.get(8)?,
                    at: r.get(9)?,
                    sent: r.get::<i64>(10)? == 1,
                })
            })
            .collect()
        })
    }

    /// Spend per agent and alias since `since_ms`, largest first.
    pub fn spend_since(&self, since_ms: i64) -> Result<Vec<SpendRow>> {
        let sql = format!(
            "SELECT agent, alias, {USAGE_COLUMNS} FROM model_calls WHERE at >= ?1
             GROUP BY agent, alias ORDER BY SUM(input_tokens + output_tokens) DESC, agent, alias"
        );
        self.read(|db| {
            db.query(&sql, args![since_ms])?
                .iter()
                .map(|r| {
                    Ok(SpendRow {
                        agent: r.get(0)?,
                        model: r.get(1)?,
                        usage: usage_from_row(r, 2)?,
                    })
                })
                .collect()
        })
    }
}

/// The calls one run made, in order; a call that failed there, or that
/// this host refused there, answered by a later run of the task asking the
/// same question at the same point, with that answer (recorded errors are
/// asked again, and a run cut off while replaying leaves the older journal
/// in place: see `REPLAY_FROM_THIS_RUN`).
fn journal_of_run(db: &dyn Sql, task_id: i64, token: i64) -> Result<Vec<ModelCall>> {
    let mut calls = calls_of_run(db, task_id, token, "request <> 'null'")?;
    // Only a later run's answer: an earlier run's is from before the
    // agent's own failure or a rejection (its replay would have taken it
    // otherwise), which the design asks afresh.
    let answered_elsewhere = |seq: u32, hash: &str| {
        let rows = db.query(
            &format!(
                "SELECT {CALL_COLUMNS} FROM model_calls
                 WHERE task_id = ?1 AND seq = ?2 AND request_hash = ?3 AND token <> ?4
                   AND status = 'ok' AND replayed = 0
                   AND id > (SELECT MIN(id) FROM model_calls WHERE task_id = ?1 AND token = ?4)
                 ORDER BY id DESC LIMIT 1"
            ),
            args![task_id, seq, hash, token],
        )?;
        rows.first().map(|r| call_from_row(r, task_id)).transpose()
    };
    for call in calls.iter_mut().filter(|c| c.outcome.is_err()) {
        if let Some(answer) = answered_elsewhere(call.seq, &call.request_hash)? {
            call.outcome = answer.outcome;
        }
    }
    // A call refused here (no request kept) that a later run asked and had
    // answered: replayed with that answer, so a third run does not pay
    // for it again.
    for refused in calls_of_run(db, task_id, token, "request = 'null'")? {
        if let Some(answer) = answered_elsewhere(refused.seq, &refused.request_hash)? {
            calls.push(ModelCall {
                replayed: false,
                ..answer
            });
        }
    }
    calls.sort_by_key(|c| c.seq);
    Ok(calls)
}

const CALL_COLUMNS: &str = "seq, alias, request_hash, request, reply, status, error, input_tokens,
                output_tokens, cost_usd, ms, replayed";

/// The calls one run made that match `filter`, in order, as recorded (a
/// refused call's request is `null`, read as an empty one).
fn calls_of_run(db: &dyn Sql, task_id: i64, token: i64, filter: &str) -> Result<Vec<ModelCall>> {
    let rows = db.query(
        &format!(
            "SELECT {CALL_COLUMNS} FROM model_calls
             WHERE task_id = ?1 AND token = ?2 AND {filter} ORDER BY seq"
        ),
        args![task_id, token],
    )?;
    rows.iter().map(|r| call_from_row(r, task_id)).collect()
}

/// One journal row (the columns of [`CALL_COLUMNS`]) as the call it records.
fn call_from_row(r: &Row, task_id: i64) -> Result<ModelCall> {
    let corrupt = |what: &str, e: serde_json::Error| {
        QueueError::Corrupt(format!("task {task_id}'s model journal {what}: {e}"))
    };
    let request: String = r.get(3)?;
    let reply: Option<String> = r.get(4)?;
    let status: String = r.get(5)?;
    let error: Option<String> = r.get(6)?;
    let outcome = match reply {
        Some(text) if status == "ok" => {
            Ok(serde_json::from_str::<ChatReply>(&text).map_err(|e| corrupt("reply", e))?)
        }
        _ => Err(model_error(&status, error.unwrap_or_default())),
    };
    let request = match request.as_str() {
        "null" => ChatRequest::default(),
        _ => serde_json::from_str(&request).map_err(|e| corrupt("request", e))?,
    };
    Ok(ModelCall {
        seq: r.get(0)?,
        alias: r.get(1)?,
        request_hash: r.get(2)?,
        request,
        outcome,
        charged: usage_pair(r, 7)?,
        cost_usd: r.get(9)?,
        ms: r.get(10)?,
        replayed: r.get(11)?,
        // Calls this host refused (request `null`) are not replayed: the
        // next run asks again (unless a later run had it answered, above).
        sent: true,
    })
}

/// The root of the chain of the task `lease` holds, and what is left of
/// the tighter of its budgets (the chain's, the manifest's per task), if
/// any applies; `lock` is appended to the reads of the task's and the
/// root's rows (`FOR UPDATE` on PostgreSQL when reserving).
fn budget_left(
    db: &dyn Sql,
    lease: Lease,
    manifest_budget: Option<u64>,
    lock: &str,
) -> Result<(i64, Option<(u64, BudgetOf)>)> {
    let Some(root) = db.query_opt(
        &format!(
            "SELECT COALESCE(root_id, id) FROM tasks
             WHERE id = ?1 AND state = 'in_progress' AND claim_token = ?2{lock}"
        ),
        args![lease.task_id, lease.token],
    )?
    else {
        return Err(lease_lost(lease));
    };
    let root: i64 = root.get(0)?;
    let chain_budget: Option<i64> = db.query_value(
        &format!("SELECT token_budget FROM tasks WHERE id = ?1{lock}"),
        args![root],
    )?;
    let chain_left = match chain_budget {
        Some(budget) => {
            let budget = budget as u64;
            let left = budget.saturating_sub(spent_by(db, "root_id", root)?);
            Some((left, BudgetOf::Chain { root, budget }))
        }
        None => None,
    };
    let task_left = match manifest_budget {
        Some(budget) => Some((
            budget.saturating_sub(spent_by(db, "task_id", lease.task_id)?),
            BudgetOf::Manifest(budget),
        )),
        None => None,
    };
    let tighter = match (chain_left, task_left) {
        // On a tie the manifest's is named: a retry's budget cannot raise it.
        (Some(c), Some(t)) => Some(if t.0 <= c.0 { t } else { c }),
        (Some(one), None) | (None, Some(one)) => Some(one),
        (None, None) => None,
    };
    Ok((root, tighter))
}

/// Tokens charged and still reserved by the calls whose `column` (a chain's
/// `root_id`, or a `task_id`) is `id`: what counts against a budget.
fn spent_by(db: &dyn Sql, column: &str, id: i64) -> Result<u64> {
    let sql = format!(
        "SELECT CAST(
             (SELECT COALESCE(SUM(input_tokens + output_tokens), 0) FROM model_calls
              WHERE {column} = ?1)
           + (SELECT COALESCE(SUM(tokens), 0) FROM model_reservations
              WHERE {column} = ?1) AS BIGINT)"
    );
    db.query_value(&sql, args![id])
}

fn lease_lost(lease: Lease) -> QueueError {
    QueueError::LeaseLost(lease.task_id)
}

fn usage_pair(r: &Row, first: usize) -> Result<Usage> {
    Ok(Usage::new(r.get(first)?, r.get(first + 1)?))
}

fn model_error(kind: &str, message: String) -> ModelError {
    match kind {
        "not_granted" => ModelError::NotGranted(message),
        "budget_exceeded" => ModelError::BudgetExceeded(message),
        "rate_limited" => ModelError::RateLimited(message),
        "invalid_request" => ModelError::InvalidRequest(message),
        _ => ModelError::Unavailable(message),
    }
}
