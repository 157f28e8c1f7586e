//! Cluster logic of kv.
