//! What an agent is granted: the origins it may reach (`allowed_hosts`),
//! the secrets the host adds to its requests, and the per-run bounds, all
//! parsed from its manifest with errors naming the key; and which addresses
//! count as non-public (refused unless a grant names them literally).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::Authority;
use serde::Deserialize;

use crate::runtime::Limits;

/// Default `http_timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `http_max_response_kb`.
pub const DEFAULT_MAX_RESPONSE_KB: u64 = 1024;
/// Default `http_max_requests`.
pub const DEFAULT_MAX_REQUESTS: u32 = 100;

/// Most a manifest may set `http_max_response_kb` to (1 GiB).
const MAX_RESPONSE_KB: u64 = 1 << 20;
/// Most a manifest may set `http_max_requests` to.
const MAX_REQUESTS: u32 = 100_000;

// ----- what an agent is granted ---------------------------------------------

/// `http` or `https`: the only schemes a grant may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn parse(text: &str) -> Option<Scheme> {
        match text.to_ascii_lowercase().as_str() {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            _ => None,
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// The host part of a request's origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lowercase, without a trailing dot.
    Name(String),
    /// An IP address literal.
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// Where a request goes: scheme, host and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub scheme: Scheme,
    pub host: Host,
    pub port: u16,
}

impl Origin {
    /// The origin of an absolute `http`/`https` URL.
    pub fn of_uri(uri: &http::Uri) -> Result<Origin, String> {
        let scheme = uri
            .scheme_str()
            .ok_or_else(|| "the URL has no scheme".to_string())?;
        let scheme = Scheme::parse(scheme)
            .ok_or_else(|| format!("the scheme {scheme:?} is not http or https"))?;
        let authority = uri
            .authority()
            .ok_or_else(|| "the URL has no host".to_string())?;
        Origin::of_authority(scheme, authority)
    }

    fn of_authority(scheme: Scheme, authority: &Authority) -> Result<Origin, String> {
        if authority.as_str().contains('@') {
            return Err("user information in the URL is not allowed".into());
        }
        let (host, port) = split_host_port(authority.as_str())?;
        let host = parse_host(host)?;
        Ok(Origin {
            scheme,
            host,
            port: port.unwrap_or(scheme.default_port()),
        })
    }

    /// The value of the `Host` header: the host, and the port unless it is
    /// the scheme's default.
    pub(super) fn host_header(&self) -> String {
        if self.port == self.scheme.default_port() {
            self.host.to_string()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.host_header())
    }
}

/// Which hosts an `allowed_hosts` entry covers.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    /// Exactly this host (a name, or an address named literally).
    Exact(Host),
    /// Any subdomain of this name (`*.example.com`), not the name itself.
    Subdomains(String),
}

/// One `allowed_hosts` entry: scheme, host (or `*.` subdomains) and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: Scheme,
    host: HostPattern,
    port: u16,
}

