//! The run cycle inside a transaction: promote, claim, heartbeat, release,
//! reap, retry (adding tasks is `insert.rs`, how a run ends is `finish.rs`,
//! cancelling and its cascades `cancel.rs`). Every move
//! asks the transition table through [`record`], writes the audit event
//! beside it, and writes the state the table returned.

use serde_json::json;

use crate::task::{self, ClaimedTask, ErrorKind, Event, Lease, State, TaskError};

use super::batch::{BySize, NewEvent, insert_events};
use super::cancel::cancel_dependents;
use super::insert::count_unfinished_dependencies;
use super::sql::{Dialect, Param, Sql, ToParam, args};
use super::{Applied, CLOCK_STEP_MS, ExpiredLease, QueueError, Result, clock_ran_ahead};

/// The claim token of the run ending now, when the next run should replay
/// its journal rather than the one kept so far (`replay_token`): when it
/// asked a question of its own that reached a provider (not in the kept
/// journal at that point: it went another way), or got as far as the kept
/// journal. A run that called no model (say, released before it started),
/// or was cut off while it replayed the kept journal (asking its failed
/// calls again on the way), leaves that journal in place: the next run
/// would otherwise pay again for the calls beyond (seen: a run killed 10
/// calls into replaying 300 left the next one 290 to pay for again). A
/// call the run was cut off in (recorded with its reservation kept, see
/// `Queue::record_cut_off_call`) counts for neither: it has no answer to
/// replay, and whether its record is in yet when the run ends is a race.
pub(super) const REPLAY_FROM_THIS_RUN: &str = "CASE WHEN EXISTS (
         SELECT 1 FROM model_calls r
         WHERE r.task_id = tasks.id AND r.token = tasks.claim_token AND r.replayed = 0
           AND r.request <> 'null'
           AND NOT EXISTS (SELECT 1 FROM model_reservations v
                           WHERE v.task_id = r.task_id AND v.token = r.token AND v.seq = r.seq)
           AND NOT EXISTS (SELECT 1 FROM model_calls k
                           WHERE k.task_id = tasks.id AND k.token = tasks.replay_token
                             AND k.seq = r.seq AND k.request_hash = r.request_hash))
       OR (SELECT MAX(m.seq) FROM model_calls m WHERE m.task_id = tasks.id
             AND m.token = tasks.claim_token AND m.request <> 'null'
             AND NOT EXISTS (SELECT 1 FROM model_reservations v
                             WHERE v.task_id = m.task_id AND v.token = m.token AND v.seq = m.seq))
          >= (SELECT MAX(seq) FROM model_calls WHERE task_id = tasks.id
                AND token = tasks.replay_token AND request <> 'null')
     THEN claim_token ELSE replay_token END";

/// Asks the transition table whether `event` may move a task in `from`, and
/// writes the audit event. The caller writes the returned state in the same
/// transaction.
pub(super) fn record(
    tx: &dyn Sql,
    task_id: i64,
    from: Option<State>,
    event: Event,
    actor: &str,
    detail: &serde_json::Value,
    now: i64,
) -> Result<State> {
    let to = task::transition(from, event).ok_or(QueueError::Illegal {
        id: task_id,
        state: from.unwrap_or(State::Pending),
        action: event_action(event),
    })?;
    tx.execute(
        "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        args![
            now,
            task_id,
            event.as_str(),
            from.map(State::as_str),
            to.as_str(),
            actor,
            detail.to_string()
        ],
    )?;
    if matches!(to, State::Ready | State::Pending) {
        tx.signal_work();
    }
    Ok(to)
}

/// An audit event that is not a transition (an effect's delivery, a
/// reviewer's verdict deferred): the task keeps its state, both ends of
/// the event.
pub(super) fn note(
    tx: &dyn Sql,
    task_id: i64,
    event: &str,
    actor: &str,
    detail: serde_json::Value,
    now: i64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO events (at, task_id, event, from_state, to_state, actor, detail)
         SELECT ?1, id, ?2, state, state, ?3, ?4 FROM tasks WHERE id = ?5",
        args![now, event, actor, detail.to_string(), task_id],
    )?;
    Ok(())
}

