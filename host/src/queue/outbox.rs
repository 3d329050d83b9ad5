//! The outbox: every statement about `effects`. A run's effects are stored
//! in its completion's transaction (`proposed` while the task waits in
//! review, `pending` once it is complete), claimed by a daemon for delivery
//! under a short lease, and marked `sent` or retried with backoff until
//! `failed`. Each delivery attempt appends an audit event to its task.

use std::time::Duration;

use serde_json::json;

use super::sql::{Dialect, Param, Row, Sql, args};
use super::tasks::note;
use super::{Queue, QueueError, Result};
use crate::effects::{Effect, MAX_DELIVERY_ATTEMPTS};

/// An effect claimed for one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub id: i64,
    pub task_id: i64,
    pub agent: String,
    pub token: i64,
    /// 1 on the first attempt.
    pub attempt: u32,
    pub effect: Effect,
}

impl Delivery {
    pub fn idempotency_key(&self) -> String {
        Effect::idempotency_key(self.task_id, self.effect.seq)
    }
}

/// One stored effect, as `colony effects` and `colony show` list it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EffectRow {
    pub id: i64,
    pub task_id: i64,
    pub seq: u32,
    pub method: String,
    pub url: String,
    pub state: String,
    pub attempts: u32,
    pub status: Option<u16>,
    pub error: Option<String>,
    /// The agent's own headers, in its order (the idempotency key and
    /// secrets are added when sending, and never stored).
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub created_at: i64,
    pub updated_at: i64,
    /// When a pending effect is due.
    pub next_at: i64,
}

impl EffectRow {
    pub fn body_bytes(&self) -> usize {
        self.body.as_ref().map_or(0, Vec::len)
    }

    /// The first three lines (at most 300 bytes) of the body, as text, for
    /// a reviewer, and how many bytes of the body they leave out.
    pub fn body_head(&self) -> Option<(String, usize)> {
        let body = self.body.as_deref()?;
        let head = &body[..body.len().min(300)];
        // Up to the end of its third line, when the head has three.
        let shown = head
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(2)
            .map_or(head.len(), |(i, _)| i + 1);
        let text = String::from_utf8_lossy(&body[..shown]);
        Some((
            text.lines().collect::<Vec<_>>().join("\n"),
            body.len() - shown,
        ))
    }
}

/// Stores a run's effects with its completion: `proposed` while the task
/// waits in review, `pending` (due now) when it completes.
pub(super) fn store(
    tx: &dyn Sql,
    task_id: i64,
    effects: &[Effect],
    proposed: bool,
    now: i64,
) -> Result<()> {
    if effects.is_empty() {
        return Ok(());
    }
    let agent: String = tx.query_value("SELECT agent FROM tasks WHERE id = ?1", args![task_id])?;
    let state = if proposed { "proposed" } else { "pending" };
    for effect in effects {
        tx.execute(
            "INSERT INTO effects (task_id, seq, agent, method, url, headers, body, state,
                                  max_attempts, next_at, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?10)",
            args![
                task_id,
                effect.seq,
                agent,
                effect.method,
                effect.url,
                serde_json::to_string(&effect.headers).expect("headers serialize"),
                effect.body,
                state,
                effect.max_attempts.clamp(1, MAX_DELIVERY_ATTEMPTS),
                now,
            ],
        )?;
    }
    Ok(())
}

/// Approval: the proposed effects become due.
pub(super) fn release_proposed(tx: &dyn Sql, task_id: i64, now: i64) -> Result<()> {
    tx.execute(
        "UPDATE effects SET state = 'pending', next_at = ?1, updated_at = ?1
         WHERE task_id = ?2 AND state = 'proposed'",
        args![now, task_id],
    )?;
    Ok(())
}

/// Rejection (or any end that is not completion): proposed effects vanish.
pub(super) fn drop_proposed(tx: &dyn Sql, task_id: i64) -> Result<()> {
    tx.execute(
        "DELETE FROM effects WHERE task_id = ?1 AND state = 'proposed'",
        args![task_id],
    )?;
    Ok(())
}

