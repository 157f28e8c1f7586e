//! The file operations the storage engine uses, behind a trait: [`OsFs`] is the real file system
//! (a zero-sized type; every call is a direct, statically dispatched call to `std::fs`), and the
//! tests' simulated disk (`sim`) models a page cache that a power cut can tear.
//!
//! The engine's WAL segments, snapshots, clock reservation, lock and the recovery that reads
//! them all go through a [`Vfs`]; backups (files the operator names, anywhere) use [`OsFs`].

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::lock::DirLock;
use crate::Error;

/// An open file.
pub trait VfsFile: Read + Write + Send + 'static {
    /// Makes the file's data and metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
    /// Makes the file's data durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's current length.
    fn size(&self) -> io::Result<u64>;
    /// Reserves disk blocks up to `len` bytes (`fallocate`; the file grows to `len` and reads
    /// zeros there), so later writes below `len` change no file size or block map and an
    /// `fdatasync` after them has no metadata to journal. Never shrinks the file.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Moves the position the next `write` writes at.
    fn seek_to(&mut self, pos: u64) -> io::Result<()>;
}

/// A file system: the few operations kv-core needs, with POSIX meaning (a rename, creation or
/// removal is durable only once its folder is synced with [`Vfs::sync_dir`]).
pub trait Vfs: Clone + Send + Sync + 'static {
    /// An open file.
    type File: VfsFile;
    /// The data folder's lock, held while a store is open.
    type Lock: Send + Sync + 'static;

    /// Creates `dir` and its parents (owner-only).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Takes `dir`'s lock without waiting ([`Error::Locked`] if it is held).
    fn lock(&self, dir: &Path) -> Result<Self::Lock, Error>;
    /// Creates a new file for appending; fails if it exists.
    fn create_new(&self, path: &Path) -> io::Result<Self::File>;
    /// Creates (or truncates) a file for writing.
    fn create(&self, path: &Path) -> io::Result<Self::File>;
    /// Opens an existing file for writing (truncation).
    fn open_write(&self, path: &Path) -> io::Result<Self::File>;
    /// Opens an existing file for reading.
    fn open_read(&self, path: &Path) -> io::Result<Self::File>;
    /// Reads a whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The length of a file ([`io::ErrorKind::NotFound`] if there is none).
    fn len(&self, path: &Path) -> io::Result<u64>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// Renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The paths of the entries in `dir`, in no particular order.
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Makes the creations, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Asks the kernel to drop `path`'s cached pages, so the next read comes from the disk
    /// (advice only; nothing by default).
    fn drop_cache(&self, _path: &Path) {}
}

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsFs;

impl VfsFile for File {
    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let size = self.metadata()?.len();
        if len <= size {
            return Ok(());
        }
        match rustix::fs::fallocate(self, rustix::fs::FallocateFlags::empty(), size, len - size) {
            Ok(()) => Ok(()),
            // A file system without fallocate: a sparse extension (correct, only not reserved).
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => File::set_len(self, len),
            Err(e) => Err(e.into()),
        }
    }

    fn seek_to(&mut self, pos: u64) -> io::Result<()> {
        use std::io::Seek;
        self.seek(io::SeekFrom::Start(pos)).map(drop)
    }
}

impl Vfs for OsFs {
    type File = File;
    type Lock = DirLock;

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        crate::files::create_private_dir(dir)
    }

    fn lock(&self, dir: &Path) -> Result<DirLock, Error> {
        DirLock::acquire(dir)
    }

    fn create_new(&self, path: &Path) -> io::Result<File> {
        crate::files::private_options()
            .create_new(true)
            .append(true)
            .open(path)
    }

    fn create(&self, path: &Path) -> io::Result<File> {
        crate::files::create_private(path)
    }

    fn open_write(&self, path: &Path) -> io::Result<File> {
        fs::OpenOptions::new().write(true).open(path)
    }

    fn open_read(&self, path: &Path) -> io::Result<File> {
        File::open(path)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        fs::read_dir(dir)?
            .map(|entry| entry.map(|e| e.path()))
            .collect()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn drop_cache(&self, path: &Path) {
        if let Ok(file) = File::open(path) {
            let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
        }
    }
}

/// Writes `bytes` to `path` atomically and durably: a temp file `tmp`, fsync, rename, fsync of
/// the folder.
pub(crate) fn write_atomic<V: Vfs>(
    vfs: &V,
    dir: &Path,
    tmp: &Path,
    path: &Path,
    bytes: &[u8],
) -> io::Result<()> {
    let mut file = vfs.create(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    vfs.rename(tmp, path)?;
    vfs.sync_dir(dir)
}
