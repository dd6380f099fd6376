//! Configuration: `config.toml`, overridden key by key by `CACHEFRONT_*` environment variables.
//!
//! Every struct denies unknown keys, so a typo is refused at start with the key named instead of
//! silently ignored; an environment override that does not parse is an error too, never a
//! silent fall back to the default.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("environment variable {var}: {msg}")]
    Env { var: String, msg: String },
    #[error("{key}: {msg}")]
    Invalid { key: String, msg: String },
}

fn invalid(key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        msg: msg.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address cachefront listens on for plain TCP clients (unused with `tls.only = true`).
    pub listen: String,
    /// Log format: "text" or "json".
    pub log_format: String,
    /// Threads serving clients, one single-threaded runtime each (`crate::cores`; 0: one per
    /// CPU but one, at least one).
    pub threads: usize,
    pub valkey: ValkeyConfig,
    pub postgres: PostgresConfig,
    pub cache: CacheConfig,
    pub sql: SqlConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    pub invalidation: InvalidationConfig,
    pub verify: VerifyConfig,
    pub metrics: MetricsConfig,
    pub tls: TlsConfig,
    /// Named queries; `EMP.GET` is built in unless redefined here.
    #[serde(rename = "query")]
    pub queries: Vec<NamedQueryConfig>,
}

/// `valkey.url`, parsed: where the upstream Valkey is and how to log in.
/// `redis://` or `valkey://`, `rediss://` or `valkeys://` for TLS (`#insecure`: without
/// verifying the certificate), `[user[:password]@]host[:port][/db]`, as redis-cli and the
/// client libraries read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValkeyUrl {
    /// A name, or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub insecure: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

impl ValkeyUrl {
    pub fn parse(text: &str) -> Result<ValkeyUrl, String> {
        let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
        let tls = match url.scheme() {
            "redis" | "valkey" => false,
            "rediss" | "valkeys" => true,
            other => {
                return Err(format!(
                    "scheme {other}:// is not supported; use redis://, valkey://, rediss:// or valkeys://"
                ))
            }
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return Err("has no host".into()),
        };
        if host == "0.0.0.0" || host == "::" {
            return Err("names a wildcard address (0.0.0.0 or ::), not a server".into());
        }
        let insecure = match url.fragment() {
            None => false,
            Some("insecure") if tls => true,
            Some(f) => return Err(format!("unknown fragment #{f} (only #insecure, with TLS)")),
        };
        let db = match url.path().trim_matches('/') {
            "" => 0,
            n => n
                .parse()
                .map_err(|_| format!("database '{n}' is not a number"))?,
        };
        let decoded = |part: &str, what: &str| -> Result<Option<String>, String> {
            if part.is_empty() {
                return Ok(None);
            }
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(|p| Some(p.into_owned()))
                .map_err(|_| format!("{what} is not UTF-8"))
        };
        Ok(ValkeyUrl {
            host,
            port: url.port().unwrap_or(6379),
            tls,
            insecure,
            username: decoded(url.username(), "the user name")?,
            password: decoded(url.password().unwrap_or_default(), "the password")?,
            db,
        })
    }

    /// `host:port` to connect to (an IPv6 address in brackets).
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValkeyConfig {
    /// `redis://[user:password@]host:port[/db]` of the upstream Valkey; `rediss://` (or
    /// `valkeys://`) for TLS, the host being the name the server's certificate must carry.
    pub url: String,
    /// Shared pipelined connections per protocol version for stateless pass-through commands.
    pub pool_size: usize,
    /// Idle dedicated connections kept for clients entering MULTI, SUBSCRIBE, blocking commands…
    pub idle_dedicated: usize,
    pub connect_timeout_ms: u64,
    /// How long a reply on a shared connection may take before the connection is discarded.
    pub command_timeout_ms: u64,
    /// With `rediss://`: PEM file of the CA(s) to trust for Valkey's certificate; empty: the
    /// system's trusted CAs.
    pub tls_ca_file: String,
    /// With `rediss://`: accept any certificate from Valkey (no verification at all). For
    /// tests only; logged as a warning at start.
    pub tls_insecure: bool,
    /// With `rediss://`: PEM certificate (chain) cachefront presents to Valkey, for servers
    /// that require client certificates (mutual TLS); with `tls_key_file`. Empty: none.
    pub tls_cert_file: String,
    /// The private key of `tls_cert_file` (PEM).
    pub tls_key_file: String,
    /// `host:port` of some nodes of a Valkey Cluster (any few: the rest are discovered). Set,
    /// it makes the upstream a cluster: requests route by hash slot; `url` then only supplies
    /// the login (and, with `rediss://`, TLS to every node). Empty: a single Valkey at `url`.
    pub cluster: Vec<String>,
    /// With `cluster`: send read-only pass-through commands on keys (GET, HGETALL, ZRANGE…) to
    /// a replica of the slot's primary, over a `READONLY` connection, and to the primary when
    /// the shard has no healthy replica. Replicas are asynchronous: such reads may be stale
    /// (see docs/cluster.md). cachefront's own cache traffic always stays on primaries.
    pub read_from_replicas: bool,
}

/// The TLS listener for clients. It runs beside the plain `listen` one, or alone with
/// `only = true`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// `host:port` of the TLS listener; empty: no TLS listener.
    pub listen: String,
    /// Serve TLS clients only: the plain `listen` address is not opened.
    pub only: bool,
    /// PEM certificate chain of the server, leaf first.
    pub cert_file: String,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// PEM CA certificate(s) that sign client certificates; empty: none are asked for. Set
    /// without `require_client_cert`, a certificate is optional but verified if presented.
    pub ca_file: String,
    /// Refuse clients without a certificate signed by `ca_file` (mutual TLS).
    pub require_client_cert: bool,
    /// A client must complete the TLS handshake within this many milliseconds.
    pub handshake_timeout_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            listen: String::new(),
            only: false,
            cert_file: String::new(),
            key_file: String::new(),
            ca_file: String::new(),
            require_client_cert: false,
            handshake_timeout_ms: 5000,
        }
    }
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.listen.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    pub url: String,
    pub pool_size: usize,
    pub connect_timeout_ms: u64,
    /// `statement_timeout` for every query cachefront runs.
    pub statement_timeout_ms: u64,
    /// URLs of streaming read replicas of `url` (empty: none). Fill queries go to one that is
    /// caught up enough (see `db::replicas`), everything else to the primary. Each gets a pool
    /// of `pool_size` connections with the same session settings as the primary's.
    pub replicas: Vec<String>,
    /// A replica serves fills only while it has replayed everything the primary had flushed
    /// this many milliseconds ago (0: everything as of the last poll).
    pub replica_max_lag_ms: u64,
    /// How often the primary's and the replicas' WAL positions are read.
    pub replica_poll_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// TTL in seconds for SQL.CACHED and named queries that set none.
    pub default_ttl: u64,
    /// Prefix of cachefront's own bookkeeping keys (table versions, dependency sets).
    pub meta_prefix: String,
    /// Seconds to remember that a named query found no row (0: off). Per-query `negative_ttl`
    /// overrides it. The marker is a separate key, so hand-written readers never see it.
    pub negative_ttl: u64,
    /// Fraction of a TTL randomly taken off each entry's TTL (0 to 0.5), so entries filled
    /// together expire apart.
    pub ttl_jitter: f64,
    /// XFetch's beta for probabilistic early refresh of hot entries (0: off; 1: the paper's
    /// default; larger refreshes earlier).
    pub early_refresh_beta: f64,
    /// How many recently filled entries early refresh keeps timing data for.
    pub early_refresh_keys: u64,
    /// Bytes of the in-process L1 (0 turns it off).
    pub l1_max_bytes: u64,
    /// Longest an L1 entry lives (it is also dropped whenever Valkey reports a change).
    pub l1_ttl_ms: u64,
    /// When a fill's query fails, answer with the last value this process filled for the key
    /// if it is at most this many seconds old (0: off — errors are errors).
    pub stale_if_error_secs: u64,
    /// Milliseconds a fill's lease lasts: while one instance fills a key, the others sharing
    /// its Valkey wait for that fill instead of querying too (0: each instance fills on its
    /// own). Keep it above `postgres.statement_timeout_ms`; a dead holder's waiters fill
    /// after it expires. See `cache::fleet`.
    pub fill_lease_ms: u64,
    /// Answer a miss as soon as PostgreSQL has: the store is then already queued on the
    /// client's own connection to Valkey, ahead of its next command, but not yet confirmed —
    /// another connection reading Valkey, and INFO's fill counters, may see it a moment
    /// later. Off: the answer waits for the store (one round trip to Valkey more).
    pub reply_before_store: bool,
}

