//! Plain-Rust mirror of the `colony:agent` contract plus payload helpers,
//! shared by the four store agents (each crate includes this file with
//! `#[path = "../../shared/kit.rs"] pub mod kit;`).
//!
//! The agents' logic is written against these types and the [`Host`] trait,
//! never against the generated bindings, so it builds and is unit-tested
//! natively; `glue.rs` converts between these types and the WIT ones inside
//! the component.
#![allow(dead_code)] // not every agent uses every helper

use serde::Serialize;
use serde_json::{Map, Value};

/// One claimed task (mirrors `types.task`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub id: u64,
    pub agent: String,
    pub payload: String,
    pub attempt: u32,
    pub max_attempts: u32,
    pub parent_result: Option<String>,
    pub feedback: Option<String>,
}

impl Task {
    /// A first attempt of `agent` with `payload` (used by tests and examples).
    pub fn new(agent: &str, payload: &str) -> Self {
        Task {
            id: 1,
            agent: agent.to_string(),
            payload: payload.to_string(),
            attempt: 1,
            max_attempts: 3,
            parent_result: None,
            feedback: None,
        }
    }
}

/// A child task to create on completion (mirrors `types.task-spec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawn {
    pub agent: String,
    pub payload: String,
    pub priority: i32,
    pub review: bool,
}

/// A successful run (mirrors `types.outcome`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// The result as a JSON document.
    pub output: String,
    pub spawn: Vec<Spawn>,
    pub needs_review: bool,
}

impl Done {
    /// An outcome whose output is `value` encoded as JSON.
    pub fn json(value: &impl Serialize) -> Result<Done, Failure> {
        let output = serde_json::to_string(value)
            .map_err(|e| Failure::Permanent(format!("could not encode the output as JSON: {e}")))?;
        Ok(Done {
            output,
            spawn: Vec::new(),
            needs_review: false,
        })
    }
}

/// Why a run did not succeed (mirrors `types.failure`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Retryable(String),
    Permanent(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Retryable(m) | Failure::Permanent(m) => m,
        }
    }
}

/// Severity of a log line (mirrors `types.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Why a model request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRefusal {
    /// No model is granted or configured: use the deterministic fallback.
    NotAvailable(String),
    /// The call was made and failed (budget, rate limit, provider trouble).
    Failed(String),
}

/// What the host offers during a run (mirrors interfaces `host` and `model`).
pub trait Host {
    fn heartbeat(&mut self, progress: &str);
    fn log(&mut self, level: Level, message: &str);

    /// Asks the model alias `alias` for one JSON object. Without a model
    /// (native tests, a host with no `colony.toml`) the answer is
    /// `NotAvailable`, and agents fall back to their templates.
    fn ask_json(
        &mut self,
        alias: &str,
        system: &str,
        prompt: &str,
        max_tokens: u32,
    ) -> Result<String, ModelRefusal> {
        let _ = (system, prompt, max_tokens);
        Err(ModelRefusal::NotAvailable(format!(
            "no model alias {alias:?} in this host"
        )))
    }

    /// The agent-scoped state entry `key`: its JSON value and version.
    /// Without state (a host that offers none) there is nothing.
    fn state_get(&mut self, key: &str) -> Option<(String, u64)> {
        let _ = key;
        None
    }

    /// Writes agent-scoped state; it commits only if the run completes.
    fn state_set(&mut self, key: &str, value: &str) {
        let _ = (key, value);
    }

    /// Compare-and-set: commits only if `key` still has `version` then (0:
    /// must not exist); otherwise the run is retried.
    fn state_set_if(&mut self, key: &str, value: &str, version: u64) {
        let _ = (key, value, version);
    }

    /// GETs `url` over the host's outbound HTTP (only origins the manifest
    /// grants): the status and body, or why there is none.
    fn http_get(&mut self, url: &str) -> Result<(u16, String), String> {
        let _ = url;
        Err("this host offers no outbound HTTP".into())
    }

    /// Queues a JSON request to be sent once this task completes (after
    /// approval when reviewed); the host sends it at least once with an
    /// idempotency key. Returns its sequence number, or why it was refused.
    fn send_after_commit(&mut self, method: &str, url: &str, body: &str) -> Result<u32, String> {
        let _ = (method, url, body);
        Err("this host sends no effects".into())
    }

    fn info(&mut self, message: &str) {
        self.log(Level::Info, message);
    }
    fn warn(&mut self, message: &str) {
        self.log(Level::Warn, message);
    }
}

/// Parses `text` (the payload or the parent's result, named by `source` in
/// error messages) as JSON.
pub fn parse_json(source: &'static str, text: &str) -> Result<Value, Failure> {
    serde_json::from_str(text)
        .map_err(|e| Failure::Permanent(format!("{source} is not valid JSON: {e}")))
}

