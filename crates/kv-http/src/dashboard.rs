//! The pieces of the live dashboard (`GET /ui`) that kv-node and kv-lb share: the page itself
//! (one HTML file, embedded), a rolling window of per-route request counts and latencies, and a
//! bounded ring of recent WARN/ERROR log lines.
//!
//! Both windows are process-wide (like the Prometheus recorder): [`record_request`] is called
//! where the request metrics are recorded, and [`WarningsLayer`] is added to the tracing
//! subscriber. `GET /ui/stats` of each binary reads them with [`routes_json`] and
//! [`warnings_json`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// The dashboard page: HTML, CSS and JavaScript in one file, no external resource.
pub const PAGE: &str = include_str!("dashboard.html");

/// Seconds of history kept per route (the charts' width).
pub const WINDOW_SECS: u64 = 60;

/// The last seconds whose latency histograms are kept whole, for the totals' p99 (which merges
/// them). An older second keeps only its own p99: one histogram is about 10 KiB, so keeping one
/// per route for the whole window would cost a node some 4 MiB for a chart.
pub const TOTAL_SECS: u64 = 10;

/// Recent warnings kept.
pub const WARNINGS_KEPT: usize = 50;

/// Longest warning line kept, in bytes (longer ones are cut).
const WARNING_MAX_BYTES: usize = 500;

/// Latencies recorded in microseconds, 1 µs to 100 s, 2 significant digits.
const HIST_MAX_MICROS: u64 = 100_000_000;

/// One route's requests during one second.
#[derive(Debug)]
struct RouteSecond {
    count: u64,
    errors: u64,
    /// The latencies, while the second is one of the last [`TOTAL_SECS`].
    micros: Option<Histogram<u32>>,
    /// The second's p99, once its histogram is dropped.
    p99_ms: Option<f64>,
}

impl RouteSecond {
    fn p99_ms(&self) -> Option<f64> {
        self.micros.as_ref().map(p99_ms).or(self.p99_ms)
    }
}

/// One second of requests, by route (`METHOD template`).
#[derive(Debug)]
struct Second {
    unix_secs: u64,
    routes: BTreeMap<String, RouteSecond>,
}

/// Per-second buckets of the last [`WINDOW_SECS`] seconds.
#[derive(Debug, Default)]
pub struct RouteWindow {
    seconds: Mutex<VecDeque<Second>>,
}

impl RouteWindow {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Second>> {
        self.seconds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one request answered at `now_secs` (Unix seconds). 5xx answers are errors.
    pub fn record(&self, now_secs: u64, route: &str, status: u16, elapsed: Duration) {
        let mut seconds = self.lock();
        let fresh = seconds.back().is_none_or(|s| s.unix_secs < now_secs);
        if fresh {
            seconds.push_back(Second {
                unix_secs: now_secs,
                routes: BTreeMap::new(),
            });
        }
        while seconds
            .front()
            .is_some_and(|s| s.unix_secs + WINDOW_SECS <= now_secs)
        {
            seconds.pop_front();
        }
        if fresh {
            // Seconds that left the totals keep their p99 only.
            for second in seconds
                .iter_mut()
                .filter(|s| s.unix_secs + TOTAL_SECS <= now_secs)
            {
                for r in second.routes.values_mut() {
                    if let Some(hist) = r.micros.take() {
                        r.p99_ms = Some(p99_ms(&hist));
                    }
                }
            }
        }
        // A clock stepping back lands in the newest bucket rather than reordering them.
        let Some(second) = seconds.back_mut() else {
            return;
        };
        // The name is copied only the first time the route is seen in this second.
        if !second.routes.contains_key(route) {
            second.routes.insert(
                route.to_owned(),
                RouteSecond {
                    count: 0,
                    errors: 0,
                    micros: Histogram::new_with_bounds(1, HIST_MAX_MICROS, 2).ok(),
                    p99_ms: None,
                },
            );
        }
        let Some(entry) = second.routes.get_mut(route) else {
            return;
        };
        entry.count += 1;
        if status >= 500 {
            entry.errors += 1;
        }
        if let Some(hist) = &mut entry.micros {
            let micros = u64::try_from(elapsed.as_micros()).unwrap_or(HIST_MAX_MICROS);
            hist.saturating_record(micros.clamp(1, HIST_MAX_MICROS));
        }
    }

