//! The hash ring: virtual-node points of every node, sorted, and the preference list of a key.
//! Owns placement only; knows nothing of health, HTTP or storage.

use std::collections::BTreeSet;

use xxhash_rust::xxh3::xxh3_64;

/// Virtual nodes per physical node when the operator does not set `VNODES`.
///
/// Chosen from the table in `crates/kv-ring/BENCH.md` (`cargo run --release -p kv-ring
/// --example vnode_table`): at 256 points per node the busiest of 3 nodes owns 1.07x the keys
/// of the idlest (worst of 20 clusters: 1.22x; at 64 points: 1.15x, worst 1.49x), a 3 -> 4 join
/// moves 24 % of the keys (ideal 25 %), a lookup among 100 nodes takes ~50 ns and the ring
/// of 100 nodes weighs 300 KiB. 512 points buy little more balance for twice the memory.
pub const DEFAULT_VNODES: usize = 256;

/// Hashes a key onto the ring (xxh3, 64 bits). Nodes' points use the same function.
pub fn hash_key(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// The canonical spelling of a node URL on the ring: surrounding whitespace and trailing
/// slashes removed, so `http://a:1/` and `http://a:1` are the same node everywhere.
pub fn normalize_node(url: &str) -> &str {
    url.trim().trim_end_matches('/')
}

/// A consistent-hashing ring of virtual nodes.
///
/// Every distinct node (after [`normalize_node`]) gets `vnodes` points on a 64-bit circle, at
/// `hash_key("{url}#{i}")` for `i` in `0..vnodes`. A key belongs to the nodes of the first points
/// at or after `hash_key(key)`, going clockwise and wrapping around. Nodes are kept sorted and
/// points are sorted by `(hash, node index)`, so the ring depends only on the *set* of nodes and
/// the vnode count: the load balancer and every node build identical rings from the same list
/// in any order.
///
/// Points are stored as two parallel arrays (struct of arrays) so the binary search walks a
/// dense `Vec<u64>`; the owner of point `i` is `owners[i]`, an index into `nodes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    nodes: Vec<String>,
    hashes: Vec<u64>,
    owners: Vec<u32>,
    vnodes: usize,
}

/// Up to this many wanted replicas, a linear scan of the chosen list is the fastest way to skip
/// nodes already taken; beyond it a `seen` bitmap keeps the walk linear.
const LINEAR_SCAN_LIMIT: usize = 8;

