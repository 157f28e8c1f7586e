//! The cluster facade a node serves requests through: where a key lives, forwarding to its
//! replicas, and the quorum write and read paths with hinted handoff and read repair.

use crate::admission::{self, Verdict};
use crate::consistency::Consistency;
use crate::detector::{FailureDetector, PeerStatus};
use crate::error::{Error, Result};
use crate::hints::HintStore;
use crate::membership::{self, Topology, View};
use crate::peer::{ForwardRequest, ForwardResponse, PeerClient, ReplicateAnswer};
use crate::recent_writes::WriteId;
use kv_core::{Record, Store, Version};
use parking_lot::RwLock;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info, instrument, warn};

/// Everything the cluster layer needs to know, already validated by the binary's config.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's canonical URL; must be one of `nodes`.
    pub me: String,
    /// Every node's canonical URL, this one included.
    pub nodes: Vec<String>,
    /// N: how many nodes hold each key (capped at the number of nodes).
    pub replication_factor: usize,
    /// Virtual nodes per node on the ring.
    pub vnodes: usize,
    /// Shared secret carried on node-to-node calls.
    pub secret: Option<String>,
    /// Time between health checks of each peer.
    pub health_interval: Duration,
    /// Deadline of one health check.
    pub health_timeout: Duration,
    /// TCP connect deadline for peer calls.
    pub connect_timeout: Duration,
    /// Deadline of one replication or read call.
    pub peer_timeout: Duration,
    /// Deadline of a forwarded client request: longer than the coordinator's own budget, so
    /// the forwarding node hears the coordinator's real outcome.
    pub forward_timeout: Duration,
    /// Default W.
    pub write_consistency: Consistency,
    /// Default R.
    pub read_consistency: Consistency,
    /// Folder of the hint files.
    pub hints_dir: PathBuf,
    /// Hint window and byte cap per peer (the window is capped at the tombstone grace).
    pub hint_limits: crate::hints::HintLimits,
    /// The stored membership view (`DATA_DIR/members.json`).
    pub members_file: PathBuf,
    /// Keys a node streams to new replicas per second during a membership change.
    pub transfer_keys_per_sec: u64,
    /// Source address of connections to peers (`None`: chosen by the OS).
    pub local_address: Option<std::net::IpAddr>,
    /// PEM CA certificates (`TLS_CA_FILE`): when set, `https://` peers must present a
    /// certificate that chains to one of them, and no other root is trusted.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// `MAX_CLOCK_OFFSET_MS`: a node whose clock is further than this from a majority of the
    /// nodes refuses to coordinate writes.
    pub max_clock_offset: Duration,
    /// Anti-entropy: interval, pace, and the tombstone grace its horizon trails by.
    pub anti_entropy: crate::antientropy::AntiEntropyConfig,
    /// Caps of the change history that watchers read (`WATCH_HISTORY_EVENTS` / `_BYTES`).
    pub watch_history: crate::watch::HistoryLimits,
}

/// What a node should do with a client request for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node is a replica (or the request was already forwarded): coordinate it here.
    Local,
    /// Forward to these replicas, in this order (believed-up first).
    Forward(Vec<Arc<str>>),
}

/// What this node believes about the cluster, for `GET /`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// N.
    pub replication_factor: usize,
    /// Virtual nodes per node.
    pub vnodes: usize,
    /// Every member of the cluster.
    pub nodes: Vec<String>,
    /// The membership view's epoch.
    pub epoch: u64,
    /// Each peer's health and the hints waiting for it.
    pub peers: Vec<PeerView>,
    /// Hints waiting, over all peers.
    pub hints_pending: u64,
    /// Bytes the waiting hints take on disk.
    pub hints_pending_bytes: u64,
    /// Hints delivered since start-up.
    pub hints_delivered: u64,
    /// Client requests this node forwarded to a replica since start-up.
    pub forwarded_requests: u64,
    /// Stale replicas repaired after reads since start-up.
    pub read_repairs: u64,
}

/// One peer in [`ClusterStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    /// Health as the failure detector sees it.
    #[serde(flatten)]
    pub health: PeerStatus,
    /// Hints waiting for this peer.
    pub hints_pending: u64,
}

/// An opened peer change feed (`Cluster::open_peer_watch`): read it with `chunk()`.
pub type PeerWatch = reqwest::Response;

/// A node's view of the cluster and the code paths that span it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub(crate) inner: Arc<Inner>,
}

