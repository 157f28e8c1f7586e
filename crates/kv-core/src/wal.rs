//! The WAL writer: one dedicated thread owns the newest segment file. It takes queued appends,
//! writes them in one `write`, fsyncs once (group commit), applies them to the map and answers
//! every caller. It also rotates segments for checkpoints and fsyncs on a timer in interval mode.
//! A write that meets a full disk (ENOSPC) is cut back to the end of the last whole batch and
//! the store turns read-only (see `space`); any other write or fsync failure is final.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error};

use crate::checkpoint::CheckpointSignal;
use crate::map::ShardedMap;
use crate::vfs::{Vfs, VfsFile};
use crate::{batch, frame, record, segment, Error, Record, SyncMode};

/// Commands queued to the writer; the queue is bounded (see [`WAL_QUEUE_CAPACITY`]). `F` is
/// the file type of the store's [`Vfs`].
pub(crate) enum WalCommand<F> {
    /// Make records durable, apply them, answer which ones were newer.
    Append {
        records: Vec<Record>,
        reply: oneshot::Sender<Result<Vec<bool>, Error>>,
    },
    /// Fsync and close the current segment, start the next (the prepared spare when it is
    /// for that number, else a new file); answers the new segment's number.
    Rotate {
        spare: Option<segment::Spare<F>>,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    /// Interval mode: fsync if the interval has passed.
    SyncTick,
    /// Fsync and stop; answers the current segment's number.
    Shutdown {
        reply: oneshot::Sender<Result<u64, Error>>,
    },
}

/// Commands the queue holds before `apply` callers wait for room (backpressure, never dropped).
pub(crate) const WAL_QUEUE_CAPACITY: usize = 4096;
/// Most records one group commit takes; the rest wait for the next.
const MAX_BATCH_RECORDS: usize = 16 * 1024;
/// A commit waits for more writes (`wal_batch_delay`) only when the previous fsync ended less
/// than this many delays ago: an isolated write after a quiet spell goes at once.
const RECENT_DELAYS: u32 = 10;
/// After a wait that gathered nothing the writer skips the next 1, 3, 7, .. chances to wait,
/// up to 2^this - 1 (a lone closed-loop writer, whom waiting never helps, pays the delay on
/// about one commit in 64).
const MAX_IDLE_WAITS: u32 = 6;

/// State the writer shares with the store: failure and counters.
#[derive(Debug, Default)]
pub(crate) struct WalState {
    /// Set once, on the first failed write or fsync; writes are refused from then on.
    pub failed: OnceLock<String>,
    /// Bytes in all live segments.
    pub wal_bytes: AtomicU64,
    /// The segment the writer appends to (read by the checkpointer to prepare the next one).
    pub segment: AtomicU64,
    /// Group commits that waited `wal_batch_delay` for more writes.
    pub delayed_commits: AtomicU64,
    pub fsyncs: AtomicU64,
    pub fsync_micros: AtomicU64,
    pub batches: AtomicU64,
    pub appends: AtomicU64,
    pub records: AtomicU64,
    /// Read-only while the disk is full or below the reserve; lifted by the probe.
    pub space: crate::space::DiskState,
    /// Test hook: the next write fails as if the disk had.
    #[cfg(test)]
    pub inject_write_failure: AtomicBool,
    /// Test hook: the next write writes half the batch, then fails with ENOSPC.
    #[cfg(test)]
    pub inject_disk_full: AtomicBool,
}

impl WalState {
    /// The error for a refused write, if the WAL has failed or the disk is full.
    pub fn check(&self) -> Result<(), Error> {
        match self.failed.get() {
            Some(reason) => Err(Error::WalFailed {
                reason: reason.clone(),
            }),
            None => self.space.check(),
        }
    }

