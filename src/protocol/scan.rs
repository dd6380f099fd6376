//! Finds where a RESP2/RESP3 frame from Valkey ends, without decoding or allocating.
//!
//! An aggregate of `n` elements just adds `n` to the number of frames still owed, so one
//! counter is the whole parse state and a scan can resume where the previous read stopped —
//! a 100 MB reply arriving in 64 KiB pieces is scanned once, not 1,600 times.

/// A frame Valkey would never send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed reply from upstream: {0}")]
pub struct ScanError(pub &'static str);

/// More elements than any real reply can have (Valkey caps aggregates far lower); beyond
/// this the "frame" is garbage, and the count cannot overflow.
const MAX_OWED: u64 = 1 << 40;

/// Resumable scanner for one frame at a time.
#[derive(Debug, Default, Clone)]
pub struct FrameScanner {
    /// Bytes of the current frame already scanned.
    pos: usize,
    /// Frames (or nested elements) still to be read; 0 when idle.
    owed: u64,
}

impl FrameScanner {
    /// Returns the length of the complete frame at the start of `buf`, or `None` if more bytes
    /// are needed (call again with the same buffer, grown). `buf` must start where the previous
    /// complete frame ended.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, ScanError> {
        if self.owed == 0 {
            self.pos = 0;
            self.owed = 1;
        }
        while self.owed > 0 {
            let start = self.pos;
            let (kind, n, next) = match counted_line(buf, start) {
                Some(line) => line,
                None => {
                    let Some(rel) = find_crlf(&buf[start..]) else {
                        return Ok(None);
                    };
                    let line_end = start + rel;
                    if line_end == start {
                        return Err(ScanError("empty line"));
                    }
                    let kind = buf[start];
                    let n = match is_counted(kind) {
                        true => parse_signed(&buf[start + 1..line_end]),
                        false => None,
                    };
                    (kind, n, line_end + 2)
                }
            };
            match kind {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
                    self.pos = next;
                    self.owed -= 1;
                }
                b'$' | b'!' | b'=' => {
                    let n = n.ok_or(ScanError("bad blob length"))?;
                    if n < 0 {
                        if n != -1 || kind != b'$' {
                            return Err(ScanError("bad blob length"));
                        }
                        self.pos = next;
                    } else {
                        let end = next + n as usize + 2;
                        if buf.len() < end {
                            return Ok(None);
                        }
                        if &buf[end - 2..end] != b"\r\n" {
                            return Err(ScanError("blob not terminated by CRLF"));
                        }
                        self.pos = end;
                    }
                    self.owed -= 1;
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let n = n.ok_or(ScanError("bad aggregate length"))?;
                    self.pos = next;
                    self.owed -= 1;
                    if n < 0 {
                        if n != -1 || kind != b'*' {
                            return Err(ScanError("bad aggregate length"));
                        }
                    } else {
                        let n = n as u64;
                        let more = match kind {
                            b'%' => n.checked_mul(2),
                            // An attribute map is followed by the frame it annotates.
                            b'|' => n.checked_mul(2).and_then(|m| m.checked_add(1)),
                            _ => Some(n),
                        };
                        self.owed = more
                            .and_then(|m| self.owed.checked_add(m))
                            .filter(|&o| o <= MAX_OWED)
                            .ok_or(ScanError("aggregate too large"))?;
                    }
                }
                _ => return Err(ScanError("unknown frame type")),
            }
        }
        Ok(Some(self.pos))
    }
}

/// Whether a line of this kind carries a number: a blob's length or an aggregate's count.
fn is_counted(kind: u8) -> bool {
    matches!(kind, b'$' | b'!' | b'=' | b'*' | b'~' | b'>' | b'%' | b'|')
}

