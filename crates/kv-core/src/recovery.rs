//! Start-up recovery: load `snapshot.db`, then replay the WAL segments after it, last writer wins.
//! Cuts a torn tail off the newest segment with a warning; stops on any other damage. What it
//! replays is made durable (each replayed segment and the folder fsynced) before the store takes
//! writes: records written but never fsynced before a crash must not become the base that later,
//! acknowledged writes count on, only to vanish at the next power cut.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use tracing::{info, warn};

use crate::batch::{self, BatchRead};
use crate::frame::{self, FrameRead};
use crate::map::ShardedMap;
use crate::vfs::{Vfs, VfsFile};
use crate::{backup, segment, snapshot, Clock, Error, Record, Version};

/// What recovery found.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// Number for the segment the writer creates next.
    pub next_segment: u64,
    /// Bytes in the segments kept.
    pub wal_bytes: u64,
    /// When the loaded snapshot was written.
    pub last_snapshot: Option<SystemTime>,
    /// Segments fsynced after replay (every segment kept).
    pub synced_segments: u64,
}

/// Rebuilds `map` and `clock` from the files in `dir`.
pub(crate) fn recover(
    vfs: &impl Vfs,
    dir: &Path,
    map: &ShardedMap,
    clock: &Clock,
) -> Result<Recovered, Error> {
    let started = Instant::now();
    let apply = |r: Record| {
        clock.observe(r.version);
        map.apply(&r);
    };
    remove_stale_tmp(vfs, dir)?;
    let snapshot_path = dir.join(snapshot::FILE_NAME);
    let meta = if vfs.exists(&snapshot_path) {
        Some(snapshot::load(vfs, &snapshot_path, apply)?)
    } else {
        None
    };
    if let Some(meta) = &meta {
        clock.observe(Version {
            hlc: meta.clock_hlc,
            node: 0,
        });
    }
    let start = meta.as_ref().map_or(1, |m| m.start_segment);
    let segments = live_segments(vfs, dir, start)?;
    let mut wal_bytes = 0;
    let mut replayed = 0;
    let mut last_kept = None;
    for (i, (number, path)) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        // A torn tail is possible in the newest segment holding records: later segments that
        // hold only their header may be left over from a rotation that failed (its file's
        // removal not yet durable) while appends went on in this one.
        let later_empty = segments[i + 1..]
            .iter()
            .all(|(_, p)| vfs.len(p).is_ok_and(|n| n <= segment::HEADER_LEN as u64));
        let tail = Tail::new(is_last, later_empty);
        if let Some(kept) = replay_segment(vfs, path, *number, tail, apply)? {
            wal_bytes += kept.bytes;
            replayed += kept.records;
            last_kept = Some(*number);
        }
    }
    let next_segment = last_kept.map_or(start, |n| n + 1).max(start);
    let synced_segments = sync_replayed(vfs, dir, &segments)?;
    info!(
        dir = %dir.display(),
        snapshot_entries = meta.as_ref().map_or(0, |m| m.records),
        wal_records = replayed,
        segments = segments.len(),
        keys = map.counts().live,
        duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "recovered"
    );
    Ok(Recovered {
        next_segment,
        wal_bytes,
        last_snapshot: meta.as_ref().map(snapshot::created_at),
        synced_segments,
    })
}

/// Fsyncs every segment still present after replay, then the folder (removals and cuts made by
/// recovery included). Returns how many segments were synced.
fn sync_replayed(vfs: &impl Vfs, dir: &Path, segments: &[(u64, PathBuf)]) -> Result<u64, Error> {
    let mut synced = 0;
    for (_, path) in segments {
        // The newest segment may have been removed (its creation was interrupted).
        if !vfs.exists(path) {
            continue;
        }
        vfs.open_read(path)
            .and_then(|f| f.sync_all())
            .map_err(Error::io("fsync replayed segment", path))?;
        synced += 1;
    }
    segment::sync_dir(vfs, dir)?;
    Ok(synced)
}

fn remove_stale_tmp(vfs: &impl Vfs, dir: &Path) -> Result<(), Error> {
    backup::remove_stale(vfs, dir)?;
    let tmp = dir.join(snapshot::TMP_FILE_NAME);
    if vfs.exists(&tmp) {
        info!(path = %tmp.display(), "removing a snapshot left unfinished by a crash");
        vfs.remove(&tmp).map_err(Error::io("remove", &tmp))?;
    }
    Ok(())
}

