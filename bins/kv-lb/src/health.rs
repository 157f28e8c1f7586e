//! What the load balancer believes about each node: healthy or not and the latency of the last
//! check. Owns the active checker task (periodic `GET /health`), passive marking on connect
//! errors, the healthy-first ordering of candidates, and the `GET /health` route.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::app::SharedState;
use crate::metrics;
use crate::upstream::Upstream;

/// Stored in `latency_us` while no check has answered yet.
const NO_LATENCY: u64 = u64::MAX;

/// One node's health, updated by the checker and by failed requests, read by every request.
#[derive(Debug)]
struct NodeHealth {
    url: String,
    healthy: AtomicBool,
    latency_us: AtomicU64,
}

/// Health of every node, indexed like `Ring::nodes()`.
///
/// Nodes start healthy (optimistic), so requests go to their owners before the first check has
/// run; a refused connection marks a node down at once, and only a successful check brings it
/// back.
#[derive(Debug)]
pub struct HealthTable {
    nodes: Vec<NodeHealth>,
}

/// One node as shown by `GET /health` and `GET /`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeReport {
    /// The node's URL.
    pub url: String,
    /// Whether the node is currently believed healthy.
    pub healthy: bool,
    /// Round trip of the last check, in milliseconds; `null` before one and while down.
    pub latency_ms: Option<f64>,
}

impl HealthTable {
    /// A table for `urls`, all believed healthy.
    pub fn new(urls: &[String]) -> Self {
        let nodes = urls
            .iter()
            .map(|url| NodeHealth {
                url: url.clone(),
                healthy: AtomicBool::new(true),
                latency_us: AtomicU64::new(NO_LATENCY),
            })
            .collect();
        HealthTable { nodes }
    }

