//! cachefront's own writes to Valkey: versioned fills and invalidations, each one Lua script so
//! the check and the write are atomic.
//!
//! Keys (prefix `cache.meta_prefix`, default `cachefront:`), `<t>` a table, `<c>` a column:
//! - `<p>v:<t>` — bumped by every change to the table; checked by entries that depend on the
//!   whole table (joins, aggregates, SQL.CACHED).
//! - `<p>e:<t>` — the table's epoch, bumped only by table-wide events (TRUNCATE, a statement
//!   touching too many rows, SQL.INVALIDATE, a lost notification channel); checked by
//!   row-keyed entries, which plain row changes to *other* rows must not disturb.
//! - `<p>r:<t>:<c>:<value>` — one row's version, bumped when that row changes; expires after a day.
//! - `<p>d:<t>` — set of entries depending on the whole table; `<p>k:<t>` — set of row-keyed
//!   entries on the table (dropped by table-wide events). Both expire no earlier than members.
//! - `<p>tables` — every table any entry ever depended on (flushed when notifications may
//!   have been lost).
//! - `<p>f:<key>` — the entry's fill lease while one instance fills it for all (see
//!   `cache::fleet`); fills announce their end on the channel `<p>fills`.
//!
//! A fill reads its versions *before* querying PostgreSQL and stores only if they are unchanged;
//! an invalidation bumps versions *before* deleting. So a fill that read old rows can never
//! store them after the invalidation of the write that changed them.

use bytes::Bytes;
use futures::future::{self, BoxFuture};
use futures::FutureExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use super::cluster_store::ClusterStore;
use super::fleet::Fleet;
use super::resp::{self, Cmd, Invocation, Joined, Script, StaticScript};
use super::{Deps, Entry, Value, Version};
use crate::error::Result;
use crate::protocol::Proto;
use crate::upstream::Upstream;
use redis_protocol::resp2::types::BytesFrame;
use smallvec::SmallVec;

/// Checks the versions, registers the entry with its tables, then stores it — registering
/// first, so no entry can exist that its tables' invalidation cannot find (a refused write
/// stops the script before the entry is stored). Meta keys of the wrong type (a client wrote
/// them) make the fill store nothing, not fail halfway: each is read or added to with
/// `pcall`, whose error (a table) stops the script — a registration already made for an
/// entry never stored costs nothing — and the next invalidation repairs them. No `TYPE`
/// check first: Valkey runs each call of a script as a command of its own, and on an idle
/// server each costs about as much as a whole `GET`; this script is on every miss's path.
/// Then, stored or not, gives up the fill lease (see [`RELEASE_FN`]).
/// KEYS: entry, versions, registry sets, fill lease. ARGV: kind, ttl, #versions,
/// #registries, lease token ('' for none), channel, announcement, versions, value…
const FILL_LUA: &str = r#"
local nv = tonumber(ARGV[3])
local nr = tonumber(ARGV[4])
local function store()
  for i = 1, nv do
    local v = redis.pcall('GET', KEYS[1 + i])
    if type(v) == 'table' then return 0 end
    if (v or '') ~= ARGV[7 + i] then return 0 end
  end
  local ttl = tonumber(ARGV[2])
  for i = 1, nr do
    local d = KEYS[1 + nv + i]
    if type(redis.pcall('SADD', d, KEYS[1])) == 'table' then return 0 end
    if redis.call('TTL', d) < ttl then redis.call('EXPIRE', d, ttl) end
  end
  local first = 8 + nv
  if ARGV[1] == 's' then
    redis.call('SET', KEYS[1], ARGV[first], 'EX', ttl)
  else
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], unpack(ARGV, first))
    redis.call('EXPIRE', KEYS[1], ttl)
  end
  return 1
end
local stored = store()
release(KEYS[2 + nv + nr], ARGV[5], ARGV[6], ARGV[7], 0)
return stored
"#;

/// Gives up a fill lease (`cache::fleet`) if `token` still holds it, and — only if a waiter
/// marked the lease (`<token>+w`, see [`PREFILL_LUA`]) — tells the instances waiting for the
/// entry (`PUBLISH channel announcement`) to look again: it landed, or they may take the
/// lease. An unmarked lease has nobody waiting on it, so an uncontended fill publishes
/// nothing: no message for Valkey to send to every subscribed instance (on a cluster, to
/// every node) and no instance woken to read it, per miss. The mark is set and read by
/// scripts, which Valkey runs one at a time, so a waiter either marks the lease before this
/// runs (and is told) or finds the lease gone when it looks (and needs no telling). A lease
/// a successor took over, marked by its own waiters, is announced too: they may find this
/// fill's entry. A fill that found no row (`no_row_ms` > 0) leaves `norow:<token>` in the
/// lease for that long instead: a waiter that saw this token holding the lease takes that as
/// its answer too (`PREFILL_LUA`). The answer lives in a meta key, which clients cannot
/// write; the message only says "look", so a client publishing on the channel can cost a
/// look, never an answer. A lease of the wrong type is never ours: left alone. No token: no
/// lease was taken. A refused `PUBLISH` (a Valkey user without that channel) fails nothing:
/// waiters poll.
pub(super) const RELEASE_FN: &str = r#"
local function release(lease, token, channel, entry, no_row_ms)
  if token == '' then return 0 end
  no_row_ms = tonumber(no_row_ms) or 0
  local held = redis.pcall('GET', lease)
  if type(held) ~= 'string' then held = '' end
  local mine = held == token or held == token .. '+w'
  if mine then
    if no_row_ms > 0 then
      redis.call('SET', lease, 'norow:' .. token, 'PX', no_row_ms)
    else
      redis.call('DEL', lease)
    end
  end
  if string.sub(held, -2) == '+w' then redis.pcall('PUBLISH', channel, entry) end
  if mine then return 1 end
  return 0
