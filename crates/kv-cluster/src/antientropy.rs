//! Anti-entropy: replicas compare hash trees in the background and exchange what differs, so a
//! replica that lost data heals without client reads; and the rule that decides when a tombstone
//! may be collected.
//!
//! # A round
//! One node, for each peer that shares ring arcs with it: asks the peer's roots of those arcs
//! (`/internal/aae/roots`), then the leaves of the arcs whose roots differ (`/internal/aae/leaves`),
//! then the `(key, version)` lists of the leaves that differ (`/internal/aae/keys`), and compares
//! them with its own: the newer record goes to the side that lacks it (pushed with
//! `/internal/replicate`, pulled with `/internal/entries`). If anything moved, a second pass does
//! it again, so that what came from one peer reaches the others. Record bytes are capped per
//! second (`ANTI_ENTROPY_BYTES_PER_SEC`); rounds run every `ANTI_ENTROPY_INTERVAL_SECS`, when a
//! peer comes back up, and on `POST /admin/repair`. Nothing here holds a lock the write path takes,
//! except a map shard's read lock while one shard is scanned.
//!
//! # The horizon: deletes that stay deleted
//! A round that reached every peer sharing an arc with this node, at the same membership view,
//! and finished every exchange is *complete*: every record written before it started (less the
//! grace period, which covers writes still in flight) is now on every replica. This node's
//! **horizon** is then `start - TOMBSTONE_GRACE_SECS`, stored in `DATA_DIR/antientropy.json` with
//! the view it holds for. Two rules follow:
//! - the checkpoint collects a tombstone only when it is older than the horizon (and the grace):
//!   every replica is known to hold it;
//! - a record older than a replica's horizon that this replica lacks was deleted and collected
//!   there: the copy is a zombie (from an old backup) and is dropped, not spread. A read whose
//!   coordinator lacks the key and finds an older copy elsewhere answers 404 by the same rule.
//!
//! A new view (a membership change) starts from no horizon. A node restored from a backup
//! (`kv-node restore`) has none either, and before it reports healthy it runs rounds until one
//! completes, dropping its zombies against its peers' horizons.

use crate::cluster::Cluster;
use crate::merkle::{self, Segment, TreeSet, Trees, LEAVES};
use crate::peer::{CallError, SEND_BATCH_BYTES};
use kv_core::{Record, Version};
use kv_ring::Ring;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Path of `/internal/aae/roots`.
pub const ROOTS_PATH: &str = "/internal/aae/roots";
/// Path of `/internal/aae/leaves`.
pub const LEAVES_PATH: &str = "/internal/aae/leaves";
/// Path of `/internal/aae/keys`.
pub const KEYS_PATH: &str = "/internal/aae/keys";
/// Most arcs one roots or leaves call may name.
pub const MAX_ARCS_PER_CALL: usize = 8_192;
/// Arcs whose leaves one call asks for.
const LEAVES_CHUNK: usize = 512;
/// Most segments one keys call may name.
pub const MAX_SEGMENTS_PER_CALL: usize = 8_192;
/// Keys pulled per `/internal/entries` call (its answers are not byte-capped, so fewer than the
/// call's limit).
const PULL_BATCH: usize = 256;
/// Records pushed per `/internal/replicate` call (also capped at [`SEND_BATCH_BYTES`]).
const PUSH_BATCH: usize = 512;
/// The state file's name in `DATA_DIR`.
const STATE_FILE: &str = "antientropy.json";
/// How long a restored node waits between rounds while it has not completed one.
const SYNC_RETRY: Duration = Duration::from_millis(500);

/// Anti-entropy settings, from the node's configuration.
#[derive(Debug, Clone)]
pub struct AntiEntropyConfig {
    /// Time between background rounds (`ANTI_ENTROPY_INTERVAL_SECS`; zero: no background rounds,
    /// only `POST /admin/repair` and peers coming back).
    pub interval: Duration,
    /// Record bytes a round may move per second (`ANTI_ENTROPY_BYTES_PER_SEC`).
    pub bytes_per_sec: u64,
    /// `TOMBSTONE_GRACE_SECS`: how far behind a complete round's start the horizon is.
    pub grace: Duration,
}

impl Default for AntiEntropyConfig {
    fn default() -> Self {
        AntiEntropyConfig {
            interval: Duration::from_secs(30),
            bytes_per_sec: 16 * 1024 * 1024,
            grace: Duration::from_secs(24 * 3600),
        }
    }
}