/// Observability.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` of the Prometheus endpoint (`GET /metrics`); empty: off.
    pub listen: String,
    /// Fills that take at least this many milliseconds go to `CACHEFRONT.SLOWLOG`.
    pub slow_fill_ms: u64,
    /// How many slow fills `CACHEFRONT.SLOWLOG` keeps.
    pub slowlog_max_len: usize,
    /// How many SQL.CACHED texts `CACHEFRONT.QUERIES` and the per-query metrics keep figures
    /// for (the busiest; named queries are always kept).
    pub top_queries: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: String::new(),
            slow_fill_ms: 100,
            slowlog_max_len: 128,
            top_queries: 64,
        }
    }
}

/// Where committed changes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeSource {
    /// Statement triggers on each table cached queries read, notifying on commit (NOTIFY).
    Triggers,
    /// PostgreSQL logical replication (a temporary slot, `pgoutput`): nothing is installed
    /// on application tables; needs `wal_level = logical` and the REPLICATION privilege.
    Wal,
}

/// Invalidation of cached entries when PostgreSQL data changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InvalidationConfig {
    /// Listen for change notifications and drop dependent entries.
    pub enabled: bool,
    /// Where committed changes come from: `"triggers"` or `"wal"`.
    pub source: ChangeSource,
    /// With `source = "wal"`: the publication cachefront adds the tables it caches from to
    /// (created if missing; tables are added one by one, each only if PostgreSQL would still
    /// accept UPDATE and DELETE on it once published).
    pub publication: String,
    /// Create the notification triggers on tables cachefront caches from (needs the table
    /// owner's rights; otherwise run `cachefront triggers install` once as the owner).
    pub install_triggers: bool,
    /// NOTIFY channel the triggers use.
    pub channel: String,
    /// Extra tables to put triggers on at start (besides those named queries read).
    pub tables: Vec<String>,
    /// A statement touching more rows than this invalidates its whole table instead of rows.
    pub max_rows_per_notification: u64,
    /// After this many notifications in one transaction, the rest are table-wide (and
    /// PostgreSQL folds identical ones), so bulk writes cannot flood the channel.
    pub max_notifications_per_transaction: u64,
    /// Longest pause between reconnection attempts of the listening connection.
    pub reconnect_max_ms: u64,
    /// Instances sharing one Valkey apply each change once: the one holding a lease in Valkey
    /// (milliseconds; renewed every third of it) applies, and another takes over within about
    /// `lease_ms * 4 / 3` when it dies.
    pub lease_ms: u64,
    /// How long a cached read under `CACHEFRONT.AFTER <lsn>` waits (milliseconds) for the
    /// fleet's applied invalidations to reach its position before it is refused with
    /// `-TRYAGAIN` (a connection may choose its own with `TIMEOUT`).
    pub read_after_timeout_ms: u64,
}

/// Continuous verification (`cache::verify`): a background sampler re-reads a few cached
/// entries from PostgreSQL and compares them with what Valkey holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// Run the sampler.
    pub enabled: bool,
    /// Entries checked per second (0: off).
    pub per_second: u64,
    /// How long a suspected mismatch is given to be explained by an invalidation on its way
    /// before it counts; must exceed the longest time a committed write takes to reach Valkey.
    pub grace_ms: u64,
    /// Most recent fills the sampler picks from.
    pub registry_entries: usize,
    /// Bytes (keys, dependencies, query arguments) those fills may hold in all.
    pub registry_bytes: usize,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            enabled: true,
            per_second: 2,
            grace_ms: 1000,
            registry_entries: 10_000,
            registry_bytes: 8 * 1024 * 1024,
        }
    }
}

impl VerifyConfig {
    /// Whether the sampler runs at all.
    pub fn active(&self) -> bool {
        self.enabled && self.per_second > 0
    }
}