end
"#;

/// KEYS: the fill lease. ARGV: token, channel, announcement, ms to keep a no-row answer (0:
/// none). Returns 1 if it was held and given up.
const FILL_RELEASE_LUA: &str = r#"
return release(KEYS[1], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]))
"#;

/// What a fill reads before querying, and its lease: the versions, the entry, the negative
/// marker — and only if neither entry nor marker exists, the fill lease (`SET NX PX`),
/// atomically, so an instance never takes the lease of a fill that has already landed. A
/// lease without an expiry (not one of ours: written by hand) is taken over.
/// A lease holding `norow:<t>` is a finished fill's no-row answer (see [`RELEASE_FN`]): the
/// answer of a fill that waited for holder `t` (ARGV[5]); anyone else takes the lease over.
/// A fill finding the lease held marks it awaited (`<token>+w`, same expiry), so its holder
/// announces the landing; the holder's token it reports is without the mark.
///
/// Sent as a tracked lookup (`CLIENT CACHING yes`, see `Cache::early_lookup`), every key a
/// read-only command in it reads would be tracked for the caller, and each later write to it
/// would cost an invalidation message — the lease taken here, the fill's own store of the
/// absent entry, every version bump — which Valkey writes before the script's own reply. So
/// only an entry that exists is read with `GET` (kept in the L1, it must be tracked); the
/// rest is read with write commands, which tracking never records: `GETEX` without options
/// (a plain read) and `SET … NX GET` (takes the lease and says who held it). Only a lease
/// held by another fill is read with `PTTL`, a tracked read, on that contended path alone.
/// KEYS: entry, negative marker (or the entry again), fill lease, versions…
/// ARGV: 'h' (hash) or 's', '1' if KEYS[2] is a marker, token, lease ms, the holder waited
/// for ('' for none).
/// Returns {versions, entry, marker exists, lease state, lease ms left, holder's token};
/// lease state: 1 taken, 2 held by another fill, 3 that holder found no row.
pub(super) const PREFILL_LUA: &str = r#"
local function peek(key)
  local v = redis.pcall('GETEX', key)
  if type(v) == 'string' then return v end
  return false
end
local versions = {}
for i = 4, #KEYS do versions[i - 3] = peek(KEYS[i]) end
local existing
local found
if ARGV[1] == 'h' then
  existing = redis.call('HGETALL', KEYS[1])
  found = #existing > 0
else
  existing = redis.call('GETEX', KEYS[1])
  found = existing ~= false
  if found then redis.call('GET', KEYS[1]) end
