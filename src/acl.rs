//! ACL-style users for cachefront's clients: who may run which commands on which keys.
//!
//! Users come from `[[auth.users]]` (and `auth.requirepass`, the password of `default`).
//! Passwords are kept as SHA-256 digests and compared in constant time. Permission checks
//! happen in `command::dispatch`, before anything is sent to Valkey, and answer with Valkey's
//! own errors (`-NOPERM …`).
//!
//! # Commands
//! A user's `commands` list holds allow rules — `*` (or `@all`), command names (`get`,
//! `client|id` for one subcommand), categories (`@read`) — and exclusions (`-flushall`,
//! `-@dangerous`). A command runs when some allow rule matches it and no exclusion does
//! (exclusions always win, whatever their place in the list).
//!
//! Category membership of Valkey's commands is Valkey's own: the upstream's `COMMAND` table,
//! fetched once (at start, or at first need), gives each command's categories, arity and key
//! positions. cachefront's commands are in `@cachefront`; named queries and `SQL.CACHED` are
//! also `@read`, `SQL.INVALIDATE` also `@admin` and `@dangerous`.
//!
//! # Keys
//! `keys` are Valkey-style glob patterns (`*`, `?`, `[a-z]`, `[^…]`, `\` escapes). For a
//! pass-through command the keys are found from the table's first-key / last-key / step; for
//! commands whose keys move (`movablekeys`: EVAL, XREAD, ZUNIONSTORE, SORT …) cachefront asks
//! Valkey with `COMMAND GETKEYS`. For cachefront's own commands the key is the cache entry's
//! (EMP.GET 7 → `employee:7`; SQL.CACHED → its SHA-256 key). Channels of pub/sub commands are
//! not restricted.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{AuthConfig, ConfigError, UserConfig};
use crate::error::Refusal;
use crate::protocol::request::encode_multibulk;
use crate::protocol::{Proto, Reply, Request};
use crate::upstream::commands::{CmdInfo, CommandTable, Frame};

/// Valkey's ACL categories (as `ACL CAT` lists them), plus cachefront's own.
pub const CATEGORIES: &[&str] = &[
    "all",
    "keyspace",
    "read",
    "write",
    "set",
    "sortedset",
    "list",
    "hash",
    "string",
    "bitmap",
    "hyperloglog",
    "geo",
    "stream",
    "pubsub",
    "admin",
    "fast",
    "slow",
    "blocking",
    "dangerous",
    "connection",
    "transaction",
    "scripting",
    "cachefront",
];

/// Categories of cachefront's own commands (also what `COMMAND INFO` reports for them).
pub const NAMED_QUERY_CATEGORIES: &[&str] = &["@read", "@cachefront"];
pub const SQL_CACHED_CATEGORIES: &[&str] = &["@read", "@cachefront"];
pub const SQL_INVALIDATE_CATEGORIES: &[&str] = &["@admin", "@dangerous", "@cachefront"];
pub const SLOWLOG_CATEGORIES: &[&str] = &["@admin", "@slow", "@dangerous", "@cachefront"];

/// `NOPERM User <name> has no permissions to run the '<cmd>' command`.
pub fn noperm_command(user: &str, full_name: &str) -> Reply {
    Refusal::NoPermCommand {
        user: user.to_string(),
        command: full_name.to_string(),
    }
    .reply()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    All,
    Category(String),
    /// Lowercase command name, or `container|sub`.
    Command(String),
}

