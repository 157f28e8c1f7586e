//! Store configuration: where the files live, when the WAL is fsynced, when checkpoints run.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::Error;

/// When the WAL is fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Before every acknowledgement; concurrent writes share one fsync (group commit).
    Always,
    /// Every [`StoreConfig::sync_interval`]; a crash loses at most that much acknowledged data.
    Interval,
    /// Never (the OS flushes when it likes); for tests and throwaway data.
    Never,
}

/// Parses `always`, `interval` or `never` (any case).
impl FromStr for SyncMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<SyncMode, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "always" => Ok(SyncMode::Always),
            "interval" => Ok(SyncMode::Interval),
            "never" => Ok(SyncMode::Never),
            _ => Err(Error::BadSyncMode(s.to_owned())),
        }
    }
}

/// Settings of one [`Store`](crate::Store).
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Folder holding the lock file, WAL segments and `snapshot.db`; created if missing.
    pub data_dir: PathBuf,
    /// When the WAL is fsynced.
    pub sync: SyncMode,
    /// Fsync period for [`SyncMode::Interval`]. Default 100 ms.
    pub sync_interval: Duration,
    /// Period of the background checkpoint. Default 300 s.
    pub snapshot_interval: Duration,
    /// A checkpoint starts when the WAL grows past this many bytes. Default 64 MiB.
    pub wal_max_bytes: u64,
    /// Each WAL segment is preallocated to this many bytes (`fallocate`) before it is used, and
    /// segments a checkpoint frees are recycled as the next one, so an fsync of a commit has no
    /// file size or block map to update. A segment that fills up grows as before. Default
    /// 64 MiB; 0 turns preallocation and recycling off.
    pub wal_prealloc_bytes: u64,
    /// With [`SyncMode::Always`], how long a group commit may wait for more writes to share
    /// its fsync, when the previous commit was recent (writes are flowing) and waiting has been
    /// gathering writes lately. Default 100 µs; zero never waits (commits as soon as the writer
    /// is free).
    pub wal_batch_delay: Duration,
    /// Tombstones written longer ago than this are dropped at checkpoint. Default 24 h.
    pub tombstone_grace: Duration,
    /// Below this much free disk space the store turns read-only (writes refused with
    /// [`Error::DiskFull`], reads go on) until space returns. Default 64 MiB; 0 turns the
    /// reserve off (the store still turns read-only on ENOSPC).
    pub min_free_bytes: u64,
    /// How often free space is probed (to enter the reserve, and to resume). Default 1 s.
    pub disk_probe_interval: Duration,
    /// This node's id, stamped on the versions its clock issues.
    pub node_id: u32,
    /// The node this store belongs to. When set, a folder whose `IDENTITY` names another node
    /// is refused ([`Error::ForeignDataDir`]), and a folder without an owner yet records this
    /// one. `None` (the default): no check.
    pub owner: Option<crate::DataOwner>,
}

impl StoreConfig {
    /// A configuration with the defaults documented on each field.
    pub fn new(data_dir: PathBuf, node_id: u32) -> Self {
        StoreConfig {
            data_dir,
            sync: SyncMode::Always,
            sync_interval: Duration::from_millis(100),
            snapshot_interval: Duration::from_secs(300),
            wal_max_bytes: 64 * 1024 * 1024,
            wal_prealloc_bytes: 64 * 1024 * 1024,
            wal_batch_delay: Duration::from_micros(100),
            tombstone_grace: Duration::from_secs(24 * 60 * 60),
            min_free_bytes: 64 * 1024 * 1024,
            disk_probe_interval: Duration::from_secs(1),
            node_id,
            owner: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_mode_parses_and_explains() {
        assert_eq!("always".parse::<SyncMode>().unwrap(), SyncMode::Always);
        assert_eq!(
            " Interval ".parse::<SyncMode>().unwrap(),
            SyncMode::Interval
        );
        assert_eq!("NEVER".parse::<SyncMode>().unwrap(), SyncMode::Never);
        let err = "sometimes".parse::<SyncMode>().unwrap_err().to_string();
        assert!(
            err.contains("always, interval or never") && err.contains("sometimes"),
            "{err}"
        );
    }

    #[test]
    fn defaults() {
        let c = StoreConfig::new("/d".into(), 7);
        assert_eq!(c.sync, SyncMode::Always);
        assert_eq!(c.sync_interval, Duration::from_millis(100));
        assert_eq!(c.snapshot_interval, Duration::from_secs(300));
        assert_eq!(c.wal_max_bytes, 64 << 20);
        assert_eq!(c.wal_prealloc_bytes, 64 << 20);
        assert_eq!(c.wal_batch_delay, Duration::from_micros(100));
        assert_eq!(c.tombstone_grace, Duration::from_secs(86_400));
        assert_eq!(c.min_free_bytes, 67_108_864);
        assert_eq!(c.disk_probe_interval, Duration::from_secs(1));
    }
}
