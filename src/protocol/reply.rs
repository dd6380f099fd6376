//! Replies produced by cachefront itself, encoded for the client's protocol version.

use bytes::{BufMut, Bytes, BytesMut};

/// The protocol a client speaks: RESP2 until it sends `HELLO 3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Resp2,
    Resp3,
}

impl Proto {
    pub fn number(self) -> i64 {
        match self {
            Proto::Resp2 => 2,
            Proto::Resp3 => 3,
        }
    }
}

/// A reply. `Raw` carries a frame received from Valkey, forwarded untouched.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Simple(&'static str),
    /// Full error text including its prefix, e.g. `ERR syntax error`; made by `error::Refusal`
    /// or `error::Error::to_reply`, where every wire error is worded.
    Error(String),
    Int(i64),
    Bulk(Bytes),
    Nil,
    Array(Vec<Reply>),
    /// RESP3 map; a flat array in RESP2.
    Map(Vec<(Reply, Reply)>),
    /// RESP3 verbatim text (`txt`); a bulk string in RESP2.
    Verbatim(Bytes),
    /// An already encoded frame.
    Raw(Bytes),
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Simple("OK")
    }

    pub fn bulk(b: impl Into<Bytes>) -> Reply {
        Reply::Bulk(b.into())
    }

    pub fn text(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    pub fn is_error(&self) -> bool {
        match self {
            Reply::Error(_) => true,
            Reply::Raw(b) => b.first() == Some(&b'-') || b.first() == Some(&b'!'),
            _ => false,
        }
    }

    /// Appends this reply's encoding for `proto` to `out`.
    pub fn encode(&self, proto: Proto, out: &mut BytesMut) {
        match self {
            Reply::Simple(s) => line(out, b'+', s.as_bytes()),
            Reply::Error(e) => line(out, b'-', sanitize(e).as_bytes()),
            Reply::Int(i) => line(out, b':', itoa::Buffer::new().format(*i).as_bytes()),
            Reply::Bulk(b) => blob(out, b'$', b),
            Reply::Nil => match proto {
                Proto::Resp2 => out.put_slice(b"$-1\r\n"),
                Proto::Resp3 => out.put_slice(b"_\r\n"),
            },
            Reply::Array(items) => {
                header(out, b'*', items.len());
                for i in items {
                    i.encode(proto, out);
                }
            }
            Reply::Map(pairs) => {
                match proto {
                    Proto::Resp2 => header(out, b'*', pairs.len() * 2),
                    Proto::Resp3 => header(out, b'%', pairs.len()),
                }
                for (k, v) in pairs {
                    k.encode(proto, out);
                    v.encode(proto, out);
                }
            }
            Reply::Verbatim(b) => match proto {
                Proto::Resp2 => blob(out, b'$', b),
                Proto::Resp3 => {
                    header(out, b'=', b.len() + 4);
                    out.put_slice(b"txt:");
                    out.put_slice(b);
                    out.put_slice(b"\r\n");
                }
            },
            Reply::Raw(b) => out.put_slice(b),
        }
    }

    /// The encoded frame; a `Raw` frame is handed over as it is, without copying.
    pub fn into_bytes(self, proto: Proto) -> Bytes {
        match self {
            Reply::Raw(b) => b,
            other => other.to_bytes(proto),
        }
    }

    /// Encodes into a fresh buffer (tests, small one-off frames).
    pub fn to_bytes(&self, proto: Proto) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(proto, &mut out);
        out.freeze()
    }
}

/// Error and status lines may not contain CR or LF; Valkey replaces them with spaces.
fn sanitize(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains(['\r', '\n']) {
        std::borrow::Cow::Owned(s.replace(['\r', '\n'], " "))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

fn line(out: &mut BytesMut, prefix: u8, body: &[u8]) {
    out.reserve(body.len() + 3);
    out.put_u8(prefix);
    out.put_slice(body);
    out.put_slice(b"\r\n");
}

fn header(out: &mut BytesMut, prefix: u8, n: usize) {
    line(out, prefix, itoa::Buffer::new().format(n).as_bytes());
}

fn blob(out: &mut BytesMut, prefix: u8, b: &[u8]) {
    out.reserve(b.len() + 16);
    header(out, prefix, b.len());
    out.put_slice(b);
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_per_protocol() {
        let r = Reply::Map(vec![(Reply::text("a"), Reply::Int(1))]);
        assert_eq!(&r.to_bytes(Proto::Resp2)[..], b"*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(&r.to_bytes(Proto::Resp3)[..], b"%1\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(&Reply::Nil.to_bytes(Proto::Resp2)[..], b"$-1\r\n");
        assert_eq!(&Reply::Nil.to_bytes(Proto::Resp3)[..], b"_\r\n");
        assert_eq!(
            &Reply::Verbatim(Bytes::from_static(b"x")).to_bytes(Proto::Resp3)[..],
            b"=5\r\ntxt:x\r\n"
        );
        assert_eq!(
            &Reply::Error("ERR a\r\nb".into()).to_bytes(Proto::Resp2)[..],
            b"-ERR a  b\r\n"
        );
    }
}
