//! The quorum paths: versioned writes fanned out to every replica (W durable acks), reads from
//! R replicas with read repair, deletes as tombstones, and conditional writes serialised per key.

use crate::cluster::Cluster;
use crate::consistency::Consistency;
use crate::error::{Error, Result};
use crate::recent_writes::{Resend, WriteId};
use crate::resend::ResendCheck;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use kv_core::{Entry, Record, Version};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, instrument, warn};

/// How long a read waits for its first R replicas before asking the others too (speculative read).
const SPECULATIVE_READ_DELAY: Duration = Duration::from_millis(50);
/// How many versions a write without its own version tries when replicas report newer ones
/// (each try moves the clock past what they reported).
const MAX_WRITE_TRIES: usize = 4;

/// What one replica said about one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReplicaAnswer {
    /// It holds this very record, durably.
    Stored,
    /// It holds a newer version of the key; this record was not stored there.
    Newer(Version),
    /// No usable answer (a hint keeps the record for it).
    Failed,
}

/// Where a quorum write stands once it stopped waiting.
#[derive(Debug)]
pub(crate) enum QuorumOutcome {
    /// W replicas stored it.
    Acked(usize),
    /// Fewer than W stored it and some hold a newer version.
    Superseded {
        /// Replicas that stored it.
        stored: usize,
        /// Replicas that hold a newer version.
        newer: usize,
        /// The newest version reported.
        newest: Version,
    },
    /// Fewer than W confirmed it in time.
    Unconfirmed(usize),
}

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
    /// The version the write brings (a client's own); `None`: this node's clock picks one.
    pub version: Option<Version>,
    /// The write's id (`x-kv-write-id`), remembered by every replica that stores it.
    pub id: Option<WriteId>,
    /// Sent before and maybe applied (`x-kv-resend`): applied only if no replica has it yet.
    pub resend: Option<Resend>,
}

impl Write {
    /// The record this write stores for `key` under `version`.
    pub(crate) fn record(&self, key: &str, version: Version) -> Record {
        Record {
            key: key.to_owned(),
            version,
            value: self.value.clone(),
            expires_at_ms: self.expires_at_ms,
        }
    }
}

/// Which replica answers count as confirming a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AckRule {
    /// Only a replica holding this very record.
    ThisRecord,
    /// Also a replica holding a newer version: the record took effect there and was overwritten
    /// (a resend confirming a write applied before).
    ThisOrNewer,
}

/// A write that W replicas confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The version it was stored under.
    pub version: Version,
    /// Replicas that confirmed, durably, that they hold this write (or, for a write overtaken by
    /// a concurrent one, a newer write) when the answer was given: at least W.
    pub acks: usize,
}

/// Milliseconds since the Unix epoch on this machine's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a write does after one try.
#[derive(Debug)]
enum Next {
    /// Answer the client.
    Done(Result<Written>),
    /// Try again with a version above this one.
    TryAbove(Version),
}

/// The tries of one write: W, and what earlier tries learned.
#[derive(Debug)]
struct Tries {
    needed: usize,
    quorum: usize,
    attempt: usize,
    /// Some try stored its record on at least one replica.
    stored_any: bool,
    /// A quorum answered an earlier try and this try's version is above everything it reported:
    /// every write acknowledged before this one started is then below it, so a newer version can
    /// only be a concurrent write's.
    above_acknowledged: bool,
}

impl Tries {
    fn new(needed: usize, quorum: usize) -> Tries {
        Tries {
            needed,
            quorum,
            attempt: 0,
            stored_any: false,
            above_acknowledged: false,
        }
    }

