//! Who is asking, and may they? Reading is open on loopback; every change
//! needs the operator's token, as `Authorization: Bearer` (scripts) or as
//! a session cookie got by signing in with it (browsers), and a session's
//! changes also carry its CSRF token.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::{HeaderMap, header};

/// The session cookie's name, before the server's port: browsers send a
/// cookie to every port of its host, so dashboards on two ports of one
/// machine would otherwise each sign the other out.
const SESSION_COOKIE: &str = "colony_session";
/// The header a script signed in with a cookie sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Longest operator name kept (it becomes the audit trail's actor).
const MAX_OPERATOR: usize = 64;
/// How long a sign-in lasts.
pub const SESSION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// A signed-in browser.
#[derive(Clone, Debug)]
pub struct Session {
    pub operator: String,
    /// Sent back in every form and compared on every change it makes.
    pub csrf: String,
}

/// Who sent a request.
#[derive(Clone, Debug)]
pub enum Caller {
    /// No credentials: may read on loopback.
    Anonymous,
    /// The right bearer token.
    Token,
    /// A signed-in browser.
    Session(Session),
}

impl Caller {
    /// The audit trail's actor for changes this caller makes.
    pub fn actor(&self) -> Option<String> {
        match self {
            Caller::Anonymous => None,
            Caller::Token => Some("api".into()),
            Caller::Session(s) => Some(format!("web:{}", s.operator)),
        }
    }

    pub fn session(&self) -> Option<&Session> {
        match self {
            Caller::Session(s) => Some(s),
            _ => None,
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No credentials where they are needed (401).
    Missing,
    /// Credentials that are wrong, or a change without its CSRF token (403).
    Wrong(&'static str),
}

impl Denied {
    pub fn message(&self) -> String {
        match self {
            Denied::Missing => "this needs the operator's token: send `Authorization: Bearer TOKEN` \
                                (the token `colony serve` printed, or --token / COLONY_TOKEN), or sign in at /login"
                .into(),
            Denied::Wrong(why) => (*why).into(),
        }
    }
}

pub struct Auth {
    token: String,
    /// This server's session cookie name (see [`SESSION_COOKIE`]).
    cookie: String,
    /// Whether reading needs no credentials (listening on loopback).
    pub reads_open: bool,
    sessions: Mutex<HashMap<String, (Session, std::time::Instant)>>,
}

impl Auth {
    /// `port`: the server's, which names its session cookie.
    pub fn new(token: String, reads_open: bool, port: u16) -> Auth {
        Auth {
            token,
            cookie: format!("{SESSION_COOKIE}_{port}"),
            reads_open,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Who the request comes from. A bearer token or session cookie that
    /// matches nothing is refused outright rather than read as anonymous,
    /// so that a script with a stale token hears why.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, Denied> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            // The scheme is case-insensitive (RFC 9110 §11.1).
            let given = value.to_str().ok().and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ').unwrap_or((v.trim(), ""));
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            });
            return match given {
                // A script whose token variable was empty: no credentials.
                Some("") => Err(Denied::Missing),
                Some(given) if same(given, &self.token) => Ok(Caller::Token),
                Some(_) => Err(Denied::Wrong("the bearer token is not this server's token")),
                None => Err(Denied::Wrong(
                    "the Authorization header must be `Bearer TOKEN`",
                )),
            };
        }
        if let Some(id) = self.session_cookie(headers) {
            let mut sessions = self.sessions.lock().unwrap();
            sessions.retain(|_, (_, since)| since.elapsed() < SESSION_LIFETIME);
            return match sessions.get(&id) {
                Some((session, _)) => Ok(Caller::Session(session.clone())),
                // A session from before a restart: read on as anonymous (the
                // page offers to sign in again); changes will say 401.
                None => Ok(Caller::Anonymous),
            };
        }
        Ok(Caller::Anonymous)
    }

    /// May this caller change things? Sessions must also show their CSRF
    /// token (`given`: from the form or the `X-CSRF-Token` header).
    pub fn may_change(&self, caller: &Caller, given_csrf: Option<&str>) -> Result<(), Denied> {
        match caller {
            Caller::Anonymous => Err(Denied::Missing),
            Caller::Token => Ok(()),
            Caller::Session(session) => match given_csrf {
                Some(given) if same(given, &session.csrf) => Ok(()),
                _ => Err(Denied::Wrong(
                    "the CSRF token is missing or stale (a signed-in browser sends it as the form's `csrf` field or the X-CSRF-Token header): reload the page and try again; scripts use `Authorization: Bearer TOKEN` instead",
                )),
            },
        }
    }

    /// Signs in with the token; returns the new session's id for the cookie.
    pub fn sign_in(&self, token: &str, operator: &str) -> Result<(String, Session), &'static str> {
        if !same(token.trim(), &self.token) {
            return Err("that is not this server's token");
        }
        let operator = clean_operator(operator)?;
        let session = Session {
            operator,
            csrf: random_token(),
        };
        let id = random_token();
        self.sessions
            .lock()
            .unwrap()
            .insert(id.clone(), (session.clone(), std::time::Instant::now()));
        Ok((id, session))
    }

