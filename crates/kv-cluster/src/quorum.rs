//! The quorum paths: versioned writes fanned out to every replica (W durable acks), reads from
//! R replicas with read repair, deletes as tombstones, and conditional writes serialised per key.

use crate::cluster::Cluster;
use crate::consistency::Consistency;
use crate::error::{Error, Result};
use bytes::Bytes;
use kv_core::{Entry, Record, Version};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, instrument, warn};

/// How long a read waits for its first R replicas before asking the others too (speculative read).
const SPECULATIVE_READ_DELAY: Duration = Duration::from_millis(50);

/// The condition a write applies under (`If-Match` / `If-None-Match`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// No condition.
    Always,
    /// `If-Match: "<version>"`: only if the key's current version is this one.
    IfMatch(Version),
    /// `If-Match: *`: only if the key exists.
    IfExists,
    /// `If-None-Match: *`: only if the key is absent (create).
    IfAbsent,
}

impl Precondition {
    /// Whether the condition holds for the key's current live entry (`None`: absent or deleted).
    pub fn holds(self, current: Option<&Entry>) -> bool {
        match self {
            Precondition::Always => true,
            Precondition::IfMatch(version) => current.is_some_and(|e| e.version == version),
            Precondition::IfExists => current.is_some(),
            Precondition::IfAbsent => current.is_none(),
        }
    }
}

/// What a write stores: a value (or a delete), its expiry, and possibly its own version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Write {
    /// The value's exact JSON bytes; `None` deletes.
    pub value: Option<Bytes>,
    /// When the value expires, in Unix milliseconds (`None`: never).
    pub expires_at_ms: Option<u64>,
    /// The version the write brings (a retried write's own); `None`: this node's clock picks one.
    pub version: Option<Version>,
}

/// Milliseconds since the Unix epoch on this machine's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Cluster {
    /// Stores `write` under its version (a new one from this node's clock when it has none) and
    /// returns once W replicas hold it durably; the other replicas get it in the background, or
    /// a hint when they are down.
    #[instrument(skip(self, write), fields(%w))]
    pub async fn write(
        &self,
        key: &str,
        write: Write,
        w: Consistency,
        request_id: &str,
    ) -> Result<Version> {
        if let Some(reason) = self.inner.store.write_refused() {
            return Err(Error::Store(kv_core::Error::WalFailed { reason }));
        }
        let version = write
            .version
            .unwrap_or_else(|| self.inner.store.clock().tick());
        let record = Record {
            key: key.to_owned(),
            version,
            value: write.value,
            expires_at_ms: write.expires_at_ms,
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
        let topology = self.topology();
        let replicas = topology.owners(&record.key);
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
        // During a membership change the key's future replicas get the write too; they do not
        // count towards W (they own nothing yet), and a failure becomes a hint.
        for future in topology.pending(&record.key) {
            let (cluster, record, rid) = (self.clone(), record.clone(), rid.clone());
            tokio::spawn(async move { cluster.send_to_replica(&future, &record, &rid).await });
        }
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
            .replicate_record(replica, record.clone(), Arc::from(rid))
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
            expires_at_ms: record.expires_at_ms,
        }))
    }

    /// The order replicas are asked in for a read.
    fn read_order(&self, replicas: Vec<Arc<str>>) -> Vec<Arc<str>> {
        let detector = &self.inner.detector;
        let mut ordered = replicas;
        // Stable sort: this node, then peers believed up by their last measured round trip
        // (unmeasured ones after), then peers believed down; a slow peer is asked last.
        ordered.sort_by_key(|r| {
            if *r == self.inner.me {
                (0, Duration::ZERO)
            } else if detector.is_up(r) {
                (1, detector.latency(r).unwrap_or(Duration::MAX))
            } else {
                (2, Duration::ZERO)
            }
        });
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
        let mut answers = Vec::with_capacity(total);
        let mut pending = replicas.into_iter().peekable();
        let mut launched = 0;
        // This node's own copy needs no task and no network: answer it inline.
        if let Some(me) = pending.next_if(|node| *node == self.inner.me) {
            answers.push((me, self.local_record(key)));
            launched += 1;
        }
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
        for node in pending.by_ref().take(needed.saturating_sub(launched)) {
            launch(node);
            launched += 1;
        }
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
        self.inner
            .peers
            .fetch(node, key, Arc::from(rid))
            .await
            .map_err(|e| {
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

    /// A write (`Some(value)`) or delete (`None`) under a precondition, coordinated here.
    ///
    /// Deletes and conditional writes read the key first, at R but never below a quorum, so that
    /// the read overlaps every quorum write. Conditional writes of one key are serialised on this
    /// node (a striped lock), and conditional requests are routed to the key's first live replica,
    /// so two racing `If-Match` updates cannot both win while that replica stays up.
    ///
    /// A write that carries its own `version` is idempotent: sent twice (a retry after a lost
    /// answer), it is the same record, and a delete that finds its own tombstone succeeds again.
    /// Returns the version written, or `None` for a delete of a key that does not exist.
    pub async fn write_if(
        &self,
        key: &str,
        write: Write,
        precondition: Precondition,
        (w, r): (Consistency, Consistency),
        request_id: &str,
    ) -> Result<Option<Version>> {
        if precondition == Precondition::Always && write.value.is_some() {
            return self.write(key, write, w, request_id).await.map(Some);
        }
        let _serialised = match precondition {
            Precondition::Always => None,
            _ => Some(self.inner.key_lock(key).lock().await),
        };
        let n = self.replication_factor();
        let r = Consistency::Count(r.required(n).max(Consistency::Quorum.required(n)));
        let newest = self.read(key, r, request_id).await?;
        if write.version.is_some() && newest.as_ref().map(|e| e.version) == write.version {
            return Ok(write.version);
        }
        let current = newest.filter(|e| e.is_live_at(now_ms()));
        if !precondition.holds(current.as_ref()) {
            return Err(Error::PreconditionFailed {
                current: current.map(|e| e.version),
            });
        }
        if write.value.is_none() && current.is_none() {
            return Ok(None);
        }
        self.write(key, write, w, request_id).await.map(Some)
    }
}