end
local negative = 0
if ARGV[2] == '1' and redis.pcall('GETEX', KEYS[2]) ~= false then negative = 1 end
local state = 0
local left = 0
local holder = ''
if not found and negative == 0 then
  local current = redis.pcall('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[4], 'GET')
  local no_row = type(current) == 'string' and string.sub(current, 1, 6) == 'norow:'
  if current == false then
    state = 1
  elseif no_row and ARGV[5] ~= '' and current == 'norow:' .. ARGV[5] then
    state = 3
  elseif no_row then
    redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
    state = 1
  else
    left = redis.call('PTTL', KEYS[3])
    if left < 0 then
      redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
      state = 1
      left = 0
    else
      state = 2
      if type(current) == 'string' then
        holder = current
        if string.sub(current, -2) == '+w' then
          holder = string.sub(current, 1, -3)
        else
          redis.call('SET', KEYS[3], current .. '+w', 'KEEPTTL')
        end
      end
    end
  end
end
return {versions, existing, negative, state, left, holder}
"#;

/// Shared by both invalidation scripts: unlink a registry set's members, then the set; bump a
/// version. The meta keys are ours, so one of the wrong type (a client wrote it) is replaced
/// and counted in `repaired`, never an error: an invalidation that fails on it would fail on
/// every retry. A version that holds no integer INCR can take is set to `fresh`, a random
/// integer the caller picked, which no fill can have read — so the check still rejects every
/// fill that read the old value.
const DROP_FN: &str = r#"
local dropped = 0
local repaired = 0
local function unlink_all(keys, from, to)
  for j = from, to, 500 do
    dropped = dropped + redis.call('UNLINK', unpack(keys, j, math.min(j + 499, to)))
  end
end
local function drop(set)
  local t = redis.call('TYPE', set)['ok']
  if t == 'set' then
    local members = redis.call('SMEMBERS', set)
    unlink_all(members, 1, #members)
  elseif t ~= 'none' then
    repaired = repaired + 1
  end
  redis.call('DEL', set)
end
local function bump(key, fresh)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' then return redis.call('INCR', key) end
  if t == 'string' then
    local v = redis.call('GET', key)
    if #v <= 18 and string.match(v, '^%-?%d+$') then return redis.call('INCR', key) end
  end
  repaired = repaired + 1
  redis.call('DEL', key)
  redis.call('SET', key, fresh)
end
"#;

/// KEYS: per table `e:`, `v:`, `d:`, `k:`. ARGV: a fresh version for a repaired key.
/// Returns {dropped, repaired}.
const INVALIDATE_TABLES_LUA: &str = r#"
for i = 1, #KEYS, 4 do
  bump(KEYS[i], ARGV[1])
  bump(KEYS[i + 1], ARGV[1])
  drop(KEYS[i + 2])
  drop(KEYS[i + 3])
end
return {dropped, repaired}
"#;

/// KEYS: `v:<t>`, `d:<t>`, then ARGV[1] row version keys, then entry keys to delete.
/// ARGV[3]: a fresh version for a repaired key. Returns {dropped, repaired}.
const INVALIDATE_ROWS_LUA: &str = r#"
local nr = tonumber(ARGV[1])
local rttl = tonumber(ARGV[2])
bump(KEYS[1], ARGV[3])
drop(KEYS[2])
for i = 3, 2 + nr do
  bump(KEYS[i], ARGV[3])
  redis.call('EXPIRE', KEYS[i], rttl)
end
if #KEYS >= 3 + nr then unlink_all(KEYS, 3 + nr, #KEYS) end
return {dropped, repaired}
"#;

/// KEYS: the table registry. Returns {repaired (0/1), members}.
const REGISTRY_LUA: &str = r#"
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'set' and t ~= 'none' then
  redis.call('DEL', KEYS[1])
  return {1, {}}
end
return {0, redis.call('SMEMBERS', KEYS[1])}
"#;

/// KEYS: the lease. ARGV: this instance's id, the lease's length (ms). Extends the lease only
/// if this instance still holds it. Returns 1 if extended.
const LEASE_RENEW_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// KEYS: the lease. ARGV: this instance's id. Deletes the lease only if this instance holds
/// it. Returns 1 if deleted.
const LEASE_RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// KEYS: how far the fleet's applied invalidations reach (`<prefix>{lease}:applied`). ARGV:
/// a position as 16 hex digits (uppercase), which compare as text as they do as numbers.
/// Raises the key to it, never lowers it; a value of any other shape or type is replaced.
const APPLIED_RAISE_LUA: &str = r#"
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'string' and t ~= 'none' then
  redis.call('DEL', KEYS[1])
end
local cur = redis.call('GET', KEYS[1])
if (not cur) or string.len(cur) ~= 16 or cur < ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"#;

static APPLIED_RAISE: StaticScript = LazyLock::new(|| Script::new(APPLIED_RAISE_LUA));
static FILL: StaticScript = LazyLock::new(|| Script::new(&format!("{RELEASE_FN}{FILL_LUA}")));
static FILL_RELEASE: StaticScript =
    LazyLock::new(|| Script::new(&format!("{RELEASE_FN}{FILL_RELEASE_LUA}")));
pub(super) static PREFILL: StaticScript = LazyLock::new(|| Script::new(PREFILL_LUA));
static LEASE_RENEW: StaticScript = LazyLock::new(|| Script::new(LEASE_RENEW_LUA));
static LEASE_RELEASE: StaticScript = LazyLock::new(|| Script::new(LEASE_RELEASE_LUA));
static INVALIDATE_TABLES: StaticScript =
    LazyLock::new(|| Script::new(&format!("{DROP_FN}{INVALIDATE_TABLES_LUA}")));
static INVALIDATE_ROWS: StaticScript =
    LazyLock::new(|| Script::new(&format!("{DROP_FN}{INVALIDATE_ROWS_LUA}")));
static REGISTRY: StaticScript = LazyLock::new(|| Script::new(REGISTRY_LUA));

/// What an invalidation did in Valkey.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Entries that existed and were dropped.
    pub entries: u64,
    /// Meta keys of the wrong type that were replaced. A repaired registry set had lost its
    /// members' names (see `Cache::invalidate`).
    pub repaired: u64,
}

impl Dropped {
    /// Entries dropped, nothing repaired.
    fn entries(entries: u64) -> Dropped {
        Dropped {
            entries,
            repaired: 0,
        }
    }

    fn from_script((entries, repaired): (i64, i64)) -> Dropped {
        Dropped {
            entries: entries.max(0) as u64,
            repaired: repaired.max(0) as u64,
        }
    }
}

/// A version for a repaired key: random, far above any count INCR reaches, so no fill can
/// have read it.
fn fresh_version() -> u64 {
    use rand::Rng;
    rand::thread_rng().gen_range(1_000_000_000_000_000..9_000_000_000_000_000)
}

/// See [`Store::prefill`].
pub struct Prefill {
    pub versions: Vec<String>,
    pub existing: Option<Value>,
    pub negative: bool,
    /// The fill lease, if one was asked for ([`Store::prefill_leased`]).
    pub lease: LeaseState,
}

/// Where a fill stands with its key's fill lease (see `cache::fleet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// None was asked for, or the entry (or its negative marker) exists.
    NotAsked,
    /// This fill holds it.
    Taken,
    /// Another fill holds it, for at most this much longer, with this token.
    Held(std::time::Duration, String),
    /// The other instance's fill this one waited for found no row and cached nothing (no
    /// negative caching): its answer is this one's too, as for a fill joined in-process.
    NoRow,
}

/// What a store script needs to give a fill lease up: the lease key to add to its keys, and
/// its arguments (token, channel, announcement; all empty without a lease).
pub(super) fn release_parts<'a>(
    release: Option<(&'a FillLease, &'a str, &'a str)>,
) -> (Option<&'a str>, [&'a str; 3]) {
    match release {
        Some((l, channel, announced)) => (Some(&l.key), [&l.token, channel, announced]),
        None => (None, ["", "", ""]),
    }
}

/// One fill's lease on its key: the lease key (beside the entry), the token naming this
/// hold, how long it lasts, and the entry key announced when it is given up.
#[derive(Debug)]
pub struct FillLease {
    pub key: String,
    pub token: String,
    pub ms: u64,
    pub entry: String,
    /// Set once a store script ran with it: that script gave it up.
    released: std::sync::atomic::AtomicBool,
}

impl FillLease {
    /// Whether a store script has given the lease up already.
    pub fn released(&self) -> bool {
        self.released.load(Ordering::Relaxed)
    }

    /// This lease as a store queued without waiting leaves it: marked released here (the
    /// store script gives it up), and a copy for whoever learns how the store went — to give
    /// it up should the script not have run.
    pub fn handoff(&self) -> FillLease {
        self.mark_released();
        FillLease {
            key: self.key.clone(),
            token: self.token.clone(),
            ms: self.ms,
            entry: self.entry.clone(),
            released: Default::default(),
        }
    }

    fn mark_released(&self) {
        self.released.store(true, Ordering::Relaxed);
    }
}

