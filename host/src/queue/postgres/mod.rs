//! The PostgreSQL driver: one database shared by many hosts.
//!
//! Every write is one transaction at PostgreSQL's default isolation (read
//! committed); the statements that decide a write of a row lock it first
//! (`SELECT ... FOR UPDATE`, see [`super::sql`]). A transaction that loses a
//! deadlock or a serialization check is rolled back and run again here, so
//! callers only see such failures when they persist. Times come from the
//! database's clock, so hosts whose clocks disagree still agree on leases
//! and schedules.
//!
//! A transaction that stored runnable work (`Sql::signal_work`) `NOTIFY`s
//! `colony_work` as it commits; a daemon hears it on a connection of its own
//! (`listen.rs`, [`PgDb::listen`]). The queue's other connections do not
//! listen: the client keeps every notification it receives until read.
//!
//! Statements are prepared once per connection and kept by their text. A lost
//! connection is reopened by the next call (and its statements prepared
//! again); the call that noticed the loss fails with a transient error unless
//! nothing it did can have been committed, in which case it is run again.

mod errors;
mod listen;
mod schema;
mod types;

pub use errors::{describe, is_permanent, is_transient, redact, split_credentials};
use errors::{describe_target, is_lost};
pub use listen::WorkListener;

use types::{PgParam, read_row};

use std::cell::{Cell, RefCell, RefMut};
use std::collections::HashMap;
use std::time::Duration;

use ::postgres::error::SqlState;
use ::postgres::types::ToSql;
use ::postgres::{Client, Config, NoTls, SimpleQueryMessage, Statement};

use super::sql::{Dialect, Param, Row, Sql, numbered_to_dollar};
use super::{QueueError, QueueOptions, Result};

/// The channel the queue notifies when it stores work that may be claimed.
const WORK_CHANNEL: &str = "colony_work";

/// The database clock in milliseconds since the Unix epoch.
const NOW_SQL: &str = "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// What [`Sql::signal_work`] sends (the channel is [`WORK_CHANNEL`]).
const NOTIFY: &str = "NOTIFY colony_work";
const NOTIFY_AND_COMMIT: &str = "NOTIFY colony_work; COMMIT";

/// How many times a write transaction runs before a deadlock or
/// serialization failure is handed to the caller.
const WRITE_ATTEMPTS: u32 = 8;

/// Prepared statements kept per connection. The queue's statements are a
/// fixed set; the bound only matters if some caller builds SQL text freely.
const STATEMENT_CACHE: usize = 512;

/// Used when the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes a connection to a server that vanished without a word (a
/// failover, a partition: no reset ever arrives) fail within about half a
/// minute, where the driver's defaults waited for TCP to give up (15
/// minutes with a query unanswered, 2 hours idle) with the daemon's loop
/// blocked in the query. Values the URL sets itself are kept.
fn notice_dead_servers(config: &mut Config, url: &str) {
    if config.get_tcp_user_timeout().is_none() {
        // Data sent but not acknowledged for this long closes the connection.
        config.tcp_user_timeout(Duration::from_secs(30));
    }
    // Its getter answers the driver's default when the URL is silent.
    if !url.contains("keepalives_idle=") {
        config.keepalives_idle(Duration::from_secs(15));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(5));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(3);
    }
}

pub struct PgDb {
    url: String,
    location: String,
    /// "database colony at db1:5432 as user colony": what connection errors name.
    target: String,
    // Boxed, the two large parts: the queue keeps a `PgDb` or a SQLite
    // connection in one enum, which should not be sized by this one.
    config: Box<Config>,
    lock_timeout: Duration,
    /// `None` only while being dropped (see `Drop`).
    conn: RefCell<Option<Box<Conn>>>,
    /// Notifications received so far, plus one per reconnection (whatever
    /// was sent while the connection was down is lost).
    wakes: Cell<i64>,
    /// Set between `BEGIN` and its `COMMIT`/`ROLLBACK`: still set at the
    /// next write only if a caller panicked inside a transaction.
    in_transaction: Cell<bool>,
}

