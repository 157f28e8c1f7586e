//! (Tests only.) A simulated disk for the storage engine: an in-memory file system with a page
//! cache that a simulated power cut tears, after TigerBeetle's and FoundationDB's simulated
//! storage and the ALICE study of crash states.
//!
//! The model:
//!
//! - Every file has its current bytes (what reads see) and its *synced* bytes (what the disk
//!   holds as of its last fsync). At a crash each file whose bytes differ from its synced bytes
//!   ends up, at random, with all its unsynced data lost, all of it kept, cut at any byte, or
//!   persisted page by page (4 KiB) in any order, with a length that may or may not have reached
//!   the disk (a longer file reads zeros where pages were lost).
//! - Creations, removals and renames are durable once their folder is fsynced. At a crash the
//!   ones not yet synced survive either as a prefix, in order (a metadata journal, as ext4's),
//!   or as any subset (no order promised, as POSIX says); a rename is never half done.
//! - The crash happens at a chosen operation count, just before or just after that operation.
//!   From then on the "machine" is dead: every operation fails with EIO, so nothing after the
//!   crash can be acknowledged. [`SimFs::crashed`] gives the disk as found after power returns.
//! - Faults, each with a probability per operation: fsync (file or folder) fails with EIO, a
//!   write fails with EIO, or the disk fills (a write stops part-way, ENOSPC from then on).
//!
//! All randomness comes from one seeded generator, so a case is replayed by its seed (the
//! threads of the store may interleave differently, but the tests drive it one step at a time).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::vfs::{Vfs, VfsFile};
use crate::Error;

/// Page size of the simulated page cache.
pub const PAGE: usize = 4096;
const EIO: i32 = 5;
const ENOSPC: i32 = 28;

/// A small, fast, seeded generator (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64) < p * (1u64 << 53) as f64
    }
}

/// Fault probabilities, per operation of the kind.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    pub fsync_eio: f64,
    pub write_eio: f64,
    pub enospc: f64,
}

/// One file: what reads see and what the disk holds.
#[derive(Clone, Debug, Default)]
struct Node {
    data: Vec<u8>,
    synced: Vec<u8>,
}

/// A folder operation not yet made durable by a folder fsync (with the file it concerns).
#[derive(Clone, Debug)]
enum DirOp {
    Link(PathBuf, u64),
    Unlink(PathBuf, u64),
    Rename(PathBuf, PathBuf, u64),
}

impl DirOp {
    fn dir(&self) -> Option<&Path> {
        match self {
            DirOp::Link(p, _) | DirOp::Unlink(p, _) | DirOp::Rename(_, p, _) => p.parent(),
        }
    }

    /// Applies the operation to `names`; a rename is atomic (the file moves, whatever
    /// happened to its creation).
    fn apply(&self, names: &mut BTreeMap<PathBuf, u64>) {
        match self {
            DirOp::Link(p, inode) => {
                names.insert(p.clone(), *inode);
            }
            DirOp::Unlink(p, inode) => {
                if names.get(p) == Some(inode) {
                    names.remove(p);
                }
            }
            DirOp::Rename(from, to, inode) => {
                if names.get(from) == Some(inode) {
                    names.remove(from);
                }
                names.insert(to.clone(), *inode);
            }
        }
    }
}

/// The disk after a crash: names and file contents.
#[derive(Clone, Debug)]
struct Image {
    names: BTreeMap<PathBuf, u64>,
    files: HashMap<u64, Vec<u8>>,
    dirs: BTreeSet<PathBuf>,
}

#[derive(Debug)]
struct State {
    rng: Rng,
    nodes: HashMap<u64, Node>,
    next_inode: u64,
    names: BTreeMap<PathBuf, u64>,
    durable: BTreeMap<PathBuf, u64>,
    pending: Vec<DirOp>,
    dirs: BTreeSet<PathBuf>,
    locked: BTreeSet<PathBuf>,
    ops: u64,
    crash_at: Option<u64>,
    image: Option<Image>,
    faults: Faults,
    full: bool,
    /// What happened, for a failing case's report.
    log: Vec<String>,
}

