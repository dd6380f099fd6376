//! How the cache store speaks to Valkey: its requests encoded as RESP and sent through the
//! upstream's shared connections (so reconnects, timeouts, TLS and cluster routing are the
//! pass-through's own), its replies decoded with `redis_protocol` into the few shapes the
//! store reads, and its Lua scripts run by SHA1, sent whole only to a server without them.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame;
use smallvec::SmallVec;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use crate::error::{Error, Result};
use crate::protocol::Proto;
use crate::upstream::{reply_of, Upstream};

/// Something that can be one argument of a request: it is written straight into the
/// request's buffer, so an argument costs no allocation of its own.
pub(super) trait ToArg {
    /// Appends this argument; returns where its bytes are in the request's buffer.
    fn put(&self, out: &mut Args) -> Range<usize>;
}

impl ToArg for str {
    fn put(&self, out: &mut Args) -> Range<usize> {
        out.push(self.as_bytes())
    }
}

impl ToArg for String {
    fn put(&self, out: &mut Args) -> Range<usize> {
        out.push(self.as_bytes())
    }
}

impl ToArg for Bytes {
    fn put(&self, out: &mut Args) -> Range<usize> {
        out.push(self)
    }
}

/// An argument given as parts, sent joined (meta keys are a prefix, a kind and names).
pub(super) struct Joined<'a>(pub &'a [&'a str]);

impl ToArg for Joined<'_> {
    fn put(&self, out: &mut Args) -> Range<usize> {
        out.push_joined(self.0)
    }
}

impl ToArg for u64 {
    fn put(&self, out: &mut Args) -> Range<usize> {
        out.push(itoa::Buffer::new().format(*self).as_bytes())
    }
}

impl ToArg for usize {
    fn put(&self, out: &mut Args) -> Range<usize> {
        (*self as u64).put(out)
    }
}

/// Bytes kept free at the front of a request's buffer for its header — `*<count>`, the
/// command, a script's SHA1 and key count — which is known only once every argument is in.
/// Written there, it makes the request the very buffer its arguments were encoded in.
const HEADER_ROOM: usize = 96;

/// A request's arguments, encoded as RESP bulk strings as they are added, after room for
/// the header (see [`HEADER_ROOM`]): one buffer per request, instead of one allocation per
/// argument and a copy of them all into the request at the end.
pub(super) struct Args {
    buf: BytesMut,
    count: usize,
}

impl Args {
    fn new() -> Args {
        let mut buf = BytesMut::with_capacity(HEADER_ROOM + 160);
        buf.resize(HEADER_ROOM, 0);
        Args { buf, count: 0 }
    }

    /// Appends one argument; returns where its bytes are in the buffer.
    pub fn push(&mut self, a: &[u8]) -> Range<usize> {
        self.push_joined(&[a])
    }

    /// Appends one argument made of `parts` joined, without joining them anywhere else first.
    pub fn push_joined<P: AsRef<[u8]>>(&mut self, parts: &[P]) -> Range<usize> {
        let total: usize = parts.iter().map(|p| p.as_ref().len()).sum();
        let mut len = itoa::Buffer::new();
        let len = len.format(total).as_bytes();
        self.buf.reserve(total + len.len() + 5);
        self.buf.put_u8(b'$');
        self.buf.put_slice(len);
        self.buf.put_slice(b"\r\n");
        let start = self.buf.len();
        for p in parts {
            self.buf.put_slice(p.as_ref());
        }
        self.buf.put_slice(b"\r\n");
        self.count += 1;
        start..start + total
    }

    /// The request: `head` (its command, and what comes before these arguments), then these.
    /// Made in place when the header fits its room, else (an `EVAL` carrying a script's
    /// source) in a new buffer.
    fn finish(self, head: &[&[u8]]) -> Bytes {
        let header = header(self.count + head.len(), head);
        let Args { mut buf, .. } = self;
        if header.len() <= HEADER_ROOM {
            let start = HEADER_ROOM - header.len();
            buf[start..HEADER_ROOM].copy_from_slice(&header);
            buf.advance(start);
            return buf.freeze();
        }
        let mut out = BytesMut::with_capacity(header.len() + buf.len() - HEADER_ROOM);
        out.put_slice(&header);
        out.put_slice(&buf[HEADER_ROOM..]);
        out.freeze()
    }
}

