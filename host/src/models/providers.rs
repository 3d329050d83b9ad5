//! The live providers of one daemon: one HTTP client, the API keys, and each
//! alias's rate limits, shared by every run. [`Providers::complete`] makes
//! one call: it waits for the limits, sends, retries what is worth retrying
//! within the alias's timeout, and maps the reply to [`ChatReply`]; one
//! HTTP exchange is `exchange.rs`'s.
//!
//! Errors go back to the guest, so they are built from what is safe to show
//! (`messages.rs`). The full transport error (which names the URL) goes to
//! the host's log only.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::config::{Api, ConfigError, ModelConfig, ModelsConfig};
use super::exchange::{self, Attempt, Failure};
use super::limits::{Limiter, Refusal};
use super::messages::{give_up, human_wait};
use super::{
    ChatReply, ChatRequest, ModelError, Tool, Usage, anthropic, estimate_prompt_tokens, openai,
};

/// The first retry's delay; it doubles per attempt (with jitter) up to
/// [`MAX_RETRY_DELAY`], always within the call's timeout.
const RETRY_BASE: Duration = Duration::from_millis(250);
/// How long opening a connection to a provider may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

/// A key read from the environment. Its `Debug` never shows it.
pub(super) struct Secret(pub(super) String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug)]
pub(super) struct Alias {
    pub(super) config: ModelConfig,
    pub(super) key: Option<Secret>,
    pub(super) endpoint: String,
    limiter: Limiter,
}

/// The model providers of one daemon; share it with an `Arc`.
#[derive(Debug)]
pub struct Providers {
    client: reqwest::Client,
    aliases: BTreeMap<String, Alias>,
}

/// A call that returned no reply, and what it counts as having cost.
#[derive(Debug)]
pub struct CallFailure {
    pub error: ModelError,
    /// Zero, unless the provider may have charged for a reply the host
    /// never read (a 2xx reply cut off or unreadable, the call's timeout or
    /// a broken connection while a request was out, a gateway's timeout):
    /// then the call's reservation (the prompt estimate plus max_tokens),
    /// so that a budget cannot be spent through replies the host never read.
    pub charged: Usage,
    /// Whether any request reached the provider: false for a call this
    /// host refused (unknown alias, this host's rate limit, a request it
    /// cannot send).
    pub sent: bool,
}

/// A call's turn under its alias's rate limits ([`Providers::take_turn`]):
/// a request and the call's tokens, held from when it was taken. A turn
/// dropped before it was sent gives them back (its budget refused the
/// call, its run ended while it waited).
#[derive(Debug)]
pub struct Turn<'a> {
    name: &'a str,
    alias: &'a Alias,
    body: Value,
    max_tokens: u32,
    prompt_estimate: u64,
    /// What the limits hold for it: max_tokens plus the prompt's estimate.
    tokens: u64,
    started: Instant,
    /// The alias's timeout, counted from when the turn was taken.
    deadline: Instant,
    ready_at: Instant,
    used: bool,
}

impl Turn<'_> {
    /// The most tokens the call may take: max_tokens plus the prompt's
    /// estimate.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Whether the call must still wait for its turn.
    pub fn waits(&self) -> bool {
        Instant::now() < self.ready_at
    }

    /// Refused (rate limited, saying why) when the turn would come after
    /// `deadline`, its run's: the call would wait for nothing.
    pub fn comes_by(&self, deadline: Instant) -> Result<(), ModelError> {
        if self.ready_at <= deadline {
            return Ok(());
        }
        let now = Instant::now();
        Err(ModelError::RateLimited(format!(
            "model `{}`: this host's rate limit for the alias would hold the call for {}, past its run's deadline {} from now",
            self.name,
            humantime::format_duration(human_wait(self.ready_at.saturating_duration_since(now))),
            humantime::format_duration(human_wait(deadline.saturating_duration_since(now)))
        )))
    }

    /// Waits until the limits let the call go.
    pub async fn come(&self) {
        if self.waits() {
            tracing::debug!(
                alias = self.name,
                wait_ms = self
                    .ready_at
                    .saturating_duration_since(Instant::now())
                    .as_millis() as u64,
                "waiting for the alias's rate limit"
            );
            tokio::time::sleep_until(self.ready_at.into()).await;
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if !self.used {
            self.alias.limiter.give_back(self.tokens);
        }
    }
}

