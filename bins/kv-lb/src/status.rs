//! `GET /`: what the load balancer is and believes (version, uptime, ring settings, node health)
//! and how much it has done (requests, retries, failovers).

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::app::SharedState;
use crate::metrics;

/// Totals since start, shown by `GET /` (Prometheus has the same as counters).
#[derive(Debug, Default)]
pub struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    failovers: AtomicU64,
}

impl Counters {
    /// A data request arrived (`/v1...`, `/batch`).
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A request was sent again to another node after a failed attempt.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        metrics::retry();
    }

    /// A request was answered by a node other than its first choice (the key's primary, or
    /// the round-robin pick), because that one was down or failed.
    pub fn failover(&self) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
        metrics::failover();
    }

    fn to_json(&self) -> Value {
        json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "retries": self.retries.load(Ordering::Relaxed),
            "failovers": self.failovers.load(Ordering::Relaxed),
        })
    }
}

/// `GET /`: status JSON.
pub async fn status_route(State(state): State<SharedState>) -> Json<Value> {
    let routing = state.routing();
    Json(json!({
        "name": "kv-lb",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": state.started.elapsed().as_secs(),
        "replication_factor": routing.replication_factor,
        "vnodes": routing.ring.vnodes(),
        "membership_epoch": routing.epoch,
        "healthy_nodes": routing.health.healthy_count(),
        "nodes": routing.health.report(),
        "counters": state.counters.to_json(),
    }))
}
