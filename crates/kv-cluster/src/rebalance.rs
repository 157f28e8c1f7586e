//! Carrying out a membership change: estimating a plan, getting every live member's promise for
//! it (`proposal.rs`), applying it, streaming this node's share of the keys to their new replicas
//! (rate-limited, restartable), committing once every node is done, or aborting; `cleanup.rs`
//! drops the keys this node no longer owns afterwards. See `membership.rs` for the protocol.

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::membership::{Topology, View};
use crate::proposal::{PromiseAnswer, Proposal};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Records sent to a new replica in one `/internal/replicate` call.
const TRANSFER_BATCH: usize = 256;
/// How often the plan's coordinator asks whether every node has finished.
const COMMIT_POLL: Duration = Duration::from_millis(500);
/// Pause before sending a batch again to a replica that did not take it.
const RETRY_PAUSE: Duration = Duration::from_millis(300);

/// This node's part in the change in progress, as `GET /internal/transfer` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferState {
    /// The epoch of the plan this state belongs to.
    pub epoch: u64,
    /// The digest of that plan ([`View::digest`]): a rival plan of the same epoch is another
    /// transfer.
    #[serde(default)]
    pub digest: u32,
    /// Keys this node has to stream.
    pub total: u64,
    /// Keys streamed so far.
    pub sent: u64,
    /// True once every key of this node's share has reached its new replicas.
    pub done: bool,
    /// Hints this node still holds for nodes that are joining (they must be 0 to commit).
    #[serde(default)]
    pub hints_for_new: u64,
    #[serde(skip)]
    pub(crate) running: bool,
    #[serde(skip)]
    committing: bool,
    /// True once the cleanup after this (committed) view dropped every key this node lost.
    #[serde(skip)]
    pub(crate) cleaned: bool,
}

impl TransferState {
    fn path(members_file: &Path) -> PathBuf {
        members_file.with_file_name("transfer.json")
    }

    /// The finished transfer recorded next to the view, if any (so a restart does not redo it).
    pub fn load(members_file: &Path) -> TransferState {
        std::fs::read(Self::path(members_file))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    pub(crate) fn save(&self, members_file: &Path) {
        let path = Self::path(members_file);
        let written = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|bytes| kv_core::files::write_private(&path, &bytes));
        if let Err(e) = written {
            warn!(path = %path.display(), error = %e, "cannot record the finished transfer; a restart will redo it");
        }
    }

    /// Forgets the recorded finished state, so the next start runs the cleanup again.
    pub(crate) fn unsave(members_file: &Path) {
        let path = Self::path(members_file);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot forget the finished cleanup; keys stored after it may survive a restart")
            }
        }
    }
}

/// A node's estimate of what a plan moves: for the keys it is the first owner of, how many keys
/// and bytes each node gains and loses. Summed over the nodes, it is the plan's whole movement.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Estimate {
    /// The node that made the estimate.
    pub node: String,
    /// Keys this node holds now.
    pub keys: u64,
    /// Per node URL: `[keys, bytes]` it gains.
    pub gains: BTreeMap<String, [u64; 2]>,
    /// Per node URL: `[keys, bytes]` it loses.
    pub losses: BTreeMap<String, [u64; 2]>,
}

/// What an operator asks of `POST /admin/members`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeRequest {
    /// Nodes to add.
    pub add: Vec<String>,
    /// Nodes to remove.
    pub remove: Vec<String>,
    /// Nodes to replace: `(old, new)`; the old node's ranges go to the new one.
    pub replace: Vec<(String, String)>,
    /// The operator confirms removing nodes that are down (their ranges are re-replicated from
    /// the surviving replicas).
    pub force: bool,
}

/// What a plan does, per node, for `POST /admin/members`.
#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    /// The view the plan leads to (joining / leaving states, epoch + 1).
    pub view: View,
    /// Removed nodes that are down: they send nothing, their ranges are streamed from the
    /// surviving replicas and the commit does not wait for them.
    pub down: Vec<String>,
    /// True when the plan was applied, false for a dry run.
    pub applied: bool,
    /// Per node URL: keys now, keys and bytes gained and lost, keys after.
    pub nodes: BTreeMap<String, NodeMoves>,
    /// Keys that get a new replica, summed over nodes.
    pub keys_moved: u64,
    /// Busiest node's keys after divided by the idlest's (1.0 is perfect).
    pub balance_after: f64,
    /// True when some node could not be asked (its keys are missing from the figures).
    pub incomplete: bool,
}

