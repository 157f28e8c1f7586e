//! The data directory's lock file `LOCK`: held for the life of a store, so a second process
//! (or a second store in the same process) on the same folder fails clearly instead of
//! interleaving writes.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::Error;

/// File name of the lock in the data folder.
pub(crate) const FILE_NAME: &str = "LOCK";

/// An exclusive advisory lock (`flock`) on `data_dir/LOCK`, released when dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock without waiting; [`Error::Locked`] if another holder has it.
    pub fn acquire(dir: &Path) -> Result<DirLock, Error> {
        let path = dir.join(FILE_NAME);
        let mut file = crate::files::private_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(Error::io("open lock file", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked { path }),
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", &path)(e)),
        }
        // The holder's pid, for an operator wondering who holds it.
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(Error::io("write lock file", &path))?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_until_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        match DirLock::acquire(dir.path()) {
            Err(Error::Locked { path }) => assert_eq!(path, dir.path().join("LOCK")),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
