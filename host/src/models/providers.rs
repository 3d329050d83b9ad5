//! The live providers of one daemon: one HTTP client, the API keys, and each
//! alias's rate limits, shared by every run. [`Providers::complete`] makes
//! one call: it waits for the limits, sends, retries what is worth retrying
//! within the alias's timeout, and maps the reply to [`ChatReply`].
//!
//! Errors go back to the guest, so they are built from what is safe to show
//! (`messages.rs`). The full transport error (which names the URL) goes to
//! the host's log only.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde_json::Value;

use super::config::{Api, ConfigError, ModelConfig, ModelsConfig};
use super::limits::{Limiter, Refusal};
use super::messages::{give_up, human_wait, provider_message, scrub, truncate};
use super::{
    ChatReply, ChatRequest, ModelError, Tool, Usage, anthropic, estimate_prompt_tokens, openai,
};

/// The largest reply body read; anything bigger is not a chat reply.
const MAX_REPLY_BYTES: usize = 16 << 20;
/// How much of an error body is read (see `messages.rs` for how much of
/// its message is kept).
const MAX_ERROR_BYTES: usize = 64 << 10;
/// The first retry's delay; it doubles per attempt (with jitter) up to
/// [`MAX_RETRY_DELAY`], always within the call's timeout.
const RETRY_BASE: Duration = Duration::from_millis(250);
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
    endpoint: String,
    limiter: Limiter,
}

/// The model providers of one daemon; share it with an `Arc`.
#[derive(Debug)]
pub struct Providers {
    client: reqwest::Client,
    aliases: BTreeMap<String, Alias>,
}

/// What one HTTP attempt came to.
enum Attempt {
    Done(ChatReply, Option<Usage>),
    /// Not worth retrying.
    Fatal(ModelError),
    /// The provider answered 2xx but its reply could not be read in full or
    /// understood: it has most likely charged for the call, so it counts as
    /// charged (see [`CallFailure::charged`]) and is not retried.
    Charged(ModelError),
    Retry(Failure),
}

/// A call that returned no reply, and what it counts as having cost.
#[derive(Debug)]
pub struct CallFailure {
    pub error: ModelError,
    /// Zero, unless the provider answered 2xx with a reply that was cut off
    /// or unreadable, or the call's timeout passed while a request was out:
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

/// How long a call (or a retry, `tokens` 0) must wait for the alias's
/// limits, its request and tokens taken; refused when that would be past
/// `deadline`.
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
                 longer than its timeout of {}",
                humantime::format_duration(human_wait(wait)),
                humantime::format_duration(alias.config.timeout)
            )),
        })
}

/// A failure worth retrying, and how the call ends if time runs out.
pub(super) enum Failure {
    RateLimited {
        retry_after: Option<Duration>,
    },
    Status(u16),
    Connect,
    Transport,
    /// The call's time ran out before a request could go, or with an
    /// error reply still arriving, or after failing to connect.
    Timeout,
    /// The call's time ran out with a request out and no answer: the
    /// provider may be generating (and charging for) a reply.
    NoReply,
}