/// How long a call must wait for the alias's limits, its request and
/// `tokens` taken; refused when that would be past `deadline`.
fn turn_wait(
    name: &str,
    alias: &Alias,
    tokens: u64,
    now: Instant,
    deadline: Instant,
) -> Result<Duration, ModelError> {
    alias
        .limiter
        .reserve(tokens, now, deadline)
        .map_err(|refusal| match refusal {
            Refusal::TooLarge { needed, per_minute } => ModelError::InvalidRequest(format!(
                "model `{name}`: the call may need {needed} tokens (max_tokens plus the prompt), \
                 more than the {per_minute} tokens per minute this host allows the alias; \
                 ask for fewer max_tokens or send a shorter prompt"
            )),
            Refusal::TooLate { wait } => ModelError::RateLimited(format!(
                "model `{name}`: this host's rate limit for the alias would hold the call for {}, \
                 leaving less than a quarter of its timeout of {} for the answer",
                humantime::format_duration(human_wait(wait)),
                humantime::format_duration(alias.config.timeout)
            )),
        })
}

impl Providers {
    /// The providers of `config`, with keys from the process environment.
    pub fn new(config: &ModelsConfig) -> Result<Providers, ConfigError> {
        Providers::with_env(config, |var| std::env::var(var).ok())
    }

