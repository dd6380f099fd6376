//! A decoder for PostgreSQL's `pgoutput` logical replication messages (protocol version 1,
//! text tuples): what [`wal`](super::wal) reads from a replication slot.
//!
//! The transport crate hands over each message's bytes as PostgreSQL wrote them (it decodes
//! only the Begin/Commit/Message boundaries itself); turning them into rows is ours. The
//! format is PostgreSQL's "Logical Replication Message Formats" chapter. Everything read
//! comes from the network, so every length and count is checked against the bytes actually
//! there before it is used: malformed input is an error, never a panic, and never an
//! allocation sized by a count the bytes cannot back.
//!
//! Strings are taken as UTF-8 (the server's encoding — cachefront's databases are UTF-8); a
//! string that is not is an error rather than a lossy guess, because a misread relation name
//! or key value would invalidate the wrong entries.

use bytes::Bytes;

/// A message that is not valid `pgoutput` (protocol version 1, text format): the stream it
/// came from can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(String);

impl DecodeError {
    fn new(what: impl Into<String>) -> DecodeError {
        DecodeError(what.into())
    }
}

/// One column value of a row, as `pgoutput` sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// SQL NULL — or, in an old row sent as the replica identity *key*, a column that is not
    /// part of the key (PostgreSQL sends those as NULL too).
    Null,
    /// A TOASTed value the UPDATE did not change, so PostgreSQL did not send it.
    Unchanged,
    /// The value in PostgreSQL's text output format.
    Text(String),
}

/// One column of a [`Relation`] message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the replica identity key (every column is, under `REPLICA IDENTITY FULL`).
    pub key: bool,
}

/// A Relation message: what the rows of later changes to `oid` look like. PostgreSQL sends
/// one before the first change to a relation in a session, and again after its schema
/// changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// The schema name (PostgreSQL sends an empty one for `pg_catalog`; it is filled in).
    pub schema: String,
    pub name: String,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// The columns that changes send, in order (dropped and generated columns are left out).
    pub columns: Vec<Column>,
}

/// Which row an UPDATE or DELETE sent as its old row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldRow {
    /// Only the replica identity key columns are meaningful (`K`); the others are NULL.
    Key,
    /// The whole old row (`O`, under `REPLICA IDENTITY FULL`).
    Full,
}

/// One decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        /// The LSN of the transaction's commit record.
        final_lsn: u64,
        /// Microseconds since 2000-01-01 UTC.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        /// The LSN of the commit record.
        lsn: u64,
        /// The LSN just past the commit record: where the next transaction may start.
        end_lsn: u64,
        commit_time: i64,
    },
    Origin {
        lsn: u64,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        schema: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Vec<Cell>,
    },
    Update {
        relation: u32,
        /// Sent when the replica identity is FULL, or when the key changed.
        old: Option<(OldRow, Vec<Cell>)>,
        new: Vec<Cell>,
    },
    Delete {
        relation: u32,
        old: (OldRow, Vec<Cell>),
    },
    Truncate {
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
        relations: Vec<u32>,
    },
    /// `pg_logical_emit_message`.
    Message {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
}

/// Decodes one message (the payload of one XLogData).
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader { data, pos: 0 };
    let tag = r.u8("message type")?;
    let message = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("Begin final LSN")?,
            commit_time: r.i64("Begin commit time")?,
            xid: r.u32("Begin xid")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("Commit flags")?,
            lsn: r.u64("Commit LSN")?,
            end_lsn: r.u64("Commit end LSN")?,
            commit_time: r.i64("Commit time")?,
        },
        b'O' => Message::Origin {
            lsn: r.u64("Origin LSN")?,
            name: r.string("Origin name")?,
        },
        b'R' => Message::Relation(relation(&mut r)?),
        b'Y' => Message::Type {
            oid: r.u32("Type oid")?,
            schema: r.string("Type schema")?,
            name: r.string("Type name")?,
        },
        b'I' => {
            let relation = r.u32("Insert relation")?;
            expect(&mut r, b'N', "Insert")?;
            Message::Insert {
                relation,
                new: tuple(&mut r)?,
            }
        }
        b'U' => update(&mut r)?,
        b'D' => {
            let relation = r.u32("Delete relation")?;
            let kind = match r.u8("Delete old row kind")? {
                b'K' => OldRow::Key,
                b'O' => OldRow::Full,
                other => return Err(unexpected(other, "Delete", "K or O")),
            };
            Message::Delete {
                relation,
                old: (kind, tuple(&mut r)?),
            }
        }
        b'T' => truncate(&mut r)?,
        b'M' => Message::Message {
            transactional: r.u8("Message flags")? & 1 != 0,
            lsn: r.u64("Message LSN")?,
            prefix: r.string("Message prefix")?,
            content: {
                let len = r.len("Message content length")?;
                r.bytes(len, "Message content")?
            },
        },
        other => {
            return Err(DecodeError::new(format!(
                "unknown message type {}",
                printable(other)
            )))
        }
    };
    if r.pos != data.len() {
        return Err(DecodeError::new(format!(
            "{} bytes left over after a {} message",
            data.len() - r.pos,
            printable(tag)
        )));
    }
    Ok(message)
}

