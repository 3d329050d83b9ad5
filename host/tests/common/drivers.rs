//! One test body, two drivers: the queue's tests run against SQLite (a file
//! in a temp directory) and PostgreSQL (a fresh database in the throwaway
//! cluster of `colony_tests::postgres`), like River's `riverdrivertest`.
//!
//! ```ignore
//! on_both_drivers! {
//!     fn claims_are_fenced(db) { let mut q = db.open(); /* ... */ }
//! }
//! ```
//!
//! expands to `mod claims_are_fenced { #[test] fn sqlite() {..} #[test] fn
//! postgres() {..} }`, so the tests read `claims_are_fenced::sqlite` and
//! `claims_are_fenced::postgres`. Without PostgreSQL's server binaries the
//! `postgres` half passes at once (the cluster says once that it skipped).
//!
//! Tests that reach under the queue (to damage a row, or to set a schema
//! version from the future) do it through [`TestDb::raw`], which speaks to
//! either database directly.

use std::path::{Path, PathBuf};

use colony::queue::{Queue, QueueError, QueueOptions};

/// Where one test's queue lives.
pub enum TestDb {
    /// A database file in a temporary directory of its own.
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    /// A fresh, empty database in this process's throwaway cluster.
    Postgres { url: String },
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("colony.db");
        TestDb::Sqlite { _dir: dir, path }
    }

    /// `None` when PostgreSQL's server binaries are not installed (the
    /// caller's test then passes without running).
    pub fn postgres() -> Option<TestDb> {
        colony_tests::postgres::fresh_database().map(|url| TestDb::Postgres { url })
    }

    /// "sqlite" or "postgres", for messages.
    pub fn driver(&self) -> &'static str {
        match self {
            TestDb::Sqlite { .. } => "sqlite",
            TestDb::Postgres { .. } => "postgres",
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, TestDb::Postgres { .. })
    }

    /// What `Queue::open` and `--db` take: the file, or the URL.
    pub fn location(&self) -> PathBuf {
        match self {
            TestDb::Sqlite { path, .. } => path.clone(),
            TestDb::Postgres { url } => PathBuf::from(url),
        }
    }

    /// The SQLite file (for the tests about the file itself).
    ///
    /// # Panics
    /// On PostgreSQL.
    pub fn path(&self) -> &Path {
        match self {
            TestDb::Sqlite { path, .. } => path,
            TestDb::Postgres { .. } => panic!("a PostgreSQL database has no file"),
        }
    }

    /// The PostgreSQL URL.
    ///
    /// # Panics
    /// On SQLite.
    pub fn url(&self) -> &str {
        match self {
            TestDb::Postgres { url } => url,
            TestDb::Sqlite { .. } => panic!("a SQLite database has no URL"),
        }
    }

    pub fn open(&self) -> Queue {
        self.try_open(QueueOptions::default())
            .unwrap_or_else(|e| panic!("opening the {} queue: {e}", self.driver()))
    }

    /// A queue whose events and claims name `actor`.
    pub fn open_as(&self, actor: &str) -> Queue {
        let opts = QueueOptions {
            actor: actor.to_string(),
            ..Default::default()
        };
        self.try_open(opts)
            .unwrap_or_else(|e| panic!("opening the {} queue: {e}", self.driver()))
    }

    pub fn try_open(&self, opts: QueueOptions) -> Result<Queue, QueueError> {
        Queue::open_with(self.location(), opts)
    }

    /// A direct connection to the database, under the queue.
    pub fn raw(&self) -> Raw {
        match self {
            TestDb::Sqlite { path, .. } => Raw::Sqlite(rusqlite::Connection::open(path).unwrap()),
            TestDb::Postgres { url } => Raw::Postgres(
                ::postgres::Client::connect(url, ::postgres::NoTls)
                    .unwrap_or_else(|e| panic!("connecting to {url}: {e}")),
            ),
        }
    }

    /// Stamps the schema with `version`, as a newer colony would have
    /// (SQLite's `PRAGMA user_version`, PostgreSQL's `colony_schema`).
    pub fn set_schema_version(&self, version: u32) {
        match self.raw() {
            Raw::Sqlite(conn) => conn.pragma_update(None, "user_version", version).unwrap(),
            Raw::Postgres(mut client) => {
                let n = client
                    .execute(
                        "UPDATE colony_schema SET version = $1",
                        &[&i64::from(version)],
                    )
                    .unwrap();
                assert_eq!(n, 1, "colony_schema holds one row");
            }
        }
    }

    /// Empties the database for the next case of a property test, keeping
    /// the schema (PostgreSQL: every table truncated, ids restarted;
    /// SQLite: the file removed). Every queue on it must be dropped first.
    pub fn reset(&self) {
        match self {
            TestDb::Sqlite { path, .. } => {
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    let file = format!("{}{suffix}", path.display());
                    match std::fs::remove_file(&file) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            panic!("removing {file}: {e}")
                        }
                        _ => {}
                    }
                }
            }
            TestDb::Postgres { .. } => {
                let Raw::Postgres(mut client) = self.raw() else {
                    unreachable!()
                };
                let tables: Vec<String> = client
                    .query(
                        "SELECT quote_ident(tablename) FROM pg_tables
                         WHERE schemaname = current_schema() AND tablename <> 'colony_schema'",
                        &[],
                    )
                    .unwrap()
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                if !tables.is_empty() {
                    client
                        .batch_execute(&format!(
                            "TRUNCATE {} RESTART IDENTITY CASCADE",
                            tables.join(", ")
                        ))
                        .unwrap();
                }
            }
        }
    }
}

