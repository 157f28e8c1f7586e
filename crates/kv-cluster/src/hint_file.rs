//! Reading hint files: [`HintReader`] streams the frames of one sealed file (see `hints.rs` for
//! the layout) in batches capped in count and bytes, so a replay or a count at start-up holds one
//! batch of hints in memory, never a whole file.

use crate::error::{Error, Result};
use kv_core::Record;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use tracing::warn;

/// Frames larger than this are treated as damage, not allocated (a record this large could not
/// be delivered in one batch anyway).
const MAX_HINT_FRAME_BYTES: usize = crate::peer::MAX_BATCH_BYTES;
/// Hints counted per read while counting a file at start-up.
const COUNT_BATCH_BYTES: usize = 1024 * 1024;

/// Hints of one file, counted by streaming through it.
pub(crate) fn count_hints(path: &Path) -> Result<u64> {
    let mut reader = HintReader::open(path)?;
    let mut count = 0;
    loop {
        let batch = reader.next_batch(usize::MAX, COUNT_BATCH_BYTES)?;
        if batch.is_empty() {
            return Ok(count);
        }
        count += batch.len() as u64;
    }
}

/// Streams the hints of one sealed file in batches capped in count and bytes (blocking I/O: use
/// it from `spawn_blocking`). A damaged or torn frame ends the file with a warning: the hint
/// duplicates a write that W replicas already hold, and read repair heals what is left.
#[derive(Debug)]
pub struct HintReader {
    path: PathBuf,
    file: BufReader<File>,
    offset: u64,
    /// A record read past the previous batch's byte cap; it opens the next batch.
    pending: Option<Record>,
    ended: bool,
}

impl HintReader {
    /// Opens a sealed hint file.
    pub fn open(path: &Path) -> Result<HintReader> {
        let file = File::open(path).map_err(|source| Error::HintIo {
            op: "open",
            path: path.to_owned(),
            source,
        })?;
        Ok(HintReader {
            path: path.to_owned(),
            file: BufReader::with_capacity(64 * 1024, file),
            offset: 0,
            pending: None,
            ended: false,
        })
    }

    /// The next hints: at most `max_records`, and within `max_bytes` as a replication batch
    /// counts them (`peer::batch_item_bytes`), except that a lone larger hint comes alone.
    /// Empty once the file is done.
    pub fn next_batch(&mut self, max_records: usize, max_bytes: usize) -> Result<Vec<Record>> {
        let mut batch = Vec::new();
        let mut bytes = 4usize;
        while batch.len() < max_records.max(1) {
            let Some(record) = self
                .pending
                .take()
                .map_or_else(|| self.next_record(), |r| Ok(Some(r)))?
            else {
                break;
            };
            bytes = bytes.saturating_add(crate::peer::batch_item_bytes(&record));
            if !batch.is_empty() && bytes > max_bytes {
                self.pending = Some(record);
                break;
            }
            batch.push(record);
        }
        Ok(batch)
    }

    /// Reads the next whole frame; `None` at the end of the file or at the first damage.
    fn next_record(&mut self) -> Result<Option<Record>> {
        if self.ended {
            return Ok(None);
        }
        let record = self.read_frame().map_err(|source| Error::HintIo {
            op: "read",
            path: self.path.clone(),
            source,
        })?;
        match record {
            Frame::Record(record, used) => {
                self.offset += used;
                return Ok(Some(record));
            }
            Frame::End => {}
            Frame::Damaged => {
                warn!(path = %self.path.display(), offset = self.offset, "damaged hint frame; later hints in this file skipped");
            }
        }
        self.ended = true;
        Ok(None)
    }

    fn read_frame(&mut self) -> std::io::Result<Frame> {
        let mut header = [0u8; 8];
        let got = read_full(&mut self.file, &mut header)?;
        if got == 0 {
            return Ok(Frame::End);
        }
        if got < header.len() {
            return Ok(Frame::Damaged);
        }
        let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
        let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
        let crc = u32::from_le_bytes([c0, c1, c2, c3]);
        if len > MAX_HINT_FRAME_BYTES {
            return Ok(Frame::Damaged);
        }
        let mut payload = vec![0u8; len];
        if read_full(&mut self.file, &mut payload)? < len || crc32c::crc32c(&payload) != crc {
            return Ok(Frame::Damaged);
        }
        Ok(match Record::decode(&payload) {
            Ok(record) => Frame::Record(record, 8 + len as u64),
            Err(_) => Frame::Damaged,
        })
    }
}

/// What the next frame of a hint file holds.
enum Frame {
    /// A whole record and the bytes its frame took.
    Record(Record, u64),
    /// The file ends cleanly here.
    End,
    /// A torn or damaged frame.
    Damaged,
}

/// Reads until `buf` is full or the file ends; returns how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
