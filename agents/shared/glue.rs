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

    fn http_get(&mut self, url: &str) -> Result<(u16, String), String> {
        http_get(url)
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

/// A GET through `wasi:http/outgoing-handler` (the host checks it against
/// the manifest's `allowed_hosts` and refuses anything else).
fn http_get(url: &str) -> Result<(u16, String), String> {
    use wasi::http::outgoing_handler;
    use wasi::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
    use wasi::io::streams::StreamError;

    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not a URL"))?;
    let (authority, path) = rest
        .find('/')
        .map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    let request = OutgoingRequest::new(Fields::new());
    let _ = request.set_method(&Method::Get);
    let scheme = match scheme {
        "https" => Scheme::Https,
        _ => Scheme::Http,
    };
    let _ = request.set_scheme(Some(&scheme));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some(path));
    let body = request
        .body()
        .map_err(|_| "the request body was taken".to_string())?;
    let future = outgoing_handler::handle(request, None).map_err(|code| format!("{code:?}"))?;
    let _ = OutgoingBody::finish(body, None);
    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(format!("{code:?}")),
        other => return Err(format!("no response: {other:?}")),
    };
    let status = response.status();
    let incoming = response
        .consume()
        .map_err(|_| "the response body was taken".to_string())?;
    let stream = incoming
        .stream()
        .map_err(|_| "the response stream was taken".to_string())?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => return Err(e.to_debug_string()),
        }
    }
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
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