impl Failure {
    pub(super) fn describe(&self) -> String {
        match self {
            Failure::RateLimited { .. } => "HTTP 429".into(),
            Failure::Status(code) => format!("HTTP {code}"),
            Failure::Connect => "cannot connect".into(),
            Failure::Transport => "connection error".into(),
            Failure::Timeout | Failure::NoReply => "timed out".into(),
        }
    }
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
            .connect_timeout(Duration::from_secs(10))
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
        let input = f64::from(usage.input_tokens) * config.input_usd_per_mtok.unwrap_or(0.0);
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
            Api::OpenAi => openai::request_body(&alias.config.model, req, max_tokens),
            Api::Anthropic => anthropic::request_body(&alias.config.model, req, max_tokens),
        }
        .map_err(uncharged)?;
        let started = Instant::now();
        let deadline = started + alias.config.timeout;
        let prompt_estimate = estimate_prompt_tokens(req);
        let tokens = u64::from(max_tokens) + prompt_estimate;
        let wait = turn_wait(name, alias, tokens, started, deadline).map_err(uncharged)?;
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
                let charged = Usage {
                    input_tokens: u32::try_from(turn.prompt_estimate).unwrap_or(u32::MAX),
                    output_tokens: turn.max_tokens,
                };
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
            if attempt > 1 {
                // A retry is one more request to the provider.
                // The wait may not eat into the quarter of the timeout a
                // retry keeps for the provider's answer (below).
                let wait_until = deadline
                    .checked_sub(alias.config.timeout / 4)
                    .unwrap_or(deadline);
                let wait =
                    turn_wait(name, alias, 0, Instant::now(), wait_until).map_err(uncharged)?;
                tokio::time::sleep(wait).await;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let failure = if remaining.is_zero() {
                Failure::Timeout
            } else {
                on_wire.store(true, Ordering::Release);
                match self.attempt(name, alias, body, remaining).await {
                    Attempt::Done(reply, usage) => return Ok((reply, usage)),
                    Attempt::Fatal(err) => return Err((err, false)),
                    Attempt::Charged(err) => return Err((err, true)),
                    Attempt::Retry(Failure::NoReply) if unreachable => {
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
        }
    }

    async fn attempt(
        &self,
        name: &str,
        alias: &Alias,
        body: &Value,
        remaining: Duration,
    ) -> Attempt {
        let mut headers = HeaderMap::new();
        match alias.config.api {
            Api::OpenAi => {
                if let Some(Secret(key)) = &alias.key {
                    headers.insert(AUTHORIZATION, secret_header(&format!("Bearer {key}")));
                }
            }
            Api::Anthropic => {
                headers.insert(
                    "anthropic-version",
                    HeaderValue::from_static(anthropic::VERSION),
                );
                if let Some(Secret(key)) = &alias.key {
                    headers.insert("x-api-key", secret_header(key));
                }
            }
        }
        let request = self
            .client
            .post(&alias.endpoint)
            .headers(headers)
            .timeout(remaining)
            .json(body);
        // reqwest's timeout covers connecting, sending and reading the
        // body; the outer one also bounds anything reqwest does not time.
        // Whether the provider had answered 2xx when the exchange failed:
        // then it is generating (and charging for) a reply the host never
        // read in full.
        let answered_ok = std::sync::atomic::AtomicBool::new(false);
        // Whether any status came back: a timeout before one is a reply
        // the provider may still be generating (and charging for).
        let answered = std::sync::atomic::AtomicBool::new(false);
        let exchange = async {
            let response = request.send().await?;
            let status = response.status();
            answered.store(true, std::sync::atomic::Ordering::Relaxed);
            answered_ok.store(status.is_success(), std::sync::atomic::Ordering::Relaxed);
            let retry_after = retry_after(response.headers());
            let limit = if status.is_success() {
                MAX_REPLY_BYTES
            } else {
                MAX_ERROR_BYTES
            };
            let body = read_body(response, limit).await?;
            Ok::<_, reqwest::Error>((status, retry_after, body))
        };
        let outcome = tokio::time::timeout(remaining, exchange).await;
        if answered_ok.load(std::sync::atomic::Ordering::Relaxed) && !matches!(outcome, Ok(Ok(_))) {
            let why = match outcome {
                Err(_) => "did not arrive in full within the call's timeout".to_string(),
                Ok(Err(e)) => format!(
                    "was cut off ({})",
                    scrub(&e.without_url().to_string(), alias)
                ),
                Ok(Ok(_)) => unreachable!("checked above"),
            };
            tracing::warn!(alias = name, "model call: a 2xx reply {why}");
            return Attempt::Charged(ModelError::Unavailable(format!(
                "model `{name}`: the provider answered, but its reply {why}; \
                 counted as charged (the prompt estimate plus max_tokens) and not retried"
            )));
        }
        let unanswered = !answered.load(std::sync::atomic::Ordering::Relaxed);
        let (status, retry_after, bytes) = match outcome {
            Err(_) if unanswered => return Attempt::Retry(Failure::NoReply),
            Err(_) => return Attempt::Retry(Failure::Timeout),
            Ok(Err(e)) => {
                tracing::warn!(alias = name, error = %e, "model call transport error");
                return Attempt::Retry(match () {
                    _ if e.is_connect() => Failure::Connect,
                    _ if e.is_timeout() && unanswered => Failure::NoReply,
                    _ if e.is_timeout() => Failure::Timeout,
                    _ => Failure::Transport,
                });
            }
            Ok(Ok(exchange)) => exchange,
        };
        if status.is_success() {
            let parsed = match alias.config.api {
                Api::OpenAi => openai::parse_reply(&bytes),
                Api::Anthropic => anthropic::parse_reply(&bytes),
            };
            return match parsed {
                Ok((reply, usage)) => Attempt::Done(reply, usage),
                // The provider has likely charged for it, and a server that
                // answers nonsense will most likely do so again.
                Err(why) => Attempt::Charged(ModelError::Unavailable(format!(
                    "model `{name}`: the provider's reply could not be understood ({}); \
                     counted as charged (the prompt estimate plus max_tokens) and not retried",
                    truncate(&scrub(&why, alias), 200)
                ))),
            };
        }
        let code = status.as_u16();
        match code {
            429 => Attempt::Retry(Failure::RateLimited { retry_after }),
            408 | 500..=599 => Attempt::Retry(Failure::Status(code)),
            400..=499 => Attempt::Fatal(ModelError::InvalidRequest(format!(
                "model `{name}`: the provider refused the request (HTTP {code}): {}",
                provider_message(&bytes, alias)
            ))),
            _ => Attempt::Fatal(ModelError::Unavailable(format!(
                "model `{name}`: unexpected HTTP {code} from the provider"
            ))),
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

fn secret_header(value: &str) -> HeaderValue {
    // Keys were checked when the configuration loaded (`unsendable_character`).
    let mut header = HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""));
    header.set_sensitive(true);
    header
}

/// `Retry-After` in seconds (RFC 9110), or OpenAI's `retry-after-ms`,
/// at most a day (a larger wait is past any call's deadline anyway, and
/// a number past `Duration`'s range would panic the run).
/// An HTTP date is not honoured: the exponential backoff applies instead.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    if let Some(ms) = number("retry-after-ms") {
        return Some(Duration::from_secs_f64(ms.min(86_400_000.0) / 1000.0));
    }
    number("retry-after").map(|secs| Duration::from_secs_f64(secs.min(86_400.0)))
}

