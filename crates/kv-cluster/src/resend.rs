//! Resends of a plain write (`x-kv-resend`, sent by the load balancer after a lost answer): the
//! coordinator first asks every replica whether it already stored the write id, and confirms
//! that record instead of writing a new one, so a resent write applies at most once.

use crate::cluster::Cluster;
use crate::consistency::Consistency;
use crate::error::{Error, Result};
use crate::quorum::{AckRule, QuorumOutcome, Write, Written};
use crate::recent_writes::{decide_resend, Resend, ResendDecision, Seen, WriteId};
use kv_core::{Record, Version};
use std::time::Duration;
use tracing::{debug, warn};

impl Cluster {
    /// Handles the resend of `write` (which has an id): `Some` when it was applied before and
    /// is now confirmed again at its version; `None` when no replica has it, so the caller
    /// applies it as a new write; [`Error::OutcomeUnknown`] when that cannot be told.
    pub(crate) async fn check_resend(
        &self,
        key: &str,
        write: &Write,
        w: Consistency,
        request_id: &str,
    ) -> Result<Option<Written>> {
        let (Some(id), Some(resend)) = (write.id, write.resend) else {
            return Ok(None);
        };
        let answers = self.ask_seen(key, id, resend, request_id).await;
        match decide_resend(&answers) {
            ResendDecision::New => {
                debug!(%id, "resend not seen by any replica; applying it");
                Ok(None)
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
                    .map(Some)
            }
        }
    }

    /// This node's own knowledge of write `id` for `key`, vouching for misses `horizon` back
    /// (`POST /internal/seen`).
    pub fn write_id_seen(&self, key: &str, id: WriteId, horizon: Duration) -> Seen {
        self.inner.recent_writes.seen(key, id, horizon)
    }

    /// Asks every replica of `key` (this node included) in parallel whether it stored write
    /// `id` since before the resend's horizon; per replica, its answer (`None`: none in time) and
    /// whether it is believed down.
    async fn ask_seen(
        &self,
        key: &str,
        id: WriteId,
        resend: Resend,
        request_id: &str,
    ) -> Vec<(Option<Seen>, bool)> {
        let inner = &self.inner;
        let horizon = resend.horizon();
        let asks = self.replicas(key).into_iter().map(|replica| async move {
            if replica == inner.me {
                return (Some(inner.recent_writes.seen(key, id, horizon)), false);
            }
            match inner
                .peers
                .seen(&replica, key, id, horizon, request_id)
                .await
            {
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
        let record = Record {
            key: key.to_owned(),
            version,
            value: write.value.clone(),
            expires_at_ms: write.expires_at_ms,
        };
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
