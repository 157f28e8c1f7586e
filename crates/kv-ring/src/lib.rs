//! Consistent hashing ring of kv.
