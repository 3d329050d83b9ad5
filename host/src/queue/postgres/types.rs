//! Arguments and columns between the queue's [`Param`]/[`Value`] and
//! PostgreSQL's wire types: the encoding is chosen from the type the
//! statement expects, and a column of a type the queue never stores is an
//! error naming it.

/// An argument, encoded for the type the server expects at its place.
use std::error::Error as StdError;

use ::postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use bytes::{BufMut, BytesMut};

use super::super::sql::{Param, Row, Value};
use super::super::{QueueError, Result};

#[derive(Debug)]
pub(super) struct PgParam<'a>(pub Param<'a>);

impl ToSql for PgParam<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self.0 {
            Param::Null => Ok(IsNull::Yes),
            Param::Int(i) => {
                if *ty == Type::INT8 {
                    i.to_sql(ty, out)
                } else if *ty == Type::INT4 {
                    i32::try_from(i)
                        .map_err(|_| format!("{i} does not fit the 32-bit integer parameter"))?
                        .to_sql(ty, out)
                } else if *ty == Type::INT2 {
                    i16::try_from(i)
                        .map_err(|_| format!("{i} does not fit the 16-bit integer parameter"))?
                        .to_sql(ty, out)
                } else if *ty == Type::FLOAT8 {
                    (i as f64).to_sql(ty, out)
                } else if *ty == Type::FLOAT4 {
                    (i as f32).to_sql(ty, out)
                } else if *ty == Type::BOOL {
                    (i != 0).to_sql(ty, out)
                } else {
                    Err(mismatch("an integer", ty))
                }
            }
            Param::Real(x) => {
                if *ty == Type::FLOAT8 {
                    x.to_sql(ty, out)
                } else if *ty == Type::FLOAT4 {
                    (x as f32).to_sql(ty, out)
                } else {
                    Err(mismatch("a real number", ty))
                }
            }
            Param::Text(s) => {
                if TEXT_TYPES.contains(ty) {
                    put_text(out, s);
                    Ok(IsNull::No)
                } else if *ty == Type::JSONB {
                    // jsonb's binary form: a version byte, then the text.
                    out.put_u8(1);
                    put_text(out, s);
                    Ok(IsNull::No)
                } else {
                    Err(mismatch("text", ty))
                }
            }
            Param::Blob(b) => {
                if *ty == Type::BYTEA {
                    out.put_slice(b);
                    Ok(IsNull::No)
                } else {
                    Err(mismatch("bytes", ty))
                }
            }
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Text as PostgreSQL can hold it: it refuses a NUL character in any text
/// (SQLite keeps it), so each becomes U+FFFD. Only text a guest wrote can
/// hold one (a log line, a progress or failure message; JSON escapes it):
/// refused, it failed the whole write, and a progress text with a NUL
/// sent at every heartbeat kept the daemon from renewing any lease.
fn put_text(out: &mut BytesMut, s: &str) {
    if !s.contains('\0') {
        out.put_slice(s.as_bytes());
        return;
    }
    out.put_slice(s.replace('\0', "\u{FFFD}").as_bytes());
}

fn mismatch(given: &str, ty: &Type) -> Box<dyn StdError + Sync + Send> {
    format!("{given} was passed where the statement expects {ty} (cast the placeholder)").into()
}

/// Types whose wire form is the text itself (written from and read into
/// text alike).
const TEXT_TYPES: &[Type] = &[
    Type::TEXT,
    Type::VARCHAR,
    Type::BPCHAR,
    Type::NAME,
    Type::UNKNOWN,
    Type::JSON,
];

/// The other column types rows are read from.
const OTHER_READABLE_TYPES: &[Type] = &[
    Type::INT8,
    Type::INT4,
    Type::INT2,
    Type::BOOL,
    Type::FLOAT8,
    Type::FLOAT4,
    Type::JSONB,
    Type::BYTEA,
];

fn readable(ty: &Type) -> bool {
    TEXT_TYPES.contains(ty) || OTHER_READABLE_TYPES.contains(ty)
}

pub(super) fn read_row(row: &::postgres::Row) -> Result<Row> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        if !readable(column.type_()) {
            return Err(QueueError::Corrupt(format!(
                "column {} has type {}, which colony does not read",
                column.name(),
                column.type_()
            )));
        }
        values.push(row.try_get::<_, PgValue>(i)?.0);
    }
    Ok(Row::new(values))
}

/// One column read back, by its type (see [`readable`]).
struct PgValue(Value);

impl<'a> FromSql<'a> for PgValue {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<PgValue, Box<dyn StdError + Sync + Send>> {
        let text = |bytes: &[u8]| match std::str::from_utf8(bytes) {
            Ok(s) => Value::Text(s.to_string()),
            // Like the SQLite driver: text that is not UTF-8 comes back as
            // bytes, so only the reader of that column fails.
            Err(_) => Value::Blob(bytes.to_vec()),
        };
        let value = if *ty == Type::INT8 {
            Value::Int(i64::from_sql(ty, raw)?)
        } else if *ty == Type::INT4 {
            Value::Int(i32::from_sql(ty, raw)?.into())
        } else if *ty == Type::INT2 {
            Value::Int(i16::from_sql(ty, raw)?.into())
        } else if *ty == Type::BOOL {
            Value::Int(bool::from_sql(ty, raw)?.into())
        } else if *ty == Type::FLOAT8 {
            Value::Real(f64::from_sql(ty, raw)?)
        } else if *ty == Type::FLOAT4 {
            Value::Real(f32::from_sql(ty, raw)?.into())
        } else if *ty == Type::BYTEA {
            Value::Blob(raw.to_vec())
        } else if *ty == Type::JSONB {
            match raw.split_first() {
                Some((1, rest)) => text(rest),
                _ => return Err("unknown jsonb version".into()),
            }
        } else {
            // TEXT, VARCHAR, BPCHAR, NAME, UNKNOWN and JSON are text on the wire.
            text(raw)
        };
        Ok(PgValue(value))
    }

    fn from_sql_null(_: &Type) -> std::result::Result<PgValue, Box<dyn StdError + Sync + Send>> {
        Ok(PgValue(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}
