//! The router and the state every handler shares: which route goes where, which layers wrap
//! them (request id, metrics and span on all; auth on data routes and `/ui/stats`), and JSON
//! 404/405.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, Uri};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::RwLock;

use crate::config::LbConfig;
use crate::error::ApiError;
use crate::front::{self, DataRoute};
use crate::health::health_route;
use crate::metrics::metrics_route;
use crate::routing::Routing;
use crate::status::{status_route, Counters};
use crate::upstream::Upstream;
use crate::{auth, request_context, ui};

/// Slack allowed above `MAX_VALUE_BYTES` for the JSON around the value (`{"value": ...}`).
pub const BODY_MARGIN_BYTES: usize = 64 * 1024;

/// State shared by every handler.
pub type SharedState = Arc<LbState>;

/// Everything a request needs: the ring, node health, the client to the nodes and settings.
#[derive(Debug)]
pub struct LbState {
    /// The ring and node health requests are routed by (see `routing.rs`).
    routing: RwLock<Arc<Routing>>,
    /// Virtual nodes per node (`VNODES`).
    pub vnodes: usize,
    /// `REPLICATION_FACTOR` as configured (capped per picture at its node count).
    pub configured_replication_factor: usize,
    /// Pooled client to the nodes.
    pub upstream: Upstream,
    /// Counts shown by `GET /`.
    pub counters: Counters,
    /// Bearer token required on data routes, if any.
    pub auth_token: Option<String>,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Deadline of one proxied request, failovers included.
    pub request_timeout: Duration,
    /// Renders `GET /metrics`.
    pub metrics: PrometheusHandle,
    /// When the process started, for the uptime.
    pub started: Instant,
    round_robin: AtomicUsize,
}

impl LbState {
    /// Builds the state from a checked configuration and the client to the nodes.
    pub fn new(config: &LbConfig, upstream: Upstream, metrics: PrometheusHandle) -> SharedState {
        let routing = Routing::new(
            0,
            &config.nodes,
            config.vnodes,
            config.replication_factor,
            None,
        );
        Arc::new(LbState {
            routing: RwLock::new(Arc::new(routing)),
            vnodes: config.vnodes,
            configured_replication_factor: config.replication_factor,
            upstream,
            counters: Counters::default(),
            auth_token: config.auth_token.clone(),
            body_limit: config.max_value_bytes.saturating_add(BODY_MARGIN_BYTES),
            request_timeout: config.request_timeout,
            metrics,
            started: Instant::now(),
            round_robin: AtomicUsize::new(0),
        })
    }

    /// The current picture of the cluster; stable for as long as the caller holds it.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.read().clone()
    }

    /// Swaps in a new picture of the cluster.
    pub fn set_routing(&self, routing: Routing) {
        *self.routing.write() = Arc::new(routing);
    }

    /// Every node of `routing`, starting one further round the ring at each call: the order for
    /// requests that have no key (`/batch`, `/v1`), which any node can serve.
    pub fn round_robin(&self, routing: &Routing) -> Vec<usize> {
        let count = routing.ring.len();
        if count == 0 {
            return Vec::new();
        }
        let start = self.round_robin.fetch_add(1, Ordering::Relaxed) % count;
        (0..count).map(|i| (start + i) % count).collect()
    }
}

/// The whole application as one axum `Router`: status routes, the dashboard, JSON fallbacks,
/// and the data routes. The server answers data routes before the router (`front.rs`); they
/// are here too, to the same code, so that the router alone is the whole LB (unit tests).
pub fn app(state: SharedState) -> Router {
    // Data routes keep their own request context (`front::data`): no layer here.
    let data = Router::new()
        .route("/v1", any(data_route))
        .route("/v1/", any(data_route))
        .route("/v1/{*key}", any(data_route))
        .route("/batch", any(data_route));
    // The page holds no data and is open; what it polls needs the token (README, Security).
    let dashboard = Router::new()
        .route("/ui/stats", get(ui::stats).fallback(method_not_allowed))
        .route_layer(from_fn_with_state(Arc::clone(&state), auth::require_token))
        .route("/ui", get(ui::page).fallback(method_not_allowed));
    let rare = Router::new()
        .route("/", get(status_route).fallback(method_not_allowed))
        .route("/health", get(health_route).fallback(method_not_allowed))
        .route("/metrics", get(metrics_route).fallback(method_not_allowed))
        .merge(dashboard)
        .fallback(not_found)
        .layer(from_fn(request_context::track));
    data.merge(rare).with_state(state)
}

/// A data route reached through the router: the same code as the server's front door.
async fn data_route(State(state): State<SharedState>, request: Request) -> Response {
    match DataRoute::of(request.uri().path()) {
        Some(route) => front::data(&state, route, request).await.map(Body::new),
        None => not_found(request.method().clone(), request.uri().clone())
            .await
            .into_response(),
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

#[cfg(test)]
mod tests;
