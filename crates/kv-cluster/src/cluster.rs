//! The cluster facade a node serves requests through: where a key lives, forwarding to its
//! replicas, and the quorum write and read paths with hinted handoff and read repair.

use crate::consistency::Consistency;
use crate::detector::{FailureDetector, PeerStatus};
use crate::error::{Error, Result};
use crate::hints::HintStore;
use crate::peer::{ForwardRequest, ForwardResponse, PeerClient};
use kv_core::{Record, Store};
use kv_ring::Ring;
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
    /// Deadline of one replication, read or forward call.
    pub peer_timeout: Duration,
    /// Default W.
    pub write_consistency: Consistency,
    /// Default R.
    pub read_consistency: Consistency,
    /// Folder of the hint files.
    pub hints_dir: PathBuf,
    /// Source address of connections to peers (`None`: chosen by the OS).
    pub local_address: Option<std::net::IpAddr>,
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
    /// Every node on the ring.
    pub nodes: Vec<String>,
    /// Each peer's health and the hints waiting for it.
    pub peers: Vec<PeerView>,
    /// Hints waiting, over all peers.
    pub hints_pending: u64,
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

/// A node's view of the cluster and the code paths that span it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub(crate) inner: Arc<Inner>,
}

/// The shared state behind [`Cluster`]; the quorum, listing and background modules reach in.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) me: Arc<str>,
    pub(crate) ring: Ring,
    pub(crate) urls: Vec<Arc<str>>,
    pub(crate) n: usize,
    pub(crate) config: ClusterConfig,
    pub(crate) store: Store,
    pub(crate) peers: PeerClient,
    pub(crate) detector: FailureDetector,
    pub(crate) hints: HintStore,
    pub(crate) forwarded: AtomicU64,
    pub(crate) read_repairs: AtomicU64,
    pub(crate) replaying: parking_lot::Mutex<std::collections::HashSet<Arc<str>>>,
    pub(crate) stop: watch::Sender<bool>,
    key_locks: Vec<tokio::sync::Mutex<()>>,
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
        let ring = Ring::new(&config.nodes, config.vnodes);
        let urls: Vec<Arc<str>> = ring.nodes().iter().map(|u| Arc::from(u.as_str())).collect();
        let n = config.replication_factor.clamp(1, ring.len().max(1));
        let others = urls
            .iter()
            .filter(|u| ***u != *config.me)
            .map(|u| u.to_string());
        let detector = FailureDetector::new(others);
        let peers = PeerClient::new(
            config.secret.as_deref(),
            config.connect_timeout,
            config.peer_timeout,
            config.local_address,
        )
        .map_err(|reason| Error::PeerProtocol {
            peer: config.me.clone(),
            status: 0,
            reason,
        })?;
        let hints = HintStore::open(config.hints_dir.clone())?;
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            me: Arc::from(config.me.as_str()),
            ring,
            urls,
            n,
            config,
            store,
            peers,
            detector,
            hints,
            forwarded: AtomicU64::new(0),
            read_repairs: AtomicU64::new(0),
            replaying: parking_lot::Mutex::new(Default::default()),
            stop,
            key_locks: (0..KEY_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        });
        let cluster = Cluster { inner };
        tokio::spawn(cluster.clone().health_loop());
        Ok(cluster)
    }

    /// The local storage engine.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// N as applied: the configured replication factor capped at the number of nodes.
    pub fn replication_factor(&self) -> usize {
        self.inner.n
    }

    /// The defaults for W and R.
    pub fn default_consistency(&self) -> (Consistency, Consistency) {
        let c = &self.inner.config;
        (c.write_consistency, c.read_consistency)
    }

    /// The key's replicas, in preference-list order.
    pub fn replicas(&self, key: &str) -> Vec<Arc<str>> {
        self.inner
            .ring
            .preference_list(key, self.inner.n)
            .into_iter()
            .filter_map(|i| self.inner.urls.get(i).cloned())
            .collect()
    }

    /// Decides whether this node coordinates `key` or forwards it (never a forwarded request).
    /// Any replica coordinates plain requests; a `conditional` one goes to the key's first live
    /// replica, the one node that serialises conditional writes of the key.
    pub fn route(&self, key: &str, already_forwarded: bool, conditional: bool) -> Route {
        if already_forwarded {
            return Route::Local;
        }
        let replicas = self.live_first(self.replicas(key));
        let local = if conditional {
            replicas.first() == Some(&self.inner.me)
        } else {
            replicas.contains(&self.inner.me)
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
    #[instrument(skip_all, fields(method = %request.method))]
    pub async fn forward(
        &self,
        targets: &[Arc<str>],
        request: &ForwardRequest,
        request_id: &str,
        idempotent: bool,
    ) -> Result<ForwardResponse> {
        let inner = &self.inner;
        for target in targets {
            match inner.peers.forward(target, request, request_id).await {
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
                        return Err(Error::NoReplicaReachable { tried: 1 });
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

    /// Applies records sent by a coordinator (replication, read repair, hints), durably.
    pub async fn apply_replicated(&self, records: Vec<Record>) -> Result<usize> {
        let applied = self.inner.store.apply(records).await?;
        Ok(applied.into_iter().filter(|a| *a).count())
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
        ClusterStatus {
            replication_factor: inner.n,
            vnodes: inner.ring.vnodes(),
            nodes: inner.ring.nodes().to_vec(),
            peers,
            hints_pending: inner.hints.pending(),
            hints_delivered: inner.hints.delivered(),
            forwarded_requests: inner.forwarded.load(Ordering::Relaxed),
            read_repairs: inner.read_repairs.load(Ordering::Relaxed),
        }
    }

    /// Stops the background loop, then gives peers that are up one bounded chance to take their
    /// hints; whatever is not delivered stays on disk for the next start.
    pub async fn shutdown(&self, budget: Duration) {
        let _ = self.inner.stop.send(true);
        let deliveries = self
            .inner
            .detector
            .peers()
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