impl Rule {
    fn parse(s: &str) -> Result<Rule, String> {
        if s == "*" {
            return Ok(Rule::All);
        }
        if let Some(cat) = s.strip_prefix('@') {
            let cat = cat.to_ascii_lowercase();
            if !CATEGORIES.contains(&cat.as_str()) {
                return Err(format!(
                    "unknown category '@{cat}' (known: {})",
                    CATEGORIES
                        .iter()
                        .map(|c| format!("@{c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            return Ok(if cat == "all" {
                Rule::All
            } else {
                Rule::Category(cat)
            });
        }
        let ok = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_graphic())
            && !s.starts_with('|')
            && !s.ends_with('|')
            && s.matches('|').count() <= 1
            && !s.contains(['*', '@']);
        if !ok {
            return Err(format!("'{s}' is not a command name, a @category or *"));
        }
        Ok(Rule::Command(s.to_ascii_lowercase()))
    }

    /// Whether the rule covers `full` (`get`, `config|get`) with categories `cats`.
    fn matches(&self, full: &str, cats: &[&str]) -> bool {
        match self {
            Rule::All => true,
            Rule::Category(c) => cats.iter().any(|x| x.trim_start_matches('@') == c),
            Rule::Command(n) => {
                n == full
                    || full
                        .split_once('|')
                        .is_some_and(|(container, _)| n == container)
            }
        }
    }
}

/// A restricted user's twin in Valkey's own ACL. cachefront checks the keys and commands a
/// request names, but a script (EVAL, FCALL) or a SORT BY/GET pattern reaches keys no argument
/// names, inside Valkey. So such commands run on a connection logged in as this twin, with the
/// user's rules, and Valkey enforces them exactly as it would for the same user definition.
pub struct Mirror {
    pub name: String,
    pub secret: String,
    /// `ACL SETUSER <name> reset on #<sha256(secret)> &* <rules> <~patterns>`.
    pub setuser: Vec<Bytes>,
}

/// The name of `user`'s twin in Valkey's ACL.
pub fn mirror_name(user: &str) -> String {
    format!("cachefront-mirror-{user}")
}

/// One user, ready to check.
pub struct User {
    pub name: String,
    pub enabled: bool,
    /// No password: any password is accepted (only the default user can be like this).
    pub nopass: bool,
    hashes: Vec<[u8; 32]>,
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    /// `None`: every key.
    keys: Option<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for User {
    // Never prints the password digests.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User").field("name", &self.name).finish()
    }
}

impl User {
    /// Valkey's default user without a password: every command, every key.
    fn open_default() -> User {
        User {
            name: "default".into(),
            enabled: true,
            nopass: true,
            hashes: Vec::new(),
            allow: vec![Rule::All],
            deny: Vec::new(),
            keys: None,
        }
    }

    fn from_config(c: &UserConfig) -> Result<User, (&'static str, String)> {
        let name = c.name.as_str();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err((
                "name",
                "must be a non-empty word without spaces or control characters".into(),
            ));
        }
        let mut hashes = Vec::new();
        for p in c.password.iter().chain(&c.passwords) {
            hashes.push(password_digest(p).map_err(|e| ("password", e))?);
        }
        if hashes.is_empty() && name != "default" {
            return Err((
                "password",
                "required (password = \"…\" or passwords = [...]; only the default user may have none)".into(),
            ));
        }
        if c.commands.is_empty() {
            return Err((
                "commands",
                "list the commands the user may run (\"*\" for all, \"@read\", \"get\", \"-flushall\" …)".into(),
            ));
        }
        let mut allow = Vec::new();
        let mut deny = Vec::new();
        for r in &c.commands {
            match r.strip_prefix('-') {
                Some(rest) if rest != "*" => {
                    deny.push(Rule::parse(rest).map_err(|e| ("commands", e))?)
                }
                Some(_) => {
                    return Err((
                        "commands",
                        "'-*' denies everything; list what the user may run instead".into(),
                    ))
                }
                None => allow.push(Rule::parse(r).map_err(|e| ("commands", e))?),
            }
        }
        let keys = if c.keys.iter().any(|k| k == "*") {
            None
        } else {
            for k in &c.keys {
                check_pattern(k).map_err(|e| ("keys", e))?;
            }
            Some(c.keys.iter().map(|k| k.as_bytes().to_vec()).collect())
        };
        Ok(User {
            name: name.to_string(),
            enabled: c.enabled,
            nopass: hashes.is_empty(),
            hashes,
            allow,
            deny,
            keys,
        })
    }

    /// Every command and every key: no checks needed.
    pub fn unrestricted(&self) -> bool {
        self.keys.is_none() && self.deny.is_empty() && self.allow.contains(&Rule::All)
    }

    pub fn all_keys(&self) -> bool {
        self.keys.is_none()
    }

    /// Whether the user may run `full` (lowercase, `container|sub` for subcommands).
    pub fn command_allowed(&self, full: &str, cats: &[&str]) -> bool {
        self.allow.iter().any(|r| r.matches(full, cats))
            && !self.deny.iter().any(|r| r.matches(full, cats))
    }

    pub fn key_allowed(&self, key: &[u8]) -> bool {
        match &self.keys {
            None => true,
            Some(pats) => pats.iter().any(|p| glob_match(p, key)),
        }
    }

    /// How this user is mirrored in Valkey's own ACL (see [`Mirror`]). `salt` keeps the
    /// mirror's password unguessable to whoever lacks cachefront's Valkey credentials; the
    /// password is derived, not random, so every cachefront instance with the same
    /// configuration sets the same one. Rules Valkey does not know (cachefront's own commands
    /// and `@cachefront`) are left out: they never reach Valkey.
    pub fn mirror(&self, table: Option<&CommandTable>, salt: &[u8]) -> Mirror {
        let name = mirror_name(&self.name);
        let mut h = Sha256::new();
        h.update(b"cachefront ACL mirror\0");
        h.update(salt);
        h.update(self.name.as_bytes());
        for d in &self.hashes {
            h.update(d);
        }
        let secret = hex::encode(h.finalize());
        let mut setuser: Vec<String> = vec![
            "ACL".into(),
            "SETUSER".into(),
            name.clone(),
            "reset".into(),
            "on".into(),
            format!("#{}", hex::encode(Sha256::digest(secret.as_bytes()))),
            "&*".into(),
        ];
        let known = |r: &Rule| match r {
            Rule::All => true,
            Rule::Category(c) => c != "cachefront",
            Rule::Command(n) => table.is_none_or(|t| {
                let container = n.split('|').next().unwrap_or(n);
                t.knows(container)
            }),
        };
        let valkey_rule = |sign: char, r: &Rule| match r {
            Rule::All => format!("{sign}@all"),
            Rule::Category(c) => format!("{sign}@{c}"),
            Rule::Command(n) => format!("{sign}{n}"),
        };
        // Allows first, exclusions after: in Valkey's ordered rules exclusions then win, as
        // they always do in cachefront's.
        setuser.extend(
            self.allow
                .iter()
                .filter(|r| known(r))
                .map(|r| valkey_rule('+', r)),
        );
        setuser.extend(
            self.deny
                .iter()
                .filter(|r| known(r))
                .map(|r| valkey_rule('-', r)),
        );
        match &self.keys {
            None => setuser.push("~*".into()),
            Some(pats) => setuser.extend(
                pats.iter()
                    .map(|p| format!("~{}", String::from_utf8_lossy(p))),
            ),
        }
        Mirror {
            name,
            secret,
            setuser: setuser.into_iter().map(Bytes::from).collect(),
        }
    }

    /// Checks a password against every one of the user's, in time that does not depend on
    /// the password's length or where it differs (SHA-256 digests compared in constant time).
    pub fn password_ok(&self, pass: &[u8]) -> bool {
        let given: [u8; 32] = Sha256::digest(pass).into();
        let mut ok = false;
        for h in &self.hashes {
            ok |= constant_time_eq(&given, h);
        }
        self.enabled && (self.nopass || ok)
    }
}

/// A configured password as its SHA-256 digest: plain text, or `sha256:<64 hex digits>`.
fn password_digest(p: &str) -> Result<[u8; 32], String> {
    if let Some(hex_digest) = p.strip_prefix("sha256:") {
        let mut out = [0u8; 32];
        return match hex::decode_to_slice(hex_digest, &mut out) {
            Ok(()) => Ok(out),
            Err(_) => Err(
                "sha256:<hash> must be 64 hexadecimal digits (the SHA-256 of the password)".into(),
            ),
        };
    }
    if p.is_empty() {
        return Err("must not be empty (leave the user's password out for no password)".into());
    }
    Ok(Sha256::digest(p.as_bytes()).into())
}

/// Refuses glob patterns that cannot be what the operator meant.
fn check_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("an empty pattern matches only the empty key; remove it".into());
    }
    let b = p.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if i + 1 == b.len() => {
                return Err(format!("'{p}' ends with a lone '\\'"));
            }
            b'\\' => i += 1,
            b'[' => {
                let mut j = i + 1;
                if b.get(j) == Some(&b'^') {
                    j += 1;
                }
                loop {
                    match b.get(j) {
                        None => return Err(format!("'{p}' has an unclosed '['")),
                        Some(b'\\') => j += 2,
                        Some(b']') => break,
                        Some(_) => j += 1,
                    }
                }
                i = j;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0 && a.len() == b.len()
}

