//! The peer wire formats on arbitrary bytes: `peer::decode_batch` (the body of
//! `/internal/replicate`), `peer::decode_keys` (the body of `/internal/entries`) and
//! `peer::decode_entries` (its answer). None panics, and whatever is accepted re-encodes to the
//! same bytes.
#![no_main]

use kv_cluster::peer::{
    decode_batch, decode_entries, decode_keys, encode_batch, encode_entries, encode_keys,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(records) = decode_batch(data) {
        assert_eq!(&encode_batch(&records)[..], data, "batch does not round-trip");
    }
    if let Ok(keys) = decode_keys(data, 1024) {
        assert_eq!(&encode_keys(&keys)[..], data, "key list does not round-trip");
    }
    if let Ok(entries) = decode_entries(data) {
        assert_eq!(&encode_entries(&entries)[..], data, "entry list does not round-trip");
    }
});
