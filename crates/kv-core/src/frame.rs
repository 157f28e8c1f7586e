//! Frames: `[len u32 LE][crc32c u32 LE][payload]`, the unit in which WAL and snapshot files store
//! records, and the rule that tells a torn tail (crash mid-append) from corruption.

use crate::Error;

/// Bytes before each payload: length and checksum.
pub const FRAME_HEADER_LEN: usize = 8;
/// Longest payload a frame may declare; longer lengths are garbage and never allocated.
pub const MAX_FRAME_LEN: usize = 64 * 1024 * 1024;
/// Most checksum work spent proving that the bytes after a bad frame hold no valid frame.
/// Past it the bad frame is reported as corrupt: refusing to start beats losing data silently.
const TORN_SCAN_BUDGET_BYTES: usize = 256 * 1024 * 1024;

/// Result of reading the frame at one offset of a buffer (a whole file, usually).
///
/// The rule: a frame is *bad* when its header is incomplete, its length is 0 or over
/// [`MAX_FRAME_LEN`], its payload runs past the end, or its checksum does not match. A bad frame
/// is a [`FrameRead::TornTail`] when no valid frame starts at any later byte offset: everything
/// from it to the end is the remains of an interrupted append. If a valid frame does follow, the
/// damage is in the middle of the data and the result is [`FrameRead::Corrupt`]: never skipped.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameRead<'a> {
    /// A valid frame: its payload and the offset of the next frame.
    Complete(&'a [u8], usize),
    /// The offset is exactly the end of the buffer.
    End,
    /// The buffer ends in an interrupted append starting at `offset`; cut it there.
    TornTail {
        /// Where the torn frame starts.
        offset: usize,
    },
    /// A bad frame at `offset` is followed by valid data.
    Corrupt {
        /// Where the bad frame starts.
        offset: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// The checksum stored in a frame: crc32c over the length bytes, then the payload, so a damaged
/// length is caught as surely as a damaged payload.
pub(crate) fn checksum(len_bytes: [u8; 4], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload)
}

/// Appends one frame to `out`, with the payload written by `encode` (no intermediate buffer).
/// An empty or over-long payload is refused and `out` is left as it was.
pub fn append(out: &mut Vec<u8>, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(), Error> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    encode(out);
    let len = out.len() - start - FRAME_HEADER_LEN;
    let len_bytes = match u32::try_from(len) {
        Ok(n) if len > 0 && len <= MAX_FRAME_LEN => n.to_le_bytes(),
        _ => {
            out.truncate(start);
            return Err(Error::InvalidRecord {
                reason: format!("frame payload of {len} bytes is empty or over {MAX_FRAME_LEN}"),
            });
        }
    };
    let crc = checksum(len_bytes, &out[start + FRAME_HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&len_bytes);
    out[start + 4..start + FRAME_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Why a frame is bad.
#[derive(Debug)]
enum Defect {
    ShortHeader,
    BadLength(usize),
    PastEnd(usize),
    BadChecksum,
}

impl std::fmt::Display for Defect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Defect::ShortHeader => write!(f, "incomplete frame header"),
            Defect::BadLength(n) => write!(f, "frame length {n} is 0 or over {MAX_FRAME_LEN}"),
            Defect::PastEnd(n) => write!(f, "frame length {n} runs past the end of the file"),
            Defect::BadChecksum => write!(f, "frame checksum mismatch"),
        }
    }
}

/// Reads a frame's header at `offset`.
fn header(buf: &[u8], offset: usize) -> Option<([u8; 4], u32)> {
    let head = buf.get(offset..)?.first_chunk::<FRAME_HEADER_LEN>()?;
    let [l0, l1, l2, l3, c0, c1, c2, c3] = *head;
    Some(([l0, l1, l2, l3], u32::from_le_bytes([c0, c1, c2, c3])))
}

/// Validates the frame at `offset`; `work` counts the checksummed bytes.
fn check<'a>(buf: &'a [u8], offset: usize, work: &mut usize) -> Result<(&'a [u8], usize), Defect> {
    let (len_bytes, crc) = header(buf, offset).ok_or(Defect::ShortHeader)?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len == 0 || len > MAX_FRAME_LEN {
        return Err(Defect::BadLength(len));
    }
    let start = offset + FRAME_HEADER_LEN;
    let payload = buf.get(start..start + len).ok_or(Defect::PastEnd(len))?;
    *work += len;
    if checksum(len_bytes, payload) != crc {
        return Err(Defect::BadChecksum);
    }
    Ok((payload, start + len))
}

/// Reads the frame at `offset` (see [`FrameRead`] for the torn-tail rule).
pub fn read(buf: &[u8], offset: usize) -> FrameRead<'_> {
    if offset >= buf.len() {
        return FrameRead::End;
    }
    let mut work = 0;
    match check(buf, offset, &mut work) {
        Ok((payload, next)) => FrameRead::Complete(payload, next),
        Err(defect) => classify_bad_frame(buf, offset, &defect),
    }
}