    /// [`Error::WalFailed`] if the WAL has failed; the read-only state is not looked at (a
    /// batch already written is fsynced and acknowledged even if the disk filled meanwhile).
    pub fn check_failed(&self) -> Result<(), Error> {
        match self.failed.get() {
            Some(reason) => Err(Error::WalFailed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// One `Append` waiting in a batch, with what the writer decided about each record.
struct Pending {
    records: Vec<Record>,
    newer: Vec<bool>,
    reply: oneshot::Sender<Result<Vec<bool>, Error>>,
}

/// The writer thread's state.
pub(crate) struct WalWriter<V: Vfs> {
    pub vfs: V,
    pub dir: PathBuf,
    /// The data folder's id, stamped on each new segment.
    pub id: crate::identity::DirId,
    pub sync: SyncMode,
    pub sync_interval: Duration,
    /// How long a group commit may wait for more writes (see `StoreConfig::wal_batch_delay`).
    pub batch_delay: Duration,
    /// Consecutive waits that gathered no write, and chances to wait still to skip.
    pub idle_waits: u32,
    pub skip_waits: u32,
    pub wal_max_bytes: u64,
    pub segment: u64,
    pub file: V::File,
    /// The current segment's salt (seeds its batch header checksums).
    pub salt: u64,
    /// Length of the current segment up to the end of its last whole batch.
    pub len: u64,
    /// Length of the current segment known durable (fsynced); each batch header carries it.
    pub durable: u64,
    /// The `MIN_FREE_BYTES` reserve.
    pub min_free_bytes: u64,
    /// Bytes written since free space was last checked.
    pub since_probe: u64,
    pub map: Arc<ShardedMap>,
    /// The clock, whose reservation this thread moves ahead after commits.
    pub clock: Arc<crate::Clock>,
    pub state: Arc<WalState>,
    pub checkpoint: Arc<CheckpointSignal>,
    pub unsynced: bool,
    pub last_sync: Instant,
    pub buf: Vec<u8>,
}

impl<V: Vfs> WalWriter<V> {
    /// Runs until `Shutdown` or until every sender is gone (the store was dropped).
    pub fn run(mut self, mut rx: mpsc::Receiver<WalCommand<V::File>>) {
        let mut next = None;
        loop {
            let command = match next.take() {
                Some(c) => c,
                None => match rx.blocking_recv() {
                    Some(c) => c,
                    None => break,
                },
            };
            match command {
                WalCommand::Append { records, reply } => {
                    let mut batch = vec![Pending {
                        newer: Vec::new(),
                        records,
                        reply,
                    }];
                    next = drain_appends(&mut rx, &mut batch);
                    // Only a lone append waits: when several were queued, writes are arriving
                    // faster than commits and batch by themselves.
                    if next.is_none() && batch.len() == 1 && self.should_wait() {
                        next = self.gather(&mut rx, &mut batch);
                    }
                    self.commit(batch);
                }
                WalCommand::Rotate { spare, reply } => {
                    let _ = reply.send(self.rotate(spare));
                }
                WalCommand::SyncTick => self.sync_if_due(),
                WalCommand::Shutdown { reply } => {
                    let done = self.sync().and_then(|()| self.seal());
                    let _ = reply.send(done.map(|()| self.segment));
                    refuse_rest(rx);
                    return;
                }
            }
        }
        // Dropped without shutdown: flush what was written, as a clean process exit would.
        let _ = self.sync();
    }

    /// Whether this commit (a lone append) should wait for more writes: fsync per commit, a
    /// delay configured, the previous fsync recent (writes are flowing), and waiting not found
    /// useless lately.
    fn should_wait(&mut self) -> bool {
        if self.sync != SyncMode::Always
            || self.batch_delay.is_zero()
            || self.last_sync.elapsed() > self.batch_delay * RECENT_DELAYS
        {
            return false;
        }
        if self.skip_waits > 0 {
            self.skip_waits -= 1;
            return false;
        }
        true
    }

    /// Waits `batch_delay`, then takes the appends queued meanwhile into `batch`; returns the
    /// first other command met. A wait that gathered nothing makes the next ones rarer.
    fn gather(
        &mut self,
        rx: &mut mpsc::Receiver<WalCommand<V::File>>,
        batch: &mut Vec<Pending>,
    ) -> Option<WalCommand<V::File>> {
        let before = batch.len();
        std::thread::sleep(self.batch_delay);
        let next = drain_appends(rx, batch);
        self.state.delayed_commits.fetch_add(1, Ordering::Relaxed);
        if batch.len() > before {
            self.idle_waits = 0;
        } else {
            self.idle_waits = (self.idle_waits + 1).min(MAX_IDLE_WAITS);
            self.skip_waits = (1 << self.idle_waits) - 1;
        }
        next
    }

    fn path(&self) -> PathBuf {
        segment::path(&self.dir, self.segment)
    }

    /// Enters the failed state; the first reason is kept.
    fn fail(&self, reason: String) -> Error {
        error!(path = %self.path().display(), %reason, "WAL failed; refusing writes until restart");
        let _ = self.state.failed.set(reason);
        self.state.check_failed().err().unwrap_or(Error::WalFailed {
            reason: String::new(),
        })
    }

    /// One group commit: write every newer record of the batch, fsync once, apply, answer.
    fn commit(&mut self, mut batch: Vec<Pending>) {
        let written = self
            .state
            .check()
            .and_then(|()| self.encode_batch(&mut batch));
        let count = match written.and_then(|count| self.write_batch().map(|()| count)) {
            Ok(count) => count,
            Err(e) => return answer_all(batch, &e),
        };
        self.count_batch(batch.len() as u64, count);
        for pending in batch {
            let applied = pending.records.iter().zip(pending.newer);
            let applied = applied
                .map(|(r, newer)| newer && self.map.apply(r))
                .collect();
            let _ = pending.reply.send(Ok(applied));
        }
        if self.state.wal_bytes.load(Ordering::Relaxed) > self.wal_max_bytes {
            self.checkpoint.request_wal_full();
        }
        self.clock.reserve_ahead();
    }

    /// Frames every record that is newer than the map's into the write buffer, in batches (one
    /// per [`batch::BATCH_SPLIT_BYTES`], usually one per group commit). Older records are left
    /// out: they would change nothing, and leaving them out keeps replay equal to the live map
    /// even after a checkpoint dropped the tombstone that made them stale.
    fn encode_batch(&mut self, batch: &mut [Pending]) -> Result<u64, Error> {
        self.buf.clear();
        let mut start = batch::begin(&mut self.buf);
        let mut count = 0;
        for pending in batch {
            pending.newer = pending
                .records
                .iter()
                .map(|r| self.map.is_newer(&r.key, r.version))
                .collect();
            for (r, _) in pending
                .records
                .iter()
                .zip(&pending.newer)
                .filter(|(_, newer)| **newer)
            {
                // Cannot fail: Store::apply validated the record against the format limits.
                if let Err(e) = frame::append(&mut self.buf, |b| r.encode(b)) {
                    return Err(self.fail(format!("encoding a record: {e}")));
                }
                count += 1;
                if self.buf.len() - start - batch::BATCH_HEADER_LEN >= batch::BATCH_SPLIT_BYTES {
                    batch::seal(&mut self.buf, start, self.salt, self.durable);
                    start = batch::begin(&mut self.buf);
                }
            }
        }
        batch::seal(&mut self.buf, start, self.salt, self.durable);
        Ok(count)
    }

    /// Writes the encoded batch and fsyncs as the sync mode says.
    fn write_batch(&mut self) -> Result<(), Error> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let written = self
            .write_hook()
            .and_then(|()| self.file.write_all(&self.buf));
        if let Err(e) = written {
            if crate::space::is_disk_full(&e) {
                return Err(self.disk_full(&e));
            }
            return Err(self.fail(format!("write {}: {e}", self.path().display())));
        }
        self.len += self.buf.len() as u64;
        self.since_probe += self.buf.len() as u64;
        if self.since_probe >= crate::space::PROBE_EVERY_BYTES {
            self.since_probe = 0;
            self.state.space.probe(&self.dir, self.min_free_bytes);
        }
        self.state
            .wal_bytes
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        metrics::counter!("kv_wal_bytes_written_total").increment(self.buf.len() as u64);
        self.unsynced = true;
        match self.sync {
            SyncMode::Always => self.sync(),
            SyncMode::Interval => {
                self.sync_if_due();
                self.state.check_failed()
            }
            SyncMode::Never => Ok(()),
        }
    }

    /// ENOSPC: cuts the segment back to the end of the last whole batch (durably, so no part of
    /// this batch can surface at recovery), turns the store read-only and answers the batch with
    /// [`Error::DiskFull`]. If the cut itself fails, the WAL fails for good.
    fn disk_full(&mut self, cause: &std::io::Error) -> Error {
        let path = self.path();
        let len = self.len;
        let cut = self
            .file
            .set_len(len)
            .and_then(|()| self.file.seek_to(len))
            .and_then(|()| self.file.sync_data());
        if let Err(e) = cut {
            return self.fail(format!(
                "write {}: {cause}; cutting it back to byte {} failed: {e}",
                path.display(),
                self.len
            ));
        }
        // Anything written before this batch is durable now too.
        self.unsynced = false;
        self.durable = self.len;
        let free = self.state.space.free_bytes(&self.dir).unwrap_or(0);
        let cause = format!("write {}: {cause}", path.display());
        self.state
            .space
            .enter(&self.dir, free, self.min_free_bytes, &cause);
        self.state.check().err().unwrap_or(Error::DiskFull {
            path: self.dir.clone(),
            free_bytes: free,
            reserve_bytes: self.min_free_bytes,
        })
    }

    #[cfg(test)]
    fn write_hook(&mut self) -> std::io::Result<()> {
        if self
            .state
            .inject_write_failure
            .swap(false, Ordering::Relaxed)
        {
            return Err(std::io::Error::other("injected write failure"));
        }
        if self.state.inject_disk_full.swap(false, Ordering::Relaxed) {
            let half = self.buf.len() / 2;
            self.file.write_all(&self.buf[..half])?;
            return Err(std::io::Error::from_raw_os_error(28));
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn write_hook(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    /// Counts a group commit in the status counters and the metrics. `records` is what was
    /// written (stale records are not); a batch that wrote nothing is no group commit.
    fn count_batch(&self, appends: u64, records: u64) {
        self.state.batches.fetch_add(1, Ordering::Relaxed);
        self.state.appends.fetch_add(appends, Ordering::Relaxed);
        self.state.records.fetch_add(records, Ordering::Relaxed);
        metrics::counter!("kv_wal_appends_total").increment(appends);
        if records > 0 {
            metrics::counter!("kv_wal_records_total").increment(records);
            metrics::histogram!("kv_wal_batch_records").record(records as f64);
        }
    }

    /// Fsyncs the segment if anything was written since the last fsync. A failure is final.
    fn sync(&mut self) -> Result<(), Error> {
        self.state.check_failed()?;
        if !self.unsynced {
            return Ok(());
        }
        let started = Instant::now();
        if let Err(e) = self.file.sync_data() {
            return Err(self.fail(format!("fsync {}: {e}", self.path().display())));
        }
        self.unsynced = false;
        self.durable = self.len;
        self.last_sync = Instant::now();
        self.state.fsyncs.fetch_add(1, Ordering::Relaxed);
        let elapsed = started.elapsed();
        metrics::histogram!("kv_wal_fsync_seconds").record(elapsed.as_secs_f64());
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.state.fsync_micros.fetch_add(micros, Ordering::Relaxed);
        Ok(())
    }

    fn sync_if_due(&mut self) {
        if self.unsynced && self.last_sync.elapsed() >= self.sync_interval {
            let _ = self.sync();
        }
    }

    /// Cuts a preallocated segment back to the end of its last batch, durably, so a segment
    /// that is not the newest ends where its data ends (recovery's torn-tail rule for it). A
    /// failed cut leaves the segment as it was (appends go on in it); a failed fsync is final.
    fn seal(&mut self) -> Result<(), Error> {
        let len = self.len;
        let size = self
            .file
            .size()
            .map_err(Error::io("size of", self.path()))?;
        if size <= len {
            return Ok(());
        }
        self.file
            .set_len(len)
            .and_then(|()| self.file.seek_to(len))
            .map_err(Error::io("cut the preallocated tail of", self.path()))?;
        if let Err(e) = self.file.sync_all() {
            return Err(self.fail(format!("fsync {}: {e}", self.path().display())));
        }
        Ok(())
    }

    /// Fsyncs and seals the current segment and switches to the next: the prepared `spare`
    /// (renamed into place) when it is for that number, else a new file.
    fn rotate(&mut self, spare: Option<segment::Spare<V::File>>) -> Result<u64, Error> {
        self.sync()?;
        self.seal()?;
        let next = self.segment + 1;
        // A failed creation or activation removes its file, so appending to the old segment
        // stays safe (should the removal not be durable, the file comes back holding no batch,
        // which recovery ignores).
        (self.file, self.salt) = match spare {
            Some(spare) if spare.number == next => segment::activate(&self.vfs, &self.dir, spare)?,
            _ => segment::create(&self.vfs, &self.dir, next, self.id)?,
        };
        self.segment = next;
        self.state.segment.store(next, Ordering::Relaxed);
        self.len = segment::HEADER_LEN as u64;
        self.durable = self.len;
        self.state
            .wal_bytes
            .fetch_add(segment::HEADER_LEN as u64, Ordering::Relaxed);
        debug!(segment = next, "rotated WAL segment");
        Ok(next)
    }
}

/// Moves queued appends into `batch`; returns the first other command met, to run after it.
fn drain_appends<F>(
    rx: &mut mpsc::Receiver<WalCommand<F>>,
    batch: &mut Vec<Pending>,
) -> Option<WalCommand<F>> {
    let mut records: usize = batch.iter().map(|p| p.records.len()).sum();
    while records < MAX_BATCH_RECORDS {
        match rx.try_recv() {
            Ok(WalCommand::Append {
                records: more,
                reply,
            }) => {
                records += more.len();
                batch.push(Pending {
                    newer: Vec::new(),
                    records: more,
                    reply,
                });
            }
            Ok(other) => return Some(other),
            Err(_) => return None,
        }
    }
    None
}

fn answer_all(batch: Vec<Pending>, error: &Error) {
    for pending in batch {
        let _ = pending.reply.send(Err(error.duplicate()));
    }
}

/// After shutdown: closes the queue and answers whatever slipped in with `Closed`.
fn refuse_rest<F>(mut rx: mpsc::Receiver<WalCommand<F>>) {
    rx.close();
    while let Ok(command) = rx.try_recv() {
        match command {
            WalCommand::Append { reply, .. } => drop(reply.send(Err(Error::Closed))),
            WalCommand::Rotate { reply, .. } | WalCommand::Shutdown { reply } => {
                drop(reply.send(Err(Error::Closed)))
            }
            WalCommand::SyncTick => {}
        }
    }
}

/// Interval mode: a thread that asks the writer to check its fsync deadline every `interval`.
/// It holds only a weak sender, so it never keeps the writer alive; it stops on `stop`.
pub(crate) fn spawn_sync_ticker<F: Send + 'static>(
    tx: mpsc::WeakSender<WalCommand<F>>,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kv-wal-sync".into())
        .spawn(move || loop {
            std::thread::park_timeout(interval);
            if stop.load(Ordering::Acquire) {
                return;
            }
            let Some(tx) = tx.upgrade() else { return };
            // Full queue: the writer is busy and checks its deadline after each batch anyway.
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(WalCommand::SyncTick) {
                return;
            }
        })
}

// A record within the format limits always fits in a frame.
const _: () = assert!(record::MAX_KEY_LEN + record::MAX_VALUE_LEN + 64 < frame::MAX_FRAME_LEN);

/// Format limits every record must meet before it is queued.
pub(crate) fn validate(records: &[Record]) -> Result<(), Error> {
    records.iter().try_for_each(Record::validate)
}