/// Most checks per second `verify.per_second` accepts: a sampler, not a load generator.
pub const VERIFY_MAX_PER_SECOND: u64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqlMode {
    /// Any single read-only statement.
    Any,
    /// Only the statements listed in `sql.allowlist`.
    Allowlist,
    /// SQL.CACHED disabled.
    Off,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqlConfig {
    pub mode: SqlMode,
    /// Exact query texts accepted when `mode = "allowlist"`.
    pub allowlist: Vec<String>,
    /// Prepended to SQL.CACHED keys; empty keeps them identical to hand-written caches.
    pub key_prefix: String,
    /// Longest SQL text accepted, checked before parsing.
    pub max_sql_bytes: usize,
    /// Most rows a result may have; larger results are refused, not cached.
    pub max_rows: usize,
    /// Most bytes of JSON a result may render to.
    pub max_result_bytes: usize,
    /// Seconds to cache an empty result (`[]`); 0 (default) does not cache empty results.
    pub negative_ttl: u64,
    /// Cache queries whose dependencies PostgreSQL cannot fully report (a plpgsql function,
    /// a foreign table, a system catalog) until their TTL only, instead of refusing them.
    /// Such entries are counted as `ttl_only_fills`.
    pub ttl_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_clients: usize,
    pub max_inline: usize,
    pub max_bulk: usize,
    pub max_multibulk: usize,
    pub max_query_buffer: usize,
    /// Most replies a client may have queued (pipelined requests in flight) before
    /// cachefront stops reading from it until it catches up.
    pub max_pipeline: usize,
    /// Close a client idle this many seconds (0: never), like Valkey's `timeout`. Clients in
    /// subscribed mode or waiting on a blocking command are exempt.
    pub timeout_secs: u64,
    /// TCP keepalive probe interval for client connections (0: off), like `tcp-keepalive`.
    pub tcp_keepalive_secs: u64,
    /// A client that does not read its replies for this long is disconnected.
    pub client_write_timeout_ms: u64,
    /// Valkey's `client-output-buffer-limit`, in Valkey's syntax: the bound in bytes on the
    /// replies a client may hold unread, per class.
    pub client_output_buffer_limit: OutputBufferLimits,
}

/// One class's output limit: past `hard` bytes the client is disconnected at once; past
/// `soft` bytes for `soft_secs` seconds in a row, too. 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimit {
    pub hard: u64,
    pub soft: u64,
    pub soft_secs: u64,
}

/// `client-output-buffer-limit` as Valkey spells it: `<class> <hard> <soft> <soft seconds>`
/// repeated, classes `normal`, `replica` (cachefront: MONITOR clients) and `pubsub`, sizes with
/// Valkey's units (`k`/`kb`, `m`/`mb`, `g`/`gb`). Classes not named keep their defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OutputBufferLimits {
    pub normal: OutputLimit,
    pub replica: OutputLimit,
    pub pubsub: OutputLimit,
}

impl Default for OutputBufferLimits {
    /// Valkey's defaults for `replica` and `pubsub`. Valkey leaves `normal` unlimited, relying
    /// on `maxmemory`; a proxy holds its clients' replies in its own memory, so cachefront
    /// bounds them too.
    fn default() -> Self {
        let l = |hard, soft, soft_secs| OutputLimit {
            hard,
            soft,
            soft_secs,
        };
        OutputBufferLimits {
            normal: l(256 << 20, 0, 0),
            replica: l(256 << 20, 64 << 20, 60),
            pubsub: l(32 << 20, 8 << 20, 60),
        }
    }
}

impl TryFrom<String> for OutputBufferLimits {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        if !words.len().is_multiple_of(4) {
            return Err(format!(
                "'{text}': expected <class> <hard> <soft> <soft seconds>, repeated"
            ));
        }
        let mut limits = OutputBufferLimits::default();
        for w in words.chunks(4) {
            let limit = OutputLimit {
                hard: memory_size(w[1])?,
                soft: memory_size(w[2])?,
                soft_secs: w[3]
                    .parse()
                    .map_err(|_| format!("'{}' is not a number of seconds", w[3]))?,
            };
            match w[0].to_ascii_lowercase().as_str() {
                "normal" => limits.normal = limit,
                "replica" | "slave" => limits.replica = limit,
                "pubsub" => limits.pubsub = limit,
                other => {
                    return Err(format!(
                        "unknown client class '{other}' (normal, replica, pubsub)"
                    ))
                }
            }
        }
        Ok(limits)
    }
}

impl From<OutputBufferLimits> for String {
    fn from(l: OutputBufferLimits) -> String {
        let c =
            |name: &str, o: OutputLimit| format!("{name} {} {} {}", o.hard, o.soft, o.soft_secs);
        format!(
            "{} {} {}",
            c("normal", l.normal),
            c("replica", l.replica),
            c("pubsub", l.pubsub)
        )
    }
}

/// A size as Valkey's config reads it: `1k` = 1000, `1kb` = 1024 (likewise m, mb, g, gb).
fn memory_size(s: &str) -> Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let mult: u64 = match &lower[digits.len()..] {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        _ => return Err(format!("'{s}' is not a size (e.g. 32mb)")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("'{s}' is not a size (e.g. 32mb)"))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Password of the default user; empty means no authentication.
    pub requirepass: String,
    /// Like Valkey's protected mode: without a password, only loopback clients are served.
    pub protected_mode: bool,
    /// Commands refused to every client (e.g. FLUSHALL, CONFIG, DEBUG, SHUTDOWN, KEYS).
    pub deny_commands: Vec<String>,
    /// ACL-style users (`[[auth.users]]`); `requirepass` is the password of user `default`.
    pub users: Vec<UserConfig>,
}

/// One `[[auth.users]]` entry; see `acl` for the rules.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain text, or `sha256:<hex>` (the SHA-256 of the password).
    #[serde(default)]
    pub password: Option<String>,
    /// Several passwords (any one authenticates), e.g. during a rotation.
    #[serde(default)]
    pub passwords: Vec<String>,
    /// Allowed commands: `*`, names (`get`, `client|id`), `@category`; `-name` / `-@category`
    /// exclude.
    #[serde(default)]
    pub commands: Vec<String>,
    /// Key glob patterns the user may touch; default every key.
    #[serde(default = "all_keys")]
    pub keys: Vec<String>,
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
}

impl std::fmt::Debug for UserConfig {
    // Passwords stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("commands", &self.commands)
            .field("keys", &self.keys)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

fn all_keys() -> Vec<String> {
    vec!["*".into()]
}

fn enabled_by_default() -> bool {
    true
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            requirepass: String::new(),
            protected_mode: true,
            deny_commands: Vec::new(),
            users: Vec::new(),
        }
    }
}

