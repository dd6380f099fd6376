//! Rendering of PostgreSQL result rows as JSON (SPEC "JSON rows").
//!
//! Cells are read in PostgreSQL's *binary* wire format (tokio-postgres always asks for binary
//! results) and decoded here, type by type, with bounds checks everywhere: a malformed or
//! truncated value renders as `null` (or `None` from [`cell_text`]) and never panics.
//!
//! The output matches Python's `json.dumps(obj)` byte for byte for the same values
//! (separators `", "` / `": "`, `ensure_ascii=True` escaping, floats as `repr(float)`), because
//! applications that fill the cache by hand from Python write such JSON under the same keys.
//! The text itself is written by serde_json with a formatter of ours ([`PyFormatter`]);
//! this module only maps PostgreSQL's values onto JSON values.
//! Rows are objects in column order; duplicate column names behave like a Python dict built
//! from the row (the key keeps its first position and takes the last value).
//!
//! Types this module does not decode ([`decodes_natively`] is false: money, bit/varbit, ranges,
//! composites, geometric types, tsvector/tsquery, pg_lsn, xid, reg* aliases, extension types
//! other than citext, ...) must be cast by the caller with [`text_cast`], so they arrive as
//! `text` / `text[]` and render as strings / arrays of strings.
//!
//! `json`/`jsonb` values are parsed by serde_json (features `float_roundtrip` for exact
//! doubles, `unbounded_depth` for our own depth limit) and embedded re-formatted the way
//! Python would re-serialize them after `json.loads`: same separators, `ensure_ascii`
//! escaping, key order preserved, duplicate keys collapsed like a dict (first position, last
//! value), integers kept exactly (`-0` becomes `0`), other numbers as `repr(float(x))`, lone
//! surrogate escapes kept. Two deliberate deviations keep the output valid JSON where
//! Python's would not be (or would fail): a number that overflows a double keeps its
//! original text (Python would print `Infinity`), and a document nested deeper than
//! [`MAX_JSON_DEPTH`] is embedded as a JSON string holding its text. (So is, in the one case
//! where the stand-ins of [`with_stand_ins`] cannot be used, a document that needs them.)

use postgres_types::{FromSql, Kind, Type};
use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::ser::{CharEscape, Formatter};
use std::borrow::Cow;
use std::collections::HashMap;
use std::error::Error;
use std::io;
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

/// What every row of one result shares: its keys, already rendered, and how each column is
/// decoded. Kept apart from [`JsonRows`] so rows can be rendered from plain cells (the
/// formatting benchmark has no PostgreSQL `Row` to hand).
struct Layout {
    /// `"name": ` of each distinct key, in output order.
    keys: Vec<Vec<u8>>,
    /// The column whose value each key shows (Python dict semantics: the last duplicate).
    value_col: Vec<usize>,
    codecs: Vec<Option<Codec>>,
}

impl Layout {
    /// Keys for `names` (Python dict semantics for duplicates: first position, last value).
    fn new<'n>(names: impl Iterator<Item = &'n str>, codecs: Vec<Option<Codec>>) -> Layout {
        let mut keys: Vec<Vec<u8>> = Vec::with_capacity(codecs.len());
        let mut value_col: Vec<usize> = Vec::with_capacity(codecs.len());
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, name) in names.enumerate() {
            if let Some(&slot) = seen.get(name) {
                value_col[slot] = i;
            } else {
                seen.insert(name, keys.len());
                let mut key = Vec::with_capacity(name.len() + 4);
                write_json_str(&mut key, name);
                key.extend_from_slice(KEY_SEP);
                keys.push(key);
                value_col.push(i);
            }
        }
        Layout {
            keys,
            value_col,
            codecs,
        }
    }

    /// Appends one row object; `cell(i)` gives the binary value of column `i` (None: NULL).
    fn write_row<'r>(&self, cell: impl Fn(usize) -> Option<&'r [u8]>, out: &mut Vec<u8>) {
        out.push(b'{');
        for (k, (key, &col)) in self.keys.iter().zip(self.value_col.iter()).enumerate() {
            if k > 0 {
                out.extend_from_slice(ITEM_SEP);
            }
            out.extend_from_slice(key);
            let codec = self.codecs.get(col).and_then(Option::as_ref);
            write_cell(codec, cell(col), out);
        }
        out.push(b'}');
    }
}