/// One open connection and the statements prepared on it.
struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl PgDb {
    /// Connects and migrates (under an advisory lock, so hosts starting at
    /// once migrate once). Trouble reaching the server is
    /// [`QueueError::Connect`], naming host, port and database (never the
    /// password); the server refusing us (credentials, an unknown database)
    /// is [`QueueError::Postgres`], which [`is_permanent`] recognises.
    pub fn connect(url: &str, opts: &QueueOptions) -> Result<PgDb> {
        blocking(|| PgDb::connect_here(url, opts))
    }

    fn connect_here(url: &str, opts: &QueueOptions) -> Result<PgDb> {
        let location = redact(url);
        // The driver ends the credentials at the first `@`, the redaction
        // at the last: a password holding an `@` went to the resolver as
        // part of the host name, and showed in messages.
        if let Some((_, rest)) = url.split_once("://") {
            let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
            if authority.matches('@').count() > 1 {
                return Err(QueueError::invalid(
                    "database URL",
                    format!(
                        "{location}: more than one @ before the host; write an @ in the user or password as %40"
                    ),
                ));
            }
        }
        let mut config: Config = url.parse().map_err(|e: ::postgres::Error| {
            QueueError::invalid(
                "database URL",
                format!("{location} is not a PostgreSQL URL: {}", describe(&e)),
            )
        })?;
        if config.get_ssl_mode() == ::postgres::config::SslMode::Require {
            return Err(QueueError::invalid(
                "database URL",
                format!(
                    "{location}: sslmode=require, but colony connects without TLS; keep the server on a private network (or behind a TLS tunnel) and drop sslmode, or set it to prefer or disable"
                ),
            ));
        }
        // libpq's PGPASSWORD, for a URL without a password: a password kept
        // out of the URL stays out of argv and the environment's COLONY_DB.
        if config.get_password().is_none()
            && let Ok(password) = std::env::var("PGPASSWORD")
        {
            config.password(password);
        }
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            // libpq's default: the local socket directory, then TCP.
            if std::path::Path::new("/var/run/postgresql").is_dir() {
                config.host_path("/var/run/postgresql");
            }
            config.host("localhost");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        notice_dead_servers(&mut config, url);
        if config.get_application_name().is_none() && !opts.actor.is_empty() {
            config.application_name(&opts.actor);
        }
        let target = describe_target(&config);
        let mut client = open(&config, &location, &target, opts.busy_timeout, false)?;
        schema::migrate(&mut client, &location, opts.note_upgrade)?;
        Ok(PgDb {
            url: url.to_string(),
            location,
            target,
            config: Box::new(config),
            lock_timeout: opts.busy_timeout,
            conn: RefCell::new(Some(Box::new(Conn {
                client,
                statements: HashMap::new(),
            }))),
            wakes: Cell::new(0),
            in_transaction: Cell::new(false),
        })
    }

    /// Calls `on_work` from a thread of its own whenever another connection
    /// signals runnable work, until the answer is dropped.
    pub fn listen(&self, on_work: Box<dyn Fn() + Send>) -> Result<WorkListener> {
        listen::spawn(
            (*self.config).clone(),
            self.location.clone(),
            self.target.clone(),
            on_work,
        )
        .map_err(|e| QueueError::Connect {
            location: self.location.clone(),
            message: format!("cannot start the thread that listens for new work: {e}"),
        })
    }

    /// The URL with any password removed, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The URL as given (to open further connections).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// One write transaction: `BEGIN`; `now` = the database clock in ms since
    /// the epoch; `f(&tx, now)`; `COMMIT`. A deadlock or serialization
    /// failure, or a connection lost before `COMMIT` was sent, rolls back
    /// and runs `f` again (up to [`WRITE_ATTEMPTS`] times in all, after a
    /// short jittered sleep). A connection lost during `COMMIT` is returned:
    /// the commit may or may not have happened.
    pub fn write<T>(&self, f: &mut dyn FnMut(&dyn Sql, i64) -> Result<T>) -> Result<T> {
        blocking(|| self.write_here(f))
    }

    fn write_here<T>(&self, f: &mut dyn FnMut(&dyn Sql, i64) -> Result<T>) -> Result<T> {
        let mut attempt = 1;
        loop {
            match self.try_write(f) {
                Ok(value) => return Ok(value),
                Err(failed) if failed.again && attempt < WRITE_ATTEMPTS => {
                    backoff(attempt);
                    attempt += 1;
                }
                Err(failed) => return Err(failed.error),
            }
        }
    }

    fn try_write<T>(
        &self,
        f: &mut dyn FnMut(&dyn Sql, i64) -> Result<T>,
    ) -> std::result::Result<T, Failed> {
        self.ensure_open().map_err(Failed::once)?;
        let mut conn = self.conn();
        if self.in_transaction.get() {
            // A caller panicked inside the last transaction.
            let _ = conn.client.batch_execute("ROLLBACK");
            self.in_transaction.set(false);
        }
        self.in_transaction.set(true);
        let now = match begin(&mut conn.client) {
            Ok(now) => now,
            Err(e) => {
                self.rollback(&mut conn);
                let again = StatementFailure::of(&e, &conn.client).retryable_before_commit();
                return Err(Failed {
                    error: e.into(),
                    again,
                });
            }
        };
        let tx = PgSql::new(&mut conn);
        let result = f(&tx, now);
        let failure = tx.failure.take();
        let commit = if tx.signalled.get() {
            // Delivered to the listeners when (and only if) this commits.
            NOTIFY_AND_COMMIT
        } else {
            "COMMIT"
        };
        drop(tx);
        match (result, failure) {
            (Ok(value), None) => match conn.client.batch_execute(commit) {
                Ok(()) => {
                    self.in_transaction.set(false);
                    Ok(value)
                }
                Err(e) => {
                    let failure = StatementFailure::of(&e, &conn.client);
                    self.rollback(&mut conn);
                    // Lost during COMMIT: it may have committed; not run
                    // again, and the caller is told it cannot know.
                    if failure.lost || errors::ended_session(&e) {
                        return Err(Failed::once(QueueError::CommitUnknown {
                            message: errors::describe(&e),
                            claim_tokens: Vec::new(),
                        }));
                    }
                    let again = failure.retryable_code();
                    Err(Failed {
                        error: e.into(),
                        again,
                    })
                }
            },
            (result, Some(failure)) => {
                self.rollback(&mut conn);
                failure.clear_cache_if_stale(&mut conn);
                let again = failure.retryable_before_commit();
                let error = match result {
                    Err(e) => e,
                    // `f` carried on past a failed statement, but PostgreSQL
                    // aborted the whole transaction at it: nothing is stored.
                    Ok(_) => QueueError::Corrupt(format!(
                        "a statement failed inside a transaction that went on to commit \
                         (nothing was stored): {}",
                        failure.text
                    )),
                };
                Err(Failed { error, again })
            }
            (Err(e), None) => {
                self.rollback(&mut conn);
                Err(Failed::once(e))
            }
        }
    }

    fn rollback(&self, conn: &mut Conn) {
        if !conn.client.is_closed() {
            let _ = conn.client.batch_execute("ROLLBACK");
        }
        self.in_transaction.set(false);
    }

    /// Reads outside a write transaction (each statement commits on its
    /// own). A connection found lost is reopened and `f` run once more.
    pub fn read<T>(&self, f: &mut dyn FnMut(&dyn Sql) -> Result<T>) -> Result<T> {
        blocking(|| self.read_here(f))
    }

    fn read_here<T>(&self, f: &mut dyn FnMut(&dyn Sql) -> Result<T>) -> Result<T> {
        let mut again = true;
        loop {
            self.ensure_open()?;
            let mut conn = self.conn();
            let sql = PgSql::new(&mut conn);
            let mut result = f(&sql);
            let failure = sql.failure.take();
            if result.is_ok() && sql.signalled.get() {
                result = sql.execute(NOTIFY, &[]).and(result);
            }
            drop(sql);
            match (result, failure) {
                (Err(_), Some(failure)) if again && failure.retryable_before_commit() => {
                    failure.clear_cache_if_stale(&mut conn);
                    again = false;
                }
                (result, _) => return result,
            }
        }
    }

    /// The database clock in ms since the epoch.
    pub fn now(&self) -> Result<i64> {
        self.read(&mut |sql| sql.query_value(NOW_SQL, &[]))
    }

    /// A number that changes when this connection was reopened (whatever
    /// changed meanwhile went unseen). New work itself is heard by
    /// [`PgDb::listen`], which wakes a daemon at once.
    pub fn wake_version(&self) -> Result<i64> {
        Ok(self.wakes.get())
    }

    fn conn(&self) -> RefMut<'_, Conn> {
        RefMut::map(self.conn.borrow_mut(), |conn| {
            &mut **conn.as_mut().expect("the connection is open until dropped")
        })
    }

    /// Reopens the connection if the server closed it.
    fn ensure_open(&self) -> Result<()> {
        let mut conn = self.conn();
        if !conn.client.is_closed() {
            return Ok(());
        }
        let client = open(
            &self.config,
            &self.location,
            &self.target,
            self.lock_timeout,
            false,
        )?;
        *conn = Conn {
            client,
            statements: HashMap::new(),
        };
        self.in_transaction.set(false);
        // Whatever was notified while the connection was down is lost: wake
        // the caller once so it looks for itself.
        self.wakes.set(self.wakes.get().wrapping_add(1));
        Ok(())
    }
}