/// Reads a body up to `limit` bytes: a reply past it is cut there (and then
/// fails to parse, which is the right outcome for a runaway body).
async fn read_body(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    Ok(body)
}

/// Usage by estimate, for a server that reports none.
fn estimate_usage(req: &ChatRequest, reply: &ChatReply) -> Usage {
    let output_bytes = reply.content.len()
        + reply
            .tool_calls
            .iter()
            .map(|c| c.name.len() + c.arguments.len())
            .sum::<usize>();
    Usage {
        input_tokens: u32::try_from(estimate_prompt_tokens(req)).unwrap_or(u32::MAX),
        output_tokens: u32::try_from(output_bytes.div_ceil(3)).unwrap_or(u32::MAX),
    }
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
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(150)));
        let mut dated = HeaderMap::new();
        dated.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&dated), None);
        // A provider's (or a proxy's) absurd number is a day, not a panic.
        for (name, value) in [("retry-after-ms", "1e23"), ("retry-after", "1e300")] {
            let mut huge = HeaderMap::new();
            huge.insert(name, HeaderValue::from_static(value));
            assert_eq!(
                retry_after(&huge),
                Some(Duration::from_secs(86_400)),
                "{name}"
            );
        }
    }

    #[test]
    fn temperature_is_sent_as_written() {
        assert_eq!(temperature_json(0.7).to_string(), "0.7");
        assert_eq!(temperature_json(1.0).to_string(), "1.0");
    }
}