/// The JSON array of [`write_rows_json`], built one row at a time as rows arrive from
/// PostgreSQL, so a caller can stop as soon as the text grows past its limit — before the
/// rest of the result is ever in memory.
pub struct JsonRows {
    layout: Layout,
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
        let names = columns
            .iter()
            .enumerate()
            .map(|(i, col)| names.get(i).copied().unwrap_or_else(|| col.name()));
        JsonRows {
            layout: Layout::new(names, codecs),
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
        if self.rows > 0 {
            self.out.extend_from_slice(ITEM_SEP);
        }
        self.layout
            .write_row(|col| raw_cell(row, col), &mut self.out);
        self.rows += 1;
    }

    /// A lower bound of how many bytes [`push`](Self::push) would add for `row`, computed
    /// without rendering it: strings render to at least their own bytes plus quotes, bytea to
    /// twice its bytes plus `"\\x"`. It lets a caller refuse a huge row before rendering
    /// it (which could take several times its size), and never refuses one that would fit.
    pub fn min_added_len(&self, row: &Row) -> usize {
        let layout = &self.layout;
        layout
            .value_col
            .iter()
            .map(|&col| match (layout.codecs.get(col), raw_cell(row, col)) {
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
        let keys: usize = self.layout.keys.iter().map(Vec::len).sum();
        let estimate = self.min_added_len(row) + keys + 34 * self.layout.keys.len() + 4;
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
fn write_cell(codec: Option<&Codec>, raw: Option<&[u8]>, out: &mut Vec<u8>) {
    let mark = out.len();
    let ok = match (codec, raw) {
        (Some(c), Some(b)) => write_value(c, b, out, true).is_some(),
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

/// One decoded scalar, as the JSON value it renders to. Arrays and json documents are not
/// here: they are written by [`write_array`] and [`write_embedded_json`], which own their
/// structure.
enum Scalar<'a> {
    Bool(bool),
    Int(i64),
    Float4(f32),
    Float8(f64),
    /// Everything PostgreSQL prints as text (and NaN / ±Infinity, which JSON cannot hold).
    Str(Cow<'a, str>),
}

impl Serialize for Scalar<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Scalar::Bool(v) => s.serialize_bool(*v),
            Scalar::Int(v) => s.serialize_i64(*v),
            Scalar::Float4(v) => s.serialize_f32(*v),
            Scalar::Float8(v) => s.serialize_f64(*v),
            Scalar::Str(v) => s.serialize_str(v),
        }
    }
}

/// A float as its JSON value: a number, or for NaN / ±Infinity the string Python's
/// `float` prints (JSON has no such numbers; SPEC renders them as strings).
fn float<'a>(finite: bool, nan: bool, positive: bool, number: Scalar<'a>) -> Scalar<'a> {
    if finite {
        number
    } else if nan {
        Scalar::Str(Cow::Borrowed("NaN"))
    } else if positive {
        Scalar::Str(Cow::Borrowed("Infinity"))
    } else {
        Scalar::Str(Cow::Borrowed("-Infinity"))
    }
}

/// Writes one value. `quote` is false only for the top level of [`cell_text`], where a
/// string is written as is rather than as a JSON string.
/// Returns None on malformed input (the caller truncates what was written).
fn write_value(c: &Codec, b: &[u8], out: &mut Vec<u8>, quote: bool) -> Option<()> {
    match c {
        Codec::Json => return write_embedded_json(out, std::str::from_utf8(b).ok()?),
        Codec::Jsonb => match b.split_first() {
            Some((1, rest)) => return write_embedded_json(out, std::str::from_utf8(rest).ok()?),
            _ => return None,
        },
        Codec::Array(elem) => return write_array(elem, b, out),
        _ => {}
    }
    match decode_scalar(c, b)? {
        Scalar::Str(s) if !quote => out.extend_from_slice(s.as_bytes()),
        v => write_json(out, &v, PyFormatter::default())?,
    }
    Some(())
}

/// Decodes a cell of any type but json, jsonb and arrays; None on malformed input.
fn decode_scalar<'a>(c: &Codec, b: &'a [u8]) -> Option<Scalar<'a>> {
    let text = |s: String| Some(Scalar::Str(Cow::Owned(s)));
    match c {
        Codec::Bool => match b {
            [0] => Some(Scalar::Bool(false)),
            [_] => Some(Scalar::Bool(true)),
            _ => None,
        },
        Codec::Int2 => Some(Scalar::Int(i16::from_be_bytes(arr(b)?).into())),
        Codec::Int4 => Some(Scalar::Int(i32::from_be_bytes(arr(b)?).into())),
        Codec::Int8 => Some(Scalar::Int(i64::from_be_bytes(arr(b)?))),
        Codec::Oid => Some(Scalar::Int(u32::from_be_bytes(arr(b)?).into())),
        Codec::Float4 => {
            let v = f32::from_be_bytes(arr(b)?);
            Some(float(v.is_finite(), v.is_nan(), v > 0.0, Scalar::Float4(v)))
        }
        Codec::Float8 => {
            let v = f64::from_be_bytes(arr(b)?);
            Some(float(v.is_finite(), v.is_nan(), v > 0.0, Scalar::Float8(v)))
        }
        Codec::Numeric => {
            let mut s = String::new();
            numeric_text(b, &mut s)?;
            text(s)
        }
        Codec::Text => Some(Scalar::Str(String::from_utf8_lossy(b))),
        Codec::Char => text(char_text(b)?),
        Codec::Uuid => {
            let u: [u8; 16] = arr(b)?;
            let mut s = String::with_capacity(36);
            for (i, byte) in u.iter().enumerate() {
                if matches!(i, 4 | 6 | 8 | 10) {
                    s.push('-');
                }
                push_hex_byte(&mut s, *byte);
            }
            text(s)
        }
        Codec::Date => {
            let mut s = String::with_capacity(12);
            match i32::from_be_bytes(arr(b)?) {
                i32::MAX => s.push_str("infinity"),
                i32::MIN => s.push_str("-infinity"),
                d => push_date(&mut s, d as i64),
            }
            text(s)
        }
        Codec::Time => {
            let mut s = String::with_capacity(16);
            push_time(&mut s, i64::from_be_bytes(arr(b)?))?;
            text(s)
        }
        Codec::TimeTz => text(timetz_text(b)?),
        Codec::Timestamp | Codec::TimestampTz => text(timestamp_text(b, *c == Codec::TimestampTz)?),
        Codec::Interval => {
            let mut s = String::with_capacity(32);
            interval_text(b, &mut s)?;
            text(s)
        }
        Codec::JsonPath => match b.split_first() {
            Some((1, rest)) => Some(Scalar::Str(String::from_utf8_lossy(rest))),
            _ => None,
        },
        Codec::Bytea => {
            let mut s = String::with_capacity(2 + 2 * b.len());
            s.push_str("\\x");
            for byte in b {
                push_hex_byte(&mut s, *byte);
            }
            text(s)
        }
        Codec::Inet => {
            let mut s = String::with_capacity(48);
            inet_text(b, &mut s)?;
            text(s)
        }
        Codec::MacAddr => text(mac_text(b, 6)?),
        Codec::MacAddr8 => text(mac_text(b, 8)?),
        Codec::Json | Codec::Jsonb | Codec::Array(_) => None,
    }
}

