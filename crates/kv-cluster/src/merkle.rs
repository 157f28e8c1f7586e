//! Anti-entropy's hash trees: one small tree per ring arc, kept up to date as the map changes.
//!
//! # Shape
//! The ring's points cut the hash circle into arcs; every key of an arc has the same replicas
//! (see `kv_ring::Ring::arc_of`). Each arc has [`LEAVES`] leaves; a key falls in the leaf given by
//! the low bits of its ring hash. A leaf is the XOR of `entry_hash(key, version)` over its keys,
//! tombstones included, so applying a write is two XORs into one atomic word (old version out,
//! new version in) with no lock, and the order of changes does not matter. An arc's root is a
//! hash of its leaves, computed when asked. Two replicas compare roots for the arcs they share,
//! then the leaves of the arcs whose roots differ, then the `(key, version)` lists of the leaves
//! that differ: three levels, top-down, and in-step replicas exchange only the roots.
//!
//! # Exactness
//! The trees are fed by the map's observer (`kv_core::MapObserver`), called under the shard's
//! write lock. A rebuild (start-up, or a new ring after a membership change) installs empty
//! trees, then adds each shard's entries under that shard's read lock and marks the shard built
//! before releasing it; changes to a shard not yet built are left to the rebuild. So every
//! change is counted exactly once, and a built tree equals a tree computed from the map.

use kv_core::{MapObserver, Version};
use kv_ring::{hash_key, Ring};
use parking_lot::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Leaves per arc. With 256 points per node, 3 nodes have 768 arcs: 49,152 leaves, 384 KiB.
pub const LEAVES: usize = 64;

/// A segment of the key space: one leaf of one arc, numbered `arc * LEAVES + leaf`.
pub type Segment = u32;

/// The hash of one entry in a leaf: depends on the key and the version only (an expired value
/// turned into a tombstone of the same version hashes the same).
pub fn entry_hash(key: &str, version: Version) -> u64 {
    let seed = version.hlc ^ u64::from(version.node).rotate_left(32);
    // Never 0, so an entry always changes its leaf.
    xxh3_64_with_seed(key.as_bytes(), seed) | 1
}

/// The arc and leaf of a key on `ring`, as a [`Segment`].
pub fn segment_of(ring: &Ring, key: &str) -> Segment {
    let hash = hash_key(key.as_bytes());
    let leaf = (hash as usize) % LEAVES;
    // ok to truncate: arcs are points on the ring, far fewer than 2^32 / LEAVES.
    (ring.arc_of(hash) * LEAVES + leaf) as Segment
}

/// The trees of every arc of one ring.
pub struct Trees {
    ring: Arc<Ring>,
    leaves: Box<[AtomicU64]>,
    built: Box<[AtomicBool]>,
    built_count: AtomicUsize,
}

