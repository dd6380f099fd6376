//! Rendering of PostgreSQL result rows as JSON (SPEC "JSON rows").
//!
//! Cells are read in PostgreSQL's *binary* wire format (tokio-postgres always asks for binary
//! results) and decoded here, type by type, with bounds checks everywhere: a malformed or
//! truncated value renders as `null` (or `None` from [`cell_text`]) and never panics.
//!
//! The output matches Python's `json.dumps(obj)` byte for byte for the same values
//! (separators `", "` / `": "`, `ensure_ascii=True` escaping, floats as `repr(float)`), because
//! applications that fill the cache by hand from Python write such JSON under the same keys.
//! Rows are objects in column order; duplicate column names behave like a Python dict built
//! from the row (the key keeps its first position and takes the last value).
//!
//! Types this module does not decode ([`decodes_natively`] is false: money, bit/varbit, ranges,
//! composites, geometric types, tsvector/tsquery, pg_lsn, xid, reg* aliases, extension types
//! other than citext, ...) must be cast by the caller with [`text_cast`], so they arrive as
//! `text` / `text[]` and render as strings / arrays of strings.
//!
//! `json`/`jsonb` values are embedded re-formatted the way Python would re-serialize them
//! after `json.loads`: same separators, `ensure_ascii` escaping, key order preserved,
//! duplicate keys collapsed like a dict (first position, last value), integers kept exactly
//! (`-0` becomes `0`), other numbers as `repr(float(x))`. Two deliberate deviations keep the
//! output valid JSON where Python's would not be (or would fail): a number that overflows a
//! double keeps its original text (Python would print `Infinity`), and a document nested
//! deeper than [`MAX_JSON_DEPTH`] is embedded as a JSON string holding its text.

use postgres_types::{FromSql, Kind, Type};
use std::collections::HashMap;
use std::error::Error;
use tokio_postgres::{Column, Row};

/// Nesting limit when re-formatting json/jsonb (Python's own limit is about 1000).
pub const MAX_JSON_DEPTH: usize = 512;

/// Raw binary bytes of one cell, whatever its type.
struct Raw<'a>(Option<&'a [u8]>);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(Raw(Some(raw)))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// How one (element) type is decoded.
#[derive(Clone, Debug, PartialEq)]
enum Codec {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Numeric,
    /// text, varchar, bpchar, name, unknown, xml, refcursor, enum labels, citext
    Text,
    /// the one-byte `"char"` type
    Char,
    Uuid,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
    Interval,
    Json,
    Jsonb,
    JsonPath,
    Bytea,
    Inet,
    MacAddr,
    MacAddr8,
    Array(Box<Codec>),
}

fn codec(ty: &Type) -> Option<Codec> {
    codec_at(ty, 0)
}

fn codec_at(ty: &Type, depth: usize) -> Option<Codec> {
    if depth > 8 {
        return None;
    }
    match ty.kind() {
        Kind::Simple => {}
        Kind::Enum(_) => return Some(Codec::Text),
        Kind::Domain(base) => return codec_at(base, depth + 1),
        Kind::Array(elem) => return codec_at(elem, depth + 1).map(|c| Codec::Array(Box::new(c))),
        _ => return None,
    }
    Some(match ty.oid() {
        16 => Codec::Bool,
        17 => Codec::Bytea,
        18 => Codec::Char,
        19 | 25 | 142 | 705 | 1042 | 1043 | 1790 => Codec::Text, // name text xml unknown bpchar varchar refcursor
        20 => Codec::Int8,
        21 => Codec::Int2,
        23 => Codec::Int4,
        26 => Codec::Oid,
        114 => Codec::Json,
        650 | 869 => Codec::Inet, // cidr, inet
        700 => Codec::Float4,
        701 => Codec::Float8,
        774 => Codec::MacAddr8,
        829 => Codec::MacAddr,
        1082 => Codec::Date,
        1083 => Codec::Time,
        1114 => Codec::Timestamp,
        1184 => Codec::TimestampTz,
        1186 => Codec::Interval,
        1266 => Codec::TimeTz,
        1700 => Codec::Numeric,
        2950 => Codec::Uuid,
        3802 => Codec::Jsonb,
        4072 => Codec::JsonPath,
        _ if ty.name() == "citext" => Codec::Text,
        _ => return None,
    })
}

/// Whether a column of this type is decoded from PostgreSQL's binary format by this module.
/// Columns for which this is false are cast to text in SQL by the caller (see [`text_cast`]).
pub fn decodes_natively(ty: &Type) -> bool {
    codec(ty).is_some()
}

/// The SQL cast the caller appends to a column it cannot decode natively: `"text"`, or
/// `"text[]"` for arrays (so arrays stay JSON arrays).
pub fn text_cast(ty: &Type) -> &'static str {
    if is_array(ty, 0) {
        "text[]"
    } else {
        "text"
    }
}

fn is_array(ty: &Type, depth: usize) -> bool {
    match ty.kind() {
        Kind::Array(_) => true,
        Kind::Domain(base) if depth < 8 => is_array(base, depth + 1),
        _ => false,
    }
}

/// Appends the JSON array of row objects for `rows` to `out`. `names[i]` is the key of column
/// `i` (a missing name falls back to the column's own name).
pub fn write_rows_json(names: &[&str], rows: &[Row], out: &mut Vec<u8>) {
    let Some(first) = rows.first() else {
        out.extend_from_slice(b"[]");
        return;
    };
    let mut json = JsonRows::new(names, first.columns());
    for row in rows {
        json.push(row);
    }
    out.extend_from_slice(&json.finish());
}

/// The JSON array of [`write_rows_json`], built one row at a time as rows arrive from
/// PostgreSQL, so a caller can stop as soon as the text grows past its limit — before the
/// rest of the result is ever in memory.
pub struct JsonRows {
    /// `"name": ` of each distinct key, in output order.
    keys: Vec<Vec<u8>>,
    /// The column whose value each key shows (Python dict semantics: the last duplicate).
    value_col: Vec<usize>,
    codecs: Vec<Option<Codec>>,
    out: Vec<u8>,
    rows: usize,
    /// The size past which the caller refuses the result: the buffer never grows beyond it
    /// by its own doubling (see [`reserve_for`](Self::reserve_for)).
    limit: usize,
}

