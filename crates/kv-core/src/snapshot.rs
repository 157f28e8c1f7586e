//! `snapshot.db`: the whole map at a checkpoint. Written atomically (temp file, fsync, rename,
//! fsync of the folder) and loaded at start-up, where any defect stops start-up.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::frame::{self, FRAME_HEADER_LEN, MAX_FRAME_LEN};
use crate::map::ShardedMap;
use crate::record::encode_parts;
use crate::{segment, Clock, Error, Record};

/// File name of the snapshot in the data folder.
pub const FILE_NAME: &str = "snapshot.db";
/// File name of a snapshot being written.
pub const TMP_FILE_NAME: &str = "snapshot.db.tmp";

const MAGIC: [u8; 8] = *b"KVSNAPSH";
const FOOTER_MAGIC: [u8; 8] = *b"KVSNAPND";
const FORMAT_VERSION: u32 = 1;
/// Bytes of the header.
pub(crate) const HEADER_LEN: usize = 32;
const FOOTER_LEN: usize = 32;

/// Layout of `snapshot.db` (integers little-endian):
///
/// ```text
/// header  [magic "KVSNAPSH" 8][format version u32][first WAL segment to replay u64]
///         [created, unix ms u64][crc32c of the 28 bytes before u32]
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
}

/// What [`write_atomic`] wrote.
#[derive(Clone, Copy, Debug)]
pub struct Written {
    pub records: u64,
    pub bytes: u64,
    pub tombstones_dropped: u64,
    /// The creation time in the header (unix ms).
    pub created_ms: u64,
}

fn with_crc(mut fields: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&fields);
    fields.extend_from_slice(&crc.to_le_bytes());
    fields
}

/// The header of a snapshot whose WAL replay starts at `start_segment`.
pub(crate) fn header_bytes(start_segment: u64, created_ms: u64) -> Vec<u8> {
    with_crc(
        [
            &MAGIC[..],
            &FORMAT_VERSION.to_le_bytes(),
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

/// Writes the map to `snapshot.db` atomically, dropping tombstones older than `cutoff_ms`.
pub fn write_atomic(
    dir: &Path,
    map: &ShardedMap,
    clock: &Clock,
    start_segment: u64,
    cutoff_ms: u64,
) -> Result<Written, Error> {
    let tmp = dir.join(TMP_FILE_NAME);
    let result = write_file(&tmp, map, clock, start_segment, cutoff_ms).and_then(|written| {
        let target = dir.join(FILE_NAME);
        fs::rename(&tmp, &target).map_err(Error::io("rename into place", &target))?;
        segment::sync_dir(dir)?;
        Ok(written)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Entries per [`ShardedMap::export_chunk`] step of a snapshot or backup.
const EXPORT_CHUNK: usize = 1024;

/// Writes the map to `tmp` in the snapshot format and fsyncs it (no rename): the body of
/// [`write_atomic`], and of backups. The map is exported in key order, [`EXPORT_CHUNK`] keys at a
/// time, each entry under its shard's lock for that entry alone, so writes go on meanwhile and
/// the file is not one point in time across keys.
pub(crate) fn write_file(
    tmp: &Path,
    map: &ShardedMap,
    clock: &Clock,
    start: u64,
    cutoff_ms: u64,
) -> Result<Written, Error> {
    let write_err = Error::io("write", tmp);
    let file = crate::files::create_private(tmp).map_err(Error::io("create", tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let created_ms = crate::version::now_ms();
    let mut written = Written {
        records: 0,
        bytes: 0,
        tombstones_dropped: 0,
        created_ms,
    };
    let mut buf = Vec::new();
    let mut result = out.write_all(&header_bytes(start, created_ms));
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
    written.bytes = file.metadata().map_err(Error::io("stat", tmp))?.len();
    Ok(written)
}

/// Streams `snapshot.db`, calling `apply` for each entry. Any defect is [`Error::Corrupt`] (or
/// [`Error::BadFormat`] for a foreign or newer file), with the file and the byte offset.
pub fn load(path: &Path, mut apply: impl FnMut(Record)) -> Result<SnapshotMeta, Error> {
    let file = File::open(path).map_err(Error::io("open", path))?;
    let len = file.metadata().map_err(Error::io("stat", path))?.len();
    let mut reader = SnapshotReader {
        path: path.to_owned(),
        input: BufReader::with_capacity(1 << 20, file),
        offset: 0,
    };
    let (start_segment, created_ms) = reader.header(len)?;
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
        start_segment,
        created_ms,
        records,
        clock_hlc,
    })
}

/// The creation time as a `SystemTime`.
pub fn created_at(meta: &SnapshotMeta) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(meta.created_ms)
}

struct SnapshotReader {
    path: PathBuf,
    input: BufReader<File>,
    offset: u64,
}

impl SnapshotReader {
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

    fn header(&mut self, len: u64) -> Result<(u64, u64), Error> {
        if len < (HEADER_LEN + FOOTER_LEN) as u64 {
            return Err(self.corrupt(format!("{len} bytes is too short for a snapshot")));
        }
        let mut magic = [0; 12];
        self.read(&mut magic)?;
        let bad_format = |reason: String| Error::BadFormat {
            path: self.path.clone(),
            reason,
        };
        if magic[..8] != MAGIC {
            return Err(bad_format("wrong magic number: not a kv snapshot".into()));
        }
        let version = u32::from_le_bytes([magic[8], magic[9], magic[10], magic[11]]);
        if version != FORMAT_VERSION {
            return Err(bad_format(format!(
                "snapshot format version {version}, this program reads {FORMAT_VERSION}"
            )));
        }
        let mut rest = [0; HEADER_LEN - 12];
        self.read(&mut rest)?;
        let crc_ok =
            crc32c::crc32c_append(crc32c::crc32c(&magic), &rest[..16]).to_le_bytes() == rest[16..];
        if !crc_ok {
            return Err(self.corrupt("snapshot header checksum mismatch".into()));
        }
        self.offset = HEADER_LEN as u64;
        Ok((le_u64(&rest[..8]), le_u64(&rest[8..16])))
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
    use crate::Version;
    use bytes::Bytes;

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
        let meta = load(path, |r| records.push(r))?;
        records.sort_by(|a, b| a.key.cmp(&b.key));
        Ok((meta, records))
    }

    fn written(dir: &Path) -> Vec<u8> {
        let clock = Clock::new(1);
        clock.observe(Version {
            hlc: 777 << 16,
            node: 0,
        });
        write_atomic(dir, &sample_map(), &clock, 9, 0).unwrap();
        fs::read(dir.join(FILE_NAME)).unwrap()
    }

    #[test]
    fn round_trip_keeps_entries_and_meta() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = written(dir.path());
        assert!(!dir.path().join(TMP_FILE_NAME).exists());
        let (meta, records) = load_all(&dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(
            (meta.start_segment, meta.records, meta.clock_hlc),
            (9, 50, 777 << 16)
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
        let w = write_atomic(dir.path(), &map, &Clock::new(1), 1, 1_000).unwrap();
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
}