impl OriginPattern {
    /// Parses `https://api.example.com`, `http://127.0.0.1:9000`,
    /// `https://*.example.com` or `http://[::1]:8080` (a trailing `/` is
    /// allowed; a path, query, user or any other scheme is not).
    pub fn parse(text: &str) -> Result<OriginPattern, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("{text:?} is not an origin like \"https://api.example.com\""))?;
        let scheme = Scheme::parse(scheme)
            .ok_or_else(|| format!("{text:?}: the scheme must be http or https"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() {
            return Err(format!("{text:?} names no host"));
        }
        if let Some(c) = authority
            .chars()
            .find(|c| matches!(c, '/' | '?' | '#' | '@'))
        {
            return Err(format!(
                "{text:?}: an origin is scheme, host and port only (found {c:?})"
            ));
        }
        let (host, port) = split_host_port(authority).map_err(|e| format!("{text:?}: {e}"))?;
        let host = match host.strip_prefix("*.") {
            Some(suffix) => {
                let Host::Name(name) = parse_host(suffix).map_err(|e| format!("{text:?}: {e}"))?
                else {
                    return Err(format!("{text:?}: `*.` applies to names, not addresses"));
                };
                if !name.contains('.') {
                    return Err(format!(
                        "{text:?}: `*.` needs a domain of at least two labels (like *.example.com)"
                    ));
                }
                HostPattern::Subdomains(name)
            }
            None => HostPattern::Exact(parse_host(host).map_err(|e| format!("{text:?}: {e}"))?),
        };
        Ok(OriginPattern {
            scheme,
            host,
            port: port.unwrap_or(scheme.default_port()),
        })
    }

    pub fn matches(&self, origin: &Origin) -> bool {
        if self.scheme != origin.scheme || self.port != origin.port {
            return false;
        }
        match (&self.host, &origin.host) {
            (HostPattern::Exact(granted), host) => granted == host,
            (HostPattern::Subdomains(domain), Host::Name(name)) => name
                .strip_suffix(domain.as_str())
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            (HostPattern::Subdomains(_), Host::Ip(_)) => false,
        }
    }

    /// Whether this entry names `localhost` or a `.localhost` name (RFC
    /// 6761), which always resolve to loopback.
    fn names_localhost(&self) -> bool {
        let name = match &self.host {
            HostPattern::Exact(Host::Name(name)) | HostPattern::Subdomains(name) => name,
            HostPattern::Exact(Host::Ip(_)) => return false,
        };
        name == "localhost" || name.ends_with(".localhost")
    }

    /// Whether this entry names `ip` literally.
    pub(super) fn names_address(&self, ip: IpAddr) -> bool {
        self.host == HostPattern::Exact(Host::Ip(ip))
    }
}

impl fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            HostPattern::Exact(host) => host.to_string(),
            HostPattern::Subdomains(domain) => format!("*.{domain}"),
        };
        write!(f, "{}://{host}", self.scheme.as_str())?;
        if self.port != self.scheme.default_port() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// Splits `host[:port]` (with `[v6]` in brackets).
fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority
            .find(']')
            .ok_or_else(|| "an IPv6 address is missing its `]`".to_string())?;
        match &authority[end + 1..] {
            "" => (&authority[..=end], None),
            rest => match rest.strip_prefix(':') {
                Some(port) => (&authority[..=end], Some(port)),
                None => return Err(format!("unexpected {rest:?} after the address")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(port) => match port.parse::<u16>() {
            Ok(n) if n > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => return Err(format!("{port:?} is not a port")),
        },
    };
    Ok((host, port))
}

/// A host name (letters, digits, `-` and `.`; the last label not numeric),
/// an IPv4 address, or an IPv6 address in brackets.
fn parse_host(host: &str) -> Result<Host, String> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("{host:?} is not an IPv6 address"))?;
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| format!("{host:?} is not an IPv6 address"));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let labels: Vec<&str> = name.split('.').collect();
    let good_label = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.is_empty() || name.len() > 253 || !labels.iter().all(good_label) {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    // `127.1` or `2130706433` would resolve to an address: only canonical
    // dotted quads count as addresses, and such names are refused outright.
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    Ok(Host::Name(name))
}

/// Why connecting to `ip` needs the grant to name it literally, if it does:
/// loopback, private, link-local, unspecified and other non-public ranges.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => non_public_v4(ip),
        IpAddr::V6(ip) => {
            // Addresses that carry an IPv4 address: judged by it.
            if let Some(v4) = ip.to_ipv4_mapped() {
                return non_public_v4(v4);
            }
            let s = ip.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                // NAT64 (64:ff9b::/96)
                return non_public_v4(Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32));
            }
            if s[0] == 0x2002 {
                // 6to4 (2002::/16)
                return non_public_v4(Ipv4Addr::from(((s[1] as u32) << 16) | s[2] as u32));
            }
            if ip.is_unspecified() {
                Some("unspecified")
            } else if ip.is_loopback() {
                Some("loopback")
            } else if s[0..6] == [0, 0, 0, 0, 0, 0] {
                // IPv4-compatible (deprecated) ::a.b.c.d
                non_public_v4(Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32))
                    .or(Some("reserved"))
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("private")
            } else if s[0] & 0xff00 == 0xff00 {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private()
        || (a == 100 && (64..128).contains(&b))
        || (a == 198 && (b & 0xfe) == 18)
    {
        // RFC 1918, the shared address space (100.64/10), benchmarking (198.18/15)
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        Some("reserved")
    } else {
        None
    }
}

