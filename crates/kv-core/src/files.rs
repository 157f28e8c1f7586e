//! Owner-only files and folders: everything kv writes under `DATA_DIR` (WAL segments, snapshots,
//! backups, the lock file, hints, `members.json`) is created through here, folders `0700` and
//! files `0600`, so other local users can read neither keys nor values.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use tracing::warn;

/// Mode of every folder kv creates: owner read, write, search.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file kv creates: owner read and write.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and any missing parents with [`DIR_MODE`]. An existing folder whose mode lets
/// group or others in is tightened to [`DIR_MODE`], with a warning naming the old mode.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let mode = fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
        warn!(
            path = %dir.display(),
            old_mode = format!("{mode:o}"),
            new_mode = format!("{DIR_MODE:o}"),
            "data folder was readable by other users; tightened"
        );
    }
    Ok(())
}

/// Options that create files with [`FILE_MODE`]; add `create`, `append`, ... as needed.
pub fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Creates (or truncates) `path` for writing, with [`FILE_MODE`] when it is new.
pub fn create_private(path: &Path) -> io::Result<File> {
    private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

/// Writes `bytes` to `path` (created with [`FILE_MODE`], truncated if it exists), without fsync.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    create_private(path)?.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn folders_are_created_and_tightened_to_owner_only() {
        let root = tempfile::tempdir().unwrap();
        let nested = root.path().join("a").join("b");
        create_private_dir(&nested).unwrap();
        assert_eq!(mode(&nested), DIR_MODE);
        assert_eq!(mode(&root.path().join("a")), DIR_MODE, "parents too");

        let loose = root.path().join("loose");
        fs::create_dir(&loose).unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&loose).unwrap();
        assert_eq!(mode(&loose), DIR_MODE);
    }

    #[test]
    fn files_are_owner_only() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("f");
        write_private(&path, b"secret").unwrap();
        assert_eq!(mode(&path), FILE_MODE);
        assert_eq!(fs::read(&path).unwrap(), b"secret");
        write_private(&path, b"x").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"x", "truncated on rewrite");
    }
}