fn event_action(event: Event) -> &'static str {
    match event {
        Event::Approve => "be approved (only tasks in review can)",
        Event::Reject | Event::RejectFinal => "be rejected (only tasks in review can)",
        Event::ApproveStale | Event::ApproveStaleFinal => "be approved (only tasks in review can)",
        Event::Retry | Event::RetryWaiting => "be retried (only failed or cancelled tasks can)",
        Event::Cancel => "be cancelled (it has already finished)",
        Event::Claim => "be claimed",
        _ => "make this move",
    }
}

/// The task's state, locking its row on PostgreSQL until the transaction ends.
pub(super) fn state_of(tx: &dyn Sql, id: i64) -> Result<State> {
    let sql = match tx.dialect() {
        Dialect::Sqlite => "SELECT state FROM tasks WHERE id = ?1",
        Dialect::Postgres => "SELECT state FROM tasks WHERE id = ?1 FOR UPDATE",
    };
    let state: Option<String> = tx
        .query_opt(sql, args![id])?
        .map(|r| r.get(0))
        .transpose()?;
    parse_state(&state.ok_or(QueueError::NotFound(id))?)
}

pub(super) fn parse_state(s: &str) -> Result<State> {
    s.parse().map_err(QueueError::Corrupt)
}

pub(super) fn promote_due_in(tx: &dyn Sql, actor: &str, now: i64) -> Result<usize> {
    let to = task::transition(Some(State::Pending), Event::Promote).expect("pending promotes");
    let ids: Vec<i64> = match tx.dialect() {
        // Read, then write each row (see CLAIMABLE_SQLITE): this runs in
        // every claim transaction, and usually finds nothing.
        Dialect::Sqlite => {
            let ids = tx.query_column(
                "SELECT id FROM tasks WHERE state = 'pending' AND pending_deps = 0 AND run_at <= +?1",
                args![now],
            )?;
            for &id in &ids {
                tx.execute(
                    "UPDATE tasks SET state = ?2, updated_at = ?1 WHERE id = +?3",
                    args![now, to.as_str(), id],
                )?;
            }
            ids
        }
        Dialect::Postgres => tx.query_column(
            "UPDATE tasks SET state = ?2, updated_at = ?1
             WHERE state = 'pending' AND pending_deps = 0 AND run_at <= ?1 RETURNING id",
            args![now, to.as_str()],
        )?,
    };
    for &id in &ids {
        record(
            tx,
            id,
            Some(State::Pending),
            Event::Promote,
            actor,
            &json!({}),
            now,
        )?;
    }
    Ok(ids.len())
}

/// A fresh claim token. One per batch: (id, token) is unique per claim,
/// which is all fencing needs, and it saves a random draw per task.
/// Tokens stay below 2^53 because they appear in events as JSON numbers,
/// and JavaScript (the dashboard, most API clients) reads larger ones
/// rounded; 53 random bits still make a repeat on one task negligible.
pub(super) fn new_claim_token() -> i64 {
    fastrand::i64(1..1 << 53)
}