/// How a named query replies and stores its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyKind {
    /// First column of the first row, as a string value.
    Value,
    /// First row stored with HSET, replied as a map.
    Hash,
    /// All rows as a JSON array of objects.
    Json,
}

/// Type an argument of a named query must have; checked before any query runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgType {
    Int,
    Float,
    Bool,
    Text,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedQueryConfig {
    /// Command name clients send, e.g. `EMP.GET`.
    pub command: String,
    /// Parameterised SQL; `$n` is the n-th argument.
    pub sql: String,
    /// Key template; `{n}` is the n-th argument.
    pub key: String,
    /// Seconds; defaults to `cache.default_ttl`.
    #[serde(default)]
    pub ttl: Option<u64>,
    #[serde(default = "default_reply")]
    pub reply: ReplyKind,
    #[serde(default)]
    pub args: Vec<ArgType>,
    /// Noun used in argument errors, e.g. "employee id".
    #[serde(default)]
    pub arg_names: Vec<String>,
    /// One-line description shown by COMMAND DOCS.
    #[serde(default)]
    pub summary: String,
    /// `table.column` the key argument equals (e.g. `employees.id`): then a write drops only
    /// the entries of the rows it changed, instead of every entry of the query.
    #[serde(default)]
    pub key_column: Option<String>,
    /// Which argument (1-based) holds the `key_column` value; default 1.
    #[serde(default)]
    pub key_arg: Option<usize>,
    /// Seconds to remember "no row" for this query (overrides `cache.negative_ttl`).
    #[serde(default)]
    pub negative_ttl: Option<u64>,
    /// Cache this query until its TTL only when PostgreSQL cannot report everything it reads
    /// (instead of refusing it).
    #[serde(default)]
    pub ttl_only: bool,
}

fn default_reply() -> ReplyKind {
    ReplyKind::Value
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:6380".into(),
            log_format: "text".into(),
            threads: 0,
            valkey: ValkeyConfig::default(),
            postgres: PostgresConfig::default(),
            cache: CacheConfig::default(),
            sql: SqlConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            invalidation: InvalidationConfig::default(),
            verify: VerifyConfig::default(),
            metrics: MetricsConfig::default(),
            tls: TlsConfig::default(),
            queries: Vec::new(),
        }
    }
}

/// A `valkey.cluster` entry: `host:port`, or a URL `scheme://host:port` whose scheme says
/// whether it is TLS (`Some(true)` for `rediss://`/`valkeys://`, `None` without a scheme).
pub fn cluster_seed(entry: &str) -> (Option<bool>, String) {
    let s = entry.trim();
    let (tls, rest) = [
        ("redis://", false),
        ("valkey://", false),
        ("rediss://", true),
        ("valkeys://", true),
    ]
    .iter()
    .find_map(|(p, tls)| s.strip_prefix(p).map(|r| (Some(*tls), r)))
    .unwrap_or((None, s));
    (tls, rest.trim_end_matches('/').to_string())
}

impl Default for ValkeyConfig {
    fn default() -> Self {
        ValkeyConfig {
            url: "redis://127.0.0.1:6379".into(),
            pool_size: 2,
            idle_dedicated: 16,
            connect_timeout_ms: 1000,
            command_timeout_ms: 5000,
            tls_ca_file: String::new(),
            tls_insecure: false,
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            cluster: Vec::new(),
            read_from_replicas: false,
        }
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "postgres://postgres@127.0.0.1:5432/staff".into(),
            pool_size: 16,
            connect_timeout_ms: 2000,
            statement_timeout_ms: 5000,
            replicas: Vec::new(),
            replica_max_lag_ms: 1000,
            replica_poll_ms: 100,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            default_ttl: 3600,
            meta_prefix: "cachefront:".into(),
            negative_ttl: 0,
            ttl_jitter: 0.0,
            early_refresh_beta: 1.0,
            early_refresh_keys: 100_000,
            l1_max_bytes: 64 * 1024 * 1024,
            l1_ttl_ms: 1000,
            stale_if_error_secs: 0,
            fill_lease_ms: 6000,
            reply_before_store: false,
        }
    }
}

impl Default for InvalidationConfig {
    fn default() -> Self {
        InvalidationConfig {
            enabled: true,
            source: ChangeSource::Triggers,
            publication: "cachefront".into(),
            install_triggers: true,
            channel: "cachefront_invalidate".into(),
            tables: Vec::new(),
            max_rows_per_notification: 1000,
            max_notifications_per_transaction: 100,
            reconnect_max_ms: 5000,
            lease_ms: 3000,
            read_after_timeout_ms: 1000,
        }
    }
}

impl Default for SqlConfig {
    fn default() -> Self {
        SqlConfig {
            mode: SqlMode::Any,
            allowlist: Vec::new(),
            key_prefix: String::new(),
            max_sql_bytes: 64 * 1024,
            max_rows: 100_000,
            max_result_bytes: 64 * 1024 * 1024,
            negative_ttl: 0,
            ttl_only: false,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = crate::protocol::Limits::default();
        LimitsConfig {
            max_clients: 10_000,
            max_inline: l.max_inline,
            max_bulk: l.max_bulk,
            max_multibulk: l.max_multibulk,
            max_query_buffer: l.max_query_buffer,
            max_pipeline: 1024,
            timeout_secs: 0,
            tcp_keepalive_secs: 300,
            client_write_timeout_ms: 60_000,
            client_output_buffer_limit: OutputBufferLimits::default(),
        }
    }
}

/// The built-in `EMP.GET`: the guide's simple value caching.
pub fn builtin_emp_get() -> NamedQueryConfig {
    NamedQueryConfig {
        command: "EMP.GET".into(),
        sql: "SELECT name FROM employees WHERE id = $1".into(),
        key: "employee:{1}".into(),
        ttl: None,
        reply: ReplyKind::Value,
        args: vec![ArgType::Int],
        arg_names: vec!["employee id".into()],
        summary: "Get an employee's name, cached at employee:<id>".into(),
        key_column: Some("employees.id".into()),
        key_arg: None,
        negative_ttl: None,
        ttl_only: false,
    }
}

/// Shortest invalidation lease: renewed every third of it, it must outlast a round trip to
/// Valkey several times over.
pub const MIN_LEASE_MS: u64 = 100;
/// Longest invalidation lease: a dead holder's changes wait up to about this long.
pub const MAX_LEASE_MS: u64 = 600_000;
/// Longest wait of a read under `CACHEFRONT.AFTER` (`invalidation.read_after_timeout_ms`, a
/// connection's `TIMEOUT`).
pub const MAX_READ_AFTER_TIMEOUT_MS: u64 = 600_000;

/// Shortest fill lease: it must outlast a fill's round trips to Valkey and a fast query.
pub const MIN_FILL_LEASE_MS: u64 = 100;

/// Sections whose keys may be overridden as `CACHEFRONT_<SECTION>_<KEY>`.
const SECTIONS: &[&str] = &[
    "valkey",
    "postgres",
    "cache",
    "sql",
    "limits",
    "auth",
    "invalidation",
    "verify",
    "metrics",
    "tls",
];

impl Config {
    /// Loads `path` (or the defaults when `None`), applies `CACHEFRONT_*` variables from `env`,
    /// and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        Self::from_toml_with_env(&text, env)
    }