/// What `DATA_DIR/antientropy.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct StateFile {
    /// The view (epoch, digest) the horizon holds for.
    #[serde(default)]
    epoch: u64,
    #[serde(default)]
    digest: u32,
    /// Start of the last complete round, Unix ms (0: none).
    #[serde(default)]
    clean_at_ms: u64,
    /// Written by `kv-node restore`: the data may hold records deleted since the backup.
    #[serde(default)]
    restored: bool,
}

/// Marks a data folder as restored from a backup: the node starts with no horizon and does not
/// report healthy until one anti-entropy round completed (see the module docs).
pub fn mark_restored(data_dir: &Path) -> std::io::Result<()> {
    let state = StateFile {
        restored: true,
        ..StateFile::default()
    };
    let bytes = serde_json::to_vec(&state).map_err(std::io::Error::other)?;
    kv_core::files::write_private(&data_dir.join(STATE_FILE), &bytes)
}

/// One peer's part of a round.
/// What an exchange compared and moved: per peer, and summed over the peers for a round.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct RepairCounts {
    /// Arcs compared (summed over the passes).
    pub ranges_compared: u64,
    /// Arcs whose roots differed.
    pub ranges_differed: u64,
    /// Leaves whose hashes differed.
    pub segments_differed: u64,
    /// Records this node sent.
    pub records_sent: u64,
    /// Records this node took.
    pub records_received: u64,
    /// Copies this node dropped as zombies (older than the peer's horizon, absent there).
    pub zombies_dropped: u64,
    /// Bytes of records sent and received.
    pub bytes: u64,
}

impl RepairCounts {
    fn add(&mut self, other: &RepairCounts) {
        self.ranges_compared += other.ranges_compared;
        self.ranges_differed += other.ranges_differed;
        self.segments_differed += other.segments_differed;
        self.records_sent += other.records_sent;
        self.records_received += other.records_received;
        self.zombies_dropped += other.zombies_dropped;
        self.bytes += other.bytes;
    }

    /// Records that changed a side: sent, received or dropped.
    pub fn moved(&self) -> u64 {
        self.records_sent + self.records_received + self.zombies_dropped
    }
}

/// One peer's part of a round.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerRepair {
    /// The peer.
    pub peer: String,
    /// What was compared and moved with it.
    #[serde(flatten)]
    pub counts: RepairCounts,
    /// Why the exchange did not finish, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A round's report (`POST /admin/repair`, `GET /admin/repair`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RepairReport {
    /// Why the round ran: `interval`, `admin`, `peer-up`, `start-up`, `restored`.
    pub trigger: String,
    /// Unix ms at the start.
    pub started_at_ms: u64,
    /// How long it took.
    pub duration_ms: u64,
    /// The membership epoch it ran at.
    pub epoch: u64,
    /// Passes made (1, or 2 when the first moved records).
    pub passes: u32,
    /// True when every exchange with every peer sharing arcs finished: the horizon moved.
    pub complete: bool,
    /// Why the round did not run, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Totals over the peers.
    #[serde(flatten)]
    pub counts: RepairCounts,
    /// Bytes of tree data (roots, leaves, key lists) received from peers.
    pub tree_bytes: u64,
    /// This node's horizon after the round (Unix ms; 0: none yet).
    pub tombstone_horizon_ms: u64,
    /// Per peer.
    pub peers: Vec<PeerRepair>,
}

impl RepairReport {
    fn skipped(trigger: &str, why: &str) -> RepairReport {
        RepairReport {
            trigger: trigger.into(),
            started_at_ms: crate::now_ms(),
            skipped: Some(why.into()),
            ..RepairReport::default()
        }
    }
}

/// Body of a roots or leaves call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArcsQuery {
    /// The asker's view; the answer is refused unless both hold the same.
    pub epoch: u64,
    /// Its digest.
    pub digest: u32,
    /// The arcs.
    pub arcs: Vec<u32>,
}

/// Answer of a roots call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootsAnswer {
    /// The answering node's view.
    pub epoch: u64,
    /// Its digest.
    pub digest: u32,
    /// False while its trees are being built (or are for another ring): try later.
    pub ready: bool,
    /// Its horizon (Unix ms, 0: none) at this view.
    pub horizon_ms: u64,
    /// One root per asked arc, in order (empty when not ready).
    pub roots: Vec<u64>,
}

/// Answer of a leaves call: `LEAVES` hashes per asked arc, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeavesAnswer {
    /// False when the trees are not ready or the views differ.
    pub ready: bool,
    /// The leaves, flattened.
    pub leaves: Vec<u64>,
}

/// Body of a keys call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentsQuery {
    /// The asker's view.
    pub epoch: u64,
    /// Its digest.
    pub digest: u32,
    /// Segments (`arc * LEAVES + leaf`), ascending.
    pub segments: Vec<Segment>,
}

