//! Backups: a snapshot-format copy of the live map taken while writes go on, the full check of
//! such a file, and its installation as a data folder's `snapshot.db` (restore), re-stamped with
//! that folder's id.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::info;

use crate::identity::{self, DirId};
use crate::lock::{self, DirLock};
use crate::map::ShardedMap;
use crate::vfs::{OsFs, Vfs};
use crate::{segment, snapshot, Clock, Error};

/// Temporary backup files in the data folder are named `backup-<unix ms>-<n>.tmp`; recovery
/// removes any a crash left behind.
const TMP_PREFIX: &str = "backup-";
const TMP_SUFFIX: &str = ".tmp";

/// What a backup file holds, as written by [`crate::Store::backup_to`] or as checked by
/// [`verify_backup`].
///
/// # What a backup contains
///
/// A backup has the format of `snapshot.db` (header, one frame per entry, footer with the
/// entry count and the clock). It is taken like a checkpoint: the map is exported in key order,
/// 1,024 keys at a time, each entry under its shard's lock for that entry alone, while writes go
/// on. So it holds every write that was applied (and therefore every write acknowledged) before
/// the backup began, tombstones included, plus some of the writes that arrived while it ran. It
/// is not one point in time across keys: a write that landed during the backup may be in it
/// while an earlier one to a key exported before is not. Each entry is whole.
#[derive(Clone, Debug)]
pub struct BackupInfo {
    /// Entries in the file, tombstones included.
    pub entries: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// When the backup began (unix ms), as its header says.
    pub created_ms: u64,
    /// The data folder it was taken from (`None`: a backup written before folder ids).
    pub data_dir_id: Option<DirId>,
    /// Time spent writing (or checking) it.
    pub duration: Duration,
}

/// A fresh temporary backup path inside `dir`.
pub(crate) fn temp_path(dir: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let ms = crate::version::now_ms();
    dir.join(format!("{TMP_PREFIX}{ms}-{n}{TMP_SUFFIX}"))
}

/// Removes the temporary backup files a crash left in `dir`.
pub(crate) fn remove_stale(vfs: &impl Vfs, dir: &Path) -> Result<(), Error> {
    for path in vfs.list(dir).map_err(Error::io("list", dir))? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        if name.starts_with(TMP_PREFIX) && name.ends_with(TMP_SUFFIX) {
            info!(path = %path.display(), "removing a backup file left by a crash");
            vfs.remove(&path).map_err(Error::io("remove", &path))?;
        }
    }
    Ok(())
}

/// Writes the map to `path` in the snapshot format (fsynced); no tombstone is dropped and the
/// live map is not changed. A failed backup leaves no file behind.
pub(crate) fn write(
    path: &Path,
    map: &ShardedMap,
    clock: &Clock,
    id: DirId,
) -> Result<BackupInfo, Error> {
    let started = Instant::now();
    // WAL replay after a restored backup starts at segment 1 unless restore says otherwise.
    match snapshot::write_file(&OsFs, path, map, clock, 1, 0, id) {
        Ok(written) => Ok(BackupInfo {
            entries: written.records,
            bytes: written.bytes,
            created_ms: written.created_ms,
            data_dir_id: Some(id),
            duration: started.elapsed(),
        }),
        Err(e) => {
            let _ = fs::remove_file(path);
            Err(e)
        }
    }
}

/// Reads the whole file and checks every byte a recovery would: magic and format version,
/// header and footer checksums, every frame's length and checksum, every record, and the entry
/// count. Any defect is [`Error::BadBackup`] naming the file and, where there is one, the offset.
pub fn verify_backup(path: &Path) -> Result<BackupInfo, Error> {
    let started = Instant::now();
    let bad = |reason: String| Error::BadBackup {
        path: path.to_owned(),
        reason,
    };
    let meta = snapshot::load(&OsFs, path, |_| {}).map_err(|e| match e {
        Error::Corrupt { offset, reason, .. } => bad(format!("{reason} (byte offset {offset})")),
        Error::BadFormat { reason, .. } => bad(reason),
        Error::Io { op, source, .. } => bad(format!("cannot {op} it: {source}")),
        other => other,
    })?;
    let bytes = fs::metadata(path)
        .map_err(|e| bad(format!("cannot stat it: {e}")))?
        .len();
    Ok(BackupInfo {
        entries: meta.records,
        bytes,
        created_ms: meta.created_ms,
        data_dir_id: meta.id,
        duration: started.elapsed(),
    })
}