impl JsonRows {
    /// An empty array for rows of `columns`; `names[i]` is the key of column `i` (a missing
    /// name falls back to the column's own name).
    pub fn new(names: &[&str], columns: &[Column]) -> JsonRows {
        let codecs = columns.iter().map(|c| codec(c.type_())).collect();
        // Python dict semantics for duplicate names: first position, last value.
        let mut keys: Vec<Vec<u8>> = Vec::with_capacity(columns.len());
        let mut value_col: Vec<usize> = Vec::with_capacity(columns.len());
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, col) in columns.iter().enumerate() {
            let name = names.get(i).copied().unwrap_or_else(|| col.name());
            if let Some(&slot) = seen.get(name) {
                value_col[slot] = i;
            } else {
                seen.insert(name, keys.len());
                let mut key = Vec::with_capacity(name.len() + 4);
                write_json_str(&mut key, name);
                key.extend_from_slice(b": ");
                keys.push(key);
                value_col.push(i);
            }
        }
        JsonRows {
            keys,
            value_col,
            codecs,
            out: vec![b'['],
            rows: 0,
            limit: usize::MAX,
        }
    }

    /// Tells the buffer that the caller refuses results longer than `limit` bytes, so its
    /// capacity stays within the limit instead of doubling past it (a doubling from 5 MiB
    /// would reserve and copy into 10 MiB for an 8 MiB limit).
    pub fn with_limit(mut self, limit: usize) -> JsonRows {
        self.limit = limit;
        self
    }

    /// Appends `row` (whose columns must be those given to [`new`](Self::new)).
    pub fn push(&mut self, row: &Row) {
        self.reserve_for(row);
        let out = &mut self.out;
        if self.rows > 0 {
            out.extend_from_slice(b", ");
        }
        out.push(b'{');
        for (k, (key, &col)) in self.keys.iter().zip(self.value_col.iter()).enumerate() {
            if k > 0 {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(key);
            let codec = self.codecs.get(col).and_then(Option::as_ref);
            write_cell(codec, raw_cell(row, col), out, true);
        }
        out.push(b'}');
        self.rows += 1;
    }

    /// A lower bound of how many bytes [`push`](Self::push) would add for `row`, computed
    /// without rendering it: strings render to at least their own bytes plus quotes, bytea to
    /// twice its bytes plus `"\\x"`. It lets a caller refuse a huge row before rendering
    /// it (which could take several times its size), and never refuses one that would fit.
    pub fn min_added_len(&self, row: &Row) -> usize {
        self.value_col
            .iter()
            .map(|&col| match (self.codecs.get(col), raw_cell(row, col)) {
                (Some(Some(Codec::Text)), Some(b)) => b.len() + 2,
                (Some(Some(Codec::Bytea)), Some(b)) => 2 * b.len() + 5,
                _ => 0,
            })
            .sum()
    }

    /// Makes room for `row` before it is written, growing like `Vec` (doubling) but never
    /// past the limit: the estimate covers the row's strings and bytea (a lower bound), its
    /// keys and separators, and about 32 bytes for every other value, so `Vec`'s own
    /// doubling only kicks in for a row whose values render far larger than their wire size
    /// (large json or numeric arrays).
    fn reserve_for(&mut self, row: &Row) {
        let keys: usize = self.keys.iter().map(Vec::len).sum();
        let estimate = self.min_added_len(row) + keys + 34 * self.keys.len() + 4;
        let need = self.out.len() + estimate;
        if need <= self.out.capacity() {
            return;
        }
        let target = (self.out.capacity() * 2).min(self.limit).max(need);
        self.out.reserve_exact(target - self.out.len());
    }

    /// Bytes of JSON so far, without the closing `]`.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// Whether no row was added yet.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Rows added so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The finished array.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(b']');
        self.out
    }
}

/// The binary bytes of column `col` of `row`; `None` for NULL or a bad index.
fn raw_cell(row: &Row, col: usize) -> Option<&[u8]> {
    match row.try_get::<_, Raw>(col) {
        Ok(Raw(Some(b))) => Some(b),
        _ => None,
    }
}

/// Column `idx` of `row` as a plain string (for reply = "value"): the same rendering as in
/// [`write_rows_json`], except that a string value is not JSON-quoted or escaped (numbers,
/// booleans, arrays and json documents are their JSON text). `None` for NULL, an index out of
/// range, or a value that cannot be decoded.
pub fn cell_text(row: &Row, idx: usize) -> Option<String> {
    let col = row.columns().get(idx)?;
    let raw = match row.try_get::<_, Raw>(idx) {
        Ok(Raw(Some(b))) => b,
        _ => return None,
    };
    let codec = codec(col.type_())?;
    let mut out = Vec::with_capacity(raw.len() + 8);
    write_value(&codec, raw, &mut out, false)?;
    Some(match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// One cell as JSON; anything undecodable becomes `null`.
fn write_cell(codec: Option<&Codec>, raw: Option<&[u8]>, out: &mut Vec<u8>, quote: bool) {
    let mark = out.len();
    let ok = match (codec, raw) {
        (Some(c), Some(b)) => write_value(c, b, out, quote).is_some(),
        _ => false,
    };
    if !ok {
        out.truncate(mark);
        out.extend_from_slice(b"null");
    }
}

// ---------------------------------------------------------------------------------------------
// Binary decoding
// ---------------------------------------------------------------------------------------------

fn arr<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    b.try_into().ok()
}

/// Reads big-endian fields off the front of a slice.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn i16(&mut self) -> Option<i16> {
        self.take(2).and_then(arr).map(i16::from_be_bytes)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).and_then(arr).map(u16::from_be_bytes)
    }
    fn i32(&mut self) -> Option<i32> {
        self.take(4).and_then(arr).map(i32::from_be_bytes)
    }
}

