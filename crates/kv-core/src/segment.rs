//! WAL segment files `wal-00000001.log`: names, the file header, listing, creation and removal.
//! A segment holds frames of records after its header; only the newest segment is appended to.

use std::io::Write;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::identity::DirId;
use crate::vfs::{Vfs, VfsFile};
use crate::Error;

/// First bytes of every WAL segment.
const MAGIC: [u8; 8] = *b"KVWALSEG";
/// Version of the WAL format this program writes: the folder id, and records in batches (see
/// [`crate::batch`]).
pub const FORMAT_VERSION: u32 = 3;
/// Format 2, still read: the folder id, frames one after the other, no batches.
pub const FORMAT_V2: u32 = 2;
/// Format 1, still read: no folder id, frames one after the other, no batches.
pub const FORMAT_V1: u32 = 1;
/// Length of the segment header this program writes.
///
/// ```text
/// version 3: [magic "KVWALSEG" 8][format version u32 LE = 3][segment number u64 LE]
///            [data folder id 16][salt u64 LE][crc32c of the 44 bytes before u32 LE]
/// version 2: [magic "KVWALSEG" 8][format version u32 LE = 2][segment number u64 LE]
///            [data folder id 16][crc32c of the 36 bytes before u32 LE]
/// version 1: [magic "KVWALSEG" 8][format version u32 LE = 1][segment number u64 LE]
///            [crc32c of the 20 bytes before u32 LE]
/// ```
///
/// The salt is random per segment and seeds every batch header's checksum.
pub const HEADER_LEN: usize = 48;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: usize = 40;
/// Length of a version 1 header.
pub const V1_HEADER_LEN: usize = 24;

/// What a segment's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// [`FORMAT_VERSION`], [`FORMAT_V2`] or [`FORMAT_V1`].
    pub version: u32,
    /// Where the first frame (or batch) starts.
    pub len: usize,
    /// The data folder the segment was written in; `None` for a version 1 segment, which
    /// belongs to whatever folder holds it.
    pub id: Option<DirId>,
    /// Seeds the batch header checksums (0 before version 3).
    pub salt: u64,
}

/// A fresh salt: random enough that no key or value can predict it.
pub fn new_salt() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
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
pub fn list(vfs: &impl Vfs, dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let mut found = Vec::new();
    for item in vfs.list(dir).map_err(Error::io("list", dir))? {
        let number = item
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_name);
        if let Some(number) = number {
            found.push((number, item));
        }
    }
    found.sort();
    Ok(found)
}

