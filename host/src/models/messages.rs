//! What a guest is told when a model call fails. Errors go back to the
//! guest, so they are built from what is safe to show: the alias, the HTTP
//! status and the provider's own message with the key and the provider's
//! address cut out ([`scrub`]), in words that say what to change.

use std::time::Duration;

use serde_json::Value;

use super::ModelError;
use super::exchange::Failure;
use super::providers::{Alias, Secret};

/// How much of a provider's error message is kept.
const MAX_ERROR_MESSAGE: usize = 500;

/// The error of a call that ran out of time after `attempts` tries.
pub(super) fn give_up(name: &str, alias: &Alias, failure: &Failure, attempts: u32) -> ModelError {
    let timeout = humantime::format_duration(alias.config.timeout);
    let tries = if attempts == 1 {
        "1 attempt".to_string()
    } else {
        format!("{attempts} attempts")
    };
    match failure {
        Failure::RateLimited {
            retry_after: Some(wait),
        } if attempts == 1 => ModelError::RateLimited(format!(
            "model `{name}`: the provider is rate limiting (HTTP 429) and asks to wait {}, \
             which leaves less than a quarter of the call's timeout of {timeout} for the answer \
             (raise the alias's `timeout` to wait it out)",
            humantime::format_duration(human_wait(*wait))
        )),
        Failure::RateLimited { .. } => ModelError::RateLimited(format!(
            "model `{name}`: the provider kept answering HTTP 429 (rate limited) \
             for {tries} within the call's timeout of {timeout}"
        )),
        Failure::Timeout => ModelError::Unavailable(format!(
            "model `{name}`: no reply from the provider within the call's timeout of {timeout} ({tries})"
        )),
        Failure::NoReply => ModelError::Unavailable(format!(
            "model `{name}`: no reply from the provider within the call's timeout of {timeout} ({tries}); \
             counted as charged (the prompt estimate plus max_tokens): the provider may have \
             generated and billed the reply the host stopped waiting for"
        )),
        other => ModelError::Unavailable(format!(
            "model `{name}`: the provider is unavailable ({}) after {tries} within the call's timeout of {timeout}",
            other.describe()
        )),
    }
}

/// The provider's error message (`error.message` in both APIs' error
/// bodies, else the body's text), scrubbed and truncated.
pub(super) fn provider_message(body: &[u8], alias: &Alias) -> String {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v["error"]["message"].as_str().or(v["message"].as_str()))
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    if message.is_empty() {
        return "no message".into();
    }
    truncate(&scrub(&message, alias), MAX_ERROR_MESSAGE)
}

/// Cuts the key and the base URL out of text that goes to the guest.
/// `text` (a provider's message, an error) as the agent may see it: no key,
/// and no URL or address of the provider, whatever path follows its origin
/// (a message may name `http://host/prefix` where `base_url` is
/// `http://host/prefix/v1`).
pub(super) fn scrub(text: &str, alias: &Alias) -> String {
    let mut text = text.to_string();
    if let Some(Secret(key)) = &alias.key {
        text = text.replace(key.as_str(), "<redacted>");
    }
    let Ok(base) = reqwest::Url::parse(&alias.config.base_url) else {
        return text.replace(&alias.config.base_url, "<provider>");
    };
    let origin = base.origin().ascii_serialization();
    let mut scrubbed = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find(&origin) {
        scrubbed.push_str(&rest[..at]);
        scrubbed.push_str("<provider>");
        let after = &rest[at + origin.len()..];
        let url_end = after
            .find(|c: char| c.is_whitespace() || "\"'<>()[]{}`,;".contains(c))
            .unwrap_or(after.len());
        rest = &after[url_end..];
    }
    scrubbed.push_str(rest);
    if let Some(host) = base.host_str() {
        let authority = match base.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        scrubbed = scrubbed.replace(&authority, "<provider>");
    }
    scrubbed
}

pub(super) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    format!("{}…", &text[..text.floor_char_boundary(max)])
}

/// A wait as a person reads it: whole seconds (rounded up) from one second
/// on, milliseconds below.
pub(super) fn human_wait(d: Duration) -> Duration {
    if d >= Duration::from_secs(1) {
        Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
    } else {
        Duration::from_millis(d.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("short", 10), "short");
    }
}
