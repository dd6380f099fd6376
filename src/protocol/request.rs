//! Client request parsing with Valkey's rules: multibulk (`*N\r\n$L\r\n…`) and inline commands.
//!
//! Lengths are checked the moment they are declared, and nothing is ever allocated from a
//! declared length: the buffer grows only with bytes actually received. Parsing resumes where it
//! stopped, so a large request arriving in many reads is scanned once, not once per read.

use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;
use std::ops::Range;

/// Valkey's own limits (see `proto-max-bulk-len`, `client-query-buffer-limit`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest inline command or `*`/`$` header line (Valkey: 64 KiB).
    pub max_inline: usize,
    /// Largest bulk argument (Valkey `proto-max-bulk-len`: 512 MB).
    pub max_bulk: usize,
    /// Most arguments in one multibulk request.
    pub max_multibulk: usize,
    /// Most bytes of one client's unparsed input (Valkey `client-query-buffer-limit`: 1 GiB).
    pub max_query_buffer: usize,
    /// Before AUTH (when a password is required): most arguments (Valkey: 10).
    pub unauth_max_multibulk: usize,
    /// Before AUTH: largest bulk argument (Valkey: 16 KiB).
    pub unauth_max_bulk: usize,
    /// Before AUTH: most bytes of unparsed input (Valkey: 1 MiB).
    pub unauth_max_query_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_inline: 64 * 1024,
            max_bulk: 512 * 1024 * 1024,
            max_multibulk: 1024 * 1024,
            max_query_buffer: 1024 * 1024 * 1024,
            unauth_max_multibulk: 10,
            unauth_max_bulk: 16 * 1024,
            unauth_max_query_buffer: 1024 * 1024,
        }
    }
}

/// A malformed request. The text is what follows `Protocol error: ` exactly as Valkey words
/// it (bytes, because Valkey quotes the offending byte as it is; the reply is made by
/// `error::protocol_error`); the connection is closed after replying, as Valkey does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {}", String::from_utf8_lossy(.0))]
pub struct ProtocolError(pub Vec<u8>);

fn perr(msg: impl Into<Vec<u8>>) -> ProtocolError {
    ProtocolError(msg.into())
}

/// One complete client command.
#[derive(Debug, Clone)]
pub struct Request {
    /// The command's multibulk encoding: the client's own bytes when it sent multibulk, so a
    /// pass-through command is forwarded without copying.
    pub raw: Bytes,
    /// The arguments, each a slice of `raw` (or of the inline line).
    pub args: Vec<Bytes>,
}

impl Request {
    /// Builds a request from arguments, encoding it as multibulk.
    pub fn from_args<I, A>(args: I) -> Request
    where
        I: IntoIterator<Item = A>,
        A: AsRef<[u8]>,
    {
        let args: Vec<Bytes> = args
            .into_iter()
            .map(|a| Bytes::copy_from_slice(a.as_ref()))
            .collect();
        let raw = encode_multibulk(&args);
        Request { raw, args }
    }

    /// The command name, as sent.
    pub fn name(&self) -> &[u8] {
        self.args.first().map(|a| a.as_ref()).unwrap_or_default()
    }

    /// The name lowercased, for error messages in Valkey's style.
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(self.name()).to_string()
    }
}