/// The body of a Relation message.
fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let oid = r.u32("Relation oid")?;
    let mut schema = r.string("Relation schema")?;
    if schema.is_empty() {
        schema = "pg_catalog".into();
    }
    let name = r.string("Relation name")?;
    let replica_identity = r.u8("Relation replica identity")?;
    let count = r.u16("Relation column count")?;
    // Each column takes at least 10 bytes: the capacity is bounded by what was received.
    let mut columns = Vec::with_capacity(usize::from(count).min(r.remaining() / 10));
    for _ in 0..count {
        let flags = r.u8("column flags")?;
        columns.push(Column {
            name: r.string("column name")?,
            type_oid: r.u32("column type")?,
            type_modifier: r.i32("column type modifier")?,
            key: flags & 1 != 0,
        });
    }
    Ok(Relation {
        oid,
        schema,
        name,
        replica_identity,
        columns,
    })
}

/// The body of an Update message: an optional old row (`K` or `O`), then the new row (`N`).
fn update(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let relation = r.u32("Update relation")?;
    let (old, new_tag) = match r.u8("Update row kind")? {
        b'K' => (Some((OldRow::Key, tuple(r)?)), r.u8("Update row kind")?),
        b'O' => (Some((OldRow::Full, tuple(r)?)), r.u8("Update row kind")?),
        tag => (None, tag),
    };
    if new_tag != b'N' {
        return Err(unexpected(new_tag, "Update", "N"));
    }
    Ok(Message::Update {
        relation,
        old,
        new: tuple(r)?,
    })
}

/// The body of a Truncate message.
fn truncate(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let count = r.u32("Truncate relation count")?;
    let options = r.u8("Truncate options")?;
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    if count > r.remaining() / 4 {
        return Err(DecodeError::new(format!(
            "Truncate names {count} relations in {} bytes",
            r.remaining()
        )));
    }
    let mut relations = Vec::with_capacity(count);
    for _ in 0..count {
        relations.push(r.u32("Truncate relation")?);
    }
    Ok(Message::Truncate { options, relations })
}

/// TupleData: a column count, then each column's kind and value.
fn tuple(r: &mut Reader<'_>) -> Result<Vec<Cell>, DecodeError> {
    let count = r.u16("tuple column count")?;
    // Each column takes at least one byte.
    let mut cells = Vec::with_capacity(usize::from(count).min(r.remaining()));
    for _ in 0..count {
        cells.push(match r.u8("tuple column kind")? {
            b'n' => Cell::Null,
            b'u' => Cell::Unchanged,
            b't' => {
                let len = r.len("tuple value length")?;
                Cell::Text(r.utf8(len, "tuple value")?)
            }
            b'b' => {
                return Err(DecodeError::new(
                    "a binary tuple value (the stream was started in text format)",
                ))
            }
            other => return Err(unexpected(other, "tuple column", "n, u or t")),
        });
    }
    Ok(cells)
}

/// Reads the one-byte tag `want`.
fn expect(r: &mut Reader<'_>, want: u8, what: &str) -> Result<(), DecodeError> {
    match r.u8(what)? {
        got if got == want => Ok(()),
        got => Err(unexpected(got, what, &(want as char).to_string())),
    }
}

fn unexpected(got: u8, what: &str, want: &str) -> DecodeError {
    DecodeError::new(format!("{what}: {} where {want} belongs", printable(got)))
}