impl Ring {
    /// Builds the ring from a set of node URLs: normalized, duplicates and empty entries removed,
    /// sorted, so the ring depends only on the set, not the order. Each node gets `vnodes`
    /// points; `vnodes == 0` is treated as 1 so that every node owns at least one point.
    pub fn new<I, S>(nodes: I, vnodes: usize) -> Ring
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nodes: Vec<String> = nodes
            .into_iter()
            .map(|node| normalize_node(node.as_ref()).to_owned())
            .filter(|node| !node.is_empty())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let vnodes = vnodes.max(1);
        let (hashes, owners) = build_points(&nodes, vnodes);
        Ring {
            nodes,
            hashes,
            owners,
            vnodes,
        }
    }

    /// The nodes on the ring, normalized, sorted and distinct. Preference lists index into it.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Number of distinct nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when the ring has no node (every lookup then returns nothing).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Virtual nodes (points) per node.
    pub fn vnodes(&self) -> usize {
        self.vnodes
    }

    /// Index in [`Ring::nodes`] of `node` (normalized first), if it is on the ring.
    pub fn position(&self, node: &str) -> Option<usize> {
        let node = normalize_node(node);
        self.nodes.binary_search_by(|n| n.as_str().cmp(node)).ok()
    }

    /// The first `min(n, len)` distinct nodes clockwise from `hash_key(key)`, as indices into
    /// [`Ring::nodes`], primary first. An empty ring or `n == 0` gives an empty list.
    pub fn preference_list(&self, key: &str, n: usize) -> Vec<usize> {
        let wanted = n.min(self.nodes.len());
        let mut chosen = Vec::with_capacity(wanted);
        if wanted == 0 {
            return chosen;
        }
        let mut seen = if wanted > LINEAR_SCAN_LIMIT {
            vec![false; self.nodes.len()]
        } else {
            Vec::new()
        };
        let start = self.first_point_at(hash_key(key.as_bytes()));
        self.walk_from(start, wanted, &mut chosen, &mut seen);
        chosen
    }

    /// Number of arcs: one per point. Arc `i` holds the hashes in `(point i-1, point i]`
    /// (wrapping), so every key of an arc has the same preference list. Anti-entropy keeps one
    /// hash tree per arc.
    pub fn arc_count(&self) -> usize {
        self.hashes.len()
    }

    /// The arc a key hash (see [`hash_key`]) falls in; 0 on an empty ring.
    pub fn arc_of(&self, hash: u64) -> usize {
        if self.hashes.is_empty() {
            0
        } else {
            self.first_point_at(hash)
        }
    }

    /// The preference list (indices into [`Ring::nodes`]) of every key in `arc`; empty when the
    /// arc does not exist.
    pub fn arc_preference(&self, arc: usize, n: usize) -> Vec<usize> {
        let wanted = n.min(self.nodes.len());
        let mut chosen = Vec::with_capacity(wanted);
        if wanted == 0 || arc >= self.owners.len() {
            return chosen;
        }
        let mut seen = if wanted > LINEAR_SCAN_LIMIT {
            vec![false; self.nodes.len()]
        } else {
            Vec::new()
        };
        self.walk_from(arc, wanted, &mut chosen, &mut seen);
        chosen
    }

    /// Collects the first `wanted` distinct owners clockwise from point `start`.
    fn walk_from(&self, start: usize, wanted: usize, chosen: &mut Vec<usize>, seen: &mut [bool]) {
        let clockwise = self.owners[start..].iter().chain(&self.owners[..start]);
        for &owner in clockwise {
            let owner = owner as usize;
            if first_visit(owner, chosen, seen) {
                chosen.push(owner);
                if chosen.len() == wanted {
                    break;
                }
            }
        }
    }

    /// Same as [`Ring::preference_list`], as node URLs.
    pub fn owners(&self, key: &str, n: usize) -> Vec<&str> {
        self.preference_list(key, n)
            .into_iter()
            .filter_map(|index| self.nodes.get(index).map(String::as_str))
            .collect()
    }

    /// The first node of the key's preference list, without allocating; `None` on an empty ring.
    pub fn primary(&self, key: &str) -> Option<&str> {
        let start = self.first_point_at(hash_key(key.as_bytes()));
        let owner = self.owners.get(start).or_else(|| self.owners.first())?;
        self.nodes.get(*owner as usize).map(String::as_str)
    }

    /// Each node's share of the hash space as primary (indexed like [`Ring::nodes`], summing to
    /// 1 on a non-empty ring): the widths of the arcs whose points it owns. Shown by `/ui`.
    pub fn primary_shares(&self) -> Vec<f64> {
        let mut shares = vec![0.0; self.nodes.len()];
        if self.hashes.len() == 1 {
            if let Some(share) = shares.first_mut() {
                *share = 1.0;
            }
            return shares;
        }
        let full = 2f64.powi(64);
        let mut previous = self.hashes.last().copied().unwrap_or_default();
        for (&hash, &owner) in self.hashes.iter().zip(&self.owners) {
            let width = hash.wrapping_sub(previous);
            previous = hash;
            if let Some(share) = shares.get_mut(owner as usize) {
                *share += width as f64 / full;
            }
        }
        shares
    }

    /// Index of the first point whose hash is `>= hash`, wrapping to 0 past the last point.
    fn first_point_at(&self, hash: u64) -> usize {
        let index = self.hashes.partition_point(|&point| point < hash);
        if index == self.hashes.len() {
            0
        } else {
            index
        }
    }
}

/// All points of all nodes, sorted by `(hash, node index)`, split into hashes and owners.
/// The node index breaks the (astronomically rare) tie of two equal hashes deterministically.
fn build_points(nodes: &[String], vnodes: usize) -> (Vec<u64>, Vec<u32>) {
    let mut points: Vec<(u64, u32)> = Vec::with_capacity(nodes.len().saturating_mul(vnodes));
    let mut label = String::new();
    // Zipping with a u32 range bounds the node count to u32::MAX without a fallible cast.
    for (index, node) in (0u32..).zip(nodes) {
        for vnode in 0..vnodes {
            label.clear();
            label.push_str(node);
            label.push('#');
            label.push_str(&vnode.to_string());
            points.push((hash_key(label.as_bytes()), index));
        }
    }
    points.sort_unstable();
    points.into_iter().unzip()
}

