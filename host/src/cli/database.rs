//! Finding and opening the queue a command names: `--db` as a SQLite
//! file (checked before SQLite creates anything) or a PostgreSQL URL (its
//! password never echoed), `migrate`, and the errors a read-only file or
//! mount gives, said as what they are.

use std::path::{Path, PathBuf};

use std::io::Write as _;

use anyhow::{Context, Result, bail};

use super::{BadInput, Cli, MigrateArgs, bad};
use crate::queue::{Queue, QueueError, QueueOptions};

/// The `--sync` of this process, for every queue it opens ([`open_queue`]
/// is called from every command, most of which know nothing else of it).
pub(super) static SQLITE_SYNC: std::sync::OnceLock<crate::queue::Sync> = std::sync::OnceLock::new();

/// What `--sync` asked for (normal where nothing set it: a library caller).
pub(super) fn sqlite_sync() -> crate::queue::Sync {
    SQLITE_SYNC
        .get()
        .copied()
        .unwrap_or(crate::queue::Sync::Normal)
}

/// This process's identity as a queue actor: host, pid and start time.
pub fn identity(role: &str) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    format!(
        "{role}@{host}:{}:{}",
        std::process::id(),
        crate::queue::now_ms()
    )
}

/// Opens the queue at `db` for a command that adds to it (`submit`, a
/// daemon, `state set`): a SQLite file is created if missing.
pub fn open_queue(db: &Path, actor: &str) -> Result<Queue> {
    open_queue_with(db, actor, false)
}

/// Opens the queue at `db` for a command that reads or changes what is
/// already in it (`list`, `show`, `status`, `events`, `review`, ...): a
/// SQLite file that does not exist is refused, naming it. Created, a
/// mistyped `--db` listed an empty queue and left a stray file behind.
pub fn open_existing_queue(db: &Path, actor: &str) -> Result<Queue> {
    open_queue_with(db, actor, true)
}

pub(super) fn open_queue_with(db: &Path, actor: &str, must_exist: bool) -> Result<Queue> {
    let sqlite = match crate::queue::Location::of(db) {
        crate::queue::Location::Sqlite(path) => {
            check_sqlite_location(db, &path)?;
            if must_exist && !path.exists() {
                bail!(QueueError::Missing(format!(
                    "database {}: no such file, so no task was ever submitted there; check --db (or COLONY_DB), which defaults to colony.db in the current directory (`colony submit` and `colony daemon` create it)",
                    hide_userinfo(&db.to_string_lossy())
                )));
            }
            Some(path)
        }
        crate::queue::Location::Postgres(url) => {
            check_postgres_url(&url)?;
            None
        }
    };
    let opts = QueueOptions {
        actor: actor.to_string(),
        sync: sqlite_sync(),
        must_exist: must_exist && sqlite.is_some(),
        ..Default::default()
    };
    Queue::open_with(db, opts).map_err(|e| match sqlite.as_deref().and_then(why_unopenable) {
        Some(why) => BadInput(format!(
            "database {}: {why}; check its permissions (ls -l), or give another --db ({e})",
            hide_userinfo(&db.to_string_lossy())
        ))
        .into(),
        None => {
            anyhow::Error::new(e).context(format!("opening the queue database {}", redacted(db)))
        }
    })
}