/// Writes one value. `quote` is false only for the top level of [`cell_text`].
/// Returns None on malformed input (the caller truncates what was written).
fn write_value(c: &Codec, b: &[u8], out: &mut Vec<u8>, quote: bool) -> Option<()> {
    match c {
        Codec::Bool => match b {
            [0] => out.extend_from_slice(b"false"),
            [_] => out.extend_from_slice(b"true"),
            _ => return None,
        },
        Codec::Int2 => put_int(out, i16::from_be_bytes(arr(b)?)),
        Codec::Int4 => put_int(out, i32::from_be_bytes(arr(b)?)),
        Codec::Int8 => put_int(out, i64::from_be_bytes(arr(b)?)),
        Codec::Oid => put_int(out, u32::from_be_bytes(arr(b)?)),
        Codec::Float4 => {
            let v = f32::from_be_bytes(arr(b)?);
            if v.is_finite() {
                write_py_repr(out, ryu::Buffer::new().format_finite(v));
            } else {
                put_str(out, nonfinite(v.is_nan(), v > 0.0), quote);
            }
        }
        Codec::Float8 => write_f64(out, f64::from_be_bytes(arr(b)?), quote),
        Codec::Numeric => {
            let mut s = String::new();
            numeric_text(b, &mut s)?;
            put_str(out, &s, quote);
        }
        Codec::Text => put_str(out, &String::from_utf8_lossy(b), quote),
        Codec::Char => {
            let mut s = String::new();
            match b {
                [] | [0] => {}
                [c] if *c >= 0x80 => {
                    s.push('\\');
                    for shift in [6, 3, 0] {
                        s.push((b'0' + ((c >> shift) & 7)) as char);
                    }
                }
                [c] => s.push(*c as char),
                _ => return None,
            }
            put_str(out, &s, quote);
        }
        Codec::Uuid => {
            let u: [u8; 16] = arr(b)?;
            let mut s = String::with_capacity(36);
            for (i, byte) in u.iter().enumerate() {
                if matches!(i, 4 | 6 | 8 | 10) {
                    s.push('-');
                }
                push_hex_byte(&mut s, *byte);
            }
            put_str(out, &s, quote);
        }
        Codec::Date => {
            let d = i32::from_be_bytes(arr(b)?);
            let mut s = String::with_capacity(12);
            match d {
                i32::MAX => s.push_str("infinity"),
                i32::MIN => s.push_str("-infinity"),
                d => push_date(&mut s, d as i64),
            }
            put_str(out, &s, quote);
        }
        Codec::Time => {
            let t = i64::from_be_bytes(arr(b)?);
            let mut s = String::with_capacity(16);
            push_time(&mut s, t)?;
            put_str(out, &s, quote);
        }
        Codec::TimeTz => {
            let mut cur = Cur(b);
            let t = i64::from_be_bytes(arr(cur.take(8)?)?);
            let zone = cur.i32()?;
            if !cur.0.is_empty() {
                return None;
            }
            let mut s = String::with_capacity(24);
            push_time(&mut s, t)?;
            // PostgreSQL stores the zone as seconds *west* of UTC.
            push_offset(&mut s, -(zone as i64));
            put_str(out, &s, quote);
        }
        Codec::Timestamp | Codec::TimestampTz => {
            let t = i64::from_be_bytes(arr(b)?);
            let mut s = String::with_capacity(32);
            match t {
                i64::MAX => s.push_str("infinity"),
                i64::MIN => s.push_str("-infinity"),
                t => {
                    const DAY: i64 = 86_400_000_000;
                    push_date(&mut s, t.div_euclid(DAY));
                    s.push('T');
                    push_time(&mut s, t.rem_euclid(DAY))?;
                    if *c == Codec::TimestampTz {
                        s.push_str("+00:00");
                    }
                }
            }
            put_str(out, &s, quote);
        }
        Codec::Interval => {
            let mut s = String::with_capacity(32);
            interval_text(b, &mut s)?;
            put_str(out, &s, quote);
        }
        Codec::Json => write_embedded_json(out, std::str::from_utf8(b).ok()?),
        Codec::Jsonb => match b.split_first() {
            Some((1, rest)) => write_embedded_json(out, std::str::from_utf8(rest).ok()?),
            _ => return None,
        },
        Codec::JsonPath => match b.split_first() {
            Some((1, rest)) => put_str(out, &String::from_utf8_lossy(rest), quote),
            _ => return None,
        },
        Codec::Bytea => {
            let mut s = String::with_capacity(2 + 2 * b.len());
            s.push_str("\\x");
            for byte in b {
                push_hex_byte(&mut s, *byte);
            }
            put_str(out, &s, quote);
        }
        Codec::Inet => {
            let mut s = String::with_capacity(48);
            inet_text(b, &mut s)?;
            put_str(out, &s, quote);
        }
        Codec::MacAddr | Codec::MacAddr8 => {
            let n = if *c == Codec::MacAddr { 6 } else { 8 };
            if b.len() != n {
                return None;
            }
            let mut s = String::with_capacity(3 * n);
            for (i, byte) in b.iter().enumerate() {
                if i > 0 {
                    s.push(':');
                }
                push_hex_byte(&mut s, *byte);
            }
            put_str(out, &s, quote);
        }
        Codec::Array(elem) => write_array(elem, b, out)?,
    }
    Some(())
}

fn put_int<I: itoa::Integer>(out: &mut Vec<u8>, v: I) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// A string value: JSON-quoted (ensure_ascii) or, for `cell_text`, as is.
fn put_str(out: &mut Vec<u8>, s: &str, quote: bool) {
    if quote {
        write_json_str(out, s);
    } else {
        out.extend_from_slice(s.as_bytes());
    }
}

fn nonfinite(nan: bool, positive: bool) -> &'static str {
    if nan {
        "NaN"
    } else if positive {
        "Infinity"
    } else {
        "-Infinity"
    }
}

