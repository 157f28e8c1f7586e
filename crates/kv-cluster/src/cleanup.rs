//! After a committed membership change: dropping the keys this node no longer owns, but only the
//! ones every new owner confirms it holds at the same or a newer version. A view alone never
//! empties a node: what an owner lacks is sent to it and checked again on the next pass.
//!
//! A record can still reach this node after that cleanup scanned its keys: a write, hint, read
//! repair or push coordinated under the transition view by a node that had not adopted the
//! commit yet, or replayed late. Such a *straggler* is stored (refusing it could cost a copy the
//! coordinator counted), remembered, and dropped by the same rule once its owners confirm it.

use crate::cluster::Cluster;
use crate::membership::Topology;
use crate::peer::MAX_ENTRIES_KEYS;
use kv_core::{Entry, Record, Version};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Local bytes (keys and values) checked in one batch: the owners' answers carry their values,
/// so this bounds each answer too (far below what a peer accepts in one call).
const CONFIRM_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Passes over the keys still unconfirmed before giving up until the next start.
const CLEANUP_PASSES: u32 = 40;
/// Pause after the first pass that kept keys; it doubles up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Longest pause between passes.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// What one new owner of a key said about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Confirmation {
    /// It holds the key (or its tombstone) at this node's version or a newer one.
    Holds,
    /// It answered, without the key or with an older version: it gets this node's copy.
    Behind,
    /// It did not answer.
    NoAnswer,
}

/// Reads one owner's answer for a key this node holds at `local` (`None`: no answer). A local
/// tombstone is also confirmed by an owner that has no entry at all: the key reads as deleted
/// there too, and the owner may have collected its own tombstone already.
pub(crate) fn confirmation(
    local: Version,
    local_is_tombstone: bool,
    answer: Option<&Option<Record>>,
) -> Confirmation {
    match answer {
        None => Confirmation::NoAnswer,
        Some(Some(record)) if record.version >= local => Confirmation::Holds,
        Some(None) if local_is_tombstone => Confirmation::Holds,
        Some(_) => Confirmation::Behind,
    }
}

/// A key may be dropped only when it has owners and every one of them holds it: the copies this
/// node gives up must exist N times elsewhere, not once.
pub(crate) fn may_drop(confirmations: &[Confirmation]) -> bool {
    !confirmations.is_empty() && confirmations.iter().all(|c| *c == Confirmation::Holds)
}

/// A key this node holds but no longer owns.
#[derive(Debug)]
struct Foreign {
    key: String,
    version: Version,
    tombstone: bool,
    owners: Vec<Arc<str>>,
    bytes: usize,
}

/// Keys stored for which this node is no owner under its committed view, waiting to be dropped.
#[derive(Debug, Default)]
pub(crate) struct Stragglers {
    keys: BTreeSet<String>,
    /// True while a task checks them.
    running: bool,
}

