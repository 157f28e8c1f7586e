//! The clock's reservation: `DATA_DIR/clock` holds an hlc above every version this node may have
//! issued, written (temp file, fsync, rename, fsync of the folder) before the clock issues a
//! version beyond it. Start-up begins above the stored value, so a restart never reissues a
//! version, even when the node's last writes are on its peers only and its wall clock went back.
//! Timestamp oracles (Percolator's, TiKV's PD) reserve ahead the same way.

use crate::vfs::Vfs;
use crate::Error;
use parking_lot::Mutex;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::error;

/// How far ahead of what it issues the clock reserves: 250 ms of physical time (the hlc keeps
/// 16 bits of logical counter below the milliseconds). A restart starts above the bound, so its
/// first versions may be up to this far ahead of the wall clock: well inside what peers accept
/// (twice `MAX_CLOCK_OFFSET_MS`). The WAL writer moves the bound ahead after its commits, so
/// under load the file is written a few times a second off the request path.
pub const RESERVATION_WINDOW_HLC: u64 = 250 << 16;

/// File name of the reservation inside `DATA_DIR`.
const FILE_NAME: &str = "clock";
/// The file: this magic, then the reserved hlc, little-endian.
const MAGIC: &[u8; 8] = b"KVCLOCK1";

/// Writes a new bound durably (through the store's file system).
type Persist = Box<dyn Fn(u64) -> Result<(), Error> + Send + Sync>;

/// The persisted upper bound of the clock, and the lock that serialises extending it.
pub struct Reservation {
    persist: Persist,
    /// Every hlc up to this one may be issued without writing the file.
    reserved: AtomicU64,
    extending: Mutex<()>,
}

impl Reservation {
    /// Reads `dir/clock` (absent on a new node: 0). A damaged file stops start-up: guessing
    /// could reissue versions.
    pub fn load(vfs: &impl Vfs, dir: &Path) -> Result<Reservation, Error> {
        let path = dir.join(FILE_NAME);
        let reserved = match vfs.read(&path) {
            Ok(bytes) => decode(&bytes).ok_or_else(|| Error::Corrupt {
                path: path.clone(),
                offset: 0,
                reason: "the clock reservation is not 16 bytes starting with KVCLOCK1; \
                         restore it from a backup of the data folder"
                    .into(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(Error::io("read clock reservation", &path)(e)),
        };
        let (vfs, dir) = (vfs.clone(), dir.to_owned());
        Ok(Reservation {
            persist: Box::new(move |hlc| store(&vfs, &dir, hlc)),
            reserved: AtomicU64::new(reserved),
            extending: Mutex::new(()),
        })
    }

    /// The hlc up to which versions may be issued.
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    /// Makes sure `hlc` is covered, writing a new reservation (`hlc` plus the window) when it
    /// is not. A failure to write is logged: the version is issued all the same (the WAL, on
    /// the same disk, fails the write that follows).
    pub fn cover(&self, hlc: u64) {
        if hlc <= self.reserved() {
            return;
        }
        let _one_at_a_time = self.extending.lock();
        if hlc <= self.reserved() {
            return;
        }
        let next = hlc.saturating_add(RESERVATION_WINDOW_HLC);
        match (self.persist)(next) {
            Ok(()) => self.reserved.store(next, Ordering::Release),
            Err(e) => error!(error = %e, "cannot extend the clock reservation"),
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("reserved", &self.reserved())
            .finish_non_exhaustive()
    }
}

/// Writes the bound `hlc` to `dir/clock` atomically (temp file, fsync, rename, folder fsync).
fn store(vfs: &impl Vfs, dir: &Path, hlc: u64) -> Result<(), Error> {
    let path = dir.join(FILE_NAME);
    let mut bytes = Vec::with_capacity(16);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&hlc.to_le_bytes());
    crate::vfs::write_atomic(vfs, dir, &dir.join("clock.tmp"), &path, &bytes)
        .map_err(Error::io("write clock reservation", &path))
}

fn decode(bytes: &[u8]) -> Option<u64> {
    let (magic, value) = bytes.split_first_chunk::<8>()?;
    let value: [u8; 8] = value.try_into().ok()?;
    (magic == MAGIC).then_some(u64::from_le_bytes(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::OsFs;

    #[test]
    fn a_new_folder_reserves_nothing_and_cover_persists_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let reservation = Reservation::load(&OsFs, dir.path()).unwrap();
        assert_eq!(reservation.reserved(), 0);
        reservation.cover(1000);
        assert_eq!(reservation.reserved(), 1000 + RESERVATION_WINDOW_HLC);
        // Inside the window: no new write.
        reservation.cover(2000);
        assert_eq!(reservation.reserved(), 1000 + RESERVATION_WINDOW_HLC);
        let again = Reservation::load(&OsFs, dir.path()).unwrap();
        assert_eq!(again.reserved(), 1000 + RESERVATION_WINDOW_HLC);
    }

    #[test]
    fn a_damaged_reservation_stops_start_up() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"KVCLOCK1\x01").unwrap();
        let err = Reservation::load(&OsFs, dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("clock"), "{err}");
        std::fs::write(dir.path().join(FILE_NAME), b"XXXXXXXX12345678").unwrap();
        assert!(Reservation::load(&OsFs, dir.path()).is_err());
    }
}