/// Answer of a keys call: every `(key, hlc, node)` of the first `covered` asked segments
/// (a byte cap may stop it before the end; at least one segment is always covered).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeysAnswer {
    /// False when the views differ.
    pub ready: bool,
    /// How many of the asked segments the list covers, from the first.
    pub covered: usize,
    /// The entries.
    pub keys: Vec<(String, u64, u32)>,
}

/// A token bucket of bytes per second, for the records a round moves.
#[derive(Debug)]
struct Pace {
    per_sec: u64,
    started: Instant,
    spent: u64,
}

impl Pace {
    fn new(per_sec: u64) -> Pace {
        Pace {
            per_sec: per_sec.max(1),
            started: Instant::now(),
            spent: 0,
        }
    }

    /// Counts `bytes` and sleeps until the average is back under the cap.
    async fn spend(&mut self, bytes: u64) {
        self.spent += bytes;
        let due = Duration::from_secs_f64(self.spent as f64 / self.per_sec as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// The anti-entropy state a node keeps.
pub(crate) struct AntiEntropy {
    pub(crate) trees: Arc<TreeSet>,
    config: AntiEntropyConfig,
    file: PathBuf,
    /// This node's horizon (Unix ms) and the view rank it holds for.
    horizon: Mutex<((u64, u32), u64)>,
    /// Set while a restored node has not completed a round.
    pub(crate) syncing: AtomicBool,
    last: Mutex<Option<RepairReport>>,
    round: tokio::sync::Mutex<()>,
    wake: tokio::sync::Notify,
    rounds: AtomicU64,
}

impl std::fmt::Debug for AntiEntropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AntiEntropy")
            .field("config", &self.config)
            .field("horizon", &*self.horizon.lock())
            .finish_non_exhaustive()
    }
}

impl AntiEntropy {
    /// The state of `data_dir`'s node at view `rank`, with trees (not yet built) for `ring`.
    pub(crate) fn new(
        config: AntiEntropyConfig,
        data_dir: &Path,
        rank: (u64, u32),
        ring: Arc<Ring>,
        shards: usize,
    ) -> AntiEntropy {
        let file = data_dir.join(STATE_FILE);
        let state: StateFile = std::fs::read(&file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let grace = u64::try_from(config.grace.as_millis()).unwrap_or(u64::MAX);
        let horizon = if state.restored || (state.epoch, state.digest) != rank {
            0
        } else {
            state.clean_at_ms.saturating_sub(grace)
        };
        if state.restored {
            warn!("this data folder was restored from a backup: the node reports healthy once an anti-entropy round with its peers completes");
        }
        AntiEntropy {
            trees: Arc::new(TreeSet::new(ring, shards)),
            config,
            file,
            horizon: Mutex::new((rank, horizon)),
            syncing: AtomicBool::new(state.restored),
            last: Mutex::new(None),
            round: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            rounds: AtomicU64::new(0),
        }
    }

    /// This node's horizon at view `rank` (0 when it has none there).
    pub(crate) fn horizon_at(&self, rank: (u64, u32)) -> u64 {
        let (at, horizon) = *self.horizon.lock();
        if at == rank {
            horizon
        } else {
            0
        }
    }

    fn grace_ms(&self) -> u64 {
        u64::try_from(self.config.grace.as_millis()).unwrap_or(u64::MAX)
    }

    /// Records a complete round that started at `started_ms` under view `rank`.
    fn completed(&self, rank: (u64, u32), started_ms: u64) -> u64 {
        let horizon = started_ms.saturating_sub(self.grace_ms());
        *self.horizon.lock() = (rank, horizon);
        let state = StateFile {
            epoch: rank.0,
            digest: rank.1,
            clean_at_ms: started_ms,
            restored: false,
        };
        let written = serde_json::to_vec(&state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| kv_core::files::write_private(&self.file, &bytes));
        if let Err(e) = written {
            warn!(path = %self.file.display(), error = %e, "cannot store the anti-entropy horizon; a restart starts without one");
        }
        horizon
    }
}

/// Keys and versions of some segments, as one side holds them.
type Listing = HashMap<String, Version>;

/// What a comparison of two sides' listings asks for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    push: Vec<String>,
    pull: Vec<String>,
    zombies: Vec<(String, Version)>,
}

/// Compares two listings of the same segments. The newer version wins and goes to the other
/// side; a record older than the horizon of a side that lacks it was collected there after a
/// delete: a zombie. Mine are dropped here; theirs are left to the peer's own round.
fn compare(mine: &Listing, theirs: &Listing, my_horizon: u64, their_horizon: u64) -> Plan {
    let mut plan = Plan::default();
    for (key, &version) in mine {
        match theirs.get(key) {
            Some(&other) if other >= version => {}
            Some(_) => plan.push.push(key.clone()),
            None if version.physical_ms() < their_horizon => {
                plan.zombies.push((key.clone(), version))
            }
            None => plan.push.push(key.clone()),
        }
    }
    for (key, &version) in theirs {
        match mine.get(key) {
            Some(&own) if own >= version => {}
            Some(_) => plan.pull.push(key.clone()),
            None if version.physical_ms() < my_horizon => {}
            None => plan.pull.push(key.clone()),
        }
    }
    plan.push.sort_unstable();
    plan.pull.sort_unstable();
    plan.zombies.sort_unstable();
    plan
}

/// The arcs two nodes both replicate on `ring` with N = `n`.
fn shared_arcs(ring: &Ring, n: usize, me: usize, peer: usize) -> Vec<u32> {
    (0..ring.arc_count())
        .filter(|&arc| {
            let owners = ring.arc_preference(arc, n);
            owners.contains(&me) && owners.contains(&peer)
        })
        .filter_map(|arc| u32::try_from(arc).ok())
        .collect()
}

impl Cluster {
    fn ae(&self) -> &AntiEntropy {
        &self.inner.anti_entropy
    }

