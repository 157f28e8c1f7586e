//! Storage engine of kv: the in-memory map, the write-ahead log, snapshots and recovery.
//! No network, no HTTP: the node wires this to its API.
//!
//! # Layout
//!
//! - [`version`]: `Version` (hybrid logical clock + node id), `Clock`, `node_id`.
//! - `record`: what a record is and its bytes.
//! - [`frame`]: `[len][crc32c][payload]` framing and the torn-tail rule.
//! - [`map`]: the sharded in-memory map of newest entries (`Entry`).
//! - `segment`, `wal`: WAL segment files and the writer thread (group commit); [`batch`]: the
//!   batch header each group commit carries (format version 2) and its torn-versus-corrupt rule.
//! - `snapshot`, `checkpoint`: `snapshot.db` and the thread that writes it.
//! - `backup`: backups in the snapshot format (`Store::backup_to`), their check and restore.
//! - `recovery`: snapshot load plus WAL replay at start-up.
//! - `space`: free disk space, the `MIN_FREE_BYTES` reserve and the read-only (disk full) state.
//! - `lock`: the data folder's lock file; [`files`]: owner-only (`0700`/`0600`) folders and files.
//! - `identity`: `IDENTITY`, the folder's id (stamped on snapshots and segments) and owner.
//! - `store`: the `Store` facade; `config`: `StoreConfig`, `SyncMode`; `error`: `Error`.
//! - [`vfs`]: the file operations the engine uses (`Vfs`, the real `OsFs`); `sim` (tests
//!   only): a simulated disk whose page cache a power cut tears, and the crash property test.
//!
//! # Files in the data folder
//!
//! `LOCK` (held while open), `IDENTITY` (the folder's id and owner), `wal-00000001.log`,
//! `wal-00000002.log`, ... (WAL segments; only the newest is appended to; kept back to the
//! spare's first segment; preallocated), `wal-spare.log` (the next segment, preallocated and
//! headed ahead of time, often a recycled old one; never read by recovery), `snapshot.db` (the map at the last checkpoint, naming the first
//! segment to replay after it), `snapshot.prev.db` (the spare: the snapshot before, which
//! recovery falls back to), `snapshot.damaged.db` (a damaged snapshot recovery replaced by the
//! spare, kept for the operator) and, briefly, `snapshot.db.tmp` and `backup-*.tmp` (a backup
//! being written or streamed).
//!
//! # Metrics
//!
//! Recorded through the `metrics` facade (a no-op until the binary installs a recorder):
//! `kv_wal_appends_total`, `kv_wal_records_total`, `kv_wal_bytes_written_total`,
//! `kv_wal_fsync_seconds` (histogram), `kv_wal_batch_records` (histogram: records per group
//! commit), `kv_checkpoints_total{result}`, `kv_checkpoint_duration_seconds` (histogram),
//! `kv_snapshot_bytes`, `kv_snapshot_entries`, `kv_backups_total{result}`,
//! `kv_snapshot_fallbacks_total` (starts that used the spare), `kv_backup_duration_seconds`
//! (histogram), `kv_backup_bytes`, `kv_disk_free_bytes`,
//! `kv_disk_full_total` (times the store turned read-only).

mod backup;
pub mod batch;
mod checkpoint;
mod config;
mod error;
pub mod files;
pub mod frame;
mod identity;
mod lock;
pub mod map;
mod record;
mod recovery;
mod reservation;
mod segment;
#[cfg(test)]
mod sim;
mod snapshot;
mod space;
mod store;
pub mod version;
pub mod vfs;
mod wal;

pub use backup::{restore_backup, verify_backup, BackupInfo, Restored};
pub use checkpoint::CheckpointStats;
pub use config::{StoreConfig, SyncMode};
pub use error::Error;
pub use identity::{DataOwner, DirId};
pub use map::{Entry, KeyRange, MapObserver, MapObservers};
pub use record::{Record, MAX_KEY_LEN, MAX_VALUE_LEN};
pub use store::{Store, StoreStatus};
pub use version::{node_id, Clock, Version};