fn header(number: u64, id: DirId, salt: u64) -> [u8; HEADER_LEN] {
    let mut out = [0; HEADER_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&number.to_le_bytes());
    out[20..36].copy_from_slice(&id.0);
    out[36..44].copy_from_slice(&salt.to_le_bytes());
    let crc = crc32c::crc32c(&out[..44]);
    out[44..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A version 2 header (a folder id, no batches), as the program before batches wrote it.
#[cfg(test)]
pub(crate) fn v2_header(number: u64, id: DirId) -> [u8; V2_HEADER_LEN] {
    let mut out = [0; V2_HEADER_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_V2.to_le_bytes());
    out[12..20].copy_from_slice(&number.to_le_bytes());
    out[20..36].copy_from_slice(&id.0);
    let crc = crc32c::crc32c(&out[..36]);
    out[36..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A version 1 header, as older programs wrote it (tests of the upgrade path).
#[cfg(test)]
pub(crate) fn v1_header(number: u64) -> [u8; V1_HEADER_LEN] {
    let mut out = [0; V1_HEADER_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_V1.to_le_bytes());
    out[12..20].copy_from_slice(&number.to_le_bytes());
    let crc = crc32c::crc32c(&out[..20]);
    out[20..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks that `buf` starts with a valid header (version 1, 2 or 3) for segment `number`.
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
    let short = || {
        corrupt(format!(
            "{} bytes is shorter than the segment header",
            buf.len()
        ))
    };
    let Some(head) = buf.first_chunk::<12>() else {
        return Err(short());
    };
    if head[..8] != MAGIC {
        return Err(bad_format(
            "wrong magic number: not a kv WAL segment".into(),
        ));
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    let len = match version {
        FORMAT_VERSION => HEADER_LEN,
        FORMAT_V2 => V2_HEADER_LEN,
        FORMAT_V1 => V1_HEADER_LEN,
        _ => {
            return Err(bad_format(format!(
                "WAL format version {version}, this program reads {FORMAT_V1} to {FORMAT_VERSION}"
            )))
        }
    };
    let Some(head) = buf.get(..len) else {
        return Err(short());
    };
    let word = |at: usize| {
        let mut w = [0; 8];
        w.copy_from_slice(&head[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let mut crc = [0; 4];
    crc.copy_from_slice(&head[len - 4..]);
    if crc32c::crc32c(&head[..len - 4]) != u32::from_le_bytes(crc) {
        return Err(corrupt("segment header checksum mismatch".into()));
    }
    let stored = word(12);
    if stored != number {
        return Err(corrupt(format!(
            "header says segment {stored}, the file name says {number}"
        )));
    }
    let id = (version != FORMAT_V1).then(|| {
        let mut id = [0; 16];
        id.copy_from_slice(&head[20..36]);
        DirId(id)
    });
    let salt = if version == FORMAT_VERSION {
        word(36)
    } else {
        0
    };
    Ok(Header {
        version,
        len,
        id,
        salt,
    })
}

/// Reads and checks only the header of segment `number` at `file`.
pub fn read_header(vfs: &impl Vfs, file: &Path, number: u64) -> Result<Header, Error> {
    use std::io::Read;
    let mut head = Vec::with_capacity(HEADER_LEN);
    vfs.open_read(file)
        .and_then(|f| f.take(HEADER_LEN as u64).read_to_end(&mut head))
        .map_err(Error::io("read", file))?;
    check_header(file, &head, number)
}

/// Creates segment `number` with its header stamped with the folder's `id`, durable (file and
/// folder fsynced), ready to append. Returns the file and the segment's salt.
pub fn create<V: Vfs>(
    vfs: &V,
    dir: &Path,
    number: u64,
    id: DirId,
) -> Result<(V::File, u64), Error> {
    let file_path = path(dir, number);
    let salt = new_salt();
    let mut file = vfs
        .create_new(&file_path)
        .map_err(Error::io("create", &file_path))?;
    let written = file
        .write_all(&header(number, id, salt))
        .and_then(|()| file.sync_all())
        .map_err(Error::io("write header of", &file_path))
        .and_then(|()| sync_dir(vfs, dir));
    if let Err(e) = written {
        // Leave no half-made segment behind (durably if the folder fsync works): it would
        // become "the last segment" at recovery. If it comes back after a crash anyway, it holds
        // no records, and recovery still treats the segment before it as the newest.
        let _ = vfs.remove(&file_path).and_then(|()| vfs.sync_dir(dir));
        return Err(e);
    }
    Ok((file, salt))
}

/// Removes every segment numbered below `number`; returns how many bytes they held.
pub fn remove_before(vfs: &impl Vfs, dir: &Path, number: u64) -> Result<u64, Error> {
    retire_before(vfs, dir, number, false)
}

/// Retires every segment numbered below `number`: when `recycle` is set and there is no spare
/// yet, the largest becomes the spare (renamed to [`SPARE_FILE_NAME`], its blocks kept for the
/// next segment); the others are removed. Durable (folder fsynced). Returns how many bytes they
/// held.
pub fn retire_before(vfs: &impl Vfs, dir: &Path, number: u64, recycle: bool) -> Result<u64, Error> {
    let retired: Vec<(u64, PathBuf, u64)> = list(vfs, dir)?
        .into_iter()
        .filter(|(n, _)| *n < number)
        .map(|(n, p)| {
            let len = vfs.len(&p).unwrap_or(0);
            (n, p, len)
        })
        .collect();
    let spare = dir.join(SPARE_FILE_NAME);
    let recycled = if recycle && !vfs.exists(&spare) {
        retired
            .iter()
            .max_by_key(|(_, _, len)| *len)
            .map(|(n, _, _)| *n)
    } else {
        None
    };
    let mut freed = 0;
    for (n, file, len) in &retired {
        freed += len;
        if Some(*n) == recycled {
            vfs.rename(file, &spare)
                .map_err(Error::io("rename to the spare segment", file))?;
            debug!(segment = n, "recycled WAL segment as the spare");
        } else {
            vfs.remove(file).map_err(Error::io("remove", file))?;
        }
    }
    sync_dir(vfs, dir)?;
    Ok(freed)
}

/// Name of the spare segment: a file preallocated (or recycled) and headed ahead of time, off
/// the write path, that becomes the next segment by a rename. Not a segment: recovery never
/// reads it.
pub const SPARE_FILE_NAME: &str = "wal-spare.log";

/// A spare segment made ready for segment `number` by [`prepare_spare`].
#[derive(Debug)]
pub struct Spare<F> {
    /// The open spare file, positioned after its header.
    pub file: F,
    /// The segment number its header names.
    pub number: u64,
    /// Its new salt.
    pub salt: u64,
}

/// Makes [`SPARE_FILE_NAME`] ready to become segment `number`: reuses the file if there is one
/// (a segment a checkpoint recycled, or a spare made earlier) or creates it, reserves `size`
/// bytes (`fallocate`), writes a fresh header for `number` with a NEW salt over its first bytes
/// (so the old batches after it, sealed with the old salt, can never validate again), and
/// fsyncs the file and the folder. A crash at any point leaves only a spare, which recovery
/// never reads and the next preparation redoes.
pub fn prepare_spare<V: Vfs>(
    vfs: &V,
    dir: &Path,
    number: u64,
    id: DirId,
    size: u64,
) -> Result<Spare<V::File>, Error> {
    let spare = dir.join(SPARE_FILE_NAME);
    let mut file = if vfs.exists(&spare) {
        vfs.open_write(&spare)
    } else {
        vfs.create(&spare)
    }
    .map_err(Error::io("open", &spare))?;
    let salt = new_salt();
    file.allocate(size.max(HEADER_LEN as u64))
        .and_then(|()| file.seek_to(0))
        .and_then(|()| file.write_all(&header(number, id, salt)))
        .and_then(|()| file.sync_all())
        .map_err(Error::io("prepare", &spare))?;
    sync_dir(vfs, dir)?;
    Ok(Spare { file, number, salt })
}

/// Turns a prepared spare into segment `spare.number` (a rename, made durable by the folder
/// fsync before anything is appended). Returns the file, positioned after the header, and the
/// salt. On failure the new name is removed again (best effort), as [`create`] does.
pub fn activate<V: Vfs>(
    vfs: &V,
    dir: &Path,
    spare: Spare<V::File>,
) -> Result<(V::File, u64), Error> {
    let from = dir.join(SPARE_FILE_NAME);
    let to = path(dir, spare.number);
    if vfs.exists(&to) {
        return Err(Error::io("activate the spare as", &to)(
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the segment exists"),
        ));
    }
    vfs.rename(&from, &to)
        .map_err(Error::io("rename the spare segment to", &to))?;
    if let Err(e) = sync_dir(vfs, dir) {
        let _ = vfs.remove(&to).and_then(|()| vfs.sync_dir(dir));
        return Err(e);
    }
    Ok((spare.file, spare.salt))
}

/// Whether the disk has room to preallocate `size` bytes: twice that on top of the `reserve`
/// (`MIN_FREE_BYTES`), so that preallocation never brings a small disk to its reserve. True when
/// free space cannot be read (the simulated disk).
pub fn room_to_preallocate(dir: &Path, size: u64, reserve: u64) -> bool {
    crate::space::available(dir).map_or(true, |free| {
        free >= size.saturating_mul(2).saturating_add(reserve)
    })
}

/// The first segment of a store: the spare (preallocated to `prealloc` bytes) made ready and
/// activated as segment `number`, or, when `prealloc` is 0, the disk has no room for it
/// ([`room_to_preallocate`]) or that fails, a plain new segment ([`create`]).
pub fn start<V: Vfs>(
    vfs: &V,
    dir: &Path,
    number: u64,
    id: DirId,
    prealloc: u64,
    reserve: u64,
) -> Result<(V::File, u64), Error> {
    if prealloc > 0 && room_to_preallocate(dir, prealloc, reserve) {
        match prepare_spare(vfs, dir, number, id, prealloc).and_then(|s| activate(vfs, dir, s)) {
            Ok(done) => return Ok(done),
            Err(e) => warn!(error = %e, "no preallocated WAL segment; creating a plain one"),
        }
    }
    create(vfs, dir, number, id)
}

/// Whether segment `number` at `file` holds a record: for the batch format, whether a valid
/// batch follows the header (or a bad one that a later batch vouches for); for the older
/// formats, whether it is longer than its header. A segment left by a rotation that did not
/// complete holds only its header, followed by zeros or a recycled segment's old bytes.
pub fn holds_records(vfs: &impl Vfs, file: &Path, number: u64) -> bool {
    if vfs.len(file).is_ok_and(|n| n <= HEADER_LEN as u64) {
        return false;
    }
    let Ok(buf) = vfs.read(file) else {
        return true;
    };
    match check_header(file, &buf, number) {
        Ok(head) if head.version == FORMAT_VERSION => !matches!(
            crate::batch::read(&buf, head.len, head.salt),
            crate::batch::BatchRead::End | crate::batch::BatchRead::TornTail { .. }
        ),
        Ok(head) => buf.len() > head.len,
        Err(_) => true,
    }
}

/// Fsyncs a folder, making file creations, renames and removals in it durable.
pub fn sync_dir(vfs: &impl Vfs, dir: &Path) -> Result<(), Error> {
    vfs.sync_dir(dir).map_err(Error::io("fsync folder", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::OsFs;
    use std::fs;

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
            drop(create(&OsFs, dir.path(), n, ID).unwrap());
        }
        assert!(
            create(&OsFs, dir.path(), 2, ID).is_err(),
            "segments are never overwritten"
        );
        let listed: Vec<u64> = list(&OsFs, dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(listed, vec![1, 2, 3]);
        let bytes = fs::read(path(dir.path(), 2)).unwrap();
        let head = check_header(&path(dir.path(), 2), &bytes, 2).unwrap();
        assert_eq!(
            (head.version, head.len, head.id),
            (FORMAT_VERSION, HEADER_LEN, Some(ID))
        );
        assert_eq!(read_header(&OsFs, &path(dir.path(), 2), 2).unwrap(), head);
        assert!(matches!(
            check_header(Path::new("x"), &bytes, 3),
            Err(Error::Corrupt { .. })
        ));
        assert_eq!(
            remove_before(&OsFs, dir.path(), 3).unwrap(),
            2 * HEADER_LEN as u64
        );
        assert_eq!(list(&OsFs, dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn bad_magic_and_version_are_bad_format() {
        let mut bytes = header(1, ID, 7).to_vec();
        bytes[0] = b'X';
        assert!(matches!(
            check_header(Path::new("x"), &bytes, 1),
            Err(Error::BadFormat { .. })
        ));
        let mut bytes = header(1, ID, 7).to_vec();
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
    fn versions_1_and_2_are_still_read_and_the_id_and_salt_are_checked() {
        let v1 = v1_header(5);
        assert_eq!(
            check_header(Path::new("x"), &v1, 5).unwrap(),
            Header {
                version: FORMAT_V1,
                len: V1_HEADER_LEN,
                id: None,
                salt: 0,
            }
        );
        let v2 = v2_header(5, ID);
        assert_eq!(
            check_header(Path::new("x"), &v2, 5).unwrap(),
            Header {
                version: FORMAT_V2,
                len: V2_HEADER_LEN,
                id: Some(ID),
                salt: 0,
            }
        );
        let v3 = header(5, ID, 0xfeed);
        assert_eq!(check_header(Path::new("x"), &v3, 5).unwrap().salt, 0xfeed);
        for at in [22, 38] {
            let mut bad = v3;
            bad[at] ^= 1;
            assert!(
                matches!(
                    check_header(Path::new("x"), &bad, 5),
                    Err(Error::Corrupt { .. })
                ),
                "id and salt are under the checksum"
            );
        }
        assert!(matches!(
            check_header(Path::new("x"), &v3[..46], 5),
            Err(Error::Corrupt { .. })
        ));
        assert_ne!(new_salt(), new_salt());
    }
}