    /// The ring anti-entropy compares by: the view's current owners'.
    fn ae_ring(&self) -> Arc<Ring> {
        let topology = self.topology();
        Arc::new(Ring::new(topology.view.before(), self.inner.config.vnodes))
    }

    /// The trees for the current ring, built (blocking work on a blocking thread) when the ring
    /// changed since they were.
    async fn current_trees(&self) -> Arc<Trees> {
        let ring = self.ae_ring();
        let trees = self.ae().trees.current();
        if **trees.ring() == *ring && trees.is_ready() {
            return trees;
        }
        let cluster = self.clone();
        let started = Instant::now();
        let built = tokio::task::spawn_blocking(move || {
            let store = &cluster.inner.store;
            let trees = cluster.ae().trees.replace(ring, store.shard_count());
            for shard in 0..store.shard_count() {
                store.visit_shard(shard, |entries| trees.add_shard(shard, entries));
            }
            trees
        })
        .await;
        match built {
            Ok(trees) => {
                info!(
                    arcs = trees.arcs(),
                    ms = started.elapsed().as_millis() as u64,
                    "anti-entropy hash trees built"
                );
                trees
            }
            // Cancelled: the runtime is shutting down; nothing to report.
            Err(e) if e.is_cancelled() => self.ae().trees.current(),
            Err(e) => {
                warn!(error = %e, "building the anti-entropy hash trees failed");
                self.ae().trees.current()
            }
        }
    }