/// Claims up to `n` ready tasks of `agent` under `token` (from
/// [`new_claim_token`]), each lease promised to be renewed within
/// `lease_ms` (`None`: no promise; any host resets it by its own
/// `stale_after`).
pub(super) fn claim_in(
    tx: &dyn Sql,
    agent: &str,
    n: usize,
    token: i64,
    lease_ms: Option<i64>,
    actor: &str,
    now: i64,
) -> Result<Vec<ClaimedTask>> {
    let to = task::transition(Some(State::Ready), Event::Claim).expect("ready claims");
    let rows = match tx.dialect() {
        Dialect::Sqlite => {
            let rows = tx.query(CLAIMABLE_SQLITE, args![agent, n])?;
            let mut ids = Vec::with_capacity(rows.len());
            for row in &rows {
                ids.push(Param::Int(row.get(0)?));
            }
            for chunk in BySize::chunks(Dialect::Sqlite, &ids) {
                let mut args = vec![
                    Param::Text(to.as_str()),
                    Param::Int(token),
                    Param::Text(actor),
                    Param::Int(now),
                    lease_ms.to_param(),
                ];
                args.extend_from_slice(chunk);
                let claimed = tx.execute(&CLAIM_SQLITE.sql(Dialect::Sqlite, chunk.len()), &args)?;
                debug_assert_eq!(
                    claimed as usize,
                    chunk.len(),
                    "claimable rows were just read"
                );
            }
            rows
        }
        // SKIP LOCKED lets daemons claim side by side: each takes rows no
        // other open claim holds instead of waiting for it.
        Dialect::Postgres => tx.query(
            CLAIM_POSTGRES,
            args![token, actor, now, agent, n, to.as_str(), lease_ms],
        )?,
    };
    let mut out = Vec::with_capacity(rows.len());
    let mut events = Vec::with_capacity(rows.len());
    let holder = serde_json::Value::from(actor).to_string(); // quoted and escaped once
    for row in rows {
        let task = ClaimedTask {
            lease: Lease {
                task_id: row.get(0)?,
                token,
            },
            agent: agent.to_string(),
            chain: row.get(7)?,
            payload: row.get(1)?,
            attempt: row.get(2)?,
            max_attempts: row.get(3)?,
            parent_result: row.get(4)?,
            feedback: row.get(5)?,
            timeout_ms: row.get(6)?,
        };
        events.push(NewEvent {
            task_id: task.lease.task_id,
            event: Event::Claim.as_str(),
            from: Some(State::Ready),
            to,
            detail: format!(
                r#"{{"attempt":{},"holder":{holder},"token":{token}}}"#,
                task.attempt
            ),
        });
        out.push((row.get::<i64>(8)?, task));
    }
    insert_events(tx, &events, actor, now)?;
    // In the order they are claimed by, highest priority first: a daemon
    // starts the tasks it claimed ahead in this order (it ran them by id,
    // a priority 10 task after the priority 0 ones claimed with it), and
    // RETURNING gives no order at all.
    out.sort_by_key(|(priority, t)| (std::cmp::Reverse(*priority), t.lease.task_id));
    Ok(out.into_iter().map(|(_, task)| task).collect())
}

/// The tasks a claim on SQLite takes, as they will be once claimed; the
/// claim then updates each by id, in the same `BEGIN IMMEDIATE` transaction,
/// so nothing can take them in between.
///
/// Two SQLite costs shape the hot path's statements there:
/// - `RETURNING`, and `IN (SELECT ...)` in an UPDATE, build a temporary
///   table at every run (measured: a one-row completion with RETURNING
///   50-59 µs, without 9-10 µs). So rows are read first, then written.
/// - A bare `column = ?N` in a WHERE on `tasks` (whose partial indexes have
///   `IS NOT NULL` predicates), or a bare `LIMIT ?N`, marks `?N` as shaping
///   the plan, and SQLite prepares the statement anew at every run
///   (measured: ~10 µs per task claimed). A unary `+` on the parameter keeps
///   the index usable and the statement prepared once.
const CLAIMABLE_SQLITE: &str = "SELECT id, payload, attempts + 1, max_attempts,
        (SELECT p.result FROM tasks p WHERE p.id = tasks.parent_id), feedback, timeout_ms,
        COALESCE(root_id, id), priority
 FROM tasks WHERE state = 'ready' AND agent = +?1
 ORDER BY priority DESC, id LIMIT +?2";