/// A header the host adds to every request to one origin, with a value
/// read from the environment when the agent loads. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    pub(super) origin: OriginPattern,
    pub(super) header: HeaderName,
    pub(super) value: HeaderValue,
}

impl Secret {
    /// The origin it is sent to and the header it goes in (never its value).
    pub fn target(&self) -> (String, &str) {
        (self.origin.to_string(), self.header.as_str())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("origin", &self.origin.to_string())
            .field("header", &self.header)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// Whether the environment variable `var` holds one of the host's own
/// credentials: a provider key of the loaded colony.toml, or a variable the
/// host reads for its dashboard token or database (`COLONY_*`, `PG*`).
fn is_host_credential(var: &str) -> bool {
    var.starts_with("COLONY_")
        || var.starts_with("PG")
        || var == "DATABASE_URL"
        || crate::models::is_provider_key_variable(var)
}

/// What an agent may reach over HTTP, and within which bounds. The default
/// grants nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpGrant {
    pub allowed: Vec<OriginPattern>,
    pub secrets: Vec<Secret>,
    /// Per request: connecting, the response's head and its body.
    pub timeout: Duration,
    /// Bytes of one response body the agent may read.
    pub max_response_bytes: u64,
    /// Requests one run may make (refused ones included).
    pub max_requests: u32,
}

impl Default for HttpGrant {
    fn default() -> Self {
        HttpGrant {
            allowed: Vec::new(),
            secrets: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_KB << 10,
            max_requests: DEFAULT_MAX_REQUESTS,
        }
    }
}

/// One `[secrets."<origin>"]` table of a manifest.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// The header the host sets, e.g. `Authorization`.
    pub header: String,
    /// The environment variable holding the value (read when the agent loads).
    pub env: String,
    /// Put before the value, e.g. `"Bearer "`.
    #[serde(default)]
    pub prefix: String,
}

/// The manifest keys of outbound HTTP, as [`super::Manifest`] holds them.
pub struct ManifestHttp<'a> {
    pub allowed_hosts: Option<&'a [String]>,
    pub secrets: Option<&'a BTreeMap<String, SecretSpec>>,
    pub http_timeout: Option<&'a str>,
    pub http_max_response_kb: Option<u64>,
    pub http_max_requests: Option<u32>,
}