    /// The background loop: builds the trees, then runs a round every interval, when a peer
    /// comes back up, and (for a restored node) until one completes.
    pub(crate) async fn anti_entropy_loop(self) {
        let mut stop = self.inner.stop.subscribe();
        self.current_trees().await;
        let interval = self.ae().config.interval;
        let mut next = if interval.is_zero() {
            None
        } else {
            Some(tokio::time::Instant::now() + interval.min(Duration::from_secs(5)))
        };
        loop {
            let trigger = if self.ae().syncing.load(Ordering::Acquire) {
                "restored"
            } else {
                let sleep = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = sleep => "interval",
                    _ = self.ae().wake.notified() => "peer-up",
                    _ = stop.changed() => return,
                }
            };
            let report = self.repair_round(trigger).await;
            if trigger == "interval" || next.is_some_and(|at| at <= tokio::time::Instant::now()) {
                next = (!interval.is_zero()).then(|| tokio::time::Instant::now() + interval);
            }
            if self.ae().syncing.load(Ordering::Acquire) && !report.complete {
                tokio::select! {
                    _ = tokio::time::sleep(SYNC_RETRY) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }

    /// Asks the loop for a round soon (a peer came back up).
    pub(crate) fn anti_entropy_soon(&self) {
        self.ae().wake.notify_one();
    }

    /// The last round's report, if any ran.
    pub fn last_repair(&self) -> Option<RepairReport> {
        self.ae().last.lock().clone()
    }

    /// This node's tombstone horizon at the current view (Unix ms; 0: none).
    pub fn tombstone_horizon(&self) -> u64 {
        self.ae().horizon_at(self.topology().view.rank())
    }

    /// True while a node restored from a backup has not completed an anti-entropy round.
    pub fn syncing(&self) -> bool {
        self.ae().syncing.load(Ordering::Acquire)
    }

    /// Runs one full round now (after the one running, if any) and reports it.
    pub async fn repair_round(&self, trigger: &str) -> RepairReport {
        let _one_at_a_time = self.ae().round.lock().await;
        let report = self.run_round(trigger).await;
        let outcome = match (&report.skipped, report.complete) {
            (Some(_), _) => "skipped",
            (None, true) => "complete",
            (None, false) => "incomplete",
        };
        metrics::counter!("kv_repair_rounds_total", "outcome" => outcome).increment(1);
        metrics::counter!("kv_repair_ranges_compared_total")
            .increment(report.counts.ranges_compared);
        metrics::counter!("kv_repair_ranges_differed_total")
            .increment(report.counts.ranges_differed);
        metrics::counter!("kv_repair_records_sent_total").increment(report.counts.records_sent);
        metrics::counter!("kv_repair_records_received_total")
            .increment(report.counts.records_received);
        metrics::counter!("kv_repair_zombies_dropped_total")
            .increment(report.counts.zombies_dropped);
        metrics::counter!("kv_repair_bytes_total")
            .increment(report.counts.bytes + report.tree_bytes);
        metrics::gauge!("kv_tombstone_horizon_ms").set(report.tombstone_horizon_ms as f64);
        if report.counts.moved() > 0 {
            info!(
                trigger,
                complete = report.complete,
                sent = report.counts.records_sent,
                received = report.counts.records_received,
                zombies = report.counts.zombies_dropped,
                ms = report.duration_ms,
                "anti-entropy round moved records"
            );
        }
        self.ae().rounds.fetch_add(1, Ordering::Relaxed);
        *self.ae().last.lock() = Some(report.clone());
        report
    }

    async fn run_round(&self, trigger: &str) -> RepairReport {
        let topology = self.topology();
        if topology.view.in_transition() {
            return RepairReport::skipped(trigger, "a membership change is in progress");
        }
        let trees = self.current_trees().await;
        if !trees.is_ready() {
            return RepairReport::skipped(trigger, "the hash trees are not built yet");
        }
        let ring = trees.ring().clone();
        let rank = topology.view.rank();
        if *ring != Ring::new(topology.view.before(), self.inner.config.vnodes) {
            return RepairReport::skipped(trigger, "the membership view changed during the round");
        }
        let started_ms = crate::now_ms();
        let started = Instant::now();
        let mut report = RepairReport {
            trigger: trigger.into(),
            started_at_ms: started_ms,
            epoch: rank.0,
            complete: true,
            ..RepairReport::default()
        };
        let me = &*self.inner.me;
        let n = topology.replication_factor();
        let Some(my_index) = ring.position(me) else {
            report.complete = false;
            report.skipped = Some("this node owns no part of the ring".into());
            return report;
        };
        let peers: Vec<(String, Vec<u32>)> = ring
            .nodes()
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != my_index)
            .map(|(i, url)| (url.clone(), shared_arcs(&ring, n, my_index, i)))
            .filter(|(_, arcs)| !arcs.is_empty())
            .collect();
        let mut pace = Pace::new(self.ae().config.bytes_per_sec);
        let mut by_peer: HashMap<String, PeerRepair> = HashMap::new();
        for pass in 1..=2 {
            report.passes = pass;
            let mut moved = 0;
            for (peer, arcs) in &peers {
                let entry = by_peer.entry(peer.clone()).or_insert_with(|| PeerRepair {
                    peer: peer.clone(),
                    ..PeerRepair::default()
                });
                let before = entry.counts.moved();
                let result = self
                    .exchange(
                        peer,
                        &trees,
                        arcs,
                        rank,
                        &mut entry.counts,
                        &mut pace,
                        &mut report.tree_bytes,
                    )
                    .await;
                if let Err(e) = result {
                    report.complete = false;
                    entry.error = Some(e);
                }
                moved += entry.counts.moved() - before;
            }
            if moved == 0 || !report.complete {
                break;
            }
        }
        // The view must not have changed under the round for it to count.
        if self.topology().view.rank() != rank {
            report.complete = false;
        }
        let mut peers_out: Vec<PeerRepair> = by_peer.into_values().collect();
        peers_out.sort_by(|a, b| a.peer.cmp(&b.peer));
        for p in &peers_out {
            report.counts.add(&p.counts);
        }
        report.peers = peers_out;
        if report.complete {
            let horizon = self.ae().completed(rank, started_ms);
            self.inner.store.set_tombstone_horizon(horizon);
            if self.ae().syncing.swap(false, Ordering::AcqRel) {
                info!("restored node completed an anti-entropy round: reporting healthy");
            }
        }
        report.tombstone_horizon_ms = self.ae().horizon_at(rank);
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        report
    }

    /// Compares and exchanges with one peer the arcs both replicate.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        peer: &str,
        trees: &Trees,
        arcs: &[u32],
        rank: (u64, u32),
        stats: &mut RepairCounts,
        pace: &mut Pace,
        tree_bytes: &mut u64,
    ) -> Result<(), String> {
        let peers = &self.inner.peers;
        let mut differing = Vec::new();
        let mut their_horizon = 0;
        for chunk in arcs.chunks(MAX_ARCS_PER_CALL) {
            let query = ArcsQuery {
                epoch: rank.0,
                digest: rank.1,
                arcs: chunk.to_vec(),
            };
            let answer = peers
                .aae_roots(peer, &query)
                .await
                .map_err(|e| e.to_string())?;
            if (answer.epoch, answer.digest) != rank {
                return Err(format!(
                    "the peer holds membership epoch {}, this node {}",
                    answer.epoch, rank.0
                ));
            }
            if !answer.ready || answer.roots.len() != chunk.len() {
                return Err("the peer's hash trees are not built yet".into());
            }
            *tree_bytes += 8 * answer.roots.len() as u64;
            their_horizon = answer.horizon_ms;
            for (&arc, &root) in chunk.iter().zip(&answer.roots) {
                if trees.root(arc as usize) != root {
                    differing.push(arc);
                }
            }
        }
        stats.ranges_compared += arcs.len() as u64;
        stats.ranges_differed += differing.len() as u64;
        if differing.is_empty() {
            return Ok(());
        }
        let mut segments: Vec<Segment> = Vec::new();
        for chunk in differing.chunks(LEAVES_CHUNK) {
            let query = ArcsQuery {
                epoch: rank.0,
                digest: rank.1,
                arcs: chunk.to_vec(),
            };
            let answer = peers
                .aae_leaves(peer, &query)
                .await
                .map_err(|e| e.to_string())?;
            if !answer.ready || answer.leaves.len() != chunk.len() * LEAVES {
                return Err("the peer's leaves did not match the arcs asked".into());
            }
            *tree_bytes += 8 * answer.leaves.len() as u64;
            for (&arc, theirs) in chunk.iter().zip(answer.leaves.chunks_exact(LEAVES)) {
                let mut their_leaves = [0u64; LEAVES];
                their_leaves.copy_from_slice(theirs);
                let mine = trees.leaves(arc as usize);
                for leaf in merkle::differing_leaves(&mine, &their_leaves) {
                    segments.push(arc * LEAVES as u32 + leaf as u32);
                }
            }
        }
        segments.sort_unstable();
        stats.segments_differed += segments.len() as u64;
        let my_horizon = self.ae().horizon_at(rank);
        let mut rest = &segments[..];
        while !rest.is_empty() {
            let ask = &rest[..rest.len().min(MAX_SEGMENTS_PER_CALL)];
            let query = SegmentsQuery {
                epoch: rank.0,
                digest: rank.1,
                segments: ask.to_vec(),
            };
            let answer = peers
                .aae_keys(peer, &query)
                .await
                .map_err(|e| e.to_string())?;
            if !answer.ready || answer.covered == 0 || answer.covered > ask.len() {
                return Err("the peer's key list did not cover the segments asked".into());
            }
            *tree_bytes += answer
                .keys
                .iter()
                .map(|(k, _, _)| k.len() as u64 + 12)
                .sum::<u64>();
            let covered = &ask[..answer.covered];
            let theirs: Listing = answer
                .keys
                .into_iter()
                .map(|(key, hlc, node)| (key, Version { hlc, node }))
                .collect();
            let mine = self.listing(trees.ring().clone(), covered.to_vec()).await;
            let plan = compare(&mine, &theirs, my_horizon, their_horizon);
            for (key, version) in &plan.zombies {
                if self.inner.store.forget_if(key, *version) {
                    stats.zombies_dropped += 1;
                }
            }
            self.push(peer, &plan.push, stats, pace).await?;
            self.pull(peer, &plan.pull, stats, pace).await?;
            rest = &rest[answer.covered..];
        }
        Ok(())
    }