/// A counted line at `start` in its usual form — the kind, an optional `-`, 1 to 18 digits,
/// CRLF — read in one pass: its kind, its number and where the next line starts. Nearly
/// every line Valkey sends is a length or a count, so this spares most lines the search for
/// their end and a second pass over their digits. `None` for any other line, or one not all
/// here yet: the exact path decides (and words any error).
fn counted_line(buf: &[u8], start: usize) -> Option<(u8, Option<i64>, usize)> {
    let kind = *buf.get(start)?;
    if !is_counted(kind) {
        return None;
    }
    let mut i = start + 1;
    let negative = buf.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let first = i;
    let mut n: i64 = 0;
    loop {
        match *buf.get(i)? {
            b @ b'0'..=b'9' if i - first < 18 => n = n * 10 + i64::from(b - b'0'),
            b'\r' if i > first && buf.get(i + 1) == Some(&b'\n') => {
                return Some((kind, Some(if negative { -n } else { n }), i + 2));
            }
            _ => return None,
        }
        i += 1;
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    loop {
        let i = from + buf[from..].iter().position(|&b| b == b'\n')?;
        if i > 0 && buf[i - 1] == b'\r' {
            return Some(i - 1);
        }
        from = i + 1;
    }
}

fn parse_signed(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.first()? {
        b'-' => (true, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = digits.iter().fold(0i64, |v, d| v * 10 + (d - b'0') as i64);
    Some(if neg { -v } else { v })
}

/// The first byte of the frame after any attributes: what kind of reply it is.
pub fn frame_kind(frame: &[u8]) -> u8 {
    frame.first().copied().unwrap_or(0)
}

/// The elements of a complete array frame (`*N`), each a complete frame of its own; `None`
/// for anything else (a nil array, an error, a truncated frame).
pub fn array_elements(frame: &[u8]) -> Option<Vec<&[u8]>> {
    let header = find_crlf(frame)?;
    if frame.first() != Some(&b'*') {
        return None;
    }
    let count = usize::try_from(parse_signed(&frame[1..header])?).ok()?;
    let mut rest = &frame[header + 2..];
    let mut items = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let len = FrameScanner::default().scan(rest).ok()??;
        items.push(&rest[..len]);
        rest = &rest[len..];
    }
    Some(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(buf: &[u8]) -> Option<usize> {
        FrameScanner::default().scan(buf).unwrap()
    }

    #[test]
    fn frames_of_every_kind() {
        let frames: &[&[u8]] = &[
            b"+OK\r\n",
            b"-ERR x\r\n",
            b":12\r\n",
            b"$3\r\nabc\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n",
            b"%1\r\n+a\r\n~2\r\n,1.5\r\n#t\r\n",
            b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n",
            b"|1\r\n+k\r\n+v\r\n:5\r\n",
            b"=7\r\ntxt:abc\r\n",
            b"_\r\n",
            b"(123456789012345678901234567890\r\n",
            b"!3\r\nerr\r\n",
            b"$4\r\na\r\nb\r\n",
        ];
        for f in frames {
            let mut buf = f.to_vec();
            buf.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(whole(&buf), Some(f.len()), "{}", String::from_utf8_lossy(f));
            for cut in 0..f.len() {
                assert_eq!(whole(&f[..cut]), None);
            }
            // Byte by byte with one resumable scanner.
            let mut s = FrameScanner::default();
            let mut found = None;
            for end in 1..=f.len() {
                if let Some(n) = s.scan(&f[..end]).unwrap() {
                    found = Some(n);
                    break;
                }
            }
            assert_eq!(found, Some(f.len()));
        }
    }

    #[test]
    fn agrees_with_redis_protocol() {
        let frames: &[&[u8]] = &[
            b"*3\r\n$3\r\nfoo\r\n*2\r\n:1\r\n:2\r\n_\r\n",
            b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n#f\r\n",
        ];
        for f in frames {
            let (_, n) = redis_protocol::resp3::decode::complete::decode(f)
                .unwrap()
                .unwrap();
            assert_eq!(whole(f), Some(n));
        }
    }

    /// The one-pass read of a counted line gives what the exact path gives, or leaves the
    /// line to it.
    #[test]
    fn counted_lines_read_as_the_exact_path_reads_them() {
        let lines: &[&[u8]] = &[
            b"$3\r\n",
            b"*-1\r\n",
            b"$-1\r\n",
            b"%12\r\n",
            b"$007\r\n",
            b"*-0\r\n",
            b"$999999999999999999\r\n",
            b"$1000000000000000000\r\n",
            b"$\r\n",
            b"$-\r\n",
            b"$1x\r\n",
            b"$1\r",
            b"$12",
            b"$1\rx\n",
            b"+OK\r\n",
            b":5\r\n",
        ];
        for line in lines {
            let exact = find_crlf(line).map(|end| {
                let n = is_counted(line[0])
                    .then(|| parse_signed(&line[1..end]))
                    .flatten();
                (line[0], n, end + 2)
            });
            match counted_line(line, 0) {
                Some(quick) => assert_eq!(Some(quick), exact, "{}", String::from_utf8_lossy(line)),
                // Left to the exact path: not a counted line in the usual form.
                None => assert!(
                    exact.is_none_or(|(kind, n, _)| !is_counted(kind) || n.is_none()),
                    "{}",
                    String::from_utf8_lossy(line)
                ),
            }
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(FrameScanner::default().scan(b"\r\n").is_err());
        assert!(FrameScanner::default().scan(b"*1\r\n\r\n").is_err());
        let huge = b"*999999999999999999\r\n*999999999999999999\r\n";
        assert!(FrameScanner::default().scan(huge).is_err());
        assert!(FrameScanner::default().scan(b"?x\r\n").is_err());
        assert!(FrameScanner::default().scan(b"$abc\r\n").is_err());
        assert!(FrameScanner::default().scan(b"$3\r\nabcde\r\n").is_err());
    }

    #[test]
    fn splits_array_elements() {
        let f = b"*3\r\n+OK\r\n-ERR no\r\n*2\r\n$1\r\na\r\n:1\r\n";
        let items = super::array_elements(f).unwrap();
        assert_eq!(
            items,
            vec![&b"+OK\r\n"[..], b"-ERR no\r\n", b"*2\r\n$1\r\na\r\n:1\r\n"]
        );
        assert!(super::array_elements(b"*-1\r\n").is_none());
        assert!(super::array_elements(b"-EXECABORT x\r\n").is_none());
        assert!(super::array_elements(b"*2\r\n+OK\r\n").is_none());
    }
}