/// Puts back to pending, due now, the effects of `agents` (a JSON list)
/// whose sender's claim ran out with no answer recorded (it died or
/// stalled mid-send), each with an `effect_taken_over` event naming the
/// sender and its attempt: the attempt counts (its request may have
/// arrived), and without the event the trail showed attempt 2 with
/// nothing before it. One cut off on its last attempt fails instead, as a
/// task's run does: an effect whose sending kills its daemon would
/// otherwise be sent again after every crash, its attempts no limit.
///
/// A failed one keeps its claim: a sender that was only slow (a stall, a
/// clock step) and comes back with the answer still records it
/// ([`Queue::finish_delivery`]).
fn take_over_cut_off_sends(tx: &dyn Sql, agents: &str, actor: &str, now: i64) -> Result<()> {
    const FAILED: &str = "its last attempt was cut off: the sender's claim ran out with no \
                          answer recorded (the sender died or stalled mid-send, perhaps because \
                          of this request); the receiver may have it already. `colony effects \
                          retry ID` sends it again";
    const TAKEN_OVER: &str = "its sender's claim ran out with no answer recorded (the sender \
                              died or stalled); the receiver may have the request already, and \
                              it is sent again with the same idempotency key";
    let failed = update_cut_off_sends(
        tx,
        "state = 'failed', error = ?3, lease_until = NULL, updated_at = ?1",
        "attempts >= max_attempts",
        args![now, agents, FAILED],
    )?;
    for cut in failed {
        let detail = json!({
            "effect": cut.effect, "seq": cut.seq, "attempt": cut.attempt, "status": null,
            "error": FAILED, "refused": false, "now": "failed", "sender": cut.sender,
        });
        note(tx, cut.task_id, "effect_failed", actor, detail, now)?;
    }
    let taken = update_cut_off_sends(
        tx,
        "state = 'pending', next_at = ?1, claim_token = NULL, lease_until = NULL",
        "attempts < max_attempts",
        args![now, agents],
    )?;
    for cut in taken {
        let detail = json!({
            "effect": cut.effect, "seq": cut.seq, "attempt": cut.attempt,
            "sender": cut.sender, "why": TAKEN_OVER,
        });
        note(tx, cut.task_id, "effect_taken_over", actor, detail, now)?;
    }
    Ok(())
}

/// An effect whose sender's claim ran out, as [`update_cut_off_sends`]
/// returns it.
struct CutOff {
    effect: i64,
    task_id: i64,
    seq: u32,
    attempt: u32,
    sender: Option<String>,
}

/// Applies `set` to the effects of the agents in `?2` whose sender's claim
/// ran out before `?1` (now), those of them for which `which` holds.
fn update_cut_off_sends(
    tx: &dyn Sql,
    set: &str,
    which: &str,
    params: &[Param],
) -> Result<Vec<CutOff>> {
    let rows = tx.query(
        &format!(
            "UPDATE effects SET {set}
             WHERE id IN (SELECT id FROM effects
                          WHERE state = 'sending' AND lease_until < ?1 AND {which} AND {}{})
             RETURNING id, task_id, seq, attempts, claimed_by",
            agent_in(tx, 2),
            tx.skip_locked()
        ),
        params,
    )?;
    rows.iter()
        .map(|row| {
            Ok(CutOff {
                effect: row.get(0)?,
                task_id: row.get(1)?,
                seq: row.get(2)?,
                attempt: row.get(3)?,
                sender: row.get(4)?,
            })
        })
        .collect()
}

/// `agent IN` the agents of a JSON list of names (the statement's `?n`).
fn agent_in(db: &dyn Sql, n: u32) -> String {
    match db.dialect() {
        Dialect::Sqlite => format!("agent IN (SELECT value FROM json_each(?{n}))"),
        Dialect::Postgres => {
            format!("agent IN (SELECT json_array_elements_text(CAST(?{n} AS json)))")
        }
    }
}

