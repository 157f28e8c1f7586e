//! `Store::open` on a data folder whose `snapshot.db` is the fuzzed bytes: recovery either
//! refuses with an error or opens a store; it never panics, hangs or allocates wildly.
//! (The snapshot loader is private to kv-core; `Store::open` is the public way in.)
#![no_main]

use kv_core::{Store, StoreConfig, SyncMode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("snapshot.db"), data).expect("write snapshot");
    let mut config = StoreConfig::new(dir.path().to_owned(), 1);
    config.sync = SyncMode::Never;
    if let Ok(store) = Store::open(config) {
        let status = store.status();
        let mut seen = 0u64;
        store.scan(|_, _| seen += 1);
        assert!(seen as usize <= data.len(), "more entries than bytes");
        drop(status);
    }
});
