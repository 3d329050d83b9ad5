//! The SQLite driver: one database file, WAL, one writer at a time.
//!
//! SQLite's write lock is what makes a claim atomic: every write
//! transaction starts `BEGIN IMMEDIATE`, so the reads that decide a write
//! see what the write changes. Throughput comes from batching above it.

mod checkpoint;
mod schema;
pub use schema::{ANOTHER_DB, refuse_what_is_not_a_queue};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, OpenFlags};

use self::checkpoint::Checkpointer;
use super::sql::{Dialect, Param, Row, Sql, Value};
use super::{QueueError, QueueOptions, Result, Sync, now_ms};

pub struct SqliteDb {
    conn: Connection,
    path: PathBuf,
    /// The file opened (device and inode), to notice it deleted or replaced.
    file: Option<FileId>,
    /// Set when this connection leaves WAL checkpoints to a thread.
    checkpointer: Option<Arc<Checkpointer>>,
    /// The `-wal` file as this connection found it: while any connection
    /// is open SQLite neither deletes nor replaces it, so another file
    /// there means someone deleted it, and the commits in it with it.
    wal: Option<FileId>,
}

/// The `-wal` file beside the database at `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// Which file a path names: its device and inode, and its birth time where
/// the file system keeps one (a file created where a deleted one was
/// often gets the freed inode number back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    born: Option<std::time::SystemTime>,
}

/// The identity of the file at `path`, if it is there.
fn file_identity(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| FileId {
        dev: m.dev(),
        ino: m.ino(),
        born: m.created().ok(),
    })
}

impl SqliteDb {
    pub fn open(path: &Path, opts: &QueueOptions) -> Result<SqliteDb> {
        let mut conn = if opts.must_exist {
            let flags = OpenFlags::default() - OpenFlags::SQLITE_OPEN_CREATE;
            Connection::open_with_flags(path, flags).map_err(|e| match path.try_exists() {
                Ok(false) => QueueError::DatabaseGone {
                    path: path.display().to_string(),
                    what: "moved or deleted",
                },
                _ => e.into(),
            })?
        } else {
            Connection::open(path)?
        };
        // Another file put where the first connection's was: refused before
        // anything (a migration) touches it, as `check_file` refuses it.
        if let Some(expected) = opts.same_file
            && file_identity(path) != Some(expected)
        {
            return Err(QueueError::DatabaseGone {
                path: path.display().to_string(),
                what: "replaced by another file",
            });
        }
        conn.busy_timeout(opts.busy_timeout)?;
        schema::refuse_what_is_not_a_queue(&conn, &path.display().to_string(), opts.must_exist)?;
        // Switching a fresh file to WAL upgrades a read lock to a write
        // lock, which SQLite answers `SQLITE_BUSY` at once rather than wait
        // (the busy handler could deadlock there) while another process
        // opens the same fresh file: one process in ~100 starting together
        // failed 'database is locked'. Retried for the busy timeout.
        let deadline = std::time::Instant::now() + opts.busy_timeout;
        while let Err(e) = conn.pragma_update(None, "journal_mode", "WAL") {
            let busy = matches!(&e, rusqlite::Error::SqliteFailure(f, _)
                if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked));
            if !busy || std::time::Instant::now() >= deadline {
                return Err(e.into());
            }
            std::thread::sleep(std::time::Duration::from_millis(5 + fastrand::u64(0..20)));
        }
        let sync = match opts.sync {
            Sync::Normal => "NORMAL",
            Sync::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.set_prepared_statement_cache_capacity(64);
        schema::migrate(&mut conn, &path.display().to_string(), opts.note_upgrade)?;
        let mut db = SqliteDb {
            conn,
            path: path.to_path_buf(),
            file: opts.same_file.or_else(|| file_identity(path)),
            checkpointer: None,
            wal: file_identity(&wal_path(path)),
        };

        if opts.background_checkpoints
            && let Err(e) = db.checkpoint_in_background()
        {
            tracing::warn!("{e}; SQLite checkpoints in this connection's commits instead");
        }
        Ok(db)
    }

    /// Leaves this connection's WAL checkpoints to a thread of their own
    /// (see [`checkpoint`]). Fails only if that thread cannot be started;
    /// SQLite's own checkpoints stay on then.
    pub fn checkpoint_in_background(&mut self) -> Result<()> {
        if self.checkpointer.is_none() {
            let checkpointer = Checkpointer::for_database(&self.path).map_err(|e| {
                QueueError::CheckpointThread {
                    path: self.path.display().to_string(),
                    message: e.to_string(),
                }
            })?;
            checkpointer.attach(&mut self.conn)?;
            self.checkpointer = Some(checkpointer);
        }
        Ok(())
    }