    /// Decides after the try of `version` ended in `outcome`; `own_version`: the write carries
    /// its version, so it cannot go above a newer one.
    fn judge(&mut self, version: Version, outcome: QuorumOutcome, own_version: bool) -> Next {
        self.attempt += 1;
        let (stored, newer, newest) = match outcome {
            QuorumOutcome::Acked(acks) => return Next::Done(Ok(Written { version, acks })),
            QuorumOutcome::Unconfirmed(acked) => {
                let needed = self.needed;
                return Next::Done(Err(Error::OutcomeUnknown {
                    acked,
                    detail: format!(
                        "only {acked} of the {needed} required replicas confirmed it in time"
                    ),
                }));
            }
            QuorumOutcome::Superseded {
                stored,
                newer,
                newest,
            } => (stored, newer, newest),
        };
        let last_try = self.attempt >= MAX_WRITE_TRIES;
        if self.above_acknowledged && (stored > 0 || last_try) && stored + newer >= self.needed {
            // Overtaken by concurrent writes only, and W replicas hold this write or a newer
            // one: it takes effect just before the write that overtook it (no later quorum read
            // can return anything older). While tries remain, at least one replica must have
            // applied it, so that it is a change in that replica's feed that watchers see
            // (`watch_merge.rs`); a write that no replica applied goes above again. On the last
            // try it is acknowledged all the same (a hot key under heavy contention), rather
            // than answered 504.
            return Next::Done(Ok(Written {
                version,
                acks: stored + newer,
            }));
        }
        self.above_acknowledged |= stored + newer >= self.quorum;
        self.stored_any |= stored > 0;
        if !own_version && self.attempt < MAX_WRITE_TRIES {
            return Next::TryAbove(newest);
        }
        Next::Done(Err(if self.stored_any {
            Error::OutcomeUnknown {
                acked: stored,
                detail: format!("replicas kept reporting newer versions (the last {newest})"),
            }
        } else {
            Error::Superseded { version, newest }
        }))
    }
}

/// A replica's answer from the version it holds after being sent `version`.
fn held_answer(version: Version, held: Version) -> ReplicaAnswer {
    if held > version {
        ReplicaAnswer::Newer(held)
    } else {
        ReplicaAnswer::Stored
    }
}

/// One replica's answer to a read.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Reply {
    /// Its whole entry (tombstones included), `None` when it has none.
    Entry(Option<Record>),
    /// Only the version of its entry (a digest read).
    Version(Option<Version>),
}

impl Reply {
    fn version(&self) -> Option<Version> {
        match self {
            Reply::Entry(record) => record.as_ref().map(|r| r.version),
            Reply::Version(version) => *version,
        }
    }
}

/// Where the newest version among a read's answers is.
#[derive(Debug, PartialEq, Eq)]
enum Newest<'a> {
    /// No replica asked has an entry.
    Nothing,
    /// An answer holds the whole newest record.
    Held(&'a Record),
    /// Only digests report the newest version: its record must be fetched from one of these.
    Elsewhere {
        version: Version,
        holders: Vec<Arc<str>>,
    },
}

/// The newest version the answers report, and whether one of them carries its record.
fn newest_answer(answers: &[(Arc<str>, Reply)]) -> Newest<'_> {
    let Some(version) = answers
        .iter()
        .filter_map(|(_, reply)| reply.version())
        .max()
    else {
        return Newest::Nothing;
    };
    let held = answers.iter().find_map(|(_, reply)| match reply {
        Reply::Entry(Some(record)) if record.version == version => Some(record),
        _ => None,
    });
    match held {
        Some(record) => Newest::Held(record),
        None => Newest::Elsewhere {
            version,
            holders: answers
                .iter()
                .filter(|(_, reply)| reply.version() == Some(version))
                .map(|(node, _)| node.clone())
                .collect(),
        },
    }
}

/// The replicas whose answer is older than `newest` (or that have no entry): the ones a read
/// writes back to.
fn stale_answers(answers: &[(Arc<str>, Reply)], newest: Version) -> Vec<Arc<str>> {
    answers
        .iter()
        .filter(|(_, reply)| reply.version().is_none_or(|v| v < newest))
        .map(|(node, _)| node.clone())
        .collect()
}