/// One node's line in a [`PlanReport`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeMoves {
    /// Keys it holds now.
    pub keys_before: u64,
    /// Keys it will receive.
    pub gain_keys: u64,
    /// Bytes it will receive.
    pub gain_bytes: u64,
    /// Keys it will no longer own.
    pub lose_keys: u64,
    /// Bytes it will no longer own.
    pub lose_bytes: u64,
    /// Keys it will hold after.
    pub keys_after: u64,
}

impl Cluster {
    /// Plans `request`; unless `dry_run`, gets every live member's promise for it and applies it.
    /// A removed node this node believes down needs `force` (it is then marked down in the
    /// plan); a replaced node that is down is marked down without it.
    pub async fn plan_change(&self, request: ChangeRequest, dry_run: bool) -> Result<PlanReport> {
        let current = self.topology();
        let ChangeRequest {
            mut add,
            mut remove,
            replace,
            force,
        } = request;
        let mut down = Vec::new();
        for url in &remove {
            if self.believed_down(url) {
                if !force {
                    return Err(Error::BadPlan {
                        reason: format!(
                            "{url} is down: removing it re-replicates its ranges from the surviving replicas; send \"force\": true to confirm"
                        ),
                    });
                }
                down.push(url.clone());
            }
        }
        for (old, new) in replace {
            if self.believed_down(&old) {
                down.push(old.clone());
            }
            remove.push(old);
            add.push(new);
        }
        let view = current
            .view
            .plan_marking(&add, &remove, &down, &self.inner.me)?;
        let (estimates, incomplete) = self.gather_estimates(&current, &view).await;
        let report = summarise(view.clone(), estimates, incomplete, !dry_run);
        if !dry_run {
            self.propose_and_adopt(&view).await?;
            info!(
                epoch = view.epoch,
                ?add,
                ?remove,
                ?down,
                "membership change applied"
            );
        }
        Ok(report)
    }

    /// Aborts the change in progress: every live member promises the plan's base view at the
    /// next epoch, then it is applied. Keys streamed so far are dropped by their receivers only
    /// once their owners confirm them (`cleanup.rs`), so nothing is lost.
    pub async fn abort_change(&self, dry_run: bool) -> Result<View> {
        let current = self.topology();
        let view = current.view.aborted()?;
        if !dry_run {
            self.propose_and_adopt(&view).await?;
            info!(epoch = view.epoch, aborted = %current.view.describe(), "membership change aborted");
        }
        Ok(view)
    }

    /// True when the failure detector believes `url` (not this node) down.
    fn believed_down(&self, url: &str) -> bool {
        url != &*self.inner.me && !self.inner.detector.is_up(url)
    }

    /// This node's answer to a proposed view (`POST /internal/propose`): see `proposal.rs`.
    pub fn consider_proposal(&self, proposal: &Proposal) -> PromiseAnswer {
        let mut promises = self.inner.promises.lock();
        let current = self.topology();
        promises.consider(&current.view, proposal, &self.inner.me, Instant::now())
    }

    /// The change this node has promised and not yet seen adopted, for operators.
    pub fn promised(&self) -> Option<String> {
        let promises = self.inner.promises.lock();
        promises.describe(&self.topology().view, Instant::now())
    }