/// The shared state behind [`Cluster`]; the quorum, listing and background modules reach in.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) me: Arc<str>,
    pub(crate) topology: RwLock<Arc<Topology>>,
    pub(crate) config: ClusterConfig,
    pub(crate) store: Store,
    pub(crate) peers: PeerClient,
    pub(crate) detector: FailureDetector,
    pub(crate) hints: HintStore,
    pub(crate) forwarded: AtomicU64,
    pub(crate) read_repairs: AtomicU64,
    pub(crate) replaying: parking_lot::Mutex<std::collections::HashSet<Arc<str>>>,
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) transfer: parking_lot::Mutex<crate::rebalance::TransferState>,
    /// Keys stored after the cleanup for the committed view (see `cleanup.rs`); taken before
    /// `transfer` wherever both are held.
    pub(crate) stragglers: parking_lot::Mutex<crate::cleanup::Stragglers>,
    /// The promise this node gave a proposed membership change (see `proposal.rs`); taken
    /// before the topology lock wherever both are held.
    pub(crate) promises: parking_lot::Mutex<crate::proposal::Promises>,
    pub(crate) recent_writes: crate::recent_writes::RecentWrites,
    pub(crate) anti_entropy: crate::antientropy::AntiEntropy,
    watch: Arc<crate::watch::WatchHub>,
    key_locks: Vec<tokio::sync::Mutex<()>>,
}

/// The view to start with: the stored one when there is one (a node restarted with a stale
/// `CLUSTER_NODES` keeps the newer view it has, and says so), else one seeded from
/// `CLUSTER_NODES` and stored.
fn initial_view(config: &ClusterConfig) -> Result<View> {
    let seed = View::seed(&config.nodes);
    match membership::load(&config.members_file)? {
        Some(stored) => {
            if stored.members != seed.members {
                warn!(
                    epoch = stored.epoch,
                    stored = ?stored.all(),
                    "CLUSTER_NODES differs from the stored membership view; using the stored view"
                );
            }
            Ok(stored)
        }
        None => {
            membership::store(&config.members_file, &seed)?;
            Ok(seed)
        }
    }
}

/// True when the store holds nothing from an earlier run (no key, no tombstone, no snapshot):
/// this node then never applied a write id it does not remember (every applied record is in
/// the WAL, and replay brings it back as a key or a tombstone).
fn starts_empty(store: &Store) -> bool {
    let status = store.status();
    status.keys == 0 && status.tombstones == 0 && status.last_snapshot.is_none()
}

/// Stripes of the per-key lock that serialises conditional writes on their coordinator.
const KEY_LOCK_STRIPES: usize = 1024;

impl Inner {
    /// The lock stripe of `key`.
    pub(crate) fn key_lock(&self, key: &str) -> &tokio::sync::Mutex<()> {
        let stripe = kv_ring::hash_key(key.as_bytes()) as usize % KEY_LOCK_STRIPES;
        &self.key_locks[stripe]
    }
}