    /// Parses TOML text, applies environment overrides and validates.
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let defaults = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("CACHEFRONT_") && !IGNORED_ENV.contains(&k.as_str()))
            .collect();
        vars.sort();
        for (var, value) in vars {
            apply_env(&mut doc, &defaults, &var, &value)?;
        }
        let cfg: Config = doc
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values serde cannot, on the config's own data: addresses, URLs, ranges, and the
    /// named queries' shape. What needs domain objects (users, TLS files, SQL, key
    /// templates) is checked by the layers that own them: `server::check_config`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.tls.only {
            self.listen.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "listen",
                    format!("'{}' is not host:port ({e})", self.listen),
                )
            })?;
        }
        let url = ValkeyUrl::parse(&self.valkey.url).map_err(|e| invalid("valkey.url", e))?;
        self.validate_tls(url.tls)?;
        self.validate_cluster(url.tls)?;
        self.postgres
            .url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| invalid("postgres.url", format!("not a PostgreSQL URL ({e})")))?;
        for (i, url) in self.postgres.replicas.iter().enumerate() {
            if url.trim().is_empty() {
                return Err(invalid(
                    format!("postgres.replicas[{i}]"),
                    "must not be empty",
                ));
            }
            url.parse::<tokio_postgres::Config>().map_err(|e| {
                invalid(
                    format!("postgres.replicas[{i}]"),
                    format!("not a PostgreSQL URL ({e})"),
                )
            })?;
        }
        positive("postgres.replica_poll_ms", self.postgres.replica_poll_ms)?;
        positive("valkey.pool_size", self.valkey.pool_size as u64)?;
        positive("valkey.connect_timeout_ms", self.valkey.connect_timeout_ms)?;
        positive("valkey.command_timeout_ms", self.valkey.command_timeout_ms)?;
        positive("postgres.pool_size", self.postgres.pool_size as u64)?;
        positive(
            "postgres.connect_timeout_ms",
            self.postgres.connect_timeout_ms,
        )?;
        positive("cache.default_ttl", self.cache.default_ttl)?;
        positive("limits.max_clients", self.limits.max_clients as u64)?;
        positive("limits.max_pipeline", self.limits.max_pipeline as u64)?;
        positive(
            "limits.client_write_timeout_ms",
            self.limits.client_write_timeout_ms,
        )?;
        if let Some(bad) = self
            .auth
            .deny_commands
            .iter()
            .find(|c| c.is_empty() || c.contains(char::is_whitespace))
        {
            return Err(invalid(
                "auth.deny_commands",
                format!("'{bad}' is not a command name"),
            ));
        }
        if self.limits.max_inline < 1024 {
            return Err(invalid("limits.max_inline", "must be at least 1024"));
        }
        if !self.metrics.listen.is_empty() {
            self.metrics.listen.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "metrics.listen",
                    format!("'{}' is not host:port ({e})", self.metrics.listen),
                )
            })?;
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(invalid("log_format", "must be \"text\" or \"json\""));
        }
        if self.cache.meta_prefix.is_empty() {
            return Err(invalid("cache.meta_prefix", "must not be empty"));
        }
        if !(0.0..=0.5).contains(&self.cache.ttl_jitter) {
            return Err(invalid("cache.ttl_jitter", "must be between 0 and 0.5"));
        }
        if !(self.cache.early_refresh_beta >= 0.0 && self.cache.early_refresh_beta.is_finite()) {
            return Err(invalid("cache.early_refresh_beta", "must be 0 or more"));
        }
        let fill_lease = self.cache.fill_lease_ms;
        if fill_lease != 0 && !(MIN_FILL_LEASE_MS..=MAX_LEASE_MS).contains(&fill_lease) {
            return Err(invalid(
                "cache.fill_lease_ms",
                format!("must be 0 (off) or between {MIN_FILL_LEASE_MS} and {MAX_LEASE_MS}"),
            ));
        }
        let ch = &self.invalidation.channel;
        if ch.is_empty() || !ch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(invalid(
                "invalidation.channel",
                "must be letters, digits and _",
            ));
        }
        let p = &self.invalidation.publication;
        if p.is_empty()
            || p.len() > 63
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(invalid(
                "invalidation.publication",
                "must be 1 to 63 lower-case letters, digits and _",
            ));
        }
        positive(
            "invalidation.max_rows_per_notification",
            self.invalidation.max_rows_per_notification,
        )?;
        positive(
            "invalidation.reconnect_max_ms",
            self.invalidation.reconnect_max_ms,
        )?;
        if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&self.invalidation.lease_ms) {
            return Err(invalid(
                "invalidation.lease_ms",
                format!("must be between {MIN_LEASE_MS} and {MAX_LEASE_MS}"),
            ));
        }
        if self.invalidation.read_after_timeout_ms > MAX_READ_AFTER_TIMEOUT_MS {
            return Err(invalid(
                "invalidation.read_after_timeout_ms",
                format!("must be at most {MAX_READ_AFTER_TIMEOUT_MS}"),
            ));
        }
        self.verify.validate()?;
        let mut seen = BTreeSet::new();
        for (i, q) in self.queries.iter().enumerate() {
            let key = format!("query[{i}] ({})", q.command);
            q.validate().map_err(|msg| invalid(key.clone(), msg))?;
            if !seen.insert(q.command.to_ascii_uppercase()) {
                return Err(invalid(key, "command declared twice"));
            }
        }
        Ok(())
    }

    /// The TLS settings: addresses, and the files named can be read and parsed (so a bad
    /// certificate stops the start, and `--check-config`, with the key named).
    fn validate_cluster(&self, valkey_tls: bool) -> Result<(), ConfigError> {
        if self.valkey.cluster.is_empty() {
            if self.valkey.read_from_replicas {
                return Err(invalid(
                    "valkey.read_from_replicas",
                    "needs valkey.cluster (replica reads are for a Valkey Cluster's replicas)",
                ));
            }
            return Ok(());
        }
        for node in &self.valkey.cluster {
            let (seed_tls, addr) = cluster_seed(node);
            if seed_tls.is_some_and(|t| t != valkey_tls) {
                return Err(invalid(
                    "valkey.cluster",
                    format!(
                        "'{node}': its scheme says TLS {}, valkey.url's says {} (valkey.url decides TLS for every node)",
                        if valkey_tls { "off" } else { "on" },
                        if valkey_tls { "on" } else { "off" },
                    ),
                ));
            }
            let ok = addr
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(invalid(
                    "valkey.cluster",
                    format!("'{node}' is not host:port"),
                ));
            }
        }
        if self.cache.meta_prefix.contains(['{', '}']) {
            return Err(invalid(
                "cache.meta_prefix",
                "must not contain '{' or '}' with valkey.cluster (cachefront adds hash tags itself)",
            ));
        }
        Ok(())
    }

    fn validate_tls(&self, valkey_tls: bool) -> Result<(), ConfigError> {
        let tls = &self.tls;
        if tls.enabled() {
            tls.listen.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "tls.listen",
                    format!("'{}' is not host:port ({e})", tls.listen),
                )
            })?;
            positive("tls.handshake_timeout_ms", tls.handshake_timeout_ms)?;
        } else if tls.only {
            return Err(invalid("tls.only", "needs tls.listen"));
        }
        if !valkey_tls {
            if !self.valkey.tls_ca_file.is_empty() {
                return Err(invalid(
                    "valkey.tls_ca_file",
                    "set, but valkey.url is not a rediss:// (TLS) URL",
                ));
            }
            if self.valkey.tls_insecure {
                return Err(invalid(
                    "valkey.tls_insecure",
                    "set, but valkey.url is not a rediss:// (TLS) URL",
                ));
            }
            if !self.valkey.tls_cert_file.is_empty() {
                return Err(invalid(
                    "valkey.tls_cert_file",
                    "set, but valkey.url is not a rediss:// (TLS) URL",
                ));
            }
        }
        match (
            self.valkey.tls_cert_file.is_empty(),
            self.valkey.tls_key_file.is_empty(),
        ) {
            (false, true) => Err(invalid(
                "valkey.tls_key_file",
                "must be set with valkey.tls_cert_file",
            )),
            (true, false) => Err(invalid(
                "valkey.tls_cert_file",
                "must be set with valkey.tls_key_file",
            )),
            _ => Ok(()),
        }
    }

    /// The named queries in force: those declared, plus the built-in `EMP.GET` unless redefined.
    pub fn named_queries(&self) -> Vec<NamedQueryConfig> {
        let mut out = self.queries.clone();
        if !out
            .iter()
            .any(|q| q.command.eq_ignore_ascii_case("EMP.GET"))
        {
            out.insert(0, builtin_emp_get());
        }
        out
    }

    /// The protocol limits, as the request parser wants them.
    pub fn protocol_limits(&self) -> crate::protocol::Limits {
        crate::protocol::Limits {
            max_inline: self.limits.max_inline,
            max_bulk: self.limits.max_bulk,
            max_multibulk: self.limits.max_multibulk,
            max_query_buffer: self.limits.max_query_buffer,
            ..Default::default()
        }
    }
}

