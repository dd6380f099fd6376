//! cachefront's own writes to Valkey: versioned fills and invalidations, each one Lua script so
//! the check and the write are atomic.
//!
//! Layout (prefix `cache.meta_prefix`, default `cachefront:`):
//! - `<p>v:<table>` — the table's version, bumped by every invalidation; never expires.
//! - `<p>d:<table>` — set of entry keys read from the table; expires no earlier than they do.
//!
//! A fill reads the versions of its tables *before* querying PostgreSQL and stores only if they
//! are unchanged; an invalidation bumps the versions *before* deleting. So a fill that read
//! old rows can never store them after the write's invalidation ran.

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use std::time::Duration;

use super::{Entry, Value};
use crate::config::ValkeyConfig;
use crate::error::Result;

const FILL_LUA: &str = r#"
local n = tonumber(ARGV[3])
for i = 1, n do
  local v = redis.call('GET', KEYS[1 + i])
  if (v or '') ~= ARGV[3 + i] then return 0 end
end
local ttl = tonumber(ARGV[2])
if ARGV[1] == 's' then
  redis.call('SET', KEYS[1], ARGV[4 + n], 'EX', ttl)
else
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], unpack(ARGV, 4 + n))
  redis.call('EXPIRE', KEYS[1], ttl)
end
for i = 1, n do
  local d = KEYS[1 + n + i]
  redis.call('SADD', d, KEYS[1])
  if redis.call('TTL', d) < ttl then redis.call('EXPIRE', d, ttl) end
end
return 1
"#;

const INVALIDATE_LUA: &str = r#"
local dropped = 0
for i = 1, #KEYS, 2 do
  redis.call('INCR', KEYS[i])
  local members = redis.call('SMEMBERS', KEYS[i + 1])
  for j = 1, #members, 500 do
    dropped = dropped + redis.call('UNLINK', unpack(members, j, math.min(j + 499, #members)))
  end
  redis.call('DEL', KEYS[i + 1])
end
return dropped
"#;

/// Valkey as cachefront itself uses it (not the pass-through path).
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    prefix: String,
    fill: Script,
    invalidate: Script,
}

impl Store {
    /// Connects lazily: cachefront starts even if Valkey is down, and the manager reconnects.
    pub fn new(cfg: &ValkeyConfig, meta_prefix: &str) -> Result<Store> {
        let client = redis::Client::open(cfg.url.as_str())?;
        let mcfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)))
            .set_response_timeout(Some(Duration::from_millis(cfg.command_timeout_ms)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(cfg.connect_timeout_ms));
        let conn = ConnectionManager::new_lazy_with_config(client, mcfg)?;
        Ok(Store {
            conn,
            prefix: meta_prefix.to_string(),
            fill: Script::new(FILL_LUA),
            invalidate: Script::new(INVALIDATE_LUA),
        })
    }

    pub fn version_key(&self, table: &str) -> String {
        format!("{}v:{table}", self.prefix)
    }

    pub fn deps_key(&self, table: &str) -> String {
        format!("{}d:{table}", self.prefix)
    }

    /// Current versions of `tables` ("" for a table never invalidated).
    pub async fn versions(&self, tables: &[String]) -> Result<Vec<String>> {
        if tables.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = tables.iter().map(|t| self.version_key(t)).collect();
        let mut conn = self.conn.clone();
        let vals: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        Ok(vals.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Stores `value` under `entry` if its tables still have `versions`. `Ok(false)` means a
    /// write raced this fill and the value was not stored.
    pub async fn store(&self, entry: &Entry, value: &Value, versions: &[String]) -> Result<bool> {
        let mut inv = self.fill.key(&entry.key);
        for t in &entry.tables {
            inv.key(self.version_key(t));
        }
        for t in &entry.tables {
            inv.key(self.deps_key(t));
        }
        let kind = match value {
            Value::String(_) => "s",
            Value::Hash(_) => "h",
            Value::Absent => return Ok(false),
        };
        inv.arg(kind).arg(entry.ttl).arg(entry.tables.len());
        for v in versions {
            inv.arg(v);
        }
        match value {
            Value::String(b) => {
                inv.arg(b.as_ref());
            }
            Value::Hash(fields) => {
                if fields.is_empty() {
                    return Ok(false);
                }
                for (f, v) in fields {
                    inv.arg(f).arg(v.as_ref());
                }
            }
            Value::Absent => {}
        }
        let mut conn = self.conn.clone();
        let stored: i64 = inv.invoke_async(&mut conn).await?;
        Ok(stored == 1)
    }

    /// Bumps the versions of `tables` and drops every entry that depends on them; returns how
    /// many entries existed and were dropped.
    pub async fn invalidate(&self, tables: &[String]) -> Result<u64> {
        if tables.is_empty() {
            return Ok(0);
        }
        let mut inv = self.invalidate.prepare_invoke();
        for t in tables {
            inv.key(self.version_key(t)).key(self.deps_key(t));
        }
        let mut conn = self.conn.clone();
        let n: i64 = inv.invoke_async(&mut conn).await?;
        Ok(n.max(0) as u64)
    }

    /// A plain GET, for callers outside the pass-through path.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let mut conn = self.conn.clone();
        let v: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
        Ok(v.map(Bytes::from))
    }
}
