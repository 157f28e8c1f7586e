//! Hinted handoff store: writes a replica missed, kept durably in `DATA_DIR/hints/` until that
//! replica is seen up again and has them. Owns the hint files; knows nothing of HTTP.
//!
//! # Layout
//! One folder per peer (its URL with every non-alphanumeric byte turned into `_`), holding numbered
//! files `00000001.hint`, `00000002.hint`, ... Each file is a sequence of frames
//! `[len: u32 LE][crc32c(payload): u32 LE][payload = kv_core::Record::encode]`. New hints go to the
//! newest file; a replay first *seals* the current file (later hints go to a new one), delivers the
//! sealed files in order and deletes each once the peer has acknowledged all of it. Files are
//! streamed ([`HintReader`]): a replay or a count holds one batch of hints in memory at a time.
//!
//! One writer thread owns the open files: appends queue on a bounded channel, and the thread
//! writes everything queued, then fsyncs each touched file once (group commit, as in the WAL).
//!
//! # Limits ([`HintLimits`])
//! Hints are a shortcut, not the safety net (anti-entropy is): a peer gets no new hints once its
//! oldest undelivered hint is older than the **window** (`HINT_WINDOW_SECS`: it has been away that
//! long) or once its hints hold the **byte cap** (`HINT_MAX_BYTES`); a replay skips hints older
//! than the window. Those writes reach the peer through anti-entropy instead. The window never
//! exceeds the tombstone grace, so a replayed hint cannot bring back a key whose tombstone was
//! already collected.

use crate::error::{Error, Result};
use crate::hint_file::count_hints;
pub use crate::hint_file::HintReader;
use kv_core::Record;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

/// Hints that may wait in the writer's queue; when it is full a hint is dropped with a warning
/// (read repair still heals the replica), so a slow disk never blocks client writes.
const HINT_QUEUE_CAPACITY: usize = 16 * 1024;

enum Command {
    Append {
        peer: String,
        record: Record,
    },
    Seal {
        peer: String,
        reply: oneshot::Sender<Vec<PathBuf>>,
    },
}

/// How long and how much a node keeps hints for one peer.
#[derive(Debug, Clone, Copy)]
pub struct HintLimits {
    /// `HINT_WINDOW_SECS`: a peer whose oldest undelivered hint is older than this gets no new
    /// hints, and a replay skips hints older than this.
    pub window: std::time::Duration,
    /// `HINT_MAX_BYTES`: hint bytes kept per peer.
    pub max_bytes_per_peer: u64,
}

impl Default for HintLimits {
    fn default() -> Self {
        HintLimits {
            window: std::time::Duration::from_secs(3 * 3600),
            max_bytes_per_peer: 1 << 30,
        }
    }
}

impl HintLimits {
    fn window_ms(&self) -> u64 {
        u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether a hint for a write of version time `version_ms` is still worth delivering at `now_ms`.
    pub fn fresh(&self, version_ms: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(version_ms) <= self.window_ms()
    }
}

/// What is kept for one peer: hints, their bytes on disk, and when the oldest was written.
#[derive(Debug, Clone, Copy, Default)]
struct Pending {
    count: u64,
    bytes: u64,
    since_ms: u64,
}

/// Why a hint was not kept (the `reason` label of `kv_hints_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The writer's queue is full (the disk is slower than the writes).
    QueueFull,
    /// The peer has been away longer than the window.
    Window,
    /// The peer's hints hold the byte cap.
    Bytes,
}

impl Refused {
    fn label(self) -> &'static str {
        match self {
            Refused::QueueFull => "queue_full",
            Refused::Window => "window",
            Refused::Bytes => "bytes",
        }
    }
}

/// Durable hints for peers that missed writes, with live counts for `GET /` and metrics.
#[derive(Debug, Clone)]
pub struct HintStore {
    tx: mpsc::Sender<Command>,
    pending: Arc<Mutex<HashMap<String, Pending>>>,
    delivered: Arc<AtomicU64>,
    limits: HintLimits,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Append { peer, .. } => write!(f, "Append({peer})"),
            Command::Seal { peer, .. } => write!(f, "Seal({peer})"),
        }
    }
}