/// Valkey's glob (`stringmatchlen`, case-sensitive): `*`, `?`, `[…]` with `^` and ranges,
/// `\` escapes.
pub fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    // Backtracking point for the last `*`: (pattern index after it, string index).
    let mut star: Option<(usize, usize)> = None;
    loop {
        if p < pat.len() {
            let c = pat[p];
            if c == b'*' {
                while p < pat.len() && pat[p] == b'*' {
                    p += 1;
                }
                if p == pat.len() {
                    return true;
                }
                star = Some((p, i));
                continue;
            }
            if i < s.len() {
                // How far the pattern advances if this byte matches.
                let step = match c {
                    b'?' => Some(1),
                    b'[' => match class_match(pat, p, s[i]) {
                        Some((true, next)) => Some(next - p),
                        _ => None,
                    },
                    b'\\' if p + 1 < pat.len() => (pat[p + 1] == s[i]).then_some(2),
                    _ => (c == s[i]).then_some(1),
                };
                if let Some(n) = step {
                    p += n;
                    i += 1;
                    continue;
                }
            }
        } else if i == s.len() {
            return true;
        }
        // Mismatch: let the last `*` swallow one more byte.
        match star {
            Some((sp, si)) if si < s.len() => {
                star = Some((sp, si + 1));
                p = sp;
                i = si + 1;
            }
            _ => return false,
        }
    }
}

