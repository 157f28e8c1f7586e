//! Start-up recovery: load `snapshot.db`, or its spare `snapshot.prev.db` when it is damaged or
//! missing, then replay the WAL segments after it, last writer wins. A snapshot or segment that
//! carries another data folder's id is refused before anything is read or changed. Cuts a torn
//! tail off the newest segment with a warning; stops on any other damage. Deletes no segment
//! (the next checkpoint does, once a verified snapshot covers it). What it replays is made
//! durable (each replayed segment and the folder fsynced) before the store takes writes:
//! records written but never fsynced before a crash must not become the base that later,
//! acknowledged writes count on, only to vanish at the next power cut.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use tracing::{error, info, warn};

use crate::batch::{self, BatchRead};
use crate::frame::{self, FrameRead};
use crate::identity::DirId;
use crate::map::ShardedMap;
use crate::snapshot::SnapshotMeta;
use crate::vfs::{Vfs, VfsFile};
use crate::{backup, segment, snapshot, Clock, Error, Record, Version};

/// What recovery found.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// Number for the segment the writer creates next.
    pub next_segment: u64,
    /// Bytes in the segments replayed.
    pub wal_bytes: u64,
    /// The first segment replayed (the loaded snapshot's first segment, or 1).
    pub replay_start: u64,
    /// When the loaded snapshot was written.
    pub last_snapshot: Option<SystemTime>,
    /// Segments fsynced after replay (every segment replayed).
    pub synced_segments: u64,
    /// True when the spare was loaded because `snapshot.db` was damaged or missing.
    pub used_spare: bool,
}

/// The data folder's id as recovery checks it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FolderId {
    /// The id files must carry (the folder's, or the one it gets if it has none yet).
    pub id: DirId,
    /// False when the folder has no `IDENTITY` file yet.
    pub stored: bool,
}

/// Rebuilds `map` and `clock` from the files in `dir`.
pub(crate) fn recover(
    vfs: &impl Vfs,
    dir: &Path,
    folder: FolderId,
    map: &ShardedMap,
    clock: &Clock,
) -> Result<Recovered, Error> {
    let started = Instant::now();
    let apply = |r: Record| {
        clock.observe(r.version);
        map.apply(&r);
    };
    refuse_foreign(vfs, dir, folder)?;
    remove_stale_tmp(vfs, dir)?;
    let base = load_base(vfs, dir, map, &apply)?;
    if let Some(meta) = &base.meta {
        clock.observe(Version {
            hlc: meta.clock_hlc,
            node: 0,
        });
    }
    let start = base.meta.as_ref().map_or(1, |m| m.start_segment);
    let segments = match (live_segments(vfs, dir, start), base.damaged) {
        (Ok(segments), None) => segments,
        (Ok(segments), Some(damaged)) => {
            set_damaged_aside(vfs, dir, &damaged)?;
            segments
        }
        (Err(e), None) => return Err(e),
        (Err(e), Some(damaged)) => return Err(no_stand_in(damaged, &e.to_string())),
    };
    let mut wal_bytes = 0;
    let mut replayed = 0;
    let mut last_kept = None;
    // A torn tail is possible in the newest segment holding records: later segments that hold
    // no record (only their header, and zeros or a recycled segment's old bytes after it) may be
    // left over from a rotation that failed (its file's removal not yet durable) while appends
    // went on in this one. Worked out from the newest back, reading as few segments as needed.
    let mut later_empty = vec![true; segments.len()];
    for i in (0..segments.len().saturating_sub(1)).rev() {
        let (n, p) = &segments[i + 1];
        later_empty[i] = later_empty[i + 1] && !segment::holds_records(vfs, p, *n);
    }
    for (i, (number, path)) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        let tail = Tail::new(is_last, later_empty[i]);
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
        snapshot = if base.used_spare { snapshot::SPARE_FILE_NAME } else { snapshot::FILE_NAME },
        snapshot_entries = base.meta.as_ref().map_or(0, |m| m.records),
        wal_records = replayed,
        segments = segments.len(),
        keys = map.counts().live,
        duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "recovered"
    );
    Ok(Recovered {
        next_segment,
        wal_bytes,
        replay_start: start,
        last_snapshot: base.meta.as_ref().map(snapshot::created_at),
        synced_segments,
        used_spare: base.used_spare,
    })
}