impl HintStore {
    /// Opens `dir` (created if missing), counts the hints already there and starts the writer thread.
    pub fn open(dir: PathBuf, limits: HintLimits) -> Result<HintStore> {
        kv_core::files::create_private_dir(&dir).map_err(|source| Error::HintIo {
            op: "create",
            path: dir.clone(),
            source,
        })?;
        let mut pending = HashMap::new();
        let mut next_seq = HashMap::new();
        for (folder, files) in existing_files(&dir)? {
            let mut kept = Pending::default();
            for file in &files {
                kept.count += count_hints(file)?;
                kept.bytes += file_bytes(file);
            }
            // The oldest file was last written no earlier than its first hint: a lower bound of
            // the time the peer has been away that never makes it look away longer than it was.
            kept.since_ms = files.first().map_or(0, |f| modified_ms(f));
            let last = files.last().and_then(|f| file_seq(f)).unwrap_or(0);
            next_seq.insert(folder.clone(), last + 1);
            if kept.count > 0 {
                pending.insert(folder, kept);
            }
        }
        let pending = Arc::new(Mutex::new(pending));
        let (tx, rx) = mpsc::channel(HINT_QUEUE_CAPACITY);
        let writer = Writer {
            dir,
            next_seq,
            open: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("kv-hints".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| Error::HintIo {
                op: "start writer thread for",
                path: PathBuf::from("hints"),
                source,
            })?;
        Ok(HintStore {
            tx,
            pending,
            delivered: Arc::new(AtomicU64::new(0)),
            limits,
        })
    }

    /// The window and byte cap this store applies.
    pub fn limits(&self) -> HintLimits {
        self.limits
    }

    /// Keeps `record` for `peer`. Never waits: when the queue is full, the peer has been away
    /// longer than the window or its hints hold the byte cap, the hint is dropped and counted
    /// (anti-entropy heals the replica).
    pub fn add(&self, peer: &str, record: Record) {
        if let Err(refused) = self.try_add(peer, record, crate::quorum::now_ms()) {
            metrics::counter!("kv_hints_dropped_total", "reason" => refused.label()).increment(1);
            warn!(
                peer,
                reason = refused.label(),
                "hint not kept; anti-entropy will heal the replica"
            );
        }
    }

    fn try_add(&self, peer: &str, record: Record, now_ms: u64) -> std::result::Result<(), Refused> {
        let folder = folder_name(peer);
        let bytes = frame_bytes(&record);
        let mut pending = self.pending.lock();
        let kept = pending.get(&folder).copied().unwrap_or_default();
        if kept.count > 0 && !self.limits.fresh(kept.since_ms, now_ms) {
            return Err(Refused::Window);
        }
        if kept.bytes.saturating_add(bytes) > self.limits.max_bytes_per_peer {
            return Err(Refused::Bytes);
        }
        let command = Command::Append {
            peer: peer.to_owned(),
            record,
        };
        self.tx.try_send(command).map_err(|_| Refused::QueueFull)?;
        let entry = pending.entry(folder).or_default();
        if entry.count == 0 {
            entry.since_ms = now_ms;
        }
        entry.count += 1;
        entry.bytes += bytes;
        Ok(())
    }

    /// Hints waiting for `peer`.
    pub fn pending_for(&self, peer: &str) -> u64 {
        self.pending
            .lock()
            .get(&folder_name(peer))
            .map_or(0, |p| p.count)
    }

    /// Hints waiting, over all peers.
    pub fn pending(&self) -> u64 {
        self.pending.lock().values().map(|p| p.count).sum()
    }

    /// Hint bytes on disk, over all peers.
    pub fn pending_bytes(&self) -> u64 {
        self.pending.lock().values().map(|p| p.bytes).sum()
    }

    /// Drops the hints of every peer not in `members` (nodes that left the cluster: their keys
    /// were copied to the remaining owners before they left). Returns how many were dropped.
    pub async fn discard_except(&self, members: &[&str]) -> u64 {
        let keep: Vec<String> = members.iter().map(|m| folder_name(m)).collect();
        let gone: Vec<String> = self
            .pending
            .lock()
            .keys()
            .filter(|folder| !keep.contains(folder))
            .cloned()
            .collect();
        let mut dropped = 0;
        for folder in gone {
            // A folder name maps to itself, so it can stand in for the peer's URL.
            for file in self.seal(&folder).await {
                if let Err(e) = fs::remove_file(&file) {
                    warn!(path = %file.display(), error = %e, "cannot remove hints of a departed node");
                }
            }
            dropped += self.pending.lock().remove(&folder).map_or(0, |p| p.count);
        }
        dropped
    }

    /// Hints delivered since start-up.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Closes the file `peer`'s new hints go to and returns every closed file, oldest first.
    pub async fn seal(&self, peer: &str) -> Vec<PathBuf> {
        let (reply, rx) = oneshot::channel();
        let command = Command::Seal {
            peer: peer.to_owned(),
            reply,
        };
        if self.tx.send(command).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Deletes a replayed file and lowers `peer`'s count by the hints it held: `delivered`
    /// sent, `expired` skipped as older than the window.
    pub fn remove_delivered(
        &self,
        peer: &str,
        path: &Path,
        delivered: u64,
        expired: u64,
    ) -> Result<()> {
        let bytes = file_bytes(path);
        fs::remove_file(path).map_err(|source| Error::HintIo {
            op: "remove",
            path: path.to_owned(),
            source,
        })?;
        let folder = folder_name(peer);
        let mut pending = self.pending.lock();
        if let Some(kept) = pending.get_mut(&folder) {
            kept.count = kept.count.saturating_sub(delivered + expired);
            kept.bytes = kept.bytes.saturating_sub(bytes);
            if kept.count == 0 {
                pending.remove(&folder);
            }
        }
        self.delivered.fetch_add(delivered, Ordering::Relaxed);
        if expired > 0 {
            metrics::counter!("kv_hints_dropped_total", "reason" => "expired").increment(expired);
        }
        Ok(())
    }
}

/// The writer thread's state: the open file of each peer and the number its next file gets.
struct Writer {
    dir: PathBuf,
    next_seq: HashMap<String, u64>,
    open: HashMap<String, File>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut dirty: Vec<String> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(command) = next {
                match command {
                    Command::Append { peer, record } => {
                        let folder = folder_name(&peer);
                        if let Err(e) = self.append(&folder, &record) {
                            error!(peer, error = %e, "cannot write hint");
                        } else if !dirty.contains(&folder) {
                            dirty.push(folder);
                        }
                    }
                    Command::Seal { peer, reply } => {
                        self.sync(&mut dirty);
                        let _ = reply.send(self.seal(&folder_name(&peer)));
                    }
                }
                next = rx.try_recv().ok();
            }
            self.sync(&mut dirty);
        }
        self.sync(&mut dirty);
    }

