//! The one error type of kv-cluster: what can go wrong while coordinating a request across nodes.

use std::path::PathBuf;

/// Errors of forwarding, replication and quorum coordination. Messages carry the numbers and names
/// a user needs to act on them; the node binary maps each variant to an HTTP status in one place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Fewer replicas than the consistency level asked for answered in time.
    #[error("{answered} of {needed} required replicas answered in time")]
    Unavailable {
        /// Replicas that had to answer (W or R).
        needed: usize,
        /// Replicas that did answer.
        answered: usize,
    },
    /// Fewer replicas than W are believed up, so the write was refused before anything was
    /// written anywhere: retrying later is safe, and nothing changed.
    #[error("{needed} replicas must store this write but only {up} of the key's replicas are up; nothing was written")]
    TooFewReplicasUp {
        /// W.
        needed: usize,
        /// Replicas believed up (this node included).
        up: usize,
    },
    /// A write was sent but not confirmed by W replicas in time: it may or may not be applied
    /// (some replicas may hold it, and hints may carry it on).
    #[error("the write was sent but {detail}; it may or may not have been applied (retrying it is safe)")]
    OutcomeUnknown {
        /// Durable copies confirmed before giving up.
        acked: usize,
        /// What was missing.
        detail: String,
    },
    /// Replicas hold a newer version of the key than this write's, and too few stored it: for a
    /// write with its own version (`x-kv-version`), or one that kept being overtaken by concurrent
    /// writes. Nothing was stored anywhere.
    #[error("the key already holds a newer version ({newest}) than this write's ({version}) on the replicas that answered; nothing was written")]
    Superseded {
        /// The write's version.
        version: kv_core::Version,
        /// The newest version a replica reported.
        newest: kv_core::Version,
    },
    /// This node's wall clock is further than `MAX_CLOCK_OFFSET_MS` from a majority of the
    /// nodes, so it refuses to coordinate writes: its versions could not be trusted.
    #[error("this node's clock is {offset_ms} ms off the other nodes' (only {agreeing} of {judged} nodes, this one included, are within the limit of MAX_CLOCK_OFFSET_MS={max_ms} ms); it coordinates no writes until its clock is synchronised (check NTP), send writes to another node")]
    ClockOffset {
        /// This node's measured offset from the cluster's median clock.
        offset_ms: i64,
        /// `MAX_CLOCK_OFFSET_MS`.
        max_ms: u64,
        /// Nodes within the limit of this one, itself included.
        agreeing: usize,
        /// Nodes judged: this one and its measured up peers.
        judged: usize,
    },
    /// The request ran past its deadline.
    #[error("no answer within {ms} ms")]
    Timeout {
        /// The deadline that passed.
        ms: u64,
    },
    /// A `w` or `r` value that is not `one`, `quorum`, `all` or a number in 1..=N.
    #[error("{name}={value}: expected one, quorum, all or a number from 1 to {max}")]
    BadConsistency {
        /// `w` or `r`.
        name: &'static str,
        /// What the caller sent.
        value: String,
        /// N, the replication factor.
        max: usize,
    },
    /// No replica of the key could be reached to forward the request to.
    #[error("none of the {tried} replicas of the key could be reached to forward the request")]
    NoReplicaReachable {
        /// Replicas tried.
        tried: usize,
    },
    /// A peer answered a node-to-node call with something we cannot use.
    #[error("peer {peer} answered {status}: {reason}")]
    PeerProtocol {
        /// The peer's URL.
        peer: String,
        /// The HTTP status it answered.
        status: u16,
        /// What was wrong.
        reason: String,
    },
    /// The hint store could not read or write its files.
    #[error("hint store {op} {path}: {source}")]
    HintIo {
        /// What was being done.
        op: &'static str,
        /// Which file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A conditional write's precondition (`If-Match` / `If-None-Match`) did not hold.
    #[error("precondition failed: the key's current version is {}", current.map_or_else(|| "none (the key is absent)".to_owned(), |v| v.to_string()))]
    PreconditionFailed {
        /// The key's current version, `None` when it is absent or deleted.
        current: Option<kv_core::Version>,
    },
    /// A membership plan that cannot be carried out.
    #[error("{reason}")]
    BadPlan {
        /// Why.
        reason: String,
    },
    /// A membership change refused because another one is in progress (or a member did not
    /// promise it): the reason names the change in progress.
    #[error("{reason}")]
    ChangeInProgress {
        /// Why, naming the change in progress.
        reason: String,
    },
    /// An offered membership view that is not a well-formed view at all.
    #[error("malformed membership view: {reason}")]
    MalformedView {
        /// What is wrong with it.
        reason: String,
    },
    /// An offered membership view that is not a step this node may take.
    #[error(
        "membership view of epoch {offered} refused (this node is at epoch {current}): {reason}"
    )]
    ViewRefused {
        /// The offered view's epoch.
        offered: u64,
        /// This node's epoch.
        current: u64,
        /// Why.
        reason: String,
    },
    /// An offered membership view this node cannot check against its own (it missed changes):
    /// it adopts it only once a majority of its members hold it.
    #[error("membership view of epoch {offered} not adopted: this node is at epoch {current} and cannot check it step by step; it adopts it once a majority of its members hold it")]
    ViewNeedsMajority {
        /// The offered view's epoch.
        offered: u64,
        /// This node's epoch.
        current: u64,
    },
    /// The stored membership view could not be read or written.
    #[error("membership file {path}: {reason}")]
    MembersFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The local storage engine refused or failed.
    #[error(transparent)]
    Store(#[from] kv_core::Error),
}

impl Error {
    /// This error as the answer to a write whose earlier send may have been applied (a resend):
    /// the refusals that claim "nothing was written" become [`Error::OutcomeUnknown`].
    pub fn possibly_written(self) -> Error {
        let detail = match &self {
            Error::TooFewReplicasUp { .. }
            | Error::Superseded { .. }
            | Error::Unavailable { .. } => {
                format!("an earlier send of it may be applied, and this resend failed: {self}")
            }
            _ => return self,
        };
        Error::OutcomeUnknown { acked: 0, detail }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resend_never_claims_that_nothing_was_written() {
        let refused = Error::TooFewReplicasUp { needed: 2, up: 1 }.possibly_written();
        assert!(
            matches!(&refused, Error::OutcomeUnknown { acked: 0, detail } if detail.contains("1 of the key's replicas")),
            "{refused}"
        );
        let unavailable = Error::Unavailable {
            needed: 2,
            answered: 1,
        }
        .possibly_written();
        assert!(matches!(unavailable, Error::OutcomeUnknown { .. }));
        let other = Error::PreconditionFailed { current: None }.possibly_written();
        assert!(matches!(other, Error::PreconditionFailed { .. }));
    }
}