/// What [`restore_backup`] did.
#[derive(Clone, Debug)]
pub struct Restored {
    /// The backup as checked.
    pub backup: BackupInfo,
    /// The data folder's id, which the installed snapshot now carries.
    pub data_dir_id: DirId,
}

impl Restored {
    /// True when the backup was taken from this same data folder.
    pub fn same_folder(&self) -> bool {
        self.backup.data_dir_id == Some(self.data_dir_id)
    }
}

/// Rebuilds `data_dir` from the backup `file`: checks the whole file first (a bad one changes
/// nothing), takes the folder's lock (so no node runs on it), refuses a folder that holds data
/// unless `force`, then installs the backup as `snapshot.db` atomically (temp file, fsync,
/// rename, fsync of the folder) and removes the old spare snapshot and WAL segments. Hints
/// (`hints/`) and `IDENTITY` are kept; a folder without an identity gets one (with no owner
/// yet: the first node started on it records itself).
///
/// A restore is an explicit act of the operator: the installed snapshot carries this folder's
/// id whichever folder the backup came from (see [`Restored::same_folder`]).
///
/// The installed snapshot names a WAL segment after every existing one as its replay start, so
/// even a crash before the old segments are removed never replays them on top of the backup.
pub fn restore_backup(file: &Path, data_dir: &Path, force: bool) -> Result<Restored, Error> {
    let info = verify_backup(file)?;
    crate::files::create_private_dir(data_dir)
        .map_err(Error::io("create data folder", data_dir))?;
    let _lock = DirLock::acquire(data_dir)?;
    let found = data_entries(data_dir)?;
    if !found.is_empty() && !force {
        return Err(Error::DataDirNotEmpty {
            path: data_dir.to_owned(),
            found: found.join(", "),
        });
    }
    let id = identity::load_or_create(data_dir)?.id;
    let start = segment::list(&OsFs, data_dir)?
        .last()
        .map_or(1, |(n, _)| n + 1);
    let tmp = data_dir.join(snapshot::TMP_FILE_NAME);
    let installed = copy_with_start(file, &tmp, start, &info, id).and_then(|()| {
        // Check the bytes actually installed, not only the source read a moment ago.
        snapshot::load(&OsFs, &tmp, |_| {})?;
        // The old spare needs WAL segments that are about to go: it must not outlive them.
        remove_old_snapshots(data_dir)?;
        let target = data_dir.join(snapshot::FILE_NAME);
        fs::rename(&tmp, &target).map_err(Error::io("rename into place", &target))?;
        segment::sync_dir(&OsFs, data_dir)
    });
    if let Err(e) = installed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    segment::remove_before(&OsFs, data_dir, start)?;
    info!(
        file = %file.display(),
        dir = %data_dir.display(),
        entries = info.entries,
        replaced = !found.is_empty(),
        backup_id = ?info.data_dir_id,
        %id,
        "backup restored"
    );
    Ok(Restored {
        backup: info,
        data_dir_id: id,
    })
}

/// Removes the spare and any damaged snapshot kept aside, durably.
fn remove_old_snapshots(dir: &Path) -> Result<(), Error> {
    for name in [snapshot::SPARE_FILE_NAME, snapshot::DAMAGED_FILE_NAME] {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &path)(e)),
        }
    }
    segment::sync_dir(&OsFs, dir)
}

/// Names in the folder other than the lock file, at most a few, sorted.
fn data_entries(dir: &Path) -> Result<Vec<String>, Error> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(Error::io("list", dir))? {
        let name = entry.map_err(Error::io("list", dir))?.file_name();
        let name = name.to_string_lossy().into_owned();
        if name != lock::FILE_NAME {
            names.push(name);
        }
    }
    names.sort();
    names.truncate(5);
    Ok(names)
}