    fn append(&mut self, folder: &str, record: &Record) -> std::io::Result<()> {
        let mut payload = Vec::with_capacity(64);
        record.encode(&mut payload);
        let mut frame = Vec::with_capacity(payload.len() + 8);
        let len = u32::try_from(payload.len()).map_err(std::io::Error::other)?;
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        let file = match self.open.entry(folder.to_owned()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let seq = self.next_seq.entry(folder.to_owned()).or_insert(1);
                let dir = self.dir.join(folder);
                kv_core::files::create_private_dir(&dir)?;
                let file = kv_core::files::private_options()
                    .create(true)
                    .append(true)
                    .open(dir.join(format!("{seq:08}.hint")))?;
                *seq += 1;
                e.insert(file)
            }
        };
        file.write_all(&frame)
    }

    fn sync(&mut self, dirty: &mut Vec<String>) {
        for folder in dirty.drain(..) {
            if let Some(file) = self.open.get(&folder) {
                if let Err(e) = file.sync_data() {
                    error!(peer_folder = folder, error = %e, "cannot fsync hints");
                }
            }
        }
    }

    /// Closes the peer's open file, so that every file on disk for it is complete, and lists them.
    fn seal(&mut self, folder: &str) -> Vec<PathBuf> {
        self.open.remove(folder);
        let dir = self.dir.join(folder);
        match list_hint_files(&dir) {
            Ok(files) => files,
            Err(e) => {
                error!(path = %dir.display(), error = %e, "cannot list hint files");
                Vec::new()
            }
        }
    }
}

/// Bytes a hint takes in its file: the frame header and the encoded record.
fn frame_bytes(record: &Record) -> u64 {
    let mut payload = Vec::with_capacity(64);
    record.encode(&mut payload);
    payload.len() as u64 + 8
}

