//! The fuzz targets' properties (fuzz/props.rs) run as an ordinary test: every file of the
//! committed corpora (fuzz/corpus/<target>/) plus ~20,000 deterministic pseudo-random inputs
//! built from RESP and SQL fragments, so CI catches regressions without cargo-fuzz or nightly.

#[path = "../fuzz/props.rs"]
mod props;

use props::XorShift;
use std::path::PathBuf;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => return Vec::new(),
    };
    files.sort();
    files
        .into_iter()
        .map(|p| std::fs::read(&p).expect("read corpus file"))
        .collect()
}

/// Runs `prop` on `input`, naming the case if it panics.
fn check(name: &str, case: usize, input: &[u8], prop: fn(&[u8])) {
    if let Err(e) = std::panic::catch_unwind(|| prop(input)) {
        eprintln!("{name} case {case} failed on input {input:?}");
        std::panic::resume_unwind(e);
    }
}

fn pick<'a>(rng: &mut XorShift, items: &[&'a [u8]]) -> &'a [u8] {
    items[rng.below(items.len())]
}

fn small_number(rng: &mut XorShift) -> Vec<u8> {
    match rng.below(8) {
        0 => b"-1".to_vec(),
        1 => b"0".to_vec(),
        2 => b"99999999999999999999".to_vec(),
        3 => b"1048577".to_vec(),
        4 => b"01".to_vec(),
        _ => rng.below(12).to_string().into_bytes(),
    }
}

// ---------------------------------------------------------------------------------------------

fn gen_request_bytes(rng: &mut XorShift) -> Vec<u8> {
    let mut out = vec![
        rng.below(256) as u8,
        rng.below(256) as u8,
        rng.below(256) as u8,
    ];
    let words: &[&[u8]] = &[
        b"PING",
        b"GET",
        b"SET",
        b"EMP.GET",
        b"k",
        b"",
        b"a b",
        b"\xff\xfe",
        b"\r\n",
        b"\0",
    ];
    for _ in 0..1 + rng.below(5) {
        match rng.below(6) {
            // A well-formed multibulk request.
            0 | 1 => {
                let n = 1 + rng.below(4);
                out.extend_from_slice(format!("*{n}\r\n").as_bytes());
                for _ in 0..n {
                    let w = pick(rng, words);
                    out.extend_from_slice(format!("${}\r\n", w.len()).as_bytes());
                    out.extend_from_slice(w);
                    out.extend_from_slice(b"\r\n");
                }
            }
            // An inline command with quotes and escapes.
            2 => {
                let parts: &[&[u8]] = &[
                    b"PING", b"set", b" ", b"  ", b"\"", b"'", b"\\x41", b"\\", b"\\'", b"a",
                    b"\t", b"\r", b"\"a b\"", b"'c d'",
                ];
                for _ in 0..1 + rng.below(6) {
                    out.extend_from_slice(pick(rng, parts));
                }
                out.extend_from_slice(if rng.below(2) == 0 { b"\r\n" } else { b"\n" });
            }
            // Header soup: counts, lengths, CRLFs in odd places.
            3 | 4 => {
                let parts: &[&[u8]] = &[
                    b"*", b"$", b"\r\n", b"\r", b"\n", b"x", b"PING", b"+", b" ", b"\xff",
                ];
                for _ in 0..1 + rng.below(10) {
                    if rng.below(3) == 0 {
                        out.extend_from_slice(&small_number(rng));
                    } else {
                        out.extend_from_slice(pick(rng, parts));
                    }
                }
            }
            // Random bytes.
            _ => {
                for _ in 0..rng.below(16) {
                    out.push(rng.below(256) as u8);
                }
            }
        }
    }
    // Sometimes cut the tail off.
    if rng.below(4) == 0 && out.len() > 3 {
        let keep = 3 + rng.below(out.len() - 3);
        out.truncate(keep);
    }
    out
}

fn gen_frame(rng: &mut XorShift, depth: usize, out: &mut Vec<u8>) {
    let simple: &[&[u8]] = &[
        b"+OK\r\n",
        b"-ERR x\r\n",
        b":-12\r\n",
        b"_\r\n",
        b",1.5\r\n",
        b",inf\r\n",
        b"#t\r\n",
        b"#f\r\n",
        b"(12345678901234567890\r\n",
        b"$-1\r\n",
        b"*-1\r\n",
        b"$0\r\n\r\n",
        b"=7\r\ntxt:abc\r\n",
        b"!3\r\nerr\r\n",
        b"$4\r\na\r\nb\r\n",
    ];
    if depth == 0 || rng.below(3) > 0 {
        out.extend_from_slice(pick(rng, simple));
        return;
    }
    let kinds = b"*~>%|";
    let kind = kinds[rng.below(kinds.len())];
    let n = rng.below(4);
    out.push(kind);
    out.extend_from_slice(format!("{n}\r\n").as_bytes());
    let elems = match kind {
        b'%' => n * 2,
        b'|' => n * 2 + 1,
        _ => n,
    };
    for _ in 0..elems {
        gen_frame(rng, depth - 1, out);
    }
}