/// Refuses the first snapshot or segment whose header names another folder, before anything
/// is changed. Headers that do not read are left to the load and replay, which report them.
fn refuse_foreign(vfs: &impl Vfs, dir: &Path, folder: FolderId) -> Result<(), Error> {
    let snapshots = [snapshot::FILE_NAME, snapshot::SPARE_FILE_NAME]
        .map(|name| dir.join(name))
        .into_iter()
        .filter(|p| vfs.exists(p))
        .map(|p| (snapshot::read_header(vfs, &p).ok().and_then(|h| h.id), p));
    let segments = segment::list(vfs, dir)?
        .into_iter()
        .map(|(n, p)| (segment::read_header(vfs, &p, n).ok().and_then(|h| h.id), p));
    for (id, path) in snapshots.chain(segments) {
        match id {
            Some(id) if id != folder.id => return Err(foreign(path, id, folder)),
            _ => {}
        }
    }
    Ok(())
}

fn foreign(path: PathBuf, file_id: DirId, folder: FolderId) -> Error {
    let reason = if folder.stored {
        format!(
            "but this folder's IDENTITY says {}: the file was copied here from another node's \
             data folder. Move it out of DATA_DIR (to give this node another node's data, \
             restore a backup of that node with `kv-node restore`)",
            folder.id
        )
    } else {
        format!(
            "but this folder has no IDENTITY file (lost or removed?). If the file belongs here, \
             write DATA_DIR/IDENTITY back with the lines `id = {file_id}` and `id_crc32c = \
             {:08x}` (format in the README); otherwise move the file out of DATA_DIR",
            crc32c::crc32c(&file_id.0)
        )
    };
    Error::ForeignFile {
        path,
        file_id: file_id.to_string(),
        reason,
    }
}

/// The snapshot recovery starts from.
struct Base {
    meta: Option<SnapshotMeta>,
    /// Why `snapshot.db` was not used, when it exists but the spare was loaded instead.
    damaged: Option<Error>,
    used_spare: bool,
}

/// Loads `snapshot.db`; when it is damaged, or missing while a spare exists (a crash between
/// the two renames of a checkpoint), loads the spare instead.
fn load_base(
    vfs: &impl Vfs,
    dir: &Path,
    map: &ShardedMap,
    apply: &impl Fn(Record),
) -> Result<Base, Error> {
    let current = dir.join(snapshot::FILE_NAME);
    let spare = dir.join(snapshot::SPARE_FILE_NAME);
    let damaged = if vfs.exists(&current) {
        match snapshot::load(vfs, &current, apply) {
            Ok(meta) => {
                return Ok(Base {
                    meta: Some(meta),
                    damaged: None,
                    used_spare: false,
                })
            }
            Err(e) if vfs.exists(&spare) => Some(e),
            Err(e) => return Err(e),
        }
    } else if vfs.exists(&spare) {
        None
    } else {
        return Ok(Base {
            meta: None,
            damaged: None,
            used_spare: false,
        });
    };
    if let Some(e) = &damaged {
        warn!(error = %e, spare = %spare.display(), "snapshot.db is damaged; trying its spare");
        clear(map);
    }
    match snapshot::load(vfs, &spare, apply) {
        Ok(meta) => Ok(Base {
            meta: Some(meta),
            damaged,
            used_spare: true,
        }),
        Err(spare_error) => Err(match damaged {
            Some(e) => no_stand_in(e, &spare_error.to_string()),
            None => spare_error,
        }),
    }
}

