//! The fill protocol on a Valkey Cluster, where one Lua script can only touch keys of one slot.
//!
//! The entry keys are fixed by the SPEC (`employee:1`, a SHA-256) and land in any slot, so the
//! single-node scheme — an entry checked against table versions kept under their own keys —
//! cannot run atomically. Instead each entry has a *generation* key in its own slot, and the
//! registries say which entries to bump:
//! - `<p>{<tag>}g:<key>` — the entry's generation, bumped by every invalidation that drops it;
//!   `<tag>` is a short string hashing to the entry's slot, so the pair shares a slot. Kept a day.
//! - `<p>{<tag>}n:<key>` — the negative-cache marker, in the entry's slot too.
//! - `<p>{d:<t>}` — entries depending on the whole table `<t>`; `<p>{k:<t>}` — row-keyed
//!   entries on `<t>`; each with a `:pending` twin in its slot holding members being
//!   invalidated, so an invalidation that fails halfway is finished by the next one.
//! - `<p>tables:all` — every table any entry ever depended on.
//!
//! A fill registers its key in the registries *before* it reads the generation and queries;
//! an invalidation takes the registry's members atomically, then bumps each generation before
//! deleting the entry; the store succeeds only if the generation is unchanged. A fill that
//! registered before the invalidation took the members is bumped (its store fails, or its
//! stored value is deleted); one that registered after queries after the write committed.

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use redis::cluster_async::ClusterConnection;
use redis::Script;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::store::{existing_value, push_value_args, value_kind, Prefill};
use super::{Deps, Entry, Value};
use crate::config::ValkeyConfig;
use crate::error::Result;
use crate::upstream::cluster::{slot_of, SLOTS};

/// How long a generation outlives its last bump: far longer than any fill takes.
const GENERATION_TTL: u64 = 86_400;
/// Invalidation scripts in flight at once.
const PARALLEL: usize = 32;

/// KEYS: entry, generation. ARGV: kind, ttl, generation read before the query, value…
const FILL_LUA: &str = r#"
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[3] then return 0 end
local ttl = tonumber(ARGV[2])
if ARGV[1] == 's' then
  redis.call('SET', KEYS[1], ARGV[4], 'EX', ttl)
else
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], unpack(ARGV, 4))
  redis.call('EXPIRE', KEYS[1], ttl)
end
return 1
"#;

/// KEYS: a registry. ARGV: entry key, its TTL. The registry outlives its members.
const REGISTER_LUA: &str = r#"
redis.call('SADD', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[2])
if redis.call('TTL', KEYS[1]) < ttl then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"#;

/// KEYS: registry, its pending twin. Moves the members to pending and returns them all.
const TAKE_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[1])
  redis.call('DEL', KEYS[1])
  redis.call('EXPIRE', KEYS[2], 86400)
end
return redis.call('SMEMBERS', KEYS[2])
"#;

/// KEYS: triples of (generation, entry, negative marker) in one slot. ARGV: generation TTL.
const DROP_LUA: &str = r#"
local dropped = 0
for i = 1, #KEYS, 3 do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], ARGV[1])
  dropped = dropped + redis.call('UNLINK', KEYS[i + 1])
  redis.call('UNLINK', KEYS[i + 2])
end
return dropped
"#;

