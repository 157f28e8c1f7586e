//! Black-box test of the maximum clock offset: a node whose wall clock libfaketime sets 30 s
//! behind the others' measures that on its health checks, refuses to coordinate writes
//! (`503 clock_offset`, naming the offset) and shows it in `GET /`, `/health` and `/metrics`,
//! while the nodes whose clocks agree keep coordinating writes.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_tests::{send, wait_until, Answer, TestCluster};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the nodes get to measure and act on the skew (health checks run every 200 ms).
const NOTICE_WITHIN: Duration = Duration::from_secs(10);

/// The skew given to one node, and how far the measurement may stray from it.
const SKEW_MS: i64 = -30_000;
const TOLERANCE_MS: i64 = 3_000;

fn put(node: &str, key: &str, value: i64) -> Answer {
    let body = json!({ "value": value }).to_string();
    send("POST", &format!("{node}/v1/{key}"), Some(&body)).unwrap()
}

fn get_json(url: &str) -> Value {
    let answer = send("GET", url, None).unwrap();
    assert_eq!(answer.status, 200, "GET {url}: {}", answer.text);
    answer.json
}

fn unix_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

fn near(value: i64, target: i64) -> bool {
    (value - target).abs() <= TOLERANCE_MS
}

/// The offset a `clock_offset` message names ("this node's clock is <n> ms off ...").
fn offset_in_message(message: &str) -> i64 {
    let rest = message
        .split("clock is ")
        .nth(1)
        .unwrap_or_else(|| panic!("no offset in {message:?}"));
    let number = rest.split(" ms").next().unwrap();
    number
        .parse()
        .unwrap_or_else(|_| panic!("no offset in {message:?}"))
}

/// The value of the first `/metrics` sample line that starts with `prefix`.
fn metric(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Every peer of `node` has a clock measurement in `GET /`.
fn peers_measured(node: &str) -> bool {
    get_json(&format!("{node}/"))
        .get("peers")
        .and_then(Value::as_array)
        .is_some_and(|peers| {
            peers
                .iter()
                .all(|p| p["state"] == "up" && p["clock"]["offset_ms"].is_i64())
        })
}

#[test]
fn a_node_with_a_skewed_clock_refuses_to_coordinate_writes_and_says_so() {
    let lib = kv_tests::libfaketime();
    let mut c = TestCluster::start(3);
    c.wait_converged();
    let skewed = c.url(2).to_owned();

    // Before the skew: every node agrees and coordinates writes.
    wait_until(NOTICE_WITHIN, "node3 measured its peers' clocks", || {
        peers_measured(&skewed)
    });
    let status = get_json(&format!("{skewed}/"));
    assert_eq!(status["clock"]["ok"], true, "{status}");
    assert!(near(status["clock"]["offset_ms"].as_i64().unwrap(), 0));
    assert_eq!(put(&skewed, "before", 1).status, 200);

    // Node 3 comes back with its wall clock 30 s behind (monotonic time left alone).
    c.nodes[2].kill9();
    c.nodes[2].set_env("LD_PRELOAD", &lib.display().to_string());
    c.nodes[2].set_env("FAKETIME", "-30s");
    c.nodes[2].set_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    c.nodes[2].restart();
    let health = get_json(&format!("{skewed}/health"));
    let behind = unix_ms() - health["now_ms"].as_i64().unwrap();
    assert!(
        near(behind, -SKEW_MS),
        "libfaketime took no effect: {behind} ms behind"
    );

    // It notices within a few health checks and refuses to coordinate writes.
    let mut refused = None;
    wait_until(
        NOTICE_WITHIN,
        "node3 refuses writes with 503 clock_offset",
        || {
            let answer = put(&skewed, "skewed", 2);
            let done = answer.status == 503;
            refused = Some(answer);
            done
        },
    );
    let refused = refused.unwrap();
    assert_eq!(refused.json["error"], "clock_offset", "{}", refused.text);
    let message = refused.json["message"].as_str().unwrap();
    assert!(near(offset_in_message(message), SKEW_MS), "{message}");
    assert!(message.contains("MAX_CLOCK_OFFSET_MS=500"), "{message}");
    assert_eq!(put(&skewed, "skewed", 3).status, 503, "it keeps refusing");

    // It says so in GET /, /health (still 200: readiness) and /metrics.
    let status = get_json(&format!("{skewed}/"));
    assert_eq!(status["clock"]["ok"], false, "{status}");
    assert_eq!(status["clock"]["max_offset_ms"], 500);
    assert!(
        near(status["clock"]["offset_ms"].as_i64().unwrap(), SKEW_MS),
        "{status}"
    );
    let health = get_json(&format!("{skewed}/health"));
    assert_eq!(
        (health["status"].as_str(), health["clock_ok"].as_bool()),
        (Some("ok"), Some(false))
    );
    let metrics = send("GET", &format!("{skewed}/metrics"), None)
        .unwrap()
        .text;
    let refusals = metric(&metrics, "kv_clock_offset_refusals_total").unwrap_or(0.0);
    assert!(refusals >= 2.0, "{metrics}");
    let peer_offset = format!("kv_peer_clock_offset_ms{{peer=\"{}\"}}", c.url(0));
    let measured = metric(&metrics, &peer_offset).unwrap_or_else(|| panic!("{metrics}"));
    assert!(
        near(measured as i64, -SKEW_MS),
        "{peer_offset} = {measured}"
    );

    // The two nodes whose clocks agree keep coordinating writes, and see node 3's skew.
    for (i, node) in [c.url(0), c.url(1)].into_iter().enumerate() {
        let written = put(node, &format!("fine-{i}"), 4);
        assert_eq!(written.status, 200, "{node}: {}", written.text);
        let status = get_json(&format!("{node}/"));
        assert_eq!(status["clock"]["ok"], true, "{status}");
        assert!(
            near(status["clock"]["offset_ms"].as_i64().unwrap(), 0),
            "{status}"
        );
        let health = get_json(&format!("{node}/health"));
        assert_eq!(health["clock_ok"], true, "{health}");
    }
    wait_until(
        NOTICE_WITHIN,
        "node1 measures node3 about 30 s behind",
        || {
            get_json(&format!("{}/", c.url(0)))["peers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["url"] == skewed.as_str())
                .any(|p| {
                    p["clock"]["offset_ms"]
                        .as_i64()
                        .is_some_and(|o| near(o, SKEW_MS))
                })
        },
    );
}
