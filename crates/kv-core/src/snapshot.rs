//! `snapshot.db`: the whole map at a checkpoint, and its spare `snapshot.prev.db` (the snapshot
//! before). Written atomically (temp file, fsync, read back and verified, the old one renamed to
//! the spare, rename, fsync of the folder) and loaded at start-up, where any defect is reported
//! with the file and offset (recovery then falls back to the spare).

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::frame::{self, FRAME_HEADER_LEN, MAX_FRAME_LEN};
use crate::identity::DirId;
use crate::map::ShardedMap;
use crate::record::encode_parts;
use crate::vfs::{Vfs, VfsFile};
use crate::{segment, Clock, Error, Record};

/// File name of the snapshot in the data folder.
pub const FILE_NAME: &str = "snapshot.db";
/// File name of the spare: the snapshot before `snapshot.db`, kept (with the WAL segments from
/// its first segment on) so recovery can fall back to it when `snapshot.db` is damaged.
pub const SPARE_FILE_NAME: &str = "snapshot.prev.db";
/// A damaged `snapshot.db` that recovery replaced by its spare is kept under this name for the
/// operator to look at (replacing any older one); nothing reads it.
pub const DAMAGED_FILE_NAME: &str = "snapshot.damaged.db";
/// File name of a snapshot being written.
pub const TMP_FILE_NAME: &str = "snapshot.db.tmp";

const MAGIC: [u8; 8] = *b"KVSNAPSH";
const FOOTER_MAGIC: [u8; 8] = *b"KVSNAPND";
/// The format this program writes; version 1 (no folder id) is still read.
const FORMAT_VERSION: u32 = 2;
/// Bytes of the header this program writes.
pub(crate) const HEADER_LEN: usize = 48;
/// Bytes of a version 1 header.
const V1_HEADER_LEN: usize = 32;
const FOOTER_LEN: usize = 32;

/// Layout of `snapshot.db` (integers little-endian):
///
/// ```text
/// header  [magic "KVSNAPSH" 8][format version u32 = 2][first WAL segment to replay u64]
///         [created, unix ms u64][data folder id 16][crc32c of the 44 bytes before u32]
///         (version 1, still read: the same without the folder id, 32 bytes)
/// body    one frame per entry ([len][crc32c][Record encoding]; tombstones included)
/// footer  [magic "KVSNAPND" 8][entry count u64][clock hlc u64][reserved u32 = 0]
///         [crc32c of the 28 bytes before u32]
/// ```
///
/// The footer proves the file is whole; the clock value keeps versions monotonic across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// WAL replay starts at this segment; older segments are covered by the snapshot.
    pub start_segment: u64,
    /// When the snapshot was written.
    pub created_ms: u64,
    /// Entries in the snapshot.
    pub records: u64,
    /// The clock's value when the snapshot was written.
    pub clock_hlc: u64,
    /// The data folder it was written in; `None` for a version 1 file (it belongs to the folder
    /// that holds it).
    pub id: Option<DirId>,
    /// Bytes of its header (where the first entry starts).
    pub header_len: u64,
}

/// What a snapshot's header says (see [`read_header`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// WAL replay after this snapshot starts at this segment.
    pub start_segment: u64,
    /// When it was written (unix ms).
    pub created_ms: u64,
    /// The data folder it was written in (`None`: version 1).
    pub id: Option<DirId>,
    /// Bytes of the header.
    pub len: u64,
}

/// What [`write_atomic`] wrote.
#[derive(Clone, Copy, Debug)]
pub struct Written {
    pub records: u64,
    pub bytes: u64,
    pub tombstones_dropped: u64,
    /// The creation time in the header (unix ms).
    pub created_ms: u64,
    /// Whether the snapshot it replaced became the spare (false: there was none).
    pub kept_spare: bool,
}

fn with_crc(mut fields: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&fields);
    fields.extend_from_slice(&crc.to_le_bytes());
    fields
}

/// The header of a snapshot written in folder `id` whose WAL replay starts at `start_segment`.
pub(crate) fn header_bytes(start_segment: u64, created_ms: u64, id: DirId) -> Vec<u8> {
    with_crc(
        [
            &MAGIC[..],
            &FORMAT_VERSION.to_le_bytes(),
            &start_segment.to_le_bytes(),
            &created_ms.to_le_bytes(),
            &id.0,
        ]
        .concat(),
    )
}