    /// Proposes `view` to this node and every live data-holding member of its view (not the
    /// ones the plan marks down); adopts and sends it only if all of them promised it and this node's own
    /// promise still stands. Otherwise gives the promises back and answers
    /// [`Error::ChangeInProgress`] with every refusal.
    pub(crate) async fn propose_and_adopt(&self, view: &View) -> Result<()> {
        let me = self.inner.me.to_string();
        let proposal = Proposal {
            view: view.clone(),
            proposer: me.clone(),
            release: false,
        };
        let own = self.consider_proposal(&proposal);
        if !own.granted {
            return Err(Error::ChangeInProgress {
                reason: own.reason.unwrap_or_else(|| "refused by this node".into()),
            });
        }
        // The members that hold data (joining ones get the view once adopted): any two
        // proposers of one epoch are among them, or one of them is and the other asks it.
        let current = self.topology();
        let asked: Vec<String> = current
            .view
            .before()
            .into_iter()
            .filter(|u| {
                *u != me
                    && !current.view.is_down(u)
                    && !view.is_down(u)
                    && self.inner.detector.is_up(u)
            })
            .map(str::to_owned)
            .collect();
        let asks = asked.iter().map(|peer| {
            let proposal = &proposal;
            async move {
                match self.inner.peers.propose(peer, proposal).await {
                    Ok(answer) if answer.granted => None,
                    Ok(answer) => Some(format!(
                        "{peer}: {}",
                        answer.reason.unwrap_or_else(|| "refused".into())
                    )),
                    Err(e) => Some(format!("{peer} did not answer: {e}")),
                }
            }
        });
        let mut refusals: Vec<String> = futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect();
        if refusals.is_empty() {
            let adopted = {
                let promises = self.inner.promises.lock();
                if promises.holds(view, &me, Instant::now()) {
                    Some(self.adopt_view(view.clone(), &me))
                } else {
                    None
                }
            };
            match adopted {
                Some(Ok(_)) => {
                    self.push_view(view).await;
                    return Ok(());
                }
                Some(Err(e)) => refusals.push(format!("{me}: {e}")),
                None => refusals.push(format!(
                    "{me}: promised another change meanwhile ({})",
                    self.promised().unwrap_or_else(|| "expired".into())
                )),
            }
        }
        let release = Proposal {
            release: true,
            ..proposal
        };
        self.consider_proposal(&release);
        let releases = asked
            .iter()
            .map(|peer| self.inner.peers.propose(peer, &release));
        futures::future::join_all(releases).await;
        metrics::counter!("kv_membership_proposals_refused_total").increment(1);
        Err(Error::ChangeInProgress {
            reason: format!(
                "the membership change ({}) was not accepted by every live member: {}",
                view.describe(),
                refusals.join("; ")
            ),
        })
    }

    async fn gather_estimates(&self, current: &Topology, view: &View) -> (Vec<Estimate>, bool) {
        let asks = current
            .view
            .before()
            .into_iter()
            .filter(|n| !view.is_down(n))
            .map(|node| async move {
                if node == &*self.inner.me {
                    return Some(self.estimate(view));
                }
                self.inner
                    .peers
                    .estimate(node, view)
                    .await
                    .map_err(|e| warn!(error = %e, "no estimate"))
                    .ok()
            });
        let answers = futures::future::join_all(asks).await;
        let incomplete = answers.iter().any(Option::is_none);
        (answers.into_iter().flatten().collect(), incomplete)
    }

    /// This node's share of what `view` would move (see [`Estimate`]).
    pub fn estimate(&self, view: &View) -> Estimate {
        let now = self.topology();
        let next = Topology::new(
            view.clone(),
            self.inner.config.replication_factor,
            self.inner.config.vnodes,
        );
        let me = &self.inner.me;
        let mut estimate = Estimate {
            node: me.to_string(),
            ..Estimate::default()
        };
        self.inner.store.scan(|key, entry| {
            estimate.keys += 1;
            let owners = now.owners(key);
            if owners.iter().find(|o| !view.is_down(o)) != Some(me) {
                return;
            }
            let after = next.future_owners(key);
            let bytes = (key.len() + entry.value.as_ref().map_or(0, |v| v.len())) as u64;
            for node in after.iter().filter(|n| !owners.contains(n)) {
                let slot = estimate.gains.entry(node.to_string()).or_default();
                *slot = [slot[0] + 1, slot[1] + bytes];
            }
            for node in owners.iter().filter(|n| !after.contains(n)) {
                let slot = estimate.losses.entry(node.to_string()).or_default();
                *slot = [slot[0] + 1, slot[1] + bytes];
            }
        });
        estimate
    }

    /// Sends `view` to every node it names (and every current member), best effort; the health
    /// checks spread it to anyone missed.
    pub(crate) async fn push_view(&self, view: &View) {
        let mut targets: Vec<String> = view.all().into_iter().map(str::to_owned).collect();
        targets.extend(self.topology().members().map(|m| m.to_string()));
        targets.sort();
        targets.dedup();
        let pushes = targets
            .iter()
            .filter(|t| **t != *self.inner.me)
            .map(|t| async move {
                if let Err(e) = self.inner.peers.push_view(t, view, &self.inner.me).await {
                    warn!(peer = %t, error = %e, "could not send the membership view; gossip will");
                }
            });
        futures::future::join_all(pushes).await;
    }

