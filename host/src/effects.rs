//! Side effects as data: HTTP requests a run queues to be sent after its
//! task commits. Pure (no SQL, no wasm, no network): the runtime collects
//! them, the queue stores them with the completion (the outbox), the daemon
//! delivers them.

use serde::{Deserialize, Serialize};

/// Most effects one run may queue.
pub const MAX_EFFECTS_PER_RUN: usize = 100;
/// Largest body of one effect.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Most body bytes of all of one run's effects (held by the host, outside
/// the run's memory cap, until the task completes).
pub const MAX_BODY_BYTES_PER_RUN: usize = 8 << 20;
/// Delivery attempts before an effect is marked failed (an agent's manifest
/// may set `effect_attempts`): 0.5 s, 1 s, 2 s, 4 s apart, doubling.
pub const DEFAULT_DELIVERY_ATTEMPTS: u32 = 5;
/// Most a manifest may set `effect_attempts` to: the waits double up to
/// ten minutes apart, so 20 attempts span about two hours.
pub const MAX_DELIVERY_ATTEMPTS: u32 = 20;

/// A request to send once the task has committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    /// 1, 2, ... within the run: with the task id, the idempotency key.
    pub seq: u32,
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// Delivery attempts before it is marked failed (the agent's
    /// `effect_attempts`).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
}

fn default_attempts() -> u32 {
    DEFAULT_DELIVERY_ATTEMPTS
}

impl Effect {
    /// The `Idempotency-Key` header value every delivery attempt carries.
    pub fn idempotency_key(task_id: i64, seq: u32) -> String {
        format!("colony-{task_id}-{seq}")
    }
}

/// Most headers of one effect, and most bytes of their names and values
/// together (held by the host with the body, and stored with it).
pub const MAX_HEADERS: usize = 100;
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// The bytes of headers' names and values together.
pub fn header_bytes(headers: &[(String, String)]) -> usize {
    headers.iter().map(|(n, v)| n.len() + v.len()).sum()
}

/// A guest's name (a method, a header name) as a refusal quotes it: cut to
/// a line's worth, saying how long it was. The refusal goes to the agent,
/// the trail and the task's log.
fn quoted(text: &str) -> String {
    const MAX: usize = 64;
    match text.len() > MAX {
        true => format!(
            "{:?}… ({} bytes)",
            &text[..text.floor_char_boundary(MAX)],
            text.len()
        ),
        false => format!("{text:?}"),
    }
}

/// Methods an effect may use.
pub const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Headers the host sets itself when it sends an effect: the body's framing
/// (a guest's `Content-Length: 3` cut a 10-byte body to 3, a larger one
/// left the receiver waiting) and the hop-by-hop headers of the connection.
const HOST_SET_HEADERS: [&str; 10] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "host",
    "http2-settings",
];