/// Copies the backup to `tmp` with a header naming `start` as the first WAL segment to
/// replay and `id` as its folder, and fsyncs it.
fn copy_with_start(
    file: &Path,
    tmp: &Path,
    start: u64,
    info: &BackupInfo,
    id: DirId,
) -> Result<(), Error> {
    let header_len = snapshot::read_header(&OsFs, file)?.len;
    let mut input = BufReader::new(File::open(file).map_err(Error::io("open", file))?);
    input
        .seek(SeekFrom::Start(header_len))
        .map_err(Error::io("seek", file))?;
    let out = crate::files::create_private(tmp).map_err(Error::io("create", tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let copied = out
        .write_all(&snapshot::header_bytes(start, info.created_ms, id))
        .and_then(|()| io::copy(&mut input, &mut out).map(drop))
        .and_then(|()| out.into_inner().map_err(|e| e.into_error()));
    let out = copied.map_err(Error::io("copy the backup to", tmp))?;
    out.sync_all().map_err(Error::io("fsync", tmp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Record, Store, StoreConfig};
    use bytes::Bytes;

    fn open(dir: &Path) -> Store {
        Store::open(StoreConfig::new(dir.to_owned(), 1)).unwrap()
    }

    fn record(store: &Store, key: &str, value: Option<&str>) -> Record {
        Record {
            key: key.into(),
            version: store.clock().tick(),
            value: value.map(|v| Bytes::from(v.to_owned())),
            expires_at_ms: None,
        }
    }

    /// A store with `k0..k{n}` written and every tenth key deleted again.
    async fn filled(dir: &Path, n: usize) -> Store {
        let store = open(dir);
        for i in 0..n {
            let put = record(&store, &format!("k{i}"), Some(&format!("v{i}")));
            store.apply(vec![put]).await.unwrap();
        }
        for i in (0..n).step_by(10) {
            let delete = record(&store, &format!("k{i}"), None);
            store.apply(vec![delete]).await.unwrap();
        }
        store
    }

    fn value(store: &Store, key: &str) -> Option<Vec<u8>> {
        store.get(key).and_then(|e| e.value).map(|v| v.to_vec())
    }

    #[tokio::test]
    async fn backup_restores_values_and_tombstones_and_changes_nothing_live() {
        let (live, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = filled(live.path(), 100).await;
        let before = store.status();
        let path = store.backup_temp_path();
        let written = store.backup_to(&path).unwrap();
        assert_eq!(written.entries, 100, "tombstones are kept: {written:?}");
        let after = store.status();
        assert_eq!(
            (after.keys, after.tombstones),
            (before.keys, before.tombstones)
        );
        assert!(!live.path().join(snapshot::FILE_NAME).exists());
        let checked = verify_backup(&path).unwrap();
        assert_eq!((checked.entries, checked.bytes), (100, written.bytes));

        let restored_dir = target.path().join("node");
        restore_backup(&path, &restored_dir, false).unwrap();
        let restored = open(&restored_dir);
        assert_eq!(restored.status().keys, 90);
        assert_eq!(restored.status().tombstones, 10);
        assert_eq!(value(&restored, "k7"), Some(b"v7".to_vec()));
        assert!(restored.get("k10").unwrap().is_tombstone());
        assert!(restored.clock().last_hlc() >= store.clock().last_hlc());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backup_taken_during_writes_holds_every_earlier_write() {
        let (live, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = filled(live.path(), 300).await;
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..300 {
                    let put = record(&store, &format!("during{i}"), Some("x"));
                    store.apply(vec![put]).await.unwrap();
                }
            })
        };
        let path = store.backup_temp_path();
        let backup = {
            let (store, path) = (store.clone(), path.clone());
            tokio::task::spawn_blocking(move || store.backup_to(&path))
        };
        backup.await.unwrap().unwrap();
        writer.await.unwrap();
        restore_backup(&path, target.path(), false).unwrap();
        let restored = open(target.path());
        for i in 1..300 {
            let want = (i % 10 != 0).then(|| format!("v{i}").into_bytes());
            assert_eq!(value(&restored, &format!("k{i}")), want, "k{i}");
        }
    }

    #[tokio::test]
    async fn bad_files_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(&dir.path().join("live"), 20).await;
        let good = dir.path().join("good.db");
        store.backup_to(&good).unwrap();
        let bytes = fs::read(&good).unwrap();
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 0x40;
        let foreign: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let cases: [(&str, &[u8]); 5] = [
            ("truncated", &bytes[..bytes.len() - 7]),
            ("half", &bytes[..bytes.len() / 2]),
            ("flipped", &flipped),
            ("foreign", &foreign),
            ("empty", b""),
        ];
        let target = dir.path().join("target");
        for (name, content) in cases {
            let path = dir.path().join(name);
            fs::write(&path, content).unwrap();
            let err = restore_backup(&path, &target, false).unwrap_err();
            assert!(matches!(err, Error::BadBackup { .. }), "{name}: {err}");
            assert!(err.to_string().contains(name), "names the file: {err}");
            assert!(!target.exists(), "{name}: the data folder was not touched");
        }
        let missing = restore_backup(&dir.path().join("missing"), &target, false).unwrap_err();
        assert!(matches!(missing, Error::BadBackup { .. }), "{missing}");
    }

    #[tokio::test]
    async fn restore_needs_force_for_a_used_folder_and_then_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let source = filled(&dir.path().join("source"), 20).await;
        let backup = dir.path().join("backup.db");
        source.backup_to(&backup).unwrap();

        let used = dir.path().join("used");
        let old = filled(&used, 5).await;
        let extra = record(&old, "only-in-old-wal", Some("old"));
        old.apply(vec![extra]).await.unwrap();
        let err = restore_backup(&backup, &used, false).unwrap_err();
        assert!(
            matches!(err, Error::Locked { .. }),
            "a running store: {err}"
        );
        drop(old);
        let err = restore_backup(&backup, &used, false).unwrap_err();
        assert!(matches!(err, Error::DataDirNotEmpty { .. }), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");

        restore_backup(&backup, &used, true).unwrap();
        let restored = open(&used);
        assert_eq!(
            restored.get("only-in-old-wal"),
            None,
            "old WAL not replayed"
        );
        assert_eq!(value(&restored, "k19"), Some(b"v19".to_vec()));
        assert_eq!(restored.status().keys, 18);
    }

    #[test]
    fn stale_backup_files_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let stale = temp_path(dir.path());
        fs::write(&stale, b"half a backup").unwrap();
        fs::write(dir.path().join("backup-notes.txt"), b"kept").unwrap();
        drop(open(dir.path()));
        assert!(!stale.exists());
        assert!(dir.path().join("backup-notes.txt").exists());
    }

    #[tokio::test]
    async fn a_restore_stamps_the_folders_id_whoever_took_the_backup() {
        let dir = tempfile::tempdir().unwrap();
        let node = filled(&dir.path().join("node"), 20).await;
        let own = dir.path().join("own.db");
        node.backup_to(&own).unwrap();
        node.checkpoint().await.unwrap();
        node.checkpoint().await.unwrap();
        let node_id = node.data_dir_id();
        drop(node);
        let other = filled(&dir.path().join("other"), 30).await;
        let foreign = dir.path().join("foreign.db");
        other.backup_to(&foreign).unwrap();
        assert_eq!(
            verify_backup(&foreign).unwrap().data_dir_id,
            Some(other.data_dir_id())
        );

        let restored = restore_backup(&own, &dir.path().join("node"), true).unwrap();
        assert!(restored.same_folder());
        assert_eq!(restored.data_dir_id, node_id);
        assert!(
            !dir.path()
                .join("node")
                .join(snapshot::SPARE_FILE_NAME)
                .exists(),
            "the old spare went with the WAL it needed"
        );
        let restored = restore_backup(&foreign, &dir.path().join("node"), true).unwrap();
        assert!(!restored.same_folder());
        assert_eq!(restored.data_dir_id, node_id, "the folder keeps its id");
        let header =
            snapshot::read_header(&OsFs, &dir.path().join("node").join(snapshot::FILE_NAME));
        assert_eq!(header.unwrap().id, Some(node_id), "re-stamped");
        let store = open(&dir.path().join("node"));
        assert_eq!(store.status().keys, 27);

        let fresh = restore_backup(&foreign, &dir.path().join("fresh"), false).unwrap();
        assert!(!fresh.same_folder());
        assert_eq!(
            open(&dir.path().join("fresh")).data_dir_id(),
            fresh.data_dir_id
        );
    }
}