/// Decides whether the bad frame at `offset` is a torn tail or corruption.
fn classify_bad_frame(buf: &[u8], offset: usize, defect: &Defect) -> FrameRead<'static> {
    let mut work = 0;
    for candidate in offset + 1..buf.len().saturating_sub(FRAME_HEADER_LEN) {
        if work > TORN_SCAN_BUDGET_BYTES {
            return FrameRead::Corrupt {
                offset,
                reason: format!(
                    "{defect}; the {} bytes after it could not be verified to be a torn tail",
                    buf.len() - offset
                ),
            };
        }
        if check(buf, candidate, &mut work).is_ok() {
            return FrameRead::Corrupt {
                offset,
                reason: format!("{defect}, and a valid frame follows at offset {candidate}"),
            };
        }
    }
    FrameRead::TornTail { offset }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framed(payloads: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut starts = Vec::new();
        for p in payloads {
            starts.push(out.len());
            append(&mut out, |b| b.extend_from_slice(p)).unwrap();
        }
        (out, starts)
    }

    /// Reads all frames; returns the payloads and how reading ended.
    fn read_all(buf: &[u8]) -> (Vec<Vec<u8>>, FrameRead<'_>) {
        let mut offset = 0;
        let mut payloads = Vec::new();
        loop {
            match read(buf, offset) {
                FrameRead::Complete(p, next) => {
                    payloads.push(p.to_vec());
                    offset = next;
                }
                end => return (payloads, end),
            }
        }
    }

    fn three() -> Vec<Vec<u8>> {
        vec![
            b"first".to_vec(),
            b"the middle one".to_vec(),
            b"last".to_vec(),
        ]
    }

    #[test]
    fn refuses_empty_payload() {
        let mut out = vec![1, 2];
        assert!(append(&mut out, |_| {}).is_err());
        assert_eq!(out, vec![1, 2]);
    }

    #[test]
    fn truncation_inside_last_frame_is_a_torn_tail() {
        let (buf, starts) = framed(&three());
        for cut in starts[2] + 1..buf.len() {
            let (payloads, end) = read_all(&buf[..cut]);
            assert_eq!(payloads, three()[..2].to_vec(), "cut at {cut}");
            assert_eq!(
                end,
                FrameRead::TornTail { offset: starts[2] },
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn flipped_byte_in_middle_frame_is_corrupt() {
        let (buf, starts) = framed(&three());
        for at in starts[1]..starts[2] {
            let mut bad = buf.clone();
            bad[at] ^= 0x40;
            let (payloads, end) = read_all(&bad);
            assert_eq!(payloads, three()[..1].to_vec(), "flip at {at}");
            assert!(
                matches!(end, FrameRead::Corrupt { offset, .. } if offset == starts[1]),
                "flip at {at}: {end:?}"
            );
        }
    }

    #[test]
    fn flipped_byte_in_last_frame_is_a_torn_tail() {
        let (mut buf, starts) = framed(&three());
        let last = buf.len() - 1;
        buf[last] ^= 1;
        assert_eq!(read_all(&buf).1, FrameRead::TornTail { offset: starts[2] });
    }

    #[test]
    fn zeroed_tail_is_torn_and_huge_length_is_not_allocated() {
        let (mut buf, _) = framed(&three());
        let end = buf.len();
        buf.extend_from_slice(&[0; 100]);
        assert_eq!(read_all(&buf).1, FrameRead::TornTail { offset: end });
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 12]);
        assert_eq!(read(&huge, 0), FrameRead::TornTail { offset: 0 });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn round_trip(payloads in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 1..300), 0..10)) {
            let (buf, _) = framed(&payloads);
            let (read_back, end) = read_all(&buf);
            prop_assert_eq!(read_back, payloads);
            prop_assert_eq!(end, FrameRead::End);
        }

        #[test]
        fn any_truncation_recovers_a_prefix(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 1..6),
            cut_frac in 0.0f64..1.0,
        ) {
            let (buf, starts) = framed(&payloads);
            let cut = (buf.len() as f64 * cut_frac) as usize;
            let (read_back, end) = read_all(&buf[..cut]);
            let whole = starts.iter().zip(&payloads).filter(|(s, p)| *s + 8 + p.len() <= cut).count();
            prop_assert_eq!(&read_back[..], &payloads[..whole]);
            let torn_or_end = matches!(end, FrameRead::End | FrameRead::TornTail { .. });
            prop_assert!(torn_or_end);
        }

        #[test]
        fn any_flipped_byte_is_caught(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 1..6),
            at_frac in 0.0f64..1.0,
            mask in 1u8..,
        ) {
            let (mut buf, _) = framed(&payloads);
            let at = ((buf.len() as f64 * at_frac) as usize).min(buf.len() - 1);
            buf[at] ^= mask;
            let (read_back, end) = read_all(&buf);
            prop_assert!(read_back.len() < payloads.len(), "a flipped byte went unnoticed");
            prop_assert_ne!(end, FrameRead::End);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = read_all(&bytes);
        }
    }
}