/// A version 1 header (no folder id), as older kv versions wrote: for tests of old files.
#[cfg(test)]
pub(crate) fn v1_header_bytes(start_segment: u64, created_ms: u64) -> Vec<u8> {
    with_crc(
        [
            &MAGIC[..],
            &1u32.to_le_bytes(),
            &start_segment.to_le_bytes(),
            &created_ms.to_le_bytes(),
        ]
        .concat(),
    )
}

fn footer_bytes(records: u64, clock_hlc: u64) -> Vec<u8> {
    with_crc(
        [
            &FOOTER_MAGIC[..],
            &records.to_le_bytes(),
            &clock_hlc.to_le_bytes(),
            &0u32.to_le_bytes(),
        ]
        .concat(),
    )
}

/// Writes the map to `snapshot.db` atomically, dropping tombstones older than `cutoff_ms`: the
/// temp file is written and fsynced, read back from the disk and verified in full, and only then
/// does the old `snapshot.db` become the spare `snapshot.prev.db` (replacing the older spare) and
/// the new file take its place. A crash between the two renames leaves the spare and no
/// `snapshot.db`, which recovery handles like a damaged snapshot.
pub fn write_atomic(
    vfs: &impl Vfs,
    dir: &Path,
    map: &ShardedMap,
    clock: &Clock,
    start_segment: u64,
    cutoff_ms: u64,
    id: DirId,
) -> Result<Written, Error> {
    let tmp = dir.join(TMP_FILE_NAME);
    let result =
        write_file(vfs, &tmp, map, clock, start_segment, cutoff_ms, id).and_then(|written| {
            verify_written(vfs, &tmp, &written, start_segment, id)?;
            install(vfs, dir, &tmp).map(|kept_spare| Written {
                kept_spare,
                ..written
            })
        });
    if result.is_err() {
        let _ = vfs.remove(&tmp);
    }
    result
}

/// Reads the fsynced `tmp` back, from the disk rather than the page cache where the kernel lets
/// us drop it, and checks every byte the way recovery will, and that it is the file just written.
fn verify_written(
    vfs: &impl Vfs,
    tmp: &Path,
    written: &Written,
    start_segment: u64,
    id: DirId,
) -> Result<(), Error> {
    // Advice only: where it is not followed, the read below checks the cached pages.
    vfs.drop_cache(tmp);
    let meta = load(vfs, tmp, |_| {})?;
    let expected = (written.records, start_segment, Some(id));
    if (meta.records, meta.start_segment, meta.id) != expected {
        return Err(Error::Corrupt {
            path: tmp.to_owned(),
            offset: 0,
            reason: format!(
                "read back as {} entries from segment {} in folder {:?}; {} entries from segment \
                 {start_segment} in folder {id} were written",
                meta.records, meta.start_segment, meta.id, written.records
            ),
        });
    }
    Ok(())
}

/// Moves the verified `tmp` into place: `snapshot.db` (if any) becomes the spare, then `tmp`
/// becomes `snapshot.db`, then the folder is fsynced. Returns whether a spare was kept.
fn install(vfs: &impl Vfs, dir: &Path, tmp: &Path) -> Result<bool, Error> {
    let target = dir.join(FILE_NAME);
    let kept_spare = vfs.exists(&target);
    if kept_spare {
        let spare = dir.join(SPARE_FILE_NAME);
        vfs.rename(&target, &spare)
            .map_err(Error::io("rename to the spare", &spare))?;
    }
    vfs.rename(tmp, &target)
        .map_err(Error::io("rename into place", &target))?;
    segment::sync_dir(vfs, dir)?;
    Ok(kept_spare)
}

/// Entries per [`ShardedMap::export_chunk`] step of a snapshot or backup.
const EXPORT_CHUNK: usize = 1024;

