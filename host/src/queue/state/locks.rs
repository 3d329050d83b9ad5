//! PostgreSQL's serialisation of state writes: advisory locks on buckets
//! of keys. A key written for the first time has no row to lock, and two
//! first writes must not both see version 0, so every write transaction
//! locks its keys' buckets before reading a version. SQLite's write lock
//! already serialises every writer.
//!
//! Buckets, not keys: a batch of runs writing 100 keys each took one lock
//! per key, past PostgreSQL's shared lock table (about 6,400 locks with
//! the default settings; "out of shared memory") and the batch could never
//! be stored. With [`BUCKETS`] exclusive buckets no more than that many
//! are ever held in the whole database, whatever the batch. Two keys in one
//! bucket only make their writers take turns.
//!
//! Always in ascending bucket order, the batch's buckets all at once before
//! any of its writes: two batches sharing keys locked them run by run, in
//! opposite orders, and deadlocked (each costing `deadlock_timeout` and a
//! whole batch's retry, long enough for heartbeats to stall).

use super::Owners;
use crate::queue::sql::{Dialect, Sql, args};
use crate::queue::{FinishedRun, Result};
use crate::state::{Scope, Write};

/// How many buckets keys are spread over.
const BUCKETS: u64 = 1024;

/// The first key of colony's advisory locks on state buckets (the second
/// is the bucket): "Cols" in ASCII. The two-key form never collides with
/// the one-key locks of migrations.
const LOCK_CLASS: i32 = 0x436f_6c73;

/// The bucket of a key: FNV-1a of its scope, owner and name, the same on
/// every host and build (two hosts must agree on it).
fn bucket(scope: Scope, owner: &str, key: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        scope.as_str().as_bytes(),
        b"/",
        owner.as_bytes(),
        b"/",
        key.as_bytes(),
    ] {
        for &byte in part {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash % BUCKETS
}

/// Locks the buckets of `keys` in one statement, in ascending order, until
/// the transaction ends (PostgreSQL only).
fn lock_buckets<'a>(
    tx: &dyn Sql,
    keys: impl Iterator<Item = (Scope, &'a str, &'a str)>,
) -> Result<()> {
    if tx.dialect() != Dialect::Postgres {
        return Ok(());
    }
    let mut buckets: Vec<u64> = keys.map(|(s, o, k)| bucket(s, o, k)).collect();
    if buckets.is_empty() {
        return Ok(());
    }
    buckets.sort_unstable();
    buckets.dedup();
    let list = serde_json::to_string(&buckets).expect("numbers serialize");
    // A volatile function in the select list runs after the ORDER BY.
    tx.execute(
        "SELECT pg_advisory_xact_lock(?1, b) FROM
           (SELECT CAST(value AS int) AS b FROM json_array_elements_text(CAST(?2 AS json))) AS buckets
         ORDER BY b",
        args![LOCK_CLASS, list.as_str()],
    )?;
    Ok(())
}

/// Locks the keys one task's `writes` touch.
pub(super) fn lock_keys(tx: &dyn Sql, owners: &Owners, writes: &[Write]) -> Result<()> {
    lock_buckets(
        tx,
        writes
            .iter()
            .map(|w| (w.scope, owners.of(w.scope), w.key.as_str())),
    )
}

/// Locks every key a batch of finished runs writes, before any of them is
/// stored (their per-run locks then find them held).
pub(in crate::queue) fn lock_batch_keys(tx: &dyn Sql, runs: &[FinishedRun]) -> Result<()> {
    if tx.dialect() != Dialect::Postgres || runs.iter().all(|r| r.state.is_empty()) {
        return Ok(());
    }
    let mut owners = Vec::new();
    for run in runs.iter().filter(|r| !r.state.is_empty()) {
        let of = match &run.claimed {
            Some(facts) => Owners::new(facts.agent.clone(), facts.chain),
            None => super::owners_of(tx, run.lease.task_id)?,
        };
        owners.push((of, &run.state));
    }
    lock_buckets(
        tx,
        owners.iter().flat_map(|(of, writes)| {
            writes
                .iter()
                .map(move |w| (w.scope, of.of(w.scope), w.key.as_str()))
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_fixed_and_spread() {
        // Hosts of different builds must agree: the function is frozen
        // (FNV-1a 64 of "agent/ops/counter" etc., modulo 1,024, as computed
        // independently).
        let known = [
            bucket(Scope::Agent, "ops", "counter"),
            bucket(Scope::Chain, "42", "counter"),
            bucket(Scope::Agent, "", ""),
        ];
        assert_eq!(known, [526, 278, 684]);
        let mut used = std::collections::HashSet::new();
        for i in 0..4096 {
            used.insert(bucket(Scope::Agent, "a", &format!("k{i}")));
        }
        assert!(
            used.len() > 900,
            "4,096 keys fill {} of 1,024 buckets",
            used.len()
        );
    }
}
