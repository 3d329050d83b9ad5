//! Colony: a durable work queue and orchestrator that runs AI agents as
//! sandboxed WebAssembly components.
//!
//! Read top-down: [`task`] (what a task is and how it may move), [`retry`]
//! (the backoff policy), [`queue`] (the SQLite store and every SQL
//! statement), [`runtime`] (the wasm sandbox), [`orchestrator`] (the daemon).

pub mod cli;
pub mod delivery;
pub mod effects;
pub mod json;
pub mod models;
pub mod orchestrator;
pub mod queue;
pub mod repeats;
pub mod retry;
pub mod runtime;
pub mod state;
pub mod task;
pub mod web;

/// What a caught panic said, for the log and the record of what it cut off.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}
