//! WAL segment files `wal-00000001.log`: names, the file header, listing, creation and removal.
//! A segment holds frames of records after its header; only the newest segment is appended to.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::identity::DirId;
use crate::Error;

/// First bytes of every WAL segment.
const MAGIC: [u8; 8] = *b"KVWALSEG";
/// Version of the WAL format this program writes; version 1 (no folder id) is still read.
const FORMAT_VERSION: u32 = 2;
/// Length of the segment header this program writes.
///
/// ```text
/// version 2: [magic "KVWALSEG" 8][format version u32 LE = 2][segment number u64 LE]
///            [data folder id 16][crc32c of the 36 bytes before u32 LE]
/// version 1: [magic "KVWALSEG" 8][format version u32 LE = 1][segment number u64 LE]
///            [crc32c of the 20 bytes before u32 LE]
/// ```
pub const HEADER_LEN: usize = 40;
/// Length of a version 1 header.
const V1_HEADER_LEN: usize = 24;

/// What a segment's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Where the first frame starts.
    pub len: usize,
    /// The data folder the segment was written in; `None` for a version 1 segment, which
    /// belongs to whatever folder holds it.
    pub id: Option<DirId>,
}

/// Path of segment `number` in `dir`.
pub fn path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("wal-{number:08}.log"))
}

/// The segment number in a file name like `wal-00000042.log`.
fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// All segments in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let mut found = Vec::new();
    for item in fs::read_dir(dir).map_err(Error::io("list", dir))? {
        let item = item.map_err(Error::io("list", dir))?;
        if let Some(number) = item.file_name().to_str().and_then(parse_name) {
            found.push((number, item.path()));
        }
    }
    found.sort();
    Ok(found)
}

