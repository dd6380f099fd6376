//! Properties shared by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) and the seeded run
//! that CI executes as an ordinary test (`tests/fuzz_seeded.rs`). Each function takes raw
//! fuzzer bytes and panics if a property does not hold.
//!
//! - [`request_parser`]: `RequestParser::parse` never panics, never consumes more than it was
//!   given, respects its limits, gives the same requests whatever the read chunking, and every
//!   request's `raw` re-parses to the same arguments.
//! - [`frame_scanner`]: `FrameScanner::scan` resumed byte by byte (or in any chunking) agrees
//!   with one scan of the whole buffer, and with redis-protocol's decoders where both accept.
//! - [`sql_check`]: `check_read_only` (and `placeholders`) never panic and are deterministic.
#![allow(dead_code)]

use bytes::BytesMut;
use cachefront::db::sql::{check_read_only, placeholders};
use cachefront::protocol::request::Parsed;
use cachefront::protocol::{FrameScanner, Limits, RequestParser};

/// A tiny deterministic PRNG (xorshift64*), so chunkings derive from the input alone.
#[derive(Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// Request parser
// ---------------------------------------------------------------------------------------------

const QUERY_BUFFER_LIMIT: &str = "query buffer limit exceeded";

/// What one connection's worth of parsing produced.
#[derive(Debug)]
struct Outcome {
    requests: Vec<Vec<Vec<u8>>>,
    error: Option<String>,
    /// Bytes of the input consumed (parsed or skipped) when parsing stopped.
    consumed: usize,
}

/// Limits from the first config byte: the defaults, or small ones so that every limit is hit.
/// `max_inline` stays above the longest valid header line (`*-9223372036854775808\r\n`, 23
/// bytes): below that, whether a header trips the limit depends on how it was split into
/// reads, in Valkey too.
fn limits_from(cfg: &[u8; 3]) -> Limits {
    if cfg[0] & 2 == 0 {
        return Limits::default();
    }
    let a = cfg[1] as usize;
    let b = cfg[2] as usize;
    Limits {
        max_inline: 23 + a % 64,
        max_bulk: b % 48,
        max_multibulk: 1 + a % 8,
        max_query_buffer: 8 + b * 2,
        unauth_max_multibulk: 1 + b % 4,
        unauth_max_bulk: a % 16,
        unauth_max_query_buffer: 8 + a,
    }
}

/// Input layout: 3 config bytes (bit 0 of byte 0: authenticated; bit 1: small limits; bytes
/// 1–2: limit sizes and the chunking seed), then the bytes a client sends.
pub fn request_parser(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let cfg = [data[0], data[1], data[2]];
    let input = &data[3..];
    let authed = cfg[0] & 1 == 1;
    let limits = limits_from(&cfg);

    let whole = parse_in_chunks(input, &limits, authed, &mut |_| usize::MAX);
    let mut rng = XorShift::new(u64::from(cfg[1]) << 8 | u64::from(cfg[2]));
    let max_chunk = 1 + (cfg[0] as usize >> 2);
    let chunked = parse_in_chunks(input, &limits, authed, &mut |_| 1 + rng.below(max_chunk));
    let bytewise = parse_in_chunks(input, &limits, authed, &mut |_| 1);
    agree(input, &whole, &chunked);
    agree(input, &whole, &bytewise);
}

/// Feeds `input` to one parser in chunks of `next_chunk()` bytes, parsing after each read as
/// the connection does, and checks every request against the per-request properties.
fn parse_in_chunks(
    input: &[u8],
    limits: &Limits,
    authed: bool,
    next_chunk: &mut dyn FnMut(usize) -> usize,
) -> Outcome {
    let mut parser = RequestParser::default();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut out = Outcome {
        requests: Vec::new(),
        error: None,
        consumed: 0,
    };
    while fed < input.len() {
        let n = next_chunk(fed).clamp(1, input.len() - fed);
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        loop {
            let before = fed - buf.len();
            match parser.parse(&mut buf, limits, authed) {
                Ok(Parsed::Request(req)) => {
                    assert!(buf.len() <= fed, "parser grew the buffer");
                    let after = fed - buf.len();
                    assert!(after > before, "a request consumed no bytes");
                    check_request(&input[before..after], &req, limits, authed);
                    out.requests
                        .push(req.args.iter().map(|a| a.to_vec()).collect());
                }
                Ok(Parsed::Incomplete) => {
                    assert!(buf.len() <= fed, "parser grew the buffer");
                    break;
                }
                Err(e) => {
                    out.error = Some(e.to_string());
                    out.consumed = fed - buf.len();
                    return out;
                }
            }
        }
    }
    out.consumed = fed - buf.len();
    out
}

/// Properties of one parsed request; `seg` is the input it consumed (with any skipped empty
/// requests before it).
fn check_request(seg: &[u8], req: &cachefront::protocol::Request, limits: &Limits, authed: bool) {
    assert!(!req.args.is_empty(), "a request without arguments");
    // Multibulk requests are forwarded as the client's own bytes; inline ones are re-encoded
    // from one line.
    let multibulk = seg.ends_with(&req.raw);
    assert!(
        multibulk || seg.ends_with(b"\n"),
        "raw {:?} is neither the client's bytes nor an inline line {:?}",
        req.raw,
        seg
    );
    let (max_args, max_bulk) = if authed {
        (limits.max_multibulk, limits.max_bulk)
    } else {
        (limits.unauth_max_multibulk, limits.unauth_max_bulk)
    };
    if multibulk {
        assert!(req.args.len() <= max_args, "more arguments than the limit");
        for a in &req.args {
            assert!(a.len() <= max_bulk, "a bulk over the limit");
        }
    } else {
        for a in &req.args {
            assert!(
                a.len() <= limits.max_inline,
                "an inline word over the line limit"
            );
        }
    }
    // `raw` re-parses, alone and completely, to the same arguments.
    let mut again = BytesMut::from(&req.raw[..]);
    let mut p = RequestParser::default();
    match p.parse(&mut again, &Limits::default(), true) {
        Ok(Parsed::Request(r)) => {
            assert_eq!(r.args, req.args, "raw re-parses to other arguments");
            assert!(again.is_empty(), "raw holds more than one request");
        }
        Ok(Parsed::Incomplete) => panic!("raw {:?} is incomplete", req.raw),
        Err(e) => panic!("raw {:?} does not re-parse: {e}", req.raw),
    }
}