/// Runs an invocation of [`PREFILL_LUA`] (see [`prefill_invocation`]); `negative`: whether
/// it asks about a negative marker.
pub(super) async fn prefill_script(
    up: &Upstream,
    inv: Invocation,
    hash: bool,
    negative: bool,
) -> Result<Prefill> {
    parse_prefill(inv.run(up).await?, hash, negative)
}

/// The invocation of [`PREFILL_LUA`] for `entry` (its keys in one slot on a cluster):
/// `versions` adds the version keys (a cluster's generation key), `negative_key` the marker
/// if negative caching is on.
pub(super) fn prefill_invocation(
    entry: &Entry,
    hash: bool,
    negative_key: Option<&str>,
    (lease, waited_for): (&FillLease, &str),
    versions: impl FnOnce(&mut Invocation),
) -> Invocation {
    let mut inv = PREFILL.prepare();
    inv.key(&entry.key)
        .key(negative_key.unwrap_or(&entry.key))
        .key(&lease.key);
    versions(&mut inv);
    inv.arg(if hash { "h" } else { "s" })
        .arg(if negative_key.is_some() { "1" } else { "0" })
        .arg(&lease.token)
        .arg(&lease.ms)
        .arg(waited_for);
    inv
}

/// [`PREFILL_LUA`]'s reply; `negative`: whether it was asked about a negative marker.
fn parse_prefill(frame: BytesFrame, hash: bool, negative: bool) -> Result<Prefill> {
    let reply = resp::array(frame)?;
    let [v, existing, flag, state, left, holder]: [_; 6] = reply
        .try_into()
        .map_err(|_| crate::error::Error::upstream("unexpected reply from Valkey: prefill"))?;
    let lease = match resp::int(state)? {
        1 => LeaseState::Taken,
        2 => LeaseState::Held(
            std::time::Duration::from_millis(resp::int(left)?.max(0) as u64),
            resp::opt_string(holder)?.unwrap_or_default(),
        ),
        3 => LeaseState::NoRow,
        _ => LeaseState::NotAsked,
    };
    Ok(Prefill {
        versions: resp::versions(v)?,
        existing: existing_value(existing, hash)?,
        negative: negative && resp::int(flag)? != 0,
        lease,
    })
}

/// How long a row's version outlives its last change: far longer than any fill takes.
const ROW_VERSION_TTL: u64 = 86_400;

/// Valkey as cachefront itself uses it (not the pass-through path): one server, or a
/// cluster (see `cluster_store`).
#[derive(Clone)]
pub enum Store {
    Single(SingleStore),
    Cluster(Box<ClusterStore>),
}

impl Store {
    /// A store on `upstream`'s connections: it owns none of its own, so reconnects, timeouts
    /// and TLS are the pass-through's, and fills work again as soon as pass-through does.
    pub fn new(upstream: Arc<Upstream>, meta_prefix: &str) -> Store {
        if upstream.cluster.is_some() {
            Store::Cluster(Box::new(ClusterStore::new(upstream, meta_prefix)))
        } else {
            Store::Single(SingleStore::new(upstream, meta_prefix))
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Store::Cluster(_))
    }

    /// The key of the negative-cache marker for an entry key.
    pub fn negative_key(&self, key: &str) -> String {
        match self {
            Store::Single(s) => s.negative_key(key),
            Store::Cluster(c) => c.negative_key(key),
        }
    }

    /// Current versions for a fill of `entry` ("" for never bumped).
    pub async fn versions(&self, entry: &Entry) -> Result<Vec<String>> {
        match self {
            Store::Single(s) => s.versions(&entry.deps).await,
            Store::Cluster(c) => Ok(vec![c.generation(&entry.key).await?]),
        }
    }

    /// What a fill reads before querying, in one round trip: the versions to check at store
    /// time, the entry itself (a concurrent fill may have stored it since this request's
    /// lookup), and whether a negative marker exists.
    pub async fn prefill(
        &self,
        entry: &Entry,
        hash: bool,
        negative_key: Option<&str>,
    ) -> Result<Prefill> {
        match self {
            Store::Single(s) => s.prefill(entry, hash, negative_key).await,
            Store::Cluster(c) => c.prefill(entry, hash, negative_key).await,
        }
    }

    /// [`Store::prefill`], and if the entry (and its negative marker) is absent, the fill
    /// lease `lease` too, in the same atomic step (see `cache::fleet`). `waited_for`: the
    /// token of the holder this fill waited for, whose no-row answer is this fill's too.
    pub async fn prefill_leased(
        &self,
        entry: &Entry,
        hash: bool,
        negative_key: Option<&str>,
        lease: Option<(&FillLease, &str)>,
    ) -> Result<Prefill> {
        let Some(lease) = lease else {
            return self.prefill(entry, hash, negative_key).await;
        };
        match self {
            Store::Single(s) => {
                let inv = s.prefill_invocation(entry, hash, negative_key, lease);
                prefill_script(&s.upstream, inv, hash, negative_key.is_some()).await
            }
            Store::Cluster(c) => c.prefill_leased(entry, hash, negative_key, lease).await,
        }
    }

    /// The lookup of an entry that is also its fill's first step (see `cache::read`): the
    /// request of [`prefill_leased`](Self::prefill_leased) with `lease`, sent in place of the
    /// entry's `GET` — so a miss has read its versions, and taken the key's lease, in the
    /// lookup's round trip. Only for a string entry on a single server (a cluster keeps its
    /// versions in other slots); `None` otherwise.
    pub fn early_lookup(
        &self,
        entry: &Entry,
        negative_key: Option<&str>,
        lease: &FillLease,
    ) -> Option<Bytes> {
        let Store::Single(s) = self else {
            return None;
        };
        Some(
            s.prefill_invocation(entry, false, negative_key, (lease, ""))
                .evalsha(),
        )
    }