impl Cluster {
    /// Builds the cluster layer over `store` and starts the health-check and hint-replay loop.
    /// Must be called inside a tokio runtime.
    pub fn start(config: ClusterConfig, store: Store) -> Result<Cluster> {
        let view = initial_view(&config)?;
        let topology = Topology::new(view, config.replication_factor, config.vnodes);
        let others = topology
            .members()
            .filter(|u| ***u != *config.me)
            .map(|u| u.to_string());
        let detector = FailureDetector::new(others);
        let peers = PeerClient::new(
            config.secret.as_deref(),
            config.connect_timeout,
            config.peer_timeout,
            config.local_address,
            config.tls_ca_pem.as_deref(),
        )
        .map_err(|reason| Error::PeerProtocol {
            peer: config.me.clone(),
            status: 0,
            reason,
        })?;
        let mut hint_limits = config.hint_limits;
        // A hint older than the grace could carry a write whose key's tombstone was collected.
        hint_limits.window = hint_limits.window.min(config.anti_entropy.grace);
        let hints = HintStore::open(config.hints_dir.clone(), hint_limits)?;
        let (stop, _) = watch::channel(false);
        let transfer = crate::rebalance::TransferState::load(&config.members_file);
        let fresh = starts_empty(&store);
        info!(
            fresh,
            "write ids: a resend's \"never seen\" is vouched for {}",
            if fresh {
                "at once (no data from an earlier run)"
            } else {
                "once this run is older than the resend"
            }
        );
        let recent_writes = crate::recent_writes::RecentWrites::new(fresh);
        let data_dir = config
            .members_file
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        let anti_entropy = crate::antientropy::AntiEntropy::new(
            config.anti_entropy.clone(),
            &data_dir,
            topology.view.rank(),
            Arc::new(kv_ring::Ring::new(topology.view.before(), config.vnodes)),
            store.shard_count(),
        );
        store.set_tombstone_horizon(anti_entropy.horizon_at(topology.view.rank()));
        let watch = Arc::new(crate::watch::WatchHub::new(
            config.watch_history,
            kv_core::Version {
                hlc: crate::now_ms() << 16,
                node: 0,
            },
        ));
        // One observer slot, two followers: the Merkle trees and the change history.
        let observers = kv_core::MapObservers::new(vec![anti_entropy.trees.clone(), watch.clone()]);
        if !store.set_map_observer(Arc::new(observers)) {
            warn!(
                "the store already has a map observer: anti-entropy trees and watches will not follow writes"
            );
        }
        let inner = Arc::new(Inner {
            me: Arc::from(config.me.as_str()),
            topology: RwLock::new(Arc::new(topology)),
            config,
            store,
            peers,
            detector,
            hints,
            forwarded: AtomicU64::new(0),
            read_repairs: AtomicU64::new(0),
            replaying: parking_lot::Mutex::new(Default::default()),
            stop,
            transfer: parking_lot::Mutex::new(transfer),
            stragglers: parking_lot::Mutex::new(Default::default()),
            promises: parking_lot::Mutex::new(crate::proposal::Promises::default()),
            recent_writes,
            anti_entropy,
            watch,
            key_locks: (0..KEY_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        });
        let cluster = Cluster { inner };
        tokio::spawn(cluster.clone().health_loop());
        tokio::spawn(cluster.clone().anti_entropy_loop());
        cluster.resume_membership_work();
        Ok(cluster)
    }

    /// The current topology (view and rings); cheap, and stable for the caller's use.
    pub fn topology(&self) -> Arc<Topology> {
        self.inner.topology.read().clone()
    }

    /// Adopts `view` when it is a checked step from the current one ([`admission::judge`]):
    /// stores it, rebuilds the rings and the peer set, and starts this node's share of a change
    /// in progress. Returns whether it did; a view it may not take is an error, logged with
    /// `sender` (who offered it).
    pub fn adopt_view(&self, view: View, sender: &str) -> Result<bool> {
        let refuse = |e: Error| {
            warn!(sender, epoch = view.epoch, error = %e, "refused a membership view");
            metrics::counter!("kv_views_refused_total").increment(1);
            Err(e)
        };
        if let Err(reason) = view.check_shape() {
            return refuse(Error::MalformedView { reason });
        }
        {
            let mut current = self.inner.topology.write();
            let epochs = (view.epoch, current.view.epoch);
            match admission::judge(&current.view, &view, &self.inner.me) {
                Verdict::Adopt => self.install(&mut current, view)?,
                Verdict::Known => return Ok(false),
                Verdict::NeedsMajority => {
                    return refuse(Error::ViewNeedsMajority {
                        offered: epochs.0,
                        current: epochs.1,
                    })
                }
                Verdict::Refused(reason) => {
                    return refuse(Error::ViewRefused {
                        offered: epochs.0,
                        current: epochs.1,
                        reason,
                    })
                }
            }
        }
        self.resume_membership_work();
        Ok(true)
    }

    /// Adopts a view it cannot check step by step (it missed changes), once a majority of the members of this
    /// node's own view hold that very view (`Cluster::catch_up` asked them). It must still have a
    /// valid shape, rank higher, and keep a member that holds data now.
    pub(crate) fn adopt_confirmed(&self, view: View) -> Result<bool> {
        if let Err(reason) = view.check_shape() {
            return Err(Error::MalformedView { reason });
        }
        {
            let mut current = self.inner.topology.write();
            let holders = current.view.before();
            if view.rank() <= current.view.rank() || !view.all().iter().any(|u| holders.contains(u))
            {
                return Ok(false);
            }
            self.install(&mut current, view)?;
        }
        self.resume_membership_work();
        Ok(true)
    }

    /// Stores `view` and makes it current (under the topology lock the caller holds).
    fn install(&self, current: &mut Arc<Topology>, view: View) -> Result<()> {
        let inner = &self.inner;
        membership::store(&inner.config.members_file, &view)?;
        info!(
            epoch = view.epoch,
            members = view.members.len(),
            in_transition = view.in_transition(),
            "adopted membership view"
        );
        let topology = Topology::new(view, inner.config.replication_factor, inner.config.vnodes);
        inner.detector.set_peers(
            topology
                .members()
                .filter(|u| **u != inner.me)
                .map(|u| u.to_string()),
        );
        *current = Arc::new(topology);
        Ok(())
    }

    /// This node's change feed (what watchers read).
    pub fn watch_hub(&self) -> Arc<crate::watch::WatchHub> {
        self.inner.watch.clone()
    }

    /// True when this node is one of `key`'s replicas (its change feed has the key's changes).
    pub fn is_replica(&self, key: &str) -> bool {
        self.replicas(key).iter().any(|r| **r == *self.inner.me)
    }

    /// Every member but this node: the feeds a prefix watch merges with its own.
    pub fn other_members(&self) -> Vec<Arc<str>> {
        self.topology()
            .members()
            .filter(|m| ***m != *self.inner.me)
            .cloned()
            .collect()
    }

    /// Opens `peer`'s change feed of `prefix` (of that one key with `exact_key`) after `after`
    /// (see [`PeerClient::watch`]).
    pub async fn open_peer_watch(
        &self,
        peer: &str,
        prefix: &str,
        exact_key: bool,
        after: Option<kv_core::Version>,
        request_id: &str,
    ) -> std::result::Result<PeerWatch, crate::peer::CallError> {
        self.inner
            .peers
            .watch(peer, prefix, exact_key, after, request_id)
            .await
    }

    /// This node's URL (its name in the ring).
    pub fn url(&self) -> Arc<str> {
        self.inner.me.clone()
    }

    /// The local storage engine.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// N as applied: the configured replication factor capped at the number of nodes.
    pub fn replication_factor(&self) -> usize {
        self.topology().replication_factor()
    }

    /// The defaults for W and R.
    pub fn default_consistency(&self) -> (Consistency, Consistency) {
        let c = &self.inner.config;
        (c.write_consistency, c.read_consistency)
    }

    /// The key's replicas (its current owners), in preference-list order.
    pub fn replicas(&self, key: &str) -> Vec<Arc<str>> {
        self.topology().owners(key)
    }

    /// Decides whether this node coordinates `key` or forwards it (never a forwarded request).
    /// Any replica coordinates plain requests; a `conditional` one goes to the key's first live
    /// replica, the one node that serialises conditional writes of the key.
    pub fn route(&self, key: &str, already_forwarded: bool, conditional: bool) -> Route {
        if already_forwarded {
            return Route::Local;
        }
        let topology = self.topology();
        let replicas = self.live_first(topology.owners(key));
        let local = if conditional {
            replicas.first() == Some(&self.inner.me)
        } else {
            replicas.contains(&self.inner.me) || topology.pending(key).contains(&self.inner.me)
        };
        if local {
            Route::Local
        } else {
            Route::Forward(replicas)
        }
    }

    pub(crate) fn live_first(&self, mut nodes: Vec<Arc<str>>) -> Vec<Arc<str>> {
        // Stable: keeps preference order within the up and the down group.
        nodes.sort_by_key(|n| !self.inner.detector.is_up(n));
        nodes
    }

    /// Passes a client request to the first replica that takes it; the answer comes back unchanged.
    /// A refused connection moves on to the next replica; other failures do so only for reads,
    /// since a write may already have been applied.
    #[instrument(level = "debug", skip_all, fields(method = %request.method))]
    pub async fn forward(
        &self,
        targets: &[Arc<str>],
        request: &ForwardRequest,
        request_id: &str,
        idempotent: bool,
    ) -> Result<ForwardResponse> {
        let inner = &self.inner;
        for target in targets {
            let timeout = inner.config.forward_timeout;
            match inner
                .peers
                .forward(target, request, request_id, timeout)
                .await
            {
                Ok(response) => {
                    inner.forwarded.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("kv_forwarded_requests_total").increment(1);
                    debug!(to = %target, status = %response.status, "forwarded");
                    return Ok(response);
                }
                Err(e) => {
                    warn!(to = %target, error = %e, "forward failed");
                    inner.detector.record_failure(target, e.is_connect());
                    if !(e.is_connect() || idempotent) {
                        // The write may have reached the replica: that is no 503.
                        return Err(Error::OutcomeUnknown {
                            acked: 0,
                            detail: format!(
                                "the replica it was forwarded to ({target}) did not answer"
                            ),
                        });
                    }
                }
            }
        }
        Err(Error::NoReplicaReachable {
            tried: targets.len(),
        })
    }

    /// This node's own entry for `key`, as a record (for `/internal/entry`).
    pub fn local_record(&self, key: &str) -> Option<Record> {
        self.inner.store.get(key).map(|entry| Record {
            key: key.to_owned(),
            version: entry.version,
            value: entry.value,
            expires_at_ms: entry.expires_at_ms,
        })
    }

    /// The version of this node's own entry for `key` (tombstones included), without its value.
    pub fn local_version(&self, key: &str) -> Option<Version> {
        self.inner.store.get(key).map(|entry| entry.version)
    }

    /// Applies records sent by a coordinator (replication, read repair, hints), durably; answers
    /// how many changed this node and, per record, the version this node now holds for its key.
    /// A record older than what is here is not applied, and the answer says so: the coordinator
    /// counts an ack only for a replica that holds its very record. `write_ids` (empty, or one
    /// per record) are remembered for the records this node now holds.
    pub async fn apply_replicated(
        &self,
        records: Vec<Record>,
        write_ids: Vec<Option<WriteId>>,
    ) -> Result<ReplicateAnswer> {
        let versions: Vec<(String, Version)> =
            records.iter().map(|r| (r.key.clone(), r.version)).collect();
        let applied = self.inner.store.apply(records).await?;
        self.note_stored(
            versions
                .iter()
                .zip(&applied)
                .filter(|(_, applied)| **applied)
                .map(|((key, _), _)| key.as_str()),
        );
        let ids = write_ids.into_iter().chain(std::iter::repeat(None));
        let held = versions
            .into_iter()
            .zip(&applied)
            .zip(ids)
            .map(|(((key, version), applied), id)| {
                let held = self.held_after(&key, version, *applied);
                if let (Some(id), true) = (id, held == version) {
                    self.inner.recent_writes.remember(&key, id, held);
                }
                held.to_string()
            })
            .collect();
        Ok(ReplicateAnswer {
            applied: applied.into_iter().filter(|a| *a).count(),
            held: Some(held),
        })
    }

    /// The version this node holds for `key` after applying a record of `version`.
    pub(crate) fn held_after(&self, key: &str, version: Version, applied: bool) -> Version {
        if applied {
            return version;
        }
        match self.inner.store.get(key) {
            Some(entry) if entry.version > version => entry.version,
            _ => version,
        }
    }

    /// What this node believes about the cluster.
    pub fn status(&self) -> ClusterStatus {
        let inner = &self.inner;
        let peers = inner
            .detector
            .snapshot()
            .into_iter()
            .map(|health| PeerView {
                hints_pending: inner.hints.pending_for(&health.url),
                health,
            })
            .collect();
        let topology = self.topology();
        ClusterStatus {
            replication_factor: topology.replication_factor(),
            vnodes: inner.config.vnodes,
            nodes: topology.view.all().into_iter().map(str::to_owned).collect(),
            epoch: topology.view.epoch,
            peers,
            hints_pending: inner.hints.pending(),
            hints_pending_bytes: inner.hints.pending_bytes(),
            hints_delivered: inner.hints.delivered(),
            forwarded_requests: inner.forwarded.load(Ordering::Relaxed),
            read_repairs: inner.read_repairs.load(Ordering::Relaxed),
        }
    }

    /// Stops the background loop, then gives peers that are up one bounded chance to take their
    /// hints; whatever is not delivered stays on disk for the next start.
    pub async fn shutdown(&self, budget: Duration) {
        let _ = self.inner.stop.send(true);
        let peers = self.inner.detector.peers();
        let deliveries = peers
            .iter()
            .filter(|p| self.inner.detector.is_up(p) && self.inner.hints.pending_for(p) > 0)
            .map(|p| self.replay_hints(p));
        if tokio::time::timeout(budget, futures::future::join_all(deliveries))
            .await
            .is_err()
        {
            info!(
                pending = self.inner.hints.pending(),
                "hints kept for the next start"
            );
        }
    }
}