/// Variables that configure the process, not the server.
const IGNORED_ENV: &[&str] = &[
    "CACHEFRONT_CONFIG",
    "CACHEFRONT_VALKEY_SERVER",
    "CACHEFRONT_PG_BIN",
];

fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(())
}

impl VerifyConfig {
    /// The sampler's settings, each refused with its key named.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.per_second > VERIFY_MAX_PER_SECOND {
            return Err(invalid(
                "verify.per_second",
                format!("must be at most {VERIFY_MAX_PER_SECOND} (0 turns the sampler off)"),
            ));
        }
        positive("verify.grace_ms", self.grace_ms)?;
        if self.grace_ms > 600_000 {
            return Err(invalid(
                "verify.grace_ms",
                "must be at most 600000 (10 minutes)",
            ));
        }
        positive("verify.registry_entries", self.registry_entries as u64)?;
        if self.registry_bytes < 1024 {
            return Err(invalid("verify.registry_bytes", "must be at least 1024"));
        }
        Ok(())
    }
}

impl NamedQueryConfig {
    /// The checks of a query's shape; its SQL, key template and command name are checked by
    /// `command::check_queries`.
    fn validate(&self) -> Result<(), String> {
        let name = &self.command;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("command must be a non-empty word".into());
        }
        if !name.contains('.') || name.starts_with('.') || name.ends_with('.') {
            return Err(format!(
                "command {name} must be namespaced with a dot (like EMP.GET), so it can never shadow a Valkey command"
            ));
        }
        if self.ttl == Some(0) {
            return Err("ttl must be greater than 0".into());
        }
        let n = self.args.len();
        if !self.arg_names.is_empty() && self.arg_names.len() != n {
            return Err("arg_names must name every arg".into());
        }
        if self.negative_ttl == Some(0) {
            return Err(
                "negative_ttl must be greater than 0 (leave it out to use cache.negative_ttl)"
                    .into(),
            );
        }
        if let Some(kc) = &self.key_column {
            kc.split_once('.')
                .filter(|(t, c)| !t.is_empty() && !c.is_empty() && !c.contains('.'))
                .ok_or("key_column must be table.column")?;
            let arg = self.key_arg.unwrap_or(1);
            if arg == 0 || arg > n {
                return Err(format!("key_arg {arg} but the query takes {n} argument(s)"));
            }
        }
        Ok(())
    }
}