    /// Valkey answered an [`early_lookup`](Self::early_lookup) with `-NOSCRIPT` (a new or
    /// restarted server, a `SCRIPT FLUSH`): the lookup script is loaded, one load at a time,
    /// off the caller's path. The lookup is sent by SHA1 alone, so nothing else would load
    /// it but a miss's fill; until then every hit would cost a second round trip and never
    /// enter the L1 — on a Valkey that only ever hits (entries another instance or the
    /// application wrote, a restart with persistence), indefinitely.
    pub fn lookup_script_missing(&self) {
        let Store::Single(s) = self else {
            return;
        };
        if s.lookup_loading.swap(true, Ordering::AcqRel) {
            return;
        }
        let (up, loading) = (Arc::clone(&s.upstream), Arc::clone(&s.lookup_loading));
        tokio::spawn(async move {
            if let Err(e) = PREFILL.load(&up).await {
                // Refused (a Valkey user without `SCRIPT`) or Valkey away: the lookups keep
                // falling back to `GET` meanwhile; tried again at most once a second.
                tracing::warn!(error = %e, "could not load the lookup script into Valkey");
                tokio::time::sleep(LOOKUP_RELOAD_PAUSE).await;
            }
            loading.store(false, Ordering::Release);
        });
    }

    /// The reply to an [`early_lookup`](Self::early_lookup); `negative`: whether it asked
    /// about a negative marker. An error reply is an error.
    pub fn early_reply(&self, raw: &Bytes, negative: bool) -> Result<Prefill> {
        parse_prefill(resp::decode(raw)?, false, negative)
    }

    /// A lease for one fill of `entry_key`, lasting `ms` (not taken yet).
    pub fn fill_lease(&self, entry_key: &str, ms: u64) -> FillLease {
        let key = match self {
            Store::Single(s) => s.meta("f", entry_key),
            Store::Cluster(c) => c.fill_lease_key(entry_key),
        };
        FillLease {
            key,
            token: Fleet::token(),
            ms,
            entry: entry_key.to_string(),
            released: Default::default(),
        }
    }

    /// The channel fills announce their landing on (`<prefix>fills`).
    pub fn fill_channel(&self) -> String {
        let prefix = match self {
            Store::Single(s) => &s.prefix,
            Store::Cluster(c) => c.prefix(),
        };
        format!("{prefix}fills")
    }

    /// Gives `lease` up if this fill still holds it, and tells the waiting instances to look
    /// again — `no_row`: the fill found no row, which is the answer of those that waited for
    /// it too (nothing is cached); kept in the lease for one lease term.
    pub async fn release_fill_lease(&self, lease: &FillLease, no_row: bool) -> Result<bool> {
        let mut inv = FILL_RELEASE.prepare();
        inv.key(&lease.key)
            .arg(&lease.token)
            .arg(&self.fill_channel())
            .arg(&Fleet::announcement(&lease.entry))
            .arg(&if no_row { lease.ms } else { 0 });
        let released = resp::int(inv.run(self.upstream()).await?)? == 1;
        lease.mark_released();
        Ok(released)
    }

    /// What [`Store::prefill`] reads, and nothing else (a cluster's prefill also registers
    /// the entry): the entry's versions, then the entry, then the negative marker, in that
    /// order in one round trip. For the verification sampler (`cache::verify`), which must
    /// not write.
    pub async fn current(
        &self,
        entry: &Entry,
        hash: bool,
        negative_key: Option<&str>,
    ) -> Result<Prefill> {
        match self {
            Store::Single(s) => s.prefill(entry, hash, negative_key).await,
            Store::Cluster(c) => c.current(entry, hash, negative_key).await,
        }
    }

    /// Deletes `key` (an entry or a negative marker) outside any invalidation: for an entry
    /// the verification sampler found wrong. Its versions stay as they are; its registry
    /// sets still name it, which costs an invalidation nothing. True if it existed.
    pub async fn unlink(&self, key: &str) -> Result<bool> {
        let up = match self {
            Store::Single(s) => &s.upstream,
            Store::Cluster(c) => c.upstream(),
        };
        Ok(resp::int(resp::call(up, key, Cmd::new("UNLINK").arg(key)).await?)? > 0)
    }

    /// Stores `value` under `entry` if its versions are still `versions`. `Ok(false)` means a
    /// write raced this fill and nothing was stored.
    pub async fn store(&self, entry: &Entry, value: &Value, versions: &[String]) -> Result<bool> {
        self.queue_store(entry, value, versions, None, None)
            .await
            .await
    }