/// A direct connection to a test's database. Statements take no
/// parameters (write values into the text): the two dialects number them
/// differently.
pub enum Raw {
    Sqlite(rusqlite::Connection),
    Postgres(::postgres::Client),
}

/// One column of a row read through [`Raw::query`].
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Cell {
    pub fn int(&self) -> Option<i64> {
        match self {
            Cell::Null => None,
            Cell::Int(i) => Some(*i),
            other => panic!("expected an integer, got {other:?}"),
        }
    }

    pub fn text(&self) -> Option<&str> {
        match self {
            Cell::Null => None,
            Cell::Text(s) => Some(s),
            other => panic!("expected text, got {other:?}"),
        }
    }
}

impl Raw {
    /// Runs one statement; returns the rows it changed.
    pub fn execute(&mut self, sql: &str) -> u64 {
        match self {
            Raw::Sqlite(conn) => conn
                .execute(sql, [])
                .unwrap_or_else(|e| panic!("{sql}: {e}")) as u64,
            Raw::Postgres(client) => client
                .execute(sql, &[])
                .unwrap_or_else(|e| panic!("{sql}: {}", pg_error(&e))),
        }
    }

    /// Runs a query; returns its rows.
    pub fn query(&mut self, sql: &str) -> Vec<Vec<Cell>> {
        match self {
            Raw::Sqlite(conn) => {
                let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                let width = stmt.column_count();
                stmt.query_map([], |row| {
                    (0..width)
                        .map(|i| {
                            use rusqlite::types::ValueRef;
                            Ok(match row.get_ref(i)? {
                                ValueRef::Null => Cell::Null,
                                ValueRef::Integer(i) => Cell::Int(i),
                                ValueRef::Real(x) => Cell::Real(x),
                                ValueRef::Text(t) => {
                                    Cell::Text(String::from_utf8_lossy(t).into_owned())
                                }
                                ValueRef::Blob(b) => Cell::Blob(b.to_vec()),
                            })
                        })
                        .collect::<rusqlite::Result<Vec<Cell>>>()
                })
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .map(|row| row.unwrap())
                .collect()
            }
            Raw::Postgres(client) => client
                .query(sql, &[])
                .unwrap_or_else(|e| panic!("{sql}: {}", pg_error(&e)))
                .iter()
                .map(|row| (0..row.len()).map(|i| pg_cell(row, i)).collect())
                .collect(),
        }
    }

    /// The first column of the first row (the query must return one).
    pub fn value(&mut self, sql: &str) -> Cell {
        let rows = self.query(sql);
        let Some(row) = rows.first() else {
            panic!("{sql}: no row")
        };
        row[0].clone()
    }
}

fn pg_cell(row: &::postgres::Row, i: usize) -> Cell {
    use ::postgres::types::Type;
    let ty = row.columns()[i].type_().clone();
    let cell = if ty == Type::INT8 {
        row.get::<_, Option<i64>>(i).map(Cell::Int)
    } else if ty == Type::INT4 {
        row.get::<_, Option<i32>>(i).map(|v| Cell::Int(v.into()))
    } else if ty == Type::INT2 {
        row.get::<_, Option<i16>>(i).map(|v| Cell::Int(v.into()))
    } else if ty == Type::BOOL {
        row.get::<_, Option<bool>>(i).map(|v| Cell::Int(v.into()))
    } else if ty == Type::FLOAT8 {
        row.get::<_, Option<f64>>(i).map(Cell::Real)
    } else if ty == Type::FLOAT4 {
        row.get::<_, Option<f32>>(i).map(|v| Cell::Real(v.into()))
    } else if ty == Type::BYTEA {
        row.get::<_, Option<Vec<u8>>>(i).map(Cell::Blob)
    } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(&ty) {
        row.get::<_, Option<String>>(i).map(Cell::Text)
    } else {
        panic!(
            "column {} has type {ty}, which the tests do not read",
            row.columns()[i].name()
        )
    };
    cell.unwrap_or(Cell::Null)
}

/// `postgres::Error` with what the server said (its `Display` stops at "db error").
pub fn pg_error(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string(),
        None => e.to_string(),
    }
}

/// Turns each `fn name(db) { body }` into `mod name` holding two tests,
/// `sqlite` and `postgres`, that run `body` with `db: TestDb` on that
/// driver. Doc comments before `fn` document the module.
/// The body sees everything of the enclosing module (`use super::*`).
macro_rules! on_both_drivers {
    ($( $(#[$meta:meta])* fn $name:ident($db:ident) $body:block )*) => {
        $(
            $(#[$meta])*
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                fn body($db: $crate::common::TestDb) $body

                #[test]
                fn sqlite() {
                    body($crate::common::TestDb::sqlite());
                }

                #[test]
                fn postgres() {
                    if let Some(db) = $crate::common::TestDb::postgres() {
                        body(db);
                    }
                }
            }
        )*
    };
}
pub(crate) use on_both_drivers;

/// Runs a property test `cases` times on one database, emptied before each
/// case ([`TestDb::reset`]): a fresh PostgreSQL database per case would
/// cost more than the case. `source_file` is the caller's `file!()`, where
/// proptest keeps the failures it found.
pub fn check_property<S: proptest::strategy::Strategy>(
    db: &TestDb,
    cases: u32,
    source_file: &'static str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), proptest::test_runner::TestCaseError>,
) {
    let config = proptest::test_runner::Config {
        cases,
        source_file: Some(source_file),
        ..Default::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&strategy, |value| {
        db.reset();
        test(value)
    });
    if let Err(e) = result {
        panic!("on {}: {e}\n{runner}", db.driver());
    }
}