/// True the first time `owner` is offered: a linear scan of `chosen` when `seen` is empty
/// (few replicas wanted), else a bitmap lookup that also records the visit.
fn first_visit(owner: usize, chosen: &[usize], seen: &mut [bool]) -> bool {
    if seen.is_empty() {
        return !chosen.contains(&owner);
    }
    match seen.get_mut(owner) {
        Some(visited) => !std::mem::replace(visited, true),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_shares_cover_the_whole_ring() {
        let ring = Ring::new(["http://a:1", "http://b:1", "http://c:1"], 128);
        let shares = ring.primary_shares();
        assert_eq!(shares.len(), 3);
        let total: f64 = shares.iter().sum();
        assert!((total - 1.0).abs() < 1e-9, "{shares:?}");
        assert!(shares.iter().all(|&s| s > 0.15 && s < 0.5), "{shares:?}");
        assert_eq!(Ring::new(["http://a:1"], 1).primary_shares(), vec![1.0]);
        assert!(Ring::new(Vec::<String>::new(), 8)
            .primary_shares()
            .is_empty());
    }

    const KEYS: usize = 100_000;

    fn urls(count: usize) -> Vec<String> {
        (1..=count)
            .map(|i| format!("http://127.0.0.1:{}", 8000 + i))
            .collect()
    }

    fn keys() -> impl Iterator<Item = String> {
        (0..KEYS).map(|i| format!("key-{i}"))
    }

    /// Fraction of `keys()` whose primary differs between the two rings.
    fn moved_fraction(before: &Ring, after: &Ring) -> f64 {
        let moved = keys()
            .filter(|key| before.primary(key) != after.primary(key))
            .count();
        moved as f64 / KEYS as f64
    }

    #[test]
    fn empty_ring_owns_nothing() {
        let ring = Ring::new(Vec::<String>::new(), DEFAULT_VNODES);
        assert!(ring.is_empty());
        assert!(ring.preference_list("a", 3).is_empty());
        assert!(ring.owners("a", 3).is_empty());
        assert_eq!(ring.primary("a"), None);
    }

    #[test]
    fn nodes_are_normalized_sorted_and_distinct() {
        let ring = Ring::new(["http://b:1/", " http://a:1", "http://b:1", ""], 4);
        assert_eq!(ring.nodes(), ["http://a:1", "http://b:1"]);
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.position("http://b:1/"), Some(1));
        assert_eq!(ring.position("http://c:1"), None);
    }

    #[test]
    fn zero_vnodes_still_places_every_node() {
        let ring = Ring::new(urls(3), 0);
        assert_eq!(ring.vnodes(), 1);
        assert_eq!(ring.preference_list("k", 3).len(), 3);
    }

    #[test]
    fn primary_is_head_of_preference_list() {
        let ring = Ring::new(urls(5), DEFAULT_VNODES);
        for key in keys().take(2_000) {
            let owners = ring.owners(&key, 3);
            assert_eq!(owners.len(), 3);
            assert_eq!(ring.primary(&key), owners.first().copied());
        }
    }

    #[test]
    fn large_replication_uses_bitmap_and_stays_distinct() {
        let ring = Ring::new(urls(20), 16);
        let mut list = ring.preference_list("some/key", 50);
        assert_eq!(list.len(), 20);
        list.sort_unstable();
        list.dedup();
        assert_eq!(list.len(), 20);
    }

    #[test]
    fn three_nodes_share_keys_evenly() {
        let ring = Ring::new(urls(3), DEFAULT_VNODES);
        let mut counts = [0usize; 3];
        for key in keys() {
            counts[ring.preference_list(&key, 1)[0]] += 1;
        }
        for count in counts {
            let share = count as f64 / KEYS as f64;
            assert!((share - 1.0 / 3.0).abs() < 0.05, "shares {counts:?}");
        }
    }

    #[test]
    fn join_moves_about_a_quarter_and_leave_restores() {
        let three = Ring::new(urls(3), DEFAULT_VNODES);
        let four = Ring::new(urls(4), DEFAULT_VNODES);
        let moved = moved_fraction(&three, &four);
        assert!(moved <= 0.30, "moved {moved}");
        assert!(moved >= 0.20, "moved {moved}");
        for key in keys().take(10_000) {
            if three.primary(&key) != four.primary(&key) {
                assert_eq!(four.primary(&key), Some("http://127.0.0.1:8004"));
            }
        }
        let back = Ring::new(urls(3), DEFAULT_VNODES);
        assert_eq!(back, three);
        assert_eq!(moved_fraction(&three, &back), 0.0);
    }

    #[test]
    fn fifth_node_moves_about_a_fifth() {
        let four = Ring::new(urls(4), DEFAULT_VNODES);
        let five = Ring::new(urls(5), DEFAULT_VNODES);
        let moved = moved_fraction(&four, &five);
        assert!((0.15..=0.25).contains(&moved), "moved {moved}");
    }

    #[test]
    fn every_key_of_an_arc_has_the_arcs_preference_list() {
        let ring = Ring::new(urls(5), 16);
        assert_eq!(ring.arc_count(), 80);
        for key in keys().take(2_000) {
            let arc = ring.arc_of(hash_key(key.as_bytes()));
            for n in [1, 3, 5, 9] {
                assert_eq!(ring.arc_preference(arc, n), ring.preference_list(&key, n));
            }
        }
        assert!(ring.arc_preference(80, 3).is_empty(), "no such arc");
        let empty = Ring::new(Vec::<String>::new(), 16);
        assert_eq!((empty.arc_count(), empty.arc_of(7)), (0, 0));
        assert!(empty.arc_preference(0, 3).is_empty());
    }
}