    /// [`Store::store`], giving up the fill `lease` in the same script (stored or not), queued
    /// now and answered later: when this returns, the store script is on its connection to
    /// Valkey — the key's, or the client's `lane` (see [`Upstream::send_own_on`]) — ahead of
    /// anything queued after it there; the returned future resolves to whether it stored. The
    /// script gives the lease up: the caller marks it so ([`FillLease::handoff`]).
    pub async fn queue_store(
        &self,
        entry: &Entry,
        value: &Value,
        versions: &[String],
        lease: Option<&FillLease>,
        lane: Option<(u64, Proto)>,
    ) -> BoxFuture<'static, Result<bool>> {
        let channel = self.fill_channel();
        let announced = lease.map(|l| Fleet::announcement(&l.entry));
        let release = lease
            .zip(announced.as_deref())
            .map(|(l, a)| (l, channel.as_str(), a));
        let script = match self {
            Store::Single(s) => s.store_script(entry, value, versions, release),
            Store::Cluster(c) => c.store_script(entry, value, versions, release),
        };
        let Some(script) = script else {
            return future::ready(Ok(false)).boxed();
        };
        let loaded = Arc::clone(self.store_script_loaded());
        let reply = script
            .queue(Arc::clone(self.upstream()), lane, loaded)
            .await;
        async move { Ok(resp::int(reply.await?)? == 1) }.boxed()
    }

    /// Table-wide invalidation: drops every entry that depends on `tables`. Returns how many
    /// entries existed and were dropped, and how many meta keys were repaired.
    pub async fn invalidate_tables(&self, tables: &[String]) -> Result<Dropped> {
        match self {
            Store::Single(s) => s.invalidate_tables(tables).await,
            Store::Cluster(c) => c.invalidate_tables(tables).await.map(Dropped::entries),
        }
    }

    /// Row-level invalidation of `table`: rows whose `column` took `values` changed. Drops the
    /// table's whole-table dependents and exactly the row-keyed `entry_keys`.
    pub async fn invalidate_rows(
        &self,
        table: &str,
        column: &str,
        values: &[String],
        entry_keys: &[String],
    ) -> Result<Dropped> {
        match self {
            Store::Single(s) => s.invalidate_rows(table, column, values, entry_keys).await,
            Store::Cluster(c) => c
                .invalidate_rows(table, entry_keys)
                .await
                .map(Dropped::entries),
        }
    }

    /// Records tables in the registry of everything ever cached.
    pub async fn register_tables(&self, tables: &[String]) -> Result<()> {
        if tables.is_empty() {
            return Ok(());
        }
        match self {
            Store::Single(s) => s.register_tables(tables).await,
            Store::Cluster(c) => c.register_tables(tables).await,
        }
    }

    /// Every table any cachefront instance sharing this Valkey has cached from.
    pub async fn registered_tables(&self) -> Result<Vec<String>> {
        match self {
            Store::Single(s) => s.registered_tables().await,
            Store::Cluster(c) => c.registered_tables().await,
        }
    }

    /// A plain GET, for callers outside the pass-through path.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        match self {
            Store::Single(s) => s.get(key).await,
            Store::Cluster(c) => c.get(key).await,
        }
    }

    /// The upstream its requests go through.
    /// Whether this store's Valkey is known to have the store script.
    fn store_script_loaded(&self) -> &Arc<AtomicBool> {
        match self {
            Store::Single(s) => &s.store_loaded,
            Store::Cluster(c) => &c.store_loaded,
        }
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        match self {
            Store::Single(s) => &s.upstream,
            Store::Cluster(c) => c.upstream(),
        }
    }

    /// The key of a lease among the instances sharing this Valkey (`<prefix>{lease}:<name>`).
    /// One key, so its scripts run on one node of a cluster too (routed by it); its flush
    /// mark ([`Store::lease_mark_flushed`]) shares its hash tag.
    pub fn lease_key(&self, name: &str) -> String {
        let prefix = match self {
            Store::Single(s) => &s.prefix,
            Store::Cluster(c) => c.prefix(),
        };
        format!("{prefix}{{lease}}:{name}")
    }

    /// Records that the holder of lease `key` has applied the flush that begins its term
    /// (`mark` names holder and term), for the instances that do not apply.
    pub async fn lease_mark_flushed(&self, key: &str, mark: &str) -> Result<()> {
        let flushed = format!("{key}:flushed");
        let cmd = Cmd::new("SET").arg(&flushed).arg(mark);
        resp::call(self.upstream(), &flushed, cmd).await?;
        Ok(())
    }

    /// Who holds lease `key`, if anyone, and the mark of the last term flush a holder
    /// applied, in one round trip.
    pub async fn lease_state(&self, key: &str) -> Result<(Option<Bytes>, Option<Bytes>)> {
        let flushed = format!("{key}:flushed");
        let cmd = Cmd::new("MGET").arg(key).arg(&flushed);
        let reply = resp::call(self.upstream(), key, cmd).await?;
        let mut both = resp::array(reply)?.into_iter().map(resp::opt_bytes);
        let holder = both.next().transpose()?.flatten();
        let mark = both.next().transpose()?.flatten();
        Ok((holder, mark))
    }

    /// Takes the lease `key` for `holder` for `ms` milliseconds if nobody holds it
    /// (`SET key holder NX PX ms`). True if taken.
    pub async fn lease_acquire(&self, key: &str, holder: &str, ms: u64) -> Result<bool> {
        let cmd = Cmd::new("SET")
            .arg(key)
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(&ms);
        Ok(resp::opt_bytes(resp::call(self.upstream(), key, cmd).await?)?.is_some())
    }

    /// Extends the lease `key` to `ms` milliseconds from now if `holder` still holds it
    /// (compare-and-extend). False: it expired, or another instance holds it.
    pub async fn lease_renew(&self, key: &str, holder: &str, ms: u64) -> Result<bool> {
        let mut inv = LEASE_RENEW.prepare();
        inv.key(key).arg(holder).arg(&ms);
        Ok(resp::int(inv.run(self.upstream()).await?)? == 1)
    }

    /// Raises `key` (see [`APPLIED_RAISE_LUA`]) to the WAL position `lsn`: every change
    /// committed up to it has been applied to Valkey (`invalidation::applied`).
    pub async fn raise_applied(&self, key: &str, lsn: u64) -> Result<()> {
        let mut inv = APPLIED_RAISE.prepare();
        inv.key(key).arg(&format!("{lsn:016X}"));
        resp::int(inv.run(self.upstream()).await?)?;
        Ok(())
    }

    /// The WAL position in `key` ([`Store::raise_applied`]); 0 while there is none (or
    /// something else is there).
    pub async fn applied(&self, key: &str) -> Result<u64> {
        let raw = self.get(key).await?;
        Ok(raw
            .filter(|b| b.len() == 16)
            .and_then(|b| std::str::from_utf8(&b).ok().map(str::to_string))
            .and_then(|s| u64::from_str_radix(&s, 16).ok())
            .unwrap_or(0))
    }

    /// Gives the lease `key` up if `holder` holds it (compare-and-delete), so another
    /// instance can take it without waiting for it to expire.
    pub async fn lease_release(&self, key: &str, holder: &str) -> Result<bool> {
        let mut inv = LEASE_RELEASE.prepare();
        inv.key(key).arg(holder);
        Ok(resp::int(inv.run(self.upstream()).await?)? == 1)
    }
}

