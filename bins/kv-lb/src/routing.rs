//! The load balancer's picture of the cluster: the ring of the nodes that own data now and
//! their health table. `DATABASE_NODES` only seeds it; a background task follows the nodes'
//! membership view (`GET /` of a healthy node) and swaps in a new picture when the epoch grows.

use std::sync::Arc;
use std::time::Duration;

use kv_ring::Ring;
use serde::Deserialize;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::app::SharedState;
use crate::health::{spawn_checkers, HealthTable};

/// How often the load balancer asks a node for the membership view.
pub const VIEW_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The ring and node health requests are routed by; replaced whole, never edited.
#[derive(Debug)]
pub struct Routing {
    /// Epoch of the membership view it was built from (0: `DATABASE_NODES`).
    pub epoch: u64,
    /// The ring of the nodes that own data now; indices match `health`.
    pub ring: Ring,
    /// What the load balancer believes about each of those nodes.
    pub health: Arc<HealthTable>,
    /// N: how many replicas of a key are candidates.
    pub replication_factor: usize,
}

impl Routing {
    /// A picture of `nodes`; health carried over from `previous` for nodes it knew.
    pub fn new(
        epoch: u64,
        nodes: &[String],
        vnodes: usize,
        replication_factor: usize,
        previous: Option<&HealthTable>,
    ) -> Routing {
        let ring = Ring::new(nodes, vnodes);
        let health = HealthTable::new(ring.nodes());
        if let Some(previous) = previous {
            health.copy_from(previous);
        }
        Routing {
            epoch,
            replication_factor: replication_factor.min(ring.len()).max(1),
            ring,
            health: Arc::new(health),
        }
    }
}

#[derive(Debug, Deserialize)]
struct NodeStatus {
    membership: View,
}

#[derive(Debug, Deserialize)]
struct View {
    epoch: u64,
    members: Vec<Member>,
}

#[derive(Debug, Deserialize)]
struct Member {
    url: String,
    state: String,
}

/// Runs the health checkers of the current picture and follows the nodes' membership view:
/// every [`VIEW_POLL_INTERVAL`] one healthy node is asked for it, and a newer epoch rebuilds the
/// ring from its active and leaving members (the nodes that hold data until a change commits).
pub async fn follow_membership(
    state: SharedState,
    check_interval: Duration,
    check_timeout: Duration,
) {
    let mut checkers: JoinSet<()> = spawn_checkers(
        state.routing().health.clone(),
        state.upstream.clone(),
        check_interval,
        check_timeout,
    );
    let mut ticks = tokio::time::interval(VIEW_POLL_INTERVAL);
    loop {
        ticks.tick().await;
        let current = state.routing();
        let Some(view) = fetch_view(&state, &current, check_timeout).await else {
            continue;
        };
        if view.epoch <= current.epoch {
            continue;
        }
        let owners: Vec<String> = view
            .members
            .iter()
            .filter(|m| m.state != "joining")
            .map(|m| m.url.clone())
            .collect();
        if owners.is_empty() {
            continue;
        }
        let next = Routing::new(
            view.epoch,
            &owners,
            state.vnodes,
            state.configured_replication_factor,
            Some(&current.health),
        );
        info!(epoch = view.epoch, nodes = ?next.ring.nodes(), "following the cluster's membership view");
        checkers.abort_all();
        checkers = spawn_checkers(
            next.health.clone(),
            state.upstream.clone(),
            check_interval,
            check_timeout,
        );
        state.set_routing(next);
    }
}

async fn fetch_view(state: &SharedState, routing: &Routing, timeout: Duration) -> Option<View> {
    for index in routing
        .health
        .healthy_first(&(0..routing.health.len()).collect::<Vec<_>>())
    {
        let Some(url) = routing.health.url(index) else {
            continue;
        };
        match state.upstream.get_json(url, "/", timeout).await {
            Ok(body) => match serde_json::from_slice::<NodeStatus>(&body) {
                Ok(status) => return Some(status.membership),
                Err(e) => warn!(node = url, error = %e, "node status has no membership view"),
            },
            Err(reason) => warn!(node = url, %reason, "cannot read the membership view"),
        }
    }
    None
}
