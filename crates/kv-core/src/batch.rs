//! Batches: the unit of one group commit in a WAL segment of format version 2. Each batch is a
//! header and a body of frames (the frames are as in version 1, see [`crate::frame`]):
//!
//! ```text
//! [body length u32 LE][crc32c of the body u32 LE][durable prefix u64 LE][header crc u32 LE]
//! [body: frames]
//! ```
//!
//! The *durable prefix* is how many bytes of the segment the writer had fsynced when it wrote
//! the batch: a batch written after an fsync vouches that everything before that point was on
//! disk. The header crc is crc32c over the segment's random salt (from its header) and the 16
//! bytes before it, so key or value bytes that mimic a batch (or a frame) cannot pass for one.
//!
//! The torn-versus-corrupt rule: a batch is *bad* when its header is incomplete or fails its
//! crc, its length is 0 or over [`MAX_BATCH_LEN`], its body runs past the end of the file or
//! fails its crc. A bad batch is [`BatchRead::Corrupt`] when some later valid batch says the
//! segment was durable past the bad batch's start: then the damage hit data that had been
//! fsynced (bit rot, a bad sector, an overwrite). Otherwise nothing after it was ever known to be
//! durable, it is the remains of writes a crash interrupted, and it is a
//! [`BatchRead::TornTail`]: cut there. With `SYNC=always` only the last batch can be unsynced, so
//! damage inside the last batch is torn and damage anywhere before it is corruption.

use crate::frame::{self, FrameRead};
use crate::Error;

/// Bytes before each batch body.
pub const BATCH_HEADER_LEN: usize = 20;
/// Longest body a batch may declare. The writer closes a batch once its body passes
/// [`BATCH_SPLIT_BYTES`], so a body is at most that plus one frame.
pub const MAX_BATCH_LEN: usize = 256 * 1024 * 1024;
/// The writer starts a new batch (inside the same write) once a body holds this many bytes.
pub const BATCH_SPLIT_BYTES: usize = 4 * 1024 * 1024;
/// Most body checksum work spent looking for a batch that proves a bad batch was durable. Past
/// it the bad batch is reported as corrupt: refusing to start beats losing data silently.
const SCAN_BUDGET_BYTES: usize = 256 * 1024 * 1024;

/// Result of reading the batch at one offset of a segment held in memory.
#[derive(Debug, PartialEq, Eq)]
pub enum BatchRead<'a> {
    /// A valid batch: its body (frames) and the offset of the next batch.
    Complete(&'a [u8], usize),
    /// The offset is exactly the end of the buffer.
    End,
    /// Writes interrupted by a crash start at `offset`; cut there.
    TornTail {
        /// Where the bad batch starts.
        offset: usize,
    },
    /// A bad batch at `offset` had been made durable: the file is damaged.
    Corrupt {
        /// Where the bad batch starts.
        offset: usize,
        /// What is wrong with it.
        reason: String,
    },
}

fn header_crc(salt: u64, fields: &[u8]) -> u32 {
    crc32c::crc32c_append(salt_seed(salt), fields)
}

/// The crc32c of the salt, where every batch header checksum of the segment starts.
fn salt_seed(salt: u64) -> u32 {
    crc32c::crc32c(&salt.to_le_bytes())
}

/// Starts a batch in `out`: reserves its header, to be filled by [`seal`]. Returns where it starts.
pub fn begin(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; BATCH_HEADER_LEN]);
    start
}

/// Fills the header of the batch that starts at `start` and runs to the end of `out`. A batch
/// with an empty body is removed instead (no frames were added).
pub fn seal(out: &mut Vec<u8>, start: usize, salt: u64, durable: u64) {
    let body_len = out.len() - start - BATCH_HEADER_LEN;
    if body_len == 0 {
        out.truncate(start);
        return;
    }
    // A body is at most BATCH_SPLIT_BYTES plus one frame, far below u32::MAX.
    let len = u32::try_from(body_len).unwrap_or(u32::MAX);
    let body_crc = crc32c::crc32c(&out[start + BATCH_HEADER_LEN..]);
    let head = &mut out[start..start + BATCH_HEADER_LEN];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4..8].copy_from_slice(&body_crc.to_le_bytes());
    head[8..16].copy_from_slice(&durable.to_le_bytes());
    let crc = header_crc(salt, &head[..16]);
    head[16..].copy_from_slice(&crc.to_le_bytes());
}

