//! Checkpoints: the background thread that writes `snapshot.db` every snapshot interval, when
//! the WAL grows too big, on request and at shutdown (the snapshot it replaces becomes the spare
//! `snapshot.prev.db`), then drops the WAL segments that neither snapshot needs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::identity::DirId;
use crate::map::ShardedMap;
use crate::version::now_ms;
use crate::vfs::Vfs;
use crate::wal::{WalCommand, WalState};
use crate::{segment, snapshot, Clock, Error};

/// Wait before a WAL-size trigger may start another checkpoint after one failed.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

/// What one checkpoint did.
#[derive(Clone, Debug)]
pub struct CheckpointStats {
    /// Entries written to the snapshot (tombstones included).
    pub keys: u64,
    /// Size of the snapshot file.
    pub bytes: u64,
    /// Time from start to the durable rename and WAL clean-up.
    pub duration: Duration,
    /// Expired tombstones dropped from the map and the snapshot.
    pub tombstones_dropped: u64,
}

type Reply = oneshot::Sender<Result<CheckpointStats, Error>>;

/// Requests collected for the checkpoint thread.
#[derive(Default)]
struct Requests {
    waiters: Vec<Reply>,
    wal_full: bool,
    finish: Option<(u64, Reply)>,
    stop: bool,
    /// The thread has exited: new requests are answered by dropping their reply (`Closed`).
    closed: bool,
}

/// How others ask the checkpoint thread for work. Requests accumulate under a mutex; the wake
/// channel holds at most one token (when full, a wake-up is already pending, so none is lost).
#[derive(Debug)]
pub(crate) struct CheckpointSignal {
    requests: Mutex<Requests>,
    wake: SyncSender<()>,
}

impl std::fmt::Debug for Requests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requests")
            .field("waiters", &self.waiters.len())
            .finish_non_exhaustive()
    }
}

impl CheckpointSignal {
    /// The signal and the receiving end of its wake channel, for the thread.
    pub fn new() -> (Arc<CheckpointSignal>, Receiver<()>) {
        let (wake, rx) = sync_channel(1);
        (
            Arc::new(CheckpointSignal {
                requests: Mutex::default(),
                wake,
            }),
            rx,
        )
    }

    fn update(&self, f: impl FnOnce(&mut Requests)) {
        let mut requests = self.requests.lock();
        if requests.closed {
            return;
        }
        f(&mut requests);
        drop(requests);
        let _ = self.wake.try_send(());
    }

    /// Marks the thread gone and drops every pending reply.
    fn close(&self) {
        let mut requests = self.requests.lock();
        *requests = Requests {
            closed: true,
            ..Requests::default()
        };
    }

    /// The WAL passed its size bound (called by the writer after a batch).
    pub fn request_wal_full(&self) {
        let mut requests = self.requests.lock();
        if !requests.wal_full {
            requests.wal_full = true;
            drop(requests);
            let _ = self.wake.try_send(());
        }
    }

    /// Asks for a checkpoint that starts after this call.
    pub fn request_now(&self) -> oneshot::Receiver<Result<CheckpointStats, Error>> {
        let (tx, rx) = oneshot::channel();
        self.update(|r| r.waiters.push(tx));
        rx
    }

    /// Asks for the final checkpoint (writer stopped; replay starts at `start_segment`); the
    /// thread exits after it.
    pub fn request_final(
        &self,
        start_segment: u64,
    ) -> oneshot::Receiver<Result<CheckpointStats, Error>> {
        let (tx, rx) = oneshot::channel();
        self.update(|r| r.finish = Some((start_segment, tx)));
        rx
    }

    /// Makes the thread exit without a checkpoint (store dropped without shutdown).
    pub fn stop(&self) {
        self.update(|r| r.stop = true);
    }

    fn take(&self) -> Requests {
        let mut requests = self.requests.lock();
        let closed = requests.closed;
        std::mem::replace(
            &mut *requests,
            Requests {
                closed,
                ..Requests::default()
            },
        )
    }
}

