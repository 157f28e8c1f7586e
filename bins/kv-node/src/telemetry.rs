//! Logs and metrics: the tracing subscriber (`RUST_LOG`, `LOG_FORMAT`), the Prometheus recorder,
//! and the middleware that gives every request an id, a span and its request metrics.

use crate::config::LogFormat;
use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use kv_cluster::{Cluster, REQUEST_ID_HEADER};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::time::{Duration, Instant, UNIX_EPOCH};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Latency buckets in seconds: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// Installs the tracing subscriber: filter from `RUST_LOG` (default `info`), text or JSON lines on stderr.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // Recent warnings are also kept for the dashboard (`kv_http::dashboard`).
    let warnings = kv_http::dashboard::WarningsLayer;
    let result = match format {
        LogFormat::Text => builder.finish().with(warnings).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .finish()
            .with(warnings)
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("kv-node: cannot install the log subscriber: {e}");
    }
}

/// How often histogram samples are folded into their buckets. The exporter otherwise keeps
/// every sample until the next scrape, which without a scraper is a slow leak.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Histogram buckets of WAL fsyncs in seconds: 25 µs to 1 s (fsyncs are fast, or a problem).
const FSYNC_BUCKETS: &[f64] = &[
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    1.0,
];

/// Histogram buckets of records per group commit.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0,
];

/// Installs the global Prometheus recorder, or (when one is installed already, as in tests) makes
/// a detached one so that `/metrics` still renders.
pub fn init_metrics() -> PrometheusHandle {
    let builder = || {
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("kv_wal_fsync_seconds".into()),
                    FSYNC_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("kv_wal_batch_records".into()),
                    BATCH_BUCKETS,
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new())
    };
    match builder().install_recorder() {
        Ok(handle) => {
            describe_metrics();
            handle
        }
        Err(_) => builder().build_recorder().handle(),
    }
}

/// `# HELP` lines for the metrics an operator alerts on (names as recorded by kv-node,
/// kv-cluster and kv-core).
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "kv_http_requests_total",
        "HTTP requests answered, by route, method and status"
    );
    describe_histogram!(
        "kv_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency"
    );
    describe_counter!(
        "kv_wal_appends_total",
        "store writes (apply calls) made durable by the WAL"
    );
    describe_counter!("kv_wal_records_total", "records written to the WAL");
    describe_counter!(
        "kv_wal_bytes_written_total",
        Unit::Bytes,
        "bytes written to the WAL"
    );
    describe_histogram!(
        "kv_wal_fsync_seconds",
        Unit::Seconds,
        "WAL fsync (fdatasync) latency"
    );
    describe_histogram!("kv_wal_batch_records", "records per WAL group commit");
    describe_counter!(
        "kv_checkpoints_total",
        "checkpoints, by result (ok or error)"
    );
    describe_histogram!(
        "kv_checkpoint_duration_seconds",
        Unit::Seconds,
        "checkpoint duration"
    );
    describe_gauge!(
        "kv_snapshot_bytes",
        Unit::Bytes,
        "size of the last snapshot written"
    );
    describe_gauge!(
        "kv_snapshot_timestamp_seconds",
        "unix time of the newest snapshot"
    );
    describe_counter!(
        "kv_backups_total",
        "backups written, by result (ok or error)"
    );
    describe_gauge!("kv_keys", "live keys on this node");
    describe_gauge!(
        "kv_value_bytes",
        Unit::Bytes,
        "bytes of live values on this node"
    );
    describe_gauge!(
        "kv_wal_bytes",
        Unit::Bytes,
        "WAL bytes not yet covered by a snapshot"
    );
    describe_gauge!(
        "kv_writes_refused",
        "1 when the WAL failed and the node refuses writes"
    );
    describe_gauge!(
        "kv_hints_pending",
        "hinted writes waiting for a peer that was down"
    );
    describe_gauge!(
        "kv_hints_pending_bytes",
        Unit::Bytes,
        "bytes the waiting hints take on disk (capped per peer by HINT_MAX_BYTES)"
    );
    describe_gauge!("kv_peer_up", "1 when this node believes the peer is up");
    describe_gauge!(
        "kv_peer_clock_offset_ms",
        "the peer's wall clock minus this node's, from the last health check (Cristian's estimate)"
    );
    describe_gauge!(
        "kv_clock_offset_ms",
        "this node's wall clock minus the median of the nodes' (itself and its up peers)"
    );
    describe_gauge!(
        "kv_clock_ok",
        "1 while this node's clock is within MAX_CLOCK_OFFSET_MS of a majority of the nodes"
    );
    describe_counter!(
        "kv_clock_offset_refusals_total",
        "writes this node refused to coordinate because its clock was too far from the others'"
    );
}