/// A tag byte as a reader would want to see it: the letter, or its code.
fn printable(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("byte {b}")
    }
}

/// A cursor over one message; every read checks that the bytes are there.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let end = self.pos.checked_add(N).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(truncated(what));
        };
        let mut out = [0u8; N];
        out.copy_from_slice(&self.data[self.pos..end]);
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(what)?))
    }

    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(what)?))
    }

    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take(what)?))
    }

    /// An Int32 length that must not be negative.
    fn len(&mut self, what: &str) -> Result<usize, DecodeError> {
        let n = self.i32(what)?;
        usize::try_from(n).map_err(|_| DecodeError::new(format!("{what} is negative ({n})")))
    }

    /// `len` bytes, sharing the message's buffer.
    fn bytes(&mut self, len: usize, what: &str) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::new(format!(
                "{what} is {len} bytes but only {} remain",
                self.remaining()
            )));
        }
        let out = self.data.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// `len` bytes of UTF-8 text.
    fn utf8(&mut self, len: usize, what: &str) -> Result<String, DecodeError> {
        let raw = self.bytes(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| not_utf8(what))
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.data[self.pos..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(truncated(what));
        };
        let text = std::str::from_utf8(&rest[..nul]).map_err(|_| not_utf8(what))?;
        let text = text.to_string();
        self.pos += nul + 1;
        Ok(text)
    }
}

fn truncated(what: &str) -> DecodeError {
    DecodeError::new(format!("truncated at the {what}"))
}