impl Drop for PgDb {
    /// Closing the client drops the runtime it blocks on, which panics
    /// inside an async context: close it on a thread of its own there.
    fn drop(&mut self) {
        let Some(conn) = self.conn.get_mut().take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::spawn(move || drop(conn)).join();
        }
    }
}

/// Runs `f`, which blocks on the client's own runtime. Called on a worker of
/// a multi-threaded tokio runtime (the CLI's commands call the queue from
/// async code) that would panic, "Cannot start a runtime from within a
/// runtime": `block_in_place` leaves the worker's context first (and does
/// nothing more when already outside it). A current-thread runtime has no
/// such way out: call the queue from `spawn_blocking` there.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Opens a connection, sets it up and listens for new work.
/// Opens a connection. Only a connection that `listen`s is sent
/// notifications: the client keeps every one it receives until read, so a
/// connection nobody drains must not listen.
fn open(
    config: &Config,
    location: &str,
    target: &str,
    lock_timeout: Duration,
    listen: bool,
) -> Result<Client> {
    let mut client = config.connect(NoTls).map_err(|e| {
        if is_permanent(&e) {
            QueueError::Postgres(e)
        } else {
            QueueError::Connect {
                location: location.to_string(),
                message: format!("{} ({target})", describe(&e)),
            }
        }
    })?;
    let mut setup = match listen {
        true => format!("LISTEN {WORK_CHANNEL};"),
        false => String::new(),
    };
    if !lock_timeout.is_zero() {
        // SQLite's busy timeout, here: how long a statement waits for a row
        // lock another transaction holds before failing (55P03, transient).
        setup.push_str(&format!(
            "SET lock_timeout = {};",
            lock_timeout.as_millis().max(1)
        ));
    }
    client.batch_execute(&setup)?;
    Ok(client)
}