/// Claims the tasks `?6, ?7, ...` read by [`CLAIMABLE_SQLITE`], by id,
/// many per statement (see [`BySize`]).
static CLAIM_SQLITE: BySize = BySize::new(|_, rows| {
    let ids: Vec<String> = (6..6 + rows).map(|i| format!("+?{i}")).collect();
    format!(
        "UPDATE OR FAIL tasks SET state = ?1, attempts = attempts + 1, claim_token = ?2,
                claimed_by = ?3, heartbeat_at = ?4, updated_at = ?4, progress = NULL,
                lease_ms = ?5
         WHERE id IN ({})",
        ids.join(", ")
    )
});

const CLAIM_POSTGRES: &str =
    "UPDATE tasks SET state = ?6, attempts = attempts + 1, claim_token = ?1,
        claimed_by = ?2, heartbeat_at = ?3, updated_at = ?3, progress = NULL, lease_ms = ?7
 WHERE id IN (SELECT id FROM tasks WHERE state = 'ready' AND agent = ?4
              ORDER BY priority DESC, id LIMIT ?5 FOR UPDATE SKIP LOCKED)
 RETURNING id, payload, attempts, max_attempts,
           (SELECT p.result FROM tasks p WHERE p.id = tasks.parent_id), feedback, timeout_ms,
           COALESCE(root_id, id), priority";

/// Renews leases; answers those that were lost.
pub(super) fn heartbeat_in(tx: &dyn Sql, leases: &[Lease], now: i64) -> Result<Vec<Lease>> {
    let mut lost = Vec::new();
    for lease in leases {
        let n = tx.execute(
            "UPDATE tasks SET heartbeat_at = ?1
             WHERE id = ?2 AND state = 'in_progress' AND claim_token = ?3",
            args![now, lease.task_id, lease.token],
        )?;
        if n == 0 {
            lost.push(*lease);
        }
    }
    Ok(lost)
}

/// Gives a claimed task back without burning its attempt. `started`: its
/// run began (and was interrupted); a task claimed ahead and never started
/// is no run at all, and its event says so (`"started": false`), for the
/// metrics that count runs.
pub(super) fn release_in(
    tx: &dyn Sql,
    lease: Lease,
    started: bool,
    actor: &str,
    now: i64,
) -> Result<Applied> {
    let detail = match started {
        true => {
            json!({"reason": "the host shut down before the run ended; the attempt is given back"})
        }
        false => json!({
            "reason": "claimed ahead, not started before the host gave it back; the attempt is given back",
            "started": false
        }),
    };
    release_with(tx, lease, &detail, actor, now)
}

/// Gives back, unstarted, every task still claimed under one of `tokens`:
/// claims whose commit the claimer could not confirm (see
/// `QueueError::CommitUnknown`), which it therefore never ran.
pub(super) fn release_unconfirmed_in(
    tx: &dyn Sql,
    tokens: &[i64],
    actor: &str,
    now: i64,
) -> Result<Vec<i64>> {
    let detail = json!({
        "reason": "claimed in a transaction whose commit the claimer could not confirm (the connection was lost during COMMIT), so never started; the attempt is given back",
        "started": false
    });
    let mut released = Vec::new();
    for &token in tokens {
        let rows = tx.query(
            "SELECT id FROM tasks WHERE state = 'in_progress' AND claim_token = ?1 ORDER BY id",
            args![token],
        )?;
        for row in rows {
            let lease = Lease {
                task_id: row.get(0)?,
                token,
            };
            if let Applied::Moved(_) = release_with(tx, lease, &detail, actor, now)? {
                released.push(lease.task_id);
            }
        }
    }
    Ok(released)
}

fn release_with(
    tx: &dyn Sql,
    lease: Lease,
    detail: &serde_json::Value,
    actor: &str,
    now: i64,
) -> Result<Applied> {
    let held = tx.query_opt(
        &lock_held(tx, "SELECT id FROM tasks"),
        args![lease.task_id, lease.token],
    )?;
    if held.is_none() {
        return Ok(Applied::LeaseLost);
    }
    let to = record(
        tx,
        lease.task_id,
        Some(State::InProgress),
        Event::Release,
        actor,
        detail,
        now,
    )?;
    void_claim(tx, lease, to, true, now)?;
    Ok(Applied::Moved(to))
}

