//! What goes wrong in the queue, as the caller needs to tell it apart:
//! bad input (nothing stored), a task in the wrong state, a lost lease,
//! a commit whose outcome is unknown, a database unreachable or corrupt.

use super::{postgres_driver, sqlite};
use crate::task::State;

/// Errors from the queue. Bad input is refused before anything is stored.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("task #{} of the batch: {source}", index + 1)]
    InvalidInBatch {
        index: usize,
        #[source]
        source: Box<QueueError>,
    },
    /// One key on two tasks of a batch: the second would be answered with
    /// the first's id and dropped. Indexes from 0, as in the batch.
    #[error(
        "task #{} of the batch: invalid key: {key:?} is also the key of task #{}; a key names one task",
        index + 1,
        first + 1
    )]
    KeyTwiceInBatch {
        index: usize,
        first: usize,
        key: String,
    },
    #[error("task {0} does not exist")]
    NotFound(i64),
    /// Something other than a task that is not there (an effect, a state
    /// key), in words that name it.
    #[error("{0}")]
    Missing(String),
    /// A change that something's current state does not allow (a sent
    /// effect retried), in words that say why.
    #[error("{0}")]
    NotNow(String),
    /// A run asked the queue for something its lease no longer covers.
    #[error(
        "task {0} is no longer held by this run (it was cancelled, or its lease reset after missed heartbeats)"
    )]
    LeaseLost(i64),
    #[error("task {id} is {}, so it cannot {action}", state.phrase())]
    Illegal {
        id: i64,
        state: State,
        action: &'static str,
    },
    /// A retry refused because a dependency will never complete as it is.
    #[error(
        "task {id} depends on task {dependency}, which is {state}, so it could never run; retry task {dependency} first"
    )]
    DependencyFinished {
        id: i64,
        dependency: i64,
        state: State,
    },
    #[error(
        "the database {path} has schema version {found}, newer than this colony knows ({known}); upgrade colony"
    )]
    SchemaTooNew {
        path: String,
        found: u32,
        known: u32,
    },
    /// A file that holds something else: refused before colony writes to
    /// it (its tables were added to any SQLite file, even by `list`).
    #[error("{path} is not a colony queue: {why}. Colony left it as it was")]
    NotAQueue { path: String, why: String },
    #[error("the database holds data this colony cannot read: {0}")]
    Corrupt(String),
    // Not a `#[source]`: the message already carries it, and error chains
    // printed with `{:#}` would repeat it.
    #[error("database error: {}", sqlite::describe(.0))]
    Sqlite(rusqlite::Error),
    #[error("PostgreSQL error: {}", postgres_driver::describe(.0))]
    Postgres(postgres::Error),
    #[error("cannot reach the PostgreSQL database {location}: {message}")]
    Connect { location: String, message: String },
    #[error("cannot start the WAL checkpoint thread for {path}: {message}")]
    CheckpointThread { path: String, message: String },
    #[error(
        "the database file {path} was {what} while colony had it open: what is written now goes \
         where no other command looks. Stop this colony process, then put the file back or start afresh"
    )]
    DatabaseGone { path: String, what: &'static str },
    /// The connection was lost while the server was committing: the
    /// transaction may or may not have committed. Carries the claim tokens
    /// it used, so that claims it may have made can be given back
    /// ([`Queue::release_unconfirmed_claims`]).
    #[error("the connection was lost during COMMIT, so whether it committed is unknown: {message}")]
    CommitUnknown {
        message: String,
        claim_tokens: Vec<i64>,
    },
    /// A bug: code on a database connection panicked. The transaction it
    /// was in rolled back as the panic unwound, so nothing of it committed;
    /// the caller drops the connection. Neither transient nor permanent:
    /// a batch that hits it is stored again run by run, which isolates a
    /// run that provokes it.
    #[error("a bug in colony: storing panicked ({0}); its transaction rolled back")]
    Panicked(String),
}

impl From<postgres::Error> for QueueError {
    fn from(e: postgres::Error) -> Self {
        QueueError::Postgres(e)
    }
}

impl QueueError {
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> QueueError {
        QueueError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// True for trouble that may pass (the database busy or locked by
    /// another process, the disk full, an I/O error, a lost connection):
    /// retry the same write later.
    pub fn is_transient(&self) -> bool {
        match self {
            QueueError::Sqlite(e) => sqlite::is_transient(e),
            QueueError::Postgres(e) => postgres_driver::is_transient(e),
            QueueError::Connect { .. } | QueueError::CommitUnknown { .. } => true,
            _ => false,
        }
    }

    /// True when retrying cannot help: the file is read-only or not a
    /// database, the disk image is malformed, the schema is newer than this
    /// build, or the server refuses our credentials. A daemon stops on these
    /// rather than spinning.
    pub fn is_permanent(&self) -> bool {
        match self {
            QueueError::SchemaTooNew { .. }
            | QueueError::DatabaseGone { .. }
            | QueueError::NotAQueue { .. } => true,
            QueueError::Sqlite(e) => sqlite::is_permanent(e),
            QueueError::Postgres(e) => postgres_driver::is_permanent(e),
            _ => false,
        }
    }

    /// True when the caller's input was at fault (and nothing was stored).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            QueueError::Invalid { .. }
                | QueueError::InvalidInBatch { .. }
                | QueueError::KeyTwiceInBatch { .. }
                | QueueError::NotFound(_)
                | QueueError::Missing(_)
                | QueueError::Illegal { .. }
                | QueueError::NotNow(_)
                | QueueError::DependencyFinished { .. }
                | QueueError::NotAQueue { .. }
        )
    }
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// `e`, carrying the claim tokens its transaction used if its commit is
/// unknown (so that the caller can give back what they may have claimed).
pub(super) fn with_claim_tokens(e: QueueError, tokens: Vec<i64>) -> QueueError {
    match e {
        QueueError::CommitUnknown { message, .. } => QueueError::CommitUnknown {
            message,
            claim_tokens: tokens,
        },
        e => e,
    }
}

pub(super) fn in_batch(index: usize, e: QueueError) -> QueueError {
    if e.is_bad_input() {
        QueueError::InvalidInBatch {
            index,
            source: Box::new(e),
        }
    } else {
        e
    }
}