impl Cluster {
    /// Stores `write` under its version (a new one from this node's clock when it has none) and
    /// returns once W replicas hold it durably; the other replicas get it in the background, or
    /// a hint when they are down.
    ///
    /// Outcomes are honest: [`Error::TooFewReplicasUp`] (503) only when fewer than W replicas are
    /// believed up, decided before anything is written; [`Error::OutcomeUnknown`] (504) when the
    /// write was sent but W did not confirm it in time.
    ///
    /// A coordinator whose own disk is full (read-only) still coordinates: its local apply fails
    /// and counts as one failed replica, and the write succeeds if W other replicas store it
    /// (they catch this node up later by read repair). When the other replicas cannot make W
    /// without it, the write is refused up front with [`kv_core::Error::DiskFull`] (507), and
    /// nothing is written anywhere.
    #[instrument(level = "debug", skip(self, write), fields(%w))]
    pub async fn write(
        &self,
        key: &str,
        write: Write,
        w: Consistency,
        request_id: &str,
    ) -> Result<Written> {
        self.check_clock()?;
        if let Some(reason) = self.inner.store.write_refused() {
            return Err(Error::Store(kv_core::Error::WalFailed { reason }));
        }
        let clock = self.inner.store.clock();
        let replicas = self.replicas(key);
        let n = replicas.len();
        if let Err(full @ kv_core::Error::DiskFull { .. }) = self.inner.store.writable() {
            let others = replicas.iter().filter(|r| **r != self.inner.me).count();
            if others < n && others < w.required(n) {
                return Err(Error::Store(full));
            }
        }
        let mut tries = Tries::new(w.required(n), Consistency::Quorum.required(n));
        loop {
            let version = write.version.unwrap_or_else(|| clock.tick());
            let record = write.record(key, version);
            let replicated = self
                .replicate_quorum(record, write.id, w, AckRule::ThisRecord, request_id)
                .await;
            // After a try that stored something, no failure may claim that nothing was written.
            let outcome = match replicated {
                Ok(outcome) => outcome,
                Err(e) if tries.stored_any => return Err(e.possibly_written()),
                Err(e) => return Err(e),
            };
            match tries.judge(version, outcome, write.version.is_some()) {
                Next::Done(result) => return result,
                Next::TryAbove(newest) => {
                    // A newer version exists (a write acknowledged elsewhere, or one in flight):
                    // a write that starts after an acknowledged one must win, so go above it.
                    debug!(attempt = tries.attempt, %version, %newest, "replicas hold a newer version");
                    clock.observe(newest);
                }
            }
        }
    }