impl Cluster {
    /// Remembers the keys of records just stored here that this node does not own under its
    /// committed view, and starts the task that drops them once their owners hold them. During a
    /// change nothing is remembered: the cleanup after the commit scans every key.
    pub(crate) fn note_stored<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let topology = self.topology();
        if topology.view.epoch == 0 || topology.view.in_transition() {
            return;
        }
        let me = &self.inner.me;
        let foreign: Vec<String> = keys
            .into_iter()
            .filter(|k| !topology.owners(k).contains(me))
            .map(str::to_owned)
            .collect();
        if foreign.is_empty() {
            return;
        }
        let start = {
            let mut stragglers = self.inner.stragglers.lock();
            stragglers.keys.extend(foreign);
            !std::mem::replace(&mut stragglers.running, true)
        };
        if start {
            info!(
                epoch = topology.view.epoch,
                "stored keys this node does not own after the change; dropping them once their owners hold them"
            );
            // Until they are gone, a restart must run the cleanup again.
            crate::rebalance::TransferState::unsave(&self.inner.config.members_file);
            tokio::spawn(self.clone().drop_stragglers());
        }
    }

    /// Checks the remembered stragglers with their owners, pass after pass (the first after a
    /// pause, so the other copies of a late write land first), until none is left.
    async fn drop_stragglers(self) {
        let mut stop = self.inner.stop.subscribe();
        let mut pause = FIRST_RETRY_PAUSE;
        loop {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {
                    self.inner.stragglers.lock().running = false;
                    return;
                }
            }
            let topology = self.topology();
            let keys = std::mem::take(&mut self.inner.stragglers.lock().keys);
            let kept = if topology.view.in_transition() {
                // A new change: the cleanup after its commit scans every key.
                Vec::new()
            } else {
                let foreign = self.foreign_among(&topology, keys);
                self.drop_confirmed(&topology, &foreign).await
            };
            pause = if kept.is_empty() {
                FIRST_RETRY_PAUSE
            } else {
                warn!(
                    kept = kept.len(),
                    "keeping late keys their owners have not confirmed; checking again"
                );
                (pause * 2).min(MAX_RETRY_PAUSE)
            };
            let mut stragglers = self.inner.stragglers.lock();
            stragglers.keys.extend(kept);
            if stragglers.keys.is_empty() {
                stragglers.running = false;
                drop(stragglers);
                self.record_cleanup_if_finished(topology.view.epoch);
                return;
            }
        }
    }

    /// Records the finished cleanup of `epoch` (so a restart skips it) once its full pass
    /// dropped everything and no straggler waits.
    fn record_cleanup_if_finished(&self, epoch: u64) {
        let stragglers = self.inner.stragglers.lock();
        let state = self.inner.transfer.lock();
        if state.epoch == epoch
            && state.cleaned
            && !state.running
            && !stragglers.running
            && stragglers.keys.is_empty()
        {
            state.save(&self.inner.config.members_file);
        }
    }

    /// Drops, pass after pass (bounded), the keys this node no longer owns once their new owners
    /// confirm them; then forgets hints for departed nodes. Re-run at every start while keys
    /// remain unconfirmed (the finished state is recorded only once none is left).
    pub(crate) async fn drop_foreign_keys(self) {
        let topology = self.topology();
        let epoch = topology.view.epoch;
        let mut stop = self.inner.stop.subscribe();
        let mut pause = FIRST_RETRY_PAUSE;
        let mut kept = 0;
        for pass in 1..=CLEANUP_PASSES {
            kept = self.cleanup_pass(&topology).await;
            if kept == 0 {
                break;
            }
            warn!(
                kept,
                pass, epoch, "keeping keys their new owners have not confirmed; checking again"
            );
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.changed() => break,
            }
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
            if self.topology().view.epoch != epoch {
                break;
            }
        }
        let departed = self.inner.hints.discard_except(&topology.view.all()).await;
        if departed > 0 {
            info!(
                hints = departed,
                "dropped hints for nodes that left the cluster"
            );
        }
        {
            let mut state = self.inner.transfer.lock();
            if state.epoch == epoch {
                state.running = false;
                state.cleaned = kept == 0;
            }
        }
        self.record_cleanup_if_finished(epoch);
        if self.topology().view.epoch != epoch {
            self.resume_membership_work();
        }
    }

    /// One pass: checks every foreign key with its owners, batch by batch, drops the confirmed
    /// ones and checkpoints. Returns how many were kept.
    async fn cleanup_pass(&self, topology: &Topology) -> usize {
        let foreign = self.foreign_keys(topology);
        self.drop_confirmed(topology, &foreign).await.len()
    }

    /// Drops the keys of `foreign` their owners confirm, batch by batch, and checkpoints.
    /// Returns the keys kept.
    async fn drop_confirmed(&self, topology: &Topology, foreign: &[Foreign]) -> Vec<String> {
        let (mut dropped, mut kept) = (0, Vec::new());
        for batch in batches(foreign) {
            let confirmed = self.confirm(batch).await;
            // A key written again since it was checked keeps its newer copy until the next pass.
            let still: BTreeSet<&str> = confirmed
                .into_iter()
                .filter(|f| self.inner.store.get(&f.key).map(|e| e.version) == Some(f.version))
                .map(|f| f.key.as_str())
                .collect();
            kept.extend(
                batch
                    .iter()
                    .filter(|f| !still.contains(f.key.as_str()))
                    .map(|f| f.key.clone()),
            );
            let still: Vec<String> = still.into_iter().map(str::to_owned).collect();
            dropped += self.inner.store.forget(&still);
        }
        if dropped > 0 {
            info!(
                keys = dropped,
                kept = kept.len(),
                epoch = topology.view.epoch,
                "dropped keys this node no longer owns"
            );
            if let Err(e) = self.inner.store.checkpoint().await {
                warn!(error = %e, "checkpoint after dropping keys failed; they return on restart and are dropped again");
            }
        }
        kept
    }

    fn foreign_keys(&self, topology: &Topology) -> Vec<Foreign> {
        let mut foreign = Vec::new();
        self.inner.store.scan(|key, entry| {
            foreign.extend(self.foreign(topology, key, entry));
        });
        foreign
    }

    /// The keys of `keys` this node holds without owning them.
    fn foreign_among(&self, topology: &Topology, keys: BTreeSet<String>) -> Vec<Foreign> {
        keys.iter()
            .filter_map(|key| {
                let entry = self.inner.store.get(key)?;
                self.foreign(topology, key, &entry)
            })
            .collect()
    }

    fn foreign(&self, topology: &Topology, key: &str, entry: &Entry) -> Option<Foreign> {
        let owners = topology.owners(key);
        (!owners.contains(&self.inner.me)).then(|| Foreign {
            key: key.to_owned(),
            version: entry.version,
            tombstone: entry.value.is_none(),
            owners,
            bytes: key.len() + entry.value.as_ref().map_or(0, |v| v.len()),
        })
    }

    /// Asks every owner of the batch's keys for its entries; returns the keys all owners hold,
    /// and sends this node's copy to each owner that answered without it.
    async fn confirm<'a>(&self, batch: &'a [Foreign]) -> Vec<&'a Foreign> {
        let mut by_owner: BTreeMap<&Arc<str>, Vec<usize>> = BTreeMap::new();
        for (i, f) in batch.iter().enumerate() {
            for owner in &f.owners {
                by_owner.entry(owner).or_default().push(i);
            }
        }
        let asks = by_owner.into_iter().map(|(owner, indexes)| async move {
            let keys: Vec<String> = indexes.iter().map(|&i| batch[i].key.clone()).collect();
            let answer = self
                .inner
                .peers
                .fetch_entries(owner, &keys, "cleanup")
                .await;
            if let Err(e) = &answer {
                warn!(peer = %owner, error = %e, "cannot confirm keys with their new owner");
            }
            (owner, indexes, answer.ok())
        });
        let mut verdicts = vec![Vec::new(); batch.len()];
        for (owner, indexes, answer) in futures::future::join_all(asks).await {
            let mut behind = Vec::new();
            for (j, &i) in indexes.iter().enumerate() {
                let f = &batch[i];
                let c = confirmation(
                    f.version,
                    f.tombstone,
                    answer.as_ref().and_then(|a| a.get(j)),
                );
                if c == Confirmation::Behind {
                    behind.extend(self.local_record(&f.key));
                }
                verdicts[i].push(c);
            }
            self.resend(owner, &behind).await;
        }
        batch
            .iter()
            .zip(verdicts)
            .filter(|(_, v)| may_drop(v))
            .map(|(f, _)| f)
            .collect()
    }

    /// Sends an owner the records it lacks; the next pass checks that it took them.
    async fn resend(&self, owner: &str, records: &[Record]) {
        if records.is_empty() {
            return;
        }
        match self.inner.peers.replicate(owner, records, "cleanup").await {
            Ok(()) => info!(
                peer = owner,
                keys = records.len(),
                "sent keys their new owner lacked"
            ),
            Err(e) => warn!(peer = owner, error = %e, "cannot send keys their new owner lacks"),
        }
    }
}

