//! What a record is (one versioned put or delete of one key) and its byte encoding. No I/O.

use bytes::Bytes;

use crate::{Error, Version};

/// Longest key the format accepts, in bytes (the node enforces its own, smaller limit).
pub const MAX_KEY_LEN: usize = 64 * 1024;
/// Longest value the format accepts, in bytes (the node enforces its own, smaller limit).
pub const MAX_VALUE_LEN: usize = 16 * 1024 * 1024;

/// Kind byte of a put (a key with a value).
const KIND_PUT: u8 = 0;
/// Kind byte of a tombstone (a delete).
const KIND_TOMBSTONE: u8 = 1;
/// Kind bit: an 8-byte expiry follows the key length (2 = put with a TTL; 3 = tombstone of an
/// expired put, which keeps its expiry so that its grace period counts from it).
const KIND_EXPIRES: u8 = 2;
/// Bytes before the key: kind, hlc, node, key length.
const HEADER_LEN: usize = 1 + 8 + 4 + 4;

/// One versioned write of one key: a put, or a delete (tombstone) when `value` is `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The key (UTF-8, at most [`MAX_KEY_LEN`] bytes).
    pub key: String,
    /// The write's version; the greatest version of a key wins.
    pub version: Version,
    /// The value, or `None` for a tombstone.
    pub value: Option<Bytes>,
    /// When the value expires, in Unix milliseconds (`None`: never). An expired value reads as
    /// absent everywhere; a checkpoint turns it into a tombstone.
    pub expires_at_ms: Option<u64>,
}

impl Record {
    /// A put without expiry.
    pub fn put(key: impl Into<String>, version: Version, value: Bytes) -> Record {
        Record {
            key: key.into(),
            version,
            value: Some(value),
            expires_at_ms: None,
        }
    }

    /// A tombstone (delete).
    pub fn tombstone(key: impl Into<String>, version: Version) -> Record {
        Record {
            key: key.into(),
            version,
            value: None,
            expires_at_ms: None,
        }
    }

    /// Checks the format limits, so a record that is accepted can always be written and read back.
    pub fn validate(&self) -> Result<(), Error> {
        if self.key.len() > MAX_KEY_LEN {
            return Err(Error::InvalidRecord {
                reason: format!(
                    "key is {} bytes, the limit is {MAX_KEY_LEN}",
                    self.key.len()
                ),
            });
        }
        match &self.value {
            Some(v) if v.len() > MAX_VALUE_LEN => Err(Error::InvalidRecord {
                reason: format!("value is {} bytes, the limit is {MAX_VALUE_LEN}", v.len()),
            }),
            _ => Ok(()),
        }
    }

    /// Appends the encoded record to `out`.
    ///
    /// Byte layout (all integers little-endian):
    ///
    /// ```text
    /// offset  size  field
    ///      0     1  kind: 0 = put, 1 = tombstone, 2 = put with an expiry,
    ///               3 = tombstone of an expired put (bit 1: an expiry follows)
    ///      1     8  version.hlc
    ///      9     4  version.node
    ///     13     4  key length K (at most MAX_KEY_LEN)
    ///     17     8  kinds 2 and 3 only: expiry, Unix milliseconds (E = 8, else E = 0)
    ///   17+E     K  key, UTF-8
    /// 17+E+K     *  put: the value, up to the end of the payload; tombstone: nothing
    /// ```
    ///
    /// The value needs no length: the frame around the record knows the payload length.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_parts(
            out,
            self.version,
            self.key.as_bytes(),
            self.value.as_deref(),
            self.expires_at_ms,
        );
    }

    /// How many bytes [`Record::encode`] writes for this record (lets senders cap batches in
    /// bytes without encoding twice).
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + if self.expires_at_ms.is_some() { 8 } else { 0 }
            + self.key.len()
            + self.value.as_ref().map_or(0, |v| v.len())
    }

    /// Decodes one record from exactly the bytes [`Record::encode`] produced.
    pub fn decode(buf: &[u8]) -> Result<Record, Error> {
        let (kind, version, expires_at_ms, key, rest) = split_header(buf)?;
        let key = std::str::from_utf8(key)
            .map_err(|e| invalid(format!("key is not UTF-8: {e}")))?
            .to_owned();
        let value = match kind & !KIND_EXPIRES {
            KIND_PUT => Some(Bytes::copy_from_slice(rest)),
            KIND_TOMBSTONE if rest.is_empty() => None,
            KIND_TOMBSTONE => {
                return Err(invalid(format!(
                    "tombstone carries {} stray bytes",
                    rest.len()
                )))
            }
            other => {
                return Err(invalid(format!(
                    "unknown record kind {other} (written by a newer kv?)"
                )))
            }
        };
        if value.as_ref().is_some_and(|v| v.len() > MAX_VALUE_LEN) {
            return Err(invalid(format!(
                "value is over the {MAX_VALUE_LEN}-byte limit"
            )));
        }
        Ok(Record {
            key,
            version,
            value,
            expires_at_ms,
        })
    }
}

/// Encodes a record from borrowed parts (lets the map write snapshots without copying).
pub(crate) fn encode_parts(
    out: &mut Vec<u8>,
    version: Version,
    key: &[u8],
    value: Option<&[u8]>,
    expires_at_ms: Option<u64>,
) {
    out.reserve(HEADER_LEN + 8 + key.len() + value.map_or(0, <[u8]>::len));
    let kind = if value.is_some() {
        KIND_PUT
    } else {
        KIND_TOMBSTONE
    };
    out.push(
        kind | if expires_at_ms.is_some() {
            KIND_EXPIRES
        } else {
            0
        },
    );
    out.extend_from_slice(&version.hlc.to_le_bytes());
    out.extend_from_slice(&version.node.to_le_bytes());
    // ok to truncate: validate() caps keys at MAX_KEY_LEN, far below u32::MAX.
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    if let Some(expiry) = expires_at_ms {
        out.extend_from_slice(&expiry.to_le_bytes());
    }
    out.extend_from_slice(key);
    if let Some(value) = value {
        out.extend_from_slice(value);
    }
}