/// Drops what a damaged snapshot loaded before its defect was met.
fn clear(map: &ShardedMap) {
    let mut keys = Vec::new();
    map.scan(|key, _| keys.push(key.to_owned()));
    map.forget(&keys);
}

/// The damaged snapshot's error, saying why the spare cannot stand in for it.
fn no_stand_in(damaged: Error, why: &str) -> Error {
    let note = |reason: String| {
        format!(
            "{reason}; its spare {} cannot stand in: {why}",
            snapshot::SPARE_FILE_NAME
        )
    };
    match damaged {
        Error::Corrupt {
            path,
            offset,
            reason,
        } => Error::Corrupt {
            path,
            offset,
            reason: note(reason),
        },
        Error::BadFormat { path, reason } => Error::BadFormat {
            path,
            reason: note(reason),
        },
        other => {
            error!(
                spare_error = why,
                "the spare snapshot cannot stand in either"
            );
            other
        }
    }
}

/// Renames the damaged `snapshot.db` to `snapshot.damaged.db` (so no checkpoint ever keeps it
/// as a spare), durably, once the spare and the WAL after it are known to replace it.
fn set_damaged_aside(vfs: &impl Vfs, dir: &Path, damaged: &Error) -> Result<(), Error> {
    let current = dir.join(snapshot::FILE_NAME);
    let aside = dir.join(snapshot::DAMAGED_FILE_NAME);
    vfs.rename(&current, &aside)
        .map_err(Error::io("rename the damaged snapshot to", &aside))?;
    segment::sync_dir(vfs, dir)?;
    metrics::counter!("kv_snapshot_fallbacks_total").increment(1);
    warn!(
        error = %damaged,
        kept_as = %aside.display(),
        "snapshot.db is damaged: recovered from the spare snapshot.prev.db and the WAL after it \
         instead (nothing acknowledged is lost)"
    );
    Ok(())
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

/// The segments replay must read, in order: every one from `start` on, with no gap. Older
/// segments are covered by the snapshot; they stay (the spare may need them) until the next
/// checkpoint removes those it no longer needs.
fn live_segments(vfs: &impl Vfs, dir: &Path, start: u64) -> Result<Vec<(u64, PathBuf)>, Error> {
    let live: Vec<_> = segment::list(vfs, dir)?
        .into_iter()
        .filter(|(n, _)| *n >= start)
        .collect();
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
    let end = if head.version == segment::FORMAT_VERSION {
        replay_batches(path, &buf, head, &mut decode)?
    } else {
        replay_frames(&buf, head.len, &mut decode)
    };
    match end {
        Ok(()) => Ok(Some(Kept {
            records,
            bytes: buf.len() as u64,
        })),
        Err(End::Torn { offset }) if tail != Tail::Sealed => {
            cut_torn_tail(vfs, path, offset, &buf)?;
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
    head: segment::Header,
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

/// Truncates a segment at the start of its torn tail, durably. A tail of zeros is the unused
/// part of a preallocated segment, not worth a warning.
fn cut_torn_tail(vfs: &impl Vfs, path: &Path, offset: usize, buf: &[u8]) -> Result<(), Error> {
    let len = buf.len();
    if buf[offset..].iter().all(|b| *b == 0) {
        info!(
            path = %path.display(),
            offset,
            bytes_cut = len - offset,
            "cutting the unused preallocated end of a WAL segment"
        );
    } else {
        warn!(
            path = %path.display(),
            offset,
            bytes_cut = len - offset,
            "cutting torn WAL tail (a crash interrupted an append that was never acknowledged; \
             in a recycled segment, or the old bytes of the segment it reuses)"
        );
    }
    let file = vfs.open_write(path).map_err(Error::io("open", path))?;
    file.set_len(offset as u64)
        .map_err(Error::io("truncate", path))?;
    file.sync_all().map_err(Error::io("fsync", path))
}

#[cfg(test)]
#[path = "recovery_tests.rs"]
mod tests;
