//! The in-memory map: every key's newest [`Entry`], in shards with one read-write lock each, so
//! reads never wait for each other and writes to different shards never queue together.
//!
//! Beside the shards, an ordered index of every key (a lock-free skip list) serves listings,
//! checkpoints and scans in key order without holding any shard lock for more than one entry.
//!
//! # How the index follows the map
//!
//! A key is added to the index *before* its first entry becomes visible in its shard, and removed
//! from the index *after* its entry left the shard; both happen under that shard's write lock, so
//! the changes of one key are ordered. Hence at every instant the index holds every key of the
//! map (a superset: for the length of one write, it may hold a key whose entry is not in the
//! shard yet, or no longer). A reader walks the index without locks and reads each key's entry
//! from its shard, skipping keys it does not find. Overwrites do not touch the index. A deleted
//! key stays in both as a tombstone until the tombstone is collected (checkpoint after its grace,
//! [`ShardedMap::forget_if`], [`ShardedMap::forget`]), which removes it from both.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::ops::Bound;

use bytes::Bytes;
use crossbeam_skiplist::SkipSet;
use parking_lot::RwLock;

use crate::{Record, Version};

/// Number of shards; a power of two so the shard is a mask of the key's hash.
const SHARDS: usize = 64;

/// What the map holds for a key: its newest version and value (`None` = tombstone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Version of the write that produced this entry.
    pub version: Version,
    /// The value, or `None` when the key was deleted (a tombstone).
    pub value: Option<Bytes>,
    /// When the value expires, in Unix milliseconds (`None`: never).
    pub expires_at_ms: Option<u64>,
}

impl Entry {
    /// True when the key was deleted.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// True when the entry holds a value that has not expired at `now_ms`.
    pub fn is_live_at(&self, now_ms: u64) -> bool {
        self.value.is_some() && self.expires_at_ms.is_none_or(|e| e > now_ms)
    }
}

/// Bytes in a [`Slot`] before the key: hlc, node, flags, key length.
const SLOT_HEADER: usize = 8 + 4 + 1 + 4;
/// Flags bit of a tombstone.
const SLOT_TOMBSTONE: u8 = 1;
/// Flags bit of an entry with an expiry (8 bytes between the header and the key).
const SLOT_EXPIRES: u8 = 2;

/// One key's entry packed into a single heap allocation, to keep a million small keys compact
/// (one 16-byte table slot plus one allocation per key, instead of three allocations):
///
/// ```text
/// [hlc u64 LE][node u32 LE][flags u8: bit 0 = tombstone, bit 1 = expires][key len u32 LE]
/// [expiry u64 LE, only when bit 1 is set][key][value]
/// ```
///
/// Hashes and compares as its key bytes, so the set can be searched with `&[u8]`.
struct Slot(Box<[u8]>);

impl Slot {
    fn new(version: Version, key: &str, value: Option<&[u8]>, expires_at_ms: Option<u64>) -> Slot {
        let value_len = value.map_or(0, <[u8]>::len);
        let mut buf = Vec::with_capacity(SLOT_HEADER + 8 + key.len() + value_len);
        buf.extend_from_slice(&version.hlc.to_le_bytes());
        buf.extend_from_slice(&version.node.to_le_bytes());
        let tombstone = if value.is_none() { SLOT_TOMBSTONE } else { 0 };
        let expires = if expires_at_ms.is_some() {
            SLOT_EXPIRES
        } else {
            0
        };
        buf.push(tombstone | expires);
        // ok to truncate: Record::validate caps keys at MAX_KEY_LEN.
        buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        if let Some(expiry) = expires_at_ms {
            buf.extend_from_slice(&expiry.to_le_bytes());
        }
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(value.unwrap_or_default());
        Slot(buf.into_boxed_slice())
    }

    fn field<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0; N];
        out.copy_from_slice(&self.0[at..at + N]);
        out
    }

    fn version(&self) -> Version {
        Version {
            hlc: u64::from_le_bytes(self.field(0)),
            node: u32::from_le_bytes(self.field(8)),
        }
    }

    fn is_tombstone(&self) -> bool {
        self.0[12] & SLOT_TOMBSTONE != 0
    }

    fn expires_at_ms(&self) -> Option<u64> {
        (self.0[12] & SLOT_EXPIRES != 0).then(|| u64::from_le_bytes(self.field(SLOT_HEADER)))
    }

    fn key_start(&self) -> usize {
        if self.0[12] & SLOT_EXPIRES != 0 {
            SLOT_HEADER + 8
        } else {
            SLOT_HEADER
        }
    }

    fn key_end(&self) -> usize {
        self.key_start() + u32::from_le_bytes(self.field(13)) as usize
    }

    fn key_bytes(&self) -> &[u8] {
        &self.0[self.key_start()..self.key_end()]
    }

    fn key(&self) -> &str {
        let key = std::str::from_utf8(self.key_bytes());
        key.expect("slot keys are built from &str") // ok: Slot::new takes a &str key
    }

    /// The value bytes; `None` for a tombstone.
    fn value(&self) -> Option<&[u8]> {
        (!self.is_tombstone()).then(|| &self.0[self.key_end()..])
    }

    fn entry(&self) -> Entry {
        Entry {
            version: self.version(),
            value: self.value().map(Bytes::copy_from_slice),
            expires_at_ms: self.expires_at_ms(),
        }
    }
}

