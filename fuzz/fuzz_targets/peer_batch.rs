//! `peer::decode_batch` (the body of `/internal/replicate`) on arbitrary bytes: never panics, and
//! an accepted batch re-encodes to the same bytes.
#![no_main]

use kv_cluster::peer::{decode_batch, encode_batch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(records) = decode_batch(data) {
        assert_eq!(
            &encode_batch(&records)[..],
            data,
            "batch does not round-trip"
        );
    }
});
