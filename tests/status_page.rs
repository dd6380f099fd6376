//! The status page (`GET /` on `metrics.listen`) as a person sees it: loaded in a real headless
//! browser (Chromium), which runs the page's inline script under the page's own
//! Content-Security-Policy, polls `/status.json` and draws the chart. Checks the rendered DOM:
//! title, the hit ratio INFO shows, the busiest query, health lines, the chart, and that a
//! query text holding `<` shows as text.
//!
//! Without Chromium the test fails when `CI` is set, and is skipped (with the reason printed)
//! otherwise.

mod common;

use common::services::free_port;
use common::Stack;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The SQL.CACHED text the test reads: it holds a `<`, which must show as text.
const LT_QUERY: &str = "SELECT name FROM employees WHERE id < 3 ORDER BY id";

/// Chromium's path: `CACHEFRONT_CHROMIUM`, else Debian's `/usr/bin/chromium`, else
/// `chromium` / `chromium-browser` on `PATH`.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CACHEFRONT_CHROMIUM") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let fixed = PathBuf::from("/usr/bin/chromium");
    if fixed.exists() {
        return Some(fixed);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| ["chromium", "chromium-browser"].map(|n| d.join(n)))
        .find(|p| p.exists())
}

/// The page's DOM after Chromium ran its script for 5 s of virtual time (three polls).
fn dump_dom(browser: &PathBuf, url: &str) -> String {
    let profile = std::env::temp_dir().join(format!("cachefront-status-{}", std::process::id()));
    let mut child = Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", browser.display()));
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("chromium's status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("chromium's output");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains("</html>"),
        "chromium gave no DOM ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// The text of the element with `id` (its inner HTML as serialized, which is its text for
/// the leaf elements asked about).
fn by_id<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {dom}"));
    let start = at + dom[at..].find('>').unwrap() + 1;
    let end = start + dom[start..].find('<').unwrap();
    &dom[start..end]
}

#[tokio::test(flavor = "multi_thread")]
async fn status_page_in_a_real_browser() {
    let Some(browser) = chromium() else {
        if std::env::var_os("CI").is_some() {
            panic!("chromium not found (/usr/bin/chromium, CACHEFRONT_CHROMIUM or PATH): the status page test needs it in CI; scripts/deps.sh installs it");
        }
        eprintln!("SKIPPED status_page_in_a_real_browser: chromium not found (install Debian's chromium, run scripts/deps.sh, or set CACHEFRONT_CHROMIUM)");
        return;
    };
    let port = free_port();
    let s = Stack::start_with(|c| c.metrics.listen = format!("127.0.0.1:{port}")).await;
    let t = Instant::now();
    while !s.proxy.shared.is_listening() {
        assert!(t.elapsed() < Duration::from_secs(10), "listener not up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut raw = s.raw().await;
    // EMP.GET: 2 misses, 3 hits; the `<` text: 1 miss, 1 hit.
    for id in [b"1", b"2", b"1", b"2", b"1"] {
        raw.call(&[b"EMP.GET", id]).await;
    }
    for _ in 0..2 {
        raw.call(&[b"SQL.CACHED", LT_QUERY.as_bytes()]).await;
    }
    let info = raw.call(&[b"INFO", b"cachefront"]).await;
    let ratio = info
        .lines()
        .find_map(|l| l.strip_prefix("hit_ratio:"))
        .expect("INFO hit_ratio")
        .trim()
        .to_string();
    assert_eq!(ratio, "0.5714", "{info}");

    // The page itself: static HTML under a policy allowing only its own inline parts.
    let page = common::http_get(port, "/").await;
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(
        page.contains("Content-Type: text/html; charset=utf-8\r\n"),
        "{page}"
    );
    let csp = page
        .lines()
        .find_map(|l| l.strip_prefix("Content-Security-Policy: "))
        .expect("a Content-Security-Policy");
    assert!(
        csp.starts_with("default-src 'none'; script-src 'sha256-"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe") && !csp.contains("http"), "{csp}");
    assert!(
        !page.contains("src=\"http") && !page.contains("href=\"http"),
        "{page}"
    );
    // The JSON it polls, as serde wrote it.
    let json = common::http_get(port, "/status.json").await;
    let body = json.split("\r\n\r\n").nth(1).expect("a body");
    let v: serde_json::Value = serde_json::from_str(body).expect(body);
    assert_eq!(v["hit_ratio"], ratio.as_str(), "{v}");
    assert_eq!(v["health"]["valkey_up"], true, "{v}");
    assert_eq!(v["queries"][0]["query"], "EMP.GET", "{v}");
    assert!(common::http_get(port, "/metrics")
        .await
        .contains("cachefront_hits_total 4\n"));

    let url = format!("http://127.0.0.1:{port}/");
    let dom = tokio::task::spawn_blocking(move || dump_dom(&browser, &url))
        .await
        .unwrap();
    eprintln!("rendered DOM:\n{dom}");
    assert!(dom.contains("<title>cachefront status</title>"), "{dom}");
    assert!(
        by_id(&dom, "updated").starts_with("cachefront "),
        "the script did not run: {dom}"
    );
    assert_eq!(by_id(&dom, "hit-ratio"), ratio, "{dom}");
    // The busiest query is the first row of the queries table.
    let queries = &dom[dom.find("id=\"queries\"").unwrap()..];
    let first_row = &queries[queries.find("<tbody><tr><td>").expect("a query row") + 15..];
    assert!(first_row.starts_with("EMP.GET</td>"), "{queries}");
    // A query text with `<` is text, not markup.
    assert!(
        dom.contains(&LT_QUERY.replace('<', "&lt;")),
        "the `<` query is not shown as text: {dom}"
    );
    for line in [
        "<li class=\"ok\">Valkey: up",
        "<li class=\"ok\">Listener: listening</li>",
        "<li class=\"ok\">Mismatches: 0</li>",
        "<li class=\"ok\">DDL hook: in place</li>",
        "<li class=\"ok\">Degraded tables: none</li>",
        "<li>PostgreSQL pool: ",
    ] {
        assert!(dom.contains(line), "no {line:?} in {dom}");
    }
    // The chart: the script drew the hit ratio line, with at least one point.
    let line = dom
        .find("<polyline class=\"data ratio\" points=\"")
        .unwrap_or_else(|| panic!("no chart line drawn: {dom}"));
    let points = &dom[line + 38..];
    let points = &points[..points.find('"').unwrap()];
    assert!(!points.is_empty(), "the chart line has no points: {dom}");
    assert!(dom.contains("<circle class=\"data ratio-dot\""), "{dom}");
}
