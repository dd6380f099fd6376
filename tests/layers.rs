//! The top-level modules form layers that import only downward (docs/architecture.md): this
//! reads every `src/**/*.rs` and fails on any `crate::<module>` reference that points to the
//! same layer or a higher one, and on a module of `src/lib.rs` the table below leaves out.
//! Test modules inside `src/` are held to the same rule.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers, top to bottom. A module may use modules of lower layers, and itself.
const LAYERS: &[&[&str]] = &[
    &["server"],
    &["connection"],
    &["command"],
    &["invalidation"],
    &["cache"],
    &["session"],
    &["acl"],
    &["upstream", "db"],
    &["tls", "prometheus", "cores"],
    &["config", "error", "metrics"],
    &["protocol"],
];

/// The layer of a top-level module (0 is the top), if the table has it.
fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// One `crate::<module>` reference.
#[derive(Debug)]
struct Import {
    line: usize,
    target: String,
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
    out
}

/// A line without its `//` comment (a `//` inside a string literal is kept: the count of
/// quotes before it is odd).
fn code_of(line: &str) -> &str {
    let mut from = 0;
    while let Some(at) = line[from..].find("//") {
        let at = from + at;
        if line[..at].matches('"').count().is_multiple_of(2) {
            return &line[..at];
        }
        from = at + 2;
    }
    line
}

/// The leading identifier of `s`.
fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level names of a `{a, b::c, d::{e, f}}` group starting at `text[open]` (`{`), and
/// the length of the group.
fn group_names(text: &str, open: usize) -> (Vec<(usize, String)>, usize) {
    let mut names = Vec::new();
    let mut depth = 0;
    let mut expect_name = true;
    let bytes = text.as_bytes();
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'{' => {
                depth += 1;
                expect_name = depth == 1;
            }
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return (names, i + 1 - open);
                }
            }
            b',' if depth == 1 => expect_name = true,
            c if expect_name && (c.is_ascii_alphabetic() || c == b'_') => {
                names.push((i, ident(&text[i..]).to_string()));
                expect_name = false;
            }
            _ => {}
        }
        i += 1;
    }
    (names, text.len() - open)
}

/// Every `crate::<module>` reference in a file's code, comments left out; a group
/// (`use crate::{a, b}`) counts each module it names, at the line where the name is.
fn imports(source: &str) -> Vec<Import> {
    let code: String = source
        .lines()
        .map(|l| code_of(l).to_string() + "\n")
        .collect();
    let line_at = |pos: usize| code[..pos].matches('\n').count() + 1;
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("crate::") {
        let at = from + at;
        from = at + "crate::".len();
        // `crate::` only as a path start, not the tail of another name (`mycrate::`).
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[from..];
        if rest.starts_with('{') {
            let (names, len) = group_names(&code, from);
            for (pos, name) in names {
                out.push(Import {
                    line: line_at(pos),
                    target: name,
                });
            }
            from += len;
        } else {
            out.push(Import {
                line: line_at(at),
                target: ident(rest).to_string(),
            });
        }
    }
    out
}

/// The top-level module a source file belongs to (`src/x.rs`, `src/x/…`); `None` for the
/// crate root and the binary.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// The modules `src/lib.rs` declares.
fn declared_modules(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .map(|l| code_of(l).trim())
        .filter_map(|l| {
            l.strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))
        })
        .map(|l| l.trim_end_matches(';').trim().to_string())
        .collect()
}

/// What is wrong with the graph: modules missing from (or unknown to) the table, and every
/// import that does not point to a lower layer.
fn violations(src: &Path) -> Vec<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let declared = declared_modules(&lib);
    let mut problems = Vec::new();
    for m in &declared {
        if layer_of(m).is_none() {
            problems.push(format!(
                "module `{m}` (src/lib.rs) is missing from the layer table in tests/layers.rs"
            ));
        }
    }
    for m in LAYERS.iter().flat_map(|l| l.iter()) {
        if !declared.contains(*m) {
            problems.push(format!(
                "the layer table names `{m}`, which src/lib.rs does not declare"
            ));
        }
    }
    for file in rust_files(src) {
        let Some(from) = module_of(src, &file) else {
            continue;
        };
        let source = std::fs::read_to_string(&file).expect("source file");
        let shown = file
            .strip_prefix(src.parent().unwrap_or(src))
            .unwrap_or(&file);
        for imp in imports(&source) {
            if imp.target == from {
                continue;
            }
            let (Some(a), Some(b)) = (layer_of(&from), layer_of(&imp.target)) else {
                if declared.contains(&imp.target) || !declared.contains(&from) {
                    continue; // reported above as missing from the table
                }
                problems.push(format!(
                    "{}:{}: {from} -> {}: not a module of src/lib.rs",
                    shown.display(),
                    imp.line,
                    imp.target
                ));
                continue;
            };
            if b <= a {
                let how = if a == b { "same layer" } else { "upward" };
                problems.push(format!(
                    "{}:{}: {from} -> {} ({how}: layer {} imports layer {})",
                    shown.display(),
                    imp.line,
                    imp.target,
                    a + 1,
                    b + 1
                ));
            }
        }
    }
    problems
}

#[test]
fn modules_import_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = violations(&src);
    assert!(
        problems.is_empty(),
        "imports against the layers (table in tests/layers.rs, docs/architecture.md):\n{}",
        problems.join("\n")
    );
}

#[test]
fn references_are_found_in_paths_and_groups_but_not_comments() {
    let src = "use crate::cache::Cache;\n\
               use crate::{acl, db::Db,\n    metrics::{inc, Metrics}};\n\
               // crate::server in a comment\n\
               let x = crate::server::spawn; // and crate::tls after code\n\
               let s = \"// crate::upstream is code\"; mycrate::nope();\n";
    let got: Vec<(usize, String)> = imports(src)
        .into_iter()
        .map(|i| (i.line, i.target))
        .collect();
    let want = |l: usize, t: &str| (l, t.to_string());
    assert_eq!(
        got,
        [
            want(1, "cache"),
            want(2, "acl"),
            want(2, "db"),
            want(3, "metrics"),
            want(5, "server"),
            want(6, "upstream"),
        ]
    );
}

#[test]
fn an_upward_import_is_reported() {
    let dir = std::env::temp_dir().join(format!("cachefront-layers-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("cache")).expect("temp dir");
    std::fs::write(
        src.join("lib.rs"),
        "pub mod cache;\npub mod extra;\npub mod server;\n",
    )
    .expect("lib.rs");
    std::fs::write(src.join("server.rs"), "use crate::cache::Cache;\n").expect("server.rs");
    std::fs::write(src.join("cache/mod.rs"), "mod x;\n").expect("cache/mod.rs");
    std::fs::write(src.join("cache/x.rs"), "\nuse crate::server::Shared;\n").expect("x.rs");
    let problems = violations(&src);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        problems.contains(
            &"src/cache/x.rs:2: cache -> server (upward: layer 5 imports layer 1)".to_string()
        ),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("names `connection`")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("module `extra`")),
        "{problems:?}"
    );
    assert!(!problems.iter().any(|p| p.starts_with("src/server.rs")));
}