impl Queue {
    /// Claims up to `n` due effects of `agents` (those this daemon has
    /// loaded, so it knows their grants) for delivery under a lease of
    /// `lease`: pending ones whose time has come, and ones whose sender
    /// vanished (its lease ran out) — so delivery survives a daemon crash.
    pub fn claim_due_effects(
        &mut self,
        n: usize,
        lease: Duration,
        agents: &[String],
    ) -> Result<Vec<Delivery>> {
        let actor = &self.opts.actor;
        let token = super::tasks::new_claim_token();
        let agents = serde_json::to_string(agents).expect("names serialize");
        self.write(|tx, now| {
            // On PostgreSQL the rows taken are locked, and rows another
            // sender is taking are skipped rather than waited for. (FOR
            // UPDATE is not allowed with UNION there, hence the OR.)
            // The agent filter sits inside the selection, so effects of
            // agents this host has not loaded neither fill its batch nor get
            // locked away from hosts that could send them.
            take_over_cut_off_sends(tx, &agents, actor, now)?;
            let agent_in = agent_in(tx, 6);
            let sql = match tx.dialect() {
                Dialect::Sqlite => format!(
                    "SELECT id FROM effects WHERE state = 'pending' AND next_at <= ?4 AND {agent_in}
                     UNION ALL
                     SELECT id FROM effects
                     WHERE state = 'sending' AND lease_until < ?4 AND attempts < max_attempts
                       AND {agent_in}
                     LIMIT ?5"
                ),
                Dialect::Postgres => format!(
                    "SELECT id FROM effects
                     WHERE ((state = 'pending' AND next_at <= ?4)
                            OR (state = 'sending' AND lease_until < ?4 AND attempts < max_attempts))
                       AND {agent_in}
                     LIMIT ?5 FOR UPDATE SKIP LOCKED"
                ),
            };
            let sql = format!(
                "UPDATE effects SET state = 'sending', claim_token = ?1, claimed_by = ?2,
                        lease_until = ?3, attempts = attempts + 1, updated_at = ?4
                 WHERE id IN ({sql})
                 RETURNING id, task_id, agent, attempts, seq, method, url, headers, body, max_attempts"
            );
            let claimed = tx.query(
                &sql,
                args![token, actor, now + lease.as_millis() as i64, now, n, agents],
            )?;
            // An effect whose stored headers cannot be read can never be sent:
            // it fails now, visibly, instead of holding up its batch forever.
            let mut deliveries = Vec::with_capacity(claimed.len());
            for r in &claimed {
                let id: i64 = r.get(0)?;
                let headers: String = r.get(7)?;
                match serde_json::from_str(&headers) {
                    Ok(headers) => deliveries.push(Delivery {
                        id,
                        task_id: r.get(1)?,
                        agent: r.get(2)?,
                        token,
                        attempt: r.get(3)?,
                        effect: Effect {
                            seq: r.get(4)?,
                            method: r.get(5)?,
                            url: r.get(6)?,
                            headers,
                            body: r.get(8)?,
                            max_attempts: r.get(9)?,
                        },
                    }),
                    Err(e) => {
                        let error = format!("its stored headers cannot be read: {e}");
                        tx.execute(
                            "UPDATE effects SET state = 'failed', error = ?1, claim_token = NULL,
                                    claimed_by = NULL, lease_until = NULL, updated_at = ?3
                             WHERE id = ?2",
                            args![error, id, now],
                        )?;
                        // On the task's trail, as every failed delivery is.
                        let (task_id, seq, attempt): (i64, i64, i64) = (r.get(1)?, r.get(4)?, r.get(3)?);
                        let detail = json!({"effect": id, "seq": seq, "attempt": attempt,
                                            "error": error, "now": "failed"});
                        note(tx, task_id, "effect_failed", actor, detail, now)?;
                    }
                }
            }
            Ok(deliveries)
        })
    }

