//! One HTTP exchange with a provider: the request with its key, the reply
//! read within its limits, and what it came to ([`Attempt`]): a reply, a
//! refusal not worth retrying, a reply most likely charged but unreadable,
//! or a failure worth retrying. The call around it (turns, retries,
//! settling) is `providers.rs`'s.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde_json::Value;

use super::config::Api;
use super::messages::{provider_message, scrub, truncate};
use super::providers::{Alias, Secret};
use super::{ChatReply, ModelError, Usage, anthropic, openai};

/// The largest reply body read; anything bigger is not a chat reply.
const MAX_REPLY_BYTES: usize = 16 << 20;
/// How much of an error body is read (see `messages.rs` for how much of
/// its message is kept).
const MAX_ERROR_BYTES: usize = 64 << 10;

/// What one HTTP attempt came to.
pub(super) enum Attempt {
    Done(ChatReply, Option<Usage>),
    /// Not worth retrying.
    Fatal(ModelError),
    /// The provider may have charged for the call without the host reading
    /// its reply: a 2xx reply that could not be read in full or understood,
    /// a connection lost with the request out, a gateway's timeout. It
    /// counts as charged (see [`super::providers::CallFailure::charged`])
    /// and is not retried.
    Charged(ModelError),
    Retry(Failure),
}

/// A failure worth retrying, and how the call ends if time runs out.
pub(super) enum Failure {
    RateLimited {
        retry_after: Option<Duration>,
    },
    /// 408 or 5xx; a 503's `Retry-After` is honoured as a 429's.
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
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
            Failure::Status { code, .. } => format!("HTTP {code}"),
            Failure::Connect => "cannot connect".into(),
            Failure::Transport => "connection error".into(),
            Failure::Timeout | Failure::NoReply => "timed out".into(),
        }
    }
}

/// One request to the alias's endpoint, bounded by `remaining`.
pub(super) async fn attempt(
    client: &reqwest::Client,
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
    let request = client
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
        let retry_after = crate::retry::retry_after(response.headers());
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
        return charged(format!(
            "model `{name}`: the provider answered, but its reply {why}"
        ));
    }
    let unanswered = !answered.load(std::sync::atomic::Ordering::Relaxed);
    let (status, retry_after, bytes) = match outcome {
        Err(_) if unanswered => return Attempt::Retry(Failure::NoReply),
        Err(_) => return Attempt::Retry(Failure::Timeout),
        Ok(Err(e)) => {
            let failure = match () {
                _ if e.is_connect() => Failure::Connect,
                // The request could not even be built: nothing was sent,
                // and a retry would fail the same way.
                _ if e.is_builder() => {
                    return Attempt::Fatal(ModelError::InvalidRequest(format!(
                        "model `{name}`: the request could not be made: {}",
                        scrub(&e.without_url().to_string(), alias)
                    )));
                }
                _ if e.is_timeout() && unanswered => Failure::NoReply,
                _ if e.is_timeout() => Failure::Timeout,
                // The connection broke with the request out and no answer
                // yet: the provider may be generating (and charging for)
                // the reply, as when a call times out unanswered. A retry
                // would pay again, uncounted.
                _ if unanswered => {
                    tracing::warn!(alias = name, error = %e, "model call: connection lost before an answer");
                    return charged(format!(
                        "model `{name}`: the connection to the provider was lost before it \
                         answered ({}); it may have generated (and charged for) the reply",
                        scrub(&e.without_url().to_string(), alias)
                    ));
                }
                _ => Failure::Transport,
            };
            // What happened first (a timeout was logged as a "transport
            // error"), then reqwest's account, which names the URL.
            tracing::warn!(alias = name, error = %e, "model call: {}", failure.describe());
            return Attempt::Retry(failure);
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
            Err(why) => charged(format!(
                "model `{name}`: the provider's reply could not be understood ({})",
                truncate(&scrub(&why, alias), 200)
            )),
        };
    }
    let code = status.as_u16();
    match code {
        429 if out_of_quota(&bytes) => Attempt::Fatal(ModelError::Unavailable(format!(
            "model `{name}`: the provider's account has no quota left (HTTP 429, \
             insufficient_quota: {}); not retried: the operator must add credit or raise the \
             account's limit",
            provider_message(&bytes, alias)
        ))),
        429 => Attempt::Retry(Failure::RateLimited { retry_after }),
        // A gateway in front of the provider (a proxy, Cloudflare's 524)
        // gave up waiting for its answer: the provider may still be
        // generating, and charging for, the reply.
        504 | 524 => charged(format!(
            "model `{name}`: a gateway gave up waiting for the provider's answer (HTTP {code}); \
             the provider may still have generated (and charged for) the reply"
        )),
        408 | 500..=599 => Attempt::Retry(Failure::Status { code, retry_after }),
        404 => {
            // Most likely the alias's base_url: the host's log names the
            // URL (the guest's message does not).
            tracing::warn!(
                alias = name,
                url = %alias.endpoint,
                "model call: HTTP 404 from the provider; check the alias's base_url (and model)"
            );
            Attempt::Fatal(ModelError::InvalidRequest(format!(
                "model `{name}`: the provider answered HTTP 404 (no such endpoint or model: the host's base_url or model for the alias may be wrong; its log names the URL): {}",
                provider_message(&bytes, alias)
            )))
        }
        400..=499 => Attempt::Fatal(ModelError::InvalidRequest(format!(
            "model `{name}`: the provider refused the request (HTTP {code}): {}",
            provider_message(&bytes, alias)
        ))),
        _ => Attempt::Fatal(ModelError::Unavailable(format!(
            "model `{name}`: unexpected HTTP {code} from the provider"
        ))),
    }
}

/// A call the provider may have charged for, `why`: see [`Attempt::Charged`].
fn charged(why: String) -> Attempt {
    Attempt::Charged(ModelError::Unavailable(format!(
        "{why}; counted as charged (the prompt estimate plus max_tokens) and not retried"
    )))
}

/// Whether a 429's body is OpenAI's `insufficient_quota`: the account's
/// credit is spent, which no wait cures (a retry within the call's timeout
/// would only delay the error).
fn out_of_quota(body: &[u8]) -> bool {
    let Ok(parsed) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let error = &parsed["error"];
    [&error["code"], &error["type"]]
        .iter()
        .any(|v| v.as_str() == Some("insufficient_quota"))
}

fn secret_header(value: &str) -> HeaderValue {
    // Keys were checked when the configuration loaded (`unsendable_character`).
    let mut header = HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""));
    header.set_sensitive(true);
    header
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