/// Takes a claim back (`to` is `ready`, as the table said): the run's model
/// calls are kept for the next run to replay, and with `give_back` its
/// attempt is returned too (a release, not a failure).
fn void_claim(tx: &dyn Sql, lease: Lease, to: State, give_back: bool, now: i64) -> Result<()> {
    tx.execute(
        &format!(
            "UPDATE tasks SET state = ?4, attempts = attempts - ?5, claim_token = NULL,
                    replay_token = {REPLAY_FROM_THIS_RUN}, claimed_by = NULL, heartbeat_at = NULL,
                    updated_at = ?1
             WHERE id = ?2 AND state = 'in_progress' AND claim_token = ?3"
        ),
        args![now, lease.task_id, lease.token, to.as_str(), give_back],
    )?;
    Ok(())
}

/// `select` restricted to the row a lease holds, locked on PostgreSQL.
/// (`+?N` on SQLite: see [`CLAIMABLE_SQLITE`].)
pub(super) fn lock_held(tx: &dyn Sql, select: &str) -> String {
    match tx.dialect() {
        Dialect::Sqlite => {
            format!("{select} WHERE id = +?1 AND state = 'in_progress' AND claim_token = +?2")
        }
        Dialect::Postgres => format!(
            "{select} WHERE id = ?1 AND state = 'in_progress' AND claim_token = ?2 FOR UPDATE"
        ),
    }
}