/// An encoded record split into its parts: kind, version, expiry, key bytes, the rest.
type Parts<'a> = (u8, Version, Option<u64>, &'a [u8], &'a [u8]);

/// Splits an encoded record into its parts.
fn split_header(buf: &[u8]) -> Result<Parts<'_>, Error> {
    let (head, body) = buf.split_first_chunk::<HEADER_LEN>().ok_or_else(|| {
        invalid(format!(
            "{} bytes is shorter than a record header",
            buf.len()
        ))
    })?;
    let [kind, h0, h1, h2, h3, h4, h5, h6, h7, n0, n1, n2, n3, k0, k1, k2, k3] = *head;
    let version = Version {
        hlc: u64::from_le_bytes([h0, h1, h2, h3, h4, h5, h6, h7]),
        node: u32::from_le_bytes([n0, n1, n2, n3]),
    };
    let key_len = u32::from_le_bytes([k0, k1, k2, k3]) as usize;
    let (expires_at_ms, body) = if kind & KIND_EXPIRES != 0 {
        let (expiry, body) = body
            .split_first_chunk::<8>()
            .ok_or_else(|| invalid("record ends inside its expiry".to_owned()))?;
        (Some(u64::from_le_bytes(*expiry)), body)
    } else {
        (None, body)
    };
    if key_len > MAX_KEY_LEN {
        return Err(invalid(format!(
            "key length {key_len} is over the {MAX_KEY_LEN}-byte limit"
        )));
    }
    if key_len > body.len() {
        return Err(invalid(format!(
            "key length {key_len} runs past the record end"
        )));
    }
    let (key, rest) = body.split_at(key_len);
    Ok((kind, version, expires_at_ms, key, rest))
}

fn invalid(reason: String) -> Error {
    Error::InvalidRecord { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(r: &Record) -> Vec<u8> {
        let mut out = Vec::new();
        r.encode(&mut out);
        out
    }

    #[test]
    fn layout_matches_the_documentation() {
        let r = Record {
            key: "ab".into(),
            version: Version {
                hlc: 0x0102,
                node: 0x0304,
            },
            value: Some(Bytes::from_static(b"xyz")),
            expires_at_ms: None,
        };
        let want: Vec<u8> = [
            &[0u8][..],
            &0x0102u64.to_le_bytes(),
            &0x0304u32.to_le_bytes(),
            &2u32.to_le_bytes(),
            b"ab",
            b"xyz",
        ]
        .concat();
        assert_eq!(encoded(&r), want);
    }

    #[test]
    fn empty_value_differs_from_tombstone() {
        let put = Record {
            key: "k".into(),
            version: Version::ZERO,
            value: Some(Bytes::new()),
            expires_at_ms: None,
        };
        let del = Record {
            value: None,
            ..put.clone()
        };
        assert_eq!(Record::decode(&encoded(&put)).unwrap(), put);
        assert_eq!(Record::decode(&encoded(&del)).unwrap(), del);
    }

    #[test]
    fn rejects_unknown_kind_bad_utf8_and_stray_tombstone_bytes() {
        let del = Record {
            key: "k".into(),
            version: Version::ZERO,
            value: None,
            expires_at_ms: None,
        };
        let mut bytes = encoded(&del);
        bytes.push(1);
        assert!(Record::decode(&bytes).is_err());
        bytes.pop();
        bytes[0] = 4;
        assert!(Record::decode(&bytes).is_err());
        bytes[0] = 1;
        bytes[17] = 0xff;
        assert!(Record::decode(&bytes).is_err());
    }

    #[test]
    fn validate_enforces_limits() {
        let long = Record {
            key: "k".repeat(MAX_KEY_LEN + 1),
            version: Version::ZERO,
            value: None,
            expires_at_ms: None,
        };
        assert!(long.validate().is_err());
        let big = Record {
            key: "k".into(),
            version: Version::ZERO,
            value: Some(Bytes::from(vec![0; MAX_VALUE_LEN + 1])),
            expires_at_ms: None,
        };
        assert!(big.validate().is_err());
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            ".{0,40}",
            any::<u64>(),
            any::<u32>(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
        )
            .prop_map(|(key, hlc, node, value)| Record {
                key,
                version: Version { hlc, node },
                value: value.map(Bytes::from),
                expires_at_ms: None,
            })
    }

    proptest! {
        #[test]
        fn round_trip(r in arb_record(), expiry in proptest::option::of(any::<u64>())) {
            let r = Record { expires_at_ms: expiry, ..r };
            prop_assert_eq!(encoded(&r).len(), r.encoded_len());
            prop_assert_eq!(Record::decode(&encoded(&r)).unwrap(), r);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Record::decode(&bytes);
        }

        #[test]
        fn every_truncation_is_rejected_or_shorter(r in arb_record()) {
            let bytes = encoded(&r);
            for cut in 0..bytes.len() {
                if let Ok(d) = Record::decode(&bytes[..cut]) {
                    // Only a put can lose value bytes and still parse; the frame CRC catches that.
                    prop_assert!(d.value.is_some());
                }
            }
        }
    }
}