/// The one-byte `"char"` type as PostgreSQL's charout prints it (high bytes in octal).
fn char_text(b: &[u8]) -> Option<String> {
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
    Some(s)
}

/// timetz: microseconds since midnight, then the zone as seconds *west* of UTC.
fn timetz_text(b: &[u8]) -> Option<String> {
    let mut cur = Cur(b);
    let t = i64::from_be_bytes(arr(cur.take(8)?)?);
    let zone = cur.i32()?;
    if !cur.0.is_empty() {
        return None;
    }
    let mut s = String::with_capacity(24);
    push_time(&mut s, t)?;
    push_offset(&mut s, -(zone as i64));
    Some(s)
}

/// timestamp / timestamptz (always UTC on our connections) as ISO 8601.
fn timestamp_text(b: &[u8], with_zone: bool) -> Option<String> {
    let mut s = String::with_capacity(32);
    match i64::from_be_bytes(arr(b)?) {
        i64::MAX => s.push_str("infinity"),
        i64::MIN => s.push_str("-infinity"),
        t => {
            const DAY: i64 = 86_400_000_000;
            push_date(&mut s, t.div_euclid(DAY));
            s.push('T');
            push_time(&mut s, t.rem_euclid(DAY))?;
            if with_zone {
                s.push_str("+00:00");
            }
        }
    }
    Some(s)
}

