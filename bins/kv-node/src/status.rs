//! Operator endpoints: `GET /` (what this node knows), `GET /health`, `GET /metrics`, and the
//! JSON answers for unknown routes and methods.

use crate::error::ApiError;
use crate::routes::AppState;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::time::UNIX_EPOCH;

/// `GET /`: name, URL, program version, uptime, storage figures and every peer's health.
pub async fn status(State(app): State<AppState>) -> Json<Value> {
    let config = app.config();
    let cluster = app.cluster().status();
    let store = app.cluster().store().status();
    let last_snapshot = store
        .last_snapshot
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64);
    let (w, r) = app.cluster().default_consistency();
    Json(json!({
        "name": config.name,
        "url": config.url,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": app.started().elapsed().as_secs(),
        "keys": store.keys,
        "tombstones": store.tombstones,
        "value_bytes": store.value_bytes,
        "wal_bytes": store.wal_bytes,
        "wal_sync": format!("{:?}", config.wal_sync).to_lowercase(),
        "last_snapshot_unix_ms": last_snapshot,
        "writes_refused": store.failed,
        "read_only": store.read_only,
        "min_free_bytes": config.min_free_bytes,
        "data_dir": config.data_dir,
        "replication_factor": cluster.replication_factor,
        "write_consistency": w.to_string(),
        "read_consistency": r.to_string(),
        "vnodes": cluster.vnodes,
        "nodes": cluster.nodes,
        "membership": app.cluster().topology().view,
        "peers": cluster.peers,
        "hints_pending": cluster.hints_pending,
        "hints_delivered": cluster.hints_delivered,
        "forwarded_requests": cluster.forwarded_requests,
        "read_repairs": cluster.read_repairs,
        "watch": {
            "watchers": app.cluster().watch_hub().watchers(),
            "peer_feeds": app.cluster().watch_hub().peer_feeds(),
            "history_events": app.cluster().watch_hub().held().0,
            "history_bytes": app.cluster().watch_hub().held().1,
        },
        "clock": app.cluster().clock_state(),
        "anti_entropy": {
            "tombstone_horizon_ms": app.cluster().tombstone_horizon(),
            "syncing": app.cluster().syncing(),
            "last_round": app.cluster().last_repair().map(|r| json!({
                "trigger": r.trigger,
                "started_at_ms": r.started_at_ms,
                "complete": r.complete,
                "skipped": r.skipped,
                "ranges_compared": r.counts.ranges_compared,
                "ranges_differed": r.counts.ranges_differed,
                "records_sent": r.counts.records_sent,
                "records_received": r.counts.records_received,
            })),
        },
    }))
}

/// `GET /health`: `200 {"status": "ok"}`; the node only listens once recovery has finished.
/// A node whose WAL failed says so, but stays 200: it still serves reads. It also carries this
/// node's wall clock (`now_ms`, for peers' offset estimates) and whether that clock is within
/// `MAX_CLOCK_OFFSET_MS` of the others: reported, never a reason for another status. A node
/// whose disk is full (or below `MIN_FREE_BYTES`) says `"read_only": "<why>"`, also with 200.
/// A node restored from a backup answers `503 {"status": "syncing"}` until its first complete
/// anti-entropy round (its data may hold keys deleted since the backup).
pub async fn health(State(app): State<AppState>) -> Response {
    let (epoch, digest) = app.cluster().topology().view.rank();
    let clock = app.cluster().clock_state();
    let mut body = json!({
        "status": "ok",
        "epoch": epoch,
        "digest": digest,
        "now_ms": kv_cluster::now_ms(),
        "clock_ok": clock.ok,
        "clock_offset_ms": clock.offset_ms,
    });
    if let Some(reason) = app.cluster().store().write_refused() {
        body["status"] = json!("degraded");
        body["writes_refused"] = json!(reason);
    }
    if let Some(reason) = app.cluster().store().read_only() {
        body["status"] = json!("degraded");
        body["read_only"] = json!(reason);
    }
    if app.cluster().syncing() {
        body["status"] = json!("syncing");
        body["syncing"] = json!(
            "restored from a backup: waiting for an anti-entropy round with the peers to complete"
        );
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(body).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(app): State<AppState>) -> Response {
    crate::telemetry::record_store_gauges(app.cluster());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics().render(),
    )
        .into_response()
}

/// Any path no route takes.
pub async fn no_route(request: Request) -> ApiError {
    ApiError::NotFound(format!("no such route: {}", request.uri().path()))
}

/// A known path with a method it does not take.
pub async fn wrong_method(request: Request) -> ApiError {
    ApiError::MethodNotAllowed {
        method: request.method().to_string(),
        allow: allowed_methods(request.uri().path()),
    }
}

/// The methods a fixed route takes (the `/v1` routes answer wrong methods themselves).
fn allowed_methods(path: &str) -> &'static str {
    match path {
        "/batch" | "/admin/checkpoint" | "/internal/replicate" | "/internal/estimate" => "POST",
        "/admin/members" | "/internal/members" => "GET, POST",
        _ => "GET",
    }
}
