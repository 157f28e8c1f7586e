//! `Consistency::parse` (the `w` / `r` query values) on arbitrary text and replica counts: never
//! panics; an accepted level needs 1..=N replicas and prints to a form that parses back the same.
//!
//! The node's own key, query and body parsers (`bins/kv-node/src/api.rs`) live in a binary
//! crate that a fuzz crate cannot import; see docs/TESTING.md for that gap.
#![no_main]

use kv_cluster::Consistency;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let n = usize::from(n % 8);
    if let Ok(level) = Consistency::parse("w", text, n) {
        let needed = level.required(n);
        assert!(
            (1..=n.max(1)).contains(&needed),
            "{level} needs {needed} of {n}"
        );
        let again = Consistency::parse("w", &level.to_string(), n).expect("printed level parses");
        assert_eq!(again, level);
    }
});
