//! The store facade: opens a data folder (lock, identity, recovery), runs the WAL writer and
//! checkpoint threads, and offers get / apply / checkpoint / scan / status / shutdown to the node.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::backup::{self, BackupInfo};
use crate::checkpoint::{CheckpointSignal, Checkpointer};
use crate::identity::{self, DirId, Identity};
use crate::map::{KeyRange, MapObserver, ShardedMap};
use crate::vfs::{OsFs, Vfs};
use crate::wal::{self, WalCommand, WalState, WalWriter, WAL_QUEUE_CAPACITY};
use crate::Version;
use crate::{
    recovery, segment, CheckpointStats, Clock, Entry, Error, Record, StoreConfig, SyncMode,
};

/// A point-in-time view of the store for status pages and metrics.
#[derive(Clone, Debug, Default)]
pub struct StoreStatus {
    /// Keys with a value (tombstones not counted).
    pub keys: u64,
    /// Keys whose newest write is a delete, kept until the tombstone grace period ends.
    pub tombstones: u64,
    /// Sum of the live values' lengths.
    pub value_bytes: u64,
    /// Bytes in the WAL segments not yet covered by a snapshot.
    pub wal_bytes: u64,
    /// When the newest snapshot was written (by this process or, after restart, before).
    pub last_snapshot: Option<SystemTime>,
    /// Why writes are refused, when the WAL has failed (until restart).
    pub failed: Option<String>,
    /// Why writes are refused, while the disk is full or below the reserve (lifts by itself).
    pub read_only: Option<String>,
    /// The data folder.
    pub data_dir: PathBuf,
    /// WAL fsyncs since start.
    pub wal_fsyncs: u64,
    /// Total time spent in WAL fsyncs since start, in microseconds.
    pub wal_fsync_micros: u64,
    /// Group commits (one write each) since start.
    pub wal_batches: u64,
    /// `apply` calls served by those group commits.
    pub wal_appends: u64,
    /// Records written to the WAL (records not newer than the stored version are not written).
    pub wal_records: u64,
}

/// The storage engine of one node: a sharded in-memory map made durable by a WAL and snapshots.
///
/// Cheap to clone (all clones share one store). Dropping the last clone without
/// [`Store::shutdown`] behaves like a crash as far as the files go: no final checkpoint is
/// written, but queued writes are still finished and the background threads are joined.
///
/// `V` is the file system: [`OsFs`] (the default) in production; the tests run the same code
/// on a simulated disk.
pub struct Store<V: Vfs = OsFs> {
    inner: Arc<Inner<V>>,
}