    /// Takes over the health of the nodes `previous` also knows (a new picture of the cluster
    /// should not forget that a node is down).
    pub fn copy_from(&self, previous: &HealthTable) {
        for node in &self.nodes {
            if let Some(old) = previous.nodes.iter().find(|o| o.url == node.url) {
                node.healthy
                    .store(old.healthy.load(Ordering::Relaxed), Ordering::Relaxed);
                node.latency_us
                    .store(old.latency_us.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// URL of node `index`.
    pub fn url(&self, index: usize) -> Option<&str> {
        self.nodes.get(index).map(|node| node.url.as_str())
    }

    /// Whether node `index` is believed healthy.
    pub fn is_healthy(&self, index: usize) -> bool {
        self.nodes
            .get(index)
            .is_some_and(|node| node.healthy.load(Ordering::Relaxed))
    }

    /// Number of healthy nodes.
    pub fn healthy_count(&self) -> usize {
        (0..self.len()).filter(|&i| self.is_healthy(i)).count()
    }

    /// Passive marking: a request could not connect to node `index`.
    pub fn mark_down(&self, index: usize, reason: &str) {
        self.set(index, false, None, reason);
    }

    /// `candidates` reordered with healthy nodes first; both groups keep their relative order,
    /// so healthy replicas are tried in ring order and unhealthy ones are a last resort.
    pub fn healthy_first(&self, candidates: &[usize]) -> Vec<usize> {
        let (mut healthy, unhealthy): (Vec<usize>, Vec<usize>) =
            candidates.iter().partition(|&&i| self.is_healthy(i));
        healthy.extend(unhealthy);
        healthy
    }

    /// [`HealthTable::healthy_first`] in place, for the data path: a list whose nodes are all
    /// healthy (the usual case) is left as it is, without allocating.
    pub fn order_healthy_first(&self, candidates: &mut [usize]) {
        if candidates.iter().all(|&i| self.is_healthy(i)) {
            return;
        }
        // Stable: both groups keep their ring order.
        candidates.sort_by_key(|&i| !self.is_healthy(i));
    }

    /// Every node's current state.
    pub fn report(&self) -> Vec<NodeReport> {
        self.nodes
            .iter()
            .map(|node| {
                let latency_us = node.latency_us.load(Ordering::Relaxed);
                NodeReport {
                    url: node.url.clone(),
                    healthy: node.healthy.load(Ordering::Relaxed),
                    latency_ms: (latency_us != NO_LATENCY).then(|| latency_us as f64 / 1000.0),
                }
            })
            .collect()
    }

    /// Records a state, logging transitions and updating the health gauge.
    fn set(&self, index: usize, healthy: bool, latency: Option<Duration>, reason: &str) {
        let Some(node) = self.nodes.get(index) else {
            return;
        };
        // A node that is down has no current latency: `null` rather than a stale number.
        let micros = match latency {
            Some(latency) if healthy => {
                u64::try_from(latency.as_micros()).unwrap_or(NO_LATENCY - 1)
            }
            _ => NO_LATENCY,
        };
        node.latency_us.store(micros, Ordering::Relaxed);
        let was_healthy = node.healthy.swap(healthy, Ordering::Relaxed);
        match (was_healthy, healthy) {
            (true, false) => warn!(node = %node.url, reason, "node marked down"),
            (false, true) => info!(node = %node.url, "node is up again"),
            _ => {}
        }
        metrics::node_health(&node.url, healthy);
    }
}

/// Starts one checker task per node: every `interval`, `GET /health` with `timeout`; a node is
/// healthy when it answers 200. The tasks stop when the returned set is dropped.
pub fn spawn_checkers(
    table: Arc<HealthTable>,
    upstream: Upstream,
    interval: Duration,
    timeout: Duration,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for index in 0..table.len() {
        let (table, upstream) = (Arc::clone(&table), upstream.clone());
        tasks.spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                check_once(&table, &upstream, index, timeout).await;
            }
        });
    }
    tasks
}

async fn check_once(table: &HealthTable, upstream: &Upstream, index: usize, timeout: Duration) {
    let Some(url) = table.url(index) else {
        return;
    };
    let started = Instant::now();
    match upstream.get_health(url, timeout).await {
        Ok(200) => table.set(index, true, Some(started.elapsed()), "answered 200"),
        Ok(status) => table.set(index, false, None, &format!("/health answered {status}")),
        Err(reason) => table.set(index, false, None, &reason),
    }
}

/// `GET /health`: 200 `ok` when every node is healthy, 200 `degraded` when some are, 503
/// `down` when none is.
pub async fn health_route(State(state): State<SharedState>) -> Response {
    let nodes = state.routing().health.report();
    let healthy = nodes.iter().filter(|node| node.healthy).count();
    let (status, word) = match healthy {
        0 => (StatusCode::SERVICE_UNAVAILABLE, "down"),
        n if n == nodes.len() => (StatusCode::OK, "ok"),
        _ => (StatusCode::OK, "degraded"),
    };
    let body = serde_json::json!({ "status": word, "nodes": nodes });
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(count: usize) -> HealthTable {
        let urls: Vec<String> = (0..count).map(|i| format!("http://n{i}:1")).collect();
        HealthTable::new(&urls)
    }

    #[test]
    fn nodes_start_healthy_without_latency() {
        let table = table(2);
        assert_eq!(table.healthy_count(), 2);
        assert!(table.report().iter().all(|n| n.latency_ms.is_none()));
    }

    #[test]
    fn healthy_first_keeps_ring_order_within_groups() {
        let table = table(5);
        table.mark_down(3, "test");
        table.mark_down(1, "test");
        assert_eq!(table.healthy_first(&[3, 1, 4, 0]), vec![4, 0, 3, 1]);
        assert_eq!(table.healthy_first(&[2, 0]), vec![2, 0]);
        assert_eq!(table.healthy_first(&[]), Vec::<usize>::new());
        for candidates in [vec![3, 1, 4, 0], vec![2, 0], vec![], vec![4, 2, 0]] {
            let mut in_place = candidates.clone();
            table.order_healthy_first(&mut in_place);
            assert_eq!(in_place, table.healthy_first(&candidates), "{candidates:?}");
        }
    }

    #[test]
    fn a_successful_check_brings_a_node_back_with_latency() {
        let table = table(1);
        table.mark_down(0, "test");
        assert!(!table.is_healthy(0));
        table.set(0, true, Some(Duration::from_micros(1500)), "ok");
        assert!(table.is_healthy(0));
        assert_eq!(table.report()[0].latency_ms, Some(1.5));
        table.mark_down(0, "test");
        assert_eq!(table.report()[0].latency_ms, None);
    }

    #[test]
    fn unknown_index_is_never_healthy() {
        assert!(!table(1).is_healthy(7));
    }
}
