//! Free disk space and the read-only state it drives: a full disk (ENOSPC on a WAL write) or
//! free space below the `MIN_FREE_BYTES` reserve makes the store read-only; a probe every
//! second (and the WAL writer every few MiB written) checks free space again and lifts the
//! state by itself once there is room, without a restart.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{debug, info, warn};

use crate::Error;

/// Writes resume only when at least this much is free, even with a smaller reserve, so a
/// store that hit ENOSPC does not flap between one refused batch and the next.
pub(crate) const RESUME_FLOOR_BYTES: u64 = 1 << 20;
/// The WAL writer checks free space after this many bytes written since its last check.
pub(crate) const PROBE_EVERY_BYTES: u64 = 4 << 20;

/// Bytes available to this (unprivileged) process on the file system holding `dir`.
pub(crate) fn available(dir: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Whether an I/O error means "no space left on device".
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    const ENOSPC: i32 = 28;
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(ENOSPC)
}

/// Why the store is read-only.
#[derive(Clone, Debug)]
struct Refusal {
    path: PathBuf,
    free_bytes: u64,
    reserve_bytes: u64,
}

/// The read-only state, shared by the WAL writer, the probe thread and `Store::apply`.
#[derive(Debug, Default)]
pub(crate) struct DiskState {
    /// Fast path for `check`: set while `why` holds a refusal.
    read_only: AtomicBool,
    why: Mutex<Option<Refusal>>,
    /// Test hook: free space as the probe sees it, instead of statvfs.
    #[cfg(test)]
    pub fake_free: Mutex<Option<u64>>,
}

impl DiskState {
    /// [`Error::DiskFull`] while the store is read-only.
    pub fn check(&self) -> Result<(), Error> {
        if !self.read_only.load(Ordering::Acquire) {
            return Ok(());
        }
        match &*self.why.lock() {
            Some(r) => Err(Error::DiskFull {
                path: r.path.clone(),
                free_bytes: r.free_bytes,
                reserve_bytes: r.reserve_bytes,
            }),
            None => Ok(()),
        }
    }

    /// Why writes are refused, while the store is read-only.
    pub fn reason(&self) -> Option<String> {
        self.check().err().map(|e| e.to_string())
    }

    /// Makes the store read-only; `cause` goes to the log.
    pub fn enter(&self, dir: &Path, free_bytes: u64, reserve_bytes: u64, cause: &str) {
        let mut why = self.why.lock();
        if why.is_none() {
            warn!(dir = %dir.display(), free_bytes, reserve_bytes, cause, "disk full: store is read-only until space returns");
            metrics::counter!("kv_disk_full_total").increment(1);
        }
        *why = Some(Refusal {
            path: dir.to_owned(),
            free_bytes,
            reserve_bytes,
        });
        self.read_only.store(true, Ordering::Release);
    }

    /// Free bytes on the file system holding `dir`.
    pub fn free_bytes(&self, dir: &Path) -> io::Result<u64> {
        #[cfg(test)]
        if let Some(free) = *self.fake_free.lock() {
            return Ok(free);
        }
        available(dir)
    }

    /// One check of free space: below `reserve_bytes` the store turns read-only; while
    /// read-only, at least `reserve_bytes` (and [`RESUME_FLOOR_BYTES`]) free lifts the state.
    /// A failed statvfs changes nothing (the write path still meets ENOSPC if it is real).
    pub fn probe(&self, dir: &Path, reserve_bytes: u64) {
        let free = match self.free_bytes(dir) {
            Ok(free) => free,
            Err(e) => {
                debug!(dir = %dir.display(), error = %e, "cannot read free disk space");
                return;
            }
        };
        metrics::gauge!("kv_disk_free_bytes").set(free as f64);
        if self.read_only.load(Ordering::Acquire) {
            if free >= reserve_bytes.max(RESUME_FLOOR_BYTES) {
                let mut why = self.why.lock();
                *why = None;
                self.read_only.store(false, Ordering::Release);
                info!(dir = %dir.display(), free_bytes = free, reserve_bytes, "free disk space is back above the reserve; writes resume");
            }
        } else if free < reserve_bytes {
            self.enter(
                dir,
                free,
                reserve_bytes,
                "free space below the MIN_FREE_BYTES reserve",
            );
        }
    }
}

/// A thread that probes free space every `interval` until `stop` is set (and it is unparked).
pub(crate) fn spawn_probe(
    state: Arc<crate::wal::WalState>,
    dir: PathBuf,
    reserve_bytes: u64,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kv-disk-probe".into())
        .spawn(move || loop {
            std::thread::park_timeout(interval);
            if stop.load(Ordering::Acquire) {
                return;
            }
            state.space.probe(&dir, reserve_bytes);
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_recognised_and_other_errors_are_not() {
        assert!(is_disk_full(&io::Error::from_raw_os_error(28)));
        assert!(is_disk_full(&io::Error::from(io::ErrorKind::StorageFull)));
        assert!(!is_disk_full(&io::Error::from_raw_os_error(5)));
        assert!(!is_disk_full(&io::Error::other("x")));
    }

    #[test]
    fn reserve_enters_and_room_lifts_the_read_only_state() {
        let dir = tempfile::tempdir().unwrap();
        assert!(available(dir.path()).unwrap() > 0, "statvfs works here");
        let state = DiskState::default();
        *state.fake_free.lock() = Some(10 << 20);
        state.probe(dir.path(), 8 << 20);
        assert!(state.check().is_ok(), "above the reserve");
        *state.fake_free.lock() = Some(7 << 20);
        state.probe(dir.path(), 8 << 20);
        let err = state.check().unwrap_err();
        assert!(
            matches!(err, Error::DiskFull { free_bytes, reserve_bytes, .. } if free_bytes == 7 << 20 && reserve_bytes == 8 << 20),
            "{err}"
        );
        assert!(state.reason().unwrap().contains("read-only"));
        *state.fake_free.lock() = Some(9 << 20);
        state.probe(dir.path(), 8 << 20);
        assert!(state.check().is_ok(), "space came back");
    }

    #[test]
    fn after_enospc_with_no_reserve_writes_wait_for_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let state = DiskState::default();
        state.enter(dir.path(), 100, 0, "ENOSPC");
        *state.fake_free.lock() = Some(RESUME_FLOOR_BYTES - 1);
        state.probe(dir.path(), 0);
        assert!(state.check().is_err(), "a few KiB free is not room");
        *state.fake_free.lock() = Some(RESUME_FLOOR_BYTES);
        state.probe(dir.path(), 0);
        assert!(state.check().is_ok());
    }
}
