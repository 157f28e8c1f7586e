//! Black-box test of the live dashboard (`GET /ui`) in a real browser: headless Chromium loads
//! the page of a running 3-node cluster's load balancer (and of one node), and the rendered DOM
//! is checked: three nodes listed, one shown down after its kill -9, the throughput chart drawn
//! from traffic. A screenshot is saved in the test's temp dir and copied to
//! `target/ui-screenshot.png`. Needs Debian's `chromium` (`.ci/run` installs it when missing).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_tests::{send_with, wait_until, Options, TestCluster};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TOKEN: &str = "ui-test-token";

/// The Chromium binary, or a failed test saying how to install it.
fn chromium() -> &'static str {
    for name in ["chromium", "chromium-browser"] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return name;
        }
    }
    panic!(
        "chromium is not installed: the dashboard test needs a real browser. \
         Install it with `apt-get install -y chromium` (.ci/run does this when it is missing)"
    );
}

/// Loads `url` in headless Chromium, lets the page poll for `budget_ms` of virtual time, and
/// returns the DOM as rendered; with `screenshot`, also saves a PNG of the page.
fn render(dir: &Path, url: &str, budget_ms: u64, screenshot: Option<&Path>) -> String {
    let profile = tempfile::tempdir_in(dir).unwrap();
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1280,900",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(format!("--virtual-time-budget={budget_ms}"));
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    let output = cmd.arg(url).output().unwrap();
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The `<tr class="node" ...>` openings of the rendered nodes table.
fn node_rows(dom: &str) -> Vec<&str> {
    dom.match_indices("<tr class=\"node\"")
        .map(|(i, _)| &dom[i..i + dom[i..].find('>').unwrap()])
        .collect()
}

/// The `data-points` of the throughput chart's series named `name`, if drawn.
fn series_points(dom: &str, name: &str) -> Option<u64> {
    let chart = &dom[dom.find("id=\"chart-throughput\"")?..];
    let chart = &chart[..chart.find("</svg>")?];
    let at = chart.find(&format!("data-series=\"{name}\""))?;
    let rest = &chart[at..];
    let value = &rest[rest.find("data-points=\"")? + 13..];
    value[..value.find('"')?].parse().ok()
}

#[test]
fn the_dashboard_shows_nodes_health_and_throughput_in_a_browser() {
    chromium();
    let mut c = TestCluster::start_with(Options {
        nodes: 3,
        replication_factor: 3,
        lb: true,
        env: vec![
            ("AUTH_TOKEN".into(), TOKEN.into()),
            ("HEALTH_CHECK_INTERVAL_MS".into(), "200".into()),
        ],
    });
    let lb = c.lb_url.clone().unwrap();
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];

    // The page is open and holds no data; what it polls needs the token, on the LB and nodes.
    let page = send_with("GET", &format!("{lb}/ui"), None, &[]).unwrap();
    assert_eq!(page.status, 200);
    assert!(page.text.contains("kv dashboard"));
    for base in [lb.as_str(), c.nodes[0].url.as_str()] {
        let refused = send_with("GET", &format!("{base}/ui/stats"), None, &[]).unwrap();
        assert_eq!(refused.status, 401, "{base}: {}", refused.text);
        let stats = send_with("GET", &format!("{base}/ui/stats"), None, &auth).unwrap();
        assert_eq!(stats.status, 200, "{base}: {}", stats.text);
        assert_eq!(
            stats.json["nodes"].as_array().unwrap().len(),
            3,
            "{}",
            stats.text
        );
    }

    // Traffic through the LB, then the window shows it per route.
    for i in 0..150 {
        let url = format!("{lb}/v1/ui/{i}");
        let put = send_with("PUT", &url, Some(&format!("{{\"value\": {i}}}")), &auth).unwrap();
        assert_eq!(put.status, 200, "{}", put.text);
        let get = send_with("GET", &url, None, &auth).unwrap();
        assert_eq!(get.status, 200, "{}", get.text);
    }
    let stats = send_with("GET", &format!("{lb}/ui/stats"), None, &auth).unwrap();
    let routes = stats.json["routes"]["routes"].as_array().unwrap().clone();
    let put = routes
        .iter()
        .find(|r| r["route"] == "PUT /v1/{*key}")
        .unwrap_or_else(|| panic!("no PUT route in {routes:?}"));
    assert_eq!(put["count"], 150, "{put}");
    assert!(put["p99_ms"].as_f64().unwrap() > 0.0, "{put}");
    let shares: f64 = stats.json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["share"].as_f64().unwrap())
        .sum();
    assert!(
        (shares - 1.0).abs() < 1e-6,
        "ring shares sum to 1: {shares}"
    );

    // Without the token the page asks for it and shows nothing.
    let dom = render(c.dir.path(), &format!("{lb}/ui"), 1500, None);
    assert!(
        dom.contains("id=\"login\" style=\"display: block;\""),
        "{dom}"
    );
    assert!(node_rows(&dom).is_empty(), "{dom}");

    // With it: three nodes up, the throughput chart drawn from the PUTs.
    let url = format!("{lb}/ui#token={TOKEN}");
    let dom = render(c.dir.path(), &url, 2500, None);
    assert!(
        dom.contains("<div id=\"error\"></div>"),
        "the page reports an error: {dom}"
    );
    let rows = node_rows(&dom);
    assert_eq!(rows.len(), 3, "{dom}");
    assert!(
        rows.iter().all(|r| r.contains("data-health=\"up\"")),
        "{rows:?}"
    );
    let points = series_points(&dom, "PUT /v1/{*key}");
    assert!(
        points.is_some_and(|p| p > 0),
        "throughput chart not drawn: {dom}"
    );
    assert!(dom.contains("epoch "), "membership shown: {dom}");

    // kill -9 one node: the LB's health table and then the page show it down.
    let killed = c.nodes[2].url.clone();
    c.nodes[2].kill9();
    wait_until(Duration::from_secs(10), "the LB sees the node down", || {
        let status = send_with("GET", &lb, None, &[]).unwrap();
        status.json["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["url"] == killed.as_str() && n["healthy"] == false)
    });
    let dom = render(c.dir.path(), &url, 2500, None);
    assert!(
        dom.contains("<div id=\"error\"></div>"),
        "the page reports an error: {dom}"
    );
    let rows = node_rows(&dom);
    assert_eq!(rows.len(), 3, "{dom}");
    let down: Vec<&&str> = rows
        .iter()
        .filter(|r| r.contains("data-health=\"down\""))
        .collect();
    assert_eq!(down.len(), 1, "{rows:?}");
    assert!(
        down[0].contains(&format!("data-url=\"{killed}\"")),
        "{rows:?}"
    );
    // The LB logged the node going down: the warnings list shows it.
    let stats = send_with("GET", &format!("{lb}/ui/stats"), None, &auth).unwrap();
    let log = std::fs::read_to_string(c.dir.path().join("lb.log")).unwrap_or_default();
    assert!(
        stats.json["warnings"]
            .to_string()
            .contains("node marked down"),
        "{}\n{log}",
        stats.json["warnings"]
    );
    assert!(dom.contains("node marked down"), "{dom}");

    // A node's own view lists the members, itself marked, and the killed peer down.
    let node_url = format!("{}/ui#token={TOKEN}", c.nodes[0].url);
    wait_until(Duration::from_secs(10), "node1 sees the peer down", || {
        c.nodes[0].sees_down(Some(&killed))
    });
    let dom = render(c.dir.path(), &node_url, 2500, None);
    assert!(
        dom.contains("<div id=\"error\"></div>"),
        "the page reports an error: {dom}"
    );
    let rows = node_rows(&dom);
    assert_eq!(rows.len(), 3, "{dom}");
    assert!(dom.contains("(this node)"), "{dom}");
    assert_eq!(
        rows.iter()
            .filter(|r| r.contains("data-health=\"down\""))
            .count(),
        1
    );

    // The screenshot, saved with the test output.
    let shot = c.dir.path().join("ui-screenshot.png");
    render(c.dir.path(), &url, 2500, Some(&shot));
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot of {} bytes",
        png.len()
    );
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::copy(&shot, target.join("ui-screenshot.png")).unwrap();
}