    /// The providers of `config`, with keys looked up by `env` (tests and
    /// embedders pass their own instead of mutating the process environment).
    pub fn with_env(
        config: &ModelsConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Providers, ConfigError> {
        let mut aliases = BTreeMap::new();
        for (name, alias) in config.iter() {
            let key = match &alias.api_key_env {
                None => None,
                Some(var) => match env(var) {
                    Some(key) if !key.trim().is_empty() => {
                        let key = key.trim();
                        if let Some((position, what)) = unsendable_character(key) {
                            return Err(ConfigError::UnsendableKey {
                                path: config.path().to_path_buf(),
                                alias: name.to_string(),
                                var: var.clone(),
                                position,
                                what,
                            });
                        }
                        Some(Secret(key.to_string()))
                    }
                    _ => {
                        return Err(ConfigError::MissingKey {
                            path: config.path().to_path_buf(),
                            alias: name.to_string(),
                            var: var.clone(),
                        });
                    }
                },
            };
            let endpoint = match alias.api {
                Api::OpenAi => format!("{}/chat/completions", alias.base_url),
                Api::Anthropic => format!("{}/v1/messages", alias.base_url),
            };
            let limiter = Limiter::new(alias.requests_per_minute, alias.tokens_per_minute);
            aliases.insert(
                name.to_string(),
                Alias {
                    config: alias.clone(),
                    key,
                    endpoint,
                    limiter,
                },
            );
        }
        // reqwest is built without a TLS crypto provider of its own (to use
        // ring rather than aws-lc-rs); install ring as the process default
        // unless something else already installed one, which then serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            // A redirect could carry `x-api-key` to another host (reqwest
            // strips only `Authorization` across hosts); providers don't
            // redirect API calls, so none are followed.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            // A connection left idle is closed here before a provider or a
            // proxy closes it (often at 30-60 s): a call written into one
            // that the other end is closing breaks unanswered, which counts
            // as charged (it may have reached the provider).
            .pool_idle_timeout(Duration::from_secs(15))
            .user_agent(concat!("colony/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ConfigError::Client)?;
        Ok(Providers { client, aliases })
    }

    pub fn has_alias(&self, alias: &str) -> bool {
        self.aliases.contains_key(alias)
    }

    /// The configured aliases, in name order.
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.aliases.keys().map(String::as_str)
    }

    /// The alias's settings (never its key).
    pub fn config(&self, alias: &str) -> Option<&ModelConfig> {
        self.aliases.get(alias).map(|a| &a.config)
    }

    /// Cost in USD of `usage` on `alias`, None when the alias has no prices
    /// (a price given for one direction only counts the other as free).
    pub fn cost_usd(&self, alias: &str, usage: &Usage) -> Option<f64> {
        let config = &self.aliases.get(alias)?.config;
        if config.input_usd_per_mtok.is_none() && config.output_usd_per_mtok.is_none() {
            return None;
        }
        let input_price = config.input_usd_per_mtok.unwrap_or(0.0);
        let (read, written) = (usage.cache_read_tokens, usage.cache_write_tokens);
        let uncached = usage
            .input_tokens
            .saturating_sub(read)
            .saturating_sub(written);
        let input = f64::from(uncached) * input_price
            + f64::from(read) * config.cache_read_usd_per_mtok.unwrap_or(input_price)
            + f64::from(written) * config.cache_write_usd_per_mtok.unwrap_or(input_price);
        let output = f64::from(usage.output_tokens) * config.output_usd_per_mtok.unwrap_or(0.0);
        Some((input + output) / 1e6)
    }

    /// One model call, bounded as a whole (rate-limit waits and retries
    /// included) by the alias's `timeout`.
    pub async fn complete(&self, req: &ChatRequest) -> Result<ChatReply, ModelError> {
        self.call(req, &AtomicBool::new(false))
            .await
            .map_err(|failure| failure.error)
    }

    /// [`Providers::complete`], telling what a failed call counts as having
    /// cost. `on_wire` is true while a request is out with the provider
    /// (not while the call waits for this host's rate limit or between
    /// retries): a call dropped then may be charged for.
    pub async fn call(
        &self,
        req: &ChatRequest,
        on_wire: &AtomicBool,
    ) -> Result<ChatReply, CallFailure> {
        let turn = self.take_turn(req)?;
        turn.come().await;
        self.send(turn, req, on_wire).await
    }

    /// Checks the call and takes its turn under the alias's rate limits at
    /// once (its request and tokens are held from here: later calls queue
    /// behind it); [`Turn::come`] waits for the turn, [`Providers::send`]
    /// sends. Refused when the limits could not let it go within the
    /// alias's timeout.
    pub fn take_turn<'a>(&'a self, req: &ChatRequest) -> Result<Turn<'a>, CallFailure> {
        let uncharged = |error| CallFailure {
            error,
            charged: Usage::default(),
            sent: false,
        };
        let name = req.model.as_str();
        let Some((name, alias)) = self.aliases.get_key_value(name) else {
            return Err(uncharged(ModelError::NotGranted(format!(
                "model `{name}` is not configured on this host"
            ))));
        };
        let max_tokens = req.max_tokens.unwrap_or(alias.config.max_tokens);
        if max_tokens == 0 {
            return Err(uncharged(ModelError::InvalidRequest(format!(
                "model `{name}`: max_tokens must be at least 1"
            ))));
        }
        let body = match alias.config.api {
            Api::OpenAi => openai::request_body(
                &alias.config.model,
                req,
                max_tokens,
                alias.config.max_tokens_field,
            ),
            Api::Anthropic => anthropic::request_body(&alias.config.model, req, max_tokens),
        }
        .map_err(uncharged)?;
        let started = Instant::now();
        let deadline = started + alias.config.timeout;
        let prompt_estimate = estimate_prompt_tokens(req);
        let tokens = u64::from(max_tokens) + prompt_estimate;
        // A turn that came with less than a quarter of the timeout left
        // would send a call cut off before its answer, charged all the same
        // (the rule a retry keeps).
        let wait = turn_wait(
            name,
            alias,
            tokens,
            started,
            deadline - alias.config.timeout / 4,
        )
        .map_err(uncharged)?;
        Ok(Turn {
            name,
            alias,
            body,
            max_tokens,
            prompt_estimate,
            tokens,
            started,
            deadline,
            ready_at: started + wait,
            used: false,
        })
    }

