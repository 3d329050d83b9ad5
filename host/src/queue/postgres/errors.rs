//! What PostgreSQL errors mean for the queue: one line for a person, and
//! whether retrying can help. Also the URL and target as they may be shown
//! (never with a password).

use std::error::Error as StdError;

use ::postgres::Config;
use ::postgres::config::Host;

/// The error in one line, with what the server said (`postgres::Error`'s
/// own `Display` stops at "db error"). Never holds the password.
pub fn describe(e: &::postgres::Error) -> String {
    let text = match e.as_db_error() {
        Some(db) => format!("{db} (SQLSTATE {})", db.code().code()),
        None => match e.source() {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    };
    text.replace('\n', "; ")
}

/// True for an I/O failure or a closed connection.
pub(super) fn is_lost(e: &::postgres::Error) -> bool {
    e.is_closed()
        || e.source().is_some_and(|s| s.is::<std::io::Error>())
        // The one error kind without a cause or accessor to tell it by.
        || (e.source().is_none() && e.to_string() == "timeout waiting for server")
}

/// True when the server ended the session with this error (class 08, a
/// connection exception; 57P01-57P03, the backend terminated by an
/// administrator, a crash or a shutdown): said in answer to `COMMIT`, the
/// transaction may have committed before the backend went (the client was
/// told nothing stored, and a CLI user told to try again stored it twice).
/// An ordinary error in answer to `COMMIT` (a serialization failure, a
/// deferred constraint) means it rolled back.
pub(super) fn ended_session(e: &::postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        let code = code.code();
        code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
    })
}

/// True for trouble that may pass: the connection closed, refused or timed
/// out, SQLSTATE class 08 (connection exception), a serialization failure
/// or deadlock, a lock wait past `lock_timeout`, class 53 (insufficient
/// resources: disk full, too many connections) and the server shutting down
/// or starting (57P01, 57P02, 57P03).
pub fn is_transient(e: &::postgres::Error) -> bool {
    if is_lost(e) {
        return true;
    }
    let Some(code) = e.code() else {
        return false;
    };
    let code = code.code();
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03"
        )
}

/// True when retrying cannot help: the server refuses our credentials
/// (class 28), the database does not exist (3D000), we lack a privilege
/// (42501), or the server only allows reads (25006, a standby).
pub fn is_permanent(e: &::postgres::Error) -> bool {
    if let Some(code) = e.code() {
        let code = code.code();
        return code.starts_with("28") || matches!(code, "3D000" | "42501" | "25006");
    }
    // Raised on this side: the server asked for a password the URL lacks
    // ("invalid configuration: password missing"), or a setting the driver
    // cannot meet.
    let said = e.to_string();
    said == "authentication error" || said.starts_with("invalid configuration")
}

/// What follows a URL's `://`, split into its credentials (`user:password`,
/// if any) and the rest. An `@` before any `/`, `?` or `#` ends them at the
/// last such `@` (a password may hold one); otherwise the first `@` does,
/// as the driver reads it (a password may hold a `/`, `?` or `#`).
pub fn split_credentials(rest: &str) -> (Option<&str>, &str) {
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@').or_else(|| rest.find('@'));
    match at {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    }
}

/// The URL without its password (`postgres://user:secret@host/db` →
/// `postgres://user@host/db`; `password=` options removed too).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // The `key=value` form.
        return url
            .split_whitespace()
            .filter(|part| !part.to_ascii_lowercase().starts_with("password="))
            .collect::<Vec<_>>()
            .join(" ");
    };
    let (userinfo, rest) = split_credentials(rest);
    let user = userinfo.map(|u| u.split_once(':').map_or(u, |(user, _)| user));
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (hosts, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => (before_query, ""),
    };
    let authority = match user {
        Some(user) => format!("{user}@{hosts}"),
        None => hosts.to_string(),
    };
    let mut out = format!("{scheme}://{authority}{path}");
    if let Some(query) = query {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|kv| !kv.to_ascii_lowercase().starts_with("password="))
            .collect();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
    }
    out
}

/// "colony at db1:5432 as user colony", from the parsed URL with defaults
/// filled in: what a connection error names.
pub(super) fn describe_target(config: &Config) -> String {
    let port = |i: usize| {
        config
            .get_ports()
            .get(i)
            .or(config.get_ports().first())
            .copied()
            .unwrap_or(5432)
    };
    let mut hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| match host {
            Host::Tcp(name) => format!("{name}:{}", port(i)),
            Host::Unix(dir) => format!("{}/.s.PGSQL.{}", dir.display(), port(i)),
        })
        .collect();
    if hosts.is_empty() {
        hosts = config
            .get_hostaddrs()
            .iter()
            .enumerate()
            .map(|(i, addr)| format!("{addr}:{}", port(i)))
            .collect();
    }
    let user = config.get_user().unwrap_or("(this system user)");
    let database = config.get_dbname().unwrap_or(user);
    format!("database {database} at {} as user {user}", hosts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_removed_from_locations() {
        assert_eq!(
            redact("postgres://bob:s3cr@t@db1:5433/colony?sslmode=disable&password=x"),
            "postgres://bob@db1:5433/colony?sslmode=disable"
        );
        assert_eq!(redact("postgresql://db1/colony"), "postgresql://db1/colony");
        // A password holding ?, # or / is still the password (the driver
        // reads the credentials up to the first @).
        assert_eq!(
            redact("postgres://bob:hun?ter2@db1/colony"),
            "postgres://bob@db1/colony"
        );
        assert_eq!(
            redact("postgres://bob:pa/s#s@db1/colony?x=1"),
            "postgres://bob@db1/colony?x=1"
        );
        assert_eq!(
            redact("host=db1 password=secret dbname=colony"),
            "host=db1 dbname=colony"
        );
    }

    #[test]
    fn targets_name_host_port_database_and_user() {
        let config: Config = "postgresql://bob:pw@db1/colony".parse().unwrap();
        assert_eq!(
            describe_target(&config),
            "database colony at db1:5432 as user bob"
        );
    }
}
