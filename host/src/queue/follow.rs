//! Following the audit trail without losing an event.
//!
//! Reading "events with id > the last one seen" is exact on SQLite, whose
//! one writer hands out ids in commit order. PostgreSQL hands ids out at
//! insert: a transaction holding id 100 may commit after id 101 was read,
//! and a reader that moved its cursor to 101 would never see 100. So a
//! [`TrailCursor`] only moves over ids it has seen without a hole: a hole
//! is an event not yet committed, and the cursor waits for it. A hole can
//! also be an id given back by a transaction that rolled back (a retried
//! serialization failure); those never fill, so a hole this cursor has
//! waited at for [`GAP_WAIT`] is stepped over, and so is one behind an
//! event written six times that long ago, at once: no transaction of
//! Colony's stays open a minute (a follower reading an old trail waited
//! 10 s at each hole in it).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::sql::args;
use super::{AuditEvent, Queue, Result};

/// How long a hole in the ids may stay open before it is taken for a
/// rolled-back insert: far longer than any of Colony's transactions.
pub const GAP_WAIT: Duration = Duration::from_secs(10);

/// Where a reader of the trail (or of the model journal, whose ids
/// PostgreSQL hands out the same way) is.
#[derive(Clone, Debug)]
pub struct TrailCursor {
    /// The statement listing committed ids after `?1`, at most `?2`, each
    /// with its time (the queue's clock, ms).
    ids_after: &'static str,
    last: i64,
    /// Runs of missing ids seen after `last` (`start..end`), and since when.
    holes: HashMap<(i64, i64), Instant>,
    gap_wait: Duration,
}

impl TrailCursor {
    /// A cursor after event `last` (0: from the start).
    pub fn new(last: i64) -> TrailCursor {
        TrailCursor::with_gap_wait(last, GAP_WAIT)
    }

    /// A cursor after model call `last` in the journal (`model_calls`).
    pub fn over_model_calls(last: i64) -> TrailCursor {
        TrailCursor {
            ids_after: "SELECT id, at FROM model_calls WHERE id > ?1 ORDER BY id LIMIT ?2",
            ..TrailCursor::new(last)
        }
    }

    pub fn with_gap_wait(last: i64, gap_wait: Duration) -> TrailCursor {
        TrailCursor {
            ids_after: "SELECT id, at FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
            last,
            holes: HashMap::new(),
            gap_wait,
        }
    }

    /// The last event id handed on.
    pub fn last(&self) -> i64 {
        self.last
    }

    /// Moves over at most `limit` committed ids with no open hole before
    /// them; returns `(from, to)`: the events with `from < id <= to` are
    /// safe to hand on, and no later read will find another among them.
    pub fn advance(&mut self, queue: &Queue, limit: u32) -> Result<(i64, i64)> {
        let rows = queue.read(|db| db.query(self.ids_after, args![self.last, i64::from(limit)]))?;
        let from = self.last;
        let now = Instant::now();
        // The queue's clock, read once and only if there is a hole.
        let mut queue_now = None;
        let mut expected = self.last + 1;
        for row in rows {
            let (id, at): (i64, i64) = (row.get(0)?, row.get(1)?);
            if id > expected {
                // The ids between are missing: wait for them a while.
                let since = *self.holes.entry((expected, id)).or_insert(now);
                let waited = now.duration_since(since);
                let queue_now = match queue_now {
                    Some(t) => t,
                    None => *queue_now.insert(queue.now()?),
                };
                let behind = Duration::from_millis(queue_now.saturating_sub(at).max(0) as u64);
                if waited < self.gap_wait && behind < self.gap_wait * 6 {
                    break;
                }
            }
            self.last = id;
            expected = id + 1;
        }
        self.holes.retain(|(start, _), _| *start > self.last);
        Ok((from, self.last))
    }

    /// The events of the next safe range, optionally of one task.
    pub fn next_events(
        &mut self,
        queue: &Queue,
        task_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>> {
        let (from, to) = self.advance(queue, limit)?;
        if to == from {
            return Ok(Vec::new());
        }
        queue.events_between(task_id, from, to)
    }
}

impl Queue {
    /// The events with `from < id <= to`, optionally of one task, oldest first.
    pub fn events_between(
        &self,
        task_id: Option<i64>,
        from: i64,
        to: i64,
    ) -> Result<Vec<AuditEvent>> {
        self.read(|db| super::reads::events_in_range(db, task_id, from, to))
    }
}