    /// The connection's `PRAGMA synchronous`.
    pub fn synchronous(&self) -> rusqlite::Result<i64> {
        self.conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> Option<FileId> {
        self.file
    }

    /// Fails when the file at `path` is gone or another one (see
    /// [`crate::queue::Queue::check_database_file`]).
    pub fn check_file(&self) -> Result<()> {
        let gone = |what| {
            Err(QueueError::DatabaseGone {
                path: self.path.display().to_string(),
                what,
            })
        };
        match (file_identity(&self.path), self.file) {
            (None, Some(_)) if !self.path.exists() => return gone("moved or deleted"),
            (Some(now), Some(then)) if now != then => return gone("replaced by another file"),
            _ => {}
        }
        match self.wal {
            Some(then) if file_identity(&wal_path(&self.path)) != Some(then) => gone(
                "cut off from its -wal file (deleted or replaced, and the latest commits with it)",
            ),
            _ => Ok(()),
        }
    }

    /// One `BEGIN IMMEDIATE` transaction: committed when `f` succeeds,
    /// rolled back when it fails. `now` is this host's clock.
    pub fn write<T>(&self, f: &mut dyn FnMut(&dyn Sql, i64) -> Result<T>) -> Result<T> {
        let tx = self.conn.unchecked_transaction_immediate()?;
        let value = f(&*tx, now_ms())?;
        tx.commit()?;
        Ok(value)
    }

    pub fn read<T>(&self, f: &mut dyn FnMut(&dyn Sql) -> Result<T>) -> Result<T> {
        f(&self.conn)
    }

    /// A number that changes whenever another connection (another process,
    /// say the CLI) commits to the database: a cheap way to notice new work.
    pub fn data_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// Caps the database file at `pages` pages, to rehearse a full disk.
    pub fn set_max_page_count(&self, pages: i64) -> Result<()> {
        self.conn.pragma_update(None, "max_page_count", pages)?;
        Ok(())
    }
}

/// `Connection::unchecked_transaction` with `BEGIN IMMEDIATE`: takes the
/// write lock up front, so a transaction never fails half-way on a lock
/// another writer holds.
trait ImmediateTransaction {
    fn unchecked_transaction_immediate(&self) -> rusqlite::Result<rusqlite::Transaction<'_>>;
}

impl ImmediateTransaction for Connection {
    fn unchecked_transaction_immediate(&self) -> rusqlite::Result<rusqlite::Transaction<'_>> {
        rusqlite::Transaction::new_unchecked(self, rusqlite::TransactionBehavior::Immediate)
    }
}

impl Sql for Connection {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&self, sql: &str, args: &[Param<'_>]) -> Result<u64> {
        let mut stmt = self.prepare_cached(sql)?;
        Ok(stmt.execute(rusqlite::params_from_iter(args.iter()))? as u64)
    }

    fn query(&self, sql: &str, args: &[Param<'_>]) -> Result<Vec<Row>> {
        let mut stmt = self.prepare_cached(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                values.push(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) => Value::Int(n),
                    ValueRef::Real(x) => Value::Real(x),
                    // Text that is not UTF-8 (a damaged row) comes back as
                    // bytes, so only the reader of that column fails.
                    ValueRef::Text(b) => match std::str::from_utf8(b) {
                        Ok(s) => Value::Text(s.to_string()),
                        Err(_) => Value::Blob(b.to_vec()),
                    },
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            out.push(Row::new(values));
        }
        Ok(out)
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Param::Null => ValueRef::Null,
            Param::Int(n) => ValueRef::Integer(n),
            Param::Real(x) => ValueRef::Real(x),
            Param::Text(s) => ValueRef::Text(s.as_bytes()),
            Param::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// The SQLite schema version this build brings a database to.
pub fn schema_version() -> u32 {
    schema::newest_version()
}

/// True for trouble that may pass (the database busy or locked by another
/// process, the disk full, an I/O error): retry the same write later.
pub fn is_transient(e: &rusqlite::Error) -> bool {
    use ErrorCode::*;
    match e {
        rusqlite::Error::SqliteFailure(e, _) => matches!(
            e.code,
            DatabaseBusy | DatabaseLocked | DiskFull | SystemIoFailure | OutOfMemory | CannotOpen
        ),
        _ => false,
    }
}

/// SQLite's error, with what an I/O error most likely is: SQLite says only
/// "disk I/O error" when a write fails (EFBIG past a file-size limit among
/// others), where a person needs a place to look.
pub fn describe(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::SystemIoFailure => format!(
            "{e} (the file system refused a read or write: a failing disk, a file grown past \
             this process's file-size limit (`ulimit -f`, systemd's LimitFSIZE), or a \
             removed mount)"
        ),
        _ => e.to_string(),
    }
}

/// True when retrying cannot help: the file is read-only or not a database,
/// or the disk image is malformed.
pub fn is_permanent(e: &rusqlite::Error) -> bool {
    use ErrorCode::*;
    match e {
        rusqlite::Error::SqliteFailure(e, _) => matches!(
            e.code,
            ReadOnly
                | DatabaseCorrupt
                | NotADatabase
                | PermissionDenied
                | AuthorizationForStatementDenied
        ),
        _ => false,
    }
}

impl From<rusqlite::Error> for QueueError {
    fn from(e: rusqlite::Error) -> Self {
        QueueError::Sqlite(e)
    }
}

#[cfg(test)]
mod tests {
    use super::SqliteDb;
    use crate::queue::{QueueOptions, Sync};

    /// `--sync full` reaches the connection: each commit is on disk before
    /// it returns (SQLite's FULL is 2, NORMAL 1).
    #[test]
    fn the_sync_asked_for_is_the_connections() {
        let dir = tempfile::tempdir().unwrap();
        for (sync, level) in [(Sync::Normal, 1), (Sync::Full, 2)] {
            let opts = QueueOptions {
                sync,
                background_checkpoints: false,
                ..Default::default()
            };
            let db = SqliteDb::open(&dir.path().join("q.db"), &opts).unwrap();
            let found: i64 = db
                .conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap();
            assert_eq!(found, level, "{sync:?}");
        }
    }
}
