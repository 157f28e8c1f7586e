//! `Store::open` on a data folder whose only WAL segment is the fuzzed bytes: recovery cuts a
//! torn tail, refuses corruption, and never panics. When it opens, reopening the same folder
//! (after recovery rewrote or cut the tail) must give the same keys: recovery is idempotent.
#![no_main]

use kv_core::{Store, StoreConfig, SyncMode};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

fn open(dir: &std::path::Path) -> Option<BTreeMap<String, Option<Vec<u8>>>> {
    let mut config = StoreConfig::new(dir.to_owned(), 1);
    config.sync = SyncMode::Never;
    let store = Store::open(config).ok()?;
    let mut keys = BTreeMap::new();
    store.scan(|k, e| {
        keys.insert(k.to_owned(), e.value.as_ref().map(|v| v.to_vec()));
    });
    Some(keys)
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("wal-00000001.log"), data).expect("write segment");
    if let Some(first) = open(dir.path()) {
        let second = open(dir.path()).expect("a folder that opened once opens again");
        assert_eq!(first, second, "recovery is not idempotent");
    }
});
