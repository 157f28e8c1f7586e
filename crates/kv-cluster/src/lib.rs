//! Cluster logic of kv: everything a node does with its peers.
//!
//! # Layout
//! - [`cluster`]: the facade a node serves through: routing, forwarding, quorum writes and reads,
//!   read repair, the health-check loop and hint replay.
//! - [`consistency`]: `w` / `r` levels and how many replicas each needs.
//! - [`detector`]: the failure detector, what this node believes about each peer.
//! - [`hints`]: durable hinted-handoff files for peers that missed writes.
//! - [`peer`]: the HTTP client for `/internal` calls and forwarding, and the batch wire format.
//! - [`error`]: this crate's one error type.

pub mod cluster;
pub mod consistency;
pub mod detector;
pub mod error;
pub mod hints;
pub mod peer;

pub use cluster::{Cluster, ClusterConfig, ClusterStatus, PeerView, Route};
pub use consistency::Consistency;
pub use detector::{PeerState, PeerStatus};
pub use error::{Error, Result};
pub use kv_ring::DEFAULT_VNODES;
pub use peer::{
    ForwardRequest, ForwardResponse, FORWARDED_HEADER, REQUEST_ID_HEADER, SECRET_HEADER,
};