/// Writes the map to `tmp` in the snapshot format and fsyncs it (no rename): the body of
/// [`write_atomic`], and of backups. The map is exported in key order, [`EXPORT_CHUNK`] keys at a
/// time, each entry under its shard's lock for that entry alone, so writes go on meanwhile and
/// the file is not one point in time across keys.
pub(crate) fn write_file(
    vfs: &impl Vfs,
    tmp: &Path,
    map: &ShardedMap,
    clock: &Clock,
    start: u64,
    cutoff_ms: u64,
    id: DirId,
) -> Result<Written, Error> {
    let write_err = Error::io("write", tmp);
    let file = vfs.create(tmp).map_err(Error::io("create", tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let created_ms = crate::version::now_ms();
    let mut written = Written {
        records: 0,
        bytes: 0,
        tombstones_dropped: 0,
        created_ms,
        kept_spare: false,
    };
    let mut buf = Vec::new();
    let mut result = out.write_all(&header_bytes(start, created_ms, id));
    let mut after: Option<String> = None;
    loop {
        buf.clear();
        let mut framed = Ok(());
        let export = |version, key: &[u8], value: Option<&[u8]>, expiry| {
            if framed.is_ok() {
                framed = frame::append(&mut buf, |b| encode_parts(b, version, key, value, expiry));
            }
            written.records += 1;
        };
        let chunk = map.export_chunk(
            after.as_deref(),
            EXPORT_CHUNK,
            created_ms,
            cutoff_ms,
            export,
        );
        written.tombstones_dropped += chunk.dropped;
        framed?;
        result = result.and_then(|()| out.write_all(&buf));
        match chunk.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    result = result.and_then(|()| out.write_all(&footer_bytes(written.records, clock.last_hlc())));
    let file = result
        .and_then(|()| out.into_inner().map_err(|e| e.into_error()))
        .map_err(write_err)?;
    file.sync_all().map_err(Error::io("fsync", tmp))?;
    written.bytes = file.size().map_err(Error::io("stat", tmp))?;
    Ok(written)
}

/// Streams `snapshot.db`, calling `apply` for each entry. Any defect is [`Error::Corrupt`] (or
/// [`Error::BadFormat`] for a foreign or newer file), with the file and the byte offset.
pub fn load(
    vfs: &impl Vfs,
    path: &Path,
    mut apply: impl FnMut(Record),
) -> Result<SnapshotMeta, Error> {
    let file = vfs.open_read(path).map_err(Error::io("open", path))?;
    let len = file.size().map_err(Error::io("stat", path))?;
    let mut reader = SnapshotReader {
        path: path.to_owned(),
        input: BufReader::with_capacity(1 << 20, file),
        offset: 0,
    };
    let header = reader.header(len)?;
    let mut records = 0;
    let mut payload = Vec::new();
    while len - reader.offset > FOOTER_LEN as u64 {
        apply(reader.record(len, &mut payload)?);
        records += 1;
    }
    let (stored_records, clock_hlc) = reader.footer(len)?;
    if stored_records != records {
        return Err(reader.corrupt(format!(
            "footer counts {stored_records} entries, the file holds {records}"
        )));
    }
    Ok(SnapshotMeta {
        start_segment: header.start_segment,
        created_ms: header.created_ms,
        records,
        clock_hlc,
        id: header.id,
        header_len: header.len,
    })
}

/// Reads and checks only the header of the snapshot at `path` (magic, version, checksum).
pub fn read_header(vfs: &impl Vfs, path: &Path) -> Result<SnapshotHeader, Error> {
    let file = vfs.open_read(path).map_err(Error::io("open", path))?;
    let len = file.size().map_err(Error::io("stat", path))?;
    let mut reader = SnapshotReader {
        path: path.to_owned(),
        input: BufReader::with_capacity(HEADER_LEN, file),
        offset: 0,
    };
    reader.header(len)
}

/// The creation time as a `SystemTime`.
pub fn created_at(meta: &SnapshotMeta) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(meta.created_ms)
}

struct SnapshotReader<R> {
    path: PathBuf,
    input: BufReader<R>,
    offset: u64,
}

impl<R: Read> SnapshotReader<R> {
    fn corrupt(&self, reason: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            offset: self.offset,
            reason,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        self.input
            .read_exact(buf)
            .map_err(Error::io("read", &self.path))
    }

    /// Reads a fixed-size block that ends in a crc32c of the bytes before it.
    fn block<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Error> {
        let mut block = [0; N];
        self.read(&mut block)?;
        let (fields, crc) = block.split_at(N - 4);
        if crc32c::crc32c(fields).to_le_bytes() != crc {
            return Err(self.corrupt(format!("{what} checksum mismatch")));
        }
        self.offset += N as u64;
        Ok(block)
    }

    fn header(&mut self, len: u64) -> Result<SnapshotHeader, Error> {
        if len < (V1_HEADER_LEN + FOOTER_LEN) as u64 {
            return Err(self.corrupt(format!("{len} bytes is too short for a snapshot")));
        }
        let mut head = [0; HEADER_LEN];
        self.read(&mut head[..12])?;
        let bad_format = |reason: String| Error::BadFormat {
            path: self.path.clone(),
            reason,
        };
        if head[..8] != MAGIC {
            return Err(bad_format("wrong magic number: not a kv snapshot".into()));
        }
        let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        let header_len = match version {
            1 => V1_HEADER_LEN,
            FORMAT_VERSION => HEADER_LEN,
            _ => {
                return Err(bad_format(format!(
                    "snapshot format version {version}, this program reads 1 and {FORMAT_VERSION}"
                )))
            }
        };
        if len < (header_len + FOOTER_LEN) as u64 {
            return Err(self.corrupt(format!("{len} bytes is too short for a snapshot")));
        }
        self.read(&mut head[12..header_len])?;
        let (fields, crc) = head[..header_len].split_at(header_len - 4);
        if crc32c::crc32c(fields).to_le_bytes() != crc {
            return Err(self.corrupt("snapshot header checksum mismatch".into()));
        }
        self.offset = header_len as u64;
        let id = (header_len == HEADER_LEN).then(|| {
            let mut id = [0; 16];
            id.copy_from_slice(&head[28..44]);
            DirId(id)
        });
        Ok(SnapshotHeader {
            start_segment: le_u64(&head[12..20]),
            created_ms: le_u64(&head[20..28]),
            id,
            len: header_len as u64,
        })
    }

    fn record(&mut self, len: u64, payload: &mut Vec<u8>) -> Result<Record, Error> {
        let mut head = [0; FRAME_HEADER_LEN];
        self.read(&mut head)?;
        let size = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let room = (len - self.offset).saturating_sub((FRAME_HEADER_LEN + FOOTER_LEN) as u64);
        if size == 0 || size > MAX_FRAME_LEN || size as u64 > room {
            return Err(self.corrupt(format!(
                "frame length {size} is 0, over the limit or past the end"
            )));
        }
        payload.resize(size, 0);
        self.read(payload)?;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if frame::checksum([head[0], head[1], head[2], head[3]], payload) != crc {
            return Err(self.corrupt("frame checksum mismatch".into()));
        }
        let record = Record::decode(payload).map_err(|e| self.corrupt(e.to_string()))?;
        self.offset += (FRAME_HEADER_LEN + size) as u64;
        Ok(record)
    }

    fn footer(&mut self, len: u64) -> Result<(u64, u64), Error> {
        if len - self.offset != FOOTER_LEN as u64 {
            return Err(self.corrupt("the file ends inside the footer (truncated)".into()));
        }
        let block = self.block::<FOOTER_LEN>("footer")?;
        if block[..8] != FOOTER_MAGIC {
            return Err(self.corrupt("footer magic number missing".into()));
        }
        Ok((le_u64(&block[8..16]), le_u64(&block[16..24])))
    }
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::OsFs;
    use crate::Version;
    use bytes::Bytes;
    use std::fs;

    const ID: DirId = DirId([3; 16]);

    fn sample_map() -> ShardedMap {
        let map = ShardedMap::default();
        for i in 0..50u64 {
            let value = (i % 5 != 0).then(|| Bytes::from(format!("value {i}")));
            map.apply(&Record {
                key: format!("key/{i}"),
                version: Version {
                    hlc: (i + 1) << 16,
                    node: 3,
                },
                value,
                expires_at_ms: None,
            });
        }
        map
    }

    fn load_all(path: &Path) -> Result<(SnapshotMeta, Vec<Record>), Error> {
        let mut records = Vec::new();
        let meta = load(&OsFs, path, |r| records.push(r))?;
        records.sort_by(|a, b| a.key.cmp(&b.key));
        Ok((meta, records))
    }

    fn written(dir: &Path) -> Vec<u8> {
        let clock = Clock::new(1);
        clock.observe(Version {
            hlc: 777 << 16,
            node: 0,
        });
        write_atomic(&OsFs, dir, &sample_map(), &clock, 9, 0, ID).unwrap();
        fs::read(dir.join(FILE_NAME)).unwrap()
    }

    #[test]
    fn round_trip_keeps_entries_and_meta() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = written(dir.path());
        assert!(!dir.path().join(TMP_FILE_NAME).exists());
        let (meta, records) = load_all(&dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(
            (meta.start_segment, meta.records, meta.clock_hlc, meta.id),
            (9, 50, 777 << 16, Some(ID))
        );
        let mut want = Vec::new();
        sample_map().scan(|k, e| {
            want.push(Record {
                key: k.into(),
                version: e.version,
                value: e.value.clone(),
                expires_at_ms: None,
            })
        });
        want.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(records, want);
        assert!(bytes.len() > HEADER_LEN + FOOTER_LEN);
    }

    #[test]
    fn old_tombstones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let map = sample_map();
        let w = write_atomic(&OsFs, dir.path(), &map, &Clock::new(1), 1, 1_000, ID).unwrap();
        assert_eq!((w.records, w.tombstones_dropped), (40, 10));
        assert_eq!(map.counts().tombstones, 0);
    }

    #[test]
    fn every_flipped_byte_and_truncation_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = written(dir.path());
        let path = dir.path().join("damaged.db");
        for at in (0..bytes.len()).step_by(3) {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            fs::write(&path, &bad).unwrap();
            let err = load_all(&path).unwrap_err();
            assert!(
                matches!(err, Error::Corrupt { .. } | Error::BadFormat { .. }),
                "flip at {at}: {err}"
            );
        }
        for cut in (0..bytes.len()).step_by(7) {
            fs::write(&path, &bytes[..cut]).unwrap();
            assert!(
                matches!(load_all(&path).unwrap_err(), Error::Corrupt { .. }),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn corrupt_error_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = written(dir.path());
        bytes[HEADER_LEN + 20] ^= 1;
        let path = dir.path().join("damaged.db");
        fs::write(&path, &bytes).unwrap();
        match load_all(&path).unwrap_err() {
            Error::Corrupt {
                path: p, offset, ..
            } => assert_eq!((p, offset), (path, HEADER_LEN as u64)),
            other => panic!("expected Corrupt, got {other}"),
        }
    }

    #[test]
    fn the_replaced_snapshot_becomes_the_spare() {
        let dir = tempfile::tempdir().unwrap();
        let (map, clock) = (sample_map(), Clock::new(1));
        let first = write_atomic(&OsFs, dir.path(), &map, &clock, 3, 0, ID).unwrap();
        assert!(!first.kept_spare, "nothing to keep the first time");
        assert!(!dir.path().join(SPARE_FILE_NAME).exists());
        let second = write_atomic(&OsFs, dir.path(), &map, &clock, 5, 0, ID).unwrap();
        assert!(second.kept_spare);
        let spare = read_header(&OsFs, &dir.path().join(SPARE_FILE_NAME)).unwrap();
        let current = read_header(&OsFs, &dir.path().join(FILE_NAME)).unwrap();
        assert_eq!((spare.start_segment, current.start_segment), (3, 5));
        assert_eq!((spare.id, current.len), (Some(ID), HEADER_LEN as u64));
        write_atomic(&OsFs, dir.path(), &map, &clock, 8, 0, ID).unwrap();
        let spare = read_header(&OsFs, &dir.path().join(SPARE_FILE_NAME)).unwrap();
        assert_eq!(spare.start_segment, 5, "the older spare is replaced");
        assert!(!dir.path().join(TMP_FILE_NAME).exists());
    }

    #[test]
    fn version_1_files_are_read_without_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = written(dir.path());
        let mut old = v1_header_bytes(9, 1234);
        old.extend_from_slice(&bytes[HEADER_LEN..]);
        let path = dir.path().join("old.db");
        fs::write(&path, &old).unwrap();
        let (meta, records) = load_all(&path).unwrap();
        assert_eq!(
            (meta.start_segment, meta.created_ms, meta.records, meta.id),
            (9, 1234, 50, None)
        );
        assert_eq!(meta.header_len, 32);
        assert_eq!(records, load_all(&dir.path().join(FILE_NAME)).unwrap().1);
    }
}