/// Applies `CACHEFRONT_SECTION_KEY=value` to the document, typed like the default value.
fn apply_env(
    doc: &mut toml::Table,
    defaults: &toml::Table,
    var: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let env_err = |msg: String| ConfigError::Env {
        var: var.to_string(),
        msg,
    };
    let rest = var["CACHEFRONT_".len()..].to_ascii_lowercase();
    let (section, key) = match SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_"))) {
        Some(s) => (Some(*s), rest[s.len() + 1..].to_string()),
        None => (None, rest),
    };
    let default_table = match section {
        Some(s) => defaults.get(s).and_then(|v| v.as_table()),
        None => Some(defaults),
    };
    let template = default_table
        .and_then(|t| t.get(&key))
        .filter(|_| !(section == Some("auth") && key == "users"))
        .filter(|v| {
            !v.is_table() && !matches!(v, toml::Value::Array(a) if a.iter().any(|x| x.is_table()))
        })
        .ok_or_else(|| env_err("no such configuration key".into()))?;
    let dotted = match section {
        Some(s) => format!("{s}.{key}"),
        None => key.clone(),
    };
    let typed = typed_like(template, value).map_err(|expected| {
        env_err(format!(
            "invalid value '{value}' for {dotted} (expected {expected})"
        ))
    })?;
    let target = match section {
        Some(s) => doc
            .entry(s)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| invalid(s, "must be a table"))?,
        None => doc,
    };
    target.insert(key, typed);
    Ok(())
}