    /// This node's keys and versions in `segments` (ascending), read with one scan of the map
    /// on a blocking thread.
    async fn listing(&self, ring: Arc<Ring>, segments: Vec<Segment>) -> Listing {
        let cluster = self.clone();
        tokio::task::spawn_blocking(move || cluster.segment_entries(&ring, &segments, usize::MAX).1)
            .await
            .unwrap_or_default()
    }

    /// Entries of `segments` (ascending), whole segments only, until `max_bytes` of keys:
    /// how many segments were covered (at least one when any was asked) and the entries.
    fn segment_entries(
        &self,
        ring: &Ring,
        segments: &[Segment],
        max_bytes: usize,
    ) -> (usize, Listing) {
        let mut found: Vec<(Segment, String, Version)> = Vec::new();
        self.inner.store.scan(|key, entry| {
            let segment = merkle::segment_of(ring, key);
            if segments.binary_search(&segment).is_ok() {
                found.push((segment, key.to_owned(), entry.version));
            }
        });
        found.sort_unstable_by_key(|(segment, _, _)| *segment);
        let (mut covered, mut bytes, mut i) = (0, 0, 0);
        let mut listing = Listing::new();
        for (index, &segment) in segments.iter().enumerate() {
            let start = i;
            while found.get(i).is_some_and(|(s, _, _)| *s == segment) {
                i += 1;
            }
            let entries = &found[start..i];
            let segment_bytes: usize = entries.iter().map(|(_, k, _)| k.len() + 12).sum();
            if index > 0 && bytes + segment_bytes > max_bytes {
                break;
            }
            bytes += segment_bytes;
            for (_, key, version) in entries {
                listing.insert(key.clone(), *version);
            }
            covered = index + 1;
        }
        (covered, listing)
    }