fn write_f64(out: &mut Vec<u8>, v: f64, quote: bool) {
    if v.is_finite() {
        write_py_repr(out, ryu::Buffer::new().format_finite(v));
    } else {
        put_str(out, nonfinite(v.is_nan(), v > 0.0), quote);
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex_byte(s: &mut String, b: u8) {
    s.push(HEX[(b >> 4) as usize] as char);
    s.push(HEX[(b & 15) as usize] as char);
}

fn push_2(s: &mut String, v: i64) {
    let v = v.rem_euclid(100);
    s.push((b'0' + (v / 10) as u8) as char);
    s.push((b'0' + (v % 10) as u8) as char);
}

/// Days since 2000-01-01 as an ISO date; astronomical years (1 BC = 0000, 44 BC = -0043).
fn push_date(s: &mut String, pg_days: i64) {
    // Howard Hinnant's civil_from_days (proleptic Gregorian), from days since 1970-01-01.
    let z = pg_days + 10_957 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if year < 0 {
        s.push('-');
    }
    let abs = year.unsigned_abs();
    let digits = itoa::Buffer::new().format(abs).len();
    for _ in digits..4 {
        s.push('0');
    }
    s.push_str(itoa::Buffer::new().format(abs));
    s.push('-');
    push_2(s, month);
    s.push('-');
    push_2(s, day);
}

/// Microseconds since midnight as HH:MM:SS[.ffffff with trailing zeros trimmed].
fn push_time(s: &mut String, micros: i64) -> Option<()> {
    if !(0..=86_400_000_000).contains(&micros) {
        return None;
    }
    let secs = micros / 1_000_000;
    push_2(s, secs / 3600);
    s.push(':');
    push_2(s, secs / 60 % 60);
    s.push(':');
    push_2(s, secs % 60);
    push_fraction(s, micros % 1_000_000);
    Some(())
}

/// ".ffffff" with trailing zeros trimmed; nothing for 0. `usec` in 0..1_000_000.
fn push_fraction(s: &mut String, usec: i64) {
    if usec == 0 {
        return;
    }
    let mut digits = [0u8; 6];
    let mut v = usec;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    let mut n = 6;
    while n > 1 && digits[n - 1] == b'0' {
        n -= 1;
    }
    s.push('.');
    for d in &digits[..n] {
        s.push(*d as char);
    }
}

/// UTC offset in seconds east as "+HH:MM" (":SS" appended when not whole minutes).
fn push_offset(s: &mut String, east: i64) {
    s.push(if east < 0 { '-' } else { '+' });
    let a = east.abs();
    let (h, m, sec) = (a / 3600, a / 60 % 60, a % 60);
    if h >= 100 {
        s.push_str(itoa::Buffer::new().format(h));
    } else {
        push_2(s, h);
    }
    s.push(':');
    push_2(s, m);
    if sec != 0 {
        s.push(':');
        push_2(s, sec);
    }
}

/// interval as PostgreSQL prints it with IntervalStyle = iso_8601.
fn interval_text(b: &[u8], s: &mut String) -> Option<()> {
    let mut cur = Cur(b);
    let time = i64::from_be_bytes(arr(cur.take(8)?)?);
    let days = cur.i32()?;
    let months = cur.i32()?;
    if !cur.0.is_empty() {
        return None;
    }
    // PostgreSQL 17 infinities.
    if months == i32::MAX && days == i32::MAX && time == i64::MAX {
        s.push_str("infinity");
        return Some(());
    }
    if months == i32::MIN && days == i32::MIN && time == i64::MIN {
        s.push_str("-infinity");
        return Some(());
    }
    let (year, mon) = (months / 12, months % 12);
    let hour = time / 3_600_000_000;
    let rest = time - hour * 3_600_000_000;
    let min = rest / 60_000_000;
    let rest = rest - min * 60_000_000;
    let sec = rest / 1_000_000;
    let usec = rest - sec * 1_000_000;
    if year == 0 && mon == 0 && days == 0 && time == 0 {
        s.push_str("PT0S");
        return Some(());
    }
    fn part(s: &mut String, v: i64, unit: char) {
        if v != 0 {
            s.push_str(itoa::Buffer::new().format(v));
            s.push(unit);
        }
    }
    s.push('P');
    part(s, year as i64, 'Y');
    part(s, mon as i64, 'M');
    part(s, days as i64, 'D');
    if time != 0 {
        s.push('T');
    }
    part(s, hour, 'H');
    part(s, min, 'M');
    if sec != 0 || usec != 0 {
        if sec < 0 || usec < 0 {
            s.push('-');
        }
        s.push_str(itoa::Buffer::new().format(sec.unsigned_abs()));
        push_fraction(s, usec.abs());
        s.push('S');
    }
    Some(())
}

/// numeric's exact decimal text, as PostgreSQL's numeric_out prints it.
fn numeric_text(b: &[u8], s: &mut String) -> Option<()> {
    let mut cur = Cur(b);
    let ndigits = cur.i16()?;
    let weight = cur.i16()? as i64;
    let sign = cur.u16()?;
    let dscale = cur.u16()?;
    match sign {
        0xC000 => {
            s.push_str("NaN");
            return Some(());
        }
        0xD000 => {
            s.push_str("Infinity");
            return Some(());
        }
        0xF000 => {
            s.push_str("-Infinity");
            return Some(());
        }
        0x0000 | 0x4000 => {}
        _ => return None,
    }
    if ndigits < 0 || dscale > 0x3FFF || cur.0.len() != ndigits as usize * 2 {
        return None;
    }
    let mut digits = Vec::with_capacity(ndigits as usize);
    for _ in 0..ndigits {
        let d = cur.i16()?;
        if !(0..10_000).contains(&d) {
            return None;
        }
        digits.push(d);
    }
    let digit = |i: i64| -> i16 {
        if i >= 0 && (i as usize) < digits.len() {
            digits[i as usize]
        } else {
            0
        }
    };
    if sign == 0x4000 {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        for d in 0..=weight {
            let g = digit(d);
            if d == 0 {
                s.push_str(itoa::Buffer::new().format(g));
            } else {
                push_4(s, g);
            }
        }
    }
    if dscale > 0 {
        s.push('.');
        let end = s.len() + dscale as usize;
        let mut d = weight + 1;
        while s.len() < end {
            push_4(s, digit(d));
            d += 1;
        }
        s.truncate(end);
    }
    Some(())
}

fn push_4(s: &mut String, g: i16) {
    let g = g as u16;
    for div in [1000, 100, 10, 1] {
        s.push((b'0' + (g / div % 10) as u8) as char);
    }
}

/// inet / cidr as PostgreSQL's network_out prints them.
fn inet_text(b: &[u8], s: &mut String) -> Option<()> {
    let mut cur = Cur(b);
    let family = cur.u8()?;
    let bits = cur.u8()?;
    let is_cidr = cur.u8()? != 0;
    let nb = cur.u8()? as usize;
    let addr = cur.take(nb)?;
    if !cur.0.is_empty() {
        return None;
    }
    let max_bits = match (family, nb) {
        (2, 4) => 32,
        (3, 16) => 128,
        _ => return None,
    };
    if bits > max_bits {
        return None;
    }
    if family == 2 {
        push_ipv4(s, addr);
    } else {
        let mut words = [0u16; 8];
        for (i, w) in words.iter_mut().enumerate() {
            *w = u16::from_be_bytes([addr[2 * i], addr[2 * i + 1]]);
        }
        // Longest run (first on ties) of zero words, of length >= 2, becomes "::".
        let (mut best, mut cur_run): ((i32, i32), (i32, i32)) = ((-1, 0), (-1, 0));
        for (i, w) in words.iter().enumerate() {
            if *w == 0 {
                if cur_run.0 == -1 {
                    cur_run = (i as i32, 1);
                } else {
                    cur_run.1 += 1;
                }
            } else if cur_run.0 != -1 {
                if best.0 == -1 || cur_run.1 > best.1 {
                    best = cur_run;
                }
                cur_run.0 = -1;
            }
        }
        if cur_run.0 != -1 && (best.0 == -1 || cur_run.1 > best.1) {
            best = cur_run;
        }
        if best.0 != -1 && best.1 < 2 {
            best.0 = -1;
        }
        for i in 0..8i32 {
            if best.0 != -1 && i >= best.0 && i < best.0 + best.1 {
                if i == best.0 {
                    s.push(':');
                }
                continue;
            }
            if i != 0 {
                s.push(':');
            }
            if i == 6 && best.0 == 0 && (best.1 == 6 || (best.1 == 5 && words[5] == 0xffff)) {
                push_ipv4(s, &addr[12..16]);
                break;
            }
            let w = words[i as usize];
            let mut started = false;
            for shift in [12, 8, 4, 0] {
                let nib = (w >> shift) & 15;
                if nib != 0 || started || shift == 0 {
                    started = true;
                    s.push(HEX[nib as usize] as char);
                }
            }
        }
        if best.0 != -1 && best.0 + best.1 == 8 {
            s.push(':');
        }
    }
    if bits != max_bits || is_cidr {
        s.push('/');
        s.push_str(itoa::Buffer::new().format(bits));
    }
    Some(())
}

fn push_ipv4(s: &mut String, a: &[u8]) {
    for (i, byte) in a.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        s.push_str(itoa::Buffer::new().format(*byte));
    }
}

/// PostgreSQL's binary array format → nested JSON arrays (lower bounds ignored).
fn write_array(elem: &Codec, b: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let mut cur = Cur(b);
    let ndim = cur.i32()?;
    let _has_null = cur.i32()?;
    let _elem_oid = cur.i32()?;
    if ndim == 0 {
        out.extend_from_slice(b"[]");
        return Some(());
    }
    if !(1..=6).contains(&ndim) {
        return None;
    }
    let mut dims = [0usize; 6];
    let mut total: usize = 1;
    for d in dims.iter_mut().take(ndim as usize) {
        let n = cur.i32()?;
        let _lower = cur.i32()?;
        *d = usize::try_from(n).ok()?;
        total = total.checked_mul(*d)?;
    }
    // Every element takes at least its 4-byte length.
    if total > cur.0.len() / 4 {
        return None;
    }
    write_array_level(elem, &dims[..ndim as usize], &mut cur, out)?;
    if !cur.0.is_empty() {
        return None;
    }
    Some(())
}

fn write_array_level(elem: &Codec, dims: &[usize], cur: &mut Cur, out: &mut Vec<u8>) -> Option<()> {
    out.push(b'[');
    for i in 0..dims[0] {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        if dims.len() > 1 {
            write_array_level(elem, &dims[1..], cur, out)?;
        } else {
            let len = cur.i32()?;
            if len == -1 {
                out.extend_from_slice(b"null");
            } else {
                let bytes = cur.take(usize::try_from(len).ok()?)?;
                write_value(elem, bytes, out, true)?;
            }
        }
    }
    out.push(b']');
    Some(())
}

// ---------------------------------------------------------------------------------------------
// Python-compatible JSON text
// ---------------------------------------------------------------------------------------------

/// A JSON string literal escaped like Python's `json.dumps` with `ensure_ascii=True`.
pub(crate) fn write_json_str(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, ch) in s.char_indices() {
        if (' '..='~').contains(&ch) && ch != '"' && ch != '\\' {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        start = i + ch.len_utf8();
        let mut units = [0u16; 2];
        for u in ch.encode_utf16(&mut units) {
            write_escaped_unit(out, *u);
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// One UTF-16 code unit that is not printable ASCII, or is `"` or `\`.
fn write_escaped_unit(out: &mut Vec<u8>, u: u16) {
    let short: &[u8] = match u {
        0x22 => b"\\\"",
        0x5c => b"\\\\",
        0x0a => b"\\n",
        0x0d => b"\\r",
        0x09 => b"\\t",
        0x08 => b"\\b",
        0x0c => b"\\f",
        _ => {
            out.extend_from_slice(b"\\u");
            for shift in [12, 8, 4, 0] {
                out.push(HEX[((u >> shift) & 15) as usize]);
            }
            return;
        }
    };
    out.extend_from_slice(short);
}

/// A string given as UTF-16 code units (lone surrogates allowed, as in Python).
fn write_json_units(out: &mut Vec<u8>, units: &[u16]) {
    out.push(b'"');
    for &u in units {
        if (0x20..0x7f).contains(&u) && u != 0x22 && u != 0x5c {
            out.push(u as u8);
        } else {
            write_escaped_unit(out, u);
        }
    }
    out.push(b'"');
}

/// A finite float as Python's `repr(float)`, from Ryu's shortest round-trip text of it.
fn write_py_repr(out: &mut Vec<u8>, ryu_text: &str) {
    let (neg, body) = match ryu_text.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, ryu_text),
    };
    let (mant, exp) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (body, 0),
    };
    let int_len = mant.find('.').unwrap_or(mant.len()) as i32;
    let mut digits: Vec<u8> = mant.bytes().filter(u8::is_ascii_digit).collect();
    let mut decpt = int_len + exp; // value = 0.DIGITS * 10^decpt
    let lead = digits.iter().take_while(|d| **d == b'0').count();
    digits.drain(..lead);
    decpt -= lead as i32;
    while digits.last() == Some(&b'0') {
        digits.pop();
    }
    if neg {
        out.push(b'-');
    }
    if digits.is_empty() {
        out.extend_from_slice(b"0.0");
        return;
    }
    let n = digits.len() as i32;
    if decpt <= -4 || decpt > 16 {
        out.push(digits[0]);
        if n > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        let e = decpt - 1;
        out.push(b'e');
        out.push(if e < 0 { b'-' } else { b'+' });
        if e.abs() < 10 {
            out.push(b'0');
        }
        put_int(out, e.abs());
    } else if decpt <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', (-decpt) as usize));
        out.extend_from_slice(&digits);
    } else if decpt < n {
        out.extend_from_slice(&digits[..decpt as usize]);
        out.push(b'.');
        out.extend_from_slice(&digits[decpt as usize..]);
    } else {
        out.extend_from_slice(&digits);
        out.extend(std::iter::repeat_n(b'0', (decpt - n) as usize));
        out.extend_from_slice(b".0");
    }
}