    /// The window as JSON, for seconds `now_secs - WINDOW_SECS + 1 ..= now_secs`:
    /// `{"window_secs", "end_unix_secs", "routes": [{"route", "count", "errors",
    /// "p99_ms", "series": [[count, errors, p99_ms|null] per second, oldest first]}]}`.
    /// Totals (`count`, `errors`, `p99_ms`) are over the last [`TOTAL_SECS`] seconds.
    pub fn to_json(&self, now_secs: u64) -> Value {
        let seconds = self.lock();
        let first = now_secs.saturating_sub(WINDOW_SECS - 1);
        let names: std::collections::BTreeSet<&String> =
            seconds.iter().flat_map(|s| s.routes.keys()).collect();
        let mut routes = Vec::new();
        for name in names {
            let mut series = vec![json!([0, 0, null]); WINDOW_SECS as usize];
            let mut count = 0u64;
            let mut errors = 0u64;
            let mut recent: Option<Histogram<u32>> = None;
            for second in seconds.iter().filter(|s| s.unix_secs >= first) {
                let Some(r) = second.routes.get(name) else {
                    continue;
                };
                let p99 = r.p99_ms();
                if let Some(slot) = usize::try_from(second.unix_secs - first)
                    .ok()
                    .and_then(|i| series.get_mut(i))
                {
                    *slot = json!([r.count, r.errors, p99]);
                }
                if second.unix_secs + TOTAL_SECS > now_secs {
                    count += r.count;
                    errors += r.errors;
                    if let Some(h) = &r.micros {
                        match &mut recent {
                            Some(total) => {
                                let _ = total.add(h);
                            }
                            None => recent = Some(h.clone()),
                        }
                    }
                }
            }
            routes.push(json!({
                "route": name,
                "count": count,
                "errors": errors,
                "p99_ms": recent.as_ref().map(p99_ms),
                "series": series,
            }));
        }
        json!({
            "window_secs": WINDOW_SECS,
            "end_unix_secs": now_secs,
            "routes": routes,
        })
    }
}

fn p99_ms(hist: &Histogram<u32>) -> f64 {
    hist.value_at_quantile(0.99) as f64 / 1000.0
}

/// A bounded ring of recent log lines.
#[derive(Debug, Default)]
pub struct Warnings {
    lines: Mutex<VecDeque<Value>>,
}

impl Warnings {
    /// Keeps `line`, dropping the oldest beyond [`WARNINGS_KEPT`].
    pub fn push(&self, unix_ms: u64, level: &str, target: &str, message: &str) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() >= WARNINGS_KEPT {
            lines.pop_front();
        }
        lines.push_back(json!({
            "unix_ms": unix_ms,
            "level": level,
            "target": target,
            "message": cut(message, WARNING_MAX_BYTES),
        }));
    }

    /// Newest first.
    pub fn to_json(&self) -> Value {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        Value::Array(lines.iter().rev().cloned().collect())
    }
}

fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

static ROUTES: LazyLock<RouteWindow> = LazyLock::new(RouteWindow::default);
static WARNINGS: LazyLock<Warnings> = LazyLock::new(Warnings::default);

/// Unix seconds now (0 if the clock is before 1970).
fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Counts one request in the process-wide window: `route` as `METHOD /template`. The
/// dashboard's own page and polls (`/ui...`) are not counted, so an open page does not show up
/// in the throughput it draws.
pub fn record_request(method: &str, route: &str, status: u16, elapsed: Duration) {
    if route.starts_with("/ui") {
        return;
    }
    record_named(&format!("{method} {route}"), status, elapsed);
}

/// [`record_request`] for a caller that keeps its `METHOD /template` names ready (a hot path
/// with a fixed set of routes, none of them the dashboard's), saving the formatting.
pub fn record_named(name: &str, status: u16, elapsed: Duration) {
    ROUTES.record(unix_now().as_secs(), name, status, elapsed);
}

/// The process-wide route window as JSON (see [`RouteWindow::to_json`]).
pub fn routes_json() -> Value {
    ROUTES.to_json(unix_now().as_secs())
}

/// The process-wide recent warnings, newest first.
pub fn warnings_json() -> Value {
    WARNINGS.to_json()
}

/// A tracing layer that keeps WARN and ERROR events in the process-wide ring.
#[derive(Debug, Default, Clone, Copy)]
pub struct WarningsLayer;

impl<S: Subscriber> Layer<S> for WarningsLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let mut line = LineVisitor::default();
        event.record(&mut line);
        let millis = u64::try_from(unix_now().as_millis()).unwrap_or(u64::MAX);
        WARNINGS.push(
            millis,
            level.as_str(),
            event.metadata().target(),
            &line.text,
        );
    }
}

/// Renders an event as `message key=value ...`.
#[derive(Debug, Default)]
struct LineVisitor {
    text: String,
}

impl LineVisitor {
    fn add(&mut self, field: &Field, value: &str) {
        if self.text.len() > WARNING_MAX_BYTES {
            return;
        }
        if field.name() == "message" {
            if self.text.is_empty() {
                self.text.push_str(value);
            } else {
                self.text.insert_str(0, &format!("{value} "));
            }
        } else {
            if !self.text.is_empty() {
                self.text.push(' ');
            }
            self.text.push_str(field.name());
            self.text.push('=');
            self.text.push_str(value);
        }
    }
}