    /// Sends this node's records of `keys` to `peer`, in byte-capped batches at the round's pace.
    async fn push(
        &self,
        peer: &str,
        keys: &[String],
        stats: &mut RepairCounts,
        pace: &mut Pace,
    ) -> Result<(), String> {
        for chunk in keys.chunks(PUSH_BATCH) {
            let records: Vec<Record> = chunk.iter().filter_map(|k| self.local_record(k)).collect();
            for batch in crate::peer::byte_capped(&records, SEND_BATCH_BYTES) {
                let bytes: usize = batch.iter().map(crate::peer::batch_item_bytes).sum();
                self.inner
                    .peers
                    .replicate(peer, batch, "anti-entropy")
                    .await
                    .map_err(|e| e.to_string())?;
                stats.records_sent += batch.len() as u64;
                stats.bytes += bytes as u64;
                pace.spend(bytes as u64).await;
            }
        }
        Ok(())
    }

    /// Takes `peer`'s records of `keys` and applies them here (newest wins).
    async fn pull(
        &self,
        peer: &str,
        keys: &[String],
        stats: &mut RepairCounts,
        pace: &mut Pace,
    ) -> Result<(), String> {
        for chunk in keys.chunks(PULL_BATCH) {
            let answer: Result<Vec<Option<Record>>, CallError> = self
                .inner
                .peers
                .fetch_entries(peer, chunk, "anti-entropy")
                .await;
            let records: Vec<Record> = answer
                .map_err(|e| e.to_string())?
                .into_iter()
                .flatten()
                .collect();
            if records.is_empty() {
                continue;
            }
            let bytes: usize = records.iter().map(crate::peer::batch_item_bytes).sum();
            let count = records.len() as u64;
            self.apply_replicated(records, Vec::new())
                .await
                .map_err(|e| e.to_string())?;
            stats.records_received += count;
            stats.bytes += bytes as u64;
            pace.spend(bytes as u64).await;
        }
        Ok(())
    }

    /// `/internal/aae/roots`: this node's roots of the asked arcs.
    pub async fn aae_roots(&self, query: &ArcsQuery) -> RootsAnswer {
        let rank = self.topology().view.rank();
        let trees = self.ae().trees.current();
        let ready = (query.epoch, query.digest) == rank
            && trees.is_ready()
            && **trees.ring() == *self.ae_ring();
        let roots = if ready {
            query.arcs.iter().map(|&a| trees.root(a as usize)).collect()
        } else {
            Vec::new()
        };
        RootsAnswer {
            epoch: rank.0,
            digest: rank.1,
            ready,
            horizon_ms: self.ae().horizon_at(rank),
            roots,
        }
    }

    /// `/internal/aae/leaves`: this node's leaves of the asked arcs.
    pub async fn aae_leaves(&self, query: &ArcsQuery) -> LeavesAnswer {
        let rank = self.topology().view.rank();
        let trees = self.ae().trees.current();
        let ready = (query.epoch, query.digest) == rank
            && trees.is_ready()
            && **trees.ring() == *self.ae_ring();
        let leaves = if ready {
            query
                .arcs
                .iter()
                .flat_map(|&a| trees.leaves(a as usize))
                .collect()
        } else {
            Vec::new()
        };
        LeavesAnswer { ready, leaves }
    }

