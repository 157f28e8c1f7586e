//! Storage engine of kv.