/// The simulated file system; clones share one disk.
#[derive(Clone, Debug)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

fn eio(what: &str) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(EIO).kind(),
        format!("simulated EIO: {what}"),
    )
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

impl State {
    fn dead(&self) -> bool {
        self.image.is_some()
    }

    /// Counts an operation; crashes before it when it is the chosen one (or returns true: crash
    /// right after it).
    fn begin(&mut self, what: &str) -> io::Result<bool> {
        if self.dead() {
            return Err(eio("the machine lost power"));
        }
        self.ops += 1;
        if self.crash_at == Some(self.ops) {
            if self.rng.chance(0.5) {
                self.log
                    .push(format!("op {}: power cut before {what}", self.ops));
                self.crash();
                return Err(eio("the machine lost power"));
            }
            self.log
                .push(format!("op {}: power cut after {what}", self.ops));
            return Ok(true);
        }
        Ok(false)
    }

    /// Runs one operation under the crash point.
    fn op<T>(&mut self, what: &str, f: impl FnOnce(&mut State) -> io::Result<T>) -> io::Result<T> {
        let crash_after = self.begin(what)?;
        let result = f(self);
        if crash_after {
            self.crash();
        }
        result
    }

    fn inode(&self, path: &Path) -> io::Result<u64> {
        self.names.get(path).copied().ok_or_else(|| not_found(path))
    }

    fn check_dir(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(dir) if self.dirs.contains(dir) => Ok(()),
            _ => Err(not_found(path)),
        }
    }

    fn link(&mut self, path: &Path) -> u64 {
        let inode = self.next_inode;
        self.next_inode += 1;
        self.nodes.insert(inode, Node::default());
        self.names.insert(path.to_owned(), inode);
        self.pending.push(DirOp::Link(path.to_owned(), inode));
        inode
    }

    /// The disk as a crash now would leave it; the machine is dead afterwards.
    fn crash(&mut self) {
        let mut names = self.durable.clone();
        let ordered = self.rng.chance(0.5);
        let kept = if ordered {
            // A metadata journal: the operations reach the disk in order, up to some point.
            let kept = self.rng.below(self.pending.len() as u64 + 1) as usize;
            for op in &self.pending[..kept] {
                op.apply(&mut names);
            }
            kept
        } else {
            // No order at all: any subset of them (each one whole).
            let mut kept = 0;
            for op in &self.pending {
                if self.rng.chance(0.5) {
                    op.apply(&mut names);
                    kept += 1;
                }
            }
            kept
        };
        let mut files = HashMap::new();
        for inode in names.values() {
            if files.contains_key(inode) {
                continue;
            }
            let node = self.nodes.get(inode).cloned().unwrap_or_default();
            let torn = tear(&mut self.rng, &node);
            files.insert(*inode, torn);
        }
        self.log.push(format!(
            "crash: kept {kept} of {} unsynced folder operations ({})",
            self.pending.len(),
            if ordered { "a prefix" } else { "any subset" }
        ));
        self.image = Some(Image {
            names,
            files,
            dirs: self.dirs.clone(),
        });
    }

    fn write(&mut self, inode: u64, at: Option<usize>, buf: &[u8]) -> io::Result<usize> {
        let faults = self.faults;
        if self.full {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        if self.rng.chance(faults.write_eio) {
            self.log.push(format!("op {}: write EIO", self.ops));
            return Err(eio("write"));
        }
        let mut n = buf.len();
        if self.rng.chance(faults.enospc) {
            self.full = true;
            n = self.rng.below(buf.len() as u64) as usize;
            self.log
                .push(format!("op {}: disk full after {n} bytes", self.ops));
            if n == 0 {
                return Err(io::Error::from_raw_os_error(ENOSPC));
            }
        }
        let node = self.nodes.entry(inode).or_default();
        let at = at.unwrap_or(node.data.len());
        if node.data.len() < at + n {
            node.data.resize(at + n, 0);
        }
        node.data[at..at + n].copy_from_slice(&buf[..n]);
        Ok(n)
    }

    fn fsync(&mut self, what: &str) -> io::Result<()> {
        if self.rng.chance(self.faults.fsync_eio) {
            self.log
                .push(format!("op {}: fsync EIO ({what})", self.ops));
            return Err(eio("fsync"));
        }
        Ok(())
    }
}

