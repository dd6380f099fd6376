//! What Valkey replied, as a value to look into: one decoder (`redis_protocol`) for every
//! reply cachefront reads rather than forwards (the command table, key lookups, slot maps,
//! subscription counts), whichever protocol the connection speaks.
//!
//! Forwarded replies are never decoded (see [`super::scan`]); client requests have their own
//! parser (see [`super::request`]).

use redis_protocol::resp2::types::OwnedFrame as F2;
use redis_protocol::resp3::types::OwnedFrame as F3;

/// A decoded reply. RESP3's richer types fold into the few cachefront looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Int(i64),
    /// Bulk, simple and verbatim strings; big numbers and doubles as their text.
    Bytes(Vec<u8>),
    Error(String),
    Bool(bool),
    /// Arrays, sets and pushes.
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
}

/// Decodes one complete reply frame, RESP2 or RESP3. `None` if `frame` is not one.
///
/// RESP2 is tried first: a frame with only RESP2 types means the same in both, and RESP2's
/// null bulk (`$-1`) means something else to a RESP3 decoder. A RESP3-only type anywhere makes
/// the RESP2 decoder fail, and the RESP3 decoder reads it.
pub fn decode(frame: &[u8]) -> Option<Value> {
    if let Ok(Some((f, _))) = redis_protocol::resp2::decode::decode(frame) {
        return Some(from_resp2(f));
    }
    match redis_protocol::resp3::decode::complete::decode(frame) {
        Ok(Some((f, _))) => Some(from_resp3(f)),
        _ => None,
    }
}

fn from_resp2(f: F2) -> Value {
    match f {
        F2::SimpleString(b) | F2::BulkString(b) => Value::Bytes(b),
        F2::Error(e) => Value::Error(e),
        F2::Integer(n) => Value::Int(n),
        F2::Array(a) => Value::Array(a.into_iter().map(from_resp2).collect()),
        F2::Null => Value::Nil,
    }
}

fn from_resp3(f: F3) -> Value {
    match f {
        F3::BlobString { data, .. }
        | F3::SimpleString { data, .. }
        | F3::BigNumber { data, .. }
        | F3::VerbatimString { data, .. }
        | F3::ChunkedString(data) => Value::Bytes(data),
        F3::BlobError { data, .. } => Value::Error(String::from_utf8_lossy(&data).into_owned()),
        F3::SimpleError { data, .. } => Value::Error(data),
        F3::Boolean { data, .. } => Value::Bool(data),
        F3::Number { data, .. } => Value::Int(data),
        F3::Double { data, .. } => Value::Bytes(data.to_string().into_bytes()),
        F3::Array { data, .. } | F3::Push { data, .. } => {
            Value::Array(data.into_iter().map(from_resp3).collect())
        }
        F3::Set { data, .. } => Value::Array(data.into_iter().map(from_resp3).collect()),
        F3::Map { data, .. } => Value::Map(
            data.into_iter()
                .map(|(k, v)| (from_resp3(k), from_resp3(v)))
                .collect(),
        ),
        F3::Null | F3::Hello { .. } => Value::Nil,
    }
}

impl Value {
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }

    pub fn array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn into_array(self) -> Option<Vec<Value>> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_protocols_decode_to_the_same_values() {
        assert_eq!(decode(b"$-1\r\n"), Some(Value::Nil));
        assert_eq!(decode(b"_\r\n"), Some(Value::Nil));
        assert_eq!(decode(b"+OK\r\n"), Some(Value::Bytes(b"OK".to_vec())));
        assert_eq!(
            decode(b"*2\r\n$1\r\na\r\n:3\r\n"),
            decode(b"*2\r\n+a\r\n:3\r\n")
        );
        assert_eq!(
            decode(b"*2\r\n$1\r\na\r\n#t\r\n"),
            Some(Value::Array(vec![
                Value::Bytes(b"a".to_vec()),
                Value::Bool(true)
            ]))
        );
        assert_eq!(
            decode(b"%1\r\n+k\r\n,1.5\r\n"),
            Some(Value::Map(vec![(
                Value::Bytes(b"k".to_vec()),
                Value::Bytes(b"1.5".to_vec())
            )]))
        );
        // A set's order is not kept (it is a set).
        assert_eq!(
            decode(b"~1\r\n+a\r\n"),
            Some(Value::Array(vec![Value::Bytes(b"a".to_vec())]))
        );
        assert_eq!(decode(b"-ERR x\r\n"), Some(Value::Error("ERR x".into())));
        assert_eq!(decode(b"*2\r\n:1\r\n"), None, "incomplete");
    }
}