/// macaddr (`n` = 6) / macaddr8 (`n` = 8) as colon-separated hex.
fn mac_text(b: &[u8], n: usize) -> Option<String> {
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
    Some(s)
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
            out.extend_from_slice(ITEM_SEP);
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

/// Between array items and object members, as Python's default `separators` print it.
const ITEM_SEP: &[u8] = b", ";
/// Between an object key and its value, as Python prints it.
const KEY_SEP: &[u8] = b": ";

/// Stand-ins let the rare documents serde_json would not hand back as they are travel
/// through it anyway, as code points of plane 16's private use area from here on (see
/// [`with_stand_ins`]): a lone UTF-16 surrogate `s` (Python keeps it, serde_json refuses it)
/// as `LONE_BASE + (s - 0xD800)`, and a number whose text serde_json would not keep
/// ([`needs_text`]) as a string that starts with [`NUMBER_MARK`].
const STAND_IN_BASE: u32 = 0x10_F000;
/// Marks a string stand-in for a number (its text follows).
const NUMBER_MARK: char = '\u{10F000}';
/// The first lone-surrogate stand-in (`\ud800`); the last is U+10FFFF (`\udfff`).
const LONE_BASE: u32 = 0x10_F800;

/// serde_json formatter that prints what Python's `json.dumps` prints: `", "` / `": "`
/// separators, `ensure_ascii` escaping (`\u00e9`, surrogate pairs beyond the BMP) and floats
/// as `repr(float)`. Everything else (structure, `null`, booleans, integers, the escapes of
/// `"`, `\` and control characters) is serde_json's own output, which already matches.
#[derive(Clone, Copy, Default)]
struct PyFormatter {
    /// The document holds stand-ins (code points from [`STAND_IN_BASE`] on), to print back.
    stand_ins: bool,
    /// With stand-ins, a string's opening quote waits for its first fragment: a number
    /// stand-in is printed without quotes.
    quote_pending: bool,
    /// The string being printed is a number stand-in (no closing quote).
    bare: bool,
}

impl PyFormatter {
    /// Writes the opening quote [`begin_string`](Formatter::begin_string) held back.
    fn open_quote<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        if std::mem::take(&mut self.quote_pending) {
            w.write_all(b"\"")?;
        }
        Ok(())
    }
}

impl Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(ITEM_SEP)
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.begin_array_value(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(KEY_SEP)
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, w: &mut W, v: f32) -> io::Result<()> {
        // float4 prints its own shortest digits (what PostgreSQL prints), not f64's.
        write_py_repr(w, ryu::Buffer::new().format_finite(v))
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, v: f64) -> io::Result<()> {
        write_py_repr(w, ryu::Buffer::new().format_finite(v))
    }

    fn begin_string<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        if self.stand_ins {
            self.quote_pending = true;
            Ok(())
        } else {
            w.write_all(b"\"")
        }
    }

    fn end_string<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open_quote(w)?;
        if std::mem::take(&mut self.bare) {
            Ok(())
        } else {
            w.write_all(b"\"")
        }
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        e: CharEscape,
    ) -> io::Result<()> {
        self.open_quote(w)?;
        w.write_all(match e {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"\\/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(b) => return write_unit_escape(w, b.into()),
        })
    }

    /// serde_json hands over runs without `"`, `\` and control characters; what is left
    /// to escape for `ensure_ascii` is DEL and everything beyond ASCII.
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        s: &str,
    ) -> io::Result<()> {
        if self.quote_pending {
            if let Some(number) = s.strip_prefix(NUMBER_MARK) {
                self.quote_pending = false;
                self.bare = true;
                return write_py_number(w, number);
            }
            self.open_quote(w)?;
        }
        let mut start = 0;
        for (i, ch) in s.char_indices() {
            if (' '..='~').contains(&ch) {
                continue;
            }
            w.write_all(&s.as_bytes()[start..i])?;
            start = i + ch.len_utf8();
            let code = u32::from(ch);
            if self.stand_ins && code >= LONE_BASE {
                write_unit_escape(w, (code - LONE_BASE + 0xD800) as u16)?;
                continue;
            }
            let mut units = [0u16; 2];
            for u in ch.encode_utf16(&mut units) {
                write_unit_escape(w, *u)?;
            }
        }
        w.write_all(&s.as_bytes()[start..])
    }
}

/// A `\u` escape of four lowercase hex digits (`\u00e9`), as Python writes it.
fn write_unit_escape<W: ?Sized + io::Write>(w: &mut W, u: u16) -> io::Result<()> {
    let mut esc = *b"\\u0000";
    for (i, shift) in [12, 8, 4, 0].into_iter().enumerate() {
        esc[2 + i] = HEX[((u >> shift) & 15) as usize];
    }
    w.write_all(&esc)
}

/// Serializes `v` into `out` through serde_json with `formatter`; None if it fails (only
/// possible for a malformed value, never for the writer: it is a `Vec`).
fn write_json<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    v: &T,
    formatter: PyFormatter,
) -> Option<()> {
    v.serialize(&mut serde_json::Serializer::with_formatter(out, formatter))
        .ok()
}

