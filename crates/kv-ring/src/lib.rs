//! Consistent hashing for kv: which nodes hold a key.
//!
//! Pure functions only (no I/O, no async), so the load balancer and every node compute the
//! same preference list for a key from the same node set.
//!
//! # Layout
//! - [`ring`]: [`Ring`], virtual-node points and preference lists; [`hash_key`];
//!   [`DEFAULT_VNODES`] and why it was chosen.

pub mod ring;

pub use ring::{hash_key, normalize_node, Ring, DEFAULT_VNODES};