/// Checks the parts of an effect that need no grant: method, URL shape,
/// headers and body size. The message is for the agent.
pub fn check_shape(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> Result<(), String> {
    if !METHODS.contains(&method) {
        return Err(format!(
            "method {} is not one of {}",
            quoted(method),
            METHODS.join(", ")
        ));
    }
    let header_bytes = header_bytes(headers);
    if headers.len() > MAX_HEADERS || header_bytes > MAX_HEADER_BYTES {
        return Err(format!(
            "{} headers of {header_bytes} bytes: an effect may carry at most {MAX_HEADERS} headers of {} KiB in all",
            headers.len(),
            MAX_HEADER_BYTES >> 10
        ));
    }
    let scheme_is = |scheme: &str| {
        url.get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
    };
    // Schemes are case-insensitive (`HTTP://` is what a run's own requests take too).
    if !(scheme_is("http://") || scheme_is("https://")) {
        // Only the scheme: the rest may hold a password or a query, and the
        // refusal goes to the trail and the task's log.
        let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
        let scheme = &scheme[..scheme.floor_char_boundary(32)];
        return Err(format!(
            "the URL's scheme is {scheme:?}: only http:// and https:// URLs are sent"
        ));
    }
    check_path_as_sent(url)?;
    for (name, value) in headers {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err(format!(
                "header {} is not a valid HTTP header name",
                quoted(name)
            ));
        }
        // Visible ASCII, spaces, tabs and obs-text, as RFC 9110 allows.
        if let Some(bad) = value
            .bytes()
            .find(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return Err(format!(
                "header {} has a control character (byte {bad:#04x}) in its value",
                quoted(name)
            ));
        }
        // Silently replaced, the agent's own key would make it believe its
        // receiver deduplicates by that key.
        if name.eq_ignore_ascii_case("idempotency-key") {
            return Err(format!(
                "header {} is set by the host: every attempt of an effect carries Idempotency-Key: colony-<task id>-<seq>, the same on each retry",
                quoted(name)
            ));
        }
        if HOST_SET_HEADERS
            .iter()
            .any(|set| name.eq_ignore_ascii_case(set))
        {
            return Err(format!(
                "header {} is set by the host when it sends the effect (framing and connection headers follow the stored body)",
                quoted(name)
            ));
        }
    }
    if let Some(body) = body
        && body.len() > MAX_BODY_BYTES
    {
        return Err(format!(
            "the body is {} bytes, more than the limit of {MAX_BODY_BYTES}",
            body.len()
        ));
    }
    Ok(())
}

/// Refuses an http(s) URL whose request would go to another path than the
/// one written, stored and shown to a reviewer (with the origin's secrets):
/// the sender's URL parser resolves `.` and `..` segments and reads a
/// backslash as a `/`. Checked when an effect is queued and again before
/// each delivery (rows stored by an older build included).
pub fn check_path_as_sent(url: &str) -> Result<(), String> {
    if has_dot_segment(url) {
        return Err(
            "the URL's path has a `.` or `..` segment (plain or percent-encoded), which the sender \
             would resolve: the effect would go to another path than the one stored and shown to \
             a reviewer; give the path it means"
                .into(),
        );
    }
    if raw_path(url).contains('\\') {
        return Err(
            "the URL's path has a backslash, which the sender reads as a `/` (resolving any `..` it then \
             makes): the effect would go to another path than the one stored and shown to a \
             reviewer; write the path with `/`"
                .into(),
        );
    }
    // Anything else the sender's parser would rewrite in the path.
    let written = raw_path(url);
    match reqwest::Url::parse(url) {
        Err(e) => Err(format!("the URL cannot be sent: {e}")),
        Ok(parsed) if parsed.path() != written && !(written.is_empty() && parsed.path() == "/") => {
            Err(format!(
                "the sender would request the path {:?}, not {:?} as written (stored and shown to \
                 a reviewer); write it as it will be sent",
                parsed.path(),
                written
            ))
        }
        Ok(_) => Ok(()),
    }
}

/// The path of `url` as written: from the end of its authority to its
/// query or fragment.
fn raw_path(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let Some(path_start) = after_scheme.find(['/', '?', '#']) else {
        return "";
    };
    after_scheme[path_start..]
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
}

