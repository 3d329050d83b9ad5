//! `thinker`: calls the host's `model` interface as its payload scripts, to
//! exercise grants, budgets, rate limits, tool calls and the replay journal.
//!
//! Payload (every key optional):
//! `{"model": "fast", "prompts": ["a", "b"], "max_tokens": 50,
//!   "tool": true, "sleep_after": [2, 60000], "panic_after": 2,
//!   "fail": "retryable" | "permanent", "on_error": "fail" | "continue",
//!   "dump_env": true, "timings": true}`
//! One call per prompt, in order. `sleep_after`, `panic_after` and `fail`
//! apply on the first attempt only, so a retry shows what recovery does
//! (replay after an interruption, fresh calls after a failure). Output: every reply (content, replayed,
//! usage, finish, tool calls), errors, `remaining` before and after, and
//! with `dump_env` the environment and arguments the guest can see.

wit_bindgen::generate!({ world: "agent", path: "../../../wit", generate_all });

use colony::agent::model::{self, Message, ModelError, Request, Role, Tool};
use exports::colony::agent::handler::{Failure, Guest, Outcome, Task};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
#[serde(default)]
struct Script {
    model: String,
    prompts: Vec<String>,
    max_tokens: Option<u32>,
    tool: bool,
    sleep_after: Option<(usize, u64)>,
    panic_after: Option<usize>,
    fail: Option<String>,
    on_error: String,
    dump_env: bool,
    /// Report each call's duration as the guest saw it (`call_us`), for
    /// `colony bench`.
    timings: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            model: "fast".into(),
            prompts: vec!["hello".into()],
            max_tokens: Some(50),
            tool: false,
            sleep_after: None,
            panic_after: None,
            fail: None,
            on_error: "fail".into(),
            dump_env: false,
            timings: false,
        }
    }
}

fn describe(e: &ModelError) -> String {
    match e {
        ModelError::NotGranted(m) => format!("not_granted: {m}"),
        ModelError::BudgetExceeded(m) => format!("budget_exceeded: {m}"),
        ModelError::RateLimited(m) => format!("rate_limited: {m}"),
        ModelError::Unavailable(m) => format!("unavailable: {m}"),
        ModelError::InvalidRequest(m) => format!("invalid_request: {m}"),
    }
}

fn user(content: &str) -> Message {
    Message {
        role: Role::User,
        content: content.into(),
        tool_calls: vec![],
        tool_call_id: None,
    }
}

fn reply_json(r: &model::Reply) -> Value {
    json!({
        "content": r.content,
        "replayed": r.replayed,
        "model": r.model,
        "finish": format!("{:?}", r.finish),
        "usage": [r.usage.input_tokens, r.usage.output_tokens],
        "tool_calls": r.tool_calls.iter().map(|c| json!([c.id, c.name, c.arguments])).collect::<Vec<_>>(),
    })
}

struct Thinker;

impl Guest for Thinker {
    fn run(task: Task) -> Result<Outcome, Failure> {
        let script: Script = serde_json::from_str(&task.payload)
            .map_err(|e| Failure::Permanent(format!("bad thinker payload: {e}")))?;
        let first = task.attempt == 1;
        let remaining_before = model::remaining();
        let (mut replies, mut errors) = (Vec::new(), Vec::new());
        let mut call_us = Vec::new();
        let tools = if script.tool {
            vec![Tool {
                name: "lookup".into(),
                description: "Looks a word up".into(),
                parameters: r#"{"type":"object","properties":{"word":{"type":"string"}}}"#.into(),
            }]
        } else {
            vec![]
        };
        for (i, prompt) in script.prompts.iter().enumerate() {
            let mut messages = vec![user(prompt)];
            let request = |messages: Vec<Message>| Request {
                model: script.model.clone(),
                messages,
                tools: tools.clone(),
                max_tokens: script.max_tokens,
                temperature: Some(0.0),
                json: false,
            };
            let started = std::time::Instant::now();
            let answer = model::complete(&request(messages.clone()));
            call_us.push(started.elapsed().as_micros() as u64);
            match answer {
                Ok(reply) => {
                    replies.push(reply_json(&reply));
                    // A tool round trip: answer each call and ask again.
                    if !reply.tool_calls.is_empty() {
                        messages.push(Message {
                            role: Role::Assistant,
                            content: reply.content.clone(),
                            tool_calls: reply.tool_calls.clone(),
                            tool_call_id: None,
                        });
                        for call in &reply.tool_calls {
                            messages.push(Message {
                                role: Role::Tool,
                                content: format!("result for {}", call.arguments),
                                tool_calls: vec![],
                                tool_call_id: Some(call.id.clone()),
                            });
                        }
                        match model::complete(&request(messages)) {
                            Ok(reply) => replies.push(reply_json(&reply)),
                            Err(e) => errors.push(describe(&e)),
                        }
                    }
                }
                Err(e) => {
                    errors.push(describe(&e));
                    if script.on_error == "fail" {
                        return Err(Failure::Retryable(format!(
                            "model call {} failed: {}",
                            i + 1,
                            describe(&e)
                        )));
                    }
                }
            }
            let done = i + 1;
            if first && script.panic_after == Some(done) {
                panic!("thinker panics after {done} calls, as scripted");
            }
            if let Some((after, ms)) = script.sleep_after
                && after == done
                && first
            {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
        match script.fail.as_deref().filter(|_| first) {
            Some("retryable") => {
                return Err(Failure::Retryable("scripted retryable failure".into()));
            }
            Some("permanent") => {
                return Err(Failure::Permanent("scripted permanent failure".into()));
            }
            _ => {}
        }
        let mut output = json!({
            "replies": replies,
            "errors": errors,
            "remaining_before": remaining_before,
            "remaining_after": model::remaining(),
        });
        if script.timings {
            output["call_us"] = json!(call_us);
            output["replies"] = json!(replies.len());
        }
        if script.dump_env {
            output["env"] = json!(std::env::vars().collect::<Vec<_>>());
            output["args"] = json!(std::env::args().collect::<Vec<_>>());
        }
        Ok(Outcome {
            output: output.to_string(),
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

export!(Thinker);