impl<V: Vfs> Clone for Store<V> {
    fn clone(&self) -> Self {
        Store {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// Field order matters for drop: `tx` goes first (the writer drains its queue and exits),
/// then `threads` joins the threads, and the lock is released last.
struct Inner<V: Vfs> {
    tx: mpsc::Sender<WalCommand<V::File>>,
    threads: Threads,
    map: Arc<ShardedMap>,
    clock: Arc<Clock>,
    wal: Arc<WalState>,
    signal: Arc<CheckpointSignal>,
    last_snapshot: Arc<Mutex<Option<SystemTime>>>,
    closed: AtomicBool,
    tombstone_horizon: Arc<AtomicU64>,
    data_dir: PathBuf,
    id: DirId,
    /// The file system (read by the test hooks only; the threads hold their own clones).
    #[cfg_attr(not(test), allow(dead_code))]
    vfs: V,
    _lock: V::Lock,
}

/// The background threads; joined on shutdown or drop.
struct Threads {
    writer: Mutex<Option<JoinHandle<()>>>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    ticker: Mutex<Option<JoinHandle<()>>>,
    probe: Mutex<Option<JoinHandle<()>>>,
    ticker_stop: Arc<AtomicBool>,
    signal: Arc<CheckpointSignal>,
}

impl Threads {
    fn join(&self) {
        self.signal.stop();
        self.ticker_stop.store(true, Ordering::Release);
        for slot in [&self.probe, &self.ticker, &self.checkpointer, &self.writer] {
            if let Some(handle) = slot.lock().take() {
                handle.thread().unpark();
                let _ = handle.join();
            }
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.join();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, Error> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::Io {
            op: "start thread",
            path: name.into(),
            source: e,
        })
}

impl<V: Vfs> std::fmt::Debug for Store<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("data_dir", &self.inner.data_dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Blocking: creates `data_dir` if missing, takes its lock file (a second store on the same
    /// folder fails with [`Error::Locked`]), reads its `IDENTITY` (a folder of another owner
    /// fails with [`Error::ForeignDataDir`]), recovers (snapshot or its spare, then WAL replay;
    /// a file of another folder fails with [`Error::ForeignFile`]), writes the identity if the
    /// folder had none, and starts the WAL writer and checkpoint threads.
    pub fn open(config: StoreConfig) -> Result<Store, Error> {
        Store::open_with(config, OsFs)
    }
}

impl<V: Vfs> Store<V> {
    /// [`Store::open`] on the file system `vfs` (the tests' simulated disk).
    pub fn open_with(config: StoreConfig, vfs: V) -> Result<Store<V>, Error> {
        let started = Instant::now();
        let dir = config.data_dir.clone();
        vfs.create_dir_all(&dir)
            .map_err(Error::io("create data folder", &dir))?;
        let lock = vfs.lock(&dir)?;
        let found = identity::load_with(&vfs, &dir)?;
        if let (Some(found), Some(owner)) = (&found, &config.owner) {
            identity::check_owner(&dir, found, owner)?;
        }
        let folder = recovery::FolderId {
            id: found.as_ref().map_or_else(DirId::random, |f| f.id),
            stored: found.is_some(),
        };
        let map = Arc::new(ShardedMap::default());
        let reservation = Arc::new(crate::reservation::Reservation::load(&vfs, &dir)?);
        let clock = Arc::new(Clock::reserved(config.node_id, reservation));
        let recovered = recovery::recover(&vfs, &dir, folder, &map, &clock)?;
        debug!(
            segments = recovered.synced_segments,
            "replayed WAL segments fsynced"
        );
        record_identity(&vfs, &dir, found, folder.id, config.owner.clone())?;
        let (file, salt) = segment::start(
            &vfs,
            &dir,
            recovered.next_segment,
            folder.id,
            config.wal_prealloc_bytes,
            config.min_free_bytes,
        )?;
        let wal = Arc::new(WalState::default());
        wal.segment.store(recovered.next_segment, Ordering::Relaxed);
        // A node started on a full disk is read-only from its first request.
        wal.space.probe(&dir, config.min_free_bytes);
        wal.wal_bytes.store(
            recovered.wal_bytes + segment::HEADER_LEN as u64,
            Ordering::Relaxed,
        );
        let (signal, wake) = CheckpointSignal::new();
        let (tx, rx) = mpsc::channel(WAL_QUEUE_CAPACITY);
        let last_snapshot = Arc::new(Mutex::new(recovered.last_snapshot));
        let tombstone_horizon = Arc::new(AtomicU64::new(u64::MAX));
        let threads = Threads {
            writer: Mutex::new(None),
            checkpointer: Mutex::new(None),
            ticker: Mutex::new(None),
            probe: Mutex::new(None),
            ticker_stop: Arc::new(AtomicBool::new(false)),
            signal: Arc::clone(&signal),
        };
        let writer = WalWriter {
            vfs: vfs.clone(),
            dir: dir.clone(),
            id: folder.id,
            sync: config.sync,
            sync_interval: config.sync_interval,
            batch_delay: config.wal_batch_delay,
            idle_waits: 0,
            skip_waits: 0,
            wal_max_bytes: config.wal_max_bytes,
            segment: recovered.next_segment,
            file,
            salt,
            len: segment::HEADER_LEN as u64,
            durable: segment::HEADER_LEN as u64,
            min_free_bytes: config.min_free_bytes,
            since_probe: 0,
            map: Arc::clone(&map),
            clock: Arc::clone(&clock),
            state: Arc::clone(&wal),
            checkpoint: Arc::clone(&signal),
            unsynced: false,
            last_sync: Instant::now(),
            buf: Vec::new(),
        };
        *threads.writer.lock() = Some(spawn("kv-wal-writer", move || writer.run(rx))?);
        let checkpointer = Checkpointer {
            vfs: vfs.clone(),
            dir: dir.clone(),
            id: folder.id,
            covered_until: AtomicU64::new(recovered.replay_start),
            prealloc: config.wal_prealloc_bytes,
            reserve: config.min_free_bytes,
            spare: Mutex::new(None),
            map: Arc::clone(&map),
            clock: Arc::clone(&clock),
            wal: Arc::clone(&wal),
            wal_tx: tx.downgrade(),
            signal: Arc::clone(&signal),
            interval: config.snapshot_interval,
            tombstone_grace: config.tombstone_grace,
            tombstone_horizon: Arc::clone(&tombstone_horizon),
            last_snapshot: Arc::clone(&last_snapshot),
        };
        *threads.checkpointer.lock() =
            Some(spawn("kv-checkpoint", move || checkpointer.run(wake))?);
        let probe = crate::space::spawn_probe(
            Arc::clone(&wal),
            dir.clone(),
            config.min_free_bytes,
            config.disk_probe_interval,
            Arc::clone(&threads.ticker_stop),
        )
        .map_err(|e| Error::Io {
            op: "start thread",
            path: "kv-disk-probe".into(),
            source: e,
        })?;
        *threads.probe.lock() = Some(probe);
        if config.sync == SyncMode::Interval {
            let stop = Arc::clone(&threads.ticker_stop);
            let ticker = wal::spawn_sync_ticker(tx.downgrade(), config.sync_interval, stop)
                .map_err(|e| Error::Io {
                    op: "start thread",
                    path: "kv-wal-sync".into(),
                    source: e,
                })?;
            *threads.ticker.lock() = Some(ticker);
        }
        let store = Store {
            inner: Arc::new(Inner {
                tx,
                threads,
                map,
                clock,
                wal,
                signal,
                last_snapshot,
                closed: AtomicBool::new(false),
                tombstone_horizon,
                data_dir: dir,
                id: folder.id,
                vfs,
                _lock: lock,
            }),
        };
        let status = store.status();
        info!(
            dir = %status.data_dir.display(),
            id = %folder.id,
            from_spare = recovered.used_spare,
            keys = status.keys,
            tombstones = status.tombstones,
            sync = ?config.sync,
            duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "store open"
        );
        Ok(store)
    }

    /// The data folder's id (in its `IDENTITY`, stamped on its snapshots and WAL segments).
    pub fn data_dir_id(&self) -> DirId {
        self.inner.id
    }

    /// The key's newest entry; tombstones are returned too (the caller decides on 404).
    pub fn get(&self, key: &str) -> Option<Entry> {
        self.inner.map.get(key)
    }

    /// The clock that issues this node's versions.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// Makes the records durable per the sync mode (one group-commit fsync shared with
    /// concurrent callers), applies them to the map last-writer-wins (a record whose version is
    /// not greater than the stored one is ignored, and not written), and returns for each record
    /// whether it was newer and applied. Every record's version is observed into the clock.
    ///
    /// Cancellation-safe: once the records are queued to the writer, they are written and
    /// applied even if this future is dropped; if it is dropped while waiting for room in the
    /// bounded queue, nothing was written.
    pub async fn apply(&self, records: Vec<Record>) -> Result<Vec<bool>, Error> {
        self.check_open()?;
        self.inner.wal.check()?;
        wal::validate(&records)?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        for r in &records {
            self.inner.clock.observe(r.version);
        }
        let (reply, answer) = oneshot::channel();
        let command = WalCommand::Append { records, reply };
        self.inner
            .tx
            .send(command)
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Runs a checkpoint now (the same routine as the periodic one) and waits for it. Writes go
    /// on meanwhile.
    pub async fn checkpoint(&self) -> Result<CheckpointStats, Error> {
        self.check_open()?;
        self.inner
            .signal
            .request_now()
            .await
            .map_err(|_| Error::Closed)?
    }

    /// Blocking (run it on a blocking thread): writes a backup of the live map to `path` in the
    /// snapshot format, fsynced, while writes go on. The file holds every write acknowledged
    /// before this call (see [`BackupInfo`] for exactly what it holds); the map, the WAL and
    /// `snapshot.db` are not changed. A failed backup leaves no file.
    pub fn backup_to(&self, path: &Path) -> Result<BackupInfo, Error> {
        self.check_open()?;
        let result = backup::write(path, &self.inner.map, &self.inner.clock, self.inner.id);
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("kv_backups_total", "result" => outcome).increment(1);
        match &result {
            Ok(info) => {
                metrics::histogram!("kv_backup_duration_seconds")
                    .record(info.duration.as_secs_f64());
                metrics::gauge!("kv_backup_bytes").set(info.bytes as f64);
                info!(
                    path = %path.display(),
                    entries = info.entries,
                    bytes = info.bytes,
                    duration_ms = u64::try_from(info.duration.as_millis()).unwrap_or(u64::MAX),
                    "backup written"
                );
            }
            Err(e) => warn!(path = %path.display(), error = %e, "backup failed"),
        }
        result
    }

    /// A fresh path for a temporary backup file inside the data folder (same file system, so
    /// space is where the operator expects it). A crash leaves it behind only until the next
    /// start, which removes it.
    pub fn backup_temp_path(&self) -> PathBuf {
        backup::temp_path(&self.inner.data_dir)
    }

    /// Collects tombstones only when they were written before `ms` (Unix milliseconds) as well
    /// as before the grace period: the cluster layer's anti-entropy sets it to the time up to
    /// which every replica is known to hold every tombstone. `u64::MAX` (the default): the grace
    /// alone decides.
    pub fn set_tombstone_horizon(&self, ms: u64) {
        self.inner.tombstone_horizon.store(ms, Ordering::Release);
    }

    /// Installs the map's one [`MapObserver`] (false if one is installed already).
    pub fn set_map_observer(&self, observer: Arc<dyn MapObserver>) -> bool {
        self.inner.map.set_observer(observer)
    }

    /// Number of map shards, for [`Store::visit_shard`].
    pub fn shard_count(&self) -> usize {
        self.inner.map.shard_count()
    }

    /// See [`ShardedMap::visit_shard`].
    pub fn visit_shard(
        &self,
        index: usize,
        f: impl FnOnce(&mut dyn Iterator<Item = (&str, Version)>),
    ) {
        self.inner.map.visit_shard(index, f);
    }

    /// Drops `key` when it still holds exactly `version` (see [`ShardedMap::forget_if`]); not
    /// logged, like [`Store::forget`].
    pub fn forget_if(&self, key: &str, version: Version) -> bool {
        self.inner.map.forget_if(key, version)
    }

    /// Removes keys from the map without tombstones (keys this node stopped owning after a
    /// membership change). Not logged: the caller checkpoints afterwards, and until then a
    /// restart brings the keys back, which is harmless. Returns how many were present.
    pub fn forget(&self, keys: &[String]) -> usize {
        self.inner.map.forget(keys)
    }

    /// Why writes are refused, when the WAL has failed (cheap: no counting). Final until
    /// restart; a full disk is reported by [`Store::read_only`] instead.
    pub fn write_refused(&self) -> Option<String> {
        self.inner.wal.failed.get().cloned()
    }

    /// Why writes are refused, while the disk is full or below the `MIN_FREE_BYTES` reserve.
    /// Lifts by itself once space returns (probed every `disk_probe_interval`).
    pub fn read_only(&self) -> Option<String> {
        self.inner.wal.space.reason()
    }

    /// `Ok` when a write would be taken now; else the error it would get
    /// ([`Error::WalFailed`], [`Error::DiskFull`] or [`Error::Closed`]).
    pub fn writable(&self) -> Result<(), Error> {
        self.check_open()?;
        self.inner.wal.check()
    }

    /// Counts, WAL figures and health.
    pub fn status(&self) -> StoreStatus {
        let counts = self.inner.map.counts();
        let wal = &self.inner.wal;
        StoreStatus {
            keys: counts.live,
            tombstones: counts.tombstones,
            value_bytes: counts.value_bytes,
            wal_bytes: wal.wal_bytes.load(Ordering::Relaxed),
            last_snapshot: *self.inner.last_snapshot.lock(),
            failed: wal.failed.get().cloned(),
            read_only: wal.space.reason(),
            data_dir: self.inner.data_dir.clone(),
            wal_fsyncs: wal.fsyncs.load(Ordering::Relaxed),
            wal_fsync_micros: wal.fsync_micros.load(Ordering::Relaxed),
            wal_batches: wal.batches.load(Ordering::Relaxed),
            wal_appends: wal.appends.load(Ordering::Relaxed),
            wal_records: wal.records.load(Ordering::Relaxed),
        }
    }

    /// Calls `f` for every entry (tombstones included) in key order; `f` runs with no lock held
    /// (see [`ShardedMap::scan`]).
    pub fn scan(&self, f: impl FnMut(&str, &Entry)) {
        self.inner.map.scan(f);
    }

    /// One page of entries (tombstones included) in key order, in O(log n + limit): see
    /// [`ShardedMap::range`].
    pub fn range(&self, range: &KeyRange<'_>) -> Vec<(String, Entry)> {
        self.inner.map.range(range)
    }

    /// Clean shutdown: refuses new writes, finishes and fsyncs the queued ones, writes a final
    /// checkpoint (so the next start reads no WAL) and joins the threads. Calling it again is a
    /// no-op. Reads keep working afterwards.
    pub async fn shutdown(&self) -> Result<(), Error> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        info!(dir = %self.inner.data_dir.display(), "store shutting down");
        let (reply, answer) = oneshot::channel();
        let flushed = match self.inner.tx.send(WalCommand::Shutdown { reply }).await {
            Ok(()) => answer.await.unwrap_or(Err(Error::Closed)),
            Err(_) => Err(Error::Closed),
        };
        let result = match flushed {
            Ok(segment) => {
                let answer = self.inner.signal.request_final(segment + 1);
                answer.await.unwrap_or(Err(Error::Closed)).map(|_| ())
            }
            Err(e) => Err(e),
        };
        // Both threads have answered and are exiting, so joining does not hold up the runtime.
        self.inner.threads.join();
        result
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Test hook: the next WAL write writes half its batch, then meets ENOSPC.
    #[cfg(test)]
    pub(crate) fn inject_disk_full(&self) {
        self.inner
            .wal
            .inject_disk_full
            .store(true, Ordering::Relaxed);
    }

    /// Test hook: free space as the probe sees it (`None`: the real figure).
    #[cfg(test)]
    pub(crate) fn fake_free_space(&self, free: Option<u64>) {
        *self.inner.wal.space.fake_free.lock() = free;
    }

    /// Test hook: the WAL's current segment file.
    #[cfg(test)]
    pub(crate) fn current_segment_path(&self) -> Option<PathBuf> {
        segment::list(&self.inner.vfs, &self.inner.data_dir)
            .ok()?
            .pop()
            .map(|(_, p)| p)
    }

    /// Test hook: the next WAL write fails as if the disk had.
    #[cfg(test)]
    pub(crate) fn inject_write_failure(&self) {
        self.inner
            .wal
            .inject_write_failure
            .store(true, Ordering::Relaxed);
    }
}

/// Writes `IDENTITY` when the folder had none (a new folder, or one from before identities,
/// whose files adopt the new id) or when it names no owner yet and `owner` is known; durable
/// before any file stamped with the id is created.
fn record_identity(
    vfs: &impl Vfs,
    dir: &Path,
    found: Option<Identity>,
    id: DirId,
    owner: Option<crate::DataOwner>,
) -> Result<(), Error> {
    let wanted = match found {
        Some(found) if found.owner.is_some() || owner.is_none() => return Ok(()),
        Some(found) => Identity { owner, ..found },
        None => Identity { id, owner },
    };
    info!(dir = %dir.display(), id = %wanted.id, owner = ?wanted.owner, "recording the data folder's identity");
    identity::store_with(vfs, dir, &wanted)
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
