//! Prometheus metrics of the load balancer: names, the recorder, and one function per event so
//! label sets stay consistent. `GET /metrics` renders the handle; there is no separate listener.

use std::cell::RefCell;
use std::time::Duration;

use axum::extract::State;
use axum::http::Method;
use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::app::SharedState;

const REQUESTS: &str = "kv_lb_requests_total";
const REQUEST_DURATION: &str = "kv_lb_request_duration_seconds";
const NODE_HEALTHY: &str = "kv_lb_node_healthy";
const RETRIES: &str = "kv_lb_retries_total";
const FAILOVERS: &str = "kv_lb_failovers_total";
const UPSTREAM_ERRORS: &str = "kv_lb_upstream_errors_total";

/// Histogram buckets of request latency, in seconds (100 µs to 10 s).
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// How often histogram buffers are folded (the exporter leaves this to its user).
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A recorder with our buckets, not installed: for tests and for [`install`].
fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.to_owned()), &LATENCY_BUCKETS)
}

/// Installs the global recorder and returns the handle `GET /metrics` renders.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    builder()?.install_recorder()
}

/// A handle to a recorder that is not installed (renders nothing): for tests.
#[cfg(test)]
pub fn detached_handle() -> Result<PrometheusHandle, BuildError> {
    Ok(builder()?.build_recorder().handle())
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics_route(State(state): State<SharedState>) -> String {
    state.metrics.render()
}

/// One request answered: by route template, method and status.
pub fn request_done(route: &str, method: &str, status: u16, elapsed: Duration) {
    let labels = [
        ("route", route.to_owned()),
        ("method", method.to_owned()),
        ("status", status.to_string()),
    ];
    counter!(REQUESTS, &labels).increment(1);
    let labels = [("route", route.to_owned()), ("method", method.to_owned())];
    histogram!(REQUEST_DURATION, &labels).record(elapsed.as_secs_f64());
}

/// Node health as last seen (1 healthy, 0 not).
pub fn node_health(node: &str, healthy: bool) {
    gauge!(NODE_HEALTHY, "node" => node.to_owned()).set(if healthy { 1.0 } else { 0.0 });
}

/// An attempt at a node failed; `kind` is `connect`, `timeout`, `status_5xx` or `io`.
pub fn upstream_error(node: &str, kind: &'static str) {
    counter!(UPSTREAM_ERRORS, "node" => node.to_owned(), "kind" => kind).increment(1);
}

/// A request was sent again to another node.
pub fn retry() {
    counter!(RETRIES).increment(1);
}

/// A request was answered by a node other than its first choice.
pub fn failover() {
    counter!(FAILOVERS).increment(1);
}

/// The data routes' labels, in [`crate::front::DataRoute`] order.
pub(crate) const DATA_ROUTES: [&str; 4] = ["/v1", "/v1/", "/v1/{*key}", "/batch"];
/// Methods whose metric handles are kept; others take the slower path.
const KEPT_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
];

/// Metric handles of the data routes, made on first use and kept per worker thread, so a
/// request costs no label formatting or registry lookup.
#[derive(Default)]
struct DataHandles {
    /// `kv_lb_requests_total` by (route, method, status).
    counters: Vec<((usize, usize, u16), Counter)>,
    /// `kv_lb_request_duration_seconds` by (route, method).
    histograms: Vec<((usize, usize), Histogram)>,
    /// The dashboard's `METHOD /template` names by (route, method).
    names: Vec<((usize, usize), String)>,
}

thread_local! {
    static DATA_HANDLES: RefCell<DataHandles> = RefCell::new(DataHandles::default());
}

/// [`request_done`] plus the dashboard's record, for a data route (`route` indexes
/// [`DATA_ROUTES`]), with handles kept per thread.
pub fn data_request_done(route: usize, method: &Method, status: u16, elapsed: Duration) {
    let (Some(route_label), Some(m)) = (
        DATA_ROUTES.get(route),
        KEPT_METHODS.iter().position(|kept| kept == method),
    ) else {
        let route_label = DATA_ROUTES.get(route).copied().unwrap_or("unmatched");
        request_done(route_label, method.as_str(), status, elapsed);
        kv_http::dashboard::record_request(method.as_str(), route_label, status, elapsed);
        return;
    };
    DATA_HANDLES.with_borrow_mut(|handles| {
        let key = (route, m, status);
        match handles.counters.iter().find(|(k, _)| *k == key) {
            Some((_, counter)) => counter.increment(1),
            None => {
                let labels = [
                    ("route", (*route_label).to_owned()),
                    ("method", method.as_str().to_owned()),
                    ("status", status.to_string()),
                ];
                let counter = counter!(REQUESTS, &labels);
                counter.increment(1);
                handles.counters.push((key, counter));
            }
        }
        let key = (route, m);
        match handles.histograms.iter().find(|(k, _)| *k == key) {
            Some((_, histogram)) => histogram.record(elapsed.as_secs_f64()),
            None => {
                let labels = [
                    ("route", (*route_label).to_owned()),
                    ("method", method.as_str().to_owned()),
                ];
                let histogram = histogram!(REQUEST_DURATION, &labels);
                histogram.record(elapsed.as_secs_f64());
                handles.histograms.push((key, histogram));
            }
        }
        match handles.names.iter().find(|(k, _)| *k == key) {
            Some((_, name)) => kv_http::dashboard::record_named(name, status, elapsed),
            None => {
                let name = format!("{method} {route_label}");
                kv_http::dashboard::record_named(&name, status, elapsed);
                handles.names.push((key, name));
            }
        }
    });
}