/// `*<count>` and the arguments of `head`, RESP-encoded.
fn header(count: usize, head: &[&[u8]]) -> SmallVec<[u8; HEADER_ROOM]> {
    let mut out = SmallVec::new();
    let put_line = |prefix: u8, n: usize, out: &mut SmallVec<[u8; HEADER_ROOM]>| {
        out.push(prefix);
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    put_line(b'*', count, &mut out);
    for h in head {
        put_line(b'$', h.len(), &mut out);
        out.extend_from_slice(h);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One request being built: the command name, then its arguments.
pub(super) struct Cmd {
    name: &'static str,
    args: Args,
}

impl Cmd {
    pub fn new(name: &'static str) -> Cmd {
        Cmd {
            name,
            args: Args::new(),
        }
    }

    pub fn arg(mut self, a: &(impl ToArg + ?Sized)) -> Cmd {
        let _ = a.put(&mut self.args);
        self
    }

    pub fn args<A: ToArg>(mut self, all: &[A]) -> Cmd {
        for a in all {
            let _ = a.put(&mut self.args);
        }
        self
    }

    /// The multibulk encoding, as sent.
    pub fn encode(self) -> Bytes {
        self.args.finish(&[self.name.as_bytes()])
    }
}

/// Sends `cmds` about `key` back to back on one connection (see [`Upstream::send_own`]) —
/// one round trip, like a pipeline — and decodes their replies. Any error reply fails the
/// whole batch, as a failed pipeline did.
pub(super) async fn batch<const N: usize>(
    up: &Upstream,
    key: &str,
    cmds: [Cmd; N],
) -> Result<Vec<BytesFrame>> {
    let mut pending = Vec::with_capacity(N);
    for c in cmds {
        pending.push(up.send_own(c.encode(), key.as_bytes()).await);
    }
    let mut replies = Vec::with_capacity(pending.len());
    for rx in pending {
        replies.push(decode(&reply_of(rx).await?)?);
    }
    Ok(replies)
}

/// One request about `key`, awaited and decoded.
pub(super) async fn call(up: &Upstream, key: &str, cmd: Cmd) -> Result<BytesFrame> {
    decode(&up.call(cmd.encode(), key.as_bytes()).await?)
}

/// A Lua script, known by its SHA1 so it is sent whole only to a server that lacks it (a
/// new or restarted Valkey, another cluster node).
pub(super) struct Script {
    src: Bytes,
    sha: Bytes,
}

impl Script {
    pub fn new(src: &str) -> Script {
        let sha = sha1_smol::Sha1::from(src).digest().to_string();
        Script {
            src: Bytes::copy_from_slice(src.as_bytes()),
            sha: Bytes::from(sha),
        }
    }

    /// `SCRIPT LOAD` of this script: for a caller that sends only its SHA1 (see
    /// [`Invocation::evalsha`], single server only) and found the server without it.
    pub async fn load(&self, up: &Upstream) -> Result<()> {
        call(up, "", Cmd::new("SCRIPT").arg("LOAD").arg(&self.src))
            .await
            .map(|_| ())
    }

    /// An invocation to fill with keys, then arguments.
    pub fn prepare(&'static self) -> Invocation {
        Invocation {
            script: self,
            args: Args::new(),
            keys: 0,
            route: 0..0,
        }
    }
}

/// A script created on first use: scripts live as long as the process.
pub(super) type StaticScript = LazyLock<Script>;

/// One run of a [`Script`]: its keys (the first routes it in a cluster, where all of a
/// script's keys share one slot), then its arguments, encoded as they are added.
pub(super) struct Invocation {
    script: &'static Script,
    args: Args,
    /// How many of `args` are keys: they come first.
    keys: usize,
    /// Where the first key's bytes are in `args`.
    route: Range<usize>,
}

impl Invocation {
    /// Adds a key. Keys precede arguments in the request, so every key is added before the
    /// first argument.
    pub fn key(&mut self, k: &(impl ToArg + ?Sized)) -> &mut Invocation {
        debug_assert_eq!(self.keys, self.args.count, "a key after an argument");
        let at = k.put(&mut self.args);
        if self.keys == 0 {
            self.route = at;
        }
        self.keys += 1;
        self
    }

    pub fn arg(&mut self, a: &(impl ToArg + ?Sized)) -> &mut Invocation {
        let _ = a.put(&mut self.args);
        self
    }

    /// The request by SHA1 (`EVALSHA`), and where its first key is in it.
    fn seal(self) -> Sealed {
        let mut keys = itoa::Buffer::new();
        let keys = keys.format(self.keys).as_bytes();
        let body = self.args.buf.len() - HEADER_ROOM;
        let count = self.args.count;
        let route = self.route;
        let request = self.args.finish(&[b"EVALSHA", &self.script.sha, keys]);
        // The header went in front of the arguments: positions in them move by its length.
        let shift = request.len() - body;
        let at = |p: usize| p + shift - HEADER_ROOM;
        Sealed {
            script: self.script,
            // No key: no route (an empty one, as a keyless request has).
            route: match self.keys {
                0 => 0..0,
                _ => at(route.start)..at(route.end),
            },
            body: shift,
            keys: self.keys,
            count,
            request,
        }
    }

    /// EVALSHA, and on `-NOSCRIPT` (the server does not have the script yet) EVAL with the
    /// source, which also loads it for next time. Routed by the first key.
    pub async fn run(self, up: &Upstream) -> Result<BytesFrame> {
        let sealed = self.seal();
        let reply = up.call(sealed.request.clone(), sealed.route()).await?;
        if !reply.starts_with(b"-NOSCRIPT") {
            return decode(&reply);
        }
        decode(&up.call(sealed.eval(), sealed.route()).await?)
    }

    /// [`run`](Self::run), queued now and answered later, on a client's connection (`lane`,
    /// see [`Upstream::send_own_on`]) if given: when this returns, the script is on its
    /// connection, ahead of anything queued after it there; the returned future awaits the
    /// reply. Sent whole (EVAL) until `loaded` says this store's Valkey answered it by its
    /// SHA1, so a new Valkey runs it in order too; only a server that dropped it since
    /// (`SCRIPT FLUSH`, a restart, another cluster node) answers `-NOSCRIPT`, and then the
    /// EVAL sent after it runs behind whatever was queued meanwhile.
    pub async fn queue(
        self,
        up: Arc<Upstream>,
        lane: Option<(u64, Proto)>,
        loaded: Arc<AtomicBool>,
    ) -> impl std::future::Future<Output = Result<BytesFrame>> + Send + 'static {
        let sealed = self.seal();
        let request = match loaded.load(Ordering::Relaxed) {
            true => sealed.request.clone(),
            false => sealed.eval(),
        };
        let sent = match lane {
            Some(lane) => up.send_own_on(lane, request, sealed.route()).await,
            None => up.send_own(request, sealed.route()).await,
        };
        async move {
            let reply = reply_of(sent).await?;
            // Any reply but NOSCRIPT means the server has it now (an EVAL loads it).
            loaded.store(!reply.starts_with(b"-NOSCRIPT"), Ordering::Relaxed);
            if !reply.starts_with(b"-NOSCRIPT") {
                return decode(&reply);
            }
            let reply = up.call(sealed.eval(), sealed.route()).await?;
            loaded.store(!reply.starts_with(b"-NOSCRIPT"), Ordering::Relaxed);
            decode(&reply)
        }
    }

    /// The EVALSHA request, for a caller that sends it itself (and falls back to [`run`] on
    /// `-NOSCRIPT`).
    ///
    /// [`run`]: Self::run
    pub fn evalsha(self) -> Bytes {
        self.seal().request
    }
}

/// An invocation encoded: the `EVALSHA` request, from which the `EVAL` one is made if the
/// server lacks the script.
struct Sealed {
    script: &'static Script,
    request: Bytes,
    /// Where the keys and arguments start in `request`.
    body: usize,
    keys: usize,
    /// How many keys and arguments.
    count: usize,
    /// Where the first key is in `request`.
    route: Range<usize>,
}

impl Sealed {
    fn route(&self) -> &[u8] {
        &self.request[self.route.clone()]
    }

    /// The same invocation as `EVAL` with the script's source (which also loads it).
    fn eval(&self) -> Bytes {
        let mut keys = itoa::Buffer::new();
        let keys = keys.format(self.keys).as_bytes();
        let body = &self.request[self.body..];
        let header = header(3 + self.count, &[b"EVAL", &self.script.src, keys]);
        let mut out = BytesMut::with_capacity(header.len() + body.len());
        out.put_slice(&header);
        out.put_slice(body);
        out.freeze()
    }
}

/// A reply frame decoded; an error reply is an error of the upstream side, as every failed
/// store operation has always been (the caller fails open).
pub(super) fn decode(raw: &Bytes) -> Result<BytesFrame> {
    match redis_protocol::resp2::decode::decode_bytes(raw) {
        Ok(Some((BytesFrame::Error(e), _))) => Err(Error::upstream(&*e)),
        Ok(Some((frame, _))) => Ok(frame),
        Ok(None) | Err(_) => Err(unexpected("an unreadable frame")),
    }
}

/// A reply of a shape the request cannot produce.
fn unexpected(what: &str) -> Error {
    Error::upstream(format!("unexpected reply from Valkey: {what}"))
}

/// An integer reply.
pub(super) fn int(f: BytesFrame) -> Result<i64> {
    match f {
        BytesFrame::Integer(n) => Ok(n),
        _ => Err(unexpected("not an integer")),
    }
}

/// A string reply, or nil.
pub(super) fn opt_bytes(f: BytesFrame) -> Result<Option<Bytes>> {
    match f {
        BytesFrame::BulkString(b) | BytesFrame::SimpleString(b) => Ok(Some(b)),
        BytesFrame::Null => Ok(None),
        _ => Err(unexpected("not a string")),
    }
}

/// A text reply (versions, table names), or nil.
pub(super) fn opt_string(f: BytesFrame) -> Result<Option<String>> {
    match opt_bytes(f)? {
        Some(b) => text(b).map(Some),
        None => Ok(None),
    }
}

/// Bytes that must be text (names and versions are).
fn text(b: Bytes) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| unexpected("text that is not UTF-8"))
}

