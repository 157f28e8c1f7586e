//! Start-up recovery: load `snapshot.db`, or its spare `snapshot.prev.db` when it is damaged or
//! missing, then replay the WAL segments after it, last writer wins. A snapshot or segment that
//! carries another data folder's id is refused before anything is read or changed. Cuts a torn
//! tail off the newest segment with a warning; stops on any other damage. Deletes no segment
//! (the next checkpoint does, once a verified snapshot covers it). What it replays is made
//! durable (each replayed segment and the folder fsynced) before the store takes writes:
//! records written but never fsynced before a crash must not become the base that later,
//! acknowledged writes count on, only to vanish at the next power cut.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use tracing::{error, info, warn};

use crate::frame::{self, FrameRead};
use crate::identity::DirId;
use crate::map::ShardedMap;
use crate::snapshot::SnapshotMeta;
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
    refuse_foreign(dir, folder)?;
    remove_stale_tmp(dir)?;
    let base = load_base(dir, map, &apply)?;
    if let Some(meta) = &base.meta {
        clock.observe(Version {
            hlc: meta.clock_hlc,
            node: 0,
        });
    }
    let start = base.meta.as_ref().map_or(1, |m| m.start_segment);
    let segments = match (live_segments(dir, start), base.damaged) {
        (Ok(segments), None) => segments,
        (Ok(segments), Some(damaged)) => {
            set_damaged_aside(dir, &damaged)?;
            segments
        }
        (Err(e), None) => return Err(e),
        (Err(e), Some(damaged)) => return Err(no_stand_in(damaged, &e.to_string())),
    };
    let mut wal_bytes = 0;
    let mut replayed = 0;
    let mut last_kept = None;
    for (i, (number, path)) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        if let Some(kept) = replay_segment(path, *number, is_last, apply)? {
            wal_bytes += kept.bytes;
            replayed += kept.records;
            last_kept = Some(*number);
        }
    }
    let next_segment = last_kept.map_or(start, |n| n + 1).max(start);
    let synced_segments = sync_replayed(dir, &segments)?;
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
fn refuse_foreign(dir: &Path, folder: FolderId) -> Result<(), Error> {
    let snapshots = [snapshot::FILE_NAME, snapshot::SPARE_FILE_NAME]
        .map(|name| dir.join(name))
        .into_iter()
        .filter(|p| p.exists())
        .map(|p| (snapshot::read_header(&p).ok().and_then(|h| h.id), p));
    let segments = segment::list(dir)?
        .into_iter()
        .map(|(n, p)| (segment::read_header(&p, n).ok().and_then(|h| h.id), p));
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
fn load_base(dir: &Path, map: &ShardedMap, apply: &impl Fn(Record)) -> Result<Base, Error> {
    let current = dir.join(snapshot::FILE_NAME);
    let spare = dir.join(snapshot::SPARE_FILE_NAME);
    let damaged = if current.exists() {
        match snapshot::load(&current, apply) {
            Ok(meta) => {
                return Ok(Base {
                    meta: Some(meta),
                    damaged: None,
                    used_spare: false,
                })
            }
            Err(e) if spare.exists() => Some(e),
            Err(e) => return Err(e),
        }
    } else if spare.exists() {
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
    match snapshot::load(&spare, apply) {
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
fn set_damaged_aside(dir: &Path, damaged: &Error) -> Result<(), Error> {
    let current = dir.join(snapshot::FILE_NAME);
    let aside = dir.join(snapshot::DAMAGED_FILE_NAME);
    fs::rename(&current, &aside).map_err(Error::io("rename the damaged snapshot to", &aside))?;
    segment::sync_dir(dir)?;
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
fn sync_replayed(dir: &Path, segments: &[(u64, PathBuf)]) -> Result<u64, Error> {
    let mut synced = 0;
    for (_, path) in segments {
        // The newest segment may have been removed (its creation was interrupted).
        if !path.exists() {
            continue;
        }
        fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(Error::io("fsync replayed segment", path))?;
        synced += 1;
    }
    segment::sync_dir(dir)?;
    Ok(synced)
}

fn remove_stale_tmp(dir: &Path) -> Result<(), Error> {
    backup::remove_stale(dir)?;
    let tmp = dir.join(snapshot::TMP_FILE_NAME);
    if tmp.exists() {
        info!(path = %tmp.display(), "removing a snapshot left unfinished by a crash");
        fs::remove_file(&tmp).map_err(Error::io("remove", &tmp))?;
    }
    Ok(())
}

/// The segments replay must read, in order: every one from `start` on, with no gap. Older
/// segments are covered by the snapshot; they stay (the spare may need them) until the next
/// checkpoint removes those it no longer needs.
fn live_segments(dir: &Path, start: u64) -> Result<Vec<(u64, PathBuf)>, Error> {
    let live: Vec<_> = segment::list(dir)?
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
    path: &Path,
    number: u64,
    is_last: bool,
    mut apply: impl FnMut(Record),
) -> Result<Option<Kept>, Error> {
    let buf = fs::read(path).map_err(Error::io("read", path))?;
    if is_last
        && buf.len() <= segment::HEADER_LEN
        && segment::check_header(path, &buf, number).is_err()
    {
        warn!(path = %path.display(), bytes = buf.len(), "removing a WAL segment whose creation was interrupted");
        fs::remove_file(path).map_err(Error::io("remove", path))?;
        return Ok(None);
    }
    let header = segment::check_header(path, &buf, number)?;
    let corrupt = |offset: usize, reason: String| Error::Corrupt {
        path: path.to_owned(),
        offset: offset as u64,
        reason,
    };
    let mut offset = header.len;
    let mut records = 0;
    loop {
        match frame::read(&buf, offset) {
            FrameRead::Complete(payload, next) => {
                apply(Record::decode(payload).map_err(|e| corrupt(offset, e.to_string()))?);
                records += 1;
                offset = next;
            }
            FrameRead::End => break,
            FrameRead::TornTail { offset } if is_last => {
                cut_torn_tail(path, offset, buf.len())?;
                return Ok(Some(Kept {
                    records,
                    bytes: offset as u64,
                }));
            }
            FrameRead::TornTail { offset } => {
                return Err(corrupt(
                    offset,
                    "incomplete record in a WAL segment that is not the newest".into(),
                ))
            }
            FrameRead::Corrupt { offset, reason } => return Err(corrupt(offset, reason)),
        }
    }
    Ok(Some(Kept {
        records,
        bytes: buf.len() as u64,
    }))
}

/// Truncates a segment at the start of its torn tail, durably.
fn cut_torn_tail(path: &Path, offset: usize, len: usize) -> Result<(), Error> {
    warn!(
        path = %path.display(),
        offset,
        bytes_cut = len - offset,
        "cutting torn WAL tail (a crash interrupted an append that was never acknowledged)"
    );
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(Error::io("open", path))?;
    file.set_len(offset as u64)
        .map_err(Error::io("truncate", path))?;
    file.sync_all().map_err(Error::io("fsync", path))
}

#[cfg(test)]
#[path = "recovery_tests.rs"]
mod tests;
