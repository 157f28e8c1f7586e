//! Property tests of the decoders that the fuzz targets also hit (fuzz/), for the ones kv-core's
//! and kv-cluster's own tests leave out: replication batches (`peer::decode_batch`) and the
//! `w`/`r` levels (`Consistency::parse`). Frames and records have theirs next to their code.

use bytes::Bytes;
use kv_cluster::peer::{decode_batch, encode_batch};
use kv_cluster::Consistency;
use kv_core::{Record, Version};
use proptest::prelude::*;

fn arb_record() -> impl Strategy<Value = Record> {
    (
        "[a-z0-9/]{1,20}",
        any::<u64>(),
        any::<u32>(),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(key, hlc, node, value, expires)| Record {
            key,
            version: Version { hlc, node },
            // Only a put can expire.
            expires_at_ms: expires.filter(|_| value.is_some()),
            value: value.map(Bytes::from),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn batches_round_trip(records in proptest::collection::vec(arb_record(), 0..8)) {
        prop_assert_eq!(decode_batch(&encode_batch(&records)).unwrap(), records);
    }

    #[test]
    fn a_cut_or_extended_batch_is_an_error(
        records in proptest::collection::vec(arb_record(), 1..6),
        cut_frac in 0.0f64..1.0,
        extra in proptest::collection::vec(any::<u8>(), 1..8),
    ) {
        let bytes = encode_batch(&records);
        let cut = ((bytes.len() as f64) * cut_frac) as usize;
        prop_assert!(decode_batch(&bytes[..cut]).is_err(), "cut at {} of {}", cut, bytes.len());
        let mut longer = bytes.to_vec();
        longer.extend_from_slice(&extra);
        prop_assert!(decode_batch(&longer).is_err());
    }

    #[test]
    fn garbage_batches_never_panic_and_accepted_ones_reencode(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        if let Ok(records) = decode_batch(&bytes) {
            prop_assert_eq!(&encode_batch(&records)[..], &bytes[..]);
        }
    }

    #[test]
    fn consistency_levels_parse_within_n_and_print_back(text in "\\PC{0,12}", n in 0usize..8) {
        if let Ok(level) = Consistency::parse("w", &text, n) {
            let needed = level.required(n);
            prop_assert!((1..=n.max(1)).contains(&needed));
            prop_assert_eq!(Consistency::parse("w", &level.to_string(), n).unwrap(), level);
        }
    }

    #[test]
    fn numeric_levels_are_accepted_exactly_in_one_to_n(k in 0usize..20, n in 1usize..8) {
        let parsed = Consistency::parse("r", &k.to_string(), n);
        prop_assert_eq!(parsed.is_ok(), (1..=n).contains(&k));
    }
}
