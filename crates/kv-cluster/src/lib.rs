//! Cluster logic of kv: everything a node does with its peers.
//!
//! # Layout
//! - [`cluster`]: the facade a node serves through: routing, forwarding, status, shutdown.
//! - `quorum`: quorum writes and reads, read repair, deletes, conditional writes.
//! - `listing`: cluster-wide key listing (scatter-gather, merged pages with a cursor).
//! - [`membership`]: the membership view, its file, plans, and the rings during a change.
//! - [`admission`]: which offered views a node adopts (shape, and steps of the plan protocol).
//! - [`proposal`]: one change at a time: the promise a node gives a proposed view.
//! - [`rebalance`]: carrying out a change: estimates, promises, streaming keys, commit, abort.
//! - `cleanup`: dropping keys this node no longer owns, once their new owners confirm them.
//! - `background`: the health-check loop and hint replay.
//! - [`antientropy`]: background rounds that compare replicas' hash trees ([`merkle`]) and
//!   exchange what differs; the horizon that decides when tombstones may be collected.
//! - [`clock`]: clock offsets to peers measured on health checks, and the majority rule that
//!   stops a node whose clock is off from coordinating writes.
//! - `coalesce`: merging concurrent small calls to one peer into batches.
//! - [`consistency`]: `w` / `r` levels and how many replicas each needs.
//! - [`detector`]: the failure detector, what this node believes about each peer.
//! - [`hints`]: durable hinted-handoff files for peers that missed writes; `hint_file`: streaming
//!   them back in byte-capped batches.
//! - [`peer`]: the HTTP client for `/internal` calls and forwarding, and the batch wire format.
//! - [`error`]: this crate's one error type.
//! - [`watch`]: change streams: the bounded history of applied changes that watchers read.
//! - [`recent_writes`]: write ids applied recently, so a resent write applies at most once;
//!   `resend`: how a resend's coordinator asks the replicas and decides.

pub mod admission;
pub mod antientropy;
mod background;
mod cleanup;
pub mod clock;
pub mod cluster;
mod coalesce;
pub mod consistency;
pub mod detector;
pub mod error;
mod hint_file;
pub mod hints;
mod listing;
pub mod membership;
pub mod merkle;
pub mod peer;
pub mod proposal;
mod quorum;
pub mod rebalance;
pub mod recent_writes;
mod resend;
pub mod watch;

pub use antientropy::{AntiEntropyConfig, RepairReport};
pub use clock::{ClockSample, ClockState};
pub use cluster::{Cluster, ClusterConfig, ClusterStatus, PeerView, PeerWatch, Route};
pub use consistency::Consistency;
pub use detector::{PeerState, PeerStatus};
pub use error::{Error, Result};
pub use hints::HintLimits;
pub use kv_ring::DEFAULT_VNODES;
pub use listing::{ListPage, LocalPage};
pub use membership::{Member, MemberState, View};
pub use peer::{
    ForwardRequest, ForwardResponse, FORWARDED_HEADER, REQUEST_ID_HEADER, SECRET_HEADER,
    VERSION_HEADER,
};
pub use quorum::{now_ms, Precondition, Write, Written};
pub use rebalance::{PlanReport, TransferState};
pub use recent_writes::{
    Resend, Seen, WriteId, RESEND_AGE_HEADER, RESEND_HEADER, WRITE_ID_HEADER, WRITE_ID_WINDOW,
};
pub use watch::{HistoryLimits, WatchHub};