impl Borrow<[u8]> for Slot {
    fn borrow(&self) -> &[u8] {
        self.key_bytes()
    }
}

impl Hash for Slot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key_bytes().hash(state);
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Slot) -> bool {
        self.key_bytes() == other.key_bytes()
    }
}

impl Eq for Slot {}

/// One shard: its keys and running totals for status.
#[derive(Default)]
struct Shard {
    slots: HashSet<Slot>,
    live: u64,
    tombstones: u64,
    value_bytes: u64,
}

impl Shard {
    fn count(&mut self, slot: &Slot, add: bool) {
        let bump = |n: &mut u64, by: u64| *n = if add { *n + by } else { n.saturating_sub(by) };
        match slot.value() {
            Some(v) => {
                bump(&mut self.live, 1);
                bump(&mut self.value_bytes, v.len() as u64);
            }
            None => bump(&mut self.tombstones, 1),
        }
    }
}

/// Totals over the whole map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapCounts {
    /// Keys with a value.
    pub live: u64,
    /// Keys whose newest write is a delete.
    pub tombstones: u64,
    /// Sum of the live values' lengths.
    pub value_bytes: u64,
}

/// Told of every change to the map's key set or versions, for structures that summarise the
/// map (anti-entropy's hash trees). Called with the shard's write lock held, so the calls for one
/// shard are ordered, and a [`ShardedMap::visit_shard`] of that shard never runs between a change
/// and its call. It must be quick and must not touch the map.
pub trait MapObserver: Send + Sync {
    /// `key` of shard `shard` went from `old` to `new` (`None`: absent).
    fn changed(&self, shard: usize, key: &str, old: Option<Version>, new: Option<Version>);

    /// `record` was applied: it is now the key's newest entry (called right after
    /// [`MapObserver::changed`], under the same lock). For change streams; ignored by default.
    fn applied(&self, _record: &Record) {}
}

/// Several [`MapObserver`]s behind the map's one slot: each call goes to each, in order.
#[derive(Default)]
pub struct MapObservers(Vec<std::sync::Arc<dyn MapObserver>>);

impl MapObservers {
    /// Fans out to `observers`, in this order.
    pub fn new(observers: Vec<std::sync::Arc<dyn MapObserver>>) -> MapObservers {
        MapObservers(observers)
    }
}

impl std::fmt::Debug for MapObservers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapObservers")
            .field("count", &self.0.len())
            .finish()
    }
}

impl MapObserver for MapObservers {
    fn changed(&self, shard: usize, key: &str, old: Option<Version>, new: Option<Version>) {
        for observer in &self.0 {
            observer.changed(shard, key, old, new);
        }
    }

    fn applied(&self, record: &Record) {
        for observer in &self.0 {
            observer.applied(record);
        }
    }
}

/// Entries one [`ShardedMap::scan`] step copies before it calls back (without any lock held).
pub const SCAN_CHUNK: usize = 1024;

/// Which keys a [`ShardedMap::range`] returns: those that start with `prefix` and sort after
/// `after`, the first `limit` of them in key order.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyRange<'a> {
    /// Only keys that start with this (empty: all keys).
    pub prefix: &'a str,
    /// Only keys that sort strictly after this (the cursor of the previous page).
    pub after: Option<&'a str>,
    /// At most this many entries.
    pub limit: usize,
    /// Copy live values; when false a live entry's value is empty (`Some` of no bytes), so
    /// the values are never read.
    pub values: bool,
}

/// What one [`ShardedMap::export_chunk`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportedChunk {
    /// Cursor for the next chunk: the last key this chunk looked at; `None` when the map was
    /// exhausted.
    pub next: Option<String>,
    /// Entries handed to `encode`.
    pub exported: u64,
    /// Tombstones dropped.
    pub dropped: u64,
}

/// The sharded map from key to newest entry. Applying is last-writer-wins by [`Version`].
pub struct ShardedMap {
    shards: Box<[RwLock<Shard>]>,
    /// Every key of the map, in order (see the module documentation for how it stays a superset
    /// of the shards' keys).
    index: SkipSet<Box<str>>,
    observer: std::sync::OnceLock<std::sync::Arc<dyn MapObserver>>,
}

impl std::fmt::Debug for ShardedMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedMap")
            .field("counts", &self.counts())
            .finish()
    }
}