/// Why a batch is bad.
#[derive(Debug)]
enum Defect {
    ShortHeader,
    BadHeader,
    BadLength(usize),
    PastEnd(usize),
    BadChecksum,
    Vouches(u64),
}

impl std::fmt::Display for Defect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Defect::ShortHeader => write!(f, "incomplete batch header"),
            Defect::BadHeader => write!(f, "batch header checksum mismatch"),
            Defect::BadLength(n) => write!(f, "batch length {n} is 0 or over {MAX_BATCH_LEN}"),
            Defect::PastEnd(n) => write!(f, "batch length {n} runs past the end of the file"),
            Defect::BadChecksum => write!(f, "batch checksum mismatch"),
            Defect::Vouches(n) => write!(f, "batch claims a durable prefix {n} beyond itself"),
        }
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut w = [0; 4];
    w.copy_from_slice(&b[..4]);
    u32::from_le_bytes(w)
}

/// Validates the batch at `offset`: its body, the next offset and its durable prefix. `work`
/// counts the body bytes checksummed.
fn check<'a>(
    buf: &'a [u8],
    offset: usize,
    seed: u32,
    work: &mut usize,
) -> Result<(&'a [u8], usize, u64), Defect> {
    let head = buf
        .get(offset..)
        .and_then(|b| b.first_chunk::<BATCH_HEADER_LEN>())
        .ok_or(Defect::ShortHeader)?;
    if crc32c::crc32c_append(seed, &head[..16]) != le_u32(&head[16..]) {
        return Err(Defect::BadHeader);
    }
    let len = le_u32(&head[..4]) as usize;
    if len == 0 || len > MAX_BATCH_LEN {
        return Err(Defect::BadLength(len));
    }
    let mut long = [0; 8];
    long.copy_from_slice(&head[8..16]);
    let durable = u64::from_le_bytes(long);
    if durable > offset as u64 {
        return Err(Defect::Vouches(durable));
    }
    let start = offset + BATCH_HEADER_LEN;
    let body = buf.get(start..start + len).ok_or(Defect::PastEnd(len))?;
    *work += len;
    if crc32c::crc32c(body) != le_u32(&head[4..8]) {
        return Err(Defect::BadChecksum);
    }
    Ok((body, start + len, durable))
}

/// Reads the batch at `offset` of a segment whose salt is `salt` (see the module docs for the
/// torn-tail rule).
pub fn read(buf: &[u8], offset: usize, salt: u64) -> BatchRead<'_> {
    if offset >= buf.len() {
        return BatchRead::End;
    }
    let mut work = 0;
    match check(buf, offset, salt_seed(salt), &mut work) {
        Ok((body, next, _)) => BatchRead::Complete(body, next),
        Err(defect) => classify(buf, offset, salt, &defect),
    }
}

/// Decides whether the bad batch at `offset` is a torn tail or corruption: corruption when a
/// later valid batch vouches that the segment was durable past `offset`.
fn classify(buf: &[u8], offset: usize, salt: u64, defect: &Defect) -> BatchRead<'static> {
    // A batch starts with its length, never 0: none starts after the last nonzero byte. So the
    // unused (zero) end of a preallocated segment costs no search.
    let Some(last_nonzero) = buf.iter().rposition(|b| *b != 0) else {
        return BatchRead::TornTail { offset };
    };
    let seed = salt_seed(salt);
    let mut work = 0;
    let last = buf.len().saturating_sub(BATCH_HEADER_LEN).min(last_nonzero);
    for candidate in offset + 1..=last {
        if work > SCAN_BUDGET_BYTES {
            return BatchRead::Corrupt {
                offset,
                reason: format!(
                    "{defect}; the {} bytes after it could not be verified to be a torn tail",
                    buf.len() - offset
                ),
            };
        }
        if let Ok((_, _, durable)) = check(buf, candidate, seed, &mut work) {
            if durable > offset as u64 {
                return BatchRead::Corrupt {
                    offset,
                    reason: format!(
                        "{defect}, and the batch at offset {candidate} says the file was fsynced up to offset {durable}"
                    ),
                };
            }
        }
    }
    BatchRead::TornTail { offset }
}

