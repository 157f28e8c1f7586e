//! The in-memory map: every key's newest [`Entry`], in shards with one read-write lock each, so
//! reads never wait for each other and writes to different shards never queue together.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

use bytes::Bytes;
use parking_lot::{RwLock, RwLockWriteGuard};

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

/// The sharded map from key to newest entry. Applying is last-writer-wins by [`Version`].
pub struct ShardedMap {
    shards: Box<[RwLock<Shard>]>,
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

    /// Calls `f` for every entry, one shard at a time under its read lock.
    pub fn scan(&self, mut f: impl FnMut(&str, &Entry)) {
        for shard in self.shards.iter() {
            for slot in shard.read().slots.iter() {
                f(slot.key(), &slot.entry());
            }
        }
    }

    /// Number of shards (for [`ShardedMap::export_shard`]).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// For a checkpoint: turns the shard's values that expired by `now_ms` into tombstones
    /// (keeping version and expiry, so a stale replica cannot bring an older value back), drops
    /// tombstones whose grace ended (written, or expired, before `drop_tombstones_before_ms`),
    /// then calls `encode(version, key, value, expiry)` for every remaining entry under the read
    /// lock. Returns the number of tombstones dropped.
    pub fn export_shard(
        &self,
        index: usize,
        now_ms: u64,
        drop_tombstones_before_ms: u64,
        mut encode: impl FnMut(Version, &[u8], Option<&[u8]>, Option<u64>),
    ) -> u64 {
        let Some(lock) = self.shards.get(index) else {
            return 0;
        };
        let mut shard = lock.write();
        expire_values(&mut shard, now_ms);
        let before = shard.tombstones;
        let Shard {
            slots, tombstones, ..
        } = &mut *shard;
        let observer = self.observer.get();
        slots.retain(|s| {
            let since = s
                .version()
                .physical_ms()
                .max(s.expires_at_ms().unwrap_or(0));
            let collect = s.is_tombstone() && since < drop_tombstones_before_ms;
            *tombstones = tombstones.saturating_sub(u64::from(collect));
            if collect {
                if let Some(observer) = observer {
                    observer.changed(index, s.key(), Some(s.version()), None);
                }
            }
            !collect
        });
        let dropped = before.saturating_sub(shard.tombstones);
        let shard = RwLockWriteGuard::downgrade(shard);
        for slot in shard.slots.iter() {
            encode(
                slot.version(),
                slot.key_bytes(),
                slot.value(),
                slot.expires_at_ms(),
            );
        }
        dropped
    }
}

/// Replaces every value of the shard that expired by `now_ms` with a tombstone of the same
/// version and expiry.
fn expire_values(shard: &mut Shard, now_ms: u64) {
    let expired: Vec<Slot> = shard
        .slots
        .iter()
        .filter(|s| !s.is_tombstone() && s.expires_at_ms().is_some_and(|e| e <= now_ms))
        .map(|s| Slot::new(s.version(), s.key(), None, s.expires_at_ms()))
        .collect();
    for tombstone in expired {
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

    #[test]
    fn export_drops_only_old_tombstones() {
        let map = ShardedMap::default();
        let old = 10 << 16;
        let new = 1000 << 16;
        map.apply(&rec("old-del", old, None));
        map.apply(&rec("new-del", new, None));
        map.apply(&rec("old-put", old, Some(b"v")));
        let mut seen = Vec::new();
        let mut dropped = 0;
        for i in 0..map.shard_count() {
            dropped += map.export_shard(i, 2000, 500, |_, k: &[u8], v: Option<&[u8]>, _| {
                seen.push((k.to_vec(), v.is_some()))
            });
        }
        seen.sort();
        assert_eq!(dropped, 1);
        assert_eq!(
            seen,
            vec![(b"new-del".to_vec(), false), (b"old-put".to_vec(), true)]
        );
        assert!(map.get("old-del").is_none());
        assert_eq!(map.counts().tombstones, 1);
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
    fn expired_values_become_tombstones_then_are_collected_after_their_grace() {
        let map = ShardedMap::default();
        let mut ttl = rec("ttl", 10 << 16, Some(b"v"));
        ttl.expires_at_ms = Some(100);
        map.apply(&ttl);
        let entry = map.get("ttl").unwrap();
        assert_eq!(entry.expires_at_ms, Some(100));
        assert!(entry.is_live_at(99) && !entry.is_live_at(100));
        let export = |now, cutoff| {
            let mut seen = Vec::new();
            for i in 0..map.shard_count() {
                map.export_shard(i, now, cutoff, |_, k: &[u8], v: Option<&[u8]>, e| {
                    seen.push((k.to_vec(), v.is_some(), e))
                });
            }
            seen
        };
        // Not expired yet: kept as a value.
        assert_eq!(export(50, 0), vec![(b"ttl".to_vec(), true, Some(100))]);
        // Expired: a tombstone that keeps version and expiry; its grace counts from the expiry.
        assert_eq!(export(150, 90), vec![(b"ttl".to_vec(), false, Some(100))]);
        assert!(map.get("ttl").unwrap().is_tombstone());
        assert_eq!(map.counts().live, 0);
        assert_eq!(export(150, 101), vec![]);
        assert!(map.get("ttl").is_none());
    }
}