/// An array reply (nil counts as empty).
pub(super) fn array(f: BytesFrame) -> Result<Vec<BytesFrame>> {
    match f {
        BytesFrame::Array(items) => Ok(items),
        BytesFrame::Null => Ok(Vec::new()),
        _ => Err(unexpected("not an array")),
    }
}

/// An array of strings (set members).
pub(super) fn strings(f: BytesFrame) -> Result<Vec<String>> {
    array(f)?
        .into_iter()
        .map(|s| opt_string(s)?.ok_or_else(|| unexpected("nil in an array of strings")))
        .collect()
}

/// An array of text, each nil read as "" (MGET of versions: "" for never bumped).
pub(super) fn versions(f: BytesFrame) -> Result<Vec<String>> {
    array(f)?
        .into_iter()
        .map(|v| Ok(opt_string(v)?.unwrap_or_default()))
        .collect()
}

/// A two-integer array, as the invalidation scripts return.
pub(super) fn int_pair(f: BytesFrame) -> Result<(i64, i64)> {
    let mut items = array(f)?.into_iter();
    match (items.next(), items.next(), items.next()) {
        (Some(a), Some(b), None) => Ok((int(a)?, int(b)?)),
        _ => Err(unexpected("not a pair")),
    }
}

/// A field–value array (HGETALL in RESP2), as pairs.
pub(super) fn pairs(f: BytesFrame) -> Result<Vec<(String, Bytes)>> {
    let mut items = array(f)?.into_iter();
    let mut out = Vec::with_capacity(items.len() / 2);
    while let Some(field) = items.next() {
        let value = items
            .next()
            .ok_or_else(|| unexpected("a field without a value"))?;
        let field = opt_string(field)?.ok_or_else(|| unexpected("a nil field"))?;
        let value = opt_bytes(value)?.ok_or_else(|| unexpected("a nil value"))?;
        out.push((field, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_is_named_by_the_sha1_valkey_computes() {
        // `SCRIPT LOAD "return 1"` answers this.
        let s = Script::new("return 1");
        assert_eq!(&s.sha[..], b"e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
    }

    static S2: StaticScript = LazyLock::new(|| Script::new(&"-- padding\n".repeat(20)));

    #[test]
    fn invocations_encode_as_evalsha_then_eval() {
        static S: StaticScript = LazyLock::new(|| Script::new("return 1"));
        let mut inv = S.prepare();
        inv.key("k")
            .key(&String::from("key2"))
            .arg(&7u64)
            .arg(&Bytes::from_static(b""));
        let sealed = inv.seal();
        let args = "$1\r\nk\r\n$4\r\nkey2\r\n$1\r\n7\r\n$0\r\n\r\n";
        assert_eq!(
            std::str::from_utf8(&sealed.request).unwrap(),
            format!("*7\r\n$7\r\nEVALSHA\r\n$40\r\ne0e1f9fabfc9d4800c877a703b823ac0578ff8db\r\n$1\r\n2\r\n{args}")
        );
        assert_eq!(sealed.route(), b"k");
        assert_eq!(
            std::str::from_utf8(&sealed.eval()).unwrap(),
            format!("*7\r\n$4\r\nEVAL\r\n$8\r\nreturn 1\r\n$1\r\n2\r\n{args}")
        );
    }

    /// A header longer than the room kept for it (a command given a long first argument)
    /// is put in front of the arguments all the same.
    #[test]
    fn commands_encode_as_multibulk_whatever_their_length() {
        let long = "x".repeat(300);
        assert_eq!(
            &Cmd::new("GET").arg("k").encode()[..],
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        );
        assert_eq!(&Cmd::new("PING").encode()[..], b"*1\r\n$4\r\nPING\r\n");
        let many: Vec<u64> = (0..12).collect();
        let enc = Cmd::new("MGET").args(&many).arg(&long).encode();
        assert!(enc.starts_with(b"*14\r\n$4\r\nMGET\r\n$1\r\n0\r\n"));
        assert!(enc.ends_with(format!("$300\r\n{long}\r\n").as_bytes()));
        // The lookup script's keys are routed by the first one even when it is long.
        let mut inv = S2.prepare();
        inv.key(&long).arg("a");
        let sealed = inv.seal();
        assert_eq!(sealed.route(), long.as_bytes());
        assert!(sealed
            .eval()
            .ends_with(format!("$300\r\n{long}\r\n$1\r\na\r\n").as_bytes()));
        // A script given no key is routed by none.
        let mut inv = S2.prepare();
        inv.arg("a");
        let sealed = inv.seal();
        assert_eq!(sealed.route(), b"");
        assert!(sealed.request.starts_with(b"*4\r\n$7\r\nEVALSHA\r\n"));
        assert!(sealed.request.ends_with(b"$1\r\n0\r\n$1\r\na\r\n"));
    }

    #[test]
    fn replies_decode_into_the_shapes_the_store_reads() {
        let d = |s: &'static [u8]| decode(&Bytes::from_static(s));
        assert_eq!(int(d(b":3\r\n").unwrap()).unwrap(), 3);
        assert_eq!(opt_bytes(d(b"$-1\r\n").unwrap()).unwrap(), None);
        assert_eq!(
            versions(d(b"*2\r\n$1\r\n5\r\n$-1\r\n").unwrap()).unwrap(),
            vec!["5".to_string(), String::new()]
        );
        assert_eq!(int_pair(d(b"*2\r\n:1\r\n:0\r\n").unwrap()).unwrap(), (1, 0));
        assert_eq!(
            pairs(d(b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n").unwrap()).unwrap(),
            vec![("f".to_string(), Bytes::from_static(b"v"))]
        );
        assert!(pairs(d(b"*1\r\n$1\r\nf\r\n").unwrap()).is_err());
        assert_eq!(
            d(b"-WRONGTYPE Operation against a key\r\n"),
            Err(Error::upstream("WRONGTYPE Operation against a key"))
        );
        assert!(int(d(b"+OK\r\n").unwrap()).is_err());
    }
}
