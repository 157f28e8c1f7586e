//! The cluster facade a node serves requests through: where a key lives, forwarding to its
//! replicas, and the quorum write and read paths with hinted handoff and read repair.

use crate::consistency::Consistency;
use crate::detector::{FailureDetector, PeerStatus};
use crate::error::{Error, Result};
use crate::hints::HintStore;
use crate::peer::{ForwardRequest, ForwardResponse, PeerClient};
use bytes::Bytes;
use kv_core::{Entry, Record, Store, Version};
use kv_ring::Ring;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
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
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    me: Arc<str>,
    ring: Ring,
    urls: Vec<Arc<str>>,
    n: usize,
    config: ClusterConfig,
    store: Store,
    peers: PeerClient,
    detector: FailureDetector,
    hints: HintStore,
    forwarded: AtomicU64,
    read_repairs: AtomicU64,
    replaying: parking_lot::Mutex<std::collections::HashSet<Arc<str>>>,
    stop: watch::Sender<bool>,
}

/// How long a read waits for its first R replicas before asking the others too (speculative read).
const SPECULATIVE_READ_DELAY: Duration = Duration::from_millis(50);
/// Hints sent to a peer in one `/internal/replicate` call.
const HINT_BATCH: usize = 512;

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
    pub fn route(&self, key: &str, already_forwarded: bool) -> Route {
        let replicas = self.replicas(key);
        if already_forwarded || replicas.iter().any(|r| *r == self.inner.me) {
            return Route::Local;
        }
        Route::Forward(self.live_first(replicas))
    }

    fn live_first(&self, mut nodes: Vec<Arc<str>>) -> Vec<Arc<str>> {
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

    /// Writes `value` (`None` deletes) under a new version and returns once W replicas hold it
    /// durably; the other replicas get it in the background, or a hint when they are down.
    #[instrument(skip(self, value), fields(%w))]
    pub async fn write(
        &self,
        key: &str,
        value: Option<Bytes>,
        w: Consistency,
        request_id: &str,
    ) -> Result<Version> {
        if let Some(reason) = self.inner.store.status().failed {
            return Err(Error::Store(kv_core::Error::WalFailed { reason }));
        }
        let version = self.inner.store.clock().tick();
        let record = Record {
            key: key.to_owned(),
            version,
            value,
        };
        self.replicate_quorum(record, w, request_id).await?;
        Ok(version)
    }

    /// Sends `record` to every replica of its key in parallel and waits for `w` durable acks.
    /// The fan-out runs in spawned tasks, so it completes even when the client hangs up.
    /// Replicas believed down get a hint without a call, unless too few are up to reach `w`:
    /// then they are tried too (a refused connection costs little, and they may be back).
    async fn replicate_quorum(
        &self,
        record: Record,
        w: Consistency,
        request_id: &str,
    ) -> Result<()> {
        let replicas = self.replicas(&record.key);
        let needed = w.required(replicas.len());
        let is_up = |r: &Arc<str>| *r == self.inner.me || self.inner.detector.is_up(r);
        let try_down_ones = replicas.iter().filter(|r| is_up(r)).count() < needed;
        let (tx, mut rx) = mpsc::channel(replicas.len().max(1));
        let record = Arc::new(record);
        let rid: Arc<str> = Arc::from(request_id);
        let mut outstanding = 0;
        for replica in &replicas {
            if !try_down_ones && !is_up(replica) {
                self.inner.hints.add(replica, (*record).clone());
                continue;
            }
            let (cluster, replica, record, rid, tx) = (
                self.clone(),
                replica.clone(),
                record.clone(),
                rid.clone(),
                tx.clone(),
            );
            tokio::spawn(async move {
                let ok = cluster.send_to_replica(&replica, &record, &rid).await;
                let _ = tx.send(ok).await;
            });
            outstanding += 1;
        }
        drop(tx);
        let mut acked = 0;
        let deadline = tokio::time::Instant::now() + self.inner.config.peer_timeout;
        while acked < needed && outstanding > 0 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ok)) => {
                    outstanding -= 1;
                    acked += usize::from(ok);
                }
                Ok(None) | Err(_) => break,
            }
        }
        if acked >= needed {
            Ok(())
        } else {
            Err(Error::Unavailable {
                needed,
                answered: acked,
            })
        }
    }

    /// Applies `record` on one replica (locally or over the network); a failed remote replica gets
    /// a hint. Returns whether the replica acknowledged.
    async fn send_to_replica(&self, replica: &Arc<str>, record: &Record, rid: &str) -> bool {
        let inner = &self.inner;
        if *replica == inner.me {
            return match inner.store.apply(vec![record.clone()]).await {
                Ok(_) => true,
                Err(e) => {
                    warn!(error = %e, "local write failed");
                    false
                }
            };
        }
        match inner
            .peers
            .replicate(replica, std::slice::from_ref(record), rid)
            .await
        {
            Ok(()) => {
                metrics::counter!("kv_replication_acks_total", "peer" => replica.to_string())
                    .increment(1);
                true
            }
            Err(e) => {
                metrics::counter!("kv_replication_failures_total", "peer" => replica.to_string())
                    .increment(1);
                debug!(peer = %replica, error = %e, "replication failed; keeping a hint");
                inner.detector.record_failure(replica, e.is_connect());
                inner.hints.add(replica, record.clone());
                false
            }
        }
    }

    /// Reads `key` from R replicas and returns the newest entry (tombstones included); stale
    /// replicas among those that answered are repaired in the background.
    #[instrument(skip(self), fields(%r))]
    pub async fn read(&self, key: &str, r: Consistency, request_id: &str) -> Result<Option<Entry>> {
        let replicas = self.read_order(self.replicas(key));
        let needed = r.required(replicas.len());
        if needed == 1 && replicas.first() == Some(&self.inner.me) {
            return Ok(self.inner.store.get(key));
        }
        let answers = self.gather(key, replicas, needed, request_id).await?;
        let newest = answers
            .iter()
            .filter_map(|(_, record)| record.as_ref())
            .max_by_key(|record| record.version)
            .cloned();
        if let Some(newest) = &newest {
            let stale: Vec<Arc<str>> = answers
                .into_iter()
                .filter(|(_, rec)| rec.as_ref().is_none_or(|r| r.version < newest.version))
                .map(|(node, _)| node)
                .collect();
            if !stale.is_empty() {
                self.repair(stale, newest.clone(), request_id);
            }
        }
        Ok(newest.map(|record| Entry {
            version: record.version,
            value: record.value,
        }))
    }

    /// This node first (no network), then live replicas in preference order, then the rest.
    fn read_order(&self, replicas: Vec<Arc<str>>) -> Vec<Arc<str>> {
        let mut ordered = self.live_first(replicas);
        if let Some(pos) = ordered.iter().position(|r| *r == self.inner.me) {
            let me = ordered.remove(pos);
            ordered.insert(0, me);
        }
        ordered
    }

    /// Asks replicas for their entry until `needed` answered: `needed` at first, one more for each
    /// failure, and all the rest if the first ones are slow. Fails once `needed` is out of reach.
    async fn gather(
        &self,
        key: &str,
        replicas: Vec<Arc<str>>,
        needed: usize,
        request_id: &str,
    ) -> Result<Vec<(Arc<str>, Option<Record>)>> {
        let total = replicas.len();
        let (tx, mut rx) = mpsc::channel(total.max(1));
        let mut pending = replicas.into_iter();
        let mut launched = 0;
        let launch = |node: Arc<str>| {
            let (cluster, key, rid, tx) = (
                self.clone(),
                key.to_owned(),
                request_id.to_owned(),
                tx.clone(),
            );
            tokio::spawn(async move {
                let answer = cluster.fetch_from(&node, &key, &rid).await;
                let _ = tx.send((node, answer)).await;
            });
        };
        for node in pending.by_ref().take(needed) {
            launch(node);
            launched += 1;
        }
        let mut answers = Vec::with_capacity(total);
        let mut failed = 0;
        let deadline = tokio::time::Instant::now() + self.inner.config.peer_timeout;
        let speculate_at = tokio::time::Instant::now() + SPECULATIVE_READ_DELAY;
        let mut speculated = false;
        while answers.len() < needed && total - failed >= needed {
            let wake = if speculated {
                deadline
            } else {
                speculate_at.min(deadline)
            };
            match tokio::time::timeout_at(wake, rx.recv()).await {
                Ok(Some((node, Ok(record)))) => answers.push((node, record)),
                Ok(Some((_, Err(())))) => {
                    failed += 1;
                    if let Some(node) = pending.next() {
                        launch(node);
                        launched += 1;
                    }
                }
                Ok(None) => break,
                Err(_) if !speculated && tokio::time::Instant::now() < deadline => {
                    speculated = true;
                    for node in pending.by_ref() {
                        launch(node);
                        launched += 1;
                    }
                }
                Err(_) => break,
            }
        }
        debug!(launched, answered = answers.len(), failed, "read gathered");
        if answers.len() >= needed {
            Ok(answers)
        } else {
            Err(Error::Unavailable {
                needed,
                answered: answers.len(),
            })
        }
    }

    async fn fetch_from(
        &self,
        node: &Arc<str>,
        key: &str,
        rid: &str,
    ) -> Result<Option<Record>, ()> {
        if *node == self.inner.me {
            return Ok(self.local_record(key));
        }
        self.inner.peers.fetch(node, key, rid).await.map_err(|e| {
            debug!(peer = %node, error = %e, "replica read failed");
            self.inner.detector.record_failure(node, e.is_connect());
        })
    }

    /// Sends the newest record to replicas that answered with an older one (or none).
    fn repair(&self, stale: Vec<Arc<str>>, newest: Record, request_id: &str) {
        let cluster = self.clone();
        let rid = request_id.to_owned();
        tokio::spawn(async move {
            for node in stale {
                cluster.inner.read_repairs.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("kv_read_repairs_total").increment(1);
                debug!(peer = %node, key = %newest.key, "read repair");
                cluster.send_to_replica(&node, &newest, &rid).await;
            }
        });
    }

    /// Deletes `key` if it exists: a read at `r` decides 404, then a tombstone is written at `w`.
    /// Returns the tombstone's version, or `None` when there was nothing to delete.
    pub async fn delete(
        &self,
        key: &str,
        w: Consistency,
        r: Consistency,
        request_id: &str,
    ) -> Result<Option<Version>> {
        match self.read(key, r, request_id).await? {
            Some(entry) if !entry.is_tombstone() => {
                self.write(key, None, w, request_id).await.map(Some)
            }
            _ => Ok(None),
        }
    }

    /// This node's own entry for `key`, as a record (for `/internal/entry`).
    pub fn local_record(&self, key: &str) -> Option<Record> {
        self.inner.store.get(key).map(|entry| Record {
            key: key.to_owned(),
            version: entry.version,
            value: entry.value,
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

    /// Health-checks every peer each interval and replays hints to peers that are up.
    async fn health_loop(self) {
        let mut stop = self.inner.stop.subscribe();
        let mut tick = tokio::time::interval(self.inner.config.health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let checks = self
                .inner
                .detector
                .peers()
                .iter()
                .map(|peer| self.check(peer));
            futures::future::join_all(checks).await;
        }
    }

    async fn check(&self, peer: &str) {
        let inner = &self.inner;
        let result = inner.peers.health(peer, inner.config.health_timeout).await;
        let up = match result {
            Ok(latency) => {
                if inner.detector.record_success(peer, latency) {
                    info!(peer, "peer is up");
                }
                true
            }
            Err(e) => {
                let was_up = inner.detector.is_up(peer);
                inner.detector.record_failure(peer, e.is_connect());
                if was_up && !inner.detector.is_up(peer) {
                    warn!(peer, error = %e, "peer is down");
                }
                false
            }
        };
        metrics::gauge!("kv_peer_up", "peer" => peer.to_owned()).set(if up { 1.0 } else { 0.0 });
        metrics::gauge!("kv_hints_pending").set(inner.hints.pending() as f64);
        if up && inner.hints.pending_for(peer) > 0 {
            let peer: Arc<str> = Arc::from(peer);
            if inner.replaying.lock().insert(peer.clone()) {
                let cluster = self.clone();
                tokio::spawn(async move {
                    cluster.replay_hints(&peer).await;
                    cluster.inner.replaying.lock().remove(&peer);
                });
            }
        }
    }

    /// Delivers every sealed hint file of `peer`, oldest first; stops at the first failure and
    /// keeps what was not delivered for the next round.
    async fn replay_hints(&self, peer: &str) {
        let inner = &self.inner;
        for path in inner.hints.seal(peer).await {
            let read_path = path.clone();
            let records =
                match tokio::task::spawn_blocking(move || HintStore::read_sealed(&read_path)).await
                {
                    Ok(Ok(records)) => records,
                    Ok(Err(e)) => return warn!(error = %e, "cannot read hints"),
                    Err(e) => return warn!(error = %e, "hint reader failed"),
                };
            for chunk in records.chunks(HINT_BATCH) {
                if let Err(e) = inner.peers.replicate(peer, chunk, "hint-replay").await {
                    inner.detector.record_failure(peer, e.is_connect());
                    return warn!(peer, error = %e, "hint replay interrupted");
                }
            }
            let count = records.len() as u64;
            match inner.hints.remove_delivered(peer, &path, count) {
                Ok(()) => {
                    metrics::counter!("kv_hints_delivered_total").increment(count);
                    info!(peer, hints = count, "hints delivered");
                }
                Err(e) => return warn!(error = %e, "cannot remove delivered hints"),
            }
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
