//! The documentation against the code: the configuration reference in `docs/configuration.md`
//! lists exactly the keys of `cachefront::config::Config`, with the code's defaults, and every
//! relative link in `README.md` and `docs/*.md` leads to a file (and heading) that exists.
//!
//! Needs no server: it reads the Markdown files and serializes `Config::default()`.

use cachefront::config::{builtin_emp_get, Config, UserConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The cells of a Markdown table row, `\|` kept as a literal `|` inside a cell.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out.into_iter().map(|c| c.trim().to_string()).collect()
}

/// `` `x` `` → `x`; anything else unchanged.
fn unquote(cell: &str) -> &str {
    cell.strip_prefix('`')
        .and_then(|c| c.strip_suffix('`'))
        .filter(|c| !c.contains('`'))
        .unwrap_or(cell)
}

/// The body rows of the first table whose header row starts with `header`.
fn table_rows(md: &str, header: &str) -> Vec<Vec<String>> {
    let mut lines = md.lines().skip_while(|l| !l.starts_with(header));
    let found = lines.next().is_some();
    assert!(
        found,
        "docs/configuration.md has no table starting with '{header}'"
    );
    lines
        .take_while(|l| l.starts_with('|'))
        .filter(|l| !l.starts_with("|---") && !l.starts_with("| ---"))
        .map(cells)
        .collect()
}

/// The reference table: documented key (`valkey.pool_size`, top-level keys bare) → default cell.
fn documented_keys(md: &str) -> BTreeMap<String, String> {
    let mut section = String::new();
    let mut keys = BTreeMap::new();
    for row in table_rows(md, "| key | default | meaning |") {
        let first = &row[0];
        if let Some(name) = first
            .strip_prefix("**`")
            .and_then(|s| s.strip_suffix("`**"))
        {
            // "[valkey]" or "[[auth.users]]"
            section = name.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        let key = unquote(first);
        assert!(
            !key.is_empty() && !key.contains(' '),
            "docs/configuration.md: not a key cell: {row:?}"
        );
        let path = if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        };
        let default = row.get(1).cloned().unwrap_or_default();
        assert!(
            keys.insert(path.clone(), default).is_none(),
            "docs/configuration.md documents `{path}` twice"
        );
    }
    keys
}

/// Every leaf of a TOML table, as `a.b.c` → value (tables are walked, arrays are leaves).
fn leaves(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => leaves(&path, t, out),
            v => {
                out.insert(path, v.clone());
            }
        }
    }
}

/// A documented default as a TOML value, if it is one (`` `16` ``, `` `"text"` ``, `` `[]` ``).
fn parse_default(cell: &str) -> Option<toml::Value> {
    let text = unquote(cell);
    if text.is_empty() {
        return None;
    }
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
}

/// Field names of a struct, `Option`s included (JSON keeps `null`s where TOML drops `None`s).
fn fields<T: serde::Serialize>(value: &T) -> BTreeSet<String> {
    match serde_json::to_value(value).unwrap() {
        serde_json::Value::Object(map) => map.keys().cloned().collect(),
        other => panic!("not a struct: {other}"),
    }
}

