//! The host side of `colony:agent/effects`: requests a run queues to be sent
//! after its task commits. They are only collected here, checked against the
//! agent's grant, and handed to the queue with the run's outcome.

use super::bindings::colony::agent::effects as wit;
use super::sandbox::RunState;
use crate::effects::{
    DEFAULT_DELIVERY_ATTEMPTS, Effect, MAX_BODY_BYTES_PER_RUN, MAX_EFFECTS_PER_RUN, check_shape,
};

/// Most `send-after-commit` calls one run may make, refused ones included:
/// each refusal is recorded (a task-log line and an `effect_refused`
/// event), and a guest refused in a loop wrote 570,000 events in 20 s.
pub const MAX_EFFECT_CALLS_PER_RUN: usize = 2 * MAX_EFFECTS_PER_RUN;

/// One run's queued effects.
pub struct EffectsSession {
    pub(super) queued: Vec<Effect>,
    /// `send-after-commit` calls so far, refused ones included.
    calls: usize,
    /// Delivery attempts of each (the agent's `effect_attempts`).
    pub(super) max_attempts: u32,
}

impl Default for EffectsSession {
    fn default() -> Self {
        EffectsSession {
            queued: Vec::new(),
            calls: 0,
            max_attempts: DEFAULT_DELIVERY_ATTEMPTS,
        }
    }
}

impl wit::Host for RunState {
    /// Queues the request, or refuses it to the agent, recording why in the
    /// task log and an `effect_refused` event, as a refused request is.
    fn send_after_commit(&mut self, req: wit::Request) -> Result<u32, String> {
        self.effects.calls += 1;
        let limit = format!(
            "a run may call send-after-commit at most {MAX_EFFECT_CALLS_PER_RUN} times, refused calls included"
        );
        match self.effects.calls.cmp(&(MAX_EFFECT_CALLS_PER_RUN + 1)) {
            std::cmp::Ordering::Less => {}
            // Said once; later calls are refused without a record.
            std::cmp::Ordering::Equal => {
                let method = req.method.to_ascii_uppercase();
                self.http
                    .policy
                    .record_refused_effect(&method, &req.url, &limit);
                return Err(limit);
            }
            std::cmp::Ordering::Greater => return Err(limit),
        }
        let method = req.method.to_ascii_uppercase();
        if let Err(why) = self.check_effect(&method, &req) {
            self.http
                .policy
                .record_refused_effect(&method, &req.url, &why);
            return Err(why);
        }
        // A header a secret of the manifest replaces at delivery is dropped
        // now, as outbound HTTP drops it: kept, a reviewer would approve the
        // agent's value while the host's went out.
        let secrets = self.http.grant().secret_headers(&req.url);
        let headers = req
            .headers
            .into_iter()
            .filter(|(name, _)| {
                !secrets
                    .iter()
                    .any(|(secret, _)| name.eq_ignore_ascii_case(secret.as_str()))
            })
            .collect();
        let queued = &mut self.effects.queued;
        let seq = queued.len() as u32 + 1;
        queued.push(Effect {
            seq,
            method,
            url: req.url,
            headers,
            body: req.body,
            max_attempts: self.effects.max_attempts,
        });
        Ok(seq)
    }
}

impl RunState {
    /// Why this run may not queue `req` (its method upper-cased), if so.
    fn check_effect(&self, method: &str, req: &wit::Request) -> Result<(), String> {
        check_shape(method, &req.url, &req.headers, req.body.as_deref())?;
        // The same allow-list as outbound HTTP: a refused effect is refused
        // now, to the agent, not later at delivery.
        self.http.grant().check_url(method, &req.url)?;
        let queued = &self.effects.queued;
        // Headers count with the bodies: the host holds both until the task
        // completes, outside the run's memory cap.
        let size = |body: Option<&Vec<u8>>, headers: &[(String, String)]| {
            body.map_or(0, Vec::len) + crate::effects::header_bytes(headers)
        };
        let held: usize = queued
            .iter()
            .map(|e| size(e.body.as_ref(), &e.headers))
            .sum();
        if held + size(req.body.as_ref(), &req.headers) > MAX_BODY_BYTES_PER_RUN {
            return Err(format!(
                "a run's effects may carry at most {} MiB of bodies and headers in all",
                MAX_BODY_BYTES_PER_RUN >> 20
            ));
        }
        if queued.len() >= MAX_EFFECTS_PER_RUN {
            return Err(format!(
                "a run may queue at most {MAX_EFFECTS_PER_RUN} effects"
            ));
        }
        Ok(())
    }
}