/// The checkpoint thread's state.
pub(crate) struct Checkpointer<V: Vfs> {
    pub vfs: V,
    pub dir: PathBuf,
    /// The data folder's id, stamped on each snapshot.
    pub id: DirId,
    /// Segments from here on are not covered by `snapshot.db` yet (their bytes count in
    /// `wal_bytes`, which triggers checkpoints).
    pub covered_until: AtomicU64,
    /// Size WAL segments are preallocated to; 0: no spare segments, no recycling.
    pub prealloc: u64,
    /// `MIN_FREE_BYTES`: no spare is preallocated when it would bring free space near it.
    pub reserve: u64,
    /// The spare segment made ready ahead of the next rotation.
    pub spare: Mutex<Option<segment::Spare<V::File>>>,
    pub map: Arc<ShardedMap>,
    pub clock: Arc<Clock>,
    pub wal: Arc<WalState>,
    pub wal_tx: mpsc::WeakSender<WalCommand<V::File>>,
    pub signal: Arc<CheckpointSignal>,
    /// Zero disables the periodic checkpoint.
    pub interval: Duration,
    pub tombstone_grace: Duration,
    /// Tombstones written at or after this (Unix ms) are kept whatever their age: the cluster
    /// layer moves it forward once every replica is known to hold them (`u64::MAX`: no limit
    /// but the grace).
    pub tombstone_horizon: Arc<AtomicU64>,
    pub last_snapshot: Arc<Mutex<Option<SystemTime>>>,
}

/// `now + d`, or far in the future when that overflows.
fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

impl<V: Vfs> Checkpointer<V> {
    fn next_due(&self) -> Instant {
        deadline_after(if self.interval.is_zero() {
            Duration::MAX
        } else {
            self.interval
        })
    }

    /// Runs until the final checkpoint, a stop request, or the store being dropped.
    pub fn run(self, wake: Receiver<()>) {
        self.run_until_stopped(wake);
        self.signal.close();
    }

    fn run_until_stopped(&self, wake: Receiver<()>) {
        self.prepare_spare();
        let mut due = self.next_due();
        let mut wal_full_gate = Instant::now();
        loop {
            let timeout = due.saturating_duration_since(Instant::now());
            if let Err(RecvTimeoutError::Disconnected) = wake.recv_timeout(timeout) {
                return;
            }
            let requests = self.signal.take();
            if let Some((start, reply)) = requests.finish {
                let _ = reply.send(self.checkpoint(Some(start)));
                return;
            }
            if requests.stop {
                return;
            }
            let now = Instant::now();
            let wal_full = requests.wal_full && now >= wal_full_gate;
            if now < due && !wal_full && requests.waiters.is_empty() {
                continue;
            }
            let result = self.checkpoint(None);
            due = self.next_due();
            if let Err(e) = &result {
                error!(error = %e, "checkpoint failed; the WAL is kept and replayed at start-up");
                wal_full_gate = deadline_after(RETRY_AFTER_FAILURE);
            }
            for waiter in requests.waiters {
                let _ = waiter.send(result.as_ref().map(Clone::clone).map_err(Error::duplicate));
            }
        }
    }

    /// One checkpoint, counted in the metrics. `start_segment` is given at shutdown (writer
    /// stopped); otherwise the writer rotates first, so every record in older segments is
    /// already in the map.
    pub fn checkpoint(&self, start_segment: Option<u64>) -> Result<CheckpointStats, Error> {
        let result = self.write_checkpoint(start_segment);
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("kv_checkpoints_total", "result" => outcome).increment(1);
        if let Ok(stats) = &result {
            metrics::histogram!("kv_checkpoint_duration_seconds")
                .record(stats.duration.as_secs_f64());
            metrics::gauge!("kv_snapshot_bytes").set(stats.bytes as f64);
            metrics::gauge!("kv_snapshot_entries").set(stats.keys as f64);
        }
        result
    }

