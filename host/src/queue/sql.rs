//! The one small interface the queue's statements run through, so that the
//! queue logic (submit, claim, finish, review, state, journal, outbox) is
//! written once and both drivers run it.
//!
//! Statements are written in the SQL that SQLite and PostgreSQL share, with
//! numbered placeholders (`?1`, `?2`, ...; the PostgreSQL driver rewrites them
//! to `$1`, `$2`, ...). Where the two databases differ (row locks, the clock,
//! JSON lists) a statement asks [`Sql::dialect`] and each driver owns its
//! variant. Integers are 64-bit everywhere, booleans are stored as 0/1, and
//! aggregates that would widen (`SUM`) are cast back to `BIGINT`.
//!
//! The trait is object-safe (`&dyn Sql`): a transaction of either driver is
//! handed to the same functions. Rows come back owned ([`Row`]), which costs
//! one copy per text column — the copy `rusqlite::Row::get::<String>` made anyway.

use super::{QueueError, Result};

/// Which database a statement is about to run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A connection or transaction of one driver.
pub trait Sql {
    fn dialect(&self) -> Dialect;
    /// Runs a statement that returns no rows; answers how many rows it changed.
    fn execute(&self, sql: &str, args: &[Param<'_>]) -> Result<u64>;
    /// Runs a statement and reads every row it returns.
    fn query(&self, sql: &str, args: &[Param<'_>]) -> Result<Vec<Row>>;
    /// Says the transaction made work runnable (a submit, a retry, a
    /// promotion), so other hosts should look now. PostgreSQL sends one
    /// `NOTIFY colony_work` at commit; SQLite hosts notice a commit through
    /// `PRAGMA data_version` instead.
    fn signal_work(&self) {}
}

impl dyn Sql + '_ {
    /// The first row, if any.
    pub fn query_opt(&self, sql: &str, args: &[Param<'_>]) -> Result<Option<Row>> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row; its absence is an error (for statements that always
    /// return one, like aggregates and `INSERT ... RETURNING`).
    pub fn query_one(&self, sql: &str, args: &[Param<'_>]) -> Result<Row> {
        self.query_opt(sql, args)?.ok_or_else(|| {
            QueueError::Corrupt(format!("a statement returned no row: {}", first_line(sql)))
        })
    }

    /// The first column of the first row.
    pub fn query_value<T: FromValue>(&self, sql: &str, args: &[Param<'_>]) -> Result<T> {
        self.query_one(sql, args)?.get(0)
    }

    /// The first column of every row.
    pub fn query_column<T: FromValue>(&self, sql: &str, args: &[Param<'_>]) -> Result<Vec<T>> {
        self.query(sql, args)?.iter().map(|r| r.get(0)).collect()
    }

    /// `" FOR UPDATE"` on PostgreSQL, nothing on SQLite: a read that decides a
    /// write of the same row locks it there (SQLite's write lock already
    /// serialises every writer).
    pub fn for_update(&self) -> &'static str {
        match self.dialect() {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }

    /// `" FOR UPDATE SKIP LOCKED"` on PostgreSQL, nothing on SQLite: rows
    /// another transaction holds are passed over rather than waited for.
    pub fn skip_locked(&self) -> &'static str {
        match self.dialect() {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or_default()
}

/// A statement argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Param<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// Anything that can be passed as an argument (see the `args!` macro).
pub trait ToParam {
    fn to_param(&self) -> Param<'_>;
}

macro_rules! int_param {
    ($($t:ty),*) => {$(
        impl ToParam for $t {
            fn to_param(&self) -> Param<'_> {
                Param::Int(*self as i64)
            }
        }
    )*};
}
int_param!(i64, i32, u32, u16, u8);

impl ToParam for u64 {
    fn to_param(&self) -> Param<'_> {
        Param::Int(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl ToParam for usize {
    fn to_param(&self) -> Param<'_> {
        Param::Int(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl ToParam for bool {
    fn to_param(&self) -> Param<'_> {
        Param::Int(i64::from(*self))
    }
}

impl ToParam for f64 {
    fn to_param(&self) -> Param<'_> {
        Param::Real(*self)
    }
}

impl ToParam for str {
    fn to_param(&self) -> Param<'_> {
        Param::Text(self)
    }
}

impl ToParam for String {
    fn to_param(&self) -> Param<'_> {
        Param::Text(self)
    }
}

impl ToParam for [u8] {
    fn to_param(&self) -> Param<'_> {
        Param::Blob(self)
    }
}

impl ToParam for Vec<u8> {
    fn to_param(&self) -> Param<'_> {
        Param::Blob(self)
    }
}

impl<T: ToParam + ?Sized> ToParam for &T {
    fn to_param(&self) -> Param<'_> {
        (**self).to_param()
    }
}

impl<T: ToParam> ToParam for Option<T> {
    fn to_param(&self) -> Param<'_> {
        match self {
            Some(v) => v.to_param(),
            None => Param::Null,
        }
    }
}

/// `args![a, b, c]`: the arguments of one statement, borrowed for its duration.
macro_rules! args {
    () => { &[][..] };
    ($($e:expr),+ $(,)?) => {
        &[$($crate::queue::sql::ToParam::to_param(&$e)),+][..]
    };
}
pub(crate) use args;

/// One column of a row read back.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    /// The value as an argument (to copy a row from one database to another).
    pub fn as_param(&self) -> Param<'_> {
        match self {
            Value::Null => Param::Null,
            Value::Int(n) => Param::Int(*n),
            Value::Real(x) => Param::Real(*x),
            Value::Text(s) => Param::Text(s),
            Value::Blob(b) => Param::Blob(b),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Int(_) => "an integer",
            Value::Real(_) => "a real number",
            Value::Text(_) => "text",
            Value::Blob(_) => "bytes",
        }
    }
}

/// A row read back, owned.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    values: Vec<Value>,
}

impl Row {
    pub fn new(values: Vec<Value>) -> Row {
        Row { values }
    }

