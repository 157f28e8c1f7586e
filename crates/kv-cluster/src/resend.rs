//! Resends of a plain write (`x-kv-resend`, sent by the load balancer after a lost answer): the
//! coordinator first asks every replica whether it already stored the write id, and confirms
//! that record instead of writing a new one, so a resent write applies at most once.

use crate::cluster::Cluster;
use crate::consistency::Consistency;
use crate::error::{Error, Result};
use crate::quorum::{AckRule, QuorumOutcome, Write, Written};
use crate::recent_writes::{decide_resend, ResendDecision, Seen, WriteId};
use kv_core::Version;
use std::time::Duration;
use tracing::{debug, warn};

/// What a resend's check found.
pub(crate) enum ResendCheck {
    /// It was applied before; this is its record, confirmed again.
    Confirmed(Written),
    /// No replica has it: apply it as a new write while holding this mark.
    ApplyAnew(Option<PendingResend>),
}

/// This node's mark that a resend of a write is under way here (see
/// [`crate::recent_writes::RecentWrites::mark_pending`]); given back when dropped, so also when
/// the request is abandoned.
pub(crate) struct PendingResend {
    cluster: Cluster,
    key: String,
    id: WriteId,
}

impl Drop for PendingResend {
    fn drop(&mut self) {
        self.cluster.inner.recent_writes.unmark(&self.key, self.id);
    }
}

impl Cluster {
    /// Handles the resend of `write` (which has an id): confirmed when it was applied before
    /// (its record is sent again at its version); to apply anew when no replica has it;
    /// [`Error::OutcomeUnknown`] when that cannot be told.
    pub(crate) async fn check_resend(
        &self,
        key: &str,
        write: &Write,
        w: Consistency,
        request_id: &str,
    ) -> Result<ResendCheck> {
        let (Some(id), Some(resend)) = (write.id, write.resend) else {
            return Ok(ResendCheck::ApplyAnew(None));
        };
        let horizon = resend.horizon();
        // Marked before the replicas are asked: of two resends racing on two replicas, at least
        // one hears of the other and does not apply it a second time.
        let here = self.inner.recent_writes.mark_pending(key, id, horizon);
        let mark = PendingResend {
            cluster: self.clone(),
            key: key.to_owned(),
            id,
        };
        let answers = self.ask_seen(key, id, here, horizon, request_id).await;
        match decide_resend(&answers) {
            ResendDecision::New => {
                metrics::counter!("kv_resends_total", "decision" => "new").increment(1);
                debug!(%id, "resend not seen by any replica; applying it");
                Ok(ResendCheck::ApplyAnew(Some(mark)))
            }
            ResendDecision::Unknown => {
                metrics::counter!("kv_resends_total", "decision" => "unknown").increment(1);
                warn!(%id, "resend: a replica that may hold the write cannot tell");
                Err(Error::OutcomeUnknown {
                    acked: 0,
                    detail: "a replica that may hold an earlier send of it cannot tell whether \
                             it does (it is unreachable, or restarted since that send)"
                        .to_owned(),
                })
            }
            ResendDecision::Applied(version) => {
                metrics::counter!("kv_resends_total", "decision" => "applied").increment(1);
                debug!(%id, %version, "resend already applied; confirming that record");
                self.confirm_applied(key, write, id, version, w, request_id)
                    .await
                    .map(ResendCheck::Confirmed)
            }
        }
    }

    /// This node's own knowledge of write `id` for `key`, vouching for misses `horizon` back
    /// (`POST /internal/seen`).
    pub fn write_id_seen(&self, key: &str, id: WriteId, horizon: Duration) -> Seen {
        self.inner.recent_writes.seen(key, id, horizon)
    }

    /// Asks every other replica of `key` in parallel whether it stored write `id`, vouching for
    /// `horizon` back; per replica, its answer (`None`: none in time) and whether it is believed
    /// down. `here` is this node's own answer.
    async fn ask_seen(
        &self,
        key: &str,
        id: WriteId,
        here: Seen,
        horizon: Duration,
        request_id: &str,
    ) -> Vec<(Option<Seen>, bool)> {
        let inner = &self.inner;
        let here = &here;
        let asks = self.replicas(key).into_iter().map(|replica| async move {
            if replica == inner.me {
                return (Some(here.clone()), false);
            }
            let mut answer = inner
                .peers
                .seen(&replica, key, id, horizon, request_id)
                .await;
            // The query only reads: one that broke on a pooled connection (a peer killed a
            // moment ago) is asked once more, on a new connection that a dead peer refuses, so
            // the failure detector learns at once that it is down.
            if answer.as_ref().is_err_and(|e| !e.is_connect()) {
                answer = inner
                    .peers
                    .seen(&replica, key, id, horizon, request_id)
                    .await;
            }
            match answer {
                Ok(seen) => (Some(seen), false),
                Err(e) => {
                    debug!(peer = %replica, error = %e, "write-id query failed");
                    inner.detector.record_failure(&replica, e.is_connect());
                    (None, !inner.detector.is_up(&replica))
                }
            }
        });
        futures::future::join_all(asks).await
    }

    /// Sends the record the write was stored as (`version`, this request's value) to the
    /// replicas again, like a normal write of that version: a replica already holding it acks,
    /// and so does one holding a newer version (the write took effect and was overwritten).
    async fn confirm_applied(
        &self,
        key: &str,
        write: &Write,
        id: WriteId,
        version: Version,
        w: Consistency,
        request_id: &str,
    ) -> Result<Written> {
        let record = write.record(key, version);
        let outcome = self
            .replicate_quorum(record, Some(id), w, AckRule::ThisOrNewer, request_id)
            .await;
        match outcome {
            Ok(QuorumOutcome::Acked(acks)) => Ok(Written { version, acks }),
            Ok(
                QuorumOutcome::Superseded { stored: acked, .. } | QuorumOutcome::Unconfirmed(acked),
            ) => Err(Error::OutcomeUnknown {
                acked,
                detail: format!(
                    "an earlier send was applied at version {version} and only {acked} \
                     replicas confirmed it again in time"
                ),
            }),
            // The write was applied before: "nothing was written" would not be true.
            Err(Error::TooFewReplicasUp { needed, up }) => Err(Error::OutcomeUnknown {
                acked: 0,
                detail: format!(
                    "an earlier send was applied at version {version} and only {up} of the \
                     {needed} required replicas are up to confirm it again"
                ),
            }),
            Err(e) => Err(e),
        }
    }
}