    fn write_checkpoint(&self, start_segment: Option<u64>) -> Result<CheckpointStats, Error> {
        let started = Instant::now();
        let final_checkpoint = start_segment.is_some();
        let start_segment = match start_segment {
            Some(s) => s,
            None => self.rotate()?,
        };
        let grace_ms = u64::try_from(self.tombstone_grace.as_millis()).unwrap_or(u64::MAX);
        let horizon_ms = self.tombstone_horizon.load(Ordering::Acquire);
        let cutoff_ms = now_ms().saturating_sub(grace_ms).min(horizon_ms);
        let written = snapshot::write_atomic(
            &self.vfs,
            &self.dir,
            &self.map,
            &self.clock,
            start_segment,
            cutoff_ms,
            self.id,
        )?;
        // The spare falls back on the WAL from its own first segment on: keep that much.
        let keep_from = self
            .spare_start()
            .unwrap_or(start_segment)
            .min(start_segment);
        let covered_from = self.covered_until.swap(start_segment, Ordering::Relaxed);
        let covered = segment_bytes(&self.vfs, &self.dir, covered_from, start_segment);
        let freed = segment::retire_before(&self.vfs, &self.dir, keep_from, self.prealloc > 0)?;
        if !final_checkpoint {
            self.prepare_spare();
        }
        let _ = self
            .wal
            .wal_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(covered))
            });
        *self.last_snapshot.lock() = Some(SystemTime::now());
        let stats = CheckpointStats {
            keys: written.records,
            bytes: written.bytes,
            duration: started.elapsed(),
            tombstones_dropped: written.tombstones_dropped,
        };
        info!(
            keys = stats.keys,
            bytes = stats.bytes,
            tombstones_dropped = stats.tombstones_dropped,
            duration_ms = u64::try_from(stats.duration.as_millis()).unwrap_or(u64::MAX),
            start_segment,
            kept_spare = written.kept_spare,
            wal_kept_from = keep_from,
            wal_bytes_freed = freed,
            "checkpoint written"
        );
        Ok(stats)
    }

    /// The spare's first WAL segment, if there is a readable spare.
    fn spare_start(&self) -> Option<u64> {
        let spare = self.dir.join(snapshot::SPARE_FILE_NAME);
        if !self.vfs.exists(&spare) {
            return None;
        }
        match snapshot::read_header(&self.vfs, &spare) {
            Ok(header) => Some(header.start_segment),
            Err(e) => {
                warn!(error = %e, "the spare snapshot is unreadable; the next checkpoint replaces it");
                None
            }
        }
    }

    /// Makes the spare segment ready for the writer's next rotation, off the write path: the
    /// segment a checkpoint just recycled, or a new preallocated file. A failure is logged
    /// only (the rotation then creates a plain segment).
    fn prepare_spare(&self) {
        if self.prealloc == 0 {
            return;
        }
        let next = self.wal.segment.load(Ordering::Relaxed) + 1;
        let mut spare = self.spare.lock();
        if spare.as_ref().is_some_and(|s| s.number == next) {
            return;
        }
        *spare = None;
        if !segment::room_to_preallocate(&self.dir, self.prealloc, self.reserve) {
            debug!("no room on the disk for a spare WAL segment; rotations create plain ones");
            return;
        }
        match segment::prepare_spare(&self.vfs, &self.dir, next, self.id, self.prealloc) {
            Ok(ready) => *spare = Some(ready),
            Err(e) => warn!(error = %e, "could not prepare the spare WAL segment"),
        }
    }

    /// Asks the writer to start a new segment (the spare, made ready now if it was not);
    /// returns its number.
    fn rotate(&self) -> Result<u64, Error> {
        let tx = self.wal_tx.upgrade().ok_or(Error::Closed)?;
        self.prepare_spare();
        let spare = self.spare.lock().take();
        let (reply, answer) = oneshot::channel();
        tx.blocking_send(WalCommand::Rotate { spare, reply })
            .map_err(|_| Error::Closed)?;
        drop(tx);
        answer.blocking_recv().map_err(|_| Error::Closed)?
    }
}

/// Bytes of the segments numbered `from` up to (not including) `to`.
fn segment_bytes(vfs: &impl Vfs, dir: &std::path::Path, from: u64, to: u64) -> u64 {
    let listed = segment::list(vfs, dir).unwrap_or_default();
    listed
        .iter()
        .filter(|(n, _)| (from..to).contains(n))
        .filter_map(|(_, path)| vfs.len(path).ok())
        .sum()
}