/// `BEGIN` and the database clock, in one round trip.
fn begin(client: &mut Client) -> std::result::Result<i64, ::postgres::Error> {
    let messages = client.simple_query(&format!("BEGIN; {NOW_SQL}"))?;
    for message in &messages {
        if let SimpleQueryMessage::Row(row) = message
            && let Some(now) = row.get(0).and_then(|v| v.parse().ok())
        {
            return Ok(now);
        }
    }
    // Unreachable in practice: the SELECT always answers one integer.
    Ok(super::now_ms())
}

/// A sleep before running a transaction again: 2, 4, 8 ... ms (capped at
/// 100), with jitter so that two transactions that collided do not collide
/// again in step.
fn backoff(attempt: u32) {
    let base = (1u64 << attempt.min(6)).min(100);
    let ms = base + fastrand::u64(0..=base);
    std::thread::sleep(Duration::from_millis(ms));
}

/// A write attempt that failed, and whether to run it again.
struct Failed {
    error: QueueError,
    again: bool,
}

impl Failed {
    fn once(error: QueueError) -> Failed {
        Failed {
            error,
            again: false,
        }
    }
}

/// The first statement of a transaction that failed on the server (which
/// aborts the whole transaction in PostgreSQL), or lost the connection.
#[derive(Clone, Debug)]
struct StatementFailure {
    code: Option<SqlState>,
    lost: bool,
    text: String,
}

impl StatementFailure {
    fn of(e: &::postgres::Error, client: &Client) -> StatementFailure {
        StatementFailure {
            code: e.code().cloned(),
            lost: is_lost(e) || client.is_closed(),
            text: describe(e),
        }
    }

    /// Deadlock, serialization failure, or a prepared statement gone stale
    /// after another host changed the schema: nothing was stored, run again.
    fn retryable_code(&self) -> bool {
        matches!(
            &self.code,
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
        ) || self.stale_statement()
    }