impl std::fmt::Debug for Trees {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trees")
            .field("arcs", &self.arcs())
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Trees {
    /// Empty trees for `ring`, expecting `shards` map shards to be added by [`Trees::add_shard`].
    pub fn new(ring: Arc<Ring>, shards: usize) -> Trees {
        let leaves = (0..ring.arc_count() * LEAVES)
            .map(|_| AtomicU64::new(0))
            .collect();
        let built = (0..shards).map(|_| AtomicBool::new(false)).collect();
        Trees {
            ring,
            leaves,
            built,
            built_count: AtomicUsize::new(0),
        }
    }

    /// The ring these trees cut the key space by.
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// Number of arcs.
    pub fn arcs(&self) -> usize {
        self.ring.arc_count()
    }

    /// True once every shard was added: the trees match the map.
    pub fn is_ready(&self) -> bool {
        self.built_count.load(Ordering::Acquire) == self.built.len()
    }

    fn xor(&self, key: &str, hash: u64) {
        let segment = segment_of(&self.ring, key) as usize;
        if let Some(leaf) = self.leaves.get(segment) {
            leaf.fetch_xor(hash, Ordering::AcqRel);
        }
    }

    /// Records a change of `key` (see [`MapObserver::changed`]); ignored until its shard is
    /// built, since the rebuild reads the shard's final state.
    pub fn change(&self, shard: usize, key: &str, old: Option<Version>, new: Option<Version>) {
        if !self
            .built
            .get(shard)
            .is_some_and(|b| b.load(Ordering::Acquire))
        {
            return;
        }
        let out = old.map_or(0, |v| entry_hash(key, v));
        let into = new.map_or(0, |v| entry_hash(key, v));
        if out ^ into != 0 {
            self.xor(key, out ^ into);
        }
    }

    /// Adds every entry of one shard and marks it built. The caller holds the shard's read lock
    /// for the whole call (`kv_core::Store::visit_shard`), so no change slips between the two.
    pub fn add_shard(&self, shard: usize, entries: &mut dyn Iterator<Item = (&str, Version)>) {
        let Some(flag) = self.built.get(shard) else {
            return;
        };
        if flag.load(Ordering::Acquire) {
            return;
        }
        for (key, version) in entries {
            self.xor(key, entry_hash(key, version));
        }
        flag.store(true, Ordering::Release);
        self.built_count.fetch_add(1, Ordering::AcqRel);
    }

    /// The leaves of `arc` (zeros for an arc that does not exist).
    pub fn leaves(&self, arc: usize) -> [u64; LEAVES] {
        let mut out = [0; LEAVES];
        if let Some(slots) = self.leaves.get(arc * LEAVES..(arc + 1) * LEAVES) {
            for (o, leaf) in out.iter_mut().zip(slots) {
                *o = leaf.load(Ordering::Acquire);
            }
        }
        out
    }

    /// The root of `arc`: a hash of its leaves (0 when the arc holds nothing).
    pub fn root(&self, arc: usize) -> u64 {
        root_of(&self.leaves(arc))
    }
}

/// The root hash of one arc's leaves; 0 for an empty arc, so empty arcs cost nothing to compare.
pub fn root_of(leaves: &[u64; LEAVES]) -> u64 {
    if leaves.iter().all(|&l| l == 0) {
        return 0;
    }
    let mut bytes = [0u8; LEAVES * 8];
    for (chunk, leaf) in bytes.chunks_exact_mut(8).zip(leaves) {
        chunk.copy_from_slice(&leaf.to_le_bytes());
    }
    xxh3_64_with_seed(&bytes, 0x6b76_6161_6521) | 1
}

/// The leaves where two arcs' trees differ, as indices.
pub fn differing_leaves(mine: &[u64; LEAVES], theirs: &[u64; LEAVES]) -> Vec<usize> {
    (0..LEAVES).filter(|&i| mine[i] != theirs[i]).collect()
}

/// The node's current trees, swapped for new ones when the ring changes; the map's observer.
#[derive(Debug)]
pub struct TreeSet {
    current: RwLock<Arc<Trees>>,
}

impl TreeSet {
    /// Starts with (unbuilt) trees for `ring`.
    pub fn new(ring: Arc<Ring>, shards: usize) -> TreeSet {
        TreeSet {
            current: RwLock::new(Arc::new(Trees::new(ring, shards))),
        }
    }

    /// The trees now in use.
    pub fn current(&self) -> Arc<Trees> {
        self.current.read().clone()
    }

