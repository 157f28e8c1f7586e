//! Background work of a node: the health-check loop that feeds the failure detector, and the
//! replay of hints to peers that are up.

use crate::cluster::Cluster;
use crate::error::Error;
use crate::hints::HintReader;
use crate::membership::View;
use crate::peer::SEND_BATCH_BYTES;
use std::sync::Arc;
use tracing::{info, warn};

/// Most hints sent to a peer in one `/internal/replicate` call (also capped at
/// [`SEND_BATCH_BYTES`]).
const HINT_BATCH: usize = 512;

impl Cluster {
    /// Health-checks every peer each interval and replays hints to peers that are up.
    pub(crate) async fn health_loop(self) {
        let mut stop = self.inner.stop.subscribe();
        // Present in /metrics from the start, so a scrape sees 0 rather than nothing.
        metrics::counter!("kv_clock_offset_refusals_total").increment(0);
        let mut tick = tokio::time::interval(self.inner.config.health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let peers = self.inner.detector.peers();
            let checks = peers.iter().map(|peer| self.check(peer));
            futures::future::join_all(checks).await;
        }
    }

    async fn check(&self, peer: &str) {
        let inner = &self.inner;
        let result = inner.peers.health(peer, inner.config.health_timeout).await;
        let up = match result {
            Ok(probe) => {
                inner.detector.record_clock(peer, probe.clock);
                if inner.detector.record_success(peer, probe.latency) {
                    info!(peer, "peer is up");
                    self.anti_entropy_soon();
                }
                if probe.rank.is_some_and(|r| r > self.topology().view.rank()) {
                    self.pull_view(peer).await;
                }
                true
            }
            Err(e) => {
                let was_up = inner.detector.is_up(peer);
                // A refused health check is not enough on its own: at start-up peers come up one
                // by one, and marking them down then would split the nodes' views for a moment.
                inner.detector.record_failure(peer, false);
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

    /// Fetches a peer's newer membership view and adopts it if it is a checked step from this
    /// node's view; one it cannot check (it missed changes) goes to [`Self::catch_up`].
    async fn pull_view(&self, peer: &str) {
        match self.inner.peers.fetch_view(peer).await {
            Ok(view) => match self.adopt_view(view.clone(), peer) {
                Ok(_) => {}
                Err(Error::ViewNeedsMajority { .. }) => self.catch_up(view).await,
                Err(e) => warn!(peer, error = %e, "cannot adopt the peer's membership view"),
            },
            Err(e) => warn!(peer, error = %e, "cannot fetch the peer's membership view"),
        }
    }

    /// Catching up after missing several changes: adopts `view` only when a majority of the other
    /// members of this node's own view hold exactly that view, so one peer (or one forged
    /// message) cannot move this node; otherwise the next health round tries again.
    async fn catch_up(&self, view: View) {
        let current = self.topology().view.clone();
        let me = &*self.inner.me;
        let others: Vec<&str> = current.all().into_iter().filter(|u| *u != me).collect();
        let asks = others.iter().map(|peer| self.inner.peers.fetch_view(peer));
        let agree = futures::future::join_all(asks)
            .await
            .into_iter()
            .filter(|answer| answer.as_ref().is_ok_and(|v| *v == view))
            .count();
        if agree * 2 <= others.len() {
            return warn!(
                epoch = view.epoch,
                agree,
                asked = others.len(),
                "membership view far ahead of this node's is not held by a majority of its members; not adopted"
            );
        }
        match self.adopt_confirmed(view) {
            Ok(true) => info!(
                agree,
                "caught up with the membership view held by a majority"
            ),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "cannot adopt the majority's membership view"),
        }
    }

    /// Delivers every sealed hint file of `peer`, oldest first, streaming each in batches of at
    /// most [`HINT_BATCH`] hints and [`SEND_BATCH_BYTES`]; stops at the first failure and keeps
    /// what was not delivered for the next round.
    pub(crate) async fn replay_hints(&self, peer: &str) {
        let inner = &self.inner;
        for path in inner.hints.seal(peer).await {
            let (count, expired) = match self.replay_file(peer, &path).await {
                Ok(counts) => counts,
                Err(e) => return warn!(peer, error = %e, "hint replay interrupted"),
            };
            match inner.hints.remove_delivered(peer, &path, count, expired) {
                Ok(()) => {
                    metrics::counter!("kv_hints_delivered_total").increment(count);
                    info!(
                        peer,
                        hints = count,
                        expired,
                        "hints delivered (expired ones skipped: anti-entropy heals them)"
                    );
                }
                Err(e) => return warn!(error = %e, "cannot remove delivered hints"),
            }
        }
    }

    /// Sends one hint file to `peer`, batch after batch, skipping hints older than the hint
    /// window; the hints sent and skipped, or why reading or sending failed (the file then
    /// stays for the next round).
    async fn replay_file(&self, peer: &str, path: &std::path::Path) -> Result<(u64, u64), String> {
        let inner = &self.inner;
        let open = path.to_owned();
        let mut reader = tokio::task::spawn_blocking(move || HintReader::open(&open))
            .await
            .map_err(|e| format!("hint reader failed: {e}"))?
            .map_err(|e| e.to_string())?;
        let limits = inner.hints.limits();
        let (mut count, mut expired) = (0, 0);
        loop {
            let read = tokio::task::spawn_blocking(move || {
                let batch = reader.next_batch(HINT_BATCH, SEND_BATCH_BYTES);
                (reader, batch)
            })
            .await;
            let (back, batch) = read.map_err(|e| format!("hint reader failed: {e}"))?;
            reader = back;
            let mut batch = batch.map_err(|e| e.to_string())?;
            if batch.is_empty() {
                return Ok((count, expired));
            }
            let now = crate::quorum::now_ms();
            let read = batch.len();
            batch.retain(|r| limits.fresh(r.version.physical_ms(), now));
            expired += (read - batch.len()) as u64;
            if batch.is_empty() {
                continue;
            }
            if let Err(e) = inner.peers.replicate(peer, &batch, "hint-replay").await {
                inner.detector.record_failure(peer, e.is_connect());
                return Err(e.to_string());
            }
            count += batch.len() as u64;
        }
    }
}