    pub fn sign_out(&self, headers: &HeaderMap) {
        if let Some(id) = self.session_cookie(headers) {
            self.sessions.lock().unwrap().remove(&id);
        }
    }

    fn session_cookie(&self, headers: &HeaderMap) -> Option<String> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (name, value) = pair.trim().split_once('=')?;
                (name == self.cookie).then(|| value.to_string())
            })
    }

    /// The `Set-Cookie` value for a new session: not readable by scripts,
    /// not sent along with requests other sites start.
    pub fn session_cookie_header(&self, id: &str) -> String {
        format!(
            "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            self.cookie,
            SESSION_LIFETIME.as_secs()
        )
    }

    pub fn expired_cookie_header(&self) -> String {
        format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
            self.cookie
        )
    }
}

/// The operator's name as the audit trail will show it: printable, short.
fn clean_operator(name: &str) -> Result<String, &'static str> {
    let name = name.trim();
    if name.is_empty() {
        return Err("say who you are: the name goes into the audit trail of what you change");
    }
    if name.chars().count() > MAX_OPERATOR || name.chars().any(char::is_control) {
        return Err("the name must be at most 64 printable characters");
    }
    Ok(name.to_string())
}

/// 32 bytes from the OS's random source, as hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares secrets in time independent of where they differ, and of
/// their lengths (it compares their SHA-256 digests).
fn same(given: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(given), Sha256::digest(expected));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Whether a `Host` header names this machine's loopback (any port): on
/// loopback the dashboard refuses other names, so that a web page cannot
/// rebind its own name to 127.0.0.1 and read the queue.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`, nothing else after the bracket.
        Some(rest) => match rest.split_once(']') {
            Some((name, "")) => name,
            Some((name, port)) if port.strip_prefix(':').is_some_and(is_port) => name,
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    // Host names are case-insensitive. Any loopback address literal, as
    // `--listen 127.0.0.2:7070` prints it (only names can be rebound).
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "localhost:7070",
            "127.0.0.1:1",
            "[::1]:7070",
            "[::1]",
            "LOCALHOST:7070",
            "LocalHost",
            "127.0.0.2:7070",
            "127.255.255.254",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:7070",
            "127.0.0.1.evil.example",
            "10.0.0.1",
            "[::1]x.evil",
            "[::1]:x",
            "[::1]:",
            "[::1",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abd", "abc"));
        assert!(!same("ab", "abc"));
        assert_eq!(random_token().len(), 64);
        assert_ne!(random_token(), random_token());
    }

    #[test]
    fn sessions_need_their_csrf_token() {
        let auth = Auth::new("t".into(), true, 8080);
        assert_eq!(
            auth.sign_in("wrong", "ann").unwrap_err(),
            "that is not this server's token"
        );
        assert!(auth.sign_in("t", " ").is_err());
        let (_, session) = auth.sign_in("t", "ann").unwrap();
        let caller = Caller::Session(session.clone());
        assert!(auth.may_change(&caller, Some(&session.csrf)).is_ok());
        assert!(auth.may_change(&caller, Some("other")).is_err());
        assert!(auth.may_change(&caller, None).is_err());
        assert_eq!(
            auth.may_change(&Caller::Anonymous, None),
            Err(Denied::Missing)
        );
        assert_eq!(caller.actor().unwrap(), "web:ann");
    }
}