/// Parsed JSON value, as Python's `json.loads` would hold it.
enum Jv<'a> {
    Null,
    Bool(bool),
    /// number text; true when it has a fraction or exponent (a Python float)
    Num(&'a str, bool),
    Str(Vec<u16>),
    Arr(Vec<Jv<'a>>),
    Obj(Vec<(Vec<u16>, Jv<'a>)>),
}

struct JsonParser<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> JsonParser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
    }
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }
    fn lit(&mut self, word: &str) -> Option<()> {
        if self.s.as_bytes().get(self.i..self.i + word.len())? == word.as_bytes() {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }
    fn value(&mut self, depth: usize) -> Option<Jv<'a>> {
        if depth > MAX_JSON_DEPTH {
            return None;
        }
        self.ws();
        Some(match self.peek()? {
            b'n' => self.lit("null").map(|_| Jv::Null)?,
            b't' => self.lit("true").map(|_| Jv::Bool(true))?,
            b'f' => self.lit("false").map(|_| Jv::Bool(false))?,
            b'"' => Jv::Str(self.string()?),
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                } else {
                    loop {
                        items.push(self.value(depth + 1)?);
                        self.ws();
                        match self.peek()? {
                            b',' => self.i += 1,
                            b']' => {
                                self.i += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
                Jv::Arr(items)
            }
            b'{' => {
                self.i += 1;
                let mut members: Vec<(Vec<u16>, Jv<'a>)> = Vec::new();
                let mut index: Option<HashMap<Vec<u16>, usize>> = None;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                } else {
                    loop {
                        self.ws();
                        if self.peek()? != b'"' {
                            return None;
                        }
                        let key = self.string()?;
                        self.ws();
                        if self.peek()? != b':' {
                            return None;
                        }
                        self.i += 1;
                        let v = self.value(depth + 1)?;
                        // dict semantics: a repeated key keeps its place, takes the new value
                        if members.len() >= 16 && index.is_none() {
                            index = Some(
                                members
                                    .iter()
                                    .enumerate()
                                    .map(|(i, (k, _))| (k.clone(), i))
                                    .collect(),
                            );
                        }
                        let found = match &index {
                            Some(map) => map.get(&key).copied(),
                            None => members.iter().position(|(k, _)| *k == key),
                        };
                        match found {
                            Some(i) => members[i].1 = v,
                            None => {
                                if let Some(map) = index.as_mut() {
                                    map.insert(key.clone(), members.len());
                                }
                                members.push((key, v));
                            }
                        }
                        self.ws();
                        match self.peek()? {
                            b',' => self.i += 1,
                            b'}' => {
                                self.i += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
                Jv::Obj(members)
            }
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        })
    }
    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }
    fn number(&mut self) -> Option<Jv<'a>> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
            float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
            float = true;
        }
        Some(Jv::Num(&self.s[start..self.i], float))
    }
    fn hex4(&mut self) -> Option<u16> {
        let h = self.s.get(self.i..self.i + 4)?;
        if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.i += 4;
        u16::from_str_radix(h, 16).ok()
    }
    fn string(&mut self) -> Option<Vec<u16>> {
        self.i += 1; // opening quote
        let mut units = Vec::new();
        loop {
            let b = self.peek()?;
            match b {
                b'"' => {
                    self.i += 1;
                    return Some(units);
                }
                b'\\' => {
                    self.i += 1;
                    let e = self.peek()?;
                    self.i += 1;
                    units.push(match e {
                        b'"' => 0x22,
                        b'\\' => 0x5c,
                        b'/' => 0x2f,
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => 0x0a,
                        b'r' => 0x0d,
                        b't' => 0x09,
                        b'u' => self.hex4()?,
                        _ => return None,
                    });
                }
                0..=0x1f => return None,
                0x20..=0x7f => {
                    units.push(b as u16);
                    self.i += 1;
                }
                _ => {
                    let ch = self.s.get(self.i..)?.chars().next()?;
                    let mut buf = [0u16; 2];
                    units.extend_from_slice(ch.encode_utf16(&mut buf));
                    self.i += ch.len_utf8();
                }
            }
        }
    }
}

fn write_jv(out: &mut Vec<u8>, v: &Jv) {
    match v {
        Jv::Null => out.extend_from_slice(b"null"),
        Jv::Bool(true) => out.extend_from_slice(b"true"),
        Jv::Bool(false) => out.extend_from_slice(b"false"),
        Jv::Num(text, false) => {
            // Python int: exact; only "-0" changes.
            if *text == "-0" {
                out.push(b'0');
            } else {
                out.extend_from_slice(text.as_bytes());
            }
        }
        Jv::Num(text, true) => match text.parse::<f64>() {
            Ok(f) if f.is_finite() => write_py_repr(out, ryu::Buffer::new().format_finite(f)),
            _ => out.extend_from_slice(text.as_bytes()),
        },
        Jv::Str(units) => write_json_units(out, units),
        Jv::Arr(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_jv(out, item);
            }
            out.push(b']');
        }
        Jv::Obj(members) => {
            out.push(b'{');
            for (i, (k, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_json_units(out, k);
                out.extend_from_slice(b": ");
                write_jv(out, item);
            }
            out.push(b'}');
        }
    }
}

/// A json/jsonb document, re-formatted as Python's json.dumps(json.loads(text)) would print
/// it; text that does not parse (or is nested too deeply) is embedded as a JSON string.
fn write_embedded_json(out: &mut Vec<u8>, text: &str) {
    let mut p = JsonParser { s: text, i: 0 };
    let parsed = p.value(0).and_then(|v| {
        p.ws();
        (p.i == text.len()).then_some(v)
    });
    match parsed {
        Some(v) => write_jv(out, &v),
        None => write_json_str(out, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f64_repr(v: f64) -> String {
        let mut out = Vec::new();
        write_f64(&mut out, v, true);
        String::from_utf8(out).unwrap()
    }

    fn f32_repr(v: f32) -> String {
        let mut out = Vec::new();
        write_value(&Codec::Float4, &v.to_be_bytes(), &mut out, true).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn jstr(s: &str) -> String {
        let mut out = Vec::new();
        write_json_str(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    fn reformat(text: &str) -> String {
        let mut out = Vec::new();
        write_embedded_json(&mut out, text);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn float_repr_matches_python() {
        // Expected values are Python 3's repr(float(x)).
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (-1.0, "-1.0"),
            (0.1, "0.1"),
            (0.5, "0.5"),
            (123.5, "123.5"),
            (100.0, "100.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1234567890123456.7, "1234567890123456.8"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (1e22, "1e+22"),
            (1e100, "1e+100"),
            (0.001, "0.001"),
            (0.0001, "0.0001"),
            (0.00015, "0.00015"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (1e-7, "1e-07"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (2.2250738585072014e-308, "2.2250738585072014e-308"),
            (1.0 / 3.0, "0.3333333333333333"),
            (2.0 / 3.0, "0.6666666666666666"),
            (123456789.123, "123456789.123"),
            (-1.5e-10, "-1.5e-10"),
            (9007199254740993.0, "9007199254740992.0"),
            (f64::NAN, "\"NaN\""),
            (f64::INFINITY, "\"Infinity\""),
            (f64::NEG_INFINITY, "\"-Infinity\""),
        ];
        for (v, want) in cases {
            assert_eq!(f64_repr(*v), *want, "repr of {v:e}");
        }
    }

    #[test]
    fn float4_uses_shortest_f32_digits() {
        assert_eq!(f32_repr(1.1), "1.1");
        assert_eq!(f32_repr(0.1), "0.1");
        assert_eq!(f32_repr(3.4028235e38), "3.4028235e+38");
        assert_eq!(f32_repr(1e-45), "1e-45");
        assert_eq!(f32_repr(-0.0), "-0.0");
        assert_eq!(f32_repr(16777216.0), "16777216.0");
        assert_eq!(f32_repr(f32::NAN), "\"NaN\"");
        assert_eq!(f32_repr(f32::NEG_INFINITY), "\"-Infinity\"");
    }

    #[test]
    fn string_escaping_matches_python_ensure_ascii() {
        assert_eq!(jstr(""), r#""""#);
        assert_eq!(jstr("plain text ~!"), r#""plain text ~!""#);
        assert_eq!(jstr("a\"b\\c/d"), r#""a\"b\\c/d""#);
        assert_eq!(jstr("\n\r\t\u{8}\u{c}"), r#""\n\r\t\b\f""#);
        assert_eq!(
            jstr("\u{0}\u{1}\u{1f}\u{7f}"),
            r#""\u0000\u0001\u001f\u007f""#
        );
        assert_eq!(jstr("é"), r#""\u00e9""#);
        assert_eq!(jstr("ÿĀ€"), r#""\u00ff\u0100\u20ac""#);
        assert_eq!(jstr("😀"), r#""\ud83d\ude00""#);
        assert_eq!(jstr("x😀y\u{10ffff}"), r#""x\ud83d\ude00y\udbff\udfff""#);
        assert_eq!(jstr("\u{feff}\u{2028}"), r#""\ufeff\u2028""#);
    }

    #[test]
    fn embedded_json_is_reformatted_like_python() {
        assert_eq!(
            reformat(r#"{"a":1,"b":[true,false,null],"c":{}}"#),
            r#"{"a": 1, "b": [true, false, null], "c": {}}"#
        );
        assert_eq!(reformat(" [ ] "), "[]");
        assert_eq!(
            reformat(r#"{"b": 1, "a": 2, "b": 3}"#),
            r#"{"b": 3, "a": 2}"#
        );
        assert_eq!(
            reformat("[1.0, 1.50, 1e2, 1E-5, -0, -0.0, 12345678901234567890123]"),
            "[1.0, 1.5, 100.0, 1e-05, 0, -0.0, 12345678901234567890123]"
        );
        assert_eq!(
            reformat(r#""\u00e9\/\ud83d\ude00é😀\u0041""#),
            r#""\u00e9/\ud83d\ude00\u00e9\ud83d\ude00A""#
        );
        assert_eq!(reformat(r#""\ud800 lone""#), r#""\ud800 lone""#);
        assert_eq!(reformat("1e999"), "1e999");
        assert_eq!(reformat("42"), "42");
        // not JSON → a JSON string with the text
        assert_eq!(reformat("{bad"), r#""{bad""#);
        let deep = "[".repeat(MAX_JSON_DEPTH + 5) + &"]".repeat(MAX_JSON_DEPTH + 5);
        let out = reformat(&deep);
        assert!(out.starts_with("\"[[[["));
        let ok = "[".repeat(100) + &"]".repeat(100);
        assert_eq!(reformat(&ok), ok);
        // many keys (indexed dedup path)
        let mut src = String::from("{");
        for i in 0..40 {
            src.push_str(&format!("\"k{}\":{},", i % 30, i));
        }
        src.push_str("\"z\":0}");
        let out = reformat(&src);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 31);
        assert!(out.starts_with(r#"{"k0": 30, "k1": 31,"#), "{out}");
    }

    fn render(c: &Codec, b: &[u8]) -> Option<String> {
        let mut out = Vec::new();
        write_value(c, b, &mut out, true)?;
        Some(String::from_utf8(out).unwrap())
    }

    fn all_codecs() -> Vec<Codec> {
        let base = vec![
            Codec::Bool,
            Codec::Int2,
            Codec::Int4,
            Codec::Int8,
            Codec::Oid,
            Codec::Float4,
            Codec::Float8,
            Codec::Numeric,
            Codec::Text,
            Codec::Char,
            Codec::Uuid,
            Codec::Date,
            Codec::Time,
            Codec::TimeTz,
            Codec::Timestamp,
            Codec::TimestampTz,
            Codec::Interval,
            Codec::Json,
            Codec::Jsonb,
            Codec::JsonPath,
            Codec::Bytea,
            Codec::Inet,
            Codec::MacAddr,
            Codec::MacAddr8,
        ];
        let mut all = base.clone();
        all.extend(base.iter().map(|c| Codec::Array(Box::new(c.clone()))));
        all.push(Codec::Array(Box::new(Codec::Array(Box::new(Codec::Int4)))));
        all
    }

    #[test]
    fn garbage_and_truncated_input_never_panics() {
        // valid-looking seeds for the trickier formats
        let mut seeds: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 16],
            vec![0xff; 24],
            // numeric 12345.678: ndigits 3, weight 1, sign 0, dscale 3, digits 1 2345 6780
            vec![0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1a, 0x7c],
            // int4[] 2x2 {{1,2},{3,NULL}}
            [
                &2i32.to_be_bytes()[..],
                &1i32.to_be_bytes(),
                &23i32.to_be_bytes(),
                &2i32.to_be_bytes(),
                &1i32.to_be_bytes(),
                &2i32.to_be_bytes(),
                &1i32.to_be_bytes(),
                &4i32.to_be_bytes(),
                &1i32.to_be_bytes(),
                &4i32.to_be_bytes(),
                &2i32.to_be_bytes(),
                &4i32.to_be_bytes(),
                &3i32.to_be_bytes(),
                &(-1i32).to_be_bytes(),
            ]
            .concat(),
            // array claiming a huge dimension
            [
                &1i32.to_be_bytes()[..],
                &0i32.to_be_bytes(),
                &23i32.to_be_bytes(),
                &i32::MAX.to_be_bytes(),
                &1i32.to_be_bytes(),
            ]
            .concat(),
            // array claiming many dimensions whose product overflows
            [
                &6i32.to_be_bytes()[..],
                &0i32.to_be_bytes(),
                &23i32.to_be_bytes(),
            ]
            .concat()
            .into_iter()
            .chain((0..6).flat_map(|_| [0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 1]))
            .collect(),
            // inet 10.1.2.3/8, ipv6 ::1
            vec![2, 8, 0, 4, 10, 1, 2, 3],
            [&[3u8, 128, 1, 16][..], &[0; 15], &[1]].concat(),
            // jsonb
            b"\x01{\"a\": [1, 2.5, \"x\"]}".to_vec(),
            b"{\"a\": [1, 2.5, \"x\\u00e9\"]}".to_vec(),
            // interval
            [
                &(-1_500_000i64).to_be_bytes()[..],
                &(-3i32).to_be_bytes(),
                &14i32.to_be_bytes(),
            ]
            .concat(),
        ];
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200 {
            let len = (rng >> 59) as usize + (rng >> 20) as usize % 40;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                v.push(rng as u8);
            }
            seeds.push(v);
        }
        for codec in all_codecs() {
            for seed in &seeds {
                for cut in 0..=seed.len() {
                    let b = &seed[..cut];
                    for quote in [true, false] {
                        let mut out = Vec::new();
                        if write_value(&codec, b, &mut out, quote).is_some() && quote {
                            let text = String::from_utf8(out).expect("utf-8 output");
                            serde_json::from_str::<serde_json::Value>(&text)
                                .unwrap_or_else(|e| panic!("{codec:?} {b:?} → {text}: {e}"));
                        }
                    }
                    // flipped bytes
                    let mut flipped = b.to_vec();
                    for i in 0..flipped.len() {
                        flipped[i] ^= 0x80;
                        let _ = render(&codec, &flipped);
                        flipped[i] ^= 0x80;
                    }
                }
            }
        }
        // write_cell maps failures to null without leaving partial output
        let mut out = b"x".to_vec();
        write_cell(
            Some(&Codec::Array(Box::new(Codec::Int4))),
            Some(&seeds[4][..seeds[4].len() - 2]),
            &mut out,
            true,
        );
        assert_eq!(out, b"xnull");
    }

    #[test]
    fn binary_decoders_spot_checks() {
        assert_eq!(
            render(
                &Codec::Numeric,
                &[0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1a, 0x7c]
            )
            .unwrap(),
            "\"12345.678\""
        );
        assert_eq!(
            render(&Codec::Inet, &[2, 8, 0, 4, 10, 1, 2, 3]).unwrap(),
            "\"10.1.2.3/8\""
        );
        assert_eq!(
            render(&Codec::Inet, &[2, 32, 1, 4, 10, 1, 2, 3]).unwrap(),
            "\"10.1.2.3/32\""
        );
        assert_eq!(render(&Codec::Char, &[0xe9]).unwrap(), r#""\\351""#);
        assert_eq!(
            render(&Codec::Date, &0i32.to_be_bytes()).unwrap(),
            "\"2000-01-01\""
        );
        assert_eq!(
            render(&Codec::Date, &(-730_485i32 - 365).to_be_bytes()).unwrap(),
            "\"-0001-01-01\""
        );
        assert_eq!(
            render(&Codec::Time, &86_400_000_000i64.to_be_bytes()).unwrap(),
            "\"24:00:00\""
        );
        assert_eq!(render(&Codec::Time, &(-1i64).to_be_bytes()), None);
    }
}