/// Two chunkings of the same input must give the same requests. The one legitimate difference:
/// a request that is complete in one big read can exceed the query-buffer limit while it
/// trickles in (Valkey behaves the same way).
fn agree(input: &[u8], a: &Outcome, b: &Outcome) {
    let qbl = |o: &Outcome| {
        o.error
            .as_deref()
            .is_some_and(|e| e.ends_with(QUERY_BUFFER_LIMIT))
    };
    if qbl(a) || qbl(b) {
        let n = a.requests.len().min(b.requests.len());
        assert_eq!(a.requests[..n], b.requests[..n], "input {input:?}");
        return;
    }
    assert_eq!(
        a.requests, b.requests,
        "chunking changed the requests of {input:?}"
    );
    assert_eq!(
        a.error.is_some(),
        b.error.is_some(),
        "chunking changed whether {input:?} is an error: {:?} vs {:?}",
        a.error,
        b.error
    );
    if a.error.is_none() {
        assert_eq!(a.consumed, b.consumed, "input {input:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Frame scanner
// ---------------------------------------------------------------------------------------------

/// Input layout: the bytes Valkey sends (several frames back to back, possibly garbage).
pub fn frame_scanner(data: &[u8]) {
    let mut rest = data;
    let mut rng = XorShift::new(data.len() as u64);
    // At most 64 frames: each is checked against the whole remaining buffer.
    for _ in 0..64 {
        let whole = FrameScanner::default().scan(rest);
        // Byte by byte, one resumable scanner.
        let bytewise = scan_growing(rest, &mut |_| 1);
        assert_eq!(whole, bytewise, "byte-by-byte scan of {rest:?}");
        // Random chunking.
        let chunked = scan_growing(rest, &mut |_| 1 + rng.below(32));
        assert_eq!(whole, chunked, "chunked scan of {rest:?}");
        oracle(rest, &whole);
        match whole {
            Ok(Some(n)) => {
                assert!(n > 0 && n <= rest.len(), "frame length {n} out of range");
                // The frame alone is exactly one frame.
                assert_eq!(FrameScanner::default().scan(&rest[..n]), Ok(Some(n)));
                rest = &rest[n..];
                if rest.is_empty() {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// Scans `buf` as it would arrive in chunks, resuming one scanner; the first non-`None` answer.
fn scan_growing(
    buf: &[u8],
    next_chunk: &mut dyn FnMut(usize) -> usize,
) -> Result<Option<usize>, cachefront::protocol::ScanError> {
    let mut s = FrameScanner::default();
    let mut end = 0;
    loop {
        match s.scan(&buf[..end])? {
            Some(n) => {
                assert!(n <= end, "frame ends past the bytes scanned");
                return Ok(Some(n));
            }
            None if end == buf.len() => return Ok(None),
            None => end = (end + next_chunk(end)).min(buf.len()),
        }
    }
}

/// redis-protocol as an oracle: where it and the scanner both accept, they agree on where the
/// frame ends (RESP3 for everything, RESP2 for RESP2-only input).
fn oracle(buf: &[u8], ours: &Result<Option<usize>, cachefront::protocol::ScanError>) {
    // redis-protocol knows streamed RESP3 types (`$?`, `*?`, `;`, `.`), which Valkey never
    // sends and the scanner rightly refuses; the oracle says nothing about those.
    if buf
        .windows(2)
        .any(|w| w[1] == b'?' && b"$*~%|!=>".contains(&w[0]))
        || buf.first().is_some_and(|b| b";.".contains(b))
    {
        return;
    }
    let r3 = redis_protocol::resp3::decode::complete::decode(buf);
    compare(buf, ours, r3.map(|o| o.map(|(_, n)| n)).ok(), "resp3");
    if buf.first().is_some_and(|b| b"+-:$*".contains(b)) {
        let r2 = redis_protocol::resp2::decode::decode(buf);
        compare(buf, ours, r2.map(|o| o.map(|(_, n)| n)).ok(), "resp2");
    }
}

fn compare(
    buf: &[u8],
    ours: &Result<Option<usize>, cachefront::protocol::ScanError>,
    theirs: Option<Option<usize>>,
    which: &str,
) {
    match (ours, theirs) {
        // Either side refused: the oracle is stricter about contents (bools, doubles,
        // verbatim formats) and the scanner about lengths; nothing to compare.
        (Err(_), _) | (_, None) => {}
        (Ok(a), Some(b)) => assert_eq!(*a, b, "{which} oracle disagrees on {buf:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// SQL check
// ---------------------------------------------------------------------------------------------

/// Input layout: the SQL text (non-UTF-8 input is skipped, as SQL.CACHED refuses it first).
pub fn sql_check(data: &[u8]) {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let first = check_read_only(sql);
    assert_eq!(
        first,
        check_read_only(sql),
        "check_read_only is not deterministic"
    );
    let _ = placeholders(sql);
}