/// Matches `c` against the class starting at `pat[p] == '['`; returns (matched, index after `]`).
fn class_match(pat: &[u8], p: usize, c: u8) -> Option<(bool, usize)> {
    let mut j = p + 1;
    let negate = pat.get(j) == Some(&b'^');
    if negate {
        j += 1;
    }
    let mut hit = false;
    loop {
        let b = *pat.get(j)?;
        match b {
            b']' => break,
            b'\\' => {
                let e = *pat.get(j + 1)?;
                hit |= e == c;
                j += 2;
            }
            _ if pat.get(j + 1) == Some(&b'-') && pat.get(j + 2).is_some_and(|&e| e != b']') => {
                let (mut lo, mut hi) = (b, pat[j + 2]);
                if lo > hi {
                    std::mem::swap(&mut lo, &mut hi);
                }
                hit |= (lo..=hi).contains(&c);
                j += 3;
            }
            _ => {
                hit |= b == c;
                j += 1;
            }
        }
    }
    Some((hit != negate, j + 1))
}

/// The users `auth` declares can be built; an error names the key at fault.
pub fn check_config(auth: &AuthConfig) -> Result<(), ConfigError> {
    Users::from_config(auth)
        .map(|_| ())
        .map_err(|(key, msg)| ConfigError::Invalid { key, msg })
}

/// All users, by name.
#[derive(Debug)]
pub struct Users {
    by_name: HashMap<String, Arc<User>>,
    default: Arc<User>,
}