    /// `/internal/aae/keys`: this node's keys and versions in the asked segments (a scan of the
    /// map on a blocking thread), cut at whole segments near [`SEND_BATCH_BYTES`].
    pub async fn aae_keys(&self, query: SegmentsQuery) -> KeysAnswer {
        let rank = self.topology().view.rank();
        if (query.epoch, query.digest) != rank {
            return KeysAnswer {
                ready: false,
                covered: 0,
                keys: Vec::new(),
            };
        }
        let mut segments = query.segments;
        segments.sort_unstable();
        segments.dedup();
        let cluster = self.clone();
        let ring = self.ae_ring();
        let listed = tokio::task::spawn_blocking(move || {
            let (covered, listing) = cluster.segment_entries(&ring, &segments, SEND_BATCH_BYTES);
            (covered, listing)
        })
        .await;
        match listed {
            Ok((covered, listing)) => KeysAnswer {
                ready: true,
                covered,
                keys: listing
                    .into_iter()
                    .map(|(k, v)| (k, v.hlc, v.node))
                    .collect(),
            },
            Err(_) => KeysAnswer {
                ready: false,
                covered: 0,
                keys: Vec::new(),
            },
        }
    }

    /// The read rule of the horizon: `newest` was found on some replicas while this node holds
    /// nothing for the key, and it is older than this node's horizon, so it was deleted and
    /// collected here: a zombie, not a value.
    pub(crate) fn is_zombie(&self, newest: &Record, own_copy: bool) -> bool {
        !own_copy && newest.version.physical_ms() < self.tombstone_horizon()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(ms: u64) -> Version {
        Version {
            hlc: ms << 16,
            node: 1,
        }
    }

    fn listing(entries: &[(&str, u64)]) -> Listing {
        entries
            .iter()
            .map(|(k, ms)| (k.to_string(), v(*ms)))
            .collect()
    }

    #[test]
    fn the_newer_version_goes_to_the_side_that_lacks_it() {
        let mine = listing(&[("a", 10), ("b", 20), ("c", 30)]);
        let theirs = listing(&[("a", 10), ("b", 25), ("d", 40)]);
        let plan = compare(&mine, &theirs, 0, 0);
        assert_eq!(plan.push, vec!["c".to_string()]);
        assert_eq!(plan.pull, vec!["b".to_string(), "d".to_string()]);
        assert!(plan.zombies.is_empty());
    }

    #[test]
    fn a_copy_older_than_the_lacking_sides_horizon_is_a_zombie() {
        // The peer's horizon is 100: "old" (50) was deleted and collected there; "new" (150)
        // is a write it has not seen yet.
        let mine = listing(&[("old", 50), ("new", 150)]);
        let theirs = listing(&[]);
        let plan = compare(&mine, &theirs, 0, 100);
        assert_eq!(plan.push, vec!["new".to_string()]);
        assert_eq!(plan.zombies, vec![("old".to_string(), v(50))]);
        // Seen from the other side: it does not pull the zombie.
        let plan = compare(&theirs, &mine, 100, 0);
        assert_eq!(plan.pull, vec!["new".to_string()]);
        assert!(plan.push.is_empty() && plan.zombies.is_empty());
    }

    #[test]
    fn a_side_without_a_horizon_never_makes_zombies() {
        let mine = listing(&[("k", 1)]);
        let plan = compare(&mine, &Listing::new(), 0, 0);
        assert_eq!(plan.push, vec!["k".to_string()]);
    }

    #[test]
    fn shared_arcs_are_those_both_replicate() {
        let ring = Ring::new(["http://a:1", "http://b:1", "http://c:1", "http://d:1"], 8);
        let all: Vec<u32> = (0..ring.arc_count() as u32).collect();
        // N = 4 of 4: every arc is shared.
        assert_eq!(shared_arcs(&ring, 4, 0, 1), all);
        // N = 2 of 4: a pair shares only some arcs, and every arc is shared by exactly one pair.
        let mut count = 0;
        for a in 0..4 {
            for b in (a + 1)..4 {
                count += shared_arcs(&ring, 2, a, b).len();
            }
        }
        assert_eq!(count, ring.arc_count());
    }

    #[tokio::test]
    async fn the_pace_holds_the_average_under_the_cap() {
        let mut pace = Pace::new(1_000_000);
        let started = Instant::now();
        for _ in 0..5 {
            pace.spend(20_000).await;
        }
        // 100 kB at 1 MB/s: at least 100 ms.
        assert!(started.elapsed() >= Duration::from_millis(95));
    }
}