    /// Sends `record` (and its write id) to every replica of its key in parallel and waits for
    /// `w` acks by `rule`; returns how many confirmed. The fan-out runs in spawned tasks, so it
    /// completes even when the client hangs up. Replicas believed down get a hint without a call.
    /// When fewer than `w` replicas are believed up, nothing is sent and nothing is hinted: the
    /// write is refused.
    pub(crate) async fn replicate_quorum(
        &self,
        record: Record,
        id: Option<WriteId>,
        w: Consistency,
        rule: AckRule,
        request_id: &str,
    ) -> Result<QuorumOutcome> {
        let topology = self.topology();
        let replicas = topology.owners(&record.key);
        let needed = w.required(replicas.len());
        let is_up = |r: &Arc<str>| *r == self.inner.me || self.inner.detector.is_up(r);
        let up = replicas.iter().filter(|r| is_up(r)).count();
        if up < needed {
            return Err(Error::TooFewReplicasUp { needed, up });
        }
        let (tx, mut rx) = mpsc::channel(replicas.len().max(1));
        let record = Arc::new(record);
        let rid: Arc<str> = Arc::from(request_id);
        let mut outstanding = 0;
        for replica in &replicas {
            if !is_up(replica) {
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
                let answer = cluster.send_to_replica(&replica, &record, id, &rid).await;
                let _ = tx.send(answer).await;
            });
            outstanding += 1;
        }
        drop(tx);
        // During a membership change the key's future replicas get the write too; they do not
        // count towards W (they own nothing yet), and a failure becomes a hint.
        for future in topology.pending(&record.key) {
            let (cluster, record, rid) = (self.clone(), record.clone(), rid.clone());
            tokio::spawn(async move { cluster.send_to_replica(&future, &record, id, &rid).await });
        }
        let (mut acked, mut newer, mut newest) = (0, 0, None::<Version>);
        let deadline = tokio::time::Instant::now() + self.inner.config.peer_timeout;
        // Stop as soon as W stored it, or W is out of reach.
        while acked < needed && acked + outstanding >= needed {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(answer)) => {
                    outstanding -= 1;
                    match answer {
                        ReplicaAnswer::Stored => acked += 1,
                        ReplicaAnswer::Newer(_) if rule == AckRule::ThisOrNewer => acked += 1,
                        ReplicaAnswer::Newer(v) => {
                            newer += 1;
                            newest = newest.max(Some(v));
                        }
                        ReplicaAnswer::Failed => {}
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        Ok(match newest {
            _ if acked >= needed => QuorumOutcome::Acked(acked),
            Some(newest) => QuorumOutcome::Superseded {
                stored: acked,
                newer,
                newest,
            },
            None => QuorumOutcome::Unconfirmed(acked),
        })
    }

    /// Applies `record` on one replica (locally or over the network); a failed remote replica gets
    /// a hint (without the write id). Says whether the replica holds this very record, or a newer
    /// version. A replica that stores a record with an `id` remembers the id.
    async fn send_to_replica(
        &self,
        replica: &Arc<str>,
        record: &Record,
        id: Option<WriteId>,
        rid: &str,
    ) -> ReplicaAnswer {
        let inner = &self.inner;
        if *replica == inner.me {
            return match inner.store.apply(vec![record.clone()]).await {
                Ok(applied) => {
                    let applied = applied.first().copied().unwrap_or(false);
                    if applied {
                        // The view may have changed since this write chose its replicas.
                        self.note_stored([record.key.as_str()]);
                    }
                    let held = self.held_after(&record.key, record.version, applied);
                    if let (Some(id), true) = (id, held == record.version) {
                        inner.recent_writes.remember(&record.key, id, held);
                    }
                    held_answer(record.version, held)
                }
                Err(e) => {
                    warn!(error = %e, "local write failed");
                    ReplicaAnswer::Failed
                }
            };
        }
        match inner
            .peers
            .replicate_record(replica, (record.clone(), id), Arc::from(rid))
            .await
        {
            Ok(held) if held < record.version => {
                warn!(peer = %replica, %held, version = %record.version, "replica answered an older version than it was sent; keeping a hint");
                inner.hints.add(replica, record.clone());
                ReplicaAnswer::Failed
            }
            Ok(held) => {
                metrics::counter!("kv_replication_acks_total", "peer" => replica.to_string())
                    .increment(1);
                held_answer(record.version, held)
            }
            Err(e) => {
                metrics::counter!("kv_replication_failures_total", "peer" => replica.to_string())
                    .increment(1);
                debug!(peer = %replica, error = %e, "replication failed; keeping a hint");
                inner.detector.record_failure(replica, e.is_connect());
                inner.hints.add(replica, record.clone());
                ReplicaAnswer::Failed
            }
        }
    }

    /// Reads `key` from R replicas and returns the newest entry (tombstones included).
    ///
    /// When the answers disagree, a read at a quorum level first writes the newest record back
    /// until a quorum of replicas holds it (the second phase of ABD), so no later quorum read can
    /// return anything older; `r=one` repairs in the background only. When they agree the read
    /// answers at once. The clock observes the newest version, so a write that follows this read
    /// on this node gets a greater one.
    #[instrument(level = "debug", skip(self), fields(%r))]
    pub async fn read(&self, key: &str, r: Consistency, request_id: &str) -> Result<Option<Entry>> {
        let replicas = self.read_order(self.replicas(key));
        let n = replicas.len();
        let needed = r.required(n);
        if needed == 1 && replicas.first() == Some(&self.inner.me) {
            return Ok(self.inner.store.get(key));
        }
        let answers = self
            .gather(key, replicas.clone(), needed, request_id)
            .await?;
        let newest = match newest_answer(&answers) {
            Newest::Nothing => None,
            Newest::Held(record) => Some(record.clone()),
            Newest::Elsewhere { version, holders } => {
                Some(self.fetch_newest(key, holders, version, request_id).await?)
            }
        };
        if let Some(newest) = &newest {
            let mine = answers.iter().find(|(node, _)| *node == self.inner.me);
            if mine.is_some_and(|(_, own)| own.version().is_none()) && self.is_zombie(newest, false)
            {
                // Deleted and collected here before this copy was written back from an old
                // backup: not a value (see `antientropy.rs`, the horizon).
                return Ok(None);
            }
            self.inner.store.clock().observe(newest.version);
            let stale = stale_answers(&answers, newest.version);
            let quorum = Consistency::Quorum.required(n);
            if !stale.is_empty() && needed >= quorum {
                let holders = answers.len() - stale.len();
                let unasked = replicas
                    .into_iter()
                    .filter(|node| !answers.iter().any(|(asked, _)| asked == node));
                let targets = stale.into_iter().chain(unasked).collect();
                self.write_back(
                    targets,
                    newest.clone(),
                    quorum.saturating_sub(holders),
                    request_id,
                )
                .await?;
            } else if !stale.is_empty() {
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
    /// The remote reads are polled on this task (no task per read): a read's peer calls are
    /// queued on the peer's lane, whose own task sends them, so nothing is left half-sent when
    /// the client hangs up and this future is dropped.
    async fn gather(
        &self,
        key: &str,
        replicas: Vec<Arc<str>>,
        needed: usize,
        request_id: &str,
    ) -> Result<Vec<(Arc<str>, Reply)>> {
        let total = replicas.len();
        let mut answers = Vec::with_capacity(total);
        let mut pending = replicas.into_iter().peekable();
        let mut launched = 0;
        // This node's own copy needs no task and no network: answer it inline.
        if let Some(me) = pending.next_if(|node| *node == self.inner.me) {
            answers.push((me, Reply::Entry(self.local_record(key))));
            launched += 1;
        }
        // Holding the value here, this node asks the others for versions only (digest reads).
        let digest = launched == 1;
        let rid: Arc<str> = Arc::from(request_id);
        let mut in_flight = FuturesUnordered::new();
        let launch = |node: Arc<str>| {
            let rid = rid.clone();
            async move {
                let answer = self.fetch_from(&node, key, rid, digest).await;
                (node, answer)
            }
        };
        for node in pending.by_ref().take(needed.saturating_sub(launched)) {
            in_flight.push(launch(node));
            launched += 1;
        }
        let (mut failed, mut timed_out) = (0, false);
        let deadline = tokio::time::Instant::now() + self.inner.config.peer_timeout;
        let speculate_at = tokio::time::Instant::now() + SPECULATIVE_READ_DELAY;
        let mut speculated = false;
        while answers.len() < needed && total - failed >= needed {
            let wake = if speculated {
                deadline
            } else {
                speculate_at.min(deadline)
            };
            match tokio::time::timeout_at(wake, in_flight.next()).await {
                Ok(Some((node, Ok(record)))) => answers.push((node, record)),
                Ok(Some((_, Err(())))) => {
                    failed += 1;
                    if let Some(node) = pending.next() {
                        in_flight.push(launch(node));
                        launched += 1;
                    }
                }
                Ok(None) => break,
                Err(_) if !speculated && tokio::time::Instant::now() < deadline => {
                    speculated = true;
                    for node in pending.by_ref() {
                        in_flight.push(launch(node));
                        launched += 1;
                    }
                }
                Err(_) => {
                    timed_out = true;
                    break;
                }
            }
        }
        debug!(launched, answered = answers.len(), failed, "read gathered");
        if answers.len() >= needed {
            Ok(answers)
        } else if timed_out && total - failed >= needed {
            // Enough replicas were reachable, but too slow: a timeout (504), not unavailability.
            let ms = u64::try_from(self.inner.config.peer_timeout.as_millis()).unwrap_or(u64::MAX);
            Err(Error::Timeout { ms })
        } else {
            Err(Error::Unavailable {
                needed,
                answered: answers.len(),
            })
        }
    }

    /// One replica's answer: its whole entry, or with `digest` only its version.
    async fn fetch_from(
        &self,
        node: &Arc<str>,
        key: &str,
        rid: Arc<str>,
        digest: bool,
    ) -> Result<Reply, ()> {
        if *node == self.inner.me {
            return Ok(Reply::Entry(self.local_record(key)));
        }
        let peers = &self.inner.peers;
        let answer = if digest {
            peers
                .fetch_version(node, key, rid)
                .await
                .map(Reply::Version)
        } else {
            peers.fetch(node, key, rid).await.map(Reply::Entry)
        };
        answer.map_err(|e| {
            debug!(peer = %node, error = %e, "replica read failed");
            self.inner.detector.record_failure(node, e.is_connect());
        })
    }

    /// The whole record of the newest version a digest read saw, from one of the replicas that
    /// reported it (a second round trip, only when this node is behind). The replica may hold a
    /// newer version by now: that one is returned, and written back like any newest record.
    /// Within one peer-call deadline: past it 504 `timeout`; 503 when no holder answered with it.
    async fn fetch_newest(
        &self,
        key: &str,
        holders: Vec<Arc<str>>,
        version: Version,
        request_id: &str,
    ) -> Result<Record> {
        let rid: Arc<str> = Arc::from(request_id);
        let deadline = tokio::time::Instant::now() + self.inner.config.peer_timeout;
        for node in &holders {
            let fetched =
                tokio::time::timeout_at(deadline, self.fetch_from(node, key, rid.clone(), false))
                    .await;
            match fetched {
                Ok(Ok(Reply::Entry(Some(record)))) if record.version >= version => {
                    return Ok(record)
                }
                Ok(Ok(other)) => {
                    debug!(peer = %node, %version, held = ?other.version(), "replica no longer holds the version it reported");
                }
                Ok(Err(())) => {}
                Err(_) => {
                    // Up, but too slow: a timeout (504), as for any replica read.
                    let ms = u64::try_from(self.inner.config.peer_timeout.as_millis())
                        .unwrap_or(u64::MAX);
                    return Err(Error::Timeout { ms });
                }
            }
        }
        Err(Error::Unavailable {
            needed: 1,
            answered: 0,
        })
    }

    /// Writes `newest` to `targets` and waits until `more` of them confirmed it (the rest finish
    /// in the background, or become hints).
    async fn write_back(
        &self,
        targets: Vec<Arc<str>>,
        newest: Record,
        more: usize,
        request_id: &str,
    ) -> Result<()> {
        let mut rx = self.send_repairs(targets, newest, request_id);
        let mut confirmed = 0;
        let deadline = tokio::time::Instant::now() + self.inner.config.peer_timeout;
        while confirmed < more {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ok)) => confirmed += usize::from(ok),
                Ok(None) | Err(_) => break,
            }
        }
        if confirmed >= more {
            Ok(())
        } else {
            // The newest version may be held by fewer than a quorum: answering it could let a
            // later read return something older.
            Err(Error::Unavailable {
                needed: more,
                answered: confirmed,
            })
        }
    }

    /// Sends the newest record to replicas that answered with an older one (or none), in the
    /// background.
    fn repair(&self, stale: Vec<Arc<str>>, newest: Record, request_id: &str) {
        drop(self.send_repairs(stale, newest, request_id));
    }

    /// Sends `newest` to each of `targets` in its own task (so it completes even when nobody
    /// waits); the receiver gets, per target, whether it now holds `newest` or something newer.
    fn send_repairs(
        &self,
        targets: Vec<Arc<str>>,
        newest: Record,
        request_id: &str,
    ) -> mpsc::Receiver<bool> {
        let (tx, rx) = mpsc::channel(targets.len().max(1));
        let newest = Arc::new(newest);
        for node in targets {
            let (cluster, newest, rid, tx) = (
                self.clone(),
                newest.clone(),
                request_id.to_owned(),
                tx.clone(),
            );
            tokio::spawn(async move {
                cluster.inner.read_repairs.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("kv_read_repairs_total").increment(1);
                debug!(peer = %node, key = %newest.key, "read repair");
                let answer = cluster.send_to_replica(&node, &newest, None, &rid).await;
                // A replica holding something newer also holds at least what the read returns.
                let _ = tx.send(answer != ReplicaAnswer::Failed).await;
            });
        }
        rx
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
    /// A plain write marked as a resend of a write id is applied only if no replica stored that
    /// id yet (see `resend.rs`).
    /// Returns the write, or `None` for a delete of a key that does not exist.
    pub async fn write_if(
        &self,
        key: &str,
        write: Write,
        precondition: Precondition,
        (w, r): (Consistency, Consistency),
        request_id: &str,
    ) -> Result<Option<Written>> {
        if write.resend.is_some() && precondition == Precondition::Always {
            let _mark = match self.check_resend(key, &write, w, request_id).await? {
                ResendCheck::Confirmed(written) => return Ok(Some(written)),
                ResendCheck::ApplyAnew(mark) => mark,
            };
            // The first send may be stranded on a replica believed down (and come back with
            // it): saying that nothing was written would not be sure.
            return self
                .write_fresh(key, write, precondition, (w, r), request_id)
                .await
                .map_err(Error::possibly_written);
        }
        self.write_fresh(key, write, precondition, (w, r), request_id)
            .await
    }

    /// [`Cluster::write_if`] for a write that is not a resend, or a resend no replica stored.
    async fn write_fresh(
        &self,
        key: &str,
        write: Write,
        precondition: Precondition,
        (w, r): (Consistency, Consistency),
        request_id: &str,
    ) -> Result<Option<Written>> {
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
        if let Some(version) = write.version {
            if newest.as_ref().map(|e| e.version) == Some(version) {
                // The retried write is already the newest: the read confirmed a quorum holds it.
                let acks = Consistency::Quorum.required(n).min(r.required(n));
                return Ok(Some(Written { version, acks }));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn v(hlc: u64) -> Version {
        Version { hlc, node: 1 }
    }

    fn superseded(stored: usize, newer: usize, newest: u64) -> QuorumOutcome {
        QuorumOutcome::Superseded {
            stored,
            newer,
            newest: v(newest),
        }
    }

    fn node(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    fn rec(hlc: u64) -> Record {
        Record {
            key: "k".into(),
            version: v(hlc),
            value: Some(Bytes::from_static(b"1")),
            expires_at_ms: None,
        }
    }

    #[test]
    fn a_digest_read_answers_from_the_local_record_when_no_replica_is_newer() {
        let local = rec(5);
        let answers = vec![
            (node("me"), Reply::Entry(Some(local.clone()))),
            (node("b"), Reply::Version(Some(v(5)))),
        ];
        assert_eq!(newest_answer(&answers), Newest::Held(&local));
        assert!(
            stale_answers(&answers, v(5)).is_empty(),
            "agreement: no write-back"
        );
        // An older or absent peer copy is written back to.
        let answers = vec![
            (node("me"), Reply::Entry(Some(local.clone()))),
            (node("b"), Reply::Version(Some(v(3)))),
            (node("c"), Reply::Version(None)),
        ];
        assert_eq!(newest_answer(&answers), Newest::Held(&local));
        assert_eq!(stale_answers(&answers, v(5)), vec![node("b"), node("c")]);
    }

    #[test]
    fn a_digest_read_fetches_the_record_when_a_replica_reports_a_newer_version() {
        let answers = vec![
            (node("me"), Reply::Entry(Some(rec(5)))),
            (node("b"), Reply::Version(Some(v(8)))),
            (node("c"), Reply::Version(Some(v(8)))),
        ];
        assert_eq!(
            newest_answer(&answers),
            Newest::Elsewhere {
                version: v(8),
                holders: vec![node("b"), node("c")]
            }
        );
        assert_eq!(stale_answers(&answers, v(8)), vec![node("me")]);
        // Nothing here, something there: fetched too (never answered as absent).
        let answers = vec![
            (node("me"), Reply::Entry(None)),
            (node("b"), Reply::Version(Some(v(2)))),
        ];
        assert!(matches!(
            newest_answer(&answers),
            Newest::Elsewhere { version, .. } if version == v(2)
        ));
        // A fetched record newer than reported makes every answer stale.
        assert_eq!(stale_answers(&answers, v(9)), vec![node("me"), node("b")]);
    }

    #[test]
    fn a_read_where_nobody_has_the_key_answers_nothing_and_full_answers_still_work() {
        let answers = vec![
            (node("me"), Reply::Entry(None)),
            (node("b"), Reply::Version(None)),
        ];
        assert_eq!(newest_answer(&answers), Newest::Nothing);
        // Full entries (no local copy asked): the newest record is held by its answer.
        let newer = rec(7);
        let answers = vec![
            (node("b"), Reply::Entry(Some(rec(4)))),
            (node("c"), Reply::Entry(Some(newer.clone()))),
        ];
        assert_eq!(newest_answer(&answers), Newest::Held(&newer));
        assert_eq!(stale_answers(&answers, v(7)), vec![node("b")]);
    }

    #[test]
    fn a_write_acked_by_w_replicas_is_done() {
        let mut tries = Tries::new(2, 2);
        let next = tries.judge(v(5), QuorumOutcome::Acked(2), false);
        assert!(matches!(next, Next::Done(Ok(Written { acks: 2, .. }))));
    }

    #[test]
    fn a_newer_version_sends_the_write_above_it_until_only_concurrent_writes_overtake_it() {
        let mut tries = Tries::new(2, 2);
        // First try: a quorum holds something newer (maybe acknowledged before we started).
        assert!(matches!(
            tries.judge(v(5), superseded(0, 2, 9), false),
            Next::TryAbove(newest) if newest == v(9)
        ));
        // Second try above 9, overtaken again: only a concurrent write can be newer now, and W
        // replicas hold this write or newer, so it is acknowledged.
        let next = tries.judge(v(10), superseded(1, 1, 12), false);
        assert!(
            matches!(next, Next::Done(Ok(Written { acks: 2, .. }))),
            "{next:?}"
        );
    }

    #[test]
    fn a_write_no_replica_applied_goes_above_while_tries_remain() {
        let mut tries = Tries::new(2, 2);
        assert!(matches!(
            tries.judge(v(5), superseded(0, 2, 9), false),
            Next::TryAbove(_)
        ));
        // Above everything acknowledged, but every replica already held a newer write: no feed
        // has this one, so it goes above once more instead of being acknowledged unseen.
        assert!(matches!(
            tries.judge(v(10), superseded(0, 3, 12), false),
            Next::TryAbove(newest) if newest == v(12)
        ));
        let next = tries.judge(v(13), superseded(1, 1, 14), false);
        assert!(
            matches!(next, Next::Done(Ok(Written { acks: 2, .. }))),
            "{next:?}"
        );
        // Overtaken everywhere on every try: the last one is acknowledged, not a 504.
        let mut tries = Tries::new(2, 2);
        let mut last = None;
        for attempt in 0..MAX_WRITE_TRIES as u64 {
            match tries.judge(v(attempt * 10), superseded(0, 3, attempt * 10 + 5), false) {
                Next::TryAbove(_) => {}
                Next::Done(result) => last = Some(result),
            }
        }
        assert!(
            matches!(last, Some(Ok(Written { acks: 3, .. }))),
            "{last:?}"
        );
    }

    #[test]
    fn without_a_quorum_heard_a_newer_version_is_never_taken_as_concurrent() {
        let mut tries = Tries::new(2, 2);
        // One replica newer, one failed: no quorum answered, so the floor is unknown.
        assert!(matches!(
            tries.judge(v(5), superseded(0, 1, 9), false),
            Next::TryAbove(_)
        ));
        assert!(matches!(
            tries.judge(v(10), superseded(0, 1, 12), false),
            Next::TryAbove(_)
        ));
    }

    #[test]
    fn a_write_with_its_own_version_is_never_moved() {
        let mut tries = Tries::new(2, 2);
        let next = tries.judge(v(5), superseded(0, 2, 9), true);
        assert!(matches!(next, Next::Done(Err(Error::Superseded { .. }))));
        // Stored somewhere: it may become visible, so the answer is "unknown", not "nothing".
        let mut tries = Tries::new(2, 2);
        let next = tries.judge(v(5), superseded(1, 1, 9), true);
        assert!(matches!(
            next,
            Next::Done(Err(Error::OutcomeUnknown { acked: 1, .. }))
        ));
    }

    #[test]
    fn tries_are_bounded() {
        let mut tries = Tries::new(3, 2);
        let mut last = None;
        for attempt in 0..MAX_WRITE_TRIES {
            // Each try: one replica newer, one failed, one stored: never W = 3.
            match tries.judge(
                v(attempt as u64 * 10),
                superseded(1, 1, attempt as u64 * 10 + 5),
                false,
            ) {
                Next::TryAbove(_) => {}
                Next::Done(result) => last = Some(result),
            }
        }
        assert!(
            matches!(last, Some(Err(Error::OutcomeUnknown { .. }))),
            "{last:?}"
        );
    }
}