fn header(number: u64, id: DirId) -> [u8; HEADER_LEN] {
    let mut out = [0; HEADER_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&number.to_le_bytes());
    out[20..36].copy_from_slice(&id.0);
    let crc = crc32c::crc32c(&out[..36]);
    out[36..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks that `buf` starts with a valid header (version 1 or 2) for segment `number`.
pub fn check_header(file: &Path, buf: &[u8], number: u64) -> Result<Header, Error> {
    let bad_format = |reason: String| Error::BadFormat {
        path: file.to_owned(),
        reason,
    };
    let corrupt = |reason: String| Error::Corrupt {
        path: file.to_owned(),
        offset: 0,
        reason,
    };
    let Some(head) = buf.first_chunk::<V1_HEADER_LEN>() else {
        return Err(corrupt(format!(
            "{} bytes is shorter than the segment header",
            buf.len()
        )));
    };
    if head[..8] != MAGIC {
        return Err(bad_format(
            "wrong magic number: not a kv WAL segment".into(),
        ));
    }
    let mut word = [0; 4];
    word.copy_from_slice(&head[8..12]);
    let version = u32::from_le_bytes(word);
    let len = match version {
        1 => V1_HEADER_LEN,
        FORMAT_VERSION => HEADER_LEN,
        _ => {
            return Err(bad_format(format!(
                "WAL format version {version}, this program reads 1 and {FORMAT_VERSION}"
            )))
        }
    };
    let Some(head) = buf.get(..len) else {
        return Err(corrupt(format!(
            "{} bytes is shorter than the segment header",
            buf.len()
        )));
    };
    word.copy_from_slice(&head[len - 4..]);
    if crc32c::crc32c(&head[..len - 4]) != u32::from_le_bytes(word) {
        return Err(corrupt("segment header checksum mismatch".into()));
    }
    let mut long = [0; 8];
    long.copy_from_slice(&head[12..20]);
    let stored = u64::from_le_bytes(long);
    if stored != number {
        return Err(corrupt(format!(
            "header says segment {stored}, the file name says {number}"
        )));
    }
    let id = (len == HEADER_LEN).then(|| {
        let mut id = [0; 16];
        id.copy_from_slice(&head[20..36]);
        DirId(id)
    });
    Ok(Header { len, id })
}

/// Reads and checks only the header of segment `number` at `file`.
pub fn read_header(file: &Path, number: u64) -> Result<Header, Error> {
    let mut head = Vec::with_capacity(HEADER_LEN);
    File::open(file)
        .and_then(|f| f.take(HEADER_LEN as u64).read_to_end(&mut head))
        .map_err(Error::io("read", file))?;
    check_header(file, &head, number)
}

/// Creates segment `number` with its header stamped with the folder's `id`, durable (file and
/// folder fsynced), ready to append.
pub fn create(dir: &Path, number: u64, id: DirId) -> Result<File, Error> {
    let file_path = path(dir, number);
    let mut file = crate::files::private_options()
        .create_new(true)
        .append(true)
        .open(&file_path)
        .map_err(Error::io("create", &file_path))?;
    let written = file
        .write_all(&header(number, id))
        .and_then(|()| file.sync_all())
        .map_err(Error::io("write header of", &file_path))
        .and_then(|()| sync_dir(dir));
    if let Err(e) = written {
        // Leave no half-made segment behind: it would become "the last segment" at recovery.
        let _ = fs::remove_file(&file_path);
        return Err(e);
    }
    Ok(file)
}

/// Removes every segment numbered below `number`; returns how many bytes they held.
pub fn remove_before(dir: &Path, number: u64) -> Result<u64, Error> {
    let mut freed = 0;
    for (n, file) in list(dir)? {
        if n >= number {
            break;
        }
        freed += fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(&file).map_err(Error::io("remove", &file))?;
    }
    sync_dir(dir)?;
    Ok(freed)
}

/// Fsyncs a folder, making file creations, renames and removals in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("fsync folder", dir))
}

/// A version 1 header (no folder id), as older kv versions wrote: for tests of old files.
#[cfg(test)]
pub(crate) fn v1_header(number: u64) -> [u8; V1_HEADER_LEN] {
    let mut out = [0; V1_HEADER_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&1u32.to_le_bytes());
    out[12..20].copy_from_slice(&number.to_le_bytes());
    let crc = crc32c::crc32c(&out[..20]);
    out[20..].copy_from_slice(&crc.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: DirId = DirId([7; 16]);

    #[test]
    fn names_round_trip_and_reject_strangers() {
        let dir = Path::new("/d");
        let p = path(dir, 42);
        assert_eq!(p, Path::new("/d/wal-00000042.log"));
        assert_eq!(parse_name("wal-00000042.log"), Some(42));
        assert_eq!(parse_name("wal-123456789.log"), Some(123_456_789));
        for bad in [
            "wal-42.log",
            "wal-0000004x.log",
            "wal-00000042.log.tmp",
            "snapshot.db",
            "wal-+0000042.log",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn create_list_check_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        for n in [3, 1, 2] {
            drop(create(dir.path(), n, ID).unwrap());
        }
        assert!(
            create(dir.path(), 2, ID).is_err(),
            "segments are never overwritten"
        );
        let listed: Vec<u64> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(listed, vec![1, 2, 3]);
        let bytes = fs::read(path(dir.path(), 2)).unwrap();
        let got = check_header(&path(dir.path(), 2), &bytes, 2).unwrap();
        assert_eq!(
            got,
            Header {
                len: HEADER_LEN,
                id: Some(ID)
            }
        );
        assert_eq!(read_header(&path(dir.path(), 2), 2).unwrap(), got);
        assert!(matches!(
            check_header(Path::new("x"), &bytes, 3),
            Err(Error::Corrupt { .. })
        ));
        assert_eq!(remove_before(dir.path(), 3).unwrap(), 2 * HEADER_LEN as u64);
        assert_eq!(list(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn bad_magic_and_version_are_bad_format() {
        let mut bytes = header(1, ID).to_vec();
        bytes[0] = b'X';
        assert!(matches!(
            check_header(Path::new("x"), &bytes, 1),
            Err(Error::BadFormat { .. })
        ));
        let mut bytes = header(1, ID).to_vec();
        bytes[8] = 9;
        assert!(matches!(
            check_header(Path::new("x"), &bytes, 1),
            Err(Error::BadFormat { .. })
        ));
        assert!(matches!(
            check_header(Path::new("x"), &bytes[..5], 1),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn version_1_headers_are_read_without_an_id() {
        let mut bytes = v1_header(4).to_vec();
        bytes.extend_from_slice(b"frames");
        let got = check_header(Path::new("x"), &bytes, 4).unwrap();
        assert_eq!(got, Header { len: 24, id: None });
        bytes[21] ^= 1;
        assert!(matches!(
            check_header(Path::new("x"), &bytes, 4),
            Err(Error::Corrupt { .. })
        ));
        let mut bytes = header(4, ID).to_vec();
        bytes[25] ^= 1;
        assert!(
            matches!(
                check_header(Path::new("x"), &bytes, 4),
                Err(Error::Corrupt { .. })
            ),
            "the id is under the checksum"
        );
    }
}