    /// Starts what the current view asks of this node: its share of a transfer, the commit if it
    /// coordinates the change, or dropping keys it no longer owns once a change is committed.
    pub(crate) fn resume_membership_work(&self) {
        let topology = self.topology();
        let view = &topology.view;
        let rank = view.rank();
        let mut state = self.inner.transfer.lock();
        if !view.in_transition() {
            if state.epoch < view.epoch && !state.running {
                *state = TransferState {
                    epoch: view.epoch,
                    digest: view.digest(),
                    done: true,
                    running: true,
                    ..TransferState::default()
                };
                let cluster = self.clone();
                tokio::spawn(async move { cluster.drop_foreign_keys().await });
            }
            return;
        }
        if (state.epoch, state.digest) != rank || (!state.done && !state.running) {
            if state.epoch == view.epoch && state.digest != view.digest() {
                info!(
                    epoch = view.epoch,
                    "adopted a rival plan of the same epoch; restarting the transfer for it"
                );
            }
            *state = TransferState {
                epoch: view.epoch,
                digest: view.digest(),
                running: true,
                ..TransferState::default()
            };
            let cluster = self.clone();
            tokio::spawn(async move { cluster.transfer(rank).await });
        }
        if view.coordinator.as_deref() == Some(&*self.inner.me) && !state.committing {
            state.committing = true;
            let cluster = self.clone();
            tokio::spawn(async move { cluster.commit_when_done(rank).await });
        }
    }

    /// Streams this node's share of the plan of `rank` (see [`Self::stream_share`]), records
    /// the outcome, and picks up whatever the view asks next if it changed meanwhile (an abort,
    /// a rival plan).
    async fn transfer(self, rank: (u64, u32)) {
        let finished = self.stream_share(rank).await;
        {
            let mut state = self.inner.transfer.lock();
            if (state.epoch, state.digest) == rank {
                state.running = false;
                if finished {
                    state.done = true;
                    state.save(&self.inner.config.members_file);
                    info!(epoch = rank.0, keys = state.sent, "transfer done");
                }
            }
        }
        if self.topology().view.rank() != rank {
            self.resume_membership_work();
        }
    }

    /// Streams every key this node is the first live owner of (owners the plan marks down do
    /// not count) to its new replicas; false when the plan stopped being current first.
    async fn stream_share(&self, rank: (u64, u32)) -> bool {
        let epoch = rank.0;
        let topology = self.topology();
        if topology.view.rank() != rank {
            return false;
        }
        let me = self.inner.me.clone();
        let mut plan: BTreeMap<Arc<str>, Vec<String>> = BTreeMap::new();
        self.inner.store.scan(|key, _| {
            let owners = topology.owners(key);
            let first_live = owners
                .iter()
                .find(|o| !topology.view.is_down(o) && (**o == me || self.inner.detector.is_up(o)));
            if first_live != Some(&me) {
                return;
            }
            for target in topology.pending(key) {
                plan.entry(target).or_default().push(key.to_owned());
            }
        });
        let total: u64 = plan.values().map(|k| k.len() as u64).sum();
        self.inner.transfer.lock().total = total;
        info!(
            epoch,
            keys = total,
            targets = plan.len(),
            "streaming keys to new replicas"
        );
        let rate = self.inner.config.transfer_keys_per_sec.max(1);
        for (target, keys) in plan {
            for chunk in keys.chunks(TRANSFER_BATCH) {
                let records: Vec<_> = chunk.iter().filter_map(|k| self.local_record(k)).collect();
                if !self.send_until_taken(&target, &records, rank).await {
                    return false;
                }
                self.inner.transfer.lock().sent += chunk.len() as u64;
                metrics::counter!("kv_transfer_keys_total").increment(chunk.len() as u64);
                tokio::time::sleep(Duration::from_secs_f64(chunk.len() as f64 / rate as f64)).await;
            }
        }
        self.topology().view.rank() == rank
    }

    /// Sends one batch until `target` takes it; false when the change it belongs to is over.
    async fn send_until_taken(
        &self,
        target: &str,
        records: &[kv_core::Record],
        rank: (u64, u32),
    ) -> bool {
        let mut stop = self.inner.stop.subscribe();
        loop {
            if self.topology().view.rank() != rank || *stop.borrow() {
                return false;
            }
            match self
                .inner
                .peers
                .replicate(target, records, "transfer")
                .await
            {
                Ok(()) => return true,
                Err(e) => {
                    warn!(peer = target, error = %e, "transfer batch not taken; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_PAUSE) => {}
                        _ = stop.changed() => return false,
                    }
                }
            }
        }
    }