/// Calls `each` with every frame payload of a valid batch body that starts at file offset
/// `body_offset`, and that payload's file offset. A body passed its checksum, so a bad frame in
/// it is corruption (the writer wrote it so): [`Error::Corrupt`] naming `file` and the offset.
pub fn frames(
    file: &std::path::Path,
    body: &[u8],
    body_offset: usize,
    mut each: impl FnMut(&[u8], usize) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut at = 0;
    loop {
        match frame::read(body, at) {
            FrameRead::Complete(payload, next) => {
                each(payload, body_offset + at)?;
                at = next;
            }
            FrameRead::End => return Ok(()),
            FrameRead::TornTail { offset } => {
                return Err(Error::Corrupt {
                    path: file.to_owned(),
                    offset: (body_offset + offset) as u64,
                    reason: "incomplete frame inside a batch whose checksum is valid".into(),
                })
            }
            FrameRead::Corrupt { offset, reason } => {
                return Err(Error::Corrupt {
                    path: file.to_owned(),
                    offset: (body_offset + offset) as u64,
                    reason: format!("{reason} inside a batch whose checksum is valid"),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SALT: u64 = 0x5eed_1234_abcd_0042;
    /// Where batches start in these tests (as after a segment header).
    const BASE: usize = 32;

    /// Batches of frames, each sealed as the writer would with `SyncMode::Always` (each batch
    /// vouches for everything before it). Returns the buffer and each batch's start.
    fn batches(groups: &[Vec<Vec<u8>>]) -> (Vec<u8>, Vec<usize>) {
        let mut out = vec![0xAA; BASE];
        let mut starts = Vec::new();
        for group in groups {
            let durable = out.len() as u64;
            let start = begin(&mut out);
            starts.push(start);
            for payload in group {
                frame::append(&mut out, |b| b.extend_from_slice(payload)).unwrap();
            }
            seal(&mut out, start, SALT, durable);
        }
        (out, starts)
    }

    fn read_all(buf: &[u8]) -> (usize, BatchRead<'_>) {
        let mut offset = BASE;
        let mut count = 0;
        loop {
            match read(buf, offset, SALT) {
                BatchRead::Complete(_, next) => {
                    count += 1;
                    offset = next;
                }
                end => return (count, end),
            }
        }
    }

    fn three() -> Vec<Vec<Vec<u8>>> {
        vec![
            vec![b"one".to_vec(), b"two".to_vec()],
            vec![vec![7; 300]],
            vec![b"last a".to_vec(), vec![9; 5000], b"last c".to_vec()],
        ]
    }

    #[test]
    fn round_trip_and_empty_batches_vanish() {
        let (mut buf, starts) = batches(&three());
        assert_eq!(read_all(&buf), (3, BatchRead::End));
        let len = buf.len();
        let start = begin(&mut buf);
        seal(&mut buf, start, SALT, 0);
        assert_eq!(buf.len(), len, "an empty batch writes nothing");
        let BatchRead::Complete(body, _) = read(&buf, starts[0], SALT) else {
            panic!("first batch unreadable");
        };
        let mut seen = Vec::new();
        frames(std::path::Path::new("x"), body, 0, |p, _| {
            seen.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, three()[0]);
    }

    #[test]
    fn torn_last_batch_is_cut_at_its_start() {
        let (buf, starts) = batches(&three());
        for cut in starts[2] + 1..buf.len() {
            assert_eq!(
                read_all(&buf[..cut]),
                (2, BatchRead::TornTail { offset: starts[2] }),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn hole_inside_the_last_batch_is_cut() {
        // Page-cache write-back out of order: a page of the last batch never reached the disk
        // (zeros) while the pages after it did, frames that are valid on their own included.
        let (buf, starts) = batches(&three());
        for hole in [starts[2], starts[2] + 10, starts[2] + 40, starts[2] + 2000] {
            let mut bad = buf.clone();
            let end = (hole + 1024).min(bad.len() - 20);
            bad[hole..end].fill(0);
            assert_eq!(
                read_all(&bad),
                (2, BatchRead::TornTail { offset: starts[2] }),
                "hole at {hole}"
            );
        }
    }

    #[test]
    fn flipped_byte_in_an_earlier_batch_is_corrupt_at_its_offset() {
        let (buf, starts) = batches(&three());
        for batch in 0..2 {
            for at in starts[batch]..starts[batch + 1] {
                let mut bad = buf.clone();
                bad[at] ^= 0x08;
                let (count, end) = read_all(&bad);
                assert_eq!(count, batch, "flip at {at}");
                assert!(
                    matches!(&end, BatchRead::Corrupt { offset, reason } if *offset == starts[batch] && reason.contains("fsynced")),
                    "flip at {at}: {end:?}"
                );
            }
        }
    }

    #[test]
    fn unsynced_batches_before_the_last_are_torn_not_corrupt() {
        // SYNC=interval: three batches written between two fsyncs, so none vouches for another.
        let mut buf = vec![0xAA; BASE];
        let mut starts = Vec::new();
        for payload in [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()] {
            let start = begin(&mut buf);
            starts.push(start);
            frame::append(&mut buf, |b| b.extend_from_slice(&payload)).unwrap();
            seal(&mut buf, start, SALT, BASE as u64);
        }
        let mut bad = buf.clone();
        bad[starts[1] + 3] ^= 1;
        assert_eq!(
            read_all(&bad),
            (1, BatchRead::TornTail { offset: starts[1] })
        );
    }

    #[test]
    fn keys_that_look_like_frames_or_batches_do_not_confuse_it() {
        // The last batch's payload holds a valid frame and a batch sealed with another salt
        // vouching for everything: a hole in the last batch's header is still a torn tail.
        let mut lookalike = Vec::new();
        frame::append(&mut lookalike, |b| b.extend_from_slice(b"a forged frame")).unwrap();
        let start = begin(&mut lookalike);
        frame::append(&mut lookalike, |b| b.extend_from_slice(b"forged")).unwrap();
        seal(&mut lookalike, start, SALT ^ 1, 0);
        let mut groups = three();
        groups[2] = vec![lookalike];
        let (buf, starts) = batches(&groups);
        let mut bad = buf.clone();
        bad[starts[2]..starts[2] + 4].fill(0);
        assert_eq!(
            read_all(&bad),
            (2, BatchRead::TornTail { offset: starts[2] })
        );
    }

    #[test]
    fn bad_frame_inside_a_valid_body_is_corrupt_with_its_offset() {
        let err = frames(
            std::path::Path::new("seg"),
            &[5, 0, 0, 0, 1, 2],
            100,
            |_, _| Ok(()),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Corrupt { offset: 100, .. }), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_cut_keeps_the_whole_batches_before_it(
            sizes in proptest::collection::vec(1usize..600, 1..6),
            cut_frac in 0.0f64..1.0,
        ) {
            let groups: Vec<Vec<Vec<u8>>> = sizes.iter().map(|n| vec![vec![3; *n]]).collect();
            let (buf, starts) = batches(&groups);
            let cut = BASE + ((buf.len() - BASE) as f64 * cut_frac) as usize;
            let whole = starts.iter().zip(&sizes).filter(|(s, n)| **s + BATCH_HEADER_LEN + 8 + **n <= cut).count();
            let (count, end) = read_all(&buf[..cut]);
            prop_assert_eq!(count, whole);
            let torn_or_end = matches!(end, BatchRead::End | BatchRead::TornTail { .. });
            prop_assert!(torn_or_end);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut offset = 0;
            while let BatchRead::Complete(_, next) = read(&bytes, offset, SALT) {
                offset = next;
            }
        }
    }
}