/// Bytes `from..to` of `v`, zeros past its end, appended to `out`.
fn extend_from(out: &mut Vec<u8>, v: &[u8], from: usize, to: usize) {
    let have = v.get(from..to.min(v.len())).unwrap_or(&[]);
    out.extend_from_slice(have);
    out.resize(out.len() + (to - from - have.len()), 0);
}

/// What a crash leaves of one file (see the module docs).
fn tear(rng: &mut Rng, node: &Node) -> Vec<u8> {
    if node.data == node.synced {
        return node.synced.clone();
    }
    let (d, s) = (node.data.len(), node.synced.len());
    let (lo, hi) = (d.min(s), d.max(s));
    match rng.below(4) {
        0 => node.synced.clone(),
        1 => node.data.clone(),
        2 => {
            // Everything up to a byte reached the disk, nothing after it.
            let cut = lo + rng.below((hi - lo + 1) as u64) as usize;
            let mut out = Vec::with_capacity(cut);
            extend_from(&mut out, &node.data, 0, cut.min(d));
            let done = out.len();
            extend_from(&mut out, &node.synced, done, cut);
            out
        }
        _ => {
            // Pages written back in any order; the length may or may not have been updated.
            let len = match rng.below(3) {
                0 => d,
                1 => s,
                _ => lo + rng.below((hi - lo + 1) as u64) as usize,
            };
            let mut out = Vec::with_capacity(len);
            while out.len() < len {
                let (from, to) = (out.len(), (out.len() + PAGE).min(len));
                let source = if rng.chance(0.5) {
                    &node.data
                } else {
                    &node.synced
                };
                extend_from(&mut out, source, from, to);
            }
            out
        }
    }
}

impl SimFs {
    /// An empty disk; `seed` drives every random choice.
    pub fn new(seed: u64) -> SimFs {
        SimFs::from_state(Rng::new(seed), None)
    }