impl Users {
    /// Builds the users from `auth`; errors name the key at fault (`auth.users[1].keys`).
    pub fn from_config(auth: &AuthConfig) -> Result<Users, (String, String)> {
        let mut by_name = HashMap::new();
        for (i, u) in auth.users.iter().enumerate() {
            let user = User::from_config(u)
                .map_err(|(field, msg)| (format!("auth.users[{i}].{field}"), msg))?;
            if user.name == "default" && !auth.requirepass.is_empty() {
                return Err((
                    format!("auth.users[{i}].name"),
                    "user default is also configured by auth.requirepass; keep only one".into(),
                ));
            }
            if by_name.contains_key(&user.name) {
                return Err((
                    format!("auth.users[{i}].name"),
                    format!("user {} is declared twice", user.name),
                ));
            }
            by_name.insert(user.name.clone(), Arc::new(user));
        }
        let default = match by_name.get("default") {
            Some(d) => Arc::clone(d),
            None => {
                let mut d = User::open_default();
                if !auth.requirepass.is_empty() {
                    d.nopass = false;
                    d.hashes = vec![Sha256::digest(auth.requirepass.as_bytes()).into()];
                }
                let d = Arc::new(d);
                by_name.insert("default".into(), Arc::clone(&d));
                d
            }
        };
        Ok(Users { by_name, default })
    }

    pub fn default_user(&self) -> &Arc<User> {
        &self.default
    }

    /// Whether a new (or RESET) connection starts authenticated, as `default`.
    pub fn default_authed(&self) -> bool {
        self.default.enabled && self.default.nopass
    }

    /// Whether any user is restricted (then Valkey's command table is needed).
    pub fn any_restricted(&self) -> bool {
        self.by_name.values().any(|u| !u.unrestricted())
    }

    /// AUTH: the user if the name and password match (WRONGPASS otherwise). A missing user
    /// costs the same digest as a present one.
    pub fn authenticate(&self, name: &[u8], pass: &[u8]) -> Result<Arc<User>, Reply> {
        let user = std::str::from_utf8(name)
            .ok()
            .and_then(|n| self.by_name.get(n));
        match user {
            Some(u) if u.password_ok(pass) => Ok(Arc::clone(u)),
            Some(_) => Err(Refusal::WrongPass.reply()),
            None => {
                let _ = Sha256::digest(pass);
                Err(Refusal::WrongPass.reply())
            }
        }
    }
}

/// What a synchronous check concluded.
pub enum Check {
    Allow,
    Deny(Reply),
    /// Valkey must be asked (the command table, or `COMMAND GETKEYS`); see [`resolve`].
    Ask,
}

/// Checks a pass-through (or locally answered Valkey) command against `user` with the table.
fn check_with(user: &User, table: &CommandTable, args: &[Bytes], meta: Option<&[u8]>) -> Check {
    let info = match table.lookup(args) {
        Ok(i) => i,
        Err(_) => return Check::Ask,
    };
    check_entry(user, info, args, meta)
}

/// `meta`: cachefront's key prefix, when some argument starts with it — a writing command
/// may then not name such a key, whoever the user is.
fn check_entry(user: &User, info: &CmdInfo, args: &[Bytes], meta: Option<&[u8]>) -> Check {
    // Valkey refuses a wrong arity before checking permissions; it will do so here too.
    if !info.arity_ok(args.len()) {
        return Check::Allow;
    }
    let cats: Vec<&str> = info.categories.iter().map(String::as_str).collect();
    if !user.command_allowed(&info.name, &cats) {
        return Check::Deny(noperm_command(&user.name, &info.name));
    }
    let meta = meta.filter(|_| info.writes);
    if user.all_keys() && meta.is_none() {
        return Check::Allow;
    }
    if info.movable {
        return Check::Ask;
    }
    keys_allowed(user, info.legacy_keys(args).map(|k| &k[..]), meta)
}