/// Refuses, naming it, a database `db` (SQLite at `path`) that would not
/// keep the queue: an empty path or an in-memory database, a libpq
/// key=value string or a URL of a database colony does not speak, or a
/// file in a directory that does not exist.
pub(super) fn check_sqlite_location(db: &Path, path: &Path) -> Result<()> {
    let text = path.to_string_lossy();
    // SQLite opens both, and both vanish with the command: a submit there
    // would print an id and be lost (`COLONY_DB=sqlite:$UNSET`).
    if text.is_empty() || text == ":memory:" || text.starts_with("file::memory:") {
        bail!(BadInput(format!(
            "database {:?}: {}; give the path of a database file",
            db.display().to_string(),
            match text.is_empty() {
                true => "the path is empty",
                false => "an in-memory database lasts one command",
            }
        )));
    }
    // libpq's `host=... dbname=...` form would become a file named after
    // it, password and all.
    // (A quoted value may hold spaces: `password='a b'`.)
    let words: Vec<&str> = text.split_whitespace().collect();
    let settings = words.iter().filter(|w| w.contains('=')).count();
    if words.len() > 1 && settings >= 2 && words[0].contains('=') {
        bail!(BadInput(
            "--db: that looks like a PostgreSQL key=value connection string (not shown: it \
             may hold a password); colony takes a postgres:// URL \
             (postgres://USER:PASSWORD@HOST:PORT/DATABASE)"
                .to_string()
        ));
    }
    // `postgresql:user:pw@host`, `postgres//user:pw@host`, `postgres:/...`:
    // a URL missing part of its `://` would become a file named after the
    // password.
    let lower = text.to_ascii_lowercase();
    if ["postgres:", "postgresql:", "postgres//", "postgresql//"]
        .iter()
        .any(|start| lower.starts_with(start))
    {
        bail!(BadInput(format!(
            "database {}: that looks like a PostgreSQL URL with its :// mistyped; \
             write postgres://USER:PASSWORD@HOST:PORT/DATABASE",
            hide_userinfo(&text)
        )));
    }
    if let Some((scheme, _)) = text.split_once("://")
        && !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
    {
        bail!(BadInput(format!(
            "database {}: {scheme}:// is not a database colony speaks; \
             give a SQLite file (a path or sqlite:PATH) or a postgres:// URL",
            crate::queue::redact_url(&text)
        )));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        bail!(BadInput(format!(
            "database {}: the directory {} does not exist",
            hide_userinfo(&db.to_string_lossy()),
            hide_userinfo(&dir.to_string_lossy())
        )));
    }
    // SQLite says only "unable to open database file" of these (or, for a
    // file it may only read, "attempt to write a readonly database"), which
    // reads as a busy database worth trying again.
    if path.is_dir() {
        bail!(BadInput(format!(
            "database {}: that is a directory; give the path of a database file, such as {}",
            hide_userinfo(&db.to_string_lossy()),
            hide_userinfo(&path.join("colony.db").to_string_lossy())
        )));
    }
    Ok(())
}

/// Why this user cannot open the SQLite database at `path`, when the
/// permissions say: asked only once SQLite failed to open it, which it says
/// as "unable to open database file", read as a busy database worth trying
/// again. (Asked before, it refused what SQLite opens: a file it may only
/// read, opened read-only; a folder it may not write while the -wal and
/// -shm files exist.)
pub(super) fn why_unopenable(path: &Path) -> Option<&'static str> {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if path.exists() {
        return (!may_access(&path, libc::R_OK)).then_some("this user may not read the file");
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    (!may_access(dir, libc::W_OK | libc::X_OK)).then_some(
        "this user may not create files in its directory (a new database, and its -wal and -shm files beside it)",
    )
}

/// Whether this process may access `path` in `mode` (access(2)'s R_OK,
/// W_OK, X_OK), as the kernel would decide for it.
pub(super) fn may_access(path: &Path, mode: libc::c_int) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return true; // a NUL in the path: SQLite names that itself
    };
    // SAFETY: access() reads the NUL-terminated path and nothing else.
    unsafe { libc::access(c_path.as_ptr(), mode) == 0 }
}

/// Refuses a PostgreSQL URL that names no database: the server would pick
/// one after the user (often `postgres`, the maintenance database), and the
/// queue's tables would land there unasked.
pub(super) fn check_postgres_url(url: &str) -> Result<()> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (_, rest) = crate::queue::split_url_credentials(rest);
    let before_query = rest.split(['?', '#']).next().unwrap_or_default();
    let database = before_query.split_once('/').map_or("", |(_, db)| db);
    let named_in_query = rest.split_once('?').is_some_and(|(_, q)| {
        q.split('&')
            .any(|kv| kv.to_ascii_lowercase().starts_with("dbname="))
    });
    if database.is_empty() && !named_in_query {
        bail!(BadInput(format!(
            "database {}: the URL names no database; add it: postgres://USER:PASSWORD@HOST:PORT/DATABASE",
            crate::queue::redact_url(url)
        )));
    }
    Ok(())
}

/// `text` with anything before an `@` hidden: in what was meant as a URL
/// it holds a user and password (a file path rarely has an `@`).
pub(super) fn hide_userinfo(text: &str) -> String {
    match text.rsplit_once('@') {
        Some((_, host)) => format!("…@{host}"),
        None => text.to_string(),
    }
}