    /// Before `COMMIT`, a lost connection also means nothing was stored.
    fn retryable_before_commit(&self) -> bool {
        self.lost || self.retryable_code()
    }

    /// "cached plan must not change result type": a table a prepared
    /// statement reads was altered (a newer colony migrated it).
    fn stale_statement(&self) -> bool {
        self.code == Some(SqlState::FEATURE_NOT_SUPPORTED) && self.text.contains("cached plan")
    }

    fn clear_cache_if_stale(&self, conn: &mut Conn) {
        if self.stale_statement() {
            conn.statements.clear();
        }
    }
}

/// A connection or transaction, as the queue logic sees it.
struct PgSql<'c> {
    conn: RefCell<&'c mut Conn>,
    /// The first failure a statement met, even if `f` went on past it.
    failure: Cell<Option<StatementFailure>>,
    /// Set by [`Sql::signal_work`]: notify the listeners at commit.
    signalled: Cell<bool>,
}

impl<'c> PgSql<'c> {
    fn new(conn: &'c mut Conn) -> PgSql<'c> {
        PgSql {
            conn: RefCell::new(conn),
            failure: Cell::new(None),
            signalled: Cell::new(false),
        }
    }

    /// Notes a failure that aborts the transaction (one the server reported,
    /// or a lost connection); a parameter this side could not encode aborts
    /// nothing.
    fn note<T>(&self, conn: &Conn, result: std::result::Result<T, ::postgres::Error>) -> Result<T> {
        result.map_err(|e| {
            let failure = StatementFailure::of(&e, &conn.client);
            if failure.code.is_some() || failure.lost {
                let first = self.failure.take().unwrap_or(failure);
                self.failure.set(Some(first));
            }
            QueueError::Postgres(e)
        })
    }
}

impl Conn {
    fn statement(&mut self, sql: &str) -> std::result::Result<Statement, ::postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        if self.statements.len() >= STATEMENT_CACHE {
            self.statements.clear();
        }
        let statement = self.client.prepare(&numbered_to_dollar(sql))?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    fn execute(
        &mut self,
        sql: &str,
        args: &[Param<'_>],
    ) -> std::result::Result<u64, ::postgres::Error> {
        let statement = self.statement(sql)?;
        let args: Vec<PgParam<'_>> = args.iter().copied().map(PgParam).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
        self.client.execute(&statement, &refs)
    }

    fn query(
        &mut self,
        sql: &str,
        args: &[Param<'_>],
    ) -> std::result::Result<Vec<::postgres::Row>, ::postgres::Error> {
        let statement = self.statement(sql)?;
        let args: Vec<PgParam<'_>> = args.iter().copied().map(PgParam).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
        self.client.query(&statement, &refs)
    }
}

impl Sql for PgSql<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&self, sql: &str, args: &[Param<'_>]) -> Result<u64> {
        let mut conn = self.conn.borrow_mut();
        let result = conn.execute(sql, args);
        self.note(&conn, result)
    }

    fn query(&self, sql: &str, args: &[Param<'_>]) -> Result<Vec<Row>> {
        let mut conn = self.conn.borrow_mut();
        let result = conn.query(sql, args);
        let rows = self.note(&conn, result)?;
        rows.iter().map(read_row).collect()
    }

    /// One `NOTIFY colony_work` however often it is called, sent with the
    /// `COMMIT` (PostgreSQL delivers it only if the transaction commits).
    fn signal_work(&self) {
        self.signalled.set(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_server_is_noticed_unless_the_url_says_otherwise() {
        let secs = Duration::from_secs;
        for (url, user_timeout, idle, interval, retries) in [
            ("postgres://u@db.example/colony", 30, 15, 5, 3),
            (
                "postgres://u@db.example/colony?tcp_user_timeout=90&keepalives_idle=600&keepalives_interval=20&keepalives_retries=9",
                90,
                600,
                20,
                9,
            ),
        ] {
            let mut config: Config = url.parse().unwrap();
            notice_dead_servers(&mut config, url);
            assert_eq!(
                config.get_tcp_user_timeout(),
                Some(&secs(user_timeout)),
                "{url}"
            );
            assert_eq!(config.get_keepalives_idle(), secs(idle), "{url}");
            assert_eq!(
                config.get_keepalives_interval(),
                Some(secs(interval)),
                "{url}"
            );
            assert_eq!(config.get_keepalives_retries(), Some(retries), "{url}");
        }
    }
}