    fn from_state(rng: Rng, image: Option<Image>) -> SimFs {
        let mut state = State {
            rng,
            nodes: HashMap::new(),
            next_inode: 1,
            names: BTreeMap::new(),
            durable: BTreeMap::new(),
            pending: Vec::new(),
            dirs: BTreeSet::new(),
            locked: BTreeSet::new(),
            ops: 0,
            crash_at: None,
            image: None,
            faults: Faults::default(),
            full: false,
            log: Vec::new(),
        };
        if let Some(image) = image {
            for (inode, bytes) in image.files {
                state.nodes.insert(
                    inode,
                    Node {
                        data: bytes.clone(),
                        synced: bytes,
                    },
                );
                state.next_inode = state.next_inode.max(inode + 1);
            }
            state.names = image.names.clone();
            state.durable = image.names;
            state.dirs = image.dirs;
        }
        SimFs {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Operations counted so far.
    pub fn ops(&self) -> u64 {
        self.state.lock().ops
    }

    /// Crashes just before or just after operation number `op` (counted from the start).
    pub fn crash_at(&self, op: u64) {
        self.state.lock().crash_at = Some(op);
    }

    /// Crashes now (if it has not already).
    pub fn crash_now(&self) {
        let mut state = self.state.lock();
        if !state.dead() {
            let line = format!("op {}: power cut", state.ops);
            state.log.push(line);
            state.crash();
        }
    }

    /// Whether the power cut has happened.
    pub fn is_crashed(&self) -> bool {
        self.state.lock().dead()
    }

    /// The disk as found when power returns, with a fresh page cache and no faults.
    pub fn crashed(&self) -> Option<SimFs> {
        let mut state = self.state.lock();
        let image = state.image.clone()?;
        let rng = Rng::new(state.rng.next_u64());
        let fs = SimFs::from_state(rng, Some(image));
        fs.state.lock().log.clone_from(&state.log);
        Some(fs)
    }

    /// Sets the fault probabilities.
    pub fn set_faults(&self, faults: Faults) {
        self.state.lock().faults = faults;
    }

    /// The log of crashes and faults.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().log.clone()
    }

    /// Paths of the files that exist, with their lengths.
    pub fn files(&self) -> Vec<(PathBuf, usize)> {
        let state = self.state.lock();
        state
            .names
            .iter()
            .map(|(p, i)| (p.clone(), state.nodes.get(i).map_or(0, |n| n.data.len())))
            .collect()
    }

    /// Flips bits of one byte of a file, in its synced bytes too (damage on the medium).
    pub fn corrupt(&self, path: &Path, at: usize, mask: u8) {
        let mut state = self.state.lock();
        state
            .log
            .push(format!("bit rot: {} byte {at}", path.display()));
        let Some(inode) = state.names.get(path).copied() else {
            return;
        };
        if let Some(node) = state.nodes.get_mut(&inode) {
            if let Some(b) = node.data.get_mut(at) {
                *b ^= mask;
            }
            if let Some(b) = node.synced.get_mut(at) {
                *b ^= mask;
            }
        }
    }
}

/// An open simulated file.
#[derive(Debug)]
pub struct SimFile {
    fs: SimFs,
    inode: u64,
    pos: usize,
    append: bool,
}

impl Read for SimFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let state = self.fs.state.lock();
        if state.dead() {
            return Err(eio("the machine lost power"));
        }
        let data = state.nodes.get(&self.inode).map_or(&[][..], |n| &n.data);
        let rest = data.get(self.pos..).unwrap_or(&[]);
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for SimFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let at = (!self.append).then_some(self.pos);
        let inode = self.inode;
        let n = self
            .fs
            .state
            .lock()
            .op("write", |s| s.write(inode, at, buf))?;
        self.pos += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl VfsFile for SimFile {
    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn sync_data(&self) -> io::Result<()> {
        let inode = self.inode;
        self.fs.state.lock().op("fsync", |s| {
            s.fsync("file")?;
            if let Some(node) = s.nodes.get_mut(&inode) {
                node.synced.clone_from(&node.data);
            }
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let inode = self.inode;
        self.fs.state.lock().op("set_len", |s| {
            let node = s.nodes.entry(inode).or_default();
            if len as usize > node.data.len() && s.full {
                return Err(io::Error::from_raw_os_error(ENOSPC));
            }
            node.data.resize(len as usize, 0);
            Ok(())
        })
    }

    fn size(&self) -> io::Result<u64> {
        let state = self.fs.state.lock();
        Ok(state.nodes.get(&self.inode).map_or(0, |n| n.data.len()) as u64)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        // The file grows to `len` (zeros), unsynced until the next fsync like any extension.
        let inode = self.inode;
        self.fs.state.lock().op("fallocate", |s| {
            let full = s.full;
            let node = s.nodes.entry(inode).or_default();
            if len as usize <= node.data.len() {
                return Ok(());
            }
            if full {
                return Err(io::Error::from_raw_os_error(ENOSPC));
            }
            node.data.resize(len as usize, 0);
            Ok(())
        })
    }

    fn seek_to(&mut self, pos: u64) -> io::Result<()> {
        self.pos = pos as usize;
        Ok(())
    }
}

/// The simulated folder lock: released when dropped.
#[derive(Debug)]
pub struct SimLock {
    fs: SimFs,
    dir: PathBuf,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.fs.state.lock().locked.remove(&self.dir);
    }
}

impl SimFs {
    fn file(&self, inode: u64, append: bool) -> SimFile {
        SimFile {
            fs: self.clone(),
            inode,
            pos: 0,
            append,
        }
    }
}

impl Vfs for SimFs {
    type File = SimFile;
    type Lock = SimLock;

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        // Folders are durable at once: kv creates its data folder before anything else.
        self.state.lock().op("mkdir", |s| {
            for d in dir.ancestors() {
                s.dirs.insert(d.to_owned());
            }
            Ok(())
        })
    }

    fn lock(&self, dir: &Path) -> Result<SimLock, Error> {
        let mut state = self.state.lock();
        if !state.locked.insert(dir.to_owned()) {
            return Err(Error::Locked {
                path: dir.join("LOCK"),
            });
        }
        drop(state);
        Ok(SimLock {
            fs: self.clone(),
            dir: dir.to_owned(),
        })
    }

    fn create_new(&self, path: &Path) -> io::Result<SimFile> {
        let inode = self.state.lock().op("create_new", |s| {
            s.check_dir(path)?;
            if s.names.contains_key(path) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", path.display()),
                ));
            }
            Ok(s.link(path))
        })?;
        Ok(self.file(inode, true))
    }

    fn create(&self, path: &Path) -> io::Result<SimFile> {
        let inode = self.state.lock().op("create", |s| {
            s.check_dir(path)?;
            match s.names.get(path).copied() {
                Some(inode) => {
                    if let Some(node) = s.nodes.get_mut(&inode) {
                        node.data.clear();
                    }
                    Ok(inode)
                }
                None => Ok(s.link(path)),
            }
        })?;
        Ok(self.file(inode, false))
    }

    fn open_write(&self, path: &Path) -> io::Result<SimFile> {
        let inode = self.state.lock().op("open", |s| s.inode(path))?;
        Ok(self.file(inode, false))
    }

    fn open_read(&self, path: &Path) -> io::Result<SimFile> {
        let inode = self.state.lock().op("open", |s| s.inode(path))?;
        Ok(self.file(inode, false))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.state.lock().op("read", |s| {
            let inode = s.inode(path)?;
            Ok(s.nodes
                .get(&inode)
                .map(|n| n.data.clone())
                .unwrap_or_default())
        })
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        let state = self.state.lock();
        if state.dead() {
            return Err(eio("the machine lost power"));
        }
        let inode = state.inode(path)?;
        Ok(state.nodes.get(&inode).map_or(0, |n| n.data.len()) as u64)
    }

    fn exists(&self, path: &Path) -> bool {
        self.state.lock().names.contains_key(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.state.lock().op("rename", |s| {
            s.check_dir(to)?;
            let inode = s.inode(from)?;
            s.names.remove(from);
            s.names.insert(to.to_owned(), inode);
            s.pending
                .push(DirOp::Rename(from.to_owned(), to.to_owned(), inode));
            Ok(())
        })
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.state.lock().op("remove", |s| {
            let inode = s.inode(path)?;
            s.names.remove(path);
            s.pending.push(DirOp::Unlink(path.to_owned(), inode));
            Ok(())
        })
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        self.state.lock().op("list", |s| {
            if !s.dirs.contains(dir) {
                return Err(not_found(dir));
            }
            Ok(s.names
                .keys()
                .filter(|p| p.parent() == Some(dir))
                .cloned()
                .collect())
        })
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.state.lock().op("fsync folder", |s| {
            s.fsync("folder")?;
            let (mine, rest): (Vec<DirOp>, Vec<DirOp>) = std::mem::take(&mut s.pending)
                .into_iter()
                .partition(|op| op.dir() == Some(dir));
            for op in &mine {
                op.apply(&mut s.durable);
            }
            s.pending = rest;
            Ok(())
        })
    }
}

#[cfg(test)]
#[path = "sim_tests.rs"]
mod tests;