    /// Sends a call whose turn came (it waits for what is left of it),
    /// retrying what is worth retrying within the alias's timeout.
    pub async fn send(
        &self,
        mut turn: Turn<'_>,
        req: &ChatRequest,
        on_wire: &AtomicBool,
    ) -> Result<ChatReply, CallFailure> {
        // From here the turn is spent, sent or not: a call cut off on the
        // wire may have counted with the provider.
        turn.used = true;
        turn.come().await;
        let Turn {
            name,
            alias,
            tokens: reserved,
            ..
        } = turn;
        let result = self
            .send_with_retries(name, alias, &turn.body, turn.deadline, on_wire)
            .await;
        match result {
            Ok((mut reply, usage)) => {
                // A server that reports no usage (some local ones) is
                // charged by estimate, so budgets and limits still bite.
                reply.usage = usage.unwrap_or_else(|| estimate_usage(req, &reply));
                alias.limiter.settle(reserved, reply.usage.total());
                tracing::debug!(
                    alias = name,
                    input_tokens = reply.usage.input_tokens,
                    output_tokens = reply.usage.output_tokens,
                    ms = turn.started.elapsed().as_millis() as u64,
                    "model call"
                );
                Ok(reply)
            }
            Err((error, false)) => {
                // A refused or failed call is taken to have used nothing.
                alias.limiter.settle(reserved, 0);
                Err(CallFailure {
                    error,
                    charged: Usage::default(),
                    sent: true,
                })
            }
            Err((error, true)) => {
                let charged = Usage::new(
                    u32::try_from(turn.prompt_estimate).unwrap_or(u32::MAX),
                    turn.max_tokens,
                );
                alias.limiter.settle(reserved, charged.total());
                Err(CallFailure {
                    error,
                    charged,
                    sent: true,
                })
            }
        }
    }

    async fn send_with_retries(
        &self,
        name: &str,
        alias: &Alias,
        body: &Value,
        deadline: Instant,
        on_wire: &AtomicBool,
    ) -> Result<(ChatReply, Option<Usage>), (ModelError, bool)> {
        let uncharged = |error| (error, false);
        let mut attempt = 0u32;
        // Whether the last attempt could not connect: a timeout right after
        // is most likely one more connection that never opened, not a
        // reply the provider was generating.
        let mut unreachable = false;
        loop {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let failure = if remaining.is_zero() {
                Failure::Timeout
            } else {
                on_wire.store(true, Ordering::Release);
                match exchange::attempt(&self.client, name, alias, body, remaining).await {
                    Attempt::Done(reply, usage) => return Ok((reply, usage)),
                    Attempt::Fatal(err) => return Err((err, false)),
                    Attempt::Charged(err) => return Err((err, true)),
                    // Only when the attempt had no more time than a connect
                    // may take: with more, a connection that failed to open
                    // would have said so, so this one opened and sent.
                    Attempt::Retry(Failure::NoReply)
                        if unreachable && remaining <= CONNECT_TIMEOUT =>
                    {
                        on_wire.store(false, Ordering::Release);
                        Failure::Timeout
                    }
                    // Still on the wire: counted as charged below.
                    Attempt::Retry(Failure::NoReply) => Failure::NoReply,
                    // Refused or failed unanswered: taken to cost nothing
                    // (as when the retries give up).
                    Attempt::Retry(failure) => {
                        on_wire.store(false, Ordering::Release);
                        unreachable = matches!(failure, Failure::Connect);
                        if unreachable {
                            // No request reached the provider: its place
                            // under the rate limit is given back (a dead
                            // provider used up a request a minute).
                            alias.limiter.give_back(0);
                        }
                        failure
                    }
                }
            };
            let give_up = |failure| uncharged(give_up(name, alias, failure, attempt));
            let backoff = crate::retry::backoff(RETRY_BASE, attempt).min(MAX_RETRY_DELAY);
            let delay = match &failure {
                Failure::Timeout => return Err(give_up(&failure)),
                Failure::NoReply => return Err((give_up(&failure).0, true)),
                // Never sooner than the backoff: `Retry-After: 0` from a
                // provider that keeps refusing would be a busy loop.
                Failure::RateLimited {
                    retry_after: Some(wait),
                }
                | Failure::Status {
                    retry_after: Some(wait),
                    ..
                } => (*wait).max(backoff),
                _ => backoff,
            };
            // A retry cut off before the provider answers counts as charged
            // (it may be generating the reply): one that would start with
            // less than a quarter of the call's timeout left is not made.
            if Instant::now() + delay + alias.config.timeout / 4 >= deadline {
                return Err(give_up(&failure));
            }
            tracing::warn!(
                alias = name,
                attempt,
                failure = failure.describe(),
                retry_in_ms = delay.as_millis() as u64,
                "model call failed; retrying"
            );
            tokio::time::sleep(delay).await;
            // A sleep that overran (a loaded machine) may leave too little
            // time after all: given up on the provider's failure, not on
            // this host's rate limit, which has nothing to wait for.
            if Instant::now() + alias.config.timeout / 4 >= deadline {
                return Err(give_up(&failure));
            }
            // A retry is one more request, within the rate limit. A wait
            // into the quarter of the timeout kept for the answer gives up
            // on the provider's failure, which the limit only delayed.
            let wait_until = deadline - alias.config.timeout / 4;
            match alias.limiter.reserve(0, Instant::now(), wait_until) {
                Ok(wait) => tokio::time::sleep(wait).await,
                Err(_) => return Err(give_up(&failure)),
            }
        }
    }
}