impl Default for ShardedMap {
    fn default() -> Self {
        ShardedMap {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            index: SkipSet::new(),
            observer: std::sync::OnceLock::new(),
        }
    }
}

impl ShardedMap {
    fn shard_index(key: &str) -> usize {
        crc32c::crc32c(key.as_bytes()) as usize % SHARDS
    }

    fn shard(&self, key: &str) -> &RwLock<Shard> {
        &self.shards[Self::shard_index(key)]
    }

    fn notify(&self, shard: usize, key: &str, old: Option<Version>, new: Option<Version>) {
        if let Some(observer) = self.observer.get() {
            observer.changed(shard, key, old, new);
        }
    }

    /// Installs the one observer of this map (a second call is refused and returns false).
    /// Changes made before it was installed are not reported: the observer reads them with
    /// [`ShardedMap::visit_shard`].
    pub fn set_observer(&self, observer: std::sync::Arc<dyn MapObserver>) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// Calls `f` with every `(key, version)` of shard `index` (tombstones included) under the
    /// shard's read lock, held until `f` returns: no change to the shard, and no
    /// [`MapObserver`] call for it, happens meanwhile. Does nothing for a shard that does not
    /// exist.
    pub fn visit_shard(
        &self,
        index: usize,
        f: impl FnOnce(&mut dyn Iterator<Item = (&str, Version)>),
    ) {
        if let Some(lock) = self.shards.get(index) {
            let shard = lock.read();
            let mut entries = shard.slots.iter().map(|s| (s.key(), s.version()));
            f(&mut entries);
        }
    }

    /// Removes `key` if its entry still has exactly `version` (no tombstone is left); true when
    /// it did. For a copy that anti-entropy found was deleted and collected everywhere else.
    pub fn forget_if(&self, key: &str, version: Version) -> bool {
        let index = Self::shard_index(key);
        let mut shard = self.shards[index].write();
        if shard
            .slots
            .get(key.as_bytes())
            .is_none_or(|s| s.version() != version)
        {
            return false;
        }
        if let Some(old) = shard.slots.take(key.as_bytes()) {
            shard.count(&old, false);
            self.index.remove(key);
            self.notify(index, key, Some(version), None);
        }
        true
    }

    /// The key's entry (tombstones included), if any.
    pub fn get(&self, key: &str) -> Option<Entry> {
        self.shard(key)
            .read()
            .slots
            .get(key.as_bytes())
            .map(Slot::entry)
    }

    /// Whether a write of `key` at `version` would change the map.
    pub fn is_newer(&self, key: &str, version: Version) -> bool {
        let shard = self.shard(key).read();
        shard
            .slots
            .get(key.as_bytes())
            .is_none_or(|s| version > s.version())
    }

    /// Stores the record if its version is greater than the stored one; returns whether it did.
    pub fn apply(&self, record: &Record) -> bool {
        let index = Self::shard_index(&record.key);
        let mut shard = self.shards[index].write();
        let mut previous = None;
        if let Some(old) = shard.slots.get(record.key.as_bytes()) {
            if record.version <= old.version() {
                return false;
            }
            previous = Some(old.version());
        }
        let slot = Slot::new(
            record.version,
            &record.key,
            record.value.as_deref(),
            record.expires_at_ms,
        );
        if previous.is_none() {
            // Indexed before the entry becomes visible (see the module documentation).
            self.index.insert(record.key.as_str().into());
        }
        shard.count(&slot, true);
        if let Some(old) = shard.slots.replace(slot) {
            shard.count(&old, false);
        }
        self.notify(index, &record.key, previous, Some(record.version));
        if let Some(observer) = self.observer.get() {
            observer.applied(record);
        }
        true
    }

    /// Removes the keys' entries outright (no tombstone): for keys this node no longer owns
    /// after a membership change. Returns how many were present.
    pub fn forget(&self, keys: &[String]) -> usize {
        let mut removed = 0;
        for key in keys {
            let index = Self::shard_index(key);
            let mut shard = self.shards[index].write();
            if let Some(old) = shard.slots.take(key.as_bytes()) {
                shard.count(&old, false);
                self.index.remove(key.as_str());
                self.notify(index, key, Some(old.version()), None);
                removed += 1;
            }
        }
        removed
    }

    /// Totals over all shards (locks each shard briefly).
    pub fn counts(&self) -> MapCounts {
        self.shards.iter().fold(MapCounts::default(), |acc, shard| {
            let s = shard.read();
            MapCounts {
                live: acc.live + s.live,
                tombstones: acc.tombstones + s.tombstones,
                value_bytes: acc.value_bytes + s.value_bytes,
            }
        })
    }