impl Visit for LineVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.add(field, &format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn the_dashboards_own_requests_are_not_counted() {
        record_request("GET", "/ui/stats", 200, Duration::from_millis(1));
        record_request("GET", "/ui", 200, Duration::from_millis(1));
        record_request("GET", "/v1/{*key}", 200, Duration::from_millis(1));
        let text = routes_json().to_string();
        assert!(text.contains("GET /v1/{*key}"), "{text}");
        assert!(!text.contains("/ui"), "{text}");
    }

    #[test]
    fn window_counts_errors_and_p99_per_second() {
        let window = RouteWindow::default();
        for i in 0..100u64 {
            window.record(1000, "GET /v1/{*key}", 200, Duration::from_micros(100 + i));
        }
        window.record(1000, "GET /v1/{*key}", 503, Duration::from_millis(50));
        window.record(1002, "PUT /v1/{*key}", 200, Duration::from_millis(2));
        let json = window.to_json(1002);
        let routes = json["routes"].as_array().cloned().unwrap_or_default();
        assert_eq!(routes.len(), 2);
        let get = &routes[0];
        assert_eq!(get["route"], "GET /v1/{*key}");
        assert_eq!(get["count"], 101);
        assert_eq!(get["errors"], 1);
        let p99 = get["p99_ms"].as_f64().unwrap_or_default();
        assert!(p99 > 0.19 && p99 < 50.5, "{p99}");
        let series = get["series"].as_array().cloned().unwrap_or_default();
        assert_eq!(series.len(), WINDOW_SECS as usize);
        assert_eq!(series[57][0], 101);
        assert_eq!(series[58][0], 0);
        assert_eq!(routes[1]["series"][59][0], 1);
    }

    #[test]
    fn window_forgets_old_seconds_and_totals_only_the_last_ten() {
        let window = RouteWindow::default();
        window.record(100, "GET /", 200, Duration::from_millis(1));
        window.record(150, "GET /", 500, Duration::from_millis(1));
        let json = window.to_json(165);
        assert_eq!(json["routes"][0]["count"], 0);
        assert_eq!(json["routes"][0]["series"][44][1], 1);
        window.record(215, "GET /", 200, Duration::from_millis(1));
        let seconds = window.lock().len();
        assert_eq!(seconds, 1, "seconds older than the window are dropped");
    }

    #[test]
    fn window_keeps_latency_histograms_for_the_totals_only() {
        let window = RouteWindow::default();
        let routes = ["GET /a", "POST /a", "POST /internal/replicate"];
        let first = 1000;
        let last = first + WINDOW_SECS - 1;
        for sec in first..=last {
            for route in routes {
                window.record(sec, route, 200, Duration::from_micros(100 + sec - first));
            }
        }
        let (held, bytes) = {
            let seconds = window.lock();
            let hists: Vec<&Histogram<u32>> = seconds
                .iter()
                .flat_map(|s| s.routes.values())
                .filter_map(|r| r.micros.as_ref())
                .collect();
            let bytes: usize = hists
                .iter()
                .map(|h| h.distinct_values() * std::mem::size_of::<u32>())
                .sum();
            (hists.len(), bytes)
        };
        assert_eq!(held, TOTAL_SECS as usize * routes.len(), "histograms held");
        assert!(
            bytes <= 12 * 1024 * held,
            "{bytes} bytes in {held} histograms"
        );
        let json = window.to_json(last);
        for (i, route) in json["routes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            assert_eq!(
                route["count"], TOTAL_SECS,
                "route {i}: totals of the last seconds"
            );
            let p99 = route["p99_ms"].as_f64().unwrap_or_default();
            assert!((0.155..0.161).contains(&p99), "route {i}: {p99}");
            let series = route["series"].as_array().cloned().unwrap_or_default();
            // The oldest second lost its histogram but kept its p99 (100 µs).
            let oldest = series[0][2].as_f64().unwrap_or_default();
            assert!((0.099..0.101).contains(&oldest), "route {i}: {oldest}");
            let newest = series[59][2].as_f64().unwrap_or_default();
            assert!((0.158..0.161).contains(&newest), "route {i}: {newest}");
        }
    }

    #[test]
    fn warnings_keep_the_newest_and_cut_long_lines() {
        let warnings = Warnings::default();
        for i in 0..(WARNINGS_KEPT + 5) {
            warnings.push(i as u64, "WARN", "t", &format!("line {i}"));
        }
        warnings.push(0, "ERROR", "t", &"é".repeat(400));
        let json = warnings.to_json();
        let lines = json.as_array().cloned().unwrap_or_default();
        assert_eq!(lines.len(), WARNINGS_KEPT);
        assert_eq!(lines[0]["level"], "ERROR");
        assert!(lines[0]["message"].as_str().unwrap_or_default().len() <= WARNING_MAX_BYTES);
        assert_eq!(lines[1]["message"], format!("line {}", WARNINGS_KEPT + 4));
    }

    #[test]
    fn layer_keeps_warnings_but_not_info() {
        let subscriber = tracing_subscriber::registry().with(WarningsLayer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("dashboard-test-info");
            tracing::warn!(node = "http://x", "dashboard-test-warning");
        });
        let text = warnings_json().to_string();
        assert!(
            text.contains("dashboard-test-warning node=http://x"),
            "{text}"
        );
        assert!(!text.contains("dashboard-test-info"), "{text}");
    }

    #[test]
    fn page_is_self_contained() {
        assert!(PAGE.contains("/ui/stats"));
        for outside in [
            "src=\"http",
            "href=\"http",
            "@import",
            "src=\"//",
            "href=\"//",
        ] {
            assert!(!PAGE.contains(outside), "{outside}");
        }
    }
}