#[test]
fn configuration_reference_matches_the_code() {
    let md = read(&root().join("docs/configuration.md"));
    let documented = documented_keys(&md);

    let table = toml::Value::try_from(Config::default())
        .expect("Config::default() serializes to TOML")
        .as_table()
        .cloned()
        .unwrap();
    let mut code = BTreeMap::new();
    leaves("", &table, &mut code);

    // Arrays of tables are empty by default: their fields come from the structs themselves.
    // `[[auth.users]]` is documented in the reference table, `[[query]]` in its own table.
    assert!(code.remove("auth.users").is_some(), "auth.users moved");
    let user: UserConfig = toml::from_str("name = \"u\"\npassword = \"p\"").unwrap();
    let user_toml = toml::Value::try_from(&user).unwrap();
    for field in fields(&user) {
        let value = user_toml
            .get(&field)
            .cloned()
            .unwrap_or_else(|| toml::Value::String(String::new()));
        code.insert(format!("auth.users.{field}"), value);
    }
    assert!(code.remove("query").is_some(), "query moved");

    let mut problems = Vec::new();
    for (key, value) in &code {
        let Some(cell) = documented.get(key) else {
            problems.push(format!(
                "`{key}` (default {value}) is missing from the table"
            ));
            continue;
        };
        // Fields of a user have no default of their own where they are required.
        let per_user = key.starts_with("auth.users.");
        if per_user && matches!(key.as_str(), "auth.users.name" | "auth.users.password") {
            continue;
        }
        match parse_default(cell) {
            Some(doc) if &doc == value => {}
            // An array or table default that does not parse: the key being there is enough.
            None if value.is_array() || value.is_table() || per_user => {}
            Some(doc) => problems.push(format!(
                "`{key}`: documented default {doc} but the code's is {value}"
            )),
            None => problems.push(format!(
                "`{key}`: documented default '{cell}' is not a TOML value (the code's is {value})"
            )),
        }
    }
    for key in documented.keys() {
        if !code.contains_key(key) {
            problems.push(format!("`{key}` is documented but is not a key of Config"));
        }
    }

    // `[[query]]`: its field table lists exactly NamedQueryConfig's fields.
    let documented_fields: BTreeSet<String> = table_rows(&md, "| field | required | meaning |")
        .iter()
        .map(|row| unquote(&row[0]).to_string())
        .collect();
    let query_fields = fields(&builtin_emp_get());
    for f in query_fields.difference(&documented_fields) {
        problems.push(format!("`[[query]]` field `{f}` is missing from its table"));
    }
    for f in documented_fields.difference(&query_fields) {
        problems.push(format!(
            "`[[query]]` field `{f}` is documented but not a field of a named query"
        ));
    }

    assert!(
        problems.is_empty(),
        "docs/configuration.md disagrees with src/config.rs:\n  {}",
        problems.join("\n  ")
    );
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The lines of a Markdown file outside fenced code blocks.
fn prose(md: &str) -> Vec<&str> {
    let mut fenced = false;
    md.lines()
        .filter(|l| {
            if l.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// The anchors of a Markdown file's headings, duplicates numbered as GitHub does.
fn anchors(md: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose(md) {
        let Some(text) = line.strip_prefix('#') else {
            continue;
        };
        let text = text.trim_start_matches('#');
        if !text.starts_with(' ') {
            continue;
        }
        let base = slug(text);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// The targets of the inline links `[text](target)` of a Markdown file.
fn link_targets(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose(md) {
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].trim().to_string());
                rest = &rest[end..];
            }
        }
    }
    out
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ has no Markdown files");
    files.extend(docs);
    files
}

#[test]
fn relative_links_lead_somewhere() {
    let root = root().canonicalize().unwrap();
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let md = read(&file);
        let name = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        // A user's clone has only this repository: nothing outside it may be required. A
        // step that uses ../shared (CI has it) must say on the same line that it is skipped
        // without it.
        for line in md.lines().filter(|l| l.contains("../shared")) {
            if !line.contains("skipped") {
                problems.push(format!(
                    "{name}: refers to ../shared/ without saying the step is skipped without it: {line}"
                ));
            }
        }
        for target in link_targets(&md) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let dest = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            let Ok(dest) = dest.canonicalize() else {
                problems.push(format!("{name}: ({target}): no such file"));
                continue;
            };
            if !dest.starts_with(&root) {
                problems.push(format!("{name}: ({target}): outside the repository"));
                continue;
            }
            if let Some(anchor) = anchor {
                if dest.extension().is_none_or(|e| e != "md") {
                    problems.push(format!(
                        "{name}: ({target}): anchor into a non-Markdown file"
                    ));
                } else if !anchors(&read(&dest)).contains(anchor) {
                    problems.push(format!("{name}: ({target}): no such heading"));
                }
            }
        }
    }
    assert!(checked > 0, "no relative links found at all");
    assert!(
        problems.is_empty(),
        "broken links:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn slugs_are_githubs() {
    assert_eq!(slug("Named queries (`[[query]]`)"), "named-queries-query");
    assert_eq!(slug("In-process L1"), "in-process-l1");
    assert_eq!(
        slug("`SQL.INVALIDATE <table> [<table> …]`"),
        "sqlinvalidate-table-table-"
    );
}

/// Every command cachefront declares (`command::table`) is in the command reference: its name
/// opens a heading or a table row there.
#[test]
fn every_own_command_is_in_the_command_reference() {
    let doc = read(&root().join("docs/commands.md"));
    for c in cachefront::command::table::OWN {
        let opening = format!("`{} ", c.name);
        let documented = doc.lines().any(|l| {
            (l.starts_with("## ") && l[3..].starts_with(&opening))
                || (l.starts_with("| ") && l[2..].starts_with(&opening))
        });
        assert!(documented, "docs/commands.md does not document {}", c.name);
    }
}