    /// Column `i` as a `T`; a mismatch (a damaged or foreign row) is
    /// [`QueueError::Corrupt`] naming the column.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T> {
        let value = self.values.get(i).unwrap_or(&Value::Null);
        T::from_value(value).ok_or_else(|| {
            QueueError::Corrupt(format!(
                "column {i} holds {}, not {}",
                value.kind(),
                T::WANTED
            ))
        })
    }

    pub fn values(&self) -> &[Value] {
        &self.values
    }
}

/// A Rust type a column converts to.
pub trait FromValue: Sized {
    const WANTED: &'static str;
    fn from_value(value: &Value) -> Option<Self>;
}

macro_rules! int_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            const WANTED: &'static str = concat!("an integer (", stringify!($t), ")");
            fn from_value(value: &Value) -> Option<Self> {
                match value {
                    Value::Int(i) => <$t>::try_from(*i).ok(),
                    _ => None,
                }
            }
        }
    )*};
}
int_value!(i64, i32, u64, u32, usize);

impl FromValue for bool {
    const WANTED: &'static str = "a boolean (0 or 1)";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Int(i) => Some(*i != 0),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    const WANTED: &'static str = "a number";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Real(r) => Some(*r),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
}

impl FromValue for String {
    const WANTED: &'static str = "text";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    const WANTED: &'static str = "bytes";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Blob(b) => Some(b.clone()),
            Value::Text(s) => Some(s.as_bytes().to_vec()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    const WANTED: &'static str = T::WANTED;
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// Rewrites `?N` placeholders to PostgreSQL's `$N`, leaving quoted text alone.
pub fn numbered_to_dollar(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_rewritten_outside_quotes_only() {
        assert_eq!(
            numbered_to_dollar("SELECT '?1', x FROM t WHERE a = ?1 AND b = ?12"),
            "SELECT '?1', x FROM t WHERE a = $1 AND b = $12"
        );
    }

    #[test]
    fn a_mismatched_column_names_itself() {
        let row = Row::new(vec![Value::Text("x".into())]);
        let err = row.get::<i64>(0).unwrap_err().to_string();
        assert!(err.contains("column 0 holds text"), "{err}");
        assert_eq!(row.get::<Option<String>>(1).unwrap(), None);
    }
}