    /// This node's transfer state for `GET /internal/transfer`.
    pub fn transfer_state(&self) -> TransferState {
        let topology = self.topology();
        let mut state = self.inner.transfer.lock().clone();
        state.hints_for_new = topology
            .view
            .members
            .iter()
            .filter(|m| m.state == crate::membership::MemberState::Joining)
            .map(|m| self.inner.hints.pending_for(&m.url))
            .sum();
        state
    }

    /// Every member's transfer state (`null` for a node that did not answer), for operators.
    pub async fn transfer_progress(&self) -> BTreeMap<String, Option<TransferState>> {
        let topology = self.topology();
        let asks = topology.members().map(|node| async move {
            let state = if *node == self.inner.me {
                Some(self.transfer_state())
            } else {
                self.inner.peers.transfer_state(node).await.ok()
            };
            (node.to_string(), state)
        });
        futures::future::join_all(asks).await.into_iter().collect()
    }

    /// On the plan's coordinator: waits until every current owner (but the ones the plan marks
    /// down) has streamed its share of this very plan and holds no hint for a new node, then
    /// proposes the commit and, once every live member promised it, applies and sends it. A
    /// refused commit (an abort won, a member did not answer) is tried again next round while
    /// the plan is current. A data-holding member that dies mid-change blocks the commit: abort
    /// the change, then remove that node with `force`.
    async fn commit_when_done(self, rank: (u64, u32)) {
        let mut stop = self.inner.stop.subscribe();
        loop {
            tokio::select! {
                () = tokio::time::sleep(COMMIT_POLL) => {}
                _ = stop.changed() => return,
            }
            let view = self.topology().view.clone();
            if view.rank() != rank || view.coordinator.as_deref() != Some(&*self.inner.me) {
                return;
            }
            if self.all_done(&view).await {
                let committed = view.committed();
                match self.propose_and_adopt(&committed).await {
                    Ok(()) => {
                        info!(epoch = committed.epoch, "membership change committed");
                        return;
                    }
                    Err(e) => warn!(error = %e, "commit not accepted yet; trying again"),
                }
            }
        }
    }

    async fn all_done(&self, view: &View) -> bool {
        let digest = view.digest();
        let asks = view
            .before()
            .into_iter()
            .filter(|n| !view.is_down(n))
            .map(|node| async move {
                let state = if node == &*self.inner.me {
                    Ok(self.transfer_state())
                } else {
                    self.inner.peers.transfer_state(node).await
                };
                state.is_ok_and(|s| {
                    s.epoch == view.epoch && s.digest == digest && s.done && s.hints_for_new == 0
                })
            });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .all(|done| done)
    }
}

/// Adds up the nodes' estimates into a per-node report.
fn summarise(view: View, estimates: Vec<Estimate>, incomplete: bool, applied: bool) -> PlanReport {
    let mut nodes: BTreeMap<String, NodeMoves> = view
        .all()
        .into_iter()
        .map(|u| (u.to_owned(), NodeMoves::default()))
        .collect();
    let mut keys_moved = 0;
    for estimate in estimates {
        nodes.entry(estimate.node).or_default().keys_before = estimate.keys;
        for (node, [keys, bytes]) in estimate.gains {
            let line = nodes.entry(node).or_default();
            line.gain_keys += keys;
            line.gain_bytes += bytes;
            keys_moved += keys;
        }
        for (node, [keys, bytes]) in estimate.losses {
            let line = nodes.entry(node).or_default();
            line.lose_keys += keys;
            line.lose_bytes += bytes;
        }
    }
    for line in nodes.values_mut() {
        line.keys_after = (line.keys_before + line.gain_keys).saturating_sub(line.lose_keys);
    }
    let after: Vec<u64> = view
        .after()
        .iter()
        .filter_map(|u| nodes.get(*u))
        .map(|l| l.keys_after)
        .collect();
    let balance_after = match (after.iter().max(), after.iter().min()) {
        (Some(&max), Some(&min)) if min > 0 => max as f64 / min as f64,
        _ => 0.0,
    };
    PlanReport {
        down: view.down.clone(),
        view,
        applied,
        nodes,
        keys_moved,
        balance_after,
        incomplete,
    }
}
