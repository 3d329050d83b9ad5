//! The wit-bindgen glue shared by the four store agents. Each crate includes
//! it, for wasm32 only, as
//!
//! ```ignore
//! #[cfg(target_arch = "wasm32")]
//! #[path = "../../shared/glue.rs"]
//! mod glue;
//! ```
//!
//! and provides `crate::run(&kit::Task, &mut dyn kit::Host) -> Result<kit::Done, kit::Failure>`.
//! This file only converts between the generated WIT types and the plain
//! types of `kit.rs`; all the agent's behaviour lives in its crate's logic.

// The path is relative to the including crate's manifest (agents/<name>/).
wit_bindgen::generate!({ path: "../../wit", world: "agent", generate_all });

use crate::kit;
use colony::agent::effects;
use colony::agent::host;
use colony::agent::model::{self, Message, ModelError, Request, Role};
use colony::agent::state::{self, Scope};
use colony::agent::types::{Failure, Level, Outcome, Task, TaskSpec};
use exports::colony::agent::handler::Guest;

/// The host's imports, seen through the `kit::Host` trait.
struct WitHost;

impl kit::Host for WitHost {
    fn heartbeat(&mut self, progress: &str) {
        host::heartbeat(Some(progress));
    }

    fn log(&mut self, level: kit::Level, message: &str) {
        let level = match level {
            kit::Level::Trace => Level::Trace,
            kit::Level::Debug => Level::Debug,
            kit::Level::Info => Level::Info,
            kit::Level::Warn => Level::Warn,
            kit::Level::Error => Level::Error,
        };
        host::log(level, message);
    }

    fn send_after_commit(&mut self, method: &str, url: &str, body: &str) -> Result<u32, String> {
        effects::send_after_commit(&effects::Request {
            method: method.to_string(),
            url: url.to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Some(body.as_bytes().to_vec()),
        })
    }

    fn state_get(&mut self, key: &str) -> Option<(String, u64)> {
        state::get(Scope::Agent, key).map(|e| (e.value, e.version))
    }

    fn state_set(&mut self, key: &str, value: &str) {
        state::set(Scope::Agent, key, value);
    }

    fn state_set_if(&mut self, key: &str, value: &str, version: u64) {
        state::set_if(Scope::Agent, key, value, version);
    }

    fn ask_json(
        &mut self,
        alias: &str,
        system: &str,
        prompt: &str,
        max_tokens: u32,
    ) -> Result<String, kit::ModelRefusal> {
        let message = |role, content: &str| Message {
            role,
            content: content.to_string(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        };
        let request = Request {
            model: alias.to_string(),
            messages: vec![message(Role::System, system), message(Role::User, prompt)],
            tools: Vec::new(),
            max_tokens: Some(max_tokens),
            temperature: Some(0.7),
            json: true,
        };
        match model::complete(&request) {
            Ok(reply) => Ok(reply.content),
            Err(ModelError::NotGranted(why)) => Err(kit::ModelRefusal::NotAvailable(why)),
            Err(ModelError::BudgetExceeded(why)) => {
                Err(kit::ModelRefusal::Failed(format!("budget exceeded: {why}")))
            }
            Err(ModelError::RateLimited(why)) => {
                Err(kit::ModelRefusal::Failed(format!("rate limited: {why}")))
            }
            Err(ModelError::Unavailable(why)) => {
                Err(kit::ModelRefusal::Failed(format!("unavailable: {why}")))
            }
            Err(ModelError::InvalidRequest(why)) => {
                Err(kit::ModelRefusal::Failed(format!("invalid request: {why}")))
            }
        }
    }
}

struct Component;

impl Guest for Component {
    fn run(task: Task) -> Result<Outcome, Failure> {
        let task = kit::Task {
            id: task.id,
            agent: task.agent,
            payload: task.payload,
            attempt: task.attempt,
            max_attempts: task.max_attempts,
            parent_result: task.parent_result,
            feedback: task.feedback,
        };
        match crate::run(&task, &mut WitHost) {
            Ok(done) => Ok(Outcome {
                output: done.output,
                spawn: done
                    .spawn
                    .into_iter()
                    .map(|s| TaskSpec {
                        agent: s.agent,
                        payload: s.payload,
                        priority: s.priority,
                        review: s.review,
                    })
                    .collect(),
                needs_review: done.needs_review,
            }),
            Err(kit::Failure::Retryable(message)) => Err(Failure::Retryable(message)),
            Err(kit::Failure::Permanent(message)) => Err(Failure::Permanent(message)),
        }
    }
}

export!(Component);