fn typed_like(template: &toml::Value, value: &str) -> Result<toml::Value, &'static str> {
    Ok(match template {
        toml::Value::String(_) => toml::Value::String(value.to_string()),
        toml::Value::Integer(_) => {
            toml::Value::Integer(value.trim().parse().map_err(|_| "an integer")?)
        }
        toml::Value::Float(_) => toml::Value::Float(value.trim().parse().map_err(|_| "a number")?),
        toml::Value::Boolean(_) => toml::Value::Boolean(match value.trim() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err("true or false"),
        }),
        toml::Value::Array(_) => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        _ => return Err("a plain value"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valkey_urls_read_as_client_libraries_read_them() {
        let u = ValkeyUrl::parse("redis://127.0.0.1:6380").unwrap();
        assert_eq!(
            (u.addr(), u.tls, u.db, u.username, u.password),
            ("127.0.0.1:6380".into(), false, 0, None, None)
        );
        let u = ValkeyUrl::parse("valkeys://app:p%40ss@cache.internal/2#insecure").unwrap();
        assert_eq!(u.addr(), "cache.internal:6379");
        assert!(u.tls && u.insecure);
        assert_eq!(
            (u.username.as_deref(), u.password.as_deref(), u.db),
            (Some("app"), Some("p@ss"), 2)
        );
        let u = ValkeyUrl::parse("redis://:secret@[::1]:7000").unwrap();
        assert_eq!(
            (u.addr(), u.username, u.password.as_deref()),
            ("[::1]:7000".into(), None, Some("secret"))
        );
        for (bad, why) in [
            ("http://h:1", "scheme http://"),
            ("redis://h:1/x", "database 'x'"),
            ("redis://h:1#insecure", "#insecure"),
            ("unix:///tmp/v.sock", "scheme unix://"),
            ("redis://0.0.0.0:6379", "wildcard"),
            ("127.0.0.1:6379", "not a URL"),
        ] {
            let e = ValkeyUrl::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::from_toml_with_env("", env(&[])).unwrap();
        assert_eq!(c.listen, "127.0.0.1:6380");
        assert_eq!(c.valkey.url, "redis://127.0.0.1:6379");
        assert_eq!(c.postgres.url, "postgres://postgres@127.0.0.1:5432/staff");
        assert_eq!(c.cache.default_ttl, 3600);
        assert_eq!(c.named_queries()[0].command, "EMP.GET");
    }

    #[test]
    fn the_invalidation_lease_is_bounded_and_overridable() {
        let c = Config::from_toml_with_env("", env(&[])).unwrap();
        assert_eq!(c.invalidation.lease_ms, 3000);
        let c = Config::from_toml_with_env("", env(&[("CACHEFRONT_INVALIDATION_LEASE_MS", "900")]))
            .unwrap();
        assert_eq!(c.invalidation.lease_ms, 900);
        for bad in ["0", "99", "600001"] {
            let e =
                Config::from_toml_with_env("", env(&[("CACHEFRONT_INVALIDATION_LEASE_MS", bad)]))
                    .unwrap_err()
                    .to_string();
            assert!(e.contains("invalidation.lease_ms"), "{bad}: {e}");
        }
    }

    #[test]
    fn env_overrides_are_typed_and_checked() {
        let c = Config::from_toml_with_env(
            "[valkey]\npool_size = 3\n",
            env(&[
                ("CACHEFRONT_VALKEY_POOL_SIZE", "5"),
                ("CACHEFRONT_LISTEN", "127.0.0.1:7000"),
            ]),
        )
        .unwrap();
        assert_eq!(c.valkey.pool_size, 5);
        assert_eq!(c.listen, "127.0.0.1:7000");
        let e = Config::from_toml_with_env("", env(&[("CACHEFRONT_VALKEY_POOL_SIZE", "many")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CACHEFRONT_VALKEY_POOL_SIZE") && e.contains("valkey.pool_size"),
            "{e}"
        );
        let e = Config::from_toml_with_env("", env(&[("CACHEFRONT_VALKEY_COLOUR", "red")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("CACHEFRONT_VALKEY_COLOUR"), "{e}");
    }

    #[test]
    fn replicas_from_file_and_environment() {
        let c = Config::from_toml_with_env("", env(&[])).unwrap();
        assert!(c.postgres.replicas.is_empty());
        assert_eq!(
            (c.postgres.replica_max_lag_ms, c.postgres.replica_poll_ms),
            (1000, 100)
        );
        let c = Config::from_toml_with_env(
            "[postgres]\nreplicas = [\"postgres://a@r1/staff\"]\nreplica_max_lag_ms = 250\n",
            env(&[]),
        )
        .unwrap();
        assert_eq!(c.postgres.replicas, ["postgres://a@r1/staff"]);
        assert_eq!(c.postgres.replica_max_lag_ms, 250);
        let c = Config::from_toml_with_env(
            "",
            env(&[
                (
                    "CACHEFRONT_POSTGRES_REPLICAS",
                    "postgres://a@r1/staff, postgres://a@r2:5433/staff",
                ),
                ("CACHEFRONT_POSTGRES_REPLICA_POLL_MS", "20"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.postgres.replicas,
            ["postgres://a@r1/staff", "postgres://a@r2:5433/staff"]
        );
        assert_eq!(c.postgres.replica_poll_ms, 20);
        let e = Config::from_toml_with_env(
            "[postgres]\nreplicas = [\"postgres://a@r1/staff\", \"postgres://a@r2:notaport/x\"]\n",
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("postgres.replicas[1]:"), "{e}");
        let e = Config::from_toml_with_env("[postgres]\nreplica_poll_ms = 0\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("postgres.replica_poll_ms"), "{e}");
        let e = Config::from_toml_with_env("[postgres]\nreplica = []\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("replica"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = Config::from_toml_with_env("[valkey]\nurll = \"x\"\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("urll"), "{e}");
        let e = Config::from_toml_with_env("listen = \"nowhere\"\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("listen:"), "{e}");
        let e = Config::from_toml_with_env("[cache]\ndefault_ttl = 0\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cache.default_ttl"), "{e}");
    }

    #[test]
    fn cluster_settings_are_checked() {
        let c = Config::from_toml_with_env(
            "",
            env(&[(
                "CACHEFRONT_VALKEY_CLUSTER",
                "127.0.0.1:7000,redis://127.0.0.1:7001",
            )]),
        )
        .unwrap();
        assert_eq!(c.valkey.cluster.len(), 2);
        // TLS to a cluster: the URL's scheme, repeated or not in the seeds.
        let c = Config::from_toml_with_env(
            "[valkey]\nurl = \"rediss://h:1\"\ncluster = [\"rediss://h:1\", \"h:2\"]\nread_from_replicas = true\n",
            env(&[]),
        )
        .unwrap();
        assert!(c.valkey.read_from_replicas);
        for (toml, key) in [
            ("[valkey]\ncluster = [\"nowhere\"]\n", "valkey.cluster"),
            ("[valkey]\ncluster = [\"h:0\"]\n", "valkey.cluster"),
            ("[valkey]\ncluster = [\"rediss://h:1\"]\n", "valkey.cluster"),
            (
                "[valkey]\ncluster = [\"redis://h:1\"]\nurl = \"rediss://h:1\"\n",
                "valkey.cluster",
            ),
            (
                "[valkey]\nread_from_replicas = true\n",
                "valkey.read_from_replicas",
            ),
            (
                "[valkey]\ncluster = [\"h:1\"]\n[cache]\nmeta_prefix = \"{cf}:\"\n",
                "cache.meta_prefix",
            ),
        ] {
            let e = Config::from_toml_with_env(toml, env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(key), "{toml}: {e}");
        }
    }

    #[test]
    fn named_queries_shape_is_validated() {
        // Their SQL and key are checked by `server::check_config` (see its tests).
        let shadow = r#"
[[query]]
command = "GET"
sql = "SELECT name FROM employees WHERE id = $1"
key = "x:{1}"
args = ["int"]
"#;
        let e = Config::from_toml_with_env(shadow, env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("namespaced"), "{e}");
    }

    #[test]
    fn shipped_config_toml_parses() {
        let text = include_str!("../config.toml");
        let c = Config::from_toml_with_env(text, env(&[])).unwrap();
        let names: Vec<_> = c
            .named_queries()
            .iter()
            .map(|q| q.command.clone())
            .collect();
        assert!(names.contains(&"EMP.GET".to_string()));
        assert!(c.named_queries().iter().any(|q| q.reply == ReplyKind::Hash));
    }

    #[test]
    fn verify_settings_are_checked_and_overridable() {
        let c = Config::from_toml_with_env("", env(&[])).unwrap();
        assert!(c.verify.active());
        assert_eq!((c.verify.per_second, c.verify.grace_ms), (2, 1000));
        let c = Config::from_toml_with_env(
            "[verify]\nper_second = 50\n",
            env(&[
                ("CACHEFRONT_VERIFY_GRACE_MS", "250"),
                ("CACHEFRONT_VERIFY_REGISTRY_ENTRIES", "64"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (
                c.verify.per_second,
                c.verify.grace_ms,
                c.verify.registry_entries
            ),
            (50, 250, 64)
        );
        let off =
            Config::from_toml_with_env("", env(&[("CACHEFRONT_VERIFY_PER_SECOND", "0")])).unwrap();
        assert!(!off.verify.active(), "per_second = 0 turns it off");
        let off = Config::from_toml_with_env("[verify]\nenabled = false\n", env(&[])).unwrap();
        assert!(!off.verify.active());
        for (toml, key) in [
            ("[verify]\nper_second = 5000\n", "verify.per_second"),
            ("[verify]\ngrace_ms = 0\n", "verify.grace_ms"),
            ("[verify]\ngrace_ms = 700000\n", "verify.grace_ms"),
            (
                "[verify]\nregistry_entries = 0\n",
                "verify.registry_entries",
            ),
            ("[verify]\nregistry_bytes = 10\n", "verify.registry_bytes"),
        ] {
            let e = Config::from_toml_with_env(toml, env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(key), "{toml}: {e}");
        }
        let e = Config::from_toml_with_env("[verify]\nper_second = -1\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("per_second"), "{e}");
        let e = Config::from_toml_with_env("", env(&[("CACHEFRONT_VERIFY_PER_SECOND", "fast")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("verify.per_second"), "{e}");
    }

    #[test]
    fn output_limits_read_like_valkey() {
        let l =
            OutputBufferLimits::try_from("pubsub 64mb 16mb 30 normal 1gb 0 0".to_string()).unwrap();
        assert_eq!(l.pubsub.hard, 64 << 20);
        assert_eq!(l.pubsub.soft, 16 << 20);
        assert_eq!(l.pubsub.soft_secs, 30);
        assert_eq!(l.normal.hard, 1 << 30);
        assert_eq!(l.replica, OutputBufferLimits::default().replica);
        assert_eq!(
            OutputBufferLimits::try_from("normal 1k 0 0".to_string())
                .unwrap()
                .normal
                .hard,
            1000
        );
        let round = String::from(l.clone());
        assert_eq!(OutputBufferLimits::try_from(round).unwrap(), l);
        for bad in [
            "normal 1x 0 0",
            "normal 1mb 0",
            "bogus 1 1 1",
            "normal -1 0 0",
        ] {
            assert!(
                OutputBufferLimits::try_from(bad.to_string()).is_err(),
                "{bad}"
            );
        }
        let e = Config::from_toml_with_env(
            "[limits]\nclient_output_buffer_limit = \"normal 1 2\"\n",
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("client_output_buffer_limit"), "{e}");
    }
}
