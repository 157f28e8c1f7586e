//! The one error type of kv-core: every way the storage engine can fail, in words an operator
//! can act on (file paths, byte offsets, the reason).

use std::path::PathBuf;

/// Everything that can go wrong in the storage engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The WAL failed a write or fsync earlier; writes are refused until restart (fsyncgate:
    /// a failed fsync is never retried and then acknowledged).
    #[error("the write-ahead log failed and refuses writes until the node restarts: {reason}")]
    WalFailed {
        /// The original failure.
        reason: String,
    },
    /// The disk holding the data folder is full, or below the `MIN_FREE_BYTES` reserve: the
    /// store is read-only (reads go on, nothing of the refused write was kept) and takes writes
    /// again by itself once free space is back above the reserve.
    #[error(
        "the disk holding {} is full ({free_bytes} bytes free, reserve {reserve_bytes} bytes): \
         the node is read-only until space returns; nothing of this write was kept",
        path.display()
    )]
    DiskFull {
        /// The data folder.
        path: PathBuf,
        /// Free bytes the file system reported when the store turned read-only.
        free_bytes: u64,
        /// The configured reserve (`MIN_FREE_BYTES`).
        reserve_bytes: u64,
    },
    /// A file system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done: "open", "write", "fsync", "rename", ...
        op: &'static str,
        /// The file or folder it was done to.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A data file holds bytes that cannot be valid; start-up stops rather than lose data.
    #[error(
        "corrupt data in {} at byte offset {offset}: {reason}; start-up stopped so nothing is \
         lost silently (restore the file, or move it aside to start without it)",
        path.display()
    )]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Byte offset of the first bad byte range.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// A file has the wrong magic number or a format version this program cannot read.
    #[error("{} is not a kv data file this version can read: {reason}", path.display())]
    BadFormat {
        /// The file.
        path: PathBuf,
        /// Which check failed.
        reason: String,
    },
    /// The data folder's `IDENTITY` names another node: this node was started on another node's
    /// `DATA_DIR`. Nothing was read or changed.
    #[error(
        "DATA_DIR {} belongs to node {found_name} ({found_url}), not to this node {name} ({url}); \
         nothing was changed. Point DATA_DIR at this node's own folder. If this node was renamed \
         or moved on purpose, edit the name and url lines of {}/IDENTITY; to give this node \
         another node's data, restore a backup of it with `kv-node restore`",
        path.display(),
        path.display()
    )]
    ForeignDataDir {
        /// The data folder.
        path: PathBuf,
        /// The node the folder's identity names.
        found_name: String,
        /// That node's URL.
        found_url: String,
        /// This node's name.
        name: String,
        /// This node's URL.
        url: String,
    },
    /// A snapshot or WAL segment carries another data folder's id (copied in from another
    /// node's folder, or the folder's `IDENTITY` was replaced). Start-up stops before anything
    /// is replayed or deleted.
    #[error(
        "{} carries data directory id {file_id}, {reason}; start-up stopped before anything was \
         replayed or deleted",
        path.display()
    )]
    ForeignFile {
        /// The foreign file.
        path: PathBuf,
        /// The id in its header.
        file_id: String,
        /// What the folder's identity says, and what to do.
        reason: String,
    },
    /// Another process holds the data directory's lock file.
    #[error(
        "data directory lock {} is held by another process; is another kv-node using this DATA_DIR?",
        path.display()
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A backup file failed its check (wrong magic, truncated, a checksum mismatch, ...);
    /// nothing was changed.
    #[error("{} is not a usable kv backup: {reason}", path.display())]
    BadBackup {
        /// The backup file.
        path: PathBuf,
        /// Which check failed, with the byte offset when there is one.
        reason: String,
    },
    /// A restore found data in the target folder and was not told to replace it.
    #[error(
        "data directory {} is not empty (it holds {found}); restore refuses to replace it \
         without --force",
        path.display()
    )]
    DataDirNotEmpty {
        /// The data folder.
        path: PathBuf,
        /// Some of the names found there.
        found: String,
    },
    /// The store has been shut down.
    #[error("the store is shut down")]
    Closed,
    /// A version string did not parse.
    #[error(
        "invalid version {0:?}: expected 16 lowercase hex digits, '-', 8 lowercase hex digits"
    )]
    BadVersion(String),
    /// A sync mode string did not parse.
    #[error("invalid WAL sync mode {0:?}: expected always, interval or never")]
    BadSyncMode(String),
    /// A record is malformed or exceeds a format limit.
    #[error("invalid record: {reason}")]
    InvalidRecord {
        /// Which rule it breaks.
        reason: String,
    },
}

impl Error {
    /// Builds an [`Error::Io`] (shorthand for `map_err`).
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    /// A copy of this error for a second waiter (io errors keep kind and message).
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::WalFailed { reason } => Error::WalFailed {
                reason: reason.clone(),
            },
            Error::DiskFull {
                path,
                free_bytes,
                reserve_bytes,
            } => Error::DiskFull {
                path: path.clone(),
                free_bytes: *free_bytes,
                reserve_bytes: *reserve_bytes,
            },
            Error::Io { op, path, source } => Error::Io {
                op,
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::Corrupt {
                path,
                offset,
                reason,
            } => Error::Corrupt {
                path: path.clone(),
                offset: *offset,
                reason: reason.clone(),
            },
            Error::BadFormat { path, reason } => Error::BadFormat {
                path: path.clone(),
                reason: reason.clone(),
            },
            Error::ForeignDataDir {
                path,
                found_name,
                found_url,
                name,
                url,
            } => Error::ForeignDataDir {
                path: path.clone(),
                found_name: found_name.clone(),
                found_url: found_url.clone(),
                name: name.clone(),
                url: url.clone(),
            },
            Error::ForeignFile {
                path,
                file_id,
                reason,
            } => Error::ForeignFile {
                path: path.clone(),
                file_id: file_id.clone(),
                reason: reason.clone(),
            },
            Error::Locked { path } => Error::Locked { path: path.clone() },
            Error::BadBackup { path, reason } => Error::BadBackup {
                path: path.clone(),
                reason: reason.clone(),
            },
            Error::DataDirNotEmpty { path, found } => Error::DataDirNotEmpty {
                path: path.clone(),
                found: found.clone(),
            },
            Error::Closed => Error::Closed,
            Error::BadVersion(s) => Error::BadVersion(s.clone()),
            Error::BadSyncMode(s) => Error::BadSyncMode(s.clone()),
            Error::InvalidRecord { reason } => Error::InvalidRecord {
                reason: reason.clone(),
            },
        }
    }
}
