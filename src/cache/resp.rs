//! How the cache store speaks to Valkey: its requests encoded as RESP and sent through the
//! upstream's shared connections (so reconnects, timeouts, TLS and cluster routing are the
//! pass-through's own), its replies decoded with `redis_protocol` into the few shapes the
//! store reads, and its Lua scripts run by SHA1, sent whole only to a server without them.

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use crate::error::{Error, Result};
use crate::protocol::request::encode_multibulk;
use crate::protocol::Proto;
use crate::upstream::{reply_of, Upstream};

/// Something that can be one argument of a request.
pub(super) trait ToArg {
    fn to_arg(&self) -> Bytes;
}

impl ToArg for str {
    fn to_arg(&self) -> Bytes {
        Bytes::copy_from_slice(self.as_bytes())
    }
}

impl ToArg for String {
    fn to_arg(&self) -> Bytes {
        self.as_str().to_arg()
    }
}

impl ToArg for Bytes {
    /// Shared, not copied: values can be large.
    fn to_arg(&self) -> Bytes {
        self.clone()
    }
}

impl ToArg for u64 {
    fn to_arg(&self) -> Bytes {
        Bytes::copy_from_slice(itoa::Buffer::new().format(*self).as_bytes())
    }
}

impl ToArg for usize {
    fn to_arg(&self) -> Bytes {
        (*self as u64).to_arg()
    }
}

/// One request being built: the command name, then its arguments.
pub(super) struct Cmd(Vec<Bytes>);

impl Cmd {
    pub fn new(name: &'static str) -> Cmd {
        Cmd(vec![Bytes::from_static(name.as_bytes())])
    }

    pub fn arg(mut self, a: &(impl ToArg + ?Sized)) -> Cmd {
        self.0.push(a.to_arg());
        self
    }

    pub fn args<A: ToArg>(mut self, all: &[A]) -> Cmd {
        self.0.extend(all.iter().map(ToArg::to_arg));
        self
    }

    /// The multibulk encoding, as sent.
    pub fn encode(&self) -> Bytes {
        encode_multibulk(&self.0)
    }
}

/// Sends `cmds` about `key` back to back on one connection (see [`Upstream::send_own`]) —
/// one round trip, like a pipeline — and decodes their replies. Any error reply fails the
/// whole batch, as a failed pipeline did.
pub(super) async fn batch(up: &Upstream, key: &str, cmds: &[Cmd]) -> Result<Vec<BytesFrame>> {
    let mut pending = Vec::with_capacity(cmds.len());
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

    /// An invocation to fill with keys and arguments.
    pub fn prepare(&'static self) -> Invocation {
        Invocation {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// A script created on first use: scripts live as long as the process.
pub(super) type StaticScript = LazyLock<Script>;

/// One run of a [`Script`]: its keys (the first routes it in a cluster, where all of a
/// script's keys share one slot), then its arguments.
pub(super) struct Invocation {
    script: &'static Script,
    keys: Vec<Bytes>,
    args: Vec<Bytes>,
}

impl Invocation {
    pub fn key(&mut self, k: &(impl ToArg + ?Sized)) -> &mut Invocation {
        self.keys.push(k.to_arg());
        self
    }

    pub fn arg(&mut self, a: &(impl ToArg + ?Sized)) -> &mut Invocation {
        self.args.push(a.to_arg());
        self
    }

    /// EVALSHA, and on `-NOSCRIPT` (the server does not have the script yet) EVAL with the
    /// source, which also loads it for next time. Routed by the first key.
    pub async fn run(&self, up: &Upstream) -> Result<BytesFrame> {
        let route = self.keys.first().cloned().unwrap_or_default();
        let reply = up
            .call(self.encode("EVALSHA", &self.script.sha), &route)
            .await?;
        if !reply.starts_with(b"-NOSCRIPT") {
            return decode(&reply);
        }
        decode(
            &up.call(self.encode("EVAL", &self.script.src), &route)
                .await?,
        )
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
        let route = self.keys.first().cloned().unwrap_or_default();
        let request = match loaded.load(Ordering::Relaxed) {
            true => self.encode("EVALSHA", &self.script.sha),
            false => self.encode("EVAL", &self.script.src),
        };
        let sent = match lane {
            Some(lane) => up.send_own_on(lane, request, &route).await,
            None => up.send_own(request, &route).await,
        };
        async move {
            let reply = reply_of(sent).await?;
            // Any reply but NOSCRIPT means the server has it now (an EVAL loads it).
            loaded.store(!reply.starts_with(b"-NOSCRIPT"), Ordering::Relaxed);
            if !reply.starts_with(b"-NOSCRIPT") {
                return decode(&reply);
            }
            let reply = up
                .call(self.encode("EVAL", &self.script.src), &route)
                .await?;
            loaded.store(!reply.starts_with(b"-NOSCRIPT"), Ordering::Relaxed);
            decode(&reply)
        }
    }

    /// The EVALSHA request, for a caller that sends it itself (and falls back to [`run`] on
    /// `-NOSCRIPT`).
    ///
    /// [`run`]: Self::run
    pub fn evalsha(&self) -> Bytes {
        self.encode("EVALSHA", &self.script.sha)
    }

    /// `EVALSHA sha` or `EVAL src`, then the keys and arguments.
    fn encode(&self, command: &'static str, script: &Bytes) -> Bytes {
        let mut all = Vec::with_capacity(3 + self.keys.len() + self.args.len());
        all.push(Bytes::from_static(command.as_bytes()));
        all.push(script.clone());
        all.push(self.keys.len().to_arg());
        all.extend(self.keys.iter().cloned());
        all.extend(self.args.iter().cloned());
        encode_multibulk(&all)
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

    #[test]
    fn invocations_encode_as_evalsha_then_eval() {
        static S: StaticScript = LazyLock::new(|| Script::new("return 1"));
        let mut inv = S.prepare();
        inv.key("k").arg(&7u64);
        assert_eq!(
            &inv.encode("EVALSHA", &S.sha)[..],
            &b"*5\r\n$7\r\nEVALSHA\r\n$40\r\ne0e1f9fabfc9d4800c877a703b823ac0578ff8db\r\n$1\r\n1\r\n$1\r\nk\r\n$1\r\n7\r\n"[..]
        );
        assert!(inv
            .encode("EVAL", &S.src)
            .starts_with(b"*5\r\n$4\r\nEVAL\r\n$8\r\nreturn 1\r\n"));
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