/// Folds histogram samples every [`UPKEEP_INTERVAL`] for the life of the runtime.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            ticks.tick().await;
            handle.run_upkeep();
        }
    });
}

/// A request id: the caller's `X-Request-Id` when it sent a usable one, else 16 random hex digits.
fn take_or_make_request_id(request: &mut Request) -> HeaderValue {
    if let Some(id) = request.headers().get(REQUEST_ID_HEADER) {
        if !id.is_empty() && id.len() <= 128 {
            return id.clone();
        }
    }
    let id = format!("{:016x}", rand::random::<u64>());
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    request
        .headers_mut()
        .insert(REQUEST_ID_HEADER, value.clone());
    value
}

/// Middleware on every route: request id (taken or made, echoed back), a span carrying it, and
/// the request counter and latency histogram by route, method and status.
pub async fn observe(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = take_or_make_request_id(&mut request);
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().to_string();
    let span = tracing::info_span!(
        "request",
        request_id = id.to_str().unwrap_or_default(),
        method = %method,
        route = %route,
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16().to_string();
    let elapsed = started.elapsed();
    span.in_scope(|| {
        tracing::debug!(
            status,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "answered"
        )
    });
    metrics::counter!("kv_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    kv_http::dashboard::record_request(&method, &route, response.status().as_u16(), elapsed);
    metrics::histogram!("kv_http_request_duration_seconds", "route" => route, "method" => method)
        .record(elapsed.as_secs_f64());
    response.headers_mut().insert(REQUEST_ID_HEADER, id);
    response
}

/// Refreshes the gauges read from the store and cluster just before `/metrics` renders.
pub fn record_store_gauges(cluster: &Cluster) {
    let store = cluster.store().status();
    metrics::gauge!("kv_keys").set(store.keys as f64);
    metrics::gauge!("kv_tombstones").set(store.tombstones as f64);
    metrics::gauge!("kv_value_bytes").set(store.value_bytes as f64);
    metrics::gauge!("kv_wal_bytes").set(store.wal_bytes as f64);
    metrics::gauge!("kv_writes_refused").set(if store.failed.is_some() { 1.0 } else { 0.0 });
    metrics::gauge!("kv_read_only").set(if store.read_only.is_some() { 1.0 } else { 0.0 });
    if let Some(at) = store
        .last_snapshot
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
    {
        metrics::gauge!("kv_snapshot_timestamp_seconds").set(at.as_secs_f64());
    }
    let status = cluster.status();
    metrics::gauge!("kv_hints_pending").set(status.hints_pending as f64);
    metrics::gauge!("kv_hints_pending_bytes").set(status.hints_pending_bytes as f64);
    for peer in status.peers {
        let up = if peer.health.state == kv_cluster::PeerState::Down {
            0.0
        } else {
            1.0
        };
        if let Some(clock) = peer.health.clock {
            metrics::gauge!("kv_peer_clock_offset_ms", "peer" => peer.health.url.clone())
                .set(clock.offset_ms as f64);
        }
        metrics::gauge!("kv_peer_up", "peer" => peer.health.url).set(up);
    }
    let clock = cluster.clock_state();
    metrics::gauge!("kv_clock_offset_ms").set(clock.offset_ms as f64);
    metrics::gauge!("kv_clock_ok").set(if clock.ok { 1.0 } else { 0.0 });
}