    /// Calls `f` for every entry (tombstones included) in key order. Entries are copied
    /// [`SCAN_CHUNK`] at a time, each under its shard's read lock for that entry alone, and `f`
    /// runs with no lock held. Keys written while the scan runs may or may not be seen.
    pub fn scan(&self, mut f: impl FnMut(&str, &Entry)) {
        let mut after: Option<String> = None;
        loop {
            let chunk = self.range(&KeyRange {
                prefix: "",
                after: after.as_deref(),
                limit: SCAN_CHUNK,
                values: true,
            });
            for (key, entry) in &chunk {
                f(key, entry);
            }
            if chunk.len() < SCAN_CHUNK {
                return;
            }
            after = chunk.into_iter().next_back().map(|(key, _)| key);
        }
    }

    /// The first `range.limit` entries (tombstones included) whose key starts with
    /// `range.prefix` and sorts after `range.after`, in key order. Costs O(log n + limit): the
    /// index is walked from the first candidate key, and each entry is read under its shard's
    /// read lock for that entry alone. Live values are copied only when `range.values` asks.
    pub fn range(&self, range: &KeyRange<'_>) -> Vec<(String, Entry)> {
        let mut out = Vec::with_capacity(range.limit.min(SCAN_CHUNK));
        if range.limit == 0 {
            return out;
        }
        let start = match range.after {
            Some(after) if after >= range.prefix => Bound::Excluded(after),
            _ => Bound::Included(range.prefix),
        };
        for indexed in self.index.range::<str, _>((start, Bound::Unbounded)) {
            let key: &str = indexed.value();
            if !key.starts_with(range.prefix) {
                break;
            }
            let entry = self.shard(key).read().slots.get(key.as_bytes()).map(|s| {
                let mut entry = Entry {
                    version: s.version(),
                    value: None,
                    expires_at_ms: s.expires_at_ms(),
                };
                entry.value = match s.value() {
                    Some(v) if range.values => Some(Bytes::copy_from_slice(v)),
                    Some(_) => Some(Bytes::new()),
                    None => None,
                };
                entry
            });
            // None: indexed, but its first write is not visible yet or it was just removed.
            if let Some(entry) = entry {
                out.push((key.to_owned(), entry));
                if out.len() == range.limit {
                    break;
                }
            }
        }
        out
    }

    /// Number of shards (for [`ShardedMap::visit_shard`]).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// One step of a checkpoint or backup: for up to `max` keys after `after` (from the start
    /// when `None`), in key order, turns a value that expired by `now_ms` into a tombstone
    /// (keeping version and expiry, so a stale replica cannot bring an older value back), drops
    /// a tombstone whose grace ended (written, or expired, before `drop_tombstones_before_ms`),
    /// and calls `encode(version, key, value, expiry)` for every remaining entry. Each entry is
    /// handled under its shard's write lock for that entry alone, so writes go on meanwhile.
    /// Loop with `after = next` until `next` is `None`.
    pub fn export_chunk(
        &self,
        after: Option<&str>,
        max: usize,
        now_ms: u64,
        drop_tombstones_before_ms: u64,
        mut encode: impl FnMut(Version, &[u8], Option<&[u8]>, Option<u64>),
    ) -> ExportedChunk {
        let mut chunk = ExportedChunk::default();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut last = None;
        for (seen, indexed) in self
            .index
            .range::<str, _>((start, Bound::Unbounded))
            .enumerate()
        {
            if seen == max {
                chunk.next = last;
                return chunk;
            }
            let key: &str = indexed.value();
            let index = Self::shard_index(key);
            let mut shard = self.shards[index].write();
            expire_value(&mut shard, key, now_ms);
            let Some(slot) = shard.slots.get(key.as_bytes()) else {
                continue;
            };
            let since = slot
                .version()
                .physical_ms()
                .max(slot.expires_at_ms().unwrap_or(0));
            if slot.is_tombstone() && since < drop_tombstones_before_ms {
                if let Some(old) = shard.slots.take(key.as_bytes()) {
                    shard.count(&old, false);
                    self.index.remove(key);
                    self.notify(index, key, Some(old.version()), None);
                    chunk.dropped += 1;
                }
            } else {
                encode(
                    slot.version(),
                    slot.key_bytes(),
                    slot.value(),
                    slot.expires_at_ms(),
                );
                chunk.exported += 1;
            }
            drop(shard);
            last = Some(key.to_owned());
        }
        chunk
    }

    /// Test hook: checks the index against the shards; with `exact`, also that it holds no key
    /// the shards lack (true only when no write is under way). Returns the first discrepancy.
    #[cfg(test)]
    pub(crate) fn check_index(&self, exact: bool) -> Result<(), String> {
        for (i, lock) in self.shards.iter().enumerate() {
            let shard = lock.read();
            if let Some(s) = shard.slots.iter().find(|s| !self.index.contains(s.key())) {
                return Err(format!("shard {i} holds {:?}, the index does not", s.key()));
            }
        }
        if exact {
            let keys: usize = self.shards.iter().map(|s| s.read().slots.len()).sum();
            if keys != self.index.len() {
                return Err(format!("{keys} keys, {} indexed", self.index.len()));
            }
        }
        Ok(())
    }
}