/// The segments replay must read, in order. Segments before `start` are covered by the
/// snapshot (a crash stopped the checkpoint before it removed them) and are removed now.
fn live_segments(vfs: &impl Vfs, dir: &Path, start: u64) -> Result<Vec<(u64, PathBuf)>, Error> {
    let all = segment::list(vfs, dir)?;
    if all.iter().any(|(n, _)| *n < start) {
        info!(
            before = start,
            "removing WAL segments already covered by the snapshot"
        );
        segment::remove_before(vfs, dir, start)?;
    }
    let live: Vec<_> = all.into_iter().filter(|(n, _)| *n >= start).collect();
    for (expected, (number, path)) in (start..).zip(&live) {
        if *number != expected {
            return Err(Error::Corrupt {
                path: segment::path(dir, expected),
                offset: 0,
                reason: format!(
                    "WAL segment {expected} is missing but {} exists",
                    path.display()
                ),
            });
        }
    }
    Ok(live)
}

/// Records and bytes of a replayed segment.
struct Kept {
    records: u64,
    bytes: u64,
}

/// Replays one segment into `apply`. Returns `None` if it was the newest segment and held not
/// even a whole header (a crash while creating it), in which case it was removed.
fn replay_segment(
    vfs: &impl Vfs,
    path: &Path,
    number: u64,
    tail: Tail,
    mut apply: impl FnMut(Record),
) -> Result<Option<Kept>, Error> {
    let buf = vfs.read(path).map_err(Error::io("read", path))?;
    if tail == Tail::Last
        && buf.len() <= segment::HEADER_LEN
        && segment::check_header(path, &buf, number).is_err()
    {
        warn!(path = %path.display(), bytes = buf.len(), "removing a WAL segment whose creation was interrupted");
        vfs.remove(path).map_err(Error::io("remove", path))?;
        return Ok(None);
    }
    let head = segment::check_header(path, &buf, number)?;
    let corrupt = |offset: usize, reason: String| Error::Corrupt {
        path: path.to_owned(),
        offset: offset as u64,
        reason,
    };
    let mut records = 0;
    let mut decode = |payload: &[u8], offset: usize| {
        apply(Record::decode(payload).map_err(|e| corrupt(offset, e.to_string()))?);
        records += 1;
        Ok(())
    };
    let end = if head.version == segment::FORMAT_V1 {
        replay_frames(&buf, head.len, &mut decode)
    } else {
        replay_batches(path, &buf, head, &mut decode)?
    };
    match end {
        Ok(()) => Ok(Some(Kept {
            records,
            bytes: buf.len() as u64,
        })),
        Err(End::Torn { offset }) if tail != Tail::Sealed => {
            cut_torn_tail(vfs, path, offset, buf.len())?;
            Ok(Some(Kept {
                records,
                bytes: offset as u64,
            }))
        }
        Err(End::Torn { offset }) => Err(corrupt(
            offset,
            "incomplete record in a WAL segment that is not the newest".into(),
        )),
        Err(End::Corrupt { offset, reason }) => Err(corrupt(offset, reason)),
        Err(End::Decode(e)) => Err(e),
    }
}

/// Where a segment stands, for the torn-tail rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tail {
    /// The newest segment: a torn tail is cut; a half-made header means a creation a crash
    /// interrupted (the file is removed).
    Last,
    /// Only header-only segments follow (a failed rotation's leftovers): a torn tail is cut.
    NewestWithRecords,
    /// Later segments hold records, so this one was fsynced whole: a torn tail is corruption.
    Sealed,
}

impl Tail {
    fn new(is_last: bool, later_empty: bool) -> Tail {
        match (is_last, later_empty) {
            (true, _) => Tail::Last,
            (false, true) => Tail::NewestWithRecords,
            (false, false) => Tail::Sealed,
        }
    }
}

/// How reading a segment stopped short of its end.
enum End {
    Torn { offset: usize },
    Corrupt { offset: usize, reason: String },
    Decode(Error),
}

/// Format version 1: frames from `offset` to the end; the frame-level torn-tail rule.
fn replay_frames(
    buf: &[u8],
    mut offset: usize,
    decode: &mut impl FnMut(&[u8], usize) -> Result<(), Error>,
) -> Result<(), End> {
    loop {
        match frame::read(buf, offset) {
            FrameRead::Complete(payload, next) => {
                decode(payload, offset).map_err(End::Decode)?;
                offset = next;
            }
            FrameRead::End => return Ok(()),
            FrameRead::TornTail { offset } => return Err(End::Torn { offset }),
            FrameRead::Corrupt { offset, reason } => return Err(End::Corrupt { offset, reason }),
        }
    }
}