/// The first character of `key` a header cannot carry (1-based), and what
/// it is; the key itself is never said.
fn unsendable_character(key: &str) -> Option<(usize, &'static str)> {
    let (i, c) = key
        .chars()
        .enumerate()
        .find(|(_, c)| !(*c == '\t' || (' '..='~').contains(c)))?;
    let what = match c {
        '\n' | '\r' => "a line break",
        c if c.is_control() => "a control character",
        _ => "not ASCII",
    };
    Some((i + 1, what))
}

/// Usage by estimate, for a server that reports none.
fn estimate_usage(req: &ChatRequest, reply: &ChatReply) -> Usage {
    let output_bytes = reply.content.len()
        + reply
            .tool_calls
            .iter()
            .map(|c| c.name.len() + c.arguments.len())
            .sum::<usize>();
    Usage::new(
        u32::try_from(estimate_prompt_tokens(req)).unwrap_or(u32::MAX),
        u32::try_from(output_bytes.div_ceil(3)).unwrap_or(u32::MAX),
    )
}

/// A tool's JSON Schema text, parsed (both APIs take it as an object).
pub(super) fn parse_schema(tool: &Tool) -> Result<Value, ModelError> {
    if tool.parameters.trim().is_empty() {
        return Ok(serde_json::json!({ "type": "object", "properties": {} }));
    }
    match serde_json::from_str::<Value>(&tool.parameters) {
        Ok(schema @ Value::Object(_)) => match crate::json::check_numbers(&schema) {
            Ok(()) => Ok(schema),
            Err(why) => Err(ModelError::InvalidRequest(format!(
                "tool `{}`: parameters: {why}",
                tool.name
            ))),
        },
        Ok(_) => Err(ModelError::InvalidRequest(format!(
            "tool `{}`: parameters must be a JSON Schema object",
            tool.name
        ))),
        Err(e) => Err(ModelError::InvalidRequest(format!(
            "tool `{}`: parameters are not valid JSON: {e}",
            tool.name
        ))),
    }
}

/// An `f32` as the JSON number a person wrote: `0.7`, not the
/// `0.699999988079071` that widening it to `f64` would send.
pub(super) fn temperature_json(t: f32) -> Value {
    t.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_is_an_object_with_no_number_past_a_float() {
        let tool = |parameters: &str| Tool {
            name: "t".into(),
            description: String::new(),
            parameters: parameters.into(),
        };
        assert!(
            parse_schema(&tool(
                r#"{"type":"object","maximum":12345678901234567890123}"#
            ))
            .is_ok()
        );
        for (bad, why) in [
            ("[]", "must be a JSON Schema object"),
            ("{", "not valid JSON"),
            (r#"{"type":"object","maximum":1e999}"#, "past the largest"),
        ] {
            match parse_schema(&tool(bad)) {
                Err(ModelError::InvalidRequest(message)) => {
                    assert!(message.contains(why), "{bad}: {message}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn temperature_is_sent_as_written() {
        assert_eq!(temperature_json(0.7).to_string(), "0.7");
        assert_eq!(temperature_json(1.0).to_string(), "1.0");
    }
}