/// The queue `migrate` copies from, opened without writing to it. A SQLite
/// file of an older schema is read through an upgraded copy in `scratch`:
/// upgraded in place, it was left on a schema the older build (the way
/// back) refuses, also when the copy then failed. A file without colony's
/// schema is refused as every command refuses it.
pub(super) fn open_source(from: &Path, actor: &str, scratch: &Path) -> Result<Queue> {
    let crate::queue::Location::Sqlite(path) = crate::queue::Location::of(from) else {
        return open_queue(from, actor);
    };
    let conn =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("--from {}: opening it to read", path.display()))?;
    // As every command refuses it: another program's database, colony's
    // tables without their schema version, a file that holds no queue.
    crate::queue::refuse_sqlite_file_not_a_queue(&conn, &path.display().to_string(), true)
        .map_err(|e| match e {
            // Its advice is for --db.
            QueueError::NotAQueue { path, why } => QueueError::NotAQueue {
                path,
                why: why.replace(crate::queue::ANOTHER_DB, ""),
            },
            other => other,
        })
        .with_context(|| format!("--from {}: nothing was copied", path.display()))?;
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .with_context(|| format!("--from {}: reading its schema", path.display()))?;
    if version >= crate::queue::sqlite_schema_version() {
        drop(conn);
        return open_queue(from, actor); // a newer one is refused there, naming both
    }
    let copy = scratch.join("source.db");
    conn.execute("VACUUM INTO ?1", [copy.to_string_lossy()])
        .with_context(|| format!("--from {}: copying it to upgrade the copy", path.display()))?;
    say!(
        "note: {} has schema version {version} (this build's is {}); it is read through an upgraded copy and left as it is",
        path.display(),
        crate::queue::sqlite_schema_version()
    );
    // The copy VACUUM INTO made, and only it: an empty queue made in its
    // place would be copied as "0 rows".
    let opts = QueueOptions {
        actor: actor.to_string(),
        must_exist: true,
        note_upgrade: false, // said above
        ..Default::default()
    };
    Queue::open_with(&copy, opts)
        .with_context(|| format!("--from {}: opening its upgraded copy", path.display()))
}

pub(super) fn migrate(cli: &Cli, args: &MigrateArgs) -> Result<()> {
    if let crate::queue::Location::Sqlite(path) = crate::queue::Location::of(&args.from)
        && !path.is_file()
    {
        bail!(BadInput(format!(
            "--from {}: no such database file",
            path.display()
        )));
    }
    if redacted(&args.from) == redacted(&args.to) {
        bail!(BadInput("--from and --to name the same database".into()));
    }
    let actor = identity("migrate");
    let snapshot_dir = tempfile::tempdir()?;
    let source = open_source(&args.from, &actor, snapshot_dir.path())?;
    // A daemon still running on the source: what it finishes is stored
    // there, and the copy's daemons run the same tasks again.
    let live = source.live_leases(source.now()?)?;
    if !live.is_empty() && !args.force {
        let holders: Vec<String> = live.iter().map(|(h, n)| format!("{h} ({n})")).collect();
        bail!(BadInput(format!(
            "--from {}: daemons renewed leases within their --stale-after, so they are most likely running: {}; stop them first (their runs are released), or pass --force",
            redacted(&args.from),
            holders.join(", ")
        )));
    }
    let mut target = open_queue(&args.to, &actor)?;
    let report = tokio::task::block_in_place(|| source.copy_into(&mut target))
        .map_err(|e| match e.is_bad_input() {
            true => anyhow::Error::new(BadInput(e.to_string())),
            false => anyhow::Error::new(e),
        })
        .with_context(|| {
            format!(
                "copying {} into {}",
                redacted(&args.from),
                redacted(&args.to)
            )
        })?;
    let mut out = std::io::stdout().lock();
    if cli.json {
        let tables: serde_json::Map<String, serde_json::Value> = report
            .tables
            .iter()
            .map(|(t, n)| (t.clone(), serde_json::json!(n)))
            .collect();
        writeln!(out, "{:#}", serde_json::json!({"copied": tables}))?;
    } else {
        writeln!(
            out,
            "copied {} into {}:",
            redacted(&args.from),
            redacted(&args.to)
        )?;
        for (table, n) in &report.tables {
            writeln!(out, "  {table:<20} {n:>10} rows")?;
        }
    }
    Ok(())
}

/// `bench` and `torture` make their own queue: a SQLite `--db` or an
/// `--agents` given to them on the command line is not used, which they
/// say rather than silently measure or torture somewhere else than the
/// user expects. (COLONY_DB and COLONY_AGENTS, set for everyday work, are
/// not worth a note each time.)
pub(super) fn note_own_database(cli: &Cli, command: &str, own: &str) {
    let given = |value: &Path, default: &str, var: &str| {
        value != Path::new(default) && std::env::var_os(var).is_none_or(|v| Path::new(&v) != value)
    };
    let sqlite_db = postgres_db(&cli.db).is_none() && given(&cli.db, "colony.db", "COLONY_DB");
    let agents = given(&cli.agents, "agents", "COLONY_AGENTS");
    if sqlite_db || agents {
        let mut unused = Vec::new();
        if sqlite_db {
            unused.push(format!("--db {}", cli.db.display()));
        }
        if agents {
            unused.push(format!("--agents {}", cli.agents.display()));
        }
        say!(
            "note: {command} runs on {own}; {} is not used (--db is, when it is a postgres:// URL of an empty database)",
            unused.join(" and ")
        );
    }
}