    /// Records a delivery attempt's end, fenced by its claim: a 2xx `status`
    /// without an `error` marks the effect sent; a `refused` attempt (policy:
    /// no retry can pass) marks it failed at once; anything else retries with
    /// exponential backoff, or after the receiver's `retry_after` when that
    /// is longer (at most the backoff's cap), until its attempts are used,
    /// then marks it failed.
    /// Returns the effect's new state, or `None` when the claim was lost.
    pub fn finish_delivery(
        &mut self,
        delivery: &Delivery,
        status: Option<u16>,
        error: Option<&str>,
        refused: bool,
        retry_after: Option<Duration>,
    ) -> Result<Option<&'static str>> {
        let actor = &self.opts.actor;
        self.write(|tx, now| {
            // `failed` too: a send failed as cut off on its last attempt
            // keeps its claim, for an answer that comes after all.
            let held = tx.query_opt(
                &format!(
                    "SELECT max_attempts FROM effects
                     WHERE id = ?1 AND state IN ('sending', 'failed') AND claim_token = ?2{}",
                    tx.for_update()
                ),
                args![delivery.id, delivery.token],
            )?;
            let Some(held) = held else {
                return Ok(None);
            };
            let max_attempts: u32 = held.get(0)?;
            let sent = error.is_none() && status.is_some_and(|s| (200..300).contains(&s));
            let (state, next_at) = if sent {
                ("sent", now)
            } else if refused || delivery.attempt >= max_attempts {
                ("failed", now)
            } else {
                let delay = crate::retry::backoff(Duration::from_millis(500), delivery.attempt)
                    .max(
                        retry_after
                            .unwrap_or_default()
                            .min(crate::retry::MAX_BACKOFF),
                    );
                ("pending", now + delay.as_millis() as i64)
            };
            tx.execute(
                "UPDATE effects SET state = ?1, next_at = ?2, status = ?3, error = ?4,
                        claim_token = NULL, claimed_by = NULL, lease_until = NULL, updated_at = ?5
                 WHERE id = ?6",
                args![state, next_at, status, error, now, delivery.id],
            )?;
            let event = if sent { "effect_sent" } else { "effect_failed" };
            let detail = json!({
                "effect": delivery.id,
                "seq": delivery.effect.seq,
                "attempt": delivery.attempt,
                "status": status,
                "error": error,
                "refused": refused,
                "now": state,
            });
            note(tx, delivery.task_id, event, actor, detail, now)?;
            Ok(Some(state))
        })
    }

    /// Gives back deliveries a daemon stopped waiting for (its shutdown's
    /// grace ran out while the receiver had not answered), each fenced by
    /// its claim: due again at once, the attempt not counted, an
    /// `effect_released` event saying why. The receiver may have the request
    /// already; it comes again with the same idempotency key. Returns how
    /// many were given back.
    pub fn release_deliveries(&mut self, claims: &[(i64, i64)]) -> Result<usize> {
        if claims.is_empty() {
            return Ok(0);
        }
        let actor = &self.opts.actor;
        self.write(|tx, now| {
            let mut released = 0;
            for &(id, token) in claims {
                let held = tx.query_opt(
                    "UPDATE effects SET state = 'pending', attempts = attempts - 1, next_at = ?1,
                            claim_token = NULL, claimed_by = NULL, lease_until = NULL, updated_at = ?1
                     WHERE id = ?2 AND state = 'sending' AND claim_token = ?3
                     RETURNING task_id, seq",
                    args![now, id, token],
                )?;
                let Some(held) = held else { continue };
                let detail = json!({
                    "effect": id,
                    "seq": held.get::<u32>(1)?,
                    "why": "the daemon shut down before the receiver answered; it is sent again with the same idempotency key",
                });
                note(tx, held.get(0)?, "effect_released", actor, detail, now)?;
                released += 1;
            }
            Ok(released)
        })
    }

    /// Sends a failed effect again (`colony effects retry ID`): attempts start over.
    pub fn retry_effect(&mut self, id: i64) -> Result<()> {
        let actor = &self.opts.actor;
        self.write(|tx, now| {
            let found = tx.query_opt(
                &format!(
                    "SELECT task_id, state FROM effects WHERE id = ?1{}",
                    tx.for_update()
                ),
                args![id],
            )?;
            let Some(found) = found else {
                return Err(QueueError::Missing(format!("effect {id} does not exist")));
            };
            let task_id: i64 = found.get(0)?;
            let state: String = found.get(1)?;
            if state != "failed" {
                return Err(QueueError::NotNow(format!(
                    "effect {id} is {state}; only a failed effect can be retried"
                )));
            }
            tx.execute(
                "UPDATE effects SET state = 'pending', attempts = 0, next_at = ?1, updated_at = ?1
                 WHERE id = ?2",
                args![now, id],
            )?;
            note(
                tx,
                task_id,
                "effect_retry",
                actor,
                json!({"effect": id}),
                now,
            )
        })
    }

    /// Stored effects, newest first: all, or one task's, or in one state.
    pub fn effects(
        &self,
        task_id: Option<i64>,
        state: Option<&str>,
        limit: u32,
    ) -> Result<Vec<EffectRow>> {
        // One task's effects come by its (task_id, seq) index, oldest first;
        // the outbox as a whole newest first. (PostgreSQL must be told the
        // type of a parameter it only sees tested for NULL.)
        let sql = match task_id {
            Some(_) => {
                "SELECT id, task_id, seq, method, url, state, attempts, status, error, body,
                        headers, created_at, updated_at, next_at
                 FROM effects WHERE task_id = ?1 AND (CAST(?2 AS TEXT) IS NULL OR state = ?2)
                 ORDER BY seq LIMIT ?3"
            }
            None => {
                "SELECT id, task_id, seq, method, url, state, attempts, status, error, body,
                        headers, created_at, updated_at, next_at
                 FROM effects
                 WHERE CAST(?1 AS BIGINT) IS NULL AND (CAST(?2 AS TEXT) IS NULL OR state = ?2)
                 ORDER BY id DESC LIMIT ?3"
            }
        };
        self.read(|db| {
            db.query(sql, args![task_id, state, limit])?
                .iter()
                .map(|r| {
                    let (id, headers): (i64, String) = (r.get(0)?, r.get(10)?);
                    Ok(EffectRow {
                        id,
                        task_id: r.get(1)?,
                        seq: r.get(2)?,
                        method: r.get(3)?,
                        url: r.get(4)?,
                        state: r.get(5)?,
                        attempts: r.get(6)?,
                        status: http_status(r, 7)?,
                        error: r.get(8)?,
                        body: r.get(9)?,
                        headers: serde_json::from_str(&headers).map_err(|e| {
                            QueueError::Corrupt(format!("effect {id}'s stored headers: {e}"))
                        })?,
                        created_at: r.get(11)?,
                        updated_at: r.get(12)?,
                        next_at: r.get(13)?,
                    })
                })
                .collect()
        })
    }

    /// Effects of `agents` still to deliver (pending or being sent).
    pub fn effects_outstanding(&self, agents: &[String]) -> Result<u64> {
        let agents = serde_json::to_string(agents).expect("names serialize");
        self.read(|db| {
            let sql = format!(
                "SELECT COUNT(*) FROM effects WHERE state IN ('pending', 'sending')
                   AND {}",
                agent_in(db, 1)
            );
            db.query_value(&sql, args![agents])
        })
    }

    /// Effects still to deliver (pending or being sent), by agent.
    pub fn effects_outstanding_by_agent(&self) -> Result<Vec<(String, u64)>> {
        self.read(|db| {
            db.query(
                "SELECT agent, COUNT(*) FROM effects WHERE state IN ('pending', 'sending')
                  GROUP BY agent ORDER BY agent",
                args![],
            )?
            .iter()
            .map(|row| Ok((row.get(0)?, row.get(1)?)))
            .collect()
        })
    }

    /// When the next pending effect of `agents` is due, if any (for the
    /// daemon's sleep). Those of agents a daemon has not loaded are not its
    /// to send: counting them made it try a claim every watch tick.
    pub fn next_effect_due(&self, agents: &[String]) -> Result<Option<i64>> {
        let agents = serde_json::to_string(agents).expect("names serialize");
        self.read(|db| {
            let agent_in = agent_in(db, 1);
            db.query_value(
                &format!(
                    "SELECT MIN(t) FROM (SELECT MIN(next_at) AS t FROM effects WHERE state = 'pending' AND {agent_in}
                                         UNION ALL
                                         SELECT MIN(lease_until) FROM effects WHERE state = 'sending' AND {agent_in})
                                    AS due"
                ),
                args![agents.as_str()],
            )
        })
    }
}

/// Column `i` as an HTTP status (`NULL` before the first attempt ends).
fn http_status(r: &Row, i: usize) -> Result<Option<u16>> {
    r.get::<Option<u32>>(i)?
        .map(|s| {
            u16::try_from(s).map_err(|_| {
                QueueError::Corrupt(format!("column {i} holds {s}, not an HTTP status"))
            })
        })
        .transpose()
}