/// A JSON string literal escaped like Python's `json.dumps` with `ensure_ascii=True`.
pub(crate) fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // A str always serializes; a Vec writer cannot fail.
    let _ = write_json(out, s, PyFormatter::default());
}

/// A number's text as Python re-prints it after `json.loads`:
/// integers exactly (`-0` becomes `0`), others as `repr(float(text))` — but a number that
/// overflows a double keeps its text (Python would print `Infinity`, which is not JSON).
fn write_py_number<W: ?Sized + io::Write>(w: &mut W, text: &str) -> io::Result<()> {
    if !text.contains(['.', 'e', 'E']) {
        return w.write_all(if text == "-0" { b"0" } else { text.as_bytes() });
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() => write_py_repr(w, ryu::Buffer::new().format_finite(f)),
        _ => w.write_all(text.as_bytes()),
    }
}

/// A finite float as Python's `repr(float)`, from Ryu's shortest round-trip text of it.
fn write_py_repr<W: ?Sized + io::Write>(w: &mut W, ryu_text: &str) -> io::Result<()> {
    let (neg, body) = match ryu_text.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, ryu_text),
    };
    let (mant, exp) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (body, 0),
    };
    let int_len = mant.find('.').unwrap_or(mant.len()) as i32;
    // At most 17 significant digits plus Ryu's padding zeros (e.g. "100000000000000000.0").
    let mut buf = [0u8; 32];
    let mut n = 0;
    for d in mant.bytes().filter(u8::is_ascii_digit) {
        if n == buf.len() {
            return w.write_all(ryu_text.as_bytes());
        }
        buf[n] = d;
        n += 1;
    }
    let lead = buf[..n].iter().take_while(|d| **d == b'0').count();
    let mut digits = &buf[lead..n];
    let decpt = int_len + exp - lead as i32; // value = 0.DIGITS * 10^decpt
    while let [rest @ .., b'0'] = digits {
        digits = rest;
    }
    if neg {
        w.write_all(b"-")?;
    }
    if digits.is_empty() {
        return w.write_all(b"0.0");
    }
    let n = digits.len() as i32;
    if decpt <= -4 || decpt > 16 {
        w.write_all(&digits[..1])?;
        if n > 1 {
            w.write_all(b".")?;
            w.write_all(&digits[1..])?;
        }
        let e = decpt - 1;
        w.write_all(if e < 0 { b"e-" } else { b"e+" })?;
        if e.abs() < 10 {
            w.write_all(b"0")?;
        }
        w.write_all(itoa::Buffer::new().format(e.abs()).as_bytes())
    } else if decpt <= 0 {
        w.write_all(b"0.")?;
        for _ in 0..-decpt {
            w.write_all(b"0")?;
        }
        w.write_all(digits)
    } else if decpt < n {
        w.write_all(&digits[..decpt as usize])?;
        w.write_all(b".")?;
        w.write_all(&digits[decpt as usize..])
    } else {
        w.write_all(digits)?;
        for _ in 0..decpt - n {
            w.write_all(b"0")?;
        }
        w.write_all(b".0")
    }
}

/// A json/jsonb document, re-formatted as Python's json.dumps(json.loads(text)) would print
/// it; text that does not parse (or is nested too deeply) is embedded as a JSON string.
fn write_embedded_json(out: &mut Vec<u8>, text: &str) -> Option<()> {
    let survey = survey(text);
    if !survey.too_deep && !survey.needs_text {
        if let Ok(doc) = parse_unbounded(text) {
            return write_json(out, &doc, PyFormatter::default());
        }
    }
    // The rare document serde_json does not take as it is: try it with stand-ins.
    let swapped = (!survey.too_deep).then(|| with_stand_ins(text)).flatten();
    if let Some(doc) = swapped.as_deref().and_then(|t| parse_unbounded(t).ok()) {
        let formatter = PyFormatter {
            stand_ins: true,
            ..PyFormatter::default()
        };
        return write_json(out, &doc, formatter);
    }
    write_json(out, text, PyFormatter::default())
}

/// serde_json's parser without its own nesting limit of 128 ([`survey`] has already
/// checked ours, [`MAX_JSON_DEPTH`], which is what bounds the recursion).
fn parse_unbounded(text: &str) -> serde_json::Result<Node<'_>> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    let doc = Node::deserialize(&mut de)?;
    de.end()?;
    Ok(doc)
}

