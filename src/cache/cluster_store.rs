//! The fill protocol on a Valkey Cluster, where one Lua script can only touch keys of one slot.
//!
//! The entry keys are fixed by the SPEC (`employee:1`, a SHA-256) and land in any slot, so the
//! single-node scheme — an entry checked against table versions kept under their own keys —
//! cannot run atomically. Instead each entry has a *generation* key in its own slot, and the
//! registries say which entries to bump:
//! - `<p>{<tag>}g:<key>` — the entry's generation, bumped by every invalidation that drops it;
//!   `<tag>` is a short string hashing to the entry's slot, so the pair shares a slot. Kept a day.
//! - `<p>{<tag>}n:<key>` — the negative-cache marker, in the entry's slot too.
//! - `<p>{<tag>}f:<key>` — the entry's fill lease (`cache::fleet`), in its slot too, so the
//!   fill's first script and its store script can take and give it up.
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
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, OnceLock};

use super::resp::{self, Cmd, Invocation, Script, StaticScript};
use super::store::{
    existing_value, prefill_invocation, prefill_script, push_value_args, release_parts, value_kind,
    FillLease, LeaseState, Prefill, RELEASE_FN,
};
use super::{Deps, Entry, Value};
use crate::error::Result;
use crate::upstream::cluster::{slot_of, SLOTS};
use crate::upstream::Upstream;

/// How long a generation outlives its last bump: far longer than any fill takes.
const GENERATION_TTL: u64 = 86_400;
/// Invalidation scripts in flight at once.
const PARALLEL: usize = 32;

/// KEYS: entry, generation, fill lease. ARGV: kind, ttl, generation read before the query,
/// lease token ('' for none), channel, announcement, value… Stored or not, gives the fill lease
/// up (`store::RELEASE_FN`).
const FILL_LUA: &str = r#"
local function store()
  if (redis.call('GET', KEYS[2]) or '') ~= ARGV[3] then return 0 end
  local ttl = tonumber(ARGV[2])
  if ARGV[1] == 's' then
    redis.call('SET', KEYS[1], ARGV[7], 'EX', ttl)
  else
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], unpack(ARGV, 7))
    redis.call('EXPIRE', KEYS[1], ttl)
  end
  return 1
end
local stored = store()
release(KEYS[3], ARGV[4], ARGV[5], ARGV[6], 0)
return stored
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

static FILL: StaticScript = LazyLock::new(|| Script::new(&format!("{RELEASE_FN}{FILL_LUA}")));
static REGISTER: StaticScript = LazyLock::new(|| Script::new(REGISTER_LUA));
static TAKE: StaticScript = LazyLock::new(|| Script::new(TAKE_LUA));
static DROP: StaticScript = LazyLock::new(|| Script::new(DROP_LUA));
static DONE: StaticScript = LazyLock::new(|| Script::new(DONE_LUA));

/// The cluster store: every request goes through the upstream's cluster routing, by the slot
/// of its (first) key.
#[derive(Clone)]
pub struct ClusterStore {
    upstream: Arc<Upstream>,
    prefix: String,
    /// Whether the nodes are known to have the store script (see `resp::Invocation::queue`;
    /// a node that lacks it says so once, and the flag follows the last answer).
    pub(super) store_loaded: Arc<std::sync::atomic::AtomicBool>,
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
    pub fn new(upstream: Arc<Upstream>, meta_prefix: &str) -> ClusterStore {
        ClusterStore {
            upstream,
            prefix: meta_prefix.to_string(),
            store_loaded: Arc::default(),
        }
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
    pub(super) fn generation_key(&self, key: &str) -> String {
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
        let registrations = self.register(entry);
        let read = self.current(entry, hash, negative_key);
        // Both must be done before the query starts; their order does not matter.
        let (_, prefill) = futures::try_join!(registrations, read)?;
        Ok(prefill)
    }

    /// Adds the entry to each of its registry sets (one request per set, each in its own
    /// slot), all at once.
    fn register(&self, entry: &Entry) -> impl std::future::Future<Output = Result<Vec<i64>>> + '_ {
        let up = &*self.upstream;
        let calls = self
            .registries(&entry.deps)
            .into_iter()
            .map(move |registry| {
                let mut inv = REGISTER.prepare();
                inv.key(&registry).arg(&entry.key).arg(&entry.ttl.max(1));
                async move { resp::int(inv.run(up).await?) }
            });
        futures::future::try_join_all(calls)
    }

    /// [`ClusterStore::prefill`], taking the entry's fill lease if the entry is absent (see
    /// `store::PREFILL_LUA`; every key it touches is in the entry's slot).
    pub async fn prefill_leased(
        &self,
        entry: &Entry,
        hash: bool,
        negative_key: Option<&str>,
        lease: (&FillLease, &str),
    ) -> Result<Prefill> {
        let registrations = self.register(entry);
        let generation = self.generation_key(&entry.key);
        let inv = prefill_invocation(entry, hash, negative_key, lease, |inv| {
            inv.key(&generation);
        });
        let read = prefill_script(&self.upstream, inv, hash, negative_key.is_some());
        let (_, prefill) = futures::try_join!(registrations, read)?;
        Ok(prefill)
    }