/// `--db` when it names a PostgreSQL database: `bench` and `torture` then
/// run against it instead of SQLite files of their own.
pub(super) fn postgres_db(db: &Path) -> Option<&Path> {
    matches!(
        crate::queue::Location::of(db),
        crate::queue::Location::Postgres(_)
    )
    .then_some(db)
}

/// `--db` as it may be printed: a PostgreSQL URL loses its password.
pub fn redacted(db: &Path) -> String {
    match crate::queue::Location::of(db) {
        crate::queue::Location::Postgres(url) => crate::queue::redact_url(&url),
        crate::queue::Location::Sqlite(path) => hide_userinfo(&path.to_string_lossy()),
    }
}

/// Where compiled components are cached: beside the database, or in the
/// working directory when the database is a server.
pub fn cache_dir(db: &Path) -> PathBuf {
    let crate::queue::Location::Sqlite(path) = crate::queue::Location::of(db) else {
        return PathBuf::from(".colony-cache");
    };
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(".colony-cache")
}

/// SQLite's "attempt to write a readonly database" and, for a file that
/// exists, "unable to open database file" (exit 1, as if a retry might
/// pass), said as what they are: bad input, this user may not write there,
/// or the file system is mounted read-only.
pub(super) fn explain_read_only(db: &Path, e: anyhow::Error) -> anyhow::Error {
    let code = e
        .chain()
        .find_map(|cause| match cause.downcast_ref::<QueueError>() {
            Some(QueueError::Sqlite(rusqlite::Error::SqliteFailure(f, _))) => Some(f.code),
            _ => None,
        });
    let shown = hide_userinfo(&db.to_string_lossy());
    match code {
        Some(rusqlite::ErrorCode::ReadOnly) => match unwritable_parts(db) {
            parts if parts.is_empty() => bad(format!(
                "database {shown}: this user may not write to it (the file, or the folder its -wal and -shm files go in, is read-only to it); check the permissions (ls -l), or give another --db ({e:#})"
            )),
            parts => {
                let left_behind = parts
                    .iter()
                    .any(|p| p.contains("-wal (") || p.contains("-shm ("));
                let hint = match left_behind {
                    // A read by another user leaves them, owned by it.
                    true => {
                        "; a -wal or -shm file is left by a command another user ran on the database: give it back to the database's owner (chown)"
                    }
                    false => "; check the permissions (ls -l)",
                };
                bad(format!(
                    "database {shown}: this user may not write to {}{hint}, or give another --db ({e:#})",
                    parts.join(", ")
                ))
            }
        },
        Some(rusqlite::ErrorCode::CannotOpen) if on_read_only_mount(db) => bad(format!(
            "database {shown}: the file system it is on is mounted read-only, and SQLite cannot open it even to read (a read creates the -wal and -shm files beside it); remount it read-write (findmnt -T {shown} shows the mount), or copy the file elsewhere and give that --db ({e:#})"
        )),
        _ => e,
    }
}

/// Which of a SQLite database's files, and its folder, this user may not
/// write, each with its owner: a read by another user leaves -wal and -shm
/// files of that user's behind, and the owner's next write fails on them.
fn unwritable_parts(db: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let crate::queue::Location::Sqlite(path) = crate::queue::Location::of(db) else {
        return Vec::new();
    };
    let with_suffix = |suffix: &str| {
        let mut name = path.clone().into_os_string();
        name.push(suffix);
        PathBuf::from(name)
    };
    let files = ["", "-wal", "-shm"].map(with_suffix);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    files
        .iter()
        .chain(std::iter::once(&dir))
        .filter_map(|part| {
            let meta = std::fs::metadata(part).ok()?;
            let mode = match meta.is_dir() {
                true => libc::W_OK | libc::X_OK,
                false => libc::W_OK,
            };
            (!may_access(part, mode))
                .then(|| format!("{} (owned by uid {})", part.display(), meta.uid()))
        })
        .collect()
}

/// Whether the file `db` exists on a file system mounted read-only.
pub(super) fn on_read_only_mount(db: &Path) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open(db)
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ReadOnlyFilesystem)
}