/// Encodes arguments as a RESP multibulk request.
pub fn encode_multibulk(args: &[Bytes]) -> Bytes {
    let len: usize = args.iter().map(|a| a.len() + 16).sum::<usize>() + 16;
    let mut out = BytesMut::with_capacity(len);
    out.extend_from_slice(b"*");
    out.extend_from_slice(itoa::Buffer::new().format(args.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.extend_from_slice(b"$");
        out.extend_from_slice(itoa::Buffer::new().format(a.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out.freeze()
}

/// Where a partially received multibulk request stopped. Kept in the parser between
/// requests (not made and moved per request): parsing the next one only resets it.
#[derive(Debug, Default)]
struct Partial {
    /// Declared argument count; 0: no multibulk request under way.
    argc: usize,
    /// Offset in the buffer of the next unparsed byte.
    pos: usize,
    /// Arguments parsed so far, as ranges into the buffer: inline for the few arguments most
    /// commands have, so parsing one allocates only its argument list.
    args: SmallVec<[Range<usize>; INLINE_ARGS]>,
}

/// Arguments a request's ranges hold without a heap allocation while it is parsed.
const INLINE_ARGS: usize = 8;

/// Incremental request parser for one connection.
#[derive(Debug, Default)]
pub struct RequestParser {
    partial: Partial,
}

/// The outcome of one parse attempt.
pub enum Parsed {
    /// A complete command.
    Request(Request),
    /// More bytes are needed.
    Incomplete,
}

impl RequestParser {
    /// Parses the next complete command from the front of `buf`, consuming its bytes.
    /// `authed` selects the pre-authentication limits when false.
    pub fn parse(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
        authed: bool,
    ) -> Result<Parsed, ProtocolError> {
        let max_buffer = if authed {
            limits.max_query_buffer
        } else {
            limits.unauth_max_query_buffer
        };
        loop {
            if buf.is_empty() {
                return Ok(Parsed::Incomplete);
            }
            let result = if self.partial.argc > 0 || buf[0] == b'*' {
                // A malformed request ends the connection: nothing of it is kept.
                self.parse_multibulk(buf, limits, authed)
                    .inspect_err(|_| self.partial.argc = 0)?
            } else {
                parse_inline(buf, limits)?
            };
            match result {
                Step::Done(req) => return Ok(Parsed::Request(req)),
                Step::Skip => continue,
                Step::Incomplete => {
                    if buf.len() > max_buffer {
                        return Err(perr("query buffer limit exceeded"));
                    }
                    return Ok(Parsed::Incomplete);
                }
            }
        }
    }

    fn parse_multibulk(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
        authed: bool,
    ) -> Result<Step, ProtocolError> {
        let st = &mut self.partial;
        if st.argc == 0 {
            let Some((n, next)) = length_line(buf, 0, LengthOf::Multibulk, limits)? else {
                return Ok(Step::Incomplete);
            };
            if n > limits.max_multibulk as i64 {
                return Err(perr("invalid multibulk length"));
            }
            if !authed && n > limits.unauth_max_multibulk as i64 {
                return Err(perr("unauthenticated multibulk length"));
            }
            if n <= 0 {
                // `*0` and `*-1` are empty requests: Valkey skips them silently.
                buf.advance(next);
                return Ok(Step::Skip);
            }
            st.argc = n as usize;
            st.pos = next;
            st.args.clear();
            st.args.reserve(st.argc.min(1024));
        }
        while st.args.len() < st.argc {
            let Some(&head) = buf.get(st.pos) else {
                return Ok(Step::Incomplete);
            };
            if head != b'$' {
                let mut msg = b"expected '$', got '".to_vec();
                msg.push(head);
                msg.push(b'\'');
                return Err(perr(msg));
            }
            let Some((len, next)) = length_line(buf, st.pos, LengthOf::Bulk, limits)? else {
                return Ok(Step::Incomplete);
            };
            if len < 0 || len as u64 > limits.max_bulk as u64 {
                return Err(LengthOf::Bulk.invalid());
            }
            let len = len as usize;
            if !authed && len > limits.unauth_max_bulk {
                return Err(perr("unauthenticated bulk length"));
            }
            let end = next + len;
            if buf.len() < end + 2 {
                return Ok(Step::Incomplete);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(perr("invalid CRLF in request"));
            }
            st.args.push(next..end);
            st.pos = end + 2;
        }
        let raw = buf.split_to(st.pos).freeze();
        let mut args = Vec::with_capacity(st.argc);
        for r in st.args.drain(..) {
            args.push(raw.slice(r));
        }
        st.argc = 0;
        if st.args.spilled() {
            // A request of many arguments does not leave its list's memory with the client.
            st.args = SmallVec::new();
        }
        Ok(Step::Done(Request { raw, args }))
    }
}

enum Step {
    Done(Request),
    Skip,
    Incomplete,
}

/// Which header line [`length_line`] reads: it words the errors.
#[derive(Clone, Copy)]
enum LengthOf {
    /// `*<count>`.
    Multibulk,
    /// `$<length>`.
    Bulk,
}

impl LengthOf {
    fn invalid(self) -> ProtocolError {
        match self {
            LengthOf::Multibulk => perr("invalid multibulk length"),
            LengthOf::Bulk => perr("invalid bulk length"),
        }
    }

    fn too_big(self) -> ProtocolError {
        match self {
            LengthOf::Multibulk => perr("too big mbulk count string"),
            LengthOf::Bulk => perr("too big bulk count string"),
        }
    }
}

/// Reads the header line at `start` (`*` or `$`, then a number): the number and where the
/// next line starts, `None` if more bytes are needed. The usual form — digits without a
/// leading zero, then CRLF — is read in one pass; anything else is read the exact way
/// (`line_at`, `parse_len`), which words every error as Valkey does. A bad number before a
/// bad CRLF is reported as such, as Valkey does.
fn length_line(
    buf: &[u8],
    start: usize,
    of: LengthOf,
    limits: &Limits,
) -> Result<Option<(i64, usize)>, ProtocolError> {
    if let Some(plain) = plain_length(buf, start) {
        return Ok(Some(plain));
    }
    let line =
        line_at(buf, start).map_err(|e| match buf[start..].iter().position(|&b| b == b'\r') {
            Some(cr) if parse_len(&buf[start + 1..start + cr]).is_none() => of.invalid(),
            _ => e,
        })?;
    let Some((cr, next)) = line else {
        if buf.len() - start > limits.max_inline {
            return Err(of.too_big());
        }
        return Ok(None);
    };
    let n = parse_len(&buf[start + 1..cr]).ok_or_else(|| of.invalid())?;
    Ok(Some((n, next)))
}

/// The number on the header line at `start` in its usual form (see [`length_line`]), with
/// where the next line starts; `None` for any other form, or a line not all here yet.
/// At most 18 digits, so the value fits an `i64` without checks.
fn plain_length(buf: &[u8], start: usize) -> Option<(i64, usize)> {
    let digits = buf.get(start + 1..)?;
    let mut n: i64 = 0;
    for (i, &b) in digits.iter().enumerate() {
        match b {
            // A leading zero is only "0" itself.
            b'0'..=b'9' if i < 18 && (i == 0 || n > 0) => n = n * 10 + i64::from(b - b'0'),
            b'\r' if i > 0 && digits.get(i + 1) == Some(&b'\n') => {
                return Some((n, start + 1 + i + 2))
            }
            _ => return None,
        }
    }
    None
}

/// Finds the header line starting at `start` as Valkey does: up to the first `\r`, which
/// must be followed by `\n`. Returns (index of `\r`, index after `\n`), `None` if more bytes
/// are needed.
fn line_at(buf: &[u8], start: usize) -> Result<Option<(usize, usize)>, ProtocolError> {
    let Some(rel) = buf[start..].iter().position(|&b| b == b'\r') else {
        return Ok(None);
    };
    let cr = start + rel;
    match buf.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((cr, cr + 2))),
        Some(_) => Err(perr("invalid CRLF in request")),
    }
}

/// Parses a length the way Valkey's `string2ll` does: optional `-`, digits, no leading zeros,
/// no spaces or `+`, within i64.
pub fn parse_len(s: &[u8]) -> Option<i64> {
    parse_i64_strict(s)
}

/// Valkey-strict integer parsing, shared by argument parsing (`EX 10`, `SELECT 1`, ids).
pub fn parse_i64_strict(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = match s[0] {
        b'-' => (true, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || digits[0] == b'0' || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        let d = (d - b'0') as i64;
        v = if neg {
            v.checked_mul(10)?.checked_sub(d)?
        } else {
            v.checked_mul(10)?.checked_add(d)?
        };
    }
    Some(v)
}

/// Parses one inline command (a line of space-separated, optionally quoted words).
fn parse_inline(buf: &mut BytesMut, limits: &Limits) -> Result<Step, ProtocolError> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > limits.max_inline {
            return Err(perr("too big inline request"));
        }
        return Ok(Step::Incomplete);
    };
    if nl > limits.max_inline {
        return Err(perr("too big inline request"));
    }
    let line = buf.split_to(nl + 1);
    let mut text = &line[..nl];
    if text.last() == Some(&b'\r') {
        text = &text[..text.len() - 1];
    }
    let words = split_args(text).ok_or_else(|| perr("unbalanced quotes in request"))?;
    if words.is_empty() {
        return Ok(Step::Skip);
    }
    let args: Vec<Bytes> = words.into_iter().map(Bytes::from).collect();
    let raw = encode_multibulk(&args);
    Ok(Step::Done(Request { raw, args }))
}

/// Splits an inline line into words like Valkey's `sdssplitargs`: words separated by
/// whitespace; inside a word, `"…"` sections take C escapes (`\n \r \t \b \a \\ \" \xHH`)
/// and `'…'` sections only `\'`, and quoted and unquoted pieces join into one word
/// (`"a"b'c'` is `abc`, as in Valkey 9). `None` means unbalanced quotes.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && (line[i].is_ascii_whitespace() || line[i] == 0) {
            i += 1;
        }
        if i >= line.len() {
            return Some(out);
        }
        let mut word = Vec::new();
        while i < line.len() && !(line[i].is_ascii_whitespace() || line[i] == 0) {
            match line[i] {
                b'"' => i = double_quoted(line, i + 1, &mut word)?,
                b'\'' => i = single_quoted(line, i + 1, &mut word)?,
                c => {
                    word.push(c);
                    i += 1;
                }
            }
        }
        out.push(word);
    }
}