/// Whether the path of `url` (an http(s) URL) has a `.` or `..` segment,
/// as is or percent-encoded (`%2e%2E`): a URL parser resolves them, so the
/// request would reach another path than the one written.
fn has_dot_segment(url: &str) -> bool {
    raw_path(url).split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

#[cfg(test)]
mod tests {
    use super::check_shape;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn framing_connection_and_control_characters_are_refused_in_headers() {
        let url = "https://api.example/x";
        for (pairs, says) in [
            (&[("Content-Length", "3")][..], "set by the host"),
            (&[("transfer-encoding", "chunked")], "set by the host"),
            (&[("Connection", "close, X-Custom")], "set by the host"),
            (&[("Upgrade", "h2c")], "set by the host"),
            (&[("HOST", "other.example")], "set by the host"),
            (
                &[("Idempotency-Key", "mine-1")],
                "set by the host: every attempt",
            ),
            (&[("X-Ctl", "a\u{1}b")], "control character (byte 0x01)"),
            (&[("X-Del", "a\u{7f}")], "control character (byte 0x7f)"),
            (
                &[("X-Line", "a\r\nInjected: 1")],
                "control character (byte 0x0d)",
            ),
            (&[("Bad Name", "1")], "not a valid HTTP header name"),
            // A guest's name is quoted cut, saying its length.
            (
                &[(&*"Ä".repeat(20_000), "1")],
                "\"… (40000 bytes) is not a valid",
            ),
            (
                &[("X-Big", &*"v".repeat(70_000))],
                "headers of 70005 bytes: an effect may carry at most 100 headers of 64 KiB",
            ),
        ] {
            let error = check_shape("POST", url, &headers(pairs), Some(b"body")).unwrap_err();
            assert!(error.contains(says), "{pairs:?}: {error}");
        }
        let fine = headers(&[
            ("Content-Type", "application/json"),
            ("X-Tab", "a\tb"),
            ("X-Utf8", "café"),
        ]);
        assert_eq!(check_shape("POST", url, &fine, Some(b"{}")), Ok(()));
        assert_eq!(
            check_shape("POST", "HTTPS://api.example/x", &fine, None),
            Ok(())
        );
        assert!(check_shape("POST", "http:/", &fine, None).is_err());
        // Another scheme is named, never the URL's password or query.
        let other = check_shape(
            "POST",
            "ftp://user:hunter2@host:21/x?token=SECRETQ",
            &fine,
            None,
        )
        .unwrap_err();
        assert!(other.contains("\"ftp\""), "{other}");
        assert!(
            !other.contains("hunter2") && !other.contains("SECRETQ"),
            "{other}"
        );
    }

    /// A path with dot segments went out resolved (`/a/%2e%2e/c` reached
    /// `/c`) while `effects` and the reviewer saw it as written.
    #[test]
    fn a_path_with_dot_segments_is_refused() {
        for url in [
            "http://api.example/a/../b",
            "http://api.example/a/%2e%2e/c",
            "http://api.example/a/%2E./c",
            "http://api.example/./b",
            "http://api.example/a/..",
            "http://api.example/a/.?q=1",
        ] {
            let error = check_shape("POST", url, &[], None).unwrap_err();
            assert!(error.contains("`.` or `..` segment"), "{url}: {error}");
        }
        for url in [
            "http://api.example/a/..b/c",
            "http://api.example/v1.2/x",
            "http://api.example/a?path=../b",
            "http://api.example",
            "http://api.example/a/...",
            "http://api.example/caf%C3%A9/x%20y?q=a\\b",
        ] {
            assert_eq!(check_shape("POST", url, &[], None), Ok(()), "{url}");
        }
    }

    /// A backslash is a `/` to the sender's URL parser, which then resolved
    /// the `..` it made: `/v1/listings/42\..\..\admin\wipe` went out as
    /// `/v1/admin/wipe`, with the origin's secret, while the reviewer saw
    /// the path as written (found by a review).
    #[test]
    fn a_path_the_sender_would_rewrite_is_refused() {
        let error = check_shape(
            "POST",
            r"https://api.shop.example/v1/listings/42\..\..\admin\wipe",
            &[],
            None,
        )
        .unwrap_err();
        assert!(error.contains("path has a backslash"), "{error}");
        assert!(check_shape("POST", r"https://api.shop.example/a\b", &[], None).is_err());
        // Whatever else the parser would rewrite is named as it would go.
        let error = check_shape("POST", "https://api.shop.example/a b", &[], None).unwrap_err();
        assert!(
            error.contains(r#"the path "/a%20b", not "/a b""#),
            "{error}"
        );
    }
}
