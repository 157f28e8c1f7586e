//! `Record::decode` on arbitrary bytes: never panics, and whatever it accepts re-encodes to
//! exactly the same bytes (the encoding has one form per record).
#![no_main]

use kv_core::Record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = Record::decode(data) {
        let mut again = Vec::new();
        record.encode(&mut again);
        assert_eq!(again, data, "decode then encode changed the bytes");
        assert!(
            record.validate().is_ok(),
            "decode accepted a record validate refuses"
        );
    }
});