/// Reads a `"…"` section starting after the quote; returns the index after the closing quote.
fn double_quoted(line: &[u8], mut i: usize, word: &mut Vec<u8>) -> Option<usize> {
    loop {
        let c = *line.get(i)?;
        if c == b'"' {
            return Some(i + 1);
        }
        if c == b'\\' && i + 3 < line.len() && line[i + 1] == b'x' {
            if let (Some(h), Some(l)) = (hex_val(line[i + 2]), hex_val(line[i + 3])) {
                word.push(h * 16 + l);
                i += 4;
                continue;
            }
        }
        if c == b'\\' && i + 1 < line.len() {
            word.push(match line[i + 1] {
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'b' => 8,
                b'a' => 7,
                other => other,
            });
            i += 2;
        } else {
            word.push(c);
            i += 1;
        }
    }
}

/// Reads a `'…'` section starting after the quote; returns the index after the closing quote.
fn single_quoted(line: &[u8], mut i: usize, word: &mut Vec<u8>) -> Option<usize> {
    loop {
        let c = *line.get(i)?;
        if c == b'\\' && line.get(i + 1) == Some(&b'\'') {
            word.push(b'\'');
            i += 2;
        } else if c == b'\'' {
            return Some(i + 1);
        } else {
            word.push(c);
            i += 1;
        }
    }
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut p = RequestParser::default();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Parsed::Request(r) = p.parse(&mut buf, &Limits::default(), true)? {
            out.push(r.args.iter().map(|a| a.to_vec()).collect());
        }
        Ok(out)
    }

    #[test]
    fn multibulk_and_pipelines() {
        let got = parse_all(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\na\r\n").unwrap();
        assert_eq!(
            got,
            vec![vec![b"PING".to_vec()], vec![b"GET".to_vec(), b"a".to_vec()]]
        );
    }

    #[test]
    fn byte_at_a_time_resumes() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\nPING\r\n";
        let mut p = RequestParser::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &b in input.iter() {
            buf.extend_from_slice(&[b]);
            while let Parsed::Request(r) = p.parse(&mut buf, &Limits::default(), true).unwrap() {
                got.push(r.args.len());
                if r.args.len() == 3 {
                    assert_eq!(&r.raw[..], &input[..input.len() - 6]);
                }
            }
        }
        assert_eq!(got, vec![3, 1]);
    }

    #[test]
    fn inline_quotes_like_valkey() {
        let got = parse_all(b"SET k \"a b\\x41\\n\" 'it\\'s'\r\n\r\n  \n").unwrap();
        assert_eq!(
            got,
            vec![vec![
                b"SET".to_vec(),
                b"k".to_vec(),
                b"a bA\n".to_vec(),
                b"it's".to_vec()
            ]]
        );
        assert_eq!(
            parse_all(b"SET \"a\r\n").unwrap_err().0,
            b"unbalanced quotes in request"
        );
        // Valkey 9 joins quoted and unquoted pieces of a word.
        assert_eq!(
            parse_all(b"set \"\"\"tes\"t-'k'e\"y\" 'a'\"b\"c\r\n").unwrap(),
            vec![vec![b"set".to_vec(), b"test-key".to_vec(), b"abc".to_vec()]]
        );
    }

    #[test]
    fn valkey_error_texts() {
        let e = |b: &[u8]| String::from_utf8_lossy(&parse_all(b).unwrap_err().0).into_owned();
        assert_eq!(e(b"*x\r\n"), "invalid multibulk length");
        assert_eq!(e(b"*1\r\n+PING\r\n"), "expected '$', got '+'");
        assert_eq!(e(b"*1\r\n$-5\r\n"), "invalid bulk length");
        assert_eq!(e(b"*1\r\n$99999999999\r\n"), "invalid bulk length");
        assert_eq!(e(b"*99999999\r\n"), "invalid multibulk length");
        assert_eq!(e(b"*1\r\n$1\r\nab\r\n"), "invalid CRLF in request");
        assert_eq!(e(b"*3\rx$3\r\n"), "invalid CRLF in request");
        assert_eq!(e(b"*3x\n$3\r\nSET\r\n"), "invalid multibulk length");
        assert_eq!(e(b"*1\r\n$3x\nfoo\r\n"), "invalid bulk length");
        assert_eq!(e(b"*1\r\n$3\rxfoo\r\n"), "invalid CRLF in request");
        assert_eq!(e(b"*1\r\n\r\n"), "expected '$', got '\r'");
        let long = vec![b'a'; 70 * 1024];
        assert_eq!(e(&long), "too big inline request");
        let mut mb = b"*".to_vec();
        mb.extend(vec![b'1'; 70 * 1024]);
        assert_eq!(e(&mb), "too big mbulk count string");
    }

    #[test]
    fn declared_lengths_allocate_nothing() {
        // 500 MB declared, 10 bytes sent: the parser waits without reserving anything.
        let mut p = RequestParser::default();
        let mut buf = BytesMut::from(&b"*1\r\n$500000000\r\nabcdefghij"[..]);
        assert!(matches!(
            p.parse(&mut buf, &Limits::default(), true).unwrap(),
            Parsed::Incomplete
        ));
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn unauthenticated_limits() {
        let mut p = RequestParser::default();
        let mut buf = BytesMut::from(&b"*11\r\n"[..]);
        let e = p.parse(&mut buf, &Limits::default(), false).err().unwrap();
        assert_eq!(e.0, b"unauthenticated multibulk length");
        let mut p = RequestParser::default();
        let mut buf = BytesMut::from(&b"*1\r\n$20000\r\n"[..]);
        let e = p.parse(&mut buf, &Limits::default(), false).err().unwrap();
        assert_eq!(e.0, b"unauthenticated bulk length");
    }

    /// Every header line of up to five bytes from an alphabet of digits, signs, spaces and
    /// line ends, and long runs of digits: where the one-pass reading takes a line, it reads
    /// what the exact reading does.
    #[test]
    fn the_quick_length_reading_agrees_with_the_exact_one() {
        const ALPHABET: &[u8] = b"0123456789-+ \r\nx";
        let mut lines: Vec<Vec<u8>> = Vec::new();
        let mut frontier = vec![Vec::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for l in &frontier {
                for &c in ALPHABET {
                    let mut l = l.clone();
                    l.push(c);
                    next.push(l);
                }
            }
            lines.extend(next.iter().cloned());
            frontier = next;
        }
        for n in 15..=21 {
            lines.push([&b"9".repeat(n)[..], b"\r\n"].concat());
            lines.push([&b"1"[..], &b"0".repeat(n - 1), b"\r\n"].concat());
        }
        let mut taken = 0;
        for l in &lines {
            let buf = [&b"$"[..], l].concat();
            let Some((n, next)) = plain_length(&buf, 0) else {
                continue;
            };
            taken += 1;
            let (cr, exact_next) = line_at(&buf, 0).unwrap().unwrap();
            assert_eq!(
                parse_len(&buf[1..cr]),
                Some(n),
                "{:?}",
                String::from_utf8_lossy(&buf)
            );
            assert_eq!(next, exact_next);
        }
        assert!(
            taken > 1000,
            "the usual form is read the quick way ({taken})"
        );
    }

    #[test]
    fn strict_integers() {
        assert_eq!(parse_i64_strict(b"0"), Some(0));
        assert_eq!(parse_i64_strict(b"-12"), Some(-12));
        assert_eq!(parse_i64_strict(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64_strict(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b"01"[..],
            b"+1",
            b" 1",
            b"1 ",
            b"",
            b"-",
            b"-0",
            b"9223372036854775808",
            b"1.0",
        ] {
            assert_eq!(parse_i64_strict(bad), None, "{:?}", bad);
        }
    }
}