/// Format version 2: batches after the header; the batch-level rule (see [`crate::batch`]).
/// The outer error is a bad frame inside a valid batch.
fn replay_batches(
    path: &Path,
    buf: &[u8],
    head: segment::SegmentHeader,
    decode: &mut impl FnMut(&[u8], usize) -> Result<(), Error>,
) -> Result<Result<(), End>, Error> {
    let mut offset = head.len;
    loop {
        match batch::read(buf, offset, head.salt) {
            BatchRead::Complete(body, next) => {
                batch::frames(path, body, offset + batch::BATCH_HEADER_LEN, &mut *decode)?;
                offset = next;
            }
            BatchRead::End => return Ok(Ok(())),
            BatchRead::TornTail { offset } => return Ok(Err(End::Torn { offset })),
            BatchRead::Corrupt { offset, reason } => {
                return Ok(Err(End::Corrupt { offset, reason }))
            }
        }
    }
}

/// Truncates a segment at the start of its torn tail, durably.
fn cut_torn_tail(vfs: &impl Vfs, path: &Path, offset: usize, len: usize) -> Result<(), Error> {
    warn!(
        path = %path.display(),
        offset,
        bytes_cut = len - offset,
        "cutting torn WAL tail (a crash interrupted an append that was never acknowledged)"
    );
    let file = vfs.open_write(path).map_err(Error::io("open", path))?;
    file.set_len(offset as u64)
        .map_err(Error::io("truncate", path))?;
    file.sync_all().map_err(Error::io("fsync", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::OsFs;
    use bytes::Bytes;
    use std::fs::{self, OpenOptions};

    /// A segment in the current format, one batch per record, as `SYNC=always` writes them.
    fn segment_with(dir: &Path, number: u64, records: &[Record]) -> PathBuf {
        let (_, salt) = segment::create(&OsFs, dir, number).unwrap();
        let path = segment::path(dir, number);
        let mut bytes = fs::read(&path).unwrap();
        for r in records {
            let durable = bytes.len() as u64;
            let start = batch::begin(&mut bytes);
            frame::append(&mut bytes, |b| r.encode(b)).unwrap();
            batch::seal(&mut bytes, start, salt, durable);
        }
        fs::write(&path, bytes).unwrap();
        path
    }

    /// A segment in format version 1 (frames, no batches), as older programs wrote it.
    fn v1_segment_with(dir: &Path, number: u64, records: &[Record]) -> PathBuf {
        let path = segment::path(dir, number);
        let mut bytes = segment::v1_header(number).to_vec();
        for r in records {
            frame::append(&mut bytes, |b| r.encode(b)).unwrap();
        }
        fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn version_1_segments_are_replayed_and_their_torn_tail_cut() {
        let dir = tempfile::tempdir().unwrap();
        v1_segment_with(dir.path(), 1, &[rec("a", 10), rec("b", 11)]);
        let last = v1_segment_with(dir.path(), 2, &[rec("a", 12), rec("c", 13)]);
        let len = fs::metadata(&last).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&last)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        let map = ShardedMap::default();
        let got = recover(&OsFs, dir.path(), &map, &Clock::new(1)).unwrap();
        assert_eq!(got.next_segment, 3);
        assert_eq!(map.get("a").unwrap().version.hlc, 12);
        assert!(map.get("b").is_some());
        assert!(map.get("c").is_none(), "the torn record is cut");
        assert!(fs::metadata(&last).unwrap().len() < len - 2);
    }

    #[test]
    fn a_key_holding_a_valid_frame_does_not_turn_a_torn_batch_into_corruption() {
        // The key of the last record is the bytes of a whole, valid frame of another record
        // (one whose bytes happen to be ASCII, so that they make a key).
        let key = (1..10_000)
            .find_map(|hlc| {
                let mut lookalike = Vec::new();
                frame::append(&mut lookalike, |b| rec("inner", hlc).encode(b)).unwrap();
                String::from_utf8(lookalike).ok().filter(|k| k.is_ascii())
            })
            .unwrap();
        let mut inner = Vec::new();
        frame::append(&mut inner, |b| rec(&key, 98).encode(b)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = segment_with(dir.path(), 1, &[rec("a", 10), rec(&key, 11)]);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - batch::BATCH_HEADER_LEN - inner.len();
        // A power cut lost the page holding the last batch's header, not the ones after it.
        bytes[last..last + batch::BATCH_HEADER_LEN].fill(0);
        fs::write(&path, &bytes).unwrap();
        let frame_inside = (last + 1..bytes.len())
            .any(|at| matches!(frame::read(&bytes, at), FrameRead::Complete(..)));
        assert!(
            frame_inside,
            "the torn batch holds a valid frame (format 1 would refuse)"
        );
        let map = ShardedMap::default();
        recover(&OsFs, dir.path(), &map, &Clock::new(1)).unwrap();
        assert!(map.get("a").is_some());
        assert!(map.get(&key).is_none(), "the torn batch is cut");
        assert_eq!(fs::metadata(&path).unwrap().len(), last as u64);
    }

    #[test]
    fn damage_in_an_earlier_batch_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_with(dir.path(), 1, &[rec("a", 10), rec("b", 11), rec("c", 12)]);
        let mut bytes = fs::read(&path).unwrap();
        // Three batches of equal length; flip a byte inside the second.
        let second = segment::HEADER_LEN + (bytes.len() - segment::HEADER_LEN) / 3;
        bytes[second + 30] ^= 0x20;
        fs::write(&path, &bytes).unwrap();
        match recover(&OsFs, dir.path(), &ShardedMap::default(), &Clock::new(1)) {
            Err(Error::Corrupt {
                path: p,
                offset,
                reason,
            }) => {
                assert_eq!((p, offset), (path, second as u64), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    fn rec(key: &str, hlc: u64) -> Record {
        Record {
            key: key.into(),
            version: Version { hlc, node: 1 },
            value: Some(Bytes::from_static(b"v")),
            expires_at_ms: None,
        }
    }

    #[test]
    fn empty_folder_starts_at_segment_one() {
        let dir = tempfile::tempdir().unwrap();
        let got = recover(&OsFs, dir.path(), &ShardedMap::default(), &Clock::new(1)).unwrap();
        assert_eq!(
            (got.next_segment, got.wal_bytes, got.last_snapshot),
            (1, 0, None)
        );
    }

    #[test]
    fn replays_in_order_and_restores_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        segment_with(dir.path(), 1, &[rec("a", 10), rec("b", 11)]);
        segment_with(dir.path(), 2, &[rec("a", 12)]);
        let (map, clock) = (ShardedMap::default(), Clock::new(1));
        let got = recover(&OsFs, dir.path(), &map, &clock).unwrap();
        assert_eq!(got.next_segment, 3);
        assert_eq!(got.synced_segments, 2, "both replayed segments are fsynced");
        assert_eq!(map.get("a").unwrap().version.hlc, 12);
        assert!(clock.last_hlc() >= 12);
    }

    #[test]
    fn leftovers_of_a_crash_are_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        segment_with(dir.path(), 1, &[rec("a", 10)]);
        fs::write(dir.path().join(snapshot::TMP_FILE_NAME), b"half a snapshot").unwrap();
        // The newest segment's creation was interrupted: a partial header only.
        fs::write(segment::path(dir.path(), 2), b"KVWAL").unwrap();
        let map = ShardedMap::default();
        let got = recover(&OsFs, dir.path(), &map, &Clock::new(1)).unwrap();
        assert_eq!(got.next_segment, 2);
        assert_eq!(
            got.synced_segments, 1,
            "the removed half-made segment is not synced"
        );
        assert!(!dir.path().join(snapshot::TMP_FILE_NAME).exists());
        assert!(!segment::path(dir.path(), 2).exists());
        assert!(map.get("a").is_some());
    }

    /// Found by the crash simulation (seed 17819626002198564837): a rotation whose folder fsync
    /// failed removed the new segment, appends went on in the old one, and a power cut brought
    /// the header-only segment back (its removal was not durable) and tore the old one's tail.
    #[test]
    fn torn_tail_before_header_only_segments_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let first = segment_with(dir.path(), 1, &[rec("a", 10), rec("b", 11)]);
        let intact = fs::metadata(&first).unwrap().len();
        let mut bytes = fs::read(&first).unwrap();
        bytes.extend_from_slice(&[0x17; 30]);
        fs::write(&first, bytes).unwrap();
        drop(segment::create(&OsFs, dir.path(), 2).unwrap());
        drop(segment::create(&OsFs, dir.path(), 3).unwrap());
        let map = ShardedMap::default();
        let got = recover(&OsFs, dir.path(), &map, &Clock::new(1)).unwrap();
        assert_eq!(got.next_segment, 4);
        assert!(map.get("b").is_some());
        assert_eq!(fs::metadata(&first).unwrap().len(), intact, "torn tail cut");
        // With records after it, the same tail is corruption.
        let mut bytes = fs::read(&first).unwrap();
        bytes.extend_from_slice(&[0x17; 30]);
        fs::write(&first, bytes).unwrap();
        segment_with(dir.path(), 4, &[rec("c", 12)]);
        let err = recover(&OsFs, dir.path(), &ShardedMap::default(), &Clock::new(1)).unwrap_err();
        assert!(matches!(err, Error::Corrupt { path, .. } if path == first));
    }

    #[test]
    fn torn_tail_in_an_older_segment_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let first = segment_with(dir.path(), 1, &[rec("a", 10), rec("b", 11)]);
        segment_with(dir.path(), 2, &[rec("c", 12)]);
        let len = fs::metadata(&first).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&first)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let err = recover(&OsFs, dir.path(), &ShardedMap::default(), &Clock::new(1)).unwrap_err();
        assert!(matches!(err, Error::Corrupt { path, .. } if path == first));
    }
}