/// Typed, error-reporting access to the fields of a JSON object. Every error
/// is a permanent failure that names the field by its full path, e.g.
/// `payload field "sections[2].title" must be a non-empty string (got 7)`.
#[derive(Clone)]
pub struct Fields<'a> {
    source: &'static str,
    prefix: String,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    /// The top-level object of a document.
    pub fn root(source: &'static str, doc: &'a Value) -> Result<Fields<'a>, Failure> {
        match doc {
            Value::Object(obj) => Ok(Fields {
                source,
                prefix: String::new(),
                obj,
            }),
            other => Err(Failure::Permanent(format!(
                "{source} must be a JSON object (got {})",
                describe(other)
            ))),
        }
    }

    /// The full path of `key` within the document.
    pub fn path(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A permanent failure about field `key`: `<source> field "<path>" <what>`.
    pub fn error(&self, key: &str, what: impl std::fmt::Display) -> Failure {
        Failure::Permanent(format!(
            "{} field \"{}\" {what}",
            self.source,
            self.path(key)
        ))
    }

    fn wrong(&self, key: &str, expected: &str, got: &Value) -> Failure {
        self.error(key, format!("must be {expected} (got {})", describe(got)))
    }

    /// Whether `key` is present and not null.
    pub fn has(&self, key: &str) -> bool {
        self.obj.get(key).is_some_and(|v| !v.is_null())
    }

    /// The value of a required field.
    pub fn required(&self, key: &str, expected: &str) -> Result<&'a Value, Failure> {
        self.obj
            .get(key)
            .ok_or_else(|| self.error(key, format!("is missing; it must be {expected}")))
    }

    /// A required string (may be empty).
    pub fn string(&self, key: &str) -> Result<&'a str, Failure> {
        const EXPECTED: &str = "a string";
        let v = self.required(key, EXPECTED)?;
        v.as_str().ok_or_else(|| self.wrong(key, EXPECTED, v))
    }

    /// A required string with visible content, trimmed.
    pub fn text(&self, key: &str) -> Result<&'a str, Failure> {
        const EXPECTED: &str = "a non-empty string";
        let v = self.required(key, EXPECTED)?;
        match v.as_str().map(str::trim) {
            Some(s) if !s.is_empty() => Ok(s),
            _ => Err(self.wrong(key, EXPECTED, v)),
        }
    }

    /// An optional string: missing or null gives `None`.
    pub fn opt_string(&self, key: &str) -> Result<Option<&'a str>, Failure> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong(key, "a string", other)),
        }
    }

    /// A required integer of at least `min`; `expected` describes the rule
    /// ("a non-negative integer", "an integer >= 0", ...).
    pub fn int_at_least(&self, key: &str, min: i64, expected: &str) -> Result<i64, Failure> {
        let v = self.required(key, expected)?;
        match v.as_i64() {
            Some(n) if n >= min => Ok(n),
            _ => Err(self.wrong(key, expected, v)),
        }
    }

    /// A required integer of any sign.
    pub fn int(&self, key: &str, expected: &str) -> Result<i64, Failure> {
        self.int_at_least(key, i64::MIN, expected)
    }

    /// A required finite number.
    pub fn number(&self, key: &str, expected: &str) -> Result<f64, Failure> {
        let v = self.required(key, expected)?;
        v.as_f64()
            .filter(|n| n.is_finite())
            .ok_or_else(|| self.wrong(key, expected, v))
    }

    /// A required list of non-empty strings (trimmed); `non_empty` also
    /// rejects an empty list.
    pub fn text_list(&self, key: &str, non_empty: bool) -> Result<Vec<&'a str>, Failure> {
        let expected = if non_empty {
            "a non-empty list of non-empty strings"
        } else {
            "a list of non-empty strings"
        };
        let v = self.required(key, expected)?;
        let items = v.as_array().ok_or_else(|| self.wrong(key, expected, v))?;
        if non_empty && items.is_empty() {
            return Err(self.wrong(key, expected, v));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item.as_str().map(str::trim) {
                Some(s) if !s.is_empty() => Ok(s),
                _ => Err(self.wrong(&format!("{key}[{i}]"), "a non-empty string", item)),
            })
            .collect()
    }

    /// A required list.
    pub fn list(&self, key: &str, expected: &str) -> Result<&'a [Value], Failure> {
        let v = self.required(key, expected)?;
        v.as_array()
            .map(Vec::as_slice)
            .ok_or_else(|| self.wrong(key, expected, v))
    }

    /// A required nested object.
    pub fn object(&self, key: &str) -> Result<Fields<'a>, Failure> {
        const EXPECTED: &str = "an object";
        let v = self.required(key, EXPECTED)?;
        let obj = v.as_object().ok_or_else(|| self.wrong(key, EXPECTED, v))?;
        Ok(Fields {
            source: self.source,
            prefix: format!("{}.", self.path(key)),
            obj,
        })
    }

    /// Fields of `item`, the element at `path` (e.g. `sections[2]`) of a list.
    pub fn element(&self, path: &str, item: &'a Value) -> Result<Fields<'a>, Failure> {
        let obj = item
            .as_object()
            .ok_or_else(|| self.wrong(path, "an object", item))?;
        Ok(Fields {
            source: self.source,
            prefix: format!("{}.", self.path(path)),
            obj,
        })
    }
}