/// The fill script's value kind (`s` string, `h` hash), or `None` for nothing to store.
pub(super) fn value_kind(value: &Value) -> Option<&'static str> {
    match value {
        Value::String(_) => Some("s"),
        Value::Hash(f) if !f.is_empty() => Some("h"),
        Value::Hash(_) | Value::Absent => None,
    }
}

/// Appends the value to a fill script's arguments: the string, or field, value, field…
pub(super) fn push_value_args(inv: &mut Invocation, value: &Value) {
    match value {
        Value::String(b) => {
            inv.arg(b);
        }
        Value::Hash(fields) => {
            for (f, v) in fields {
                inv.arg(f).arg(v);
            }
        }
        Value::Absent => {}
    }
}

/// The entry as read by GET or HGETALL (`None`: absent).
pub(super) fn existing_value(
    v: redis_protocol::resp2::types::BytesFrame,
    hash: bool,
) -> Result<Option<Value>> {
    Ok(if hash {
        let fields = resp::pairs(v)?;
        (!fields.is_empty()).then_some(Value::Hash(fields))
    } else {
        resp::opt_bytes(v)?.map(Value::String)
    })
}

/// How long after a failed `SCRIPT LOAD` of the lookup script the next is tried.
const LOOKUP_RELOAD_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// A single Valkey server.
#[derive(Clone)]
pub struct SingleStore {
    upstream: Arc<Upstream>,
    prefix: String,
    /// Whether this Valkey has the store script (see `resp::Invocation::queue`).
    store_loaded: Arc<AtomicBool>,
    /// A `SCRIPT LOAD` of the lookup script is under way (see [`Store::lookup_script_missing`]).
    lookup_loading: Arc<AtomicBool>,
}

impl SingleStore {
    pub fn new(upstream: Arc<Upstream>, meta_prefix: &str) -> SingleStore {
        SingleStore {
            upstream,
            prefix: meta_prefix.to_string(),
            store_loaded: Arc::default(),
            lookup_loading: Arc::default(),
        }
    }

    /// `<prefix><kind>:<rest>`. Joined with `concat` (one allocation of the exact size), not
    /// `format!`: several meta keys are built on every miss, and the formatting machinery
    /// cost more than the rest of the key's work.
    fn meta(&self, kind: &str, rest: &str) -> String {
        self.meta_parts(kind, rest).concat()
    }

