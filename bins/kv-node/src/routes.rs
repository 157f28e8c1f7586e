//! The node's router: which path goes to which handler, and the layers around them (request id
//! and metrics on everything, the bearer token on `/v1`, the cluster credential on `/internal`,
//! either of the two on `/admin`).
//!
//! # Who may call what
//! | routes | credential |
//! |---|---|
//! | `/`, `/health`, `/metrics`, `GET /admin/members`, `GET /ui` (the page only) | none |
//! | `/v1`, `/batch`, `GET /ui/stats` | `Authorization: Bearer <AUTH_TOKEN>` when `AUTH_TOKEN` is set |
//! | `/admin` (backup, checkpoint, repair, membership changes) | bearer `AUTH_TOKEN` or bearer cluster secret |
//! | `/internal` | `x-kv-secret: <cluster secret>` |
//!
//! The cluster secret is `CLUSTER_SECRET`, else `AUTH_TOKEN`; only an open cluster (loopback
//! bind or `INSECURE_CLUSTER=true`, see `config.rs`) has none, and then `/internal` and `/admin`
//! are open too. Node-to-node markers on client routes (`x-kv-forwarded`) count only on calls
//! that carry the secret: [`is_peer_call`].

use crate::config::NodeConfig;
use crate::error::ApiError;
use crate::{admin, api, batch, internal, list, members, status, telemetry, ui, watch};
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, get, post};
use axum::Router;
use kv_cluster::{Cluster, REQUEST_ID_HEADER, SECRET_HEADER};
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::Instant;
use subtle::ConstantTimeEq;

/// What every handler can reach. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: NodeConfig,
    cluster: Cluster,
    metrics: PrometheusHandle,
    started: Instant,
    backup: tokio::sync::Mutex<()>,
}

impl AppState {
    /// Bundles the pieces the handlers use.
    pub fn new(config: NodeConfig, cluster: Cluster, metrics: PrometheusHandle) -> AppState {
        let shared = Shared {
            config,
            cluster,
            metrics,
            started: Instant::now(),
            backup: tokio::sync::Mutex::new(()),
        };
        AppState {
            inner: Arc::new(shared),
        }
    }

    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The cluster layer (which owns the store).
    pub fn cluster(&self) -> &Cluster {
        &self.inner.cluster
    }

    /// The Prometheus registry's handle.
    pub fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }

    /// When this process started serving.
    pub fn started(&self) -> Instant {
        self.inner.started
    }

    /// Held while a backup file is written, so that only one is written at a time.
    pub fn backup_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.inner.backup
    }
}

/// The request id a middleware put on the request (or an empty one if none ran).
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Builds the node's whole HTTP surface.
pub fn app(state: AppState) -> Router {
    let data = Router::new()
        .route("/v1", any(list::list))
        .route("/v1/", any(api::empty_key))
        .route("/v1/{*key}", any(api::data))
        .route("/batch", post(batch::batch))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    // The page holds no data and is open; what it polls needs the token (README, Security).
    let dashboard = Router::new()
        .route("/ui/stats", get(ui::stats))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route("/ui", get(ui::page));
    let admin = Router::new()
        .route("/admin/backup", get(admin::backup))
        .route("/admin/checkpoint", post(admin::checkpoint))
        .route("/admin/repair", get(admin::last_repair).post(admin::repair))
        .route("/admin/members", post(members::change))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin))
        .route("/admin/members", get(members::show));
    let internal = Router::new()
        .route("/internal/replicate", post(internal::replicate))
        .route("/internal/entry/{*key}", get(internal::entry))
        .route("/internal/entries", post(internal::entries))
        .route(kv_cluster::peer::VERSIONS_PATH, post(internal::versions))
        .route("/internal/seen", post(internal::seen))
        .route("/internal/keys", get(internal::keys))
        .route("/internal/members", get(members::view).post(members::offer))
        .route("/internal/transfer", get(members::transfer))
        .route("/internal/estimate", post(members::estimate))
        .route(kv_cluster::peer::PROPOSE_PATH, post(members::propose))
        .route(
            kv_cluster::antientropy::ROOTS_PATH,
            post(internal::aae_roots),
        )
        .route(
            kv_cluster::antientropy::LEAVES_PATH,
            post(internal::aae_leaves),
        )
        .route(kv_cluster::antientropy::KEYS_PATH, post(internal::aae_keys))
        .route(kv_cluster::peer::WATCH_PATH, get(watch::own_feed))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_secret,
        ));
    Router::new()
        .route("/", get(status::status))
        .route("/health", get(status::health))
        .route("/metrics", get(status::metrics))
        .merge(data)
        .merge(dashboard)
        .merge(admin)
        .merge(internal)
        .fallback(status::no_route)
        .method_not_allowed_fallback(status::wrong_method)
        .layer(middleware::from_fn(telemetry::observe))
        .with_state(state)
}

/// `AUTH_TOKEN`: when set, the request needs `Authorization: Bearer <token>` (the scheme in any
/// case, the token compared in constant time: `kv_http::bearer_matches`).
async fn require_token(
    State(app): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &app.config().auth_token {
        if !kv_http::bearer_matches(request.headers(), token) {
            return Err(ApiError::Unauthorized(
                "missing or wrong bearer token (Authorization: Bearer <AUTH_TOKEN>)",
            ));
        }
    }
    Ok(next.run(request).await)
}

/// `/admin`: the bearer token, or the cluster secret as a bearer token (an operator of a cluster
/// without `AUTH_TOKEN` holds the secret). Open only on an open cluster.
async fn require_admin(
    State(app): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let config = app.config();
    let accepted = [config.auth_token.as_ref(), config.cluster_secret.as_ref()];
    let required = accepted.iter().any(Option::is_some);
    let given = accepted
        .iter()
        .flatten()
        .any(|secret| kv_http::bearer_matches(request.headers(), secret));
    if required && !given {
        return Err(ApiError::Unauthorized(
            "admin calls need Authorization: Bearer <AUTH_TOKEN or CLUSTER_SECRET>",
        ));
    }
    Ok(next.run(request).await)
}

/// True when the call carries the cluster secret (always on an open cluster): only such calls
/// may use node-to-node markers such as `x-kv-forwarded`.
pub fn is_peer_call(app: &AppState, headers: &HeaderMap) -> bool {
    match &app.config().cluster_secret {
        Some(secret) => {
            let given = headers
                .get(SECRET_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            bool::from(given.ct_eq(secret.as_bytes()))
        }
        None => true,
    }
}

/// `/internal`: the call must carry the cluster secret (unless the cluster is open).
async fn require_secret(
    State(app): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !is_peer_call(&app, request.headers()) {
        return Err(ApiError::Unauthorized(
            "node-to-node calls need the cluster secret (x-kv-secret)",
        ));
    }
    Ok(next.run(request).await)
}