/// Splits the keys into batches of at most [`MAX_ENTRIES_KEYS`] keys and, past the first key,
/// [`CONFIRM_BATCH_BYTES`] bytes.
fn batches(foreign: &[Foreign]) -> Vec<&[Foreign]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, f) in foreign.iter().enumerate() {
        let full = i - start == MAX_ENTRIES_KEYS || bytes + f.bytes > CONFIRM_BATCH_BYTES;
        if full && i > start {
            out.push(&foreign[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += f.bytes;
    }
    if start < foreign.len() {
        out.push(&foreign[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(hlc: u64) -> Version {
        Version { hlc, node: 1 }
    }

    fn record(hlc: u64, value: Option<&str>) -> Record {
        Record {
            key: "k".into(),
            version: version(hlc),
            value: value.map(|v| bytes::Bytes::copy_from_slice(v.as_bytes())),
            expires_at_ms: None,
        }
    }

    #[test]
    fn an_owner_confirms_only_the_same_or_a_newer_version() {
        let local = version(10);
        assert_eq!(confirmation(local, false, None), Confirmation::NoAnswer);
        assert_eq!(
            confirmation(local, false, Some(&None)),
            Confirmation::Behind
        );
        let older = Some(record(9, Some("1")));
        assert_eq!(
            confirmation(local, false, Some(&older)),
            Confirmation::Behind
        );
        let same = Some(record(10, Some("1")));
        assert_eq!(confirmation(local, false, Some(&same)), Confirmation::Holds);
        let newer_tombstone = Some(record(11, None));
        assert_eq!(
            confirmation(local, false, Some(&newer_tombstone)),
            Confirmation::Holds
        );
        // A deleted key: an owner without any entry (its tombstone collected) confirms it, one
        // with an older live value does not.
        assert_eq!(confirmation(local, true, Some(&None)), Confirmation::Holds);
        assert_eq!(
            confirmation(local, true, Some(&older)),
            Confirmation::Behind
        );
        assert_eq!(confirmation(local, true, None), Confirmation::NoAnswer);
    }

    #[test]
    fn a_key_is_dropped_only_when_every_owner_holds_it() {
        use Confirmation::*;
        assert!(may_drop(&[Holds, Holds, Holds]));
        assert!(!may_drop(&[Holds, Holds, Behind]));
        assert!(!may_drop(&[Holds, NoAnswer]));
        assert!(!may_drop(&[]), "no owner confirmed anything");
    }

    #[test]
    fn batches_are_capped_in_keys_and_bytes() {
        let make = |n: usize, bytes: usize| -> Vec<Foreign> {
            (0..n)
                .map(|i| Foreign {
                    key: format!("k{i}"),
                    version: version(1),
                    tombstone: false,
                    owners: Vec::new(),
                    bytes,
                })
                .collect()
        };
        let small = make(2500, 10);
        let sizes: Vec<usize> = batches(&small).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [1024, 1024, 452]);
        let large = make(10, 900 * 1024);
        let sizes: Vec<usize> = batches(&large).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [4, 4, 2]);
        let huge = make(2, 2 * CONFIRM_BATCH_BYTES);
        assert_eq!(batches(&huge).len(), 2, "one oversized key per batch");
        assert!(batches(&[]).is_empty());
    }
}