    /// Installs empty trees for `ring` and returns them, to be filled by the caller; the old
    /// trees stop receiving changes.
    pub fn replace(&self, ring: Arc<Ring>, shards: usize) -> Arc<Trees> {
        let trees = Arc::new(Trees::new(ring, shards));
        *self.current.write() = trees.clone();
        trees
    }
}

impl MapObserver for TreeSet {
    fn changed(&self, shard: usize, key: &str, old: Option<Version>, new: Option<Version>) {
        self.current.read().change(shard, key, old, new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn ring() -> Arc<Ring> {
        Arc::new(Ring::new(["http://a:1", "http://b:1", "http://c:1"], 8))
    }

    fn v(hlc: u64) -> Version {
        Version { hlc, node: 1 }
    }

    /// Trees built from a plain map in one shard.
    fn built(ring: &Arc<Ring>, map: &HashMap<String, Version>) -> Trees {
        let trees = Trees::new(ring.clone(), 1);
        let mut entries = map.iter().map(|(k, v)| (k.as_str(), *v));
        trees.add_shard(0, &mut entries);
        trees
    }

    fn all_leaves(trees: &Trees) -> Vec<[u64; LEAVES]> {
        (0..trees.arcs()).map(|a| trees.leaves(a)).collect()
    }

    #[test]
    fn an_update_changes_one_leaf_and_its_root_only() {
        let ring = ring();
        let map: HashMap<String, Version> = (0..500).map(|i| (format!("k{i}"), v(i))).collect();
        let trees = built(&ring, &map);
        let before = all_leaves(&trees);
        trees.change(0, "k7", Some(v(7)), Some(v(1_000)));
        let after = all_leaves(&trees);
        let segment = segment_of(&ring, "k7") as usize;
        let (arc, leaf) = (segment / LEAVES, segment % LEAVES);
        for a in 0..trees.arcs() {
            let diff = differing_leaves(&before[a], &after[a]);
            if a == arc {
                assert_eq!(diff, vec![leaf]);
                assert_ne!(root_of(&before[a]), root_of(&after[a]));
            } else {
                assert!(diff.is_empty(), "arc {a} changed");
            }
        }
        // Back to the old version: the tree is as before.
        trees.change(0, "k7", Some(v(1_000)), Some(v(7)));
        assert_eq!(all_leaves(&trees), before);
    }

    #[test]
    fn changes_before_a_shard_is_built_are_left_to_the_rebuild() {
        let ring = ring();
        let trees = Trees::new(ring.clone(), 2);
        trees.change(0, "k1", None, Some(v(1)));
        assert!(!trees.is_ready());
        assert!((0..trees.arcs()).all(|a| trees.root(a) == 0));
        let mut none = std::iter::empty();
        trees.add_shard(0, &mut none);
        trees.add_shard(1, &mut std::iter::empty());
        assert!(trees.is_ready());
        trees.change(0, "k1", None, Some(v(1)));
        assert!((0..trees.arcs()).any(|a| trees.root(a) != 0));
    }

    #[test]
    fn diff_finds_exactly_the_leaves_of_keys_that_differ() {
        let ring = ring();
        let mine: HashMap<String, Version> = (0..2_000).map(|i| (format!("k{i}"), v(i))).collect();
        let mut theirs = mine.clone();
        theirs.insert("k5".into(), v(99_999));
        theirs.remove("k1500");
        theirs.insert("extra".into(), v(3));
        let (a, b) = (built(&ring, &mine), built(&ring, &theirs));
        let mut found = Vec::new();
        for arc in 0..a.arcs() {
            if a.root(arc) == b.root(arc) {
                continue;
            }
            for leaf in differing_leaves(&a.leaves(arc), &b.leaves(arc)) {
                found.push((arc * LEAVES + leaf) as Segment);
            }
        }
        found.sort_unstable();
        let mut expected: Vec<Segment> = ["k5", "k1500", "extra"]
            .iter()
            .map(|k| segment_of(&ring, k))
            .collect();
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(found, expected);
    }

    #[test]
    fn an_empty_arc_has_root_zero() {
        assert_eq!(root_of(&[0; LEAVES]), 0);
        let mut one = [0; LEAVES];
        one[3] = 5;
        assert_ne!(root_of(&one), 0);
    }

    proptest! {
        /// Trees maintained change by change equal trees rebuilt from the final map.
        #[test]
        fn incremental_trees_equal_a_rebuild(
            ops in proptest::collection::vec((0u8..40, 0u64..50, any::<bool>()), 1..300)
        ) {
            let ring = ring();
            let live = Trees::new(ring.clone(), 1);
            live.add_shard(0, &mut std::iter::empty());
            let mut map: HashMap<String, Version> = HashMap::new();
            for (key, hlc, remove) in ops {
                let key = format!("key{key}");
                let old = map.get(&key).copied();
                let new = if remove { None } else { Some(v(hlc)) };
                match new {
                    Some(version) => { map.insert(key.clone(), version); }
                    None => { map.remove(&key); }
                }
                live.change(0, &key, old, new);
            }
            let rebuilt = built(&ring, &map);
            prop_assert_eq!(all_leaves(&live), all_leaves(&rebuilt));
        }
    }
}