/// Replaces the key's value with a tombstone of the same version and expiry when it expired by
/// `now_ms`.
fn expire_value(shard: &mut Shard, key: &str, now_ms: u64) {
    let expired = shard.slots.get(key.as_bytes()).and_then(|s| {
        (!s.is_tombstone() && s.expires_at_ms().is_some_and(|e| e <= now_ms))
            .then(|| Slot::new(s.version(), s.key(), None, s.expires_at_ms()))
    });
    if let Some(tombstone) = expired {
        shard.count(&tombstone, true);
        if let Some(old) = shard.slots.replace(tombstone) {
            shard.count(&old, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, hlc: u64, value: Option<&'static [u8]>) -> Record {
        Record {
            key: key.into(),
            version: Version { hlc, node: 1 },
            value: value.map(Bytes::from_static),
            expires_at_ms: None,
        }
    }

    #[test]
    fn last_writer_wins_by_version() {
        let map = ShardedMap::default();
        assert!(map.apply(&rec("k", 5, Some(b"five"))));
        assert!(!map.apply(&rec("k", 4, Some(b"four"))));
        assert!(!map.apply(&rec("k", 5, Some(b"again"))));
        assert_eq!(map.get("k").unwrap().value.unwrap(), &b"five"[..]);
        assert!(map.apply(&rec("k", 6, None)));
        assert!(map.get("k").unwrap().is_tombstone());
        assert!(!map.is_newer("k", Version { hlc: 6, node: 1 }));
        assert!(map.is_newer("k", Version { hlc: 6, node: 2 }));
        assert!(map.get("other").is_none());
    }

    /// Records what it is told, to check the fan-out.
    #[derive(Default)]
    struct Log(parking_lot::Mutex<Vec<String>>);

    impl MapObserver for Log {
        fn changed(&self, _: usize, key: &str, _: Option<Version>, new: Option<Version>) {
            self.0
                .lock()
                .push(format!("changed {key} {}", new.is_some()));
        }
        fn applied(&self, record: &Record) {
            self.0
                .lock()
                .push(format!("applied {} {}", record.key, record.version.hlc));
        }
    }

    #[test]
    fn every_observer_hears_applied_records_only_when_they_win() {
        let map = ShardedMap::default();
        let (a, b) = (
            std::sync::Arc::new(Log::default()),
            std::sync::Arc::new(Log::default()),
        );
        assert!(map.set_observer(std::sync::Arc::new(MapObservers::new(vec![
            a.clone(),
            b.clone()
        ]))));
        map.apply(&rec("k", 5, Some(b"five")));
        map.apply(&rec("k", 4, Some(b"stale")));
        map.forget(&["k".to_owned()]);
        let expected = ["changed k true", "applied k 5", "changed k false"];
        assert_eq!(*a.0.lock(), expected);
        assert_eq!(*b.0.lock(), expected);
    }

    #[test]
    fn counts_follow_puts_and_deletes() {
        let map = ShardedMap::default();
        map.apply(&rec("a", 1, Some(b"123")));
        map.apply(&rec("b", 1, Some(b"")));
        map.apply(&rec("a", 2, Some(b"12345")));
        map.apply(&rec("b", 2, None));
        assert_eq!(
            map.counts(),
            MapCounts {
                live: 1,
                tombstones: 1,
                value_bytes: 5
            }
        );
    }

    /// An exported entry: key, live, expiry.
    type Exported = (Vec<u8>, bool, Option<u64>);

    /// Exports the whole map in chunks of `max`; returns the entries and the drops.
    fn export_all(map: &ShardedMap, max: usize, now: u64, cutoff: u64) -> (Vec<Exported>, u64) {
        let mut seen = Vec::new();
        let mut dropped = 0;
        let mut after: Option<String> = None;
        loop {
            let chunk = map.export_chunk(after.as_deref(), max, now, cutoff, |_, k, v, e| {
                seen.push((k.to_vec(), v.is_some(), e))
            });
            assert!(chunk.exported as usize + chunk.dropped as usize <= max);
            dropped += chunk.dropped;
            match chunk.next {
                Some(next) => after = Some(next),
                None => return (seen, dropped),
            }
        }
    }

    #[test]
    fn export_drops_only_old_tombstones() {
        let map = ShardedMap::default();
        let old = 10 << 16;
        let new = 1000 << 16;
        map.apply(&rec("old-del", old, None));
        map.apply(&rec("new-del", new, None));
        map.apply(&rec("old-put", old, Some(b"v")));
        let (seen, dropped) = export_all(&map, 1024, 2000, 500);
        assert_eq!(dropped, 1);
        assert_eq!(
            seen,
            vec![
                (b"new-del".to_vec(), false, None),
                (b"old-put".to_vec(), true, None)
            ]
        );
        assert!(map.get("old-del").is_none());
        assert_eq!(map.counts().tombstones, 1);
        map.check_index(true).unwrap();
    }

    #[test]
    fn export_in_small_chunks_sees_every_key_once_in_order() {
        let map = ShardedMap::default();
        for i in 0..2500 {
            let value: Option<&'static [u8]> = if i % 3 == 0 { None } else { Some(b"v") };
            map.apply(&rec(&format!("k{i:05}"), 10 << 16, value));
        }
        for max in [1, 7, 1024, 5000] {
            let (seen, dropped) = export_all(&map, max, 0, 0);
            assert_eq!(dropped, 0);
            let keys: Vec<Vec<u8>> = seen.into_iter().map(|(k, _, _)| k).collect();
            let expected: Vec<Vec<u8>> =
                (0..2500).map(|i| format!("k{i:05}").into_bytes()).collect();
            assert_eq!(keys, expected, "chunks of {max}");
        }
        // Every third key is a tombstone; collecting them in chunks of 7 drops each once.
        let (seen, dropped) = export_all(&map, 7, 0, u64::MAX);
        assert_eq!((seen.len(), dropped), (1666, 834));
        assert_eq!(
            map.counts(),
            MapCounts {
                live: 1666,
                tombstones: 0,
                value_bytes: 1666
            }
        );
        map.check_index(true).unwrap();
    }

    #[test]
    fn scan_visits_everything() {
        let map = ShardedMap::default();
        for i in 0..1000 {
            map.apply(&rec(
                &format!("key{i}"),
                1,
                if i % 2 == 0 { Some(b"x") } else { None },
            ));
        }
        let mut n = 0;
        let mut tombstones = 0;
        map.scan(|k, e| {
            assert!(k.starts_with("key"));
            n += 1;
            tombstones += u32::from(e.is_tombstone());
        });
        assert_eq!((n, tombstones), (1000, 500));
    }

    #[test]
    fn scan_goes_in_key_order_across_chunks() {
        let map = ShardedMap::default();
        let n = SCAN_CHUNK * 2 + 5;
        for i in (0..n).rev() {
            map.apply(&rec(&format!("{i:06}"), 1, Some(b"x")));
        }
        let mut keys = Vec::new();
        map.scan(|k, e| {
            assert_eq!(e.value.as_deref(), Some(&b"x"[..]));
            keys.push(k.to_owned());
        });
        let expected: Vec<String> = (0..n).map(|i| format!("{i:06}")).collect();
        assert_eq!(keys, expected);
    }

    #[test]
    fn range_pages_by_prefix_and_cursor_without_values_unless_asked() {
        let map = ShardedMap::default();
        for key in ["a", "b/1", "b/2", "b/3", "b0", "c"] {
            map.apply(&rec(key, 1, Some(b"val")));
        }
        map.apply(&rec("b/2", 2, None));
        let page = |prefix, after, limit, values| {
            map.range(&KeyRange {
                prefix,
                after,
                limit,
                values,
            })
        };
        let keys = |entries: Vec<(String, Entry)>| -> Vec<String> {
            entries.into_iter().map(|(k, _)| k).collect()
        };
        assert_eq!(keys(page("b/", None, 10, false)), ["b/1", "b/2", "b/3"]);
        assert_eq!(keys(page("b/", Some("b/1"), 10, false)), ["b/2", "b/3"]);
        assert_eq!(keys(page("b/", Some("a"), 1, false)), ["b/1"]);
        assert_eq!(
            keys(page("b/", Some("b/3"), 10, false)),
            Vec::<String>::new()
        );
        assert_eq!(
            keys(page("b/", Some("zz"), 10, false)),
            Vec::<String>::new()
        );
        assert_eq!(keys(page("", Some("b0"), 10, false)), ["c"]);
        assert_eq!(keys(page("", None, 0, false)), Vec::<String>::new());
        let with = page("b/", None, 10, true);
        let without = page("b/", None, 10, false);
        assert_eq!(with[0].1.value.as_deref(), Some(&b"val"[..]));
        assert_eq!(without[0].1.value.as_deref(), Some(&b""[..]));
        assert!(with[1].1.is_tombstone() && without[1].1.is_tombstone());
        assert_eq!(with[1].1.version.hlc, 2);
    }

    #[test]
    fn forget_and_forget_if_leave_the_index_too_and_the_observer_is_told() {
        #[derive(Default)]
        struct Log(parking_lot::Mutex<Vec<(String, Option<Version>)>>);
        impl MapObserver for Log {
            fn changed(&self, _: usize, key: &str, _: Option<Version>, new: Option<Version>) {
                self.0.lock().push((key.to_owned(), new));
            }
        }
        let map = ShardedMap::default();
        let log = std::sync::Arc::new(Log::default());
        assert!(map.set_observer(log.clone()));
        map.apply(&rec("a", 1, Some(b"x")));
        map.apply(&rec("b", 1, None));
        map.apply(&rec("c", 1, None));
        assert!(!map.forget_if("b", Version { hlc: 2, node: 1 }));
        assert!(map.forget_if("b", Version { hlc: 1, node: 1 }));
        assert_eq!(map.forget(&["a".to_owned(), "zz".to_owned()]), 1);
        let (seen, dropped) = export_all(&map, 1024, 0, u64::MAX);
        assert_eq!((seen, dropped), (vec![], 1));
        assert!(map
            .range(&KeyRange {
                limit: 10,
                ..KeyRange::default()
            })
            .is_empty());
        map.check_index(true).unwrap();
        let removed: Vec<String> = log
            .0
            .lock()
            .iter()
            .filter(|(_, new)| new.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(removed, ["b", "a", "c"]);
    }

    /// Writers add, overwrite, delete, forget and collect keys while readers page through the
    /// map: every key that stays present the whole time is listed by every pass, pages are in
    /// order, and the index covers each shard at every instant a reader looks.
    #[test]
    fn index_stays_consistent_under_concurrent_writes() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let map = ShardedMap::default();
        let stable: Vec<String> = (0..200).map(|i| format!("s{i:04}")).collect();
        for key in &stable {
            map.apply(&rec(key, 1, Some(b"x")));
        }
        let stop = AtomicBool::new(false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
        std::thread::scope(|scope| {
            for w in 0..2u64 {
                let (map, stop) = (&map, &stop);
                scope.spawn(move || {
                    let mut hlc = 10;
                    let mut round = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        round += 1;
                        for i in 0..300u64 {
                            // Churning keys sort among the stable ones.
                            let key = format!("s{:04}-{w}", (i * 7 + round) % 200);
                            hlc += 1;
                            let value: Option<&'static [u8]> =
                                if i % 2 == 0 { Some(b"y") } else { None };
                            map.apply(&rec(&key, hlc, value));
                            if i % 5 == 0 {
                                map.forget(std::slice::from_ref(&key));
                            }
                            if i % 7 == 0 {
                                map.forget_if(&key, Version { hlc, node: 1 });
                            }
                        }
                        map.export_chunk(None, 64, 0, u64::MAX, |_, _, _, _| {});
                        // Stable keys are overwritten, never removed.
                        let key = &format!("s{:04}", round % 200);
                        hlc += 1;
                        map.apply(&rec(key, hlc, Some(b"z")));
                    }
                });
            }
            let (map, stop, stable) = (&map, &stop, &stable);
            scope.spawn(move || {
                let mut passes = 0;
                while std::time::Instant::now() < deadline {
                    let mut listed = Vec::new();
                    let mut after: Option<String> = None;
                    loop {
                        let page = map.range(&KeyRange {
                            prefix: "s",
                            after: after.as_deref(),
                            limit: 37,
                            values: false,
                        });
                        let Some((last, _)) = page.last() else { break };
                        after = Some(last.clone());
                        listed.extend(page.into_iter().map(|(k, _)| k));
                    }
                    assert!(listed.windows(2).all(|w| w[0] < w[1]), "pages out of order");
                    for key in stable {
                        assert!(listed.binary_search(key).is_ok(), "{key} missing");
                    }
                    for shard in 0..map.shard_count() {
                        map.visit_shard(shard, |_| {});
                    }
                    map.check_index(false).unwrap();
                    passes += 1;
                }
                stop.store(true, Ordering::Relaxed);
                assert!(passes > 3, "only {passes} listing passes");
            });
        });
        map.check_index(true).unwrap();
    }

    #[test]
    fn expired_values_become_tombstones_then_are_collected_after_their_grace() {
        let map = ShardedMap::default();
        let mut ttl = rec("ttl", 10 << 16, Some(b"v"));
        ttl.expires_at_ms = Some(100);
        map.apply(&ttl);
        let entry = map.get("ttl").unwrap();
        assert_eq!(entry.expires_at_ms, Some(100));
        assert!(entry.is_live_at(99) && !entry.is_live_at(100));
        let export = |now, cutoff| export_all(&map, 1024, now, cutoff).0;
        // Not expired yet: kept as a value.
        assert_eq!(export(50, 0), vec![(b"ttl".to_vec(), true, Some(100))]);
        // Expired: a tombstone that keeps version and expiry; its grace counts from the expiry.
        assert_eq!(export(150, 90), vec![(b"ttl".to_vec(), false, Some(100))]);
        assert!(map.get("ttl").unwrap().is_tombstone());
        assert_eq!(map.counts().live, 0);
        assert_eq!(export(150, 101), vec![]);
        assert!(map.get("ttl").is_none());
    }

    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        /// A key's model state: version and value (`None`: tombstone).
        type Model = BTreeMap<String, (Version, Option<Vec<u8>>)>;

        #[derive(Clone, Debug)]
        enum Op {
            Put(String, u64, Option<Vec<u8>>),
            Forget(String),
            ForgetIf(String, u64),
            /// Collect tombstones written before this physical time, in chunks of the size.
            Collect(u64, usize),
            List(String, Option<String>, usize, bool),
        }

        fn key() -> impl Strategy<Value = String> {
            "[ab/]{1,4}"
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (key(), 1..40u64, proptest::option::of(proptest::collection::vec(any::<u8>(), 0..3)))
                    .prop_map(|(k, h, v)| Op::Put(k, h, v)),
                1 => key().prop_map(Op::Forget),
                1 => (key(), 1..40u64).prop_map(|(k, h)| Op::ForgetIf(k, h)),
                1 => (0..45u64, 1..5usize).prop_map(|(c, n)| Op::Collect(c, n)),
                2 => ("[ab/]{0,2}", proptest::option::of(key()), 1..6usize, any::<bool>())
                    .prop_map(|(p, a, l, v)| Op::List(p, a, l, v)),
            ]
        }

        fn version(physical: u64) -> Version {
            Version {
                hlc: physical << 16,
                node: 1,
            }
        }

        fn expected(
            model: &Model,
            range: &KeyRange<'_>,
        ) -> Vec<(String, Version, Option<Vec<u8>>)> {
            model
                .iter()
                .filter(|(k, _)| k.starts_with(range.prefix))
                .filter(|(k, _)| range.after.is_none_or(|a| k.as_str() > a))
                .take(range.limit)
                .map(|(k, (ver, val))| {
                    let val = val
                        .as_ref()
                        .map(|v| if range.values { v.clone() } else { Vec::new() });
                    (k.clone(), *ver, val)
                })
                .collect()
        }

        fn actual(
            map: &ShardedMap,
            range: &KeyRange<'_>,
        ) -> Vec<(String, Version, Option<Vec<u8>>)> {
            map.range(range)
                .into_iter()
                .map(|(k, e)| (k, e.version, e.value.map(|v| v.to_vec())))
                .collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// The map and its index against a BTreeMap under random puts, deletes, forgets,
            /// collections (in chunks) and listings.
            #[test]
            fn index_matches_a_btreemap(ops in proptest::collection::vec(op(), 1..60)) {
                let map = ShardedMap::default();
                let mut model = Model::new();
                for op in ops {
                    match op {
                        Op::Put(k, h, v) => {
                            let newer = model.get(&k).is_none_or(|(old, _)| version(h) > *old);
                            let record = Record {
                                key: k.clone(),
                                version: version(h),
                                value: v.clone().map(Bytes::from),
                                expires_at_ms: None,
                            };
                            prop_assert_eq!(map.apply(&record), newer);
                            if newer {
                                model.insert(k, (version(h), v));
                            }
                        }
                        Op::Forget(k) => {
                            let n = map.forget(std::slice::from_ref(&k));
                            prop_assert_eq!(n, usize::from(model.remove(&k).is_some()));
                        }
                        Op::ForgetIf(k, h) => {
                            let matches = model.get(&k).is_some_and(|(v, _)| *v == version(h));
                            prop_assert_eq!(map.forget_if(&k, version(h)), matches);
                            if matches {
                                model.remove(&k);
                            }
                        }
                        Op::Collect(cutoff, max) => {
                            let mut exported = Vec::new();
                            let mut after: Option<String> = None;
                            let mut dropped = 0;
                            loop {
                                let chunk = map.export_chunk(after.as_deref(), max, 0, cutoff, |_, k, _, _| {
                                    exported.push(String::from_utf8_lossy(k).into_owned());
                                });
                                dropped += chunk.dropped;
                                match chunk.next {
                                    Some(next) => after = Some(next),
                                    None => break,
                                }
                            }
                            let before = model.len() as u64;
                            model.retain(|_, (v, val)| val.is_some() || v.physical_ms() >= cutoff);
                            prop_assert_eq!(dropped, before - model.len() as u64);
                            let kept: Vec<String> = model.keys().cloned().collect();
                            prop_assert_eq!(exported, kept);
                        }
                        Op::List(prefix, after, limit, values) => {
                            let range = KeyRange { prefix: &prefix, after: after.as_deref(), limit, values };
                            prop_assert_eq!(actual(&map, &range), expected(&model, &range));
                        }
                    }
                    map.check_index(true).map_err(TestCaseError::fail)?;
                }
                let all = KeyRange { limit: usize::MAX, values: true, ..KeyRange::default() };
                prop_assert_eq!(actual(&map, &all), expected(&model, &all));
                let counts = map.counts();
                let live = model.values().filter(|(_, v)| v.is_some()).count() as u64;
                prop_assert_eq!((counts.live, counts.tombstones), (live, model.len() as u64 - live));
            }
        }
    }
}