/// The key rules for the keys a command names: the user's patterns, and no write under
/// cachefront's own prefix.
fn keys_allowed<'a>(
    user: &User,
    mut keys: impl Iterator<Item = &'a [u8]>,
    meta: Option<&[u8]>,
) -> Check {
    let verdict = keys.find_map(|k| {
        if !user.key_allowed(k) {
            Some(Refusal::NoPermKey)
        } else if meta.is_some_and(|p| k.starts_with(p)) {
            Some(Refusal::NoPermMeta)
        } else {
            None
        }
    });
    match verdict {
        Some(e) => Check::Deny(e.reply()),
        None => Check::Allow,
    }
}

/// cachefront's key prefix if some argument (after the name) starts with it: only then can
/// a command touch cachefront's own keys, and only then are its keys looked at for that.
pub fn meta_guard<'a>(prefix: &'a [u8], args: &[Bytes]) -> Option<&'a [u8]> {
    args.iter()
        .skip(1)
        .any(|a| a.starts_with(prefix))
        .then_some(prefix)
}

/// Synchronous check of a Valkey command (pass-through or answered locally) for `user`;
/// `meta` as [`meta_guard`] gives it.
pub fn check(
    table: Option<&CommandTable>,
    user: &User,
    args: &[Bytes],
    meta: Option<&[u8]>,
) -> Check {
    if user.unrestricted() && meta.is_none() {
        return Check::Allow;
    }
    match table {
        Some(t) => check_with(user, t, args, meta),
        None => Check::Ask,
    }
}

