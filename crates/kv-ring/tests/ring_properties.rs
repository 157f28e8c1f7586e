//! Property tests of the ring: distinct owners, order independence, minimal movement on a join.

use std::collections::BTreeSet;

use kv_ring::Ring;
use proptest::prelude::*;

/// Vnodes kept small so each case builds its rings quickly; the properties hold at any count.
const VNODES: usize = 32;

fn node_set() -> impl Strategy<Value = Vec<String>> {
    prop::collection::btree_set(1u16..2000, 1..12).prop_map(|ports| {
        ports
            .into_iter()
            .map(|port| format!("http://10.0.0.1:{port}"))
            .collect()
    })
}

proptest! {
    #[test]
    fn owners_are_distinct_and_min_n_nodes(
        nodes in node_set(),
        key in ".{0,40}",
        n in 0usize..15,
    ) {
        let ring = Ring::new(&nodes, VNODES);
        let list = ring.preference_list(&key, n);
        prop_assert_eq!(list.len(), n.min(nodes.len()));
        let distinct: BTreeSet<_> = list.iter().collect();
        prop_assert_eq!(distinct.len(), list.len());
        prop_assert!(list.iter().all(|&i| i < ring.len()));
        prop_assert_eq!(ring.primary(&key), ring.owners(&key, 1).first().copied());
    }

    #[test]
    fn ring_depends_only_on_the_node_set(
        nodes in node_set(),
        seed in any::<u64>(),
        keys in prop::collection::vec(".{1,20}", 1..20),
    ) {
        let mut shuffled = nodes.clone();
        // Rotate and duplicate: same set, different order and multiplicity.
        let rotation = (seed as usize) % shuffled.len();
        shuffled.rotate_left(rotation);
        shuffled.push(nodes[0].clone());
        let a = Ring::new(&nodes, VNODES);
        let b = Ring::new(shuffled.iter().rev(), VNODES);
        prop_assert_eq!(&a, &b);
        for key in &keys {
            prop_assert_eq!(a.owners(key, 3), b.owners(key, 3));
        }
    }

    #[test]
    fn a_join_only_moves_keys_to_the_new_node_and_a_leave_restores(
        nodes in node_set(),
        new_port in 2000u16..3000,
        keys in prop::collection::vec(".{1,20}", 1..50),
    ) {
        let before = Ring::new(&nodes, VNODES);
        let new_node = format!("http://10.0.0.1:{new_port}");
        let after = Ring::new(nodes.iter().chain([&new_node]), VNODES);
        for key in &keys {
            let (old, new) = (before.primary(key), after.primary(key));
            prop_assert!(old == new || new == Some(new_node.as_str()));
        }
        let restored = Ring::new(after.nodes().iter().filter(|n| **n != new_node), VNODES);
        prop_assert_eq!(restored, before);
    }
}