/// Resets every lease whose last heartbeat is older than `cutoff`.
pub(super) fn reset_stale_in(
    tx: &dyn Sql,
    cutoff: i64,
    guard: StaleGuard,
    actor: &str,
    now: i64,
) -> Result<Vec<ExpiredLease>> {
    let StaleGuard {
        deadline,
        resumed_at,
        clock_seen,
    } = guard;
    let late = || deadline.is_some_and(|d| std::time::Instant::now() > d);
    // PostgreSQL's `now` is the server's clock, which this host's steps
    // leave alone.
    let stepped = clock_seen.is_some_and(|seen| {
        tx.dialect() == Dialect::Sqlite && clock_ran_ahead(seen, now) > CLOCK_STEP_MS
    });
    if late() || stepped {
        return Ok(Vec::new());
    }
    // SKIP LOCKED: a row locked right now is being finished or reaped by
    // another host; it is not stale.
    let sql = match tx.dialect() {
        Dialect::Sqlite => {
            "SELECT id, attempts, max_attempts, claimed_by, heartbeat_at, claim_token FROM tasks
             WHERE state = 'in_progress' AND heartbeat_at < ?1
               AND heartbeat_at < ?2 - COALESCE(lease_ms, 0) AND ?3 < ?2 - COALESCE(lease_ms, 0)"
        }
        Dialect::Postgres => {
            "SELECT id, attempts, max_attempts, claimed_by, heartbeat_at, claim_token FROM tasks
             WHERE state = 'in_progress' AND heartbeat_at < ?1
               AND heartbeat_at < ?2 - COALESCE(lease_ms, 0) AND ?3 < ?2 - COALESCE(lease_ms, 0)
             FOR UPDATE SKIP LOCKED"
        }
    };
    // Stale by this host's measure and by the holder's own promise: a host
    // with a shorter `stale_after` must not take a live lease from one that
    // renews less often. And after an outage, by that promise counted from
    // the outage's end: before it, nobody could renew.
    let stale = tx.query(sql, args![cutoff, now, resumed_at.unwrap_or(i64::MIN)])?;
    // PostgreSQL waits for a table lock at the first statement, here.
    if late() {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(stale.len());
    for row in stale {
        let id: i64 = row.get(0)?;
        let attempts: u32 = row.get(1)?;
        let max_attempts: u32 = row.get(2)?;
        let holder: String = row.get::<Option<String>>(3)?.unwrap_or_default();
        let heartbeat_at: i64 = row.get(4)?;
        let token: i64 = row.get(5)?;
        // The dead run's open model-token reservations are calls that were
        // in flight when its host went silent, which the provider may have
        // answered and charged: they keep counting against the budgets (see
        // `reserve_model_tokens`), and the event says so.
        let cut_off = tx.query_one(
            // (Not those recorded already, each with an event of its own:
            // a run stopped mid-call before its daemon went silent.)
            "SELECT COUNT(*), CAST(COALESCE(SUM(tokens), 0) AS BIGINT) FROM model_reservations v
                 WHERE task_id = ?1 AND token = ?2
                   AND NOT EXISTS (SELECT 1 FROM model_calls c
                                   WHERE c.task_id = v.task_id AND c.token = v.token AND c.seq = v.seq)",
            args![id, token],
        )?;
        let (calls_cut_off, tokens_reserved): (i64, i64) = (cut_off.get(0)?, cut_off.get(1)?);
        let silent_ms = now - heartbeat_at;
        let mut detail = json!({
            "holder": holder,
            "last_heartbeat_at": heartbeat_at,
            "silent_ms": silent_ms,
            "attempt": attempts,
        });
        if calls_cut_off > 0 {
            detail["model_calls_cut_off"] =
                json!({"calls": calls_cut_off, "tokens_reserved": tokens_reserved});
        }
        let to = if attempts < max_attempts {
            let to = record(
                tx,
                id,
                Some(State::InProgress),
                Event::LeaseExpired,
                actor,
                &detail,
                now,
            )?;
            void_claim(tx, Lease { task_id: id, token }, to, false, now)?;
            to
        } else {
            let error = TaskError {
                kind: ErrorKind::LeaseExpired,
                message: format!(
                    "the lease held by {holder} expired (no heartbeat for {silent_ms} ms) on the last of {max_attempts} attempts: \
                     that daemon stopped or lost the database while it held the task, running it or \
                     claimed ahead and not yet started (an attempt counts at claim); `colony retry {id}` runs it again"
                ),
            };
            let to = record(
                tx,
                id,
                Some(State::InProgress),
                Event::LeaseExpiredFinal,
                actor,
                &detail,
                now,
            )?;
            tx.execute(
                &format!("UPDATE tasks SET replay_token = {REPLAY_FROM_THIS_RUN} WHERE id = ?1"),
                args![id],
            )?;
            set_failed(tx, id, to, &error, now)?;
            cancel_dependents(tx, id, actor, now)?;
            to
        };
        out.push(ExpiredLease {
            task_id: id,
            holder,
            to,
        });
    }
    Ok(out)
}

/// Revives a failed or cancelled task with attempts reset.
pub(super) fn retry_in(
    tx: &dyn Sql,
    id: i64,
    token_budget: Option<u64>,
    actor: &str,
    now: i64,
) -> Result<State> {
    let from = state_of(tx, id)?;
    let waiting = count_unfinished_dependencies(tx, id)?;
    let event = if waiting > 0 {
        Event::RetryWaiting
    } else {
        Event::Retry
    };
    let mut detail = json!({"revived_from": from, "waiting_for": waiting});
    if let Some(budget) = token_budget {
        detail["token_budget"] = set_chain_budget(tx, id, budget)?;
    }
    let to = record(tx, id, Some(from), event, actor, &detail, now)?;
    tx.execute(
        "UPDATE tasks SET state = ?1, attempts = 0, revisions = 0, pending_deps = ?2, error_kind = NULL,
                error_message = NULL, finished_at = NULL, run_at = ?3, updated_at = ?3
         WHERE id = ?4",
        args![to.as_str(), waiting, now, id],
    )?;
    Ok(to)
}

/// Gives the chain of task `id` a token budget of `budget` (a retry of a
/// task that ran out of its budget would fail on it again at once): more
/// than the chain has spent and reserved, which still count. Returns the
/// change, for the retry's event.
fn set_chain_budget(tx: &dyn Sql, id: i64, budget: u64) -> Result<serde_json::Value> {
    let budget_i64 = i64::try_from(budget)
        .ok()
        .filter(|b| *b >= 1)
        .ok_or_else(|| {
            QueueError::invalid(
                "token_budget",
                format!("{budget} is outside 1..={}", i64::MAX),
            )
        })?;
    let root: i64 = tx.query_value(
        "SELECT COALESCE(root_id, id) FROM tasks WHERE id = ?1",
        args![id],
    )?;
    // The root's row locked first (PostgreSQL), as a reservation locks it:
    // no call reserves between the check below and the update, nor changes
    // the old budget the event reports.
    let old: Option<i64> = tx.query_value(
        &format!(
            "SELECT token_budget FROM tasks WHERE id = ?1{}",
            tx.for_update()
        ),
        args![root],
    )?;
    // Reserved: calls cut off in flight, or still in flight (see
    // `reserve_model_tokens`). One statement, one snapshot: a call settled
    // meanwhile (its reservation turned into its record, without the root's
    // lock) counts in one sum or the other, not in neither.
    let sums = tx.query_one(
        "SELECT CAST((SELECT COALESCE(SUM(input_tokens + output_tokens), 0) FROM model_calls
                      WHERE root_id = ?1) AS BIGINT),
                CAST((SELECT COALESCE(SUM(tokens), 0) FROM model_reservations
                      WHERE root_id = ?1) AS BIGINT)",
        args![root],
    )?;
    let (spent, reserved): (i64, i64) = (sums.get(0)?, sums.get(1)?);
    let used = spent.saturating_add(reserved);
    if budget_i64 <= used {
        let reserved = match reserved {
            0 => String::new(),
            n => format!(
                " and {n} more reserved by calls with no recorded answer (cut off in flight, which the provider may have charged, or still running)"
            ),
        };
        return Err(QueueError::invalid(
            "token_budget",
            format!(
                "the chain of task {root} has spent {spent} tokens already{reserved}, which count against its budget: give more than {used}"
            ),
        ));
    }
    tx.execute(
        "UPDATE tasks SET token_budget = ?1 WHERE id = ?2",
        args![budget_i64, root],
    )?;
    let mut change = json!({"chain": root, "old": old, "new": budget_i64, "spent": spent});
    if reserved > 0 {
        change["reserved"] = json!(reserved);
    }
    Ok(change)
}