impl HttpGrant {
    /// The grant a manifest describes; `env` reads environment variables.
    /// An error is `(key, why)`, the key as written in the manifest.
    pub fn from_manifest(
        m: ManifestHttp<'_>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<HttpGrant, (String, String)> {
        let mut grant = HttpGrant::default();
        for entry in m.allowed_hosts.unwrap_or_default() {
            let pattern = OriginPattern::parse(entry).map_err(|e| ("allowed_hosts".into(), e))?;
            if pattern.names_localhost() {
                // Loaded all the same (an agent that stopped loading would
                // leave its tasks waiting), but it can never be reached.
                tracing::warn!(
                    "allowed_hosts entry {entry:?} names localhost, which resolves to a loopback \
                     address, reached only when a grant names the address itself: every request \
                     to it is refused; write http://127.0.0.1:PORT (or http://[::1]:PORT) and send \
                     the requests there"
                );
            }
            if !grant.allowed.contains(&pattern) {
                grant.allowed.push(pattern);
            }
        }
        for (origin, spec) in m.secrets.into_iter().flatten() {
            let key = format!("secrets.{origin:?}");
            let pattern = OriginPattern::parse(origin).map_err(|e| (key.clone(), e))?;
            if !grant.allowed.contains(&pattern) {
                return Err((
                    key,
                    format!(
                        "{origin} is not in allowed_hosts (a secret is only sent to an allowed origin)"
                    ),
                ));
            }
            let header = HeaderName::from_bytes(spec.header.as_bytes()).map_err(|_| {
                (
                    key.clone(),
                    format!("{:?} is not a header name", spec.header),
                )
            })?;
            // Framing headers follow the body (a secret there was never
            // sent), and an effect's Idempotency-Key is the host's own (a
            // secret there went out beside it).
            if wasmtime_wasi_http::DEFAULT_FORBIDDEN_HEADERS.contains(&header)
                || ["content-length", "transfer-encoding", "idempotency-key"]
                    .contains(&header.as_str())
            {
                return Err((key, format!("the host cannot set the header {header}")));
            }
            // The host's own credentials are not the agent's to send: a
            // manifest naming them would hand them to a server it chose.
            if is_host_credential(&spec.env) {
                return Err((
                    key,
                    format!(
                        "{} holds one of this host's own credentials (a provider key of colony.toml, the dashboard token, or PostgreSQL's), which an agent's secret may not name; give the agent a variable of its own",
                        spec.env
                    ),
                ));
            }
            // Empty is as good as unset: it would send `Authorization: Bearer `.
            let Some(secret) = env(&spec.env).filter(|s| !s.trim().is_empty()) else {
                return Err((
                    key,
                    format!(
                        "the environment variable {} (the secret for {origin}) is not set or is empty; the host reads it when the agent loads",
                        spec.env
                    ),
                ));
            };
            let mut value =
                HeaderValue::from_str(&format!("{}{secret}", spec.prefix)).map_err(|_| {
                    (
                        key.clone(),
                        format!(
                            "the value of {} (with its prefix) is not a valid header value",
                            spec.env
                        ),
                    )
                })?;
            value.set_sensitive(true);
            grant.secrets.push(Secret {
                origin: pattern,
                header,
                value,
            });
        }
        if let Some(timeout) = m.http_timeout {
            grant.timeout = humantime::parse_duration(timeout).map_err(|e| {
                (
                    "http_timeout".into(),
                    format!("{e} (try \"30s\" or \"2m\")"),
                )
            })?;
            if grant.timeout == Duration::ZERO {
                return Err(("http_timeout".into(), "must be longer than 0".into()));
            }
        }
        if let Some(kb) = m.http_max_response_kb {
            if !(1..=MAX_RESPONSE_KB).contains(&kb) {
                return Err((
                    "http_max_response_kb".into(),
                    format!("{kb} is outside 1..={MAX_RESPONSE_KB}"),
                ));
            }
            grant.max_response_bytes = kb << 10;
        }
        if let Some(n) = m.http_max_requests {
            if !(1..=MAX_REQUESTS).contains(&n) {
                return Err((
                    "http_max_requests".into(),
                    format!(
                        "{n} is outside 1..={MAX_REQUESTS} (leave allowed_hosts out to allow none)"
                    ),
                ));
            }
            grant.max_requests = n;
        }
        Ok(grant)
    }

    /// Is this method and URL granted? Scheme, host and port only (no DNS).
    /// A refusal names the origin.
    pub fn check_url(&self, method: &str, url: &str) -> Result<(), String> {
        let method = http::Method::from_bytes(method.as_bytes())
            .map_err(|_| format!("{method:?} is not an HTTP method"))?;
        self.check(&method, &origin_of(url)?)
    }

    /// The secret headers the host sets on a request to `url` (`[secrets]`
    /// of the manifest); same-named headers of the agent's are replaced.
    pub fn secret_headers(&self, url: &str) -> Vec<(HeaderName, HeaderValue)> {
        let Ok(origin) = origin_of(url) else {
            return Vec::new();
        };
        self.secrets
            .iter()
            .filter(|s| s.origin.matches(&origin))
            .map(|s| (s.header.clone(), s.value.clone()))
            .collect()
    }

    /// Whether a request with this method to this origin is granted.
    pub(super) fn check(&self, method: &http::Method, origin: &Origin) -> Result<(), String> {
        // Methods are case-sensitive tokens, but a server may read `trace`
        // as TRACE and echo the request, secret headers included.
        if ["CONNECT", "TRACE"]
            .iter()
            .any(|m| method.as_str().eq_ignore_ascii_case(m))
        {
            return Err(format!("the method {method} is not allowed"));
        }
        if self.allowed.iter().any(|p| p.matches(origin)) {
            Ok(())
        } else if self.allowed.is_empty() {
            Err(format!(
                "{origin} is not granted: the agent's manifest has no allowed_hosts"
            ))
        } else {
            Err(format!("{origin} is not in the agent's allowed_hosts"))
        }
    }

    /// Whether an entry matching `origin` names `ip` literally.
    pub(super) fn names_address(&self, origin: &Origin, ip: IpAddr) -> bool {
        self.allowed
            .iter()
            .any(|p| p.matches(origin) && p.names_address(ip))
    }
}