/// A short rendering of a JSON value for error messages.
pub fn describe(v: &Value) -> String {
    match v {
        Value::Array(a) if a.is_empty() => "an empty list".into(),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
        Value::String(s) if s.trim().is_empty() => "an empty string".into(),
        other => {
            let text = other.to_string();
            if text.chars().count() > 40 {
                format!("{}…", text.chars().take(39).collect::<String>())
            } else {
                text
            }
        }
    }
}

/// 64-bit FNV-1a: a tiny, stable hash so that derived choices (colours,
/// fonts, wording) are the same on every platform and every run.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Joins items as English prose: "a", "a and b", "a, b and c".
pub fn join_and(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Cuts `text` to at most `max` characters (Unicode scalar values), ending
/// with "…" when something was cut. Never splits a character.
pub fn truncate_chars(text: &str, max: usize) -> (String, bool) {
    if text.chars().count() <= max {
        return (text.to_string(), false);
    }
    let keep = max.saturating_sub(1);
    let mut out: String = text.chars().take(keep).collect();
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    if max > 0 {
        out.push('…');
    }
    (out, true)
}

/// A [`Host`] that records what an agent reported, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct Recorder {
    pub heartbeats: Vec<String>,
    pub logs: Vec<(Level, String)>,
    /// Scripted answers to `ask_json`, in order; none left means no model.
    pub model_answers: std::collections::VecDeque<Result<String, ModelRefusal>>,
    /// `(alias, prompt)` of every `ask_json` call.
    pub prompts: Vec<(String, String)>,
    /// Agent state as this run sees it: key → (value, version).
    pub state: std::collections::BTreeMap<String, (String, u64)>,
    /// `(key, value, set-if version)` of every state write, in order.
    pub writes: Vec<(String, String, Option<u64>)>,
    /// `(method, url, body)` of every queued effect.
    pub effects: Vec<(String, String, String)>,
    /// Scripted answers to `http_get`, in order.
    pub http_answers: std::collections::VecDeque<Result<(u16, String), String>>,
    /// URLs of every `http_get`.
    pub fetched: Vec<String>,
}

#[cfg(test)]
impl Recorder {
    pub fn count(&self, level: Level) -> usize {
        self.logs.iter().filter(|(l, _)| *l == level).count()
    }
    pub fn logged(&self, level: Level, needle: &str) -> bool {
        self.logs
            .iter()
            .any(|(l, m)| *l == level && m.contains(needle))
    }
}

#[cfg(test)]
impl Host for Recorder {
    fn heartbeat(&mut self, progress: &str) {
        self.heartbeats.push(progress.to_string());
    }
    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_string()));
    }
    fn state_get(&mut self, key: &str) -> Option<(String, u64)> {
        self.state.get(key).cloned()
    }
    fn http_get(&mut self, url: &str) -> Result<(u16, String), String> {
        self.fetched.push(url.to_string());
        self.http_answers
            .pop_front()
            .unwrap_or_else(|| Err("no answer scripted".into()))
    }
    fn send_after_commit(&mut self, method: &str, url: &str, body: &str) -> Result<u32, String> {
        self.effects.push((method.into(), url.into(), body.into()));
        Ok(self.effects.len() as u32)
    }
    fn state_set(&mut self, key: &str, value: &str) {
        self.writes.push((key.to_string(), value.to_string(), None));
        let version = self.state.get(key).map_or(0, |e| e.1) + 1;
        self.state
            .insert(key.to_string(), (value.to_string(), version));
    }
    fn state_set_if(&mut self, key: &str, value: &str, version: u64) {
        self.writes
            .push((key.to_string(), value.to_string(), Some(version)));
        self.state
            .insert(key.to_string(), (value.to_string(), version + 1));
    }
    fn ask_json(
        &mut self,
        alias: &str,
        _system: &str,
        prompt: &str,
        _max: u32,
    ) -> Result<String, ModelRefusal> {
        self.prompts.push((alias.to_string(), prompt.to_string()));
        self.model_answers
            .pop_front()
            .unwrap_or_else(|| Err(ModelRefusal::NotAvailable("no model in tests".into())))
    }
}

/// Logs a failure as a warning before handing it back to the host.
pub fn report(host: &mut dyn Host, failure: Failure) -> Failure {
    match &failure {
        Failure::Permanent(m) => host.warn(&format!("giving up: {m}")),
        Failure::Retryable(m) => host.warn(&format!("will retry: {m}")),
    }
    failure
}

/// `text` with its first character upper-cased.
pub fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}
