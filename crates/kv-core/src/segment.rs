//! WAL segment files `wal-00000001.log`: names, the file header, listing, creation and removal.
//! A segment holds frames of records after its header; only the newest segment is appended to.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Error;

/// First bytes of every WAL segment.
const MAGIC: [u8; 8] = *b"KVWALSEG";
/// Version of the WAL format this program writes and reads.
const FORMAT_VERSION: u32 = 1;
/// Length of the segment header.
///
/// ```text
/// [magic "KVWALSEG" 8][format version u32 LE][segment number u64 LE][crc32c of the 20 bytes before u32 LE]
/// ```
pub const HEADER_LEN: usize = 24;

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

fn header(number: u64) -> [u8; HEADER_LEN] {
    let mut out = [0; HEADER_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&number.to_le_bytes());
    let crc = crc32c::crc32c(&out[..20]);
    out[20..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks that `buf` starts with a valid header for segment `number`.
pub fn check_header(file: &Path, buf: &[u8], number: u64) -> Result<(), Error> {
    let bad_format = |reason: String| Error::BadFormat {
        path: file.to_owned(),
        reason,
    };
    let corrupt = |reason: String| Error::Corrupt {
        path: file.to_owned(),
        offset: 0,
        reason,
    };
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
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
    if version != FORMAT_VERSION {
        return Err(bad_format(format!(
            "WAL format version {version}, this program reads {FORMAT_VERSION}"
        )));
    }
    word.copy_from_slice(&head[20..]);
    if crc32c::crc32c(&head[..20]) != u32::from_le_bytes(word) {
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
    Ok(())
}

/// Creates segment `number` with its header, durable (file and folder fsynced), ready to append.
pub fn create(dir: &Path, number: u64) -> Result<File, Error> {
    let file_path = path(dir, number);
    let mut file = crate::files::private_options()
        .create_new(true)
        .append(true)
        .open(&file_path)
        .map_err(Error::io("create", &file_path))?;
    let written = file
        .write_all(&header(number))
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

#[cfg(test)]
mod tests {
    use super::*;

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
            drop(create(dir.path(), n).unwrap());
        }
        assert!(
            create(dir.path(), 2).is_err(),
            "segments are never overwritten"
        );
        let listed: Vec<u64> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(listed, vec![1, 2, 3]);
        let bytes = fs::read(path(dir.path(), 2)).unwrap();
        check_header(&path(dir.path(), 2), &bytes, 2).unwrap();
        assert!(matches!(
            check_header(Path::new("x"), &bytes, 3),
            Err(Error::Corrupt { .. })
        ));
        assert_eq!(remove_before(dir.path(), 3).unwrap(), 2 * HEADER_LEN as u64);
        assert_eq!(list(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn bad_magic_and_version_are_bad_format() {
        let mut bytes = header(1).to_vec();
        bytes[0] = b'X';
        assert!(matches!(
            check_header(Path::new("x"), &bytes, 1),
            Err(Error::BadFormat { .. })
        ));
        let mut bytes = header(1).to_vec();
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
}