/// Is this method and URL allowed by the agent's grant? Scheme, host and
/// port are matched against `allowed_hosts` (no DNS lookup; the addresses
/// are checked when a request is sent). A refusal names the origin.
pub fn check_url(limits: &Limits, method: &str, url: &str) -> Result<(), String> {
    limits.http.check_url(method, url)
}

/// The origin of `url`. A refusal names the URL without what may be a
/// secret (a password in it, its query string): it goes to the audit trail
/// and the task log.
fn origin_of(url: &str) -> Result<Origin, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("the URL is not valid: {e}"))?;
    Origin::of_uri(&uri).map_err(|e| format!("{}: {e}", shown_url(&uri)))
}

/// A URL as a refusal may show it: scheme, host, port and path; never its
/// user, password or query.
pub(super) fn shown_url(uri: &http::Uri) -> String {
    format!("\"{}{}\"", shown_origin(uri), uri.path())
}

/// A URI's origin as the trail shows it: never the user or password.
pub(super) fn shown_origin(uri: &http::Uri) -> String {
    match Origin::of_uri(uri) {
        Ok(origin) => origin.to_string(),
        Err(_) => format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("?"),
            uri.authority()
                .map(|a| a.as_str().rsplit('@').next().unwrap_or_default())
                .unwrap_or("?")
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn origin(url: &str) -> Origin {
        Origin::of_uri(&url.parse().unwrap()).unwrap()
    }

    fn pattern(text: &str) -> OriginPattern {
        OriginPattern::parse(text).unwrap()
    }

    #[test]
    fn origins_match_scheme_host_and_port() {
        let api = pattern("https://api.example.com");
        assert!(api.matches(&origin("https://api.example.com/v1?x=1")));
        assert!(api.matches(&origin("https://API.Example.com:443/")));
        assert!(api.matches(&origin("https://api.example.com./")));
        assert!(!api.matches(&origin("http://api.example.com/")), "scheme");
        assert!(
            !api.matches(&origin("https://api.example.com:8443/")),
            "port"
        );
        assert!(!api.matches(&origin("https://example.com/")));
        assert!(!api.matches(&origin("https://api.example.com.evil.net/")));
        assert!(!api.matches(&origin("https://xapi.example.com/")));

        let local = pattern("http://127.0.0.1:9000/");
        assert!(local.matches(&origin("http://127.0.0.1:9000/x")));
        assert!(!local.matches(&origin("http://127.0.0.1:9001/x")));
        assert!(!local.matches(&origin("http://127.0.0.1/x")));
        assert!(!local.matches(&origin("http://localhost:9000/x")));

        let v6 = pattern("http://[::1]:8080");
        assert!(v6.matches(&origin("http://[::1]:8080/")));
        assert_eq!(v6.to_string(), "http://[::1]:8080");
        assert_eq!(
            pattern("HTTPS://Api.Example.com:443").to_string(),
            "https://api.example.com"
        );
    }

    #[test]
    fn wildcards_cover_subdomains_only() {
        let any = pattern("https://*.example.com");
        assert!(any.matches(&origin("https://a.example.com/")));
        assert!(any.matches(&origin("https://a.b.example.com/")));
        assert!(!any.matches(&origin("https://example.com/")));
        assert!(!any.matches(&origin("https://badexample.com/")));
        assert!(!any.matches(&origin("https://a.example.com.evil.net/")));
        assert!(!any.matches(&origin("http://a.example.com/")));
        assert_eq!(any.to_string(), "https://*.example.com");
    }

    #[test]
    fn localhost_names_are_known_as_such() {
        for name in [
            "http://localhost:9000",
            "http://LocalHost.",
            "https://api.localhost",
            "https://*.dev.localhost",
        ] {
            assert!(pattern(name).names_localhost(), "{name}");
        }
        for name in [
            "https://localhost.example.com",
            "http://127.0.0.1:9000",
            "https://*.example.com",
        ] {
            assert!(!pattern(name).names_localhost(), "{name}");
        }
    }

    #[test]
    fn bad_origins_are_refused_with_a_reason() {
        for bad in [
            "api.example.com",
            "ftp://example.com",
            "https://",
            "https://example.com/path",
            "https://example.com?q",
            "https://user@example.com",
            "https://example.com:0",
            "https://example.com:99999",
            "https://*.com",
            "https://*.127.0.0.1",
            "https://exa_mple.com",
            "http://127.1",
            "http://2130706433",
            "http://[::1",
            "https://a.*.example.com",
        ] {
            assert!(
                OriginPattern::parse(bad).is_err(),
                "{bad} should be refused"
            );
        }
        assert!(Origin::of_uri(&"https://u:p@example.com/".parse().unwrap()).is_err());
    }

    #[test]
    fn addresses_are_classified() {
        let kind = |s: &str| non_public(s.parse().unwrap());
        assert_eq!(kind("127.0.0.1"), Some("loopback"));
        assert_eq!(kind("127.8.9.10"), Some("loopback"));
        assert_eq!(kind("10.1.2.3"), Some("private"));
        assert_eq!(kind("172.16.0.1"), Some("private"));
        assert_eq!(kind("172.31.255.255"), Some("private"));
        assert_eq!(kind("192.168.1.1"), Some("private"));
        assert_eq!(kind("100.64.0.1"), Some("private"));
        assert_eq!(kind("169.254.169.254"), Some("link-local"));
        assert_eq!(kind("0.0.0.0"), Some("unspecified"));
        assert_eq!(kind("255.255.255.255"), Some("reserved"));
        assert_eq!(kind("224.0.0.1"), Some("reserved"));
        assert_eq!(kind("::"), Some("unspecified"));
        assert_eq!(kind("::1"), Some("loopback"));
        assert_eq!(kind("fd00::1"), Some("private"));
        assert_eq!(kind("fe80::1"), Some("link-local"));
        assert_eq!(kind("ff02::1"), Some("multicast"));
        assert_eq!(kind("::ffff:127.0.0.1"), Some("loopback"));
        assert_eq!(kind("::ffff:169.254.169.254"), Some("link-local"));
        assert_eq!(kind("64:ff9b::a00:1"), Some("private"));
        assert_eq!(kind("2002:c0a8:101::1"), Some("private"));
        assert_eq!(kind("172.32.0.1"), None);
        assert_eq!(kind("93.184.216.34"), None);
        assert_eq!(kind("8.8.8.8"), None);
        assert_eq!(kind("2606:4700::1111"), None);
        assert_eq!(kind("::ffff:8.8.8.8"), None);
    }

    fn limits(grant: HttpGrant) -> Limits {
        Limits {
            http: Arc::new(grant),
            ..Limits::default()
        }
    }

    fn grant(hosts: &[&str]) -> HttpGrant {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        HttpGrant::from_manifest(
            ManifestHttp {
                allowed_hosts: Some(&hosts),
                secrets: None,
                http_timeout: None,
                http_max_response_kb: None,
                http_max_requests: None,
            },
            |_| None,
        )
        .unwrap()
    }

    #[test]
    fn check_url_matches_the_grant_and_names_the_origin() {
        assert!(
            check_url(&Limits::default(), "GET", "https://api.example.com/")
                .unwrap_err()
                .contains("https://api.example.com")
        );
        let l = limits(grant(&["https://api.example.com", "http://127.0.0.1:9000"]));
        check_url(&l, "POST", "https://api.example.com/v1/send?x=1").unwrap();
        check_url(&l, "GET", "http://127.0.0.1:9000/").unwrap();
        let e = check_url(&l, "GET", "https://evil.example.net/x").unwrap_err();
        assert!(
            e.contains("https://evil.example.net") && e.contains("allowed_hosts"),
            "{e}"
        );
        assert!(
            check_url(&l, "GET", "http://127.0.0.1:9001/")
                .unwrap_err()
                .contains("http://127.0.0.1:9001")
        );
        for method in ["TRACE", "trace", "Trace", "CONNECT", "connect"] {
            let refused = check_url(&l, method, "https://api.example.com/").unwrap_err();
            assert!(refused.contains("is not allowed"), "{method}: {refused}");
        }
        assert!(check_url(&l, "GET", "/relative").is_err());
        assert!(check_url(&l, "GET", "https://user@api.example.com/").is_err());
        assert!(check_url(&l, "G ET", "https://api.example.com/").is_err());
    }

    #[test]
    fn manifest_keys_parse_with_errors_naming_the_key() {
        let hosts = vec!["https://api.example.com".to_string()];
        let mut secrets = BTreeMap::new();
        secrets.insert(
            "https://api.example.com".to_string(),
            SecretSpec {
                header: "Authorization".into(),
                env: "TOKEN_VAR".into(),
                prefix: "Bearer ".into(),
            },
        );
        let m = |secrets| ManifestHttp {
            allowed_hosts: Some(&hosts),
            secrets,
            http_timeout: Some("5s"),
            http_max_response_kb: Some(8),
            http_max_requests: Some(3),
        };
        let g = HttpGrant::from_manifest(m(Some(&secrets)), |v| {
            (v == "TOKEN_VAR").then(|| "s3cret".into())
        })
        .unwrap();
        assert_eq!(g.timeout, Duration::from_secs(5));
        assert_eq!(g.max_response_bytes, 8 << 10);
        assert_eq!(g.max_requests, 3);
        assert_eq!(g.secrets[0].value, "Bearer s3cret");
        let shown = format!("{g:?}");
        assert!(!shown.contains("s3cret"), "{shown}");

        for unset_or_empty in [None, Some(""), Some("  ")] {
            let (key, why) =
                HttpGrant::from_manifest(m(Some(&secrets)), |_| unset_or_empty.map(str::to_string))
                    .unwrap_err();
            assert_eq!(key, "secrets.\"https://api.example.com\"");
            assert!(
                why.contains(
                    "TOKEN_VAR (the secret for https://api.example.com) is not set or is empty"
                ) && why.contains("https://api.example.com"),
                "{why}"
            );
        }

        let mut other = BTreeMap::new();
        other.insert(
            "https://other.example.com".to_string(),
            secrets["https://api.example.com"].clone(),
        );
        let (_, why) = HttpGrant::from_manifest(m(Some(&other)), |_| Some("x".into())).unwrap_err();
        assert!(why.contains("not in allowed_hosts"), "{why}");

        // Headers the host sets itself: a secret there was never sent
        // (framing) or went out beside the host's own (an effect's key).
        // Why the secret, one of its fields changed, is refused.
        let refusal = |change: &dyn Fn(&mut SecretSpec)| {
            let mut changed = secrets.clone();
            change(changed.get_mut("https://api.example.com").unwrap());
            let manifest = ManifestHttp {
                allowed_hosts: Some(&hosts),
                secrets: Some(&changed),
                http_timeout: None,
                http_max_response_kb: None,
                http_max_requests: None,
            };
            HttpGrant::from_manifest(manifest, |_| Some("x".into()))
                .unwrap_err()
                .1
        };
        for header in [
            "Host",
            "Content-Length",
            "transfer-encoding",
            "Idempotency-Key",
        ] {
            let why = refusal(&|spec| spec.header = header.into());
            assert!(
                why.contains("the host cannot set the header"),
                "{header}: {why}"
            );
        }

        // The host's own credentials: a provider key of the colony.toml
        // this process loaded, the dashboard token, PostgreSQL's.
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("colony.toml");
        std::fs::write(
            &config,
            "[models.fast]\napi = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\napi_key_env = \"HTTP_TEST_PROVIDER_KEY\"\n",
        )
        .unwrap();
        crate::models::ModelsConfig::load(&config).unwrap();
        for var in [
            "HTTP_TEST_PROVIDER_KEY",
            "COLONY_TOKEN",
            "PGPASSWORD",
            "DATABASE_URL",
        ] {
            let why = refusal(&|spec| spec.env = var.into());
            assert!(
                why.contains("holds one of this host's own credentials"),
                "{var}: {why}"
            );
        }

        let bad = vec!["https://example.com/path".to_string()];
        let (key, _) = HttpGrant::from_manifest(
            ManifestHttp {
                allowed_hosts: Some(&bad),
                secrets: None,
                http_timeout: None,
                http_max_response_kb: None,
                http_max_requests: None,
            },
            |_| None,
        )
        .unwrap_err();
        assert_eq!(key, "allowed_hosts");
    }
}