/// Writes a terminal failure (`to` is `failed`, as the table said).
pub(super) fn set_failed(
    tx: &dyn Sql,
    id: i64,
    to: State,
    error: &TaskError,
    now: i64,
) -> Result<()> {
    tx.execute(
        "UPDATE tasks SET state = ?5, error_kind = ?1, error_message = ?2, claim_token = NULL,
                claimed_by = NULL, heartbeat_at = NULL, held_state = NULL, finished_at = ?3,
                updated_at = ?3
         WHERE id = ?4",
        args![error.kind.as_str(), error.message, now, id, to.as_str()],
    )?;
    Ok(())
}

/// What keeps a reaper from resetting leases their holders could not renew.
#[derive(Clone, Copy, Debug, Default)]
pub struct StaleGuard {
    /// Reset nothing if the rows are only reached after this (a stall).
    pub deadline: Option<std::time::Instant>,
    /// When (the queue's clock, ms) the reaper's database came back after an
    /// outage: a lease counts as unrenewed for its holder's `lease_ms` only
    /// from then.
    pub resumed_at: Option<i64>,
    /// This host's monotonic and wall clocks read together at a time the
    /// reaper trusted its clock: on SQLite, reset nothing if the
    /// transaction's clock ran more than [`CLOCK_STEP_MS`] ahead since (a
    /// step the reaper's own check, a moment before, could not see yet).
    pub clock_seen: Option<(std::time::Instant, i64)>,
}