    /// [`meta`](Self::meta)'s parts, for a request that writes them joined (`resp::Joined`).
    fn meta_parts<'a>(&'a self, kind: &'a str, rest: &'a str) -> [&'a str; 4] {
        [&self.prefix, kind, ":", rest]
    }

    /// A row's version key, `<prefix>r:<table>:<column>:<value>`.
    fn row_version(&self, table: &str, column: &str, value: &str) -> String {
        self.row_version_parts(table, column, value).concat()
    }

    /// [`row_version`](Self::row_version)'s parts.
    fn row_version_parts<'a>(
        &'a self,
        table: &'a str,
        column: &'a str,
        value: &'a str,
    ) -> [&'a str; 7] {
        [&self.prefix, "r:", table, ":", column, ":", value]
    }

    /// The key of the negative-cache marker for an entry key.
    pub fn negative_key(&self, key: &str) -> String {
        self.meta("n", key)
    }

    /// The version keys a fill of `deps` must find unchanged.
    fn version_keys(&self, deps: &Deps) -> Vec<String> {
        deps.versions()
            .iter()
            .map(|v| self.version_key_parts(v).concat())
            .collect()
    }

    /// [`version_keys`](Self::version_keys) added to a script's keys, joined only there;
    /// returns how many.
    fn put_version_keys(&self, deps: &Deps, inv: &mut Invocation) -> usize {
        let versions = deps.versions();
        for v in &versions {
            inv.key(&Joined(&self.version_key_parts(v)));
        }
        versions.len()
    }

    /// A version key's parts: `<prefix>v:<table>`, `<prefix>e:<table>` or a row's version.
    fn version_key_parts<'a>(&'a self, v: &Version<'a>) -> SmallVec<[&'a str; 7]> {
        match *v {
            Version::Table(t) => SmallVec::from_slice(&self.meta_parts("v", t)),
            Version::Epoch(t) => SmallVec::from_slice(&self.meta_parts("e", t)),
            Version::Row {
                table,
                column,
                value,
            } => SmallVec::from_slice(&self.row_version_parts(table, column, value)),
        }
    }

    /// [`PREFILL_LUA`]'s invocation for `entry`, its version keys this server's own.
    fn prefill_invocation(
        &self,
        entry: &Entry,
        hash: bool,
        negative_key: Option<&str>,
        lease: (&FillLease, &str),
    ) -> Invocation {
        prefill_invocation(entry, hash, negative_key, lease, |inv| {
            self.put_version_keys(&entry.deps, inv);
        })
    }

    /// The registry sets an entry of `deps` joins, added to a script's keys; returns how many.
    fn put_registry_keys(&self, deps: &Deps, inv: &mut Invocation) -> usize {
        for t in &deps.tables {
            inv.key(&Joined(&self.meta_parts("d", t)));
        }
        if let Some(r) = &deps.row {
            inv.key(&Joined(&self.meta_parts("k", &r.table)));
        }
        deps.tables.len() + usize::from(deps.row.is_some())
    }

    /// Current versions for a fill of `deps` ("" for never bumped).
    pub async fn versions(&self, deps: &Deps) -> Result<Vec<String>> {
        let keys = self.version_keys(deps);
        let Some(first) = keys.first() else {
            return Ok(Vec::new());
        };
        let reply = resp::call(&self.upstream, first, Cmd::new("MGET").args(&keys)).await?;
        resp::versions(reply)
    }

    /// What a fill reads before querying, in one round trip: the versions to check at store
    /// time, the entry itself (a concurrent fill may have stored it since this request's
    /// lookup), and whether a negative marker exists.
    pub async fn prefill(
        &self,
        entry: &Entry,
        hash: bool,
        negative_key: Option<&str>,
    ) -> Result<Prefill> {
        let keys = self.version_keys(&entry.deps);
        let cmds = [
            if keys.is_empty() {
                Cmd::new("ECHO").arg("")
            } else {
                Cmd::new("MGET").args(&keys)
            },
            Cmd::new(if hash { "HGETALL" } else { "GET" }).arg(&entry.key),
            Cmd::new("EXISTS").arg(negative_key.unwrap_or("")),
        ];
        let [versions, existing, negative]: [_; 3] = resp::batch(&self.upstream, &entry.key, cmds)
            .await?
            .try_into()
            .map_err(|_| crate::error::Error::upstream("a reply is missing"))?;
        Ok(Prefill {
            versions: if keys.is_empty() {
                Vec::new()
            } else {
                resp::versions(versions)?
            },
            existing: existing_value(existing, hash)?,
            negative: negative_key.is_some() && resp::int(negative)? != 0,
            lease: LeaseState::NotAsked,
        })
    }

    /// The script that stores `value` under `entry` if its versions are still `versions`
    /// (it answers 0 when a write raced the fill and nothing was stored); `None` for a value
    /// with nothing to store. `release`: the fill lease to give up and the channel to
    /// announce it on.
    pub(super) fn store_script(
        &self,
        entry: &Entry,
        value: &Value,
        versions: &[String],
        release: Option<(&FillLease, &str, &str)>,
    ) -> Option<Invocation> {
        let kind = value_kind(value)?;
        let mut inv = FILL.prepare();
        inv.key(&entry.key);
        let vkeys = self.put_version_keys(&entry.deps, &mut inv);
        let rkeys = self.put_registry_keys(&entry.deps, &mut inv);
        let (lease_key, [token, channel, announced]) = release_parts(release);
        if let Some(k) = lease_key {
            inv.key(k);
        }
        inv.arg(kind)
            .arg(&entry.ttl)
            .arg(&vkeys)
            .arg(&rkeys)
            .arg(token)
            .arg(channel)
            .arg(announced);
        for v in versions {
            inv.arg(v);
        }
        push_value_args(&mut inv, value);
        Some(inv)
    }

    /// Table-wide invalidation: bumps every version of `tables` and drops every entry that
    /// depends on them. Returns how many entries existed and were dropped, and how many meta
    /// keys were repaired.
    pub async fn invalidate_tables(&self, tables: &[String]) -> Result<Dropped> {
        if tables.is_empty() {
            return Ok(Dropped::default());
        }
        let mut inv = INVALIDATE_TABLES.prepare();
        for t in tables {
            inv.key(&self.meta("e", t))
                .key(&self.meta("v", t))
                .key(&self.meta("d", t))
                .key(&self.meta("k", t));
        }
        inv.arg(&fresh_version());
        let reply = inv.run(&self.upstream).await?;
        Ok(Dropped::from_script(resp::int_pair(reply)?))
    }

    /// Row-level invalidation of `table`: rows whose `column` took `values` changed. Drops the
    /// table's whole-table dependents and exactly the row-keyed `entry_keys`.
    pub async fn invalidate_rows(
        &self,
        table: &str,
        column: &str,
        values: &[String],
        entry_keys: &[String],
    ) -> Result<Dropped> {
        let mut inv = INVALIDATE_ROWS.prepare();
        inv.key(&self.meta("v", table)).key(&self.meta("d", table));
        for v in values {
            inv.key(&self.row_version(table, column, v));
        }
        for k in entry_keys {
            inv.key(k);
        }
        inv.arg(&values.len())
            .arg(&ROW_VERSION_TTL)
            .arg(&fresh_version());
        let reply = inv.run(&self.upstream).await?;
        Ok(Dropped::from_script(resp::int_pair(reply)?))
    }

    /// Records tables in the registry of everything ever cached.
    pub async fn register_tables(&self, tables: &[String]) -> Result<()> {
        if tables.is_empty() {
            return Ok(());
        }
        let registry = self.meta("tables", "all");
        let cmd = Cmd::new("SADD").arg(&registry).args(tables);
        resp::int(resp::call(&self.upstream, &registry, cmd).await?)?;
        Ok(())
    }

    /// Every table any cachefront instance sharing this Valkey has cached from.
    /// A registry of the wrong type (written by something else) is dropped, not an error
    /// that would keep every flush failing; its tables are then unknown (logged).
    pub async fn registered_tables(&self) -> Result<Vec<String>> {
        let mut inv = REGISTRY.prepare();
        inv.key(&self.meta("tables", "all"));
        let mut reply = resp::array(inv.run(&self.upstream).await?)?.into_iter();
        let (Some(repaired), Some(tables), None) = (reply.next(), reply.next(), reply.next())
        else {
            return Err(crate::error::Error::upstream(
                "unexpected reply from Valkey: not a pair",
            ));
        };
        if resp::int(repaired)? > 0 {
            tracing::error!("the table registry in Valkey was not a set (written by something other than cachefront) and was dropped; entries of tables it listed expire only by TTL");
        }
        resp::strings(tables)
    }

    /// A plain GET, for callers outside the pass-through path.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        resp::opt_bytes(resp::call(&self.upstream, key, Cmd::new("GET").arg(key)).await?)
    }
}