/// KEYS: pending set. ARGV: members to remove (they were dropped).
const DONE_LUA: &str = r#"
for j = 1, #ARGV, 500 do
  redis.call('SREM', KEYS[1], unpack(ARGV, j, math.min(j + 499, #ARGV)))
end
return 1
"#;

#[derive(Clone)]
pub struct ClusterStore {
    client: redis::cluster::ClusterClient,
    conn: Arc<tokio::sync::OnceCell<ClusterConnection>>,
    prefix: String,
    fill: Script,
    register: Script,
    take: Script,
    drop: Script,
    done: Script,
}

/// For each slot, a short string that hashes to it: `{tag}` puts a key in that slot.
fn slot_tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut tags = vec![String::new(); SLOTS];
        let mut missing = SLOTS;
        let mut n: u64 = 0;
        while missing > 0 {
            let mut word = Vec::new();
            let mut x = n;
            loop {
                word.push(ALPHABET[(x % ALPHABET.len() as u64) as usize]);
                x /= ALPHABET.len() as u64;
                if x == 0 {
                    break;
                }
            }
            let slot = slot_of(&word) as usize;
            if tags[slot].is_empty() {
                tags[slot] = String::from_utf8_lossy(&word).into_owned();
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}

impl ClusterStore {
    /// Connects lazily, on first use, so cachefront starts while the cluster is down.
    pub fn new(cfg: &ValkeyConfig, meta_prefix: &str) -> Result<ClusterStore> {
        let login = redis::Client::open(cfg.url.as_str())?;
        let settings = login.get_connection_info().redis_settings().clone();
        let nodes: Vec<String> = cfg
            .cluster
            .iter()
            .map(|n| {
                let n = n.trim();
                if n.contains("://") {
                    n.to_string()
                } else {
                    format!("redis://{n}")
                }
            })
            .collect();
        let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .response_timeout(Duration::from_millis(cfg.command_timeout_ms))
            .retries(2);
        if let Some(p) = settings.password() {
            builder = builder.password(p);
        }
        if let Some(u) = settings.username() {
            builder = builder.username(u);
        }
        Ok(ClusterStore {
            client: builder.build()?,
            conn: Arc::new(tokio::sync::OnceCell::new()),
            prefix: meta_prefix.to_string(),
            fill: Script::new(FILL_LUA),
            register: Script::new(REGISTER_LUA),
            take: Script::new(TAKE_LUA),
            drop: Script::new(DROP_LUA),
            done: Script::new(DONE_LUA),
        })
    }

    async fn conn(&self) -> Result<ClusterConnection> {
        let c = self
            .conn
            .get_or_try_init(|| async { self.client.get_async_connection().await })
            .await?;
        Ok(c.clone())
    }

    /// `<p>{<tag>}<kind>:<key>`: a key of cachefront's in the same slot as `key`.
    fn beside(&self, kind: &str, key: &str) -> String {
        let tag = &slot_tags()[slot_of(key.as_bytes()) as usize];
        format!("{}{{{tag}}}{kind}:{key}", self.prefix)
    }

    pub fn negative_key(&self, key: &str) -> String {
        self.beside("n", key)
    }

    /// The generation guarding `key`: its own, or for a negative marker its entry's (a marker
    /// lives and dies with its entry).
    fn generation_key(&self, key: &str) -> String {
        self.beside("g", self.owner(key))
    }

    /// The entry a negative marker stands for; any other key is its own owner.
    fn owner<'a>(&self, key: &'a str) -> &'a str {
        let entry = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('{'))
            .and_then(|r| r.split_once('}'))
            .and_then(|(tag, r)| Some((tag, r.strip_prefix("n:")?)))
            .filter(|(tag, entry)| slot_tags()[slot_of(entry.as_bytes()) as usize] == *tag);
        entry.map_or(key, |(_, e)| e)
    }

    fn registry(&self, kind: &str, table: &str) -> String {
        format!("{}{{{kind}:{table}}}", self.prefix)
    }

    fn registries(&self, deps: &Deps) -> Vec<String> {
        let mut keys: Vec<String> = deps.tables.iter().map(|t| self.registry("d", t)).collect();
        if let Some(r) = &deps.row {
            keys.push(self.registry("k", &r.table));
        }
        keys
    }

    /// Registers the entry, then reads its generation, the entry and the negative marker
    /// (one slot, one round trip) — see the module doc for why registration comes first.
    pub async fn prefill(
        &self,
        entry: &Entry,
        hash: bool,
        negative_key: Option<&str>,
    ) -> Result<Prefill> {
        let conn = self.conn().await?;
        let mut calls = Vec::new();
        for registry in self.registries(&entry.deps) {
            let mut conn = conn.clone();
            let mut inv = self.register.key(registry);
            inv.arg(&entry.key).arg(entry.ttl.max(1));
            calls.push(async move { inv.invoke_async::<i64>(&mut conn).await });
        }
        let registrations = futures::future::try_join_all(calls);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.generation_key(&entry.key));
        if hash {
            pipe.cmd("HGETALL").arg(&entry.key);
        } else {
            pipe.cmd("GET").arg(&entry.key);
        }
        // The marker shares the entry's slot; without one, EXISTS of the entry keeps the
        // pipeline in that slot.
        pipe.cmd("EXISTS").arg(negative_key.unwrap_or(&entry.key));
        let mut read_conn = conn.clone();
        let read = pipe.query_async::<(Option<String>, redis::Value, bool)>(&mut read_conn);
        // Both must be done before the query starts; their order does not matter.
        let (_, (generation, existing, negative)) = futures::try_join!(registrations, read)?;
        Ok(Prefill {
            versions: vec![generation.unwrap_or_default()],
            existing: existing_value(existing, hash)?,
            negative: negative_key.is_some() && negative,
        })
    }

    /// Stores `value` if the entry's generation is still `versions[0]`.
    pub async fn store(&self, entry: &Entry, value: &Value, versions: &[String]) -> Result<bool> {
        let Some(kind) = value_kind(value) else {
            return Ok(false);
        };
        let generation = versions.first().map(String::as_str).unwrap_or_default();
        let mut inv = self.fill.key(&entry.key);
        inv.key(self.generation_key(&entry.key))
            .arg(kind)
            .arg(entry.ttl)
            .arg(generation);
        push_value_args(&mut inv, value);
        let mut conn = self.conn().await?;
        let stored: i64 = inv.invoke_async(&mut conn).await?;
        Ok(stored == 1)
    }

    /// Drops every entry depending on `tables` (row-keyed ones included).
    pub async fn invalidate_tables(&self, tables: &[String]) -> Result<u64> {
        let mut total = 0;
        for t in tables {
            total += self.drop_registry(&self.registry("d", t)).await?;
            total += self.drop_registry(&self.registry("k", t)).await?;
        }
        Ok(total)
    }

    /// Rows of `table` changed: drops its whole-table dependents and the row-keyed
    /// `entry_keys` (their negative markers included by the caller).
    pub async fn invalidate_rows(&self, table: &str, entry_keys: &[String]) -> Result<u64> {
        let n = self.drop_registry(&self.registry("d", table)).await?;
        Ok(n + self.drop_entries(entry_keys).await?)
    }

    /// Takes a registry's members (into its pending twin), drops them, then clears them
    /// from pending.
    async fn drop_registry(&self, registry: &str) -> Result<u64> {
        let pending = format!("{registry}:pending");
        let mut conn = self.conn().await?;
        let members: Vec<String> = self
            .take
            .key(registry)
            .key(&pending)
            .invoke_async(&mut conn)
            .await?;
        if members.is_empty() {
            return Ok(0);
        }
        let n = self.drop_entries(&members).await?;
        for chunk in members.chunks(5000) {
            let _: i64 = self
                .done
                .key(&pending)
                .arg(chunk)
                .invoke_async(&mut conn)
                .await?;
        }
        Ok(n)
    }

    /// Bumps each entry's generation, then deletes it and its negative marker — one script
    /// per slot.
    async fn drop_entries(&self, keys: &[String]) -> Result<u64> {
        let mut by_slot: HashMap<u16, Vec<&str>> = HashMap::new();
        for k in keys {
            let entry = self.owner(k);
            let group = by_slot.entry(slot_of(entry.as_bytes())).or_default();
            if !group.contains(&entry) {
                group.push(entry);
            }
        }
        let conn = self.conn().await?;
        let mut calls = Vec::new();
        for group in by_slot.into_values() {
            let mut conn = conn.clone();
            let mut inv = self.drop.prepare_invoke();
            for k in group {
                inv.key(self.generation_key(k))
                    .key(k)
                    .key(self.negative_key(k));
            }
            inv.arg(GENERATION_TTL);
            calls.push(async move { inv.invoke_async::<i64>(&mut conn).await });
        }
        let counts: Vec<i64> = stream::iter(calls)
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        Ok(counts.into_iter().map(|n| n.max(0) as u64).sum())
    }

    pub async fn register_tables(&self, tables: &[String]) -> Result<()> {
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("SADD")
            .arg(format!("{}tables:all", self.prefix))
            .arg(tables)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn registered_tables(&self) -> Result<Vec<String>> {
        let mut conn = self.conn().await?;
        Ok(redis::cmd("SMEMBERS")
            .arg(format!("{}tables:all", self.prefix))
            .query_async(&mut conn)
            .await?)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let mut conn = self.conn().await?;
        let v: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
        Ok(v.map(Bytes::from))
    }

    /// The generation a fill of `deps`' entry would check (for tests: `versions` of the
    /// single-node store).
    pub async fn generation(&self, key: &str) -> Result<String> {
        let mut conn = self.conn().await?;
        let v: Option<String> = redis::cmd("GET")
            .arg(self.generation_key(key))
            .query_async(&mut conn)
            .await?;
        Ok(v.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_a_tag() {
        let tags = slot_tags();
        assert_eq!(tags.len(), SLOTS);
        for (slot, tag) in tags.iter().enumerate() {
            assert!(!tag.is_empty() && tag.len() <= 4, "slot {slot}: {tag:?}");
            assert_eq!(slot_of(tag.as_bytes()) as usize, slot);
        }
    }

    #[test]
    fn bookkeeping_keys_share_the_entry_slot() {
        let cfg = ValkeyConfig {
            cluster: vec!["127.0.0.1:7000".into()],
            ..ValkeyConfig::default()
        };
        let s = ClusterStore::new(&cfg, "cachefront:").unwrap();
        for key in [
            "employee:1",
            "c6260e61202726451f2251e2051e50764a29e212db01aa5c7119b413d54e2b40",
            "a{b}c",
            "{}x",
        ] {
            let slot = slot_of(key.as_bytes());
            assert_eq!(slot_of(s.generation_key(key).as_bytes()), slot, "{key}");
            assert_eq!(slot_of(s.negative_key(key).as_bytes()), slot, "{key}");
            assert_eq!(s.owner(&s.negative_key(key)), key);
            assert_eq!(s.owner(key), key);
            assert_eq!(
                s.generation_key(&s.negative_key(key)),
                s.generation_key(key)
            );
        }
        let r = s.registry("d", "public.employees");
        assert_eq!(
            slot_of(r.as_bytes()),
            slot_of(format!("{r}:pending").as_bytes())
        );
    }
}