    /// The fill lease of `key` (see `cache::fleet`), in its slot.
    pub fn fill_lease_key(&self, key: &str) -> String {
        self.beside("f", key)
    }

    /// The entry's generation, the entry and the negative marker, in that order in one round
    /// trip (one slot); reads only.
    pub async fn current(
        &self,
        entry: &Entry,
        hash: bool,
        negative_key: Option<&str>,
    ) -> Result<Prefill> {
        let cmds = [
            Cmd::new("GET").arg(&self.generation_key(&entry.key)),
            Cmd::new(if hash { "HGETALL" } else { "GET" }).arg(&entry.key),
            // The marker shares the entry's slot; without one, EXISTS of the entry keeps the
            // batch in that slot.
            Cmd::new("EXISTS").arg(negative_key.unwrap_or(&entry.key)),
        ];
        let replies = resp::batch(&self.upstream, &entry.key, cmds).await?;
        let [generation, existing, negative]: [_; 3] = replies
            .try_into()
            .map_err(|_| crate::error::Error::upstream("a reply is missing"))?;
        Ok(Prefill {
            versions: vec![resp::opt_string(generation)?.unwrap_or_default()],
            existing: existing_value(existing, hash)?,
            negative: negative_key.is_some() && resp::int(negative)? != 0,
            lease: LeaseState::NotAsked,
        })
    }

    /// The upstream its requests go through.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// `cache.meta_prefix`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The script that stores `value` if the entry's generation is still `versions[0]`;
    /// `None` for a value with nothing to store. `release`: the fill lease to give up, the
    /// channel to announce it on and the announcement.
    pub(super) fn store_script(
        &self,
        entry: &Entry,
        value: &Value,
        versions: &[String],
        release: Option<(&FillLease, &str, &str)>,
    ) -> Option<Invocation> {
        let kind = value_kind(value)?;
        let generation = versions.first().map(String::as_str).unwrap_or_default();
        let mut inv = FILL.prepare();
        inv.key(&entry.key).key(&self.generation_key(&entry.key));
        let (lease_key, [token, channel, announced]) = release_parts(release);
        if let Some(k) = lease_key {
            inv.key(k);
        }
        inv.arg(kind)
            .arg(&entry.ttl)
            .arg(generation)
            .arg(token)
            .arg(channel)
            .arg(announced);
        push_value_args(&mut inv, value);
        Some(inv)
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
        let mut take = TAKE.prepare();
        take.key(registry).key(&pending);
        let members = resp::strings(take.run(&self.upstream).await?)?;
        if members.is_empty() {
            return Ok(0);
        }
        let n = self.drop_entries(&members).await?;
        for chunk in members.chunks(5000) {
            let mut done = DONE.prepare();
            done.key(&pending);
            for m in chunk {
                done.arg(m);
            }
            resp::int(done.run(&self.upstream).await?)?;
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
        let up = &*self.upstream;
        let mut calls = Vec::new();
        for group in by_slot.into_values() {
            let mut inv = DROP.prepare();
            for k in group {
                inv.key(&self.generation_key(k))
                    .key(k)
                    .key(&self.negative_key(k));
            }
            inv.arg(&GENERATION_TTL);
            calls.push(async move { resp::int(inv.run(up).await?) });
        }
        let counts: Vec<i64> = stream::iter(calls)
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        Ok(counts.into_iter().map(|n| n.max(0) as u64).sum())
    }

    /// The registry of every table ever cached (in a slot of its own).
    fn tables_key(&self) -> String {
        format!("{}tables:all", self.prefix)
    }

    pub async fn register_tables(&self, tables: &[String]) -> Result<()> {
        let key = self.tables_key();
        let cmd = Cmd::new("SADD").arg(&key).args(tables);
        resp::int(resp::call(&self.upstream, &key, cmd).await?)?;
        Ok(())
    }

    pub async fn registered_tables(&self) -> Result<Vec<String>> {
        let key = self.tables_key();
        let cmd = Cmd::new("SMEMBERS").arg(&key);
        resp::strings(resp::call(&self.upstream, &key, cmd).await?)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        resp::opt_bytes(resp::call(&self.upstream, key, Cmd::new("GET").arg(key)).await?)
    }

    /// The generation a fill of `deps`' entry would check (for tests: `versions` of the
    /// single-node store).
    pub async fn generation(&self, key: &str) -> Result<String> {
        let gen = self.generation_key(key);
        let reply = resp::call(&self.upstream, &gen, Cmd::new("GET").arg(&gen)).await?;
        Ok(resp::opt_string(reply)?.unwrap_or_default())
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

    #[tokio::test]
    async fn bookkeeping_keys_share_the_entry_slot() {
        let cfg = crate::config::ValkeyConfig {
            cluster: vec!["127.0.0.1:7000".into()],
            ..crate::config::ValkeyConfig::default()
        };
        let up = Upstream::new(&cfg, Default::default(), 0)
            .expect("a cluster upstream (connects lazily)");
        let s = ClusterStore::new(Arc::new(up), "cachefront:");
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