fn file_bytes(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

fn modified_ms(path: &Path) -> u64 {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The folder name for a peer URL: every byte that is not ASCII alphanumeric becomes `_`.
fn folder_name(peer: &str) -> String {
    peer.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn file_seq(path: &Path) -> Option<u64> {
    path.file_stem()?.to_str()?.parse().ok()
}

fn list_hint_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "hint") && file_seq(p).is_some())
        .collect();
    files.sort_by_key(|p| file_seq(p));
    Ok(files)
}

fn existing_files(dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let io = |source| Error::HintIo {
        op: "read",
        path: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        if !entry.path().is_dir() {
            continue;
        }
        let files = list_hint_files(&entry.path()).map_err(io)?;
        out.push((entry.file_name().to_string_lossy().into_owned(), files));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kv_core::Version;

    const PEER: &str = "http://127.0.0.1:8002";

    fn record(i: u64) -> Record {
        Record {
            key: format!("k{i}"),
            version: Version {
                hlc: i << 16,
                node: 1,
            },
            value: Some(Bytes::from(format!("{i}"))),
            expires_at_ms: None,
        }
    }

    async fn wait_for_writer(store: &HintStore) -> Vec<PathBuf> {
        // Sealing is ordered after every append queued before it.
        store.seal(PEER).await
    }

    #[tokio::test]
    async fn hints_survive_a_restart_and_are_removed_once_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let store = HintStore::open(dir.path().join("hints"), HintLimits::default()).unwrap();
        for i in 0..10 {
            store.add(PEER, record(i));
        }
        assert_eq!(store.pending_for(PEER), 10);
        let sealed = wait_for_writer(&store).await;
        assert_eq!(sealed.len(), 1);
        drop(store);

        let reopened = HintStore::open(dir.path().join("hints"), HintLimits::default()).unwrap();
        assert_eq!(reopened.pending(), 10);
        reopened.add(PEER, record(10));
        let sealed = reopened.seal(PEER).await;
        assert_eq!(sealed.len(), 2, "old file plus the new one: {sealed:?}");
        let first = read_all(&sealed[0]);
        assert_eq!(first, (0..10).map(record).collect::<Vec<_>>());
        reopened.remove_delivered(PEER, &sealed[0], 10, 0).unwrap();
        assert_eq!(reopened.pending_for(PEER), 1);
        assert_eq!(reopened.delivered(), 10);
    }

    #[tokio::test]
    async fn hints_of_departed_nodes_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let store = HintStore::open(dir.path().join("hints"), HintLimits::default()).unwrap();
        store.add(PEER, record(1));
        store.add("http://127.0.0.1:8003", record(2));
        wait_for_writer(&store).await;
        assert_eq!(store.discard_except(&[PEER]).await, 1);
        assert_eq!(store.pending(), 1);
        assert_eq!(store.pending_for(PEER), 1);
        drop(store);
        assert_eq!(
            HintStore::open(dir.path().join("hints"), HintLimits::default())
                .unwrap()
                .pending(),
            1,
            "gone from disk too"
        );
    }

    #[tokio::test]
    async fn a_peer_away_longer_than_the_window_gets_no_new_hints() {
        let dir = tempfile::tempdir().unwrap();
        let limits = HintLimits {
            window: std::time::Duration::from_secs(60),
            max_bytes_per_peer: 1 << 20,
        };
        let store = HintStore::open(dir.path().join("hints"), limits).unwrap();
        let t0 = 1_000_000_000;
        store.try_add(PEER, record(1), t0).unwrap();
        store.try_add(PEER, record(2), t0 + 60_000).unwrap();
        assert_eq!(
            store.try_add(PEER, record(3), t0 + 60_001),
            Err(Refused::Window),
            "the oldest hint is older than the window"
        );
        assert_eq!(store.pending_for(PEER), 2);
        // Another peer has its own window.
        store
            .try_add("http://127.0.0.1:8003", record(4), t0 + 60_001)
            .unwrap();
        // Once delivered, the peer is back: hints are kept again.
        let sealed = store.seal(PEER).await;
        store.remove_delivered(PEER, &sealed[0], 1, 1).unwrap();
        assert_eq!(store.pending_for(PEER), 0);
        assert_eq!(
            store.delivered(),
            1,
            "the expired hint is not counted as delivered"
        );
        store.try_add(PEER, record(5), t0 + 120_000).unwrap();
        assert_eq!(store.pending_for(PEER), 1);
    }

    #[tokio::test]
    async fn hints_stop_at_the_byte_cap_and_the_bytes_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let one = frame_bytes(&large(1, 1000));
        let limits = HintLimits {
            window: std::time::Duration::from_secs(3600),
            max_bytes_per_peer: one * 3,
        };
        let store = HintStore::open(dir.path().join("hints"), limits).unwrap();
        let now = crate::quorum::now_ms();
        for i in 0..3 {
            store.try_add(PEER, large(i, 1000), now).unwrap();
        }
        assert_eq!(
            store.try_add(PEER, large(3, 1000), now),
            Err(Refused::Bytes)
        );
        assert_eq!(store.pending_bytes(), one * 3);
        wait_for_writer(&store).await;
        drop(store);
        let reopened = HintStore::open(dir.path().join("hints"), limits).unwrap();
        assert_eq!(reopened.pending_bytes(), one * 3, "counted from the files");
        assert_eq!(
            reopened.try_add(PEER, large(4, 1000), crate::quorum::now_ms()),
            Err(Refused::Bytes),
            "the cap holds across a restart"
        );
    }

    #[test]
    fn freshness_is_measured_against_the_window() {
        let limits = HintLimits {
            window: std::time::Duration::from_secs(10),
            max_bytes_per_peer: 1,
        };
        assert!(limits.fresh(1_000, 11_000));
        assert!(!limits.fresh(1_000, 11_001));
        assert!(
            limits.fresh(5_000, 1_000),
            "a version from the future is fresh"
        );
    }

    #[test]
    fn a_torn_tail_keeps_the_whole_frames_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000001.hint");
        let mut writer = Writer {
            dir: dir.path().to_owned(),
            next_seq: HashMap::new(),
            open: HashMap::new(),
        };
        writer.append("p", &record(1)).unwrap();
        writer.append("p", &record(2)).unwrap();
        drop(writer);
        let file = dir.path().join("p").join("00000001.hint");
        let bytes = fs::read(&file).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(read_all(&path), vec![record(1)]);
        assert_eq!(count_hints(&path).unwrap(), 1);
    }

    fn read_all(path: &Path) -> Vec<Record> {
        let mut reader = HintReader::open(path).unwrap();
        let mut all = Vec::new();
        loop {
            let batch = reader.next_batch(usize::MAX, usize::MAX).unwrap();
            if batch.is_empty() {
                return all;
            }
            all.extend(batch);
        }
    }

    fn large(i: u64, bytes: usize) -> Record {
        Record {
            value: Some(Bytes::from(vec![b'7'; bytes])),
            ..record(i)
        }
    }

    #[test]
    fn large_hints_are_read_in_byte_capped_batches() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = Writer {
            dir: dir.path().to_owned(),
            next_seq: HashMap::new(),
            open: HashMap::new(),
        };
        let written: Vec<Record> = (0..12).map(|i| large(i, 900 * 1024)).collect();
        for r in &written {
            writer.append("p", r).unwrap();
        }
        writer.append("p", &large(12, 3 * 1024 * 1024)).unwrap();
        writer.append("p", &record(13)).unwrap();
        drop(writer);
        let path = dir.path().join("p").join("00000001.hint");
        let cap = 2 * 1024 * 1024;
        let mut reader = HintReader::open(&path).unwrap();
        let mut batches = Vec::new();
        for _ in 0..100 {
            let batch = reader.next_batch(512, cap).unwrap();
            if batch.is_empty() {
                break;
            }
            batches.push(batch);
        }
        for batch in &batches {
            let bytes = crate::peer::encode_batch(batch).len();
            assert!(
                bytes <= cap || batch.len() == 1,
                "{bytes} bytes in {}",
                batch.len()
            );
        }
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            [2, 2, 2, 2, 2, 2, 1, 1]
        );
        let mut expected = written;
        expected.extend([large(12, 3 * 1024 * 1024), record(13)]);
        assert_eq!(batches.concat(), expected, "every hint, in order");
        assert_eq!(count_hints(&path).unwrap(), 14);
        assert_eq!(
            HintReader::open(&path)
                .unwrap()
                .next_batch(3, usize::MAX)
                .unwrap()
                .len(),
            3
        );
    }
}