/// The checks that need Valkey: the command table, an unknown command's entry, or the keys
/// of a movable-keys command. Errors reaching Valkey are answered as `-UPSTREAM`. `upstream`
/// is whatever holds the Valkey client (the caller's shared state, kept alive by the check).
pub async fn resolve<U>(
    upstream: U,
    meta_prefix: Option<Vec<u8>>,
    user: Arc<User>,
    lane: u64,
    req: Request,
) -> Check
where
    U: std::ops::Deref<Target = crate::upstream::Upstream> + Clone + Send + Sync + 'static,
{
    let ask = |raw: Bytes| {
        let upstream = upstream.clone();
        async move {
            upstream
                .send(lane, Proto::Resp2, raw)
                .await
                .await
                .map_err(|_| crate::error::Error::upstream("connection lost"))?
        }
    };
    let cant = |e: crate::error::Error| {
        let why = match e {
            crate::error::Error::Upstream(m) => m,
            other => other.to_string(),
        };
        Check::Deny(
            crate::error::Error::upstream(format!(
                "cannot check permissions without Valkey's command table: {why}"
            ))
            .to_reply(),
        )
    };
    let table = match upstream.command_table().await {
        Ok(t) => t,
        Err(e) => return cant(e),
    };
    let looked_up;
    let info = match table.lookup(&req.args) {
        Ok(i) => i,
        Err(name) => {
            // Not in the table: ask Valkey about this one command (a module loaded since?).
            let q = encode_multibulk(&[
                Bytes::from_static(b"COMMAND"),
                Bytes::from_static(b"INFO"),
                Bytes::from(name),
            ]);
            let raw = match ask(q).await {
                Ok(r) => r,
                Err(e) => return cant(e),
            };
            let entry = match crate::upstream::commands::decode(&raw) {
                Some(Frame::Array(mut a)) if a.len() == 1 => CmdInfo::parse(&a.remove(0)),
                _ => None,
            };
            match entry {
                Some(e) => {
                    looked_up = e;
                    &looked_up
                }
                // Unknown to Valkey: it answers `unknown command` itself.
                None => return Check::Allow,
            }
        }
    };
    let meta = meta_prefix.as_deref();
    match check_entry(&user, info, &req.args, meta) {
        Check::Ask => {}
        done => return done,
    }
    // Movable keys: Valkey says which arguments are keys.
    let mut args = Vec::with_capacity(req.args.len() + 2);
    args.push(Bytes::from_static(b"COMMAND"));
    args.push(Bytes::from_static(b"GETKEYS"));
    args.extend(req.args.iter().cloned());
    let raw = match ask(encode_multibulk(&args)).await {
        Ok(r) => r,
        Err(e) => return cant(e),
    };
    if raw.first() == Some(&b'-') {
        // No keys found in these arguments: Valkey's own ACL would let the command through
        // too, and the command fails on its arguments.
        return Check::Allow;
    }
    match crate::upstream::commands::decode(&raw) {
        Some(Frame::Array(keys)) => {
            let keys = keys.iter().map(|k| match k {
                Frame::BulkString(b) => &b[..],
                // Not a key name: refused, as no pattern can allow it.
                _ => &b"\0not-a-key"[..],
            });
            let meta = meta.filter(|_| info.writes);
            if user.all_keys() && meta.is_none() {
                return Check::Allow;
            }
            keys_allowed(&user, keys, meta)
        }
        _ => cant(crate::error::Error::upstream(
            "unexpected COMMAND GETKEYS reply",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commented_users_example_parses() {
        let text = include_str!("../config.toml");
        let block: String = text
            .lines()
            .skip_while(|l| !l.starts_with("# [[auth.users]]"))
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches('#').trim_start()))
            .collect();
        let c = crate::config::Config::from_toml_with_env(&block, Vec::new()).unwrap();
        assert_eq!(c.auth.users.len(), 2);
        let users = Users::from_config(&c.auth).unwrap();
        assert!(users.authenticate(b"app", b"app-secret").is_ok());
        assert!(users.authenticate(b"reporting", b"new-secret").is_ok());
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secrets"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn glob_like_valkey() {
        let m = |p: &str, s: &str| glob_match(p.as_bytes(), s.as_bytes());
        assert!(m("*", ""));
        assert!(m("employee:*", "employee:1"));
        assert!(!m("employee:*", "employees:1"));
        assert!(m("e?p", "emp"));
        assert!(!m("e?p", "ep"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[a-c]x", "dx"));
        assert!(m("[^a-c]x", "dx"));
        assert!(!m("[^a-c]x", "ax"));
        assert!(m("[abc]", "c"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("[\\]]", "]"));
        assert!(m("*:*:*", "a:b:c"));
        assert!(!m("user:?", "user:12"));
    }

    #[test]
    fn rules() {
        let cfg = |cmds: &[&str], keys: &[&str]| UserConfig {
            name: "u".into(),
            password: Some("p".into()),
            passwords: vec![],
            commands: cmds.iter().map(|s| s.to_string()).collect(),
            keys: keys.iter().map(|s| s.to_string()).collect(),
            enabled: true,
        };
        let u = User::from_config(&cfg(&["@read", "set", "-keys", "client|id"], &["a*"])).unwrap();
        assert!(u.command_allowed("get", &["read", "string"]));
        assert!(!u.command_allowed("keys", &["read", "keyspace"]));
        assert!(u.command_allowed("set", &["write"]));
        assert!(u.command_allowed("client|id", &["slow"]));
        assert!(!u.command_allowed("client|kill", &["admin"]));
        assert!(u.key_allowed(b"abc"));
        assert!(!u.key_allowed(b"b"));
        let all = User::from_config(&cfg(&["*", "-@dangerous"], &["*"])).unwrap();
        assert!(!all.unrestricted());
        assert!(all.command_allowed("config|get", &["admin", "slow"]));
        assert!(!all.command_allowed("flushall", &["keyspace", "write", "dangerous"]));
        assert!(User::from_config(&cfg(&["@nope"], &["*"])).is_err());
        assert!(User::from_config(&cfg(&["*"], &["a["])).is_err());
        assert!(User::from_config(&cfg(&["get"], &["a\\"])).is_err());
        let hashed = UserConfig {
            password: Some(format!("sha256:{}", hex::encode(Sha256::digest(b"pw")))),
            ..cfg(&["*"], &["*"])
        };
        let h = User::from_config(&hashed).unwrap();
        assert!(h.password_ok(b"pw"));
        assert!(!h.password_ok(b"sha256:"));
        assert!(!h.password_ok(b""));
    }
}
