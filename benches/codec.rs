//! Micro-benchmarks of the per-request work: request parsing, reply framing, key hashing,
//! and JSON rendering of rows (criterion; `cargo bench --bench codec`).

use bytes::BytesMut;
use cachefront::cache::key::{sql_key, KeyTemplate};
use cachefront::protocol::request::Parsed;
use cachefront::protocol::{FrameScanner, Limits, Proto, Reply, RequestParser};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

fn parse(c: &mut Criterion) {
    let one = b"*2\r\n$7\r\nEMP.GET\r\n$1\r\n1\r\n".to_vec();
    let mut pipeline = Vec::new();
    for _ in 0..16 {
        pipeline.extend_from_slice(b"*3\r\n$3\r\nSET\r\n$8\r\nkey:1234\r\n$10\r\nvalue12345\r\n");
    }
    let limits = Limits::default();
    let mut g = c.benchmark_group("request_parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("emp_get", |b| {
        let mut p = RequestParser::default();
        b.iter(|| {
            let mut buf = BytesMut::from(&one[..]);
            match p.parse(&mut buf, &limits, true).unwrap() {
                Parsed::Request(r) => black_box(r),
                Parsed::Incomplete => unreachable!(),
            };
        })
    });
    g.throughput(Throughput::Elements(16));
    g.bench_function("pipeline_16_set", |b| {
        let mut p = RequestParser::default();
        b.iter(|| {
            let mut buf = BytesMut::from(&pipeline[..]);
            while let Parsed::Request(r) = p.parse(&mut buf, &limits, true).unwrap() {
                black_box(r);
            }
        })
    });
    g.bench_function("inline_16", |b| {
        let inline = b"SET key:1234 value12345\r\n".repeat(16);
        let mut p = RequestParser::default();
        b.iter(|| {
            let mut buf = BytesMut::from(&inline[..]);
            while let Parsed::Request(r) = p.parse(&mut buf, &limits, true).unwrap() {
                black_box(r);
            }
        })
    });
    g.finish();
}

fn frames(c: &mut Criterion) {
    let bulk = b"$13\r\nAlice Johnson\r\n".to_vec();
    let mut array = b"*100\r\n".to_vec();
    for i in 0..100 {
        array.extend_from_slice(format!("$6\r\nval{i:03}\r\n").as_bytes());
    }
    let mut g = c.benchmark_group("frame_scan");
    g.bench_function("bulk", |b| {
        b.iter(|| FrameScanner::default().scan(black_box(&bulk)).unwrap())
    });
    g.bench_function("array_100", |b| {
        b.iter(|| FrameScanner::default().scan(black_box(&array)).unwrap())
    });
    g.bench_function("reply_encode_map", |b| {
        let r = Reply::Map(vec![
            (Reply::text("name"), Reply::text("Alice Johnson")),
            (Reply::text("job_title"), Reply::text("Accountant")),
        ]);
        let mut out = BytesMut::with_capacity(256);
        b.iter(|| {
            out.clear();
            r.encode(Proto::Resp3, &mut out);
            black_box(&out);
        })
    });
    g.finish();
}

fn keys(c: &mut Criterion) {
    let q = "SELECT employees.name AS employee_name, departments.name AS department_name, employees.job_title FROM employees INNER JOIN departments ON employees.dept_id = departments.id";
    let t = KeyTemplate::parse("employee:{1}", 1).unwrap();
    let mut g = c.benchmark_group("keys");
    g.bench_function("sql_key_sha256", |b| {
        b.iter(|| sql_key("", black_box(q.as_bytes()), &[] as &[&str]))
    });
    g.bench_function("template_render", |b| {
        b.iter(|| t.render(black_box(&["12345"])))
    });
    g.bench_function("sql_check_and_tables", |b| {
        b.iter(|| cachefront::db::sql::check_read_only(black_box(q)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, parse, frames, keys);
criterion_main!(benches);
