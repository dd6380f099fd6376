//! Valkey's command table (`COMMAND`), read once and shared: key positions for cluster routing,
//! categories, arity and key positions for permission checks (`acl`), whether a command writes
//! its keys (cachefront's own keys are guarded with it).

use crate::protocol::Value;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The table once loaded; every user of it (routing, permissions) reads the same one.
#[derive(Debug, Default)]
pub struct TableCell(RwLock<Option<Arc<CommandTable>>>);

impl TableCell {
    pub fn get(&self) -> Option<Arc<CommandTable>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Parses `raw` (the reply to `COMMAND`) and keeps it.
    pub fn set_from(&self, raw: &[u8]) -> Option<Arc<CommandTable>> {
        let table = Arc::new(CommandTable::parse(raw)?);
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&table));
        Some(table)
    }
}

/// One entry of Valkey's command table.
#[derive(Debug, Clone, Default)]
pub struct CmdInfo {
    /// Lowercase full name (`config|get` for subcommands).
    pub name: String,
    pub arity: i64,
    pub first: i64,
    pub last: i64,
    pub step: i64,
    pub movable: bool,
    /// Writes (or may write) its keys: the `write` flag, or a key specification that says
    /// `RW`, `OW` or `RM` (scripts: "we cannot tell how the keys will be used").
    pub writes: bool,
    /// The `readonly` flag: reads its keys and nothing else (a cluster replica may answer it).
    pub readonly: bool,
    /// Categories without the `@`.
    pub categories: Vec<String>,
    pub subs: HashMap<String, CmdInfo>,
}

impl CmdInfo {
    /// Parses one `COMMAND INFO` entry. `None` for a nil entry (unknown command).
    pub fn parse(v: &Value) -> Option<CmdInfo> {
        let f = v.array()?;
        let text = |v: &Value| {
            v.bytes()
                .map(|b| String::from_utf8_lossy(b).to_ascii_lowercase())
        };
        let int = |v: Option<&Value>| v.and_then(Value::int).unwrap_or(0);
        let list = |v: Option<&Value>| -> Vec<String> {
            v.and_then(Value::array)
                .map(|a| a.iter().filter_map(text).collect())
                .unwrap_or_default()
        };
        let name = text(f.first()?)?;
        let flags = list(f.get(2));
        let subs = f
            .get(9)
            .and_then(Value::array)
            .map(|a| {
                a.iter()
                    .filter_map(CmdInfo::parse)
                    .map(|c| (c.name.clone(), c))
                    .collect()
            })
            .unwrap_or_default();
        Some(CmdInfo {
            name,
            arity: int(f.get(1)),
            first: int(f.get(3)),
            last: int(f.get(4)),
            step: int(f.get(5)),
            movable: flags.iter().any(|x| x == "movablekeys"),
            writes: flags.iter().any(|x| x == "write") || key_specs_write(f.get(8)),
            readonly: flags.iter().any(|x| x == "readonly"),
            categories: list(f.get(6))
                .into_iter()
                .map(|c| c.trim_start_matches('@').to_string())
                .collect(),
            subs,
        })
    }

    pub fn arity_ok(&self, argc: usize) -> bool {
        arity_ok(self.arity, argc)
    }

    /// Keys at the legacy (first, last, step) positions.
    pub fn legacy_keys<'a>(&self, args: &'a [Bytes]) -> impl Iterator<Item = &'a Bytes> + 'a {
        let argc = args.len() as i64;
        let first = self.first;
        let last = if self.last < 0 {
            argc + self.last
        } else {
            self.last
        };
        let step = self.step.max(1);
        let last = last.min(argc - 1);
        let range = if first > 0 && last >= first {
            Some((first..=last).step_by(step as usize))
        } else {
            None
        };
        range
            .into_iter()
            .flatten()
            .filter_map(move |i| args.get(i as usize))
    }
}

/// True if some key specification of a `COMMAND INFO` entry may change its key (`RW`, `OW`,
/// `RM` among its flags).
fn key_specs_write(specs: Option<&Value>) -> bool {
    let Some(specs) = specs.and_then(Value::array) else {
        return false;
    };
    let is_write_flag = |v: &Value| matches!(v.bytes(), Some(b"RW" | b"OW" | b"RM"));
    let has_write_flag = |f: &Value| {
        f.array()
            .is_some_and(|flags| flags.iter().any(is_write_flag))
    };
    // In RESP2 a specification is a flat array of names and values; `flags` is the array.
    specs.iter().any(|spec| match spec {
        Value::Array(fields) => fields.iter().any(has_write_flag),
        Value::Map(pairs) => pairs.iter().any(|(_, f)| has_write_flag(f)),
        _ => false,
    })
}

/// Whether `argc` arguments (the name included) fit `arity` in Valkey's convention: `n`
/// exactly n, `-n` at least n.
pub fn arity_ok(arity: i64, argc: usize) -> bool {
    let argc = argc as i64;
    if arity >= 0 {
        argc == arity
    } else {
        argc >= -arity
    }
}

/// Valkey's command table, as `COMMAND` reports it.
#[derive(Debug, Default)]
pub struct CommandTable {
    cmds: HashMap<String, CmdInfo>,
}

impl CommandTable {
    /// Parses the reply to `COMMAND`.
    pub fn parse(raw: &[u8]) -> Option<CommandTable> {
        let items = crate::protocol::value::decode(raw)?.into_array()?;
        Some(CommandTable {
            cmds: items
                .iter()
                .filter_map(CmdInfo::parse)
                .map(|c| (c.name.clone(), c))
                .collect(),
        })
    }

    /// Whether Valkey knows the command `name` (lowercase, without a subcommand).
    pub fn knows(&self, name: &str) -> bool {
        self.cmds.contains_key(name)
    }

    /// The entry Valkey would run for `args`: the subcommand's for a container command
    /// given one. `Err(name)` when the table does not know it (name to ask Valkey about).
    pub fn lookup(&self, args: &[Bytes]) -> Result<&CmdInfo, String> {
        let raw = args.first().map(|a| &a[..]).unwrap_or_default();
        // Lowercased on the stack: this runs for every command routed in a cluster.
        let mut buf = [0u8; 32];
        let short = raw.len() <= buf.len() && raw.is_ascii();
        let owned;
        let name: &str = if short {
            buf[..raw.len()].copy_from_slice(raw);
            buf[..raw.len()].make_ascii_lowercase();
            std::str::from_utf8(&buf[..raw.len()]).unwrap_or_default()
        } else {
            owned = String::from_utf8_lossy(raw).to_ascii_lowercase();
            &owned
        };
        let Some(cmd) = self.cmds.get(name) else {
            return Err(name.to_string());
        };
        if cmd.subs.is_empty() || args.len() < 2 {
            return Ok(cmd);
        }
        let full = format!(
            "{name}|{}",
            String::from_utf8_lossy(&args[1]).to_ascii_lowercase()
        );
        cmd.subs.get(&full).ok_or(full)
    }
}