fn gen_frames(rng: &mut XorShift) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(3) {
        gen_frame(rng, 4, &mut out);
    }
    // Mutations: truncate, flip a byte, insert junk.
    for _ in 0..rng.below(3) {
        if out.is_empty() {
            break;
        }
        let at = rng.below(out.len());
        match rng.below(4) {
            0 => out.truncate(at),
            1 => out[at] = rng.below(256) as u8,
            2 => {
                let junk: &[&[u8]] = &[b"\r\n", b"\r", b"\n", b"-", b"9", b"*", b"?", b"$"];
                let j = pick(rng, junk);
                out.splice(at..at, j.iter().copied());
            }
            _ => out.insert(at, b"0123456789"[rng.below(10)]),
        }
    }
    out
}

fn gen_sql(rng: &mut XorShift) -> Vec<u8> {
    let parts: &[&[u8]] = &[
        b"SELECT ",
        b"1",
        b" * ",
        b"FROM employees",
        b" e",
        b";",
        b" DELETE FROM employees",
        b"/*",
        b"*/",
        b"$$",
        b"$x$",
        b"'",
        b"''",
        b"--",
        b"\n",
        b"(",
        b")",
        b"WITH d AS (",
        b"DELETE FROM t RETURNING *",
        b" FOR UPDATE",
        b"pg_sleep(1)",
        b"TABLE ",
        b"\"",
        b" UNION ",
        b"VALUES (1)",
        b"E'\\''",
        b"\xc3\xa9",
        b" WHERE id = $1",
        b", ",
        b"count(*)",
        b"::text",
        b"INSERT INTO t VALUES (1)",
        b"COPY employees TO STDOUT",
        b"SET ROLE postgres",
        b" LIMIT 1",
        b"public.",
        b" AS t(a int)",
    ];
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(12) {
        out.extend_from_slice(pick(rng, parts));
    }
    out
}

// ---------------------------------------------------------------------------------------------

#[test]
fn request_parser_corpus_and_seeded() {
    let files = corpus("request_parser");
    for (i, f) in files.iter().enumerate() {
        check("request_parser corpus", i, f, props::request_parser);
    }
    let mut rng = XorShift::new(0x5EED_0001);
    for i in 0..9_000 {
        let input = gen_request_bytes(&mut rng);
        check("request_parser", i, &input, props::request_parser);
    }
}

#[test]
fn frame_scanner_corpus_and_seeded() {
    let files = corpus("frame_scanner");
    for (i, f) in files.iter().enumerate() {
        check("frame_scanner corpus", i, f, props::frame_scanner);
    }
    let mut rng = XorShift::new(0x5EED_0002);
    for i in 0..9_000 {
        let input = gen_frames(&mut rng);
        check("frame_scanner", i, &input, props::frame_scanner);
    }
}

#[test]
fn sql_check_corpus_and_seeded() {
    let files = corpus("sql_check");
    for (i, f) in files.iter().enumerate() {
        check("sql_check corpus", i, f, props::sql_check);
    }
    let mut rng = XorShift::new(0x5EED_0003);
    for i in 0..2_000 {
        let input = gen_sql(&mut rng);
        check("sql_check", i, &input, props::sql_check);
    }
    // Deep nesting is refused by the parser's recursion limit, not by a stack overflow.
    let deep = format!("SELECT {}1{}", "(".repeat(5_000), ")".repeat(5_000));
    check("sql_check deep", 0, deep.as_bytes(), props::sql_check);
    assert!(cachefront::db::sql::check_read_only(&deep).is_err());
}

/// Regression (found by this seeded run, fixed in 34f2cb1): an empty line where a frame (or an
/// aggregate's element) should start is an error, not a panic in `&buf[start + 1..line_end]`.
#[test]
fn frame_scanner_empty_line_is_an_error() {
    for input in [
        &b"\r\n"[..],
        b"*1\r\n\r\n",
        b"%1\r\n+a\r\n\r\n",
        b"\r\n#t\r\n_\r",
    ] {
        let r =
            std::panic::catch_unwind(|| cachefront::protocol::FrameScanner::default().scan(input));
        assert!(
            matches!(r, Ok(Err(_)) | Ok(Ok(Some(_)))),
            "{input:?}: {r:?}"
        );
    }
}

/// Regression (fixed in 34f2cb1): aggregate lengths add up in the scanner's `owed` counter;
/// twenty nested arrays of 10^18 - 1 elements once overflowed it (a debug-build panic; a
/// wrapped count, and so a wrong frame end, in release).
#[test]
fn frame_scanner_nested_huge_aggregates_do_not_overflow() {
    let input = b"*999999999999999999\r\n".repeat(20);
    let r = std::panic::catch_unwind(|| cachefront::protocol::FrameScanner::default().scan(&input));
    assert!(r.is_ok(), "scan panicked");
}