/// An embedded json document as serde_json parses it: strings without escapes borrow from
/// the text, and objects keep their members in order (no hashing: most objects are small).
enum Node<'a> {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(Cow<'a, str>),
    Arr(Vec<Node<'a>>),
    Obj(Vec<(Cow<'a, str>, Node<'a>)>),
}

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node<'de>, E> {
        Ok(Node::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node<'de>, E> {
        Ok(Node::U64(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node<'de>, E> {
        Ok(Node::I64(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node<'de>, E> {
        Ok(Node::F64(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Node<'de>, E> {
        Ok(Node::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node<'de>, E> {
        Ok(Node::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Node<'de>, E> {
        Ok(Node::Str(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let mut members = Members::default();
        while let Some(key) = map.next_key::<Node<'de>>()? {
            let Node::Str(key) = key else {
                return Err(serde::de::Error::custom("object key is not a string"));
            };
            members.insert(key, map.next_value()?);
        }
        Ok(Node::Obj(members.list))
    }
}

/// An object's members with Python's dict semantics for a repeated key: it keeps its first
/// position and takes the last value. Small objects are searched; larger ones indexed.
#[derive(Default)]
struct Members<'a> {
    list: Vec<(Cow<'a, str>, Node<'a>)>,
    index: Option<HashMap<Cow<'a, str>, usize>>,
}

impl<'a> Members<'a> {
    fn insert(&mut self, key: Cow<'a, str>, value: Node<'a>) {
        if self.list.len() >= 16 && self.index.is_none() {
            let index = self.list.iter().enumerate();
            self.index = Some(index.map(|(i, (k, _))| (k.clone(), i)).collect());
        }
        let found = match &self.index {
            Some(index) => index.get(&key).copied(),
            None => self.list.iter().position(|(k, _)| *k == key),
        };
        match found {
            Some(i) => self.list[i].1 = value,
            None => {
                if let Some(index) = self.index.as_mut() {
                    index.insert(key.clone(), self.list.len());
                }
                self.list.push((key, value));
            }
        }
    }
}

impl Serialize for Node<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Null => s.serialize_unit(),
            Node::Bool(b) => s.serialize_bool(*b),
            Node::U64(n) => s.serialize_u64(*n),
            Node::I64(n) => s.serialize_i64(*n),
            Node::F64(n) => s.serialize_f64(*n),
            Node::Str(v) => s.serialize_str(v),
            Node::Arr(items) => s.collect_seq(items),
            Node::Obj(members) => s.collect_map(members.iter().map(|(k, v)| (k, v))),
        }
    }
}

/// What a look at a document's brackets and numbers (outside strings) finds.
struct Survey {
    /// A value sits deeper than [`MAX_JSON_DEPTH`] containers.
    too_deep: bool,
    /// A number needs a stand-in ([`needs_text`]).
    needs_text: bool,
}

/// Looks over the text before serde_json parses it. Only well-formed text is parsed
/// afterwards, so this need not judge anything else.
fn survey(text: &str) -> Survey {
    let b = text.as_bytes();
    let mut found = Survey {
        too_deep: false,
        needs_text: false,
    };
    let (mut open, mut i) = (0usize, 0);
    while i < b.len() {
        match b[i] {
            b']' | b'}' => open = open.saturating_sub(1),
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' => {}
            _ if open > MAX_JSON_DEPTH => {
                found.too_deep = true;
                return found;
            }
            b'[' | b'{' => open += 1,
            b'"' => i = string_end(b, i),
            b'-' | b'0'..=b'9' => {
                let end = number_end(b, i);
                found.needs_text |= needs_text(&text[i..end]);
                i = end - 1;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// The index of the closing quote of the string whose opening quote is at `b[i]` (or the
/// end of the text).
fn string_end(b: &[u8], mut i: usize) -> usize {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i,
            _ => i += 1,
        }
    }
    b.len()
}

/// The end of the number token starting at `b[i]`.
fn number_end(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .position(|c| !matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
        .map_or(b.len(), |n| i + n)
}

/// Whether a number token must reach the formatter as its text ([`write_py_number`]):
/// serde_json hands integers over as u64 / i64 and other numbers as f64, which loses an
/// integer beyond 64 bits (Python keeps it exactly) and `-0` (Python prints `0`), and
/// refuses a number that overflows a double (we keep its text). Invalid tokens are left
/// alone: the parse refuses them anyway.
fn needs_text(token: &str) -> bool {
    let lost = if token.contains(['.', 'e', 'E']) {
        token.parse::<f64>().is_ok_and(f64::is_infinite)
    } else if token.starts_with('-') {
        token == "-0" || token.parse::<i64>().is_err()
    } else {
        token.parse::<u64>().is_err()
    };
    lost && is_json_number(token)
}

/// RFC 8259's number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn is_json_number(token: &str) -> bool {
    fn digits(s: &str) -> (&str, &str) {
        let n = s.bytes().take_while(u8::is_ascii_digit).count();
        s.split_at(n)
    }
    let s = token.strip_prefix('-').unwrap_or(token);
    let (int, mut rest) = digits(s);
    if int.is_empty() || (int.len() > 1 && int.starts_with('0')) {
        return false;
    }
    if let Some(frac) = rest.strip_prefix('.') {
        let (d, r) = digits(frac);
        if d.is_empty() {
            return false;
        }
        rest = r;
    }
    if let Some(exp) = rest.strip_prefix(['e', 'E']) {
        let (d, r) = digits(exp.strip_prefix(['+', '-']).unwrap_or(exp));
        if d.is_empty() {
            return false;
        }
        rest = r;
    }
    rest.is_empty()
}

/// The document with its lone surrogate escapes (`\ud800` not followed by a low one, or a
/// low one on its own) and its numbers that need their text ([`needs_text`]) replaced by stand-ins, so
/// serde_json parses it and [`PyFormatter`] prints them back as they were. None when the
/// document already holds code points of the stand-in range (they would be mistaken for
/// stand-ins).
fn with_stand_ins(text: &str) -> Option<String> {
    if text.chars().any(|c| u32::from(c) >= STAND_IN_BASE) {
        return None;
    }
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 8);
    let (mut i, mut copied, mut in_str) = (0, 0, false);
    while i < b.len() {
        let (skip, stand_in) = match b[i] {
            b'"' => {
                in_str = !in_str;
                (1, None)
            }
            b'\\' if in_str => escape_stand_in(b, i)?,
            b'-' | b'0'..=b'9' if !in_str => {
                let end = number_end(b, i);
                let token = &text[i..end];
                let stand_in = needs_text(token).then(|| format!("\"{NUMBER_MARK}{token}\""));
                (end - i, stand_in)
            }
            _ => (1, None),
        };
        if let Some(stand_in) = stand_in {
            out.push_str(&text[copied..i]);
            out.push_str(&stand_in);
            copied = i + skip;
        }
        i += skip;
    }
    out.push_str(text.get(copied..)?);
    Some(out)
}

/// For the escape at `b[i]`: how many bytes it takes, and the stand-in of a lone surrogate.
/// None for a surrogate pair that already encodes a code point of the stand-in range.
fn escape_stand_in(b: &[u8], i: usize) -> Option<(usize, Option<String>)> {
    let Some(unit) = unit_escape_at(b, i) else {
        return Some((2, None)); // any other escape (`\\` must not start a new one)
    };
    let low = unit_escape_at(b, i + 6).filter(|u| (0xDC00..0xE000).contains(u));
    match unit {
        0xD800..0xDC00 if low.is_some() => {
            // A real pair: U+10F000 and up have high surrogates 0xDBFC to 0xDBFF.
            (unit < 0xDBFC).then_some((12, None))
        }
        0xD800..0xE000 => {
            let stand_in = char::from_u32(LONE_BASE + u32::from(unit - 0xD800))?;
            Some((6, Some(stand_in.to_string())))
        }
        _ => Some((6, None)),
    }
}

/// The code unit of a `\u` escape (four hex digits) starting at `b[i]`.
fn unit_escape_at(b: &[u8], i: usize) -> Option<u16> {
    let esc = b.get(i..i + 6)?;
    if esc[0] != b'\\' || esc[1] != b'u' || !esc[2..].iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u16::from_str_radix(std::str::from_utf8(&esc[2..]).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f64_repr(v: f64) -> String {
        let mut out = Vec::new();
        write_value(&Codec::Float8, &v.to_be_bytes(), &mut out, true).unwrap();
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
        write_embedded_json(&mut out, text).unwrap();
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

    /// The staff demo row shape (int, text, numeric, date, timestamptz, bool, jsonb) as binary
    /// cells, for the formatting benchmark.
    fn staff_cells() -> (Vec<&'static str>, Vec<Codec>, Vec<Vec<u8>>) {
        let names = vec![
            "id",
            "name",
            "salary",
            "hired",
            "updated_at",
            "active",
            "meta",
        ];
        let codecs = vec![
            Codec::Int4,
            Codec::Text,
            Codec::Numeric,
            Codec::Date,
            Codec::TimestampTz,
            Codec::Bool,
            Codec::Jsonb,
        ];
        let cells = vec![
            42i32.to_be_bytes().to_vec(),
            "Alice Smith".as_bytes().to_vec(),
            // numeric 12345.67: ndigits 3, weight 1, sign 0, dscale 2, digits 1 2345 6700
            vec![0, 3, 0, 1, 0, 0, 0, 2, 0, 1, 0x09, 0x29, 0x1a, 0x2c],
            8_000i32.to_be_bytes().to_vec(),
            700_000_000_123_456i64.to_be_bytes().to_vec(),
            vec![1],
            b"\x01{\"dept\": \"eng\", \"level\": 3, \"skills\": [\"rust\", \"sql\"], \"rate\": 1.5}"
                .to_vec(),
        ];
        (names, codecs, cells)
    }

    /// Formatting cost per row: `valgrind --tool=callgrind --toggle-collect='*bench_format*'
    /// target/release/deps/cachefront-* bench_rows_format --ignored --exact`, then divide
    /// the instruction count by ROWS.
    #[test]
    #[ignore]
    fn bench_rows_format() {
        const ROWS: usize = 10_000;
        let (names, codecs, cells) = staff_cells();
        let out = std::hint::black_box(bench_format(&names, &codecs, &cells, ROWS));
        let mut hash = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&out, &mut hash);
        let row_len = out.len() / ROWS;
        println!(
            "{} bytes, hash {:x}; a row: {}",
            out.len(),
            std::hash::Hasher::finish(&hash),
            String::from_utf8_lossy(&out[1..row_len])
        );
    }

    #[inline(never)]
    fn bench_format(names: &[&str], codecs: &[Codec], cells: &[Vec<u8>], rows: usize) -> Vec<u8> {
        let codecs = codecs.iter().cloned().map(Some).collect();
        let layout = Layout::new(names.iter().copied(), codecs);
        let mut out = vec![b'['];
        for r in 0..rows {
            if r > 0 {
                out.extend_from_slice(ITEM_SEP);
            }
            layout.write_row(|col| cells.get(col).map(Vec::as_slice), &mut out);
        }
        out.push(b']');
        out
    }

    #[test]
    fn embedded_json_depth_limit_and_lone_surrogate_edges() {
        let nest = |n: usize, inner: &str| "[".repeat(n) + inner + &"]".repeat(n);
        // A value may sit MAX_JSON_DEPTH containers deep, not one more.
        for (n, inner) in [(MAX_JSON_DEPTH + 1, ""), (MAX_JSON_DEPTH, "1")] {
            assert_eq!(reformat(&nest(n, inner)), nest(n, inner));
        }
        for (n, inner) in [(MAX_JSON_DEPTH + 2, ""), (MAX_JSON_DEPTH + 1, "1")] {
            assert!(reformat(&nest(n, inner)).starts_with("\"[[["));
        }
        // Brackets inside strings do not count.
        let text = format!("[\"{}\"]", "[".repeat(1000));
        assert_eq!(reformat(&text), format!("[\"{}\"]", "[".repeat(1000)));
        // Lone surrogates anywhere, next to pairs, in keys; escaped backslashes are not escapes.
        assert_eq!(
            reformat(r#"{"\udc00k": ["\ud83d\ude00\udfff", "\\ud800", "\ud800\ud800\udc00"]}"#),
            r#"{"\udc00k": ["\ud83d\ude00\udfff", "\\ud800", "\ud800\ud800\udc00"]}"#
        );
        // Numbers that overflow a double keep their own spelling.
        assert_eq!(
            reformat("[1E999, 1e+999, -1e999, 1E+400, 2e-999, 1.5E3]"),
            "[1E999, 1e+999, -1e999, 1E+400, 0.0, 1500.0]"
        );
        assert_eq!(reformat("[1E999, \"\\ud800\"]"), r#"[1E999, "\ud800"]"#);
        assert_eq!(reformat("{\"a\": 01E999}"), r#""{\"a\": 01E999}""#);
        // Characters of the stand-in range in text that also needs stand-ins: kept as text.
        assert_eq!(
            reformat("[\"\u{10ffff}\", \"\\ud800\"]"),
            r#""[\"\udbff\udfff\", \"\\ud800\"]""#
        );
        assert_eq!(reformat("[\"\u{10ffff}\"]"), r#"["\udbff\udfff"]"#);
    }
}