fn not_utf8(what: &str) -> DecodeError {
    DecodeError::new(format!("the {what} is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds messages the way PostgreSQL writes them.
    #[derive(Default)]
    struct B(Vec<u8>);

    impl B {
        fn tag(t: u8) -> B {
            B(vec![t])
        }
        fn u8(mut self, v: u8) -> B {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> B {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> B {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> B {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> B {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> B {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        fn raw(mut self, v: &[u8]) -> B {
            self.0.extend_from_slice(v);
            self
        }
        /// TupleData: `None` NULL, `Some(None)` unchanged TOAST, `Some(Some(v))` text.
        fn tuple(mut self, cells: &[Option<Option<&str>>]) -> B {
            self = self.u16(cells.len() as u16);
            for c in cells {
                self = match c {
                    None => self.u8(b'n'),
                    Some(None) => self.u8(b'u'),
                    Some(Some(v)) => self.u8(b't').i32(v.len() as i32).raw(v.as_bytes()),
                };
            }
            self
        }
        fn bytes(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    fn text(v: &str) -> Cell {
        Cell::Text(v.into())
    }

    fn relation_message() -> B {
        B::tag(b'R')
            .u32(16384)
            .s("public")
            .s("employees")
            .u8(b'd')
            .u16(2)
            .u8(1)
            .s("id")
            .u32(23)
            .i32(-1)
            .u8(0)
            .s("name")
            .u32(1043)
            .i32(54)
    }

    #[test]
    fn begin_and_commit() {
        let begin = B::tag(b'B').u64(0x1_0000_0010).u64(7).u32(42).bytes();
        assert_eq!(
            decode(&begin),
            Ok(Message::Begin {
                final_lsn: 0x1_0000_0010,
                commit_time: 7,
                xid: 42
            })
        );
        let commit = B::tag(b'C').u8(0).u64(100).u64(120).u64(9).bytes();
        assert_eq!(
            decode(&commit),
            Ok(Message::Commit {
                flags: 0,
                lsn: 100,
                end_lsn: 120,
                commit_time: 9
            })
        );
    }

    #[test]
    fn relation_with_its_key_columns() {
        let Ok(Message::Relation(r)) = decode(&relation_message().bytes()) else {
            panic!("not a relation");
        };
        assert_eq!(
            (r.oid, r.schema.as_str(), r.name.as_str()),
            (16384, "public", "employees")
        );
        assert_eq!(r.replica_identity, b'd');
        assert_eq!(
            r.columns,
            vec![
                Column {
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                    key: true
                },
                Column {
                    name: "name".into(),
                    type_oid: 1043,
                    type_modifier: 54,
                    key: false
                },
            ]
        );
    }

    #[test]
    fn an_empty_schema_is_pg_catalog() {
        let m = B::tag(b'R').u32(1).s("").s("t").u8(b'n').u16(0).bytes();
        let Ok(Message::Relation(r)) = decode(&m) else {
            panic!("not a relation");
        };
        assert_eq!(r.schema, "pg_catalog");
        assert!(r.columns.is_empty());
    }

    #[test]
    fn insert_with_a_null() {
        let m = B::tag(b'I')
            .u32(16384)
            .u8(b'N')
            .tuple(&[Some(Some("7")), None])
            .bytes();
        assert_eq!(
            decode(&m),
            Ok(Message::Insert {
                relation: 16384,
                new: vec![text("7"), Cell::Null]
            })
        );
    }

    #[test]
    fn update_without_old_row_and_unchanged_toast() {
        let m = B::tag(b'U')
            .u32(5)
            .u8(b'N')
            .tuple(&[Some(Some("1")), Some(None)])
            .bytes();
        assert_eq!(
            decode(&m),
            Ok(Message::Update {
                relation: 5,
                old: None,
                new: vec![text("1"), Cell::Unchanged]
            })
        );
    }

    #[test]
    fn update_with_key_and_with_full_old_row() {
        let key = B::tag(b'U')
            .u32(5)
            .u8(b'K')
            .tuple(&[Some(Some("1")), None])
            .u8(b'N')
            .tuple(&[Some(Some("2")), Some(Some("x"))])
            .bytes();
        assert_eq!(
            decode(&key),
            Ok(Message::Update {
                relation: 5,
                old: Some((OldRow::Key, vec![text("1"), Cell::Null])),
                new: vec![text("2"), text("x")]
            })
        );
        let full = B::tag(b'U')
            .u32(5)
            .u8(b'O')
            .tuple(&[Some(Some("1")), Some(Some("é"))])
            .u8(b'N')
            .tuple(&[Some(Some("1")), Some(Some(""))])
            .bytes();
        assert_eq!(
            decode(&full),
            Ok(Message::Update {
                relation: 5,
                old: Some((OldRow::Full, vec![text("1"), text("é")])),
                new: vec![text("1"), text("")]
            })
        );
    }

    #[test]
    fn delete_by_key_and_full() {
        let m = B::tag(b'D')
            .u32(9)
            .u8(b'K')
            .tuple(&[Some(Some("3"))])
            .bytes();
        assert_eq!(
            decode(&m),
            Ok(Message::Delete {
                relation: 9,
                old: (OldRow::Key, vec![text("3")])
            })
        );
        let m = B::tag(b'D').u32(9).u8(b'O').tuple(&[None]).bytes();
        assert_eq!(
            decode(&m),
            Ok(Message::Delete {
                relation: 9,
                old: (OldRow::Full, vec![Cell::Null])
            })
        );
    }

    #[test]
    fn truncate_of_several_relations() {
        let m = B::tag(b'T').u32(2).u8(3).u32(10).u32(11).bytes();
        assert_eq!(
            decode(&m),
            Ok(Message::Truncate {
                options: 3,
                relations: vec![10, 11]
            })
        );
    }

    #[test]
    fn logical_message() {
        let m = B::tag(b'M')
            .u8(1)
            .u64(77)
            .s("cachefront")
            .i32(3)
            .raw(b"a\0b")
            .bytes();
        assert_eq!(
            decode(&m),
            Ok(Message::Message {
                transactional: true,
                lsn: 77,
                prefix: "cachefront".into(),
                content: Bytes::from_static(b"a\0b")
            })
        );
        let m = B::tag(b'M').u8(0).u64(1).s("p").i32(0).bytes();
        assert!(matches!(
            decode(&m),
            Ok(Message::Message {
                transactional: false,
                ..
            })
        ));
    }

    #[test]
    fn type_and_origin() {
        let m = B::tag(b'Y').u32(600).s("public").s("mood").bytes();
        assert_eq!(
            decode(&m),
            Ok(Message::Type {
                oid: 600,
                schema: "public".into(),
                name: "mood".into()
            })
        );
        let m = B::tag(b'O').u64(5).s("node_a").bytes();
        assert_eq!(
            decode(&m),
            Ok(Message::Origin {
                lsn: 5,
                name: "node_a".into()
            })
        );
    }

    /// Every prefix of every valid message is an error — never a panic, never a message.
    #[test]
    fn every_truncation_is_an_error() {
        let messages = [
            B::tag(b'B').u64(1).u64(2).u32(3).bytes(),
            B::tag(b'C').u8(0).u64(1).u64(2).u64(3).bytes(),
            relation_message().bytes(),
            B::tag(b'I')
                .u32(1)
                .u8(b'N')
                .tuple(&[Some(Some("abc")), None, Some(None)])
                .bytes(),
            B::tag(b'U')
                .u32(1)
                .u8(b'K')
                .tuple(&[Some(Some("1"))])
                .u8(b'N')
                .tuple(&[Some(Some("2"))])
                .bytes(),
            B::tag(b'D')
                .u32(1)
                .u8(b'O')
                .tuple(&[Some(Some("1"))])
                .bytes(),
            B::tag(b'T').u32(1).u8(0).u32(5).bytes(),
            B::tag(b'M').u8(1).u64(1).s("p").i32(2).raw(b"xy").bytes(),
            B::tag(b'Y').u32(1).s("s").s("n").bytes(),
            B::tag(b'O').u64(1).s("o").bytes(),
        ];
        for m in &messages {
            assert!(decode(m).is_ok(), "{m:?} decodes whole");
            for cut in 0..m.len() {
                let part = m.slice(..cut);
                assert!(decode(&part).is_err(), "{part:?} is cut short");
            }
            let mut longer = m.to_vec();
            longer.push(0);
            assert!(decode(&Bytes::from(longer)).is_err(), "trailing byte");
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        let bad = [
            // Unknown message type.
            B::tag(b'Z').bytes(),
            // Streaming-only and binary values are not asked for.
            B::tag(b'I').u32(1).u8(b'N').u16(1).u8(b'b').i32(0).bytes(),
            // Unknown column kind.
            B::tag(b'I').u32(1).u8(b'N').u16(1).u8(b'x').bytes(),
            // Insert without 'N'.
            B::tag(b'I').u32(1).u8(b'K').u16(0).bytes(),
            // Update whose new row is not 'N'.
            B::tag(b'U').u32(1).u8(b'K').u16(0).u8(b'O').u16(0).bytes(),
            // Delete without an old row.
            B::tag(b'D').u32(1).u8(b'N').u16(0).bytes(),
            // Negative and oversized lengths.
            B::tag(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(-1).bytes(),
            B::tag(b'I')
                .u32(1)
                .u8(b'N')
                .u16(1)
                .u8(b't')
                .i32(i32::MAX)
                .raw(b"x")
                .bytes(),
            B::tag(b'M').u8(1).u64(1).s("p").i32(-5).bytes(),
            // A count the bytes cannot back.
            B::tag(b'T').u32(u32::MAX).u8(0).u32(1).bytes(),
            B::tag(b'I').u32(1).u8(b'N').u16(u16::MAX).bytes(),
            B::tag(b'R')
                .u32(1)
                .s("s")
                .s("t")
                .u8(b'd')
                .u16(u16::MAX)
                .bytes(),
            // Not UTF-8.
            B::tag(b'I')
                .u32(1)
                .u8(b'N')
                .u16(1)
                .u8(b't')
                .i32(1)
                .raw(&[0xff])
                .bytes(),
            B::tag(b'R')
                .u32(1)
                .raw(&[0xc3, 0])
                .s("t")
                .u8(b'd')
                .u16(0)
                .bytes(),
            // Empty.
            Bytes::new(),
        ];
        for m in &bad {
            assert!(decode(m).is_err(), "{m:?} is refused");
        }
        let e = decode(&B::tag(b'Z').bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed pgoutput message: unknown message type 'Z'"
        );
    }

    /// Arbitrary bytes (a fixed pseudo-random sequence) never panic.
    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let tags = b"BCORYIUDTMZ";
        for round in 0..20_000u32 {
            let mut buf = vec![tags[round as usize % tags.len()]];
            let len = (round % 40) as usize;
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mostly small bytes, so counts and lengths are often plausible.
                let b = (x >> 8) as u8;
                buf.push(if x & 3 == 0 { b } else { b % 4 });
            }
            let _ = decode(&Bytes::from(buf));
        }
    }
}
